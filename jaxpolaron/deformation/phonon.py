"""Static distortion along the 18 meV LO phonon mode (Cannelli et al., JACS 2021; TR-XAS).

Cannelli et al. describe the photoinduced distortion as an asymmetric Pb–Br bond shortening along the
"orthorhombic c axis": Pb moves off its octahedral inversion centre and the *axial* Br (the Br bridging two
Pb along that axis) move the most; the axial-Br displacement is 6 times the equatorial-Br displacement and
2.5 times the Pb off-centring, and Cs barely moves.

Axis mapping: their c axis is the long orthorhombic axis (≈ 2 a_pc) of the Pbnm setting, which is b in the
Pnma setting used here (bundled mp-567629 CIF), i.e. the pseudo-cubic axis p2 = (0, ½, 0)_ortho, which is the
crystal-frame y axis. `PhononMode.from_structure` finds that axis from the structure (the pseudo-cubic axis
parallel to the longest conventional axis) unless one is given.

Sign convention: for amplitude > 0 the cations move along +axis (Pb by amplitude · pb_ratio, Cs by
amplitude · cs_ratio) and the anions along −axis (axial Br by amplitude, equatorial Br by
amplitude · equatorial_ratio): a polar, LO-like sublattice displacement. A negative amplitude flips it.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.base import Deformation
from jaxpolaron.errors import InputError
from jaxpolaron.structure import CrystalStructure

DEFAULT_PB_RATIO = 1.0 / 2.5  # |u_Pb| / |u_Br,axial| (Cannelli et al.)
DEFAULT_EQUATORIAL_RATIO = 1.0 / 6.0  # |u_Br,equatorial| / |u_Br,axial|
DEFAULT_CS_RATIO = 0.0  # Cs is decoupled from the Pb–Br framework
DEFAULT_WIDTH_FRACTION = 1e3  # envelope width ≫ crystal: a uniform distortion


def long_axis(structure: CrystalStructure) -> int:
    """Index (0, 1, 2) of the pseudo-cubic axis parallel to the longest conventional-cell axis.

    For Pnma CsPbBr3 that is p2 = (0, ½, 0)_ortho (b, the long axis), the crystal-frame y axis.
    """
    basis = np.asarray(structure.pseudo_cubic.basis_frac)
    lengths = np.linalg.norm(structure.lattice, axis=1)
    best, best_len = None, -1.0
    for i, row in enumerate(basis):
        nonzero = np.flatnonzero(np.abs(row) > 1e-9)
        if len(nonzero) == 1 and lengths[nonzero[0]] > best_len + 1e-9:
            best, best_len = i, float(lengths[nonzero[0]])
    if best is None:
        raise InputError(
            f"{structure.name}: no pseudo-cubic axis is parallel to a conventional axis; give the mode axis."
        )
    return best


class PhononMode(Deformation):
    """Displacements along the 18 meV LO mode with a Gaussian spatial envelope.

    For an atom with ideal site r (Å, from the crystal centre) and envelope g(r) = exp(−|r|² / (2σ²)),
    σ = width_fraction · size / 2:

        u = amplitude · g(r) · c · ê        (Å, crystal frame; ê the unit vector of the mode axis)

    with c = +pb_ratio (B site, Pb), −1 (axial X, Br bridging two Pb along the axis), −equatorial_ratio
    (the other X), +cs_ratio (A site, Cs); padded atoms get 0. Axial and equatorial Br are told apart from
    the ideal site: in doubled pseudo-cubic coordinates 2 r_c @ inv(P) (P = `pseudo_cubic_axes()` rows) an X
    site differs in parity from the B sites along exactly the axis it bridges. The B-site parity is read from
    the crystal's first B atom, so any centre site works.

    Attributes:
        amplitude: () axial-Br displacement at the envelope centre, Å (its sign flips the pattern).
        width_fraction: () σ / (size / 2) of the envelope (large: uniform; the default 1e3 is uniform).
        pb_ratio: () |u_Pb| / |u_Br,axial| (default 1 / 2.5).
        equatorial_ratio: () |u_Br,eq| / |u_Br,axial| (default 1 / 6).
        cs_ratio: () u_Cs / |u_Br,axial| along +axis (default 0).
        axis: index of the pseudo-cubic mode axis (static; 1 = p2 = y for Pnma).
        direction: unit vector ê of that axis in the crystal frame (static).
        pc_inverse: inv(P), 3 × 3, Å⁻¹ (static; maps crystal-frame Å to pseudo-cubic cell units).
        sites: species names of the A, B and X sites (static; default ("Cs", "Pb", "Br")).

    Build with `PhononMode.from_structure`. Differentiable w.r.t. every array field.
    """

    amplitude: Float[Array, ""]
    width_fraction: Float[Array, ""]
    pb_ratio: Float[Array, ""]
    equatorial_ratio: Float[Array, ""]
    cs_ratio: Float[Array, ""]
    axis: int = eqx.field(static=True)
    direction: tuple[float, float, float] = eqx.field(static=True)
    pc_inverse: tuple[tuple[float, float, float], ...] = eqx.field(static=True)
    sites: tuple[str, str, str] = eqx.field(static=True)

    def __init__(
        self,
        *,
        amplitude: float | Array,
        width_fraction: float | Array,
        pb_ratio: float | Array,
        equatorial_ratio: float | Array,
        cs_ratio: float | Array,
        axis: int,
        direction: tuple[float, float, float],
        pc_inverse: tuple[tuple[float, float, float], ...],
        sites: tuple[str, str, str] = ("Cs", "Pb", "Br"),
    ):
        dtype = jnp.result_type(float)
        self.amplitude = jnp.asarray(amplitude, dtype)
        self.width_fraction = jnp.asarray(width_fraction, dtype)
        self.pb_ratio = jnp.asarray(pb_ratio, dtype)
        self.equatorial_ratio = jnp.asarray(equatorial_ratio, dtype)
        self.cs_ratio = jnp.asarray(cs_ratio, dtype)
        self.axis = int(axis)
        if len(direction) != 3 or len(sites) != 3 or np.shape(pc_inverse) != (3, 3):
            raise InputError("direction and sites need 3 entries and pc_inverse 3 × 3.")
        dx, dy, dz = (float(x) for x in direction)
        self.direction = (dx, dy, dz)
        self.pc_inverse = tuple((float(r[0]), float(r[1]), float(r[2])) for r in pc_inverse)
        site_a, site_b, site_x = (str(x) for x in sites)
        self.sites = (site_a, site_b, site_x)

    def __check_init__(self):
        if self.axis not in (0, 1, 2):
            raise InputError(f"mode axis must be 0, 1 or 2, got {self.axis}.")
        if abs(float(np.linalg.norm(self.direction)) - 1.0) > 1e-6:
            raise InputError(f"mode direction must be a unit 3-vector, got {self.direction}.")
        if len(set(self.sites)) != 3:
            raise InputError(f"sites must name three distinct species (A, B, X), got {self.sites}.")

    @classmethod
    def from_structure(
        cls,
        structure: CrystalStructure,
        *,
        amplitude: float | Array,
        width_fraction: float | Array = DEFAULT_WIDTH_FRACTION,
        pb_ratio: float | Array = DEFAULT_PB_RATIO,
        equatorial_ratio: float | Array = DEFAULT_EQUATORIAL_RATIO,
        cs_ratio: float | Array = DEFAULT_CS_RATIO,
        axis: int | None = None,
        sites: tuple[str, str, str] = ("Cs", "Pb", "Br"),
    ) -> PhononMode:
        """The mode for a perovskite `structure`.

        Args:
            structure: the periodic structure the crystals are cut from.
            amplitude: axial-Br displacement at the envelope centre, Å (required: Cannelli et al. give
                ratios, not an absolute size).
            width_fraction: envelope σ / (size / 2) (default 1e3: uniform).
            pb_ratio, equatorial_ratio, cs_ratio: displacement ratios to the axial Br.
            axis: pseudo-cubic mode axis; default: the one along the long orthorhombic axis
                (Cannelli's Pbnm c = Pnma b = p2 = crystal y).
            sites: species names of the A, B, X sites.

        Raises:
            InputError: a site species missing from the structure, or no axis can be found.
        """
        missing = [s for s in sites if s not in structure.species]
        if missing:
            raise InputError(f"{structure.name} has no species {missing} (species: {structure.species}).")
        axes = structure.pseudo_cubic_axes()
        i = long_axis(structure) if axis is None else int(axis)
        if i not in (0, 1, 2):
            raise InputError(f"mode axis must be 0, 1 or 2, got {axis}.")
        direction = axes[i] / np.linalg.norm(axes[i])
        return cls(
            amplitude=amplitude,
            width_fraction=width_fraction,
            pb_ratio=pb_ratio,
            equatorial_ratio=equatorial_ratio,
            cs_ratio=cs_ratio,
            axis=i,
            direction=tuple(direction.tolist()),
            pc_inverse=tuple(map(tuple, np.linalg.inv(axes).tolist())),
            sites=sites,
        )

    def _species(self, crystal: Nanocrystal) -> tuple[int, int, int]:
        missing = [s for s in self.sites if s not in crystal.species_names]
        if missing:
            raise InputError(f"the crystal has no species {missing} (species: {crystal.species_names}).")
        a, b, x = (crystal.species_names.index(s) for s in self.sites)
        return a, b, x

    def axial(self, crystal: Nanocrystal) -> Array:
        """(n,) bool: X (Br) atoms whose ideal site bridges two B (Pb) sites along the mode axis."""
        _, b, x = self._species(crystal)
        start, stop = crystal.blocks[b]
        if stop <= start:
            raise InputError("the crystal has no B-site (Pb) atoms to classify the X sites against.")
        inv = jnp.asarray(self.pc_inverse, crystal.ideal.dtype)
        parity = jnp.mod(jnp.rint(2.0 * crystal.ideal @ inv), 2.0)  # (n, 3) parity of doubled pc coordinates
        return (crystal.species == x) & (parity[:, self.axis] != parity[start, self.axis])

    def envelope(self, crystal: Nanocrystal) -> Float[Array, " n"]:
        """Gaussian envelope exp(−|r_c|² / (2σ²)) per atom (n,), σ = width_fraction · size / 2."""
        sigma = self.width_fraction * crystal.size / 2.0
        return jnp.exp(-jnp.sum(crystal.ideal**2, axis=-1) / (2.0 * sigma * sigma))

    def coefficients(self, crystal: Nanocrystal) -> Float[Array, " n"]:
        """Signed displacement per atom along ê in units of the amplitude (n,), before the envelope."""
        a, b, x = self._species(crystal)
        s = crystal.species
        zero = jnp.zeros_like(self.pb_ratio)
        c = jnp.where(s == b, self.pb_ratio, zero)
        c = jnp.where(s == a, self.cs_ratio, c)
        c = jnp.where(s == x, -self.equatorial_ratio, c)
        return jnp.where(self.axial(crystal), -jnp.ones_like(c), c)

    def displacement(self, crystal: Nanocrystal, *, key: Array | None = None) -> Float[Array, "n 3"]:
        """u = amplitude · g(r) · c · ê: (n, 3) Å, crystal frame; `key` is ignored (deterministic model)."""
        del key
        scale = self.amplitude * self.envelope(crystal) * self.coefficients(crystal) * crystal.mask
        return scale[:, None] * jnp.asarray(self.direction, scale.dtype)
