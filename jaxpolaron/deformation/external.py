"""External deformation: DFT ground/excited-state geometries and their core + valence diffraction (SI S4).

The paper relaxes a Cs200Pb125Br450 cube in DFT (CP2K, PBE, GTH pseudopotentials) for the ground state
(S = 0) and the lowest triplet (S = 1), and compares their diffraction (SI S4, Eqs. S1–S3):

    F_core(q) = Σ_i N_i exp(2πi q·r_i)                 core electrons as point scatterers   (S2)
    F_val(q)  = ∫ ρ_val(r) exp(2πi q·r) d³r ≈ Σ_v ρ_v ΔV exp(2πi q·r_v)                    (S1)
    ΔI(q)     = |F_ES,core + F_ES,val|² − |F_GS,core + F_GS,val|²                           (S3)

with q in Å⁻¹ (|q| = 1/d, the package convention; the SI writes e^{iq·r} with q = 2π/d and lengths in
Bohr; the files are converted to Å on reading, `jaxpolaron.dft_io`).

Valence term. The SI projects the density onto the xy, yz and zx planes and Fourier-transforms the
projection; by the projection-slice theorem that yields F_val only on the three planes through q = 0.
Here the full 3D sum over voxels is evaluated at any q (a grid, stacked hkl windows or a q list), so the
same windows and radial metrics as the rest of the package apply. The voxels are point samples (the
cube convention: voxel (i, j, k) at origin + i a + j b + k c); the sum is exact for the sampled density and
periodic in q with the reciprocal of the voxel step, so it is meaningful for |q| well below 1/(2 step)
(CP2K's default grids, ~0.1 Å, reach ~5 Å⁻¹). Two evaluations:

- "grid": voxel vectors along x, y, z and grid-aligned q: the sum separates into three small 1D DFT
  matrices contracted with ρ (cost n_voxels × n_qz, no per-voxel exponentials of the full q grid).
- otherwise the voxels are point scatterers of weight ρ_v ΔV in a one-species pseudo-crystal, and any
  `structure_factor` engine computes the sum ("direct", "separable", "nufft").

Core term. N_i = Z − n_val with n_val the pseudopotential's valence count (`GTH_VALENCE`): Cs 9, Pb 4,
Br 7. The paper's own number fixes Pb at q4: "the intensity at k = 0 amounts to 31550²", and
200·46 + 125·78 + 450·28 = 31550 (the alternative Pb GTH-q14 would give 30300). Pass other counts when
the DFT run used other pseudopotentials.

Frames. `external_pair` reads the ground and excited geometries (same atoms, same order), builds a
`Nanocrystal` from the ground state (atoms grouped by species; `ideal` = the ground positions) and an
`ExternalDisplacement` u = r_excited − r_ground. Positions are moved to the crystal frame by
r → R (r − c) with c the chosen centre (the centroid, an atom, or the species atom nearest the centroid) and
R an optional rotation; `ExternalGeometry.density` maps a cube file's voxels with the *same* c and R, so
atoms and densities stay in one frame. The file's x, y, z should be the pseudo-cubic axes for the
package's hkl windows to apply (true for a cube cut along <100>, such as `crystal.dft_cube`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers
from jaxtyping import Array, Complex, Float

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.base import Deformation, displaced
from jaxpolaron.dft_io import CubeDensity, read_xyz
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors
from jaxpolaron.structure_factor import TWO_PI, Engine, structure_factor

# Valence electrons of CP2K's GTH-PBE pseudopotentials as used in the paper (Pb: q4; see the module doc).
GTH_VALENCE: dict[str, int] = {"Cs": 9, "Pb": 4, "Br": 7}
# Formal charges given to the crystal's species (only used by models that read `Nanocrystal.oxidation`).
DEFAULT_OXIDATION: dict[str, int] = {"Cs": 1, "Pb": 2, "Br": -1}
MAX_SHIFT_A = 1.0  # Å: a larger ground -> excited move almost always means the files list atoms differently

ValenceEngine = Literal["auto", "grid", "direct", "separable", "nufft"]
GeometrySource = str | Path | tuple[Sequence[str], np.ndarray]


# ------------------------------------------------------------------------------------- displacement
class ExternalDisplacement(Deformation):
    """A fixed displacement field read from files, scaled by a differentiable amplitude.

    Attributes:
        u: (n, 3) displacement r_excited − r_ground per atom, Å, crystal frame and crystal atom order.
        amplitude: () scale applied to u (1 = the DFT excited state, 0 = the ground state).
    """

    u: Float[Array, "n 3"]
    amplitude: Float[Array, ""]

    def __init__(self, u: Float[Array, "n 3"], amplitude: float | Float[Array, ""] = 1.0):
        self.u = jnp.asarray(u, jnp.result_type(float))
        self.amplitude = jnp.asarray(amplitude, self.u.dtype)

    def __check_init__(self):
        if self.u.ndim != 2 or self.u.shape[-1] != 3:
            raise ValueError(f"u must have shape (n, 3), got {self.u.shape}")
        if self.amplitude.ndim != 0:
            raise ValueError(f"amplitude must be a scalar, got shape {self.amplitude.shape}")

    def displacement(self, crystal: Nanocrystal, *, key: Array | None = None) -> Float[Array, "n 3"]:
        """amplitude · u (n, 3) in Å; the crystal must be the one u was built for (same atom count)."""
        if crystal.positions.shape != self.u.shape:
            raise ValueError(
                f"ExternalDisplacement holds {self.u.shape[0]} atoms but the crystal has "
                f"{crystal.positions.shape[0]}; build both with external_pair"
            )
        return self.amplitude * self.u * crystal.mask[:, None]


# ------------------------------------------------------------------------------------------ density
class ValenceDensity(eqx.Module):
    """A valence electron density on a regular grid of point samples, crystal frame.

    Attributes:
        origin: (3,) position of voxel (0, 0, 0), Å.
        axes: (3, 3) voxel step vectors as rows, Å.
        data: (nx, ny, nz) density at the voxel points, electrons/Å³.
        axis_aligned: static; True when the voxel vectors lie along x, y, z (enables the "grid" path).
    """

    origin: Float[Array, " 3"]
    axes: Float[Array, "3 3"]
    data: Float[Array, "nx ny nz"]
    axis_aligned: bool = eqx.field(static=True)

    def __init__(self, origin, axes, data, *, axis_aligned: bool | None = None):
        dtype = jnp.result_type(float)
        self.origin = jnp.asarray(origin, dtype)
        self.axes = jnp.asarray(axes, dtype)
        self.data = jnp.asarray(data, dtype)
        if axis_aligned is None:
            try:
                a = np.asarray(axes, np.float64)
            except jax.errors.TracerArrayConversionError:
                raise ValueError("pass axis_aligned explicitly when building a ValenceDensity under jit") from None
            axis_aligned = bool(np.all(np.abs(a - np.diag(np.diag(a))) <= 1e-9 * np.max(np.abs(a))))
        self.axis_aligned = axis_aligned

    def __check_init__(self):
        if self.origin.shape != (3,) or self.axes.shape != (3, 3) or self.data.ndim != 3:
            raise ValueError(
                f"ValenceDensity needs origin (3,), axes (3, 3), data (nx, ny, nz); got "
                f"{self.origin.shape}, {self.axes.shape}, {self.data.shape}"
            )

    @classmethod
    def from_cube(
        cls, cube: CubeDensity, centre: np.ndarray | Sequence[float] = (0.0, 0.0, 0.0), rotation=None
    ) -> ValenceDensity:
        """The cube's density in the crystal frame r -> R (r − centre) (centre (3,) Å in the file frame)."""
        rot = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
        origin = rot @ (np.asarray(cube.origin) - np.asarray(centre, np.float64))
        return cls(origin, np.asarray(cube.axes) @ rot.T, cube.data)

    def voxel_volume(self) -> Float[Array, ""]:
        """Volume of one voxel, Å³."""
        return jnp.abs(jnp.linalg.det(self.axes))

    def points(self) -> Float[Array, "nx ny nz 3"]:
        """Voxel positions (nx, ny, nz, 3), Å."""
        idx = jnp.stack(jnp.meshgrid(*(jnp.arange(n, dtype=self.data.dtype) for n in self.data.shape), indexing="ij"))
        return self.origin + jnp.moveaxis(idx, 0, -1) @ self.axes

    def total_charge(self) -> Float[Array, ""]:
        """Σ ρ ΔV: the electrons the density holds (= F_val(0))."""
        return jnp.sum(self.data) * self.voxel_volume()


# ------------------------------------------------------------------------------------- geometries
@dataclasses.dataclass(frozen=True)
class ExternalGeometry:
    """A ground/excited DFT geometry pair in the crystal frame (host-side container).

    Attributes:
        crystal: the ground-state `Nanocrystal` (atoms grouped by species).
        displacement: `ExternalDisplacement` with u = r_excited − r_ground in crystal order.
        order: (n,) file index of each crystal atom (crystal atom i is file atom order[i]).
        centre: (3,) the file-frame point that became the crystal origin, Å.
        rotation: (3, 3) R of r_crystal = R (r_file − centre).
        symbols: element symbol per atom, file order.
        ground_positions, excited_positions: (n, 3) the geometries as read, file frame and order, Å.
    """

    crystal: Nanocrystal
    displacement: ExternalDisplacement
    order: np.ndarray
    centre: np.ndarray
    rotation: np.ndarray
    symbols: tuple[str, ...]
    ground_positions: np.ndarray
    excited_positions: np.ndarray

    def to_crystal_frame(self, points: np.ndarray) -> np.ndarray:
        """File-frame points (..., 3) Å -> crystal frame R (r − centre)."""
        return (np.asarray(points, np.float64) - self.centre) @ self.rotation.T

    def excited_crystal(self) -> Nanocrystal:
        """The crystal at the excited geometry scaled by the displacement's amplitude."""
        return displaced(self.crystal, self.displacement.displacement(self.crystal))

    def density(
        self,
        cube: CubeDensity,
        state: Literal["ground", "excited"] = "ground",
        *,
        check_atoms: bool = True,
        atol: float = 1e-3,
        valence: Mapping[str, float] | None = None,
        check_charge: bool = True,
        rtol_charge: float = 0.01,
    ) -> ValenceDensity:
        """A cube file's valence density in this geometry's crystal frame.

        Args:
            cube: from `dft_io.read_cube`.
            state: which geometry the cube belongs to; its atoms must match that geometry's positions
                (within `atol` Å) when `check_atoms`, which proves the density and atoms share a frame.
            valence: valence electrons per element (defaults `GTH_VALENCE`), for the charge check.
            check_charge: require ∫ρ dV = Σ_atoms n_val within `rtol_charge` (catches unit mistakes and
                pseudopotentials other than the assumed ones).
        """
        if state not in ("ground", "excited"):
            raise InputError(f"state must be 'ground' or 'excited', got {state!r}.")
        reference = self.ground_positions if state == "ground" else self.excited_positions
        if check_atoms:
            if cube.symbols != self.symbols:
                raise InputError(
                    f"the cube file lists {len(cube.symbols)} atoms that differ from the {len(self.symbols)} "
                    f"atoms of the {state} geometry (elements or order)."
                )
            worst = float(np.max(np.linalg.norm(cube.positions - reference, axis=1)))
            if worst > atol:
                raise InputError(
                    f"the cube file's atoms sit up to {worst:.3g} Å from the {state} geometry's, so density and "
                    "atoms are not in the same frame (or the files belong to different states)."
                )
        if check_charge:
            counts = {**GTH_VALENCE, **(valence or {})}
            missing = sorted(set(self.symbols) - set(counts))
            if missing:
                raise InputError(f"no valence electron count for {missing[0]}; pass valence={{...}}.")
            expected = float(sum(counts[s] for s in self.symbols))
            held = cube.total_charge()
            if abs(held - expected) > rtol_charge * expected:
                raise InputError(
                    f"the cube holds {held:.6g} electrons but the atoms have {expected:.6g} valence electrons; "
                    "check the units (e/Bohr³ expected) or pass the pseudopotentials' valence counts."
                )
        return ValenceDensity.from_cube(cube, self.centre, self.rotation)


def _load(source: GeometrySource, label: str) -> tuple[list[str], np.ndarray]:
    if isinstance(source, str | Path):
        return read_xyz(source)
    symbols, positions = source
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3 or len(symbols) != len(positions):
        raise InputError(
            f"{label} geometry needs n symbols and (n, 3) positions, got {len(symbols)} and {positions.shape}."
        )
    return [str(s) for s in symbols], positions


def _centre_point(centre, symbols: list[str], positions: np.ndarray) -> np.ndarray:
    centroid = positions.mean(axis=0)
    if centre is None:
        return np.zeros(3)
    if isinstance(centre, str) and centre == "centroid":
        return centroid
    if isinstance(centre, str):
        candidates = np.flatnonzero(np.asarray(symbols) == centre)
        if candidates.size == 0:
            raise InputError(f"centre {centre!r} is neither 'centroid' nor an element of the geometry.")
        return positions[candidates[np.argmin(np.linalg.norm(positions[candidates] - centroid, axis=1))]]
    if isinstance(centre, int | np.integer) and not isinstance(centre, bool):
        if not -len(positions) <= centre < len(positions):
            raise InputError(f"centre atom index {centre} is out of range for {len(positions)} atoms.")
        return positions[centre]
    raise InputError(f"centre must be 'centroid', an element symbol, an atom index or None, got {centre!r}.")


def external_pair(
    ground: GeometrySource,
    excited: GeometrySource,
    *,
    species_order: Sequence[str] | None = None,
    centre: str | int | None = "centroid",
    rotation: np.ndarray | None = None,
    oxidation: Mapping[str, int] | None = None,
    max_shift: float | None = MAX_SHIFT_A,
    amplitude: float = 1.0,
) -> ExternalGeometry:
    """Build the ground-state crystal and the ground -> excited displacement from two geometries.

    Args:
        ground, excited: `.xyz` paths or (symbols, positions (n, 3) Å) pairs; same atoms in the same order.
        species_order: element per species index, e.g. ("Cs", "Pb", "Br") to match scattering factors built
            for the bundled structure (may list elements absent from the files); default: file order of first
            appearance.
        centre: the crystal origin: "centroid" (default), an element symbol (its atom nearest the centroid,
            e.g. "Pb" reproduces `crystal.dft_cube`'s origin), a file atom index, or None (keep the file's).
        rotation: (3, 3) proper rotation R taking file axes to crystal axes (default identity).
        oxidation: formal charge per element (default `DEFAULT_OXIDATION`, 0 for others).
        max_shift: largest |u| in Å accepted (None: no check); larger moves suggest reordered atoms.
        amplitude: initial `ExternalDisplacement.amplitude`.
    """
    g_sym, g_pos = _load(ground, "ground")
    e_sym, e_pos = _load(excited, "excited")
    if len(g_sym) != len(e_sym):
        raise InputError(f"the ground geometry has {len(g_sym)} atoms but the excited one has {len(e_sym)}.")
    mismatch = [i for i, (a, b) in enumerate(zip(g_sym, e_sym, strict=True)) if a != b]
    if mismatch:
        i = mismatch[0]
        raise InputError(f"atom {i} is {g_sym[i]} in the ground geometry but {e_sym[i]} in the excited one.")
    u_file = e_pos - g_pos
    shift = np.linalg.norm(u_file, axis=1)
    if max_shift is not None and shift.max() > max_shift:
        i = int(np.argmax(shift))
        raise InputError(
            f"atom {i} ({g_sym[i]}) moves {shift[i]:.3g} Å between the ground and excited geometries "
            f"(more than {max_shift} Å); are the atoms listed in the same order?"
        )
    names = tuple(dict.fromkeys(g_sym)) if species_order is None else tuple(species_order)
    if len(set(names)) != len(names):
        raise InputError(f"species_order lists an element twice: {names}.")
    unknown = sorted(set(g_sym) - set(names))
    if unknown:
        raise InputError(f"element {unknown[0]} of the geometry is missing from species_order {names}.")
    rot = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
    if rot.shape != (3, 3) or not np.allclose(rot @ rot.T, np.eye(3), atol=1e-8) or np.linalg.det(rot) < 0:
        raise InputError("rotation must be a proper 3x3 rotation matrix (orthonormal, determinant +1).")
    c = _centre_point(centre, g_sym, g_pos)

    species = np.array([names.index(s) for s in g_sym], np.int32)
    order = np.argsort(species, kind="stable")
    positions = ((g_pos - c) @ rot.T)[order]
    u = (u_file @ rot.T)[order]
    counts = np.bincount(species, minlength=len(names))
    stops = np.cumsum(counts)
    charges = {**DEFAULT_OXIDATION, **(oxidation or {})}
    dtype = jnp.result_type(float)
    crystal = Nanocrystal(
        positions=jnp.asarray(positions, dtype),
        species=jnp.asarray(species[order], jnp.int32),
        mask=jnp.ones(len(species), dtype),
        ideal=jnp.asarray(positions, dtype),
        size=jnp.asarray(np.ptp(positions, axis=0).max(), dtype),
        species_names=names,
        oxidation=tuple(int(charges.get(s, 0)) for s in names),
        blocks=tuple((int(a), int(b)) for a, b in zip(stops - counts, stops, strict=True)),
    )
    return ExternalGeometry(
        crystal=crystal,
        displacement=ExternalDisplacement(u, amplitude),
        order=order,
        centre=c,
        rotation=rot,
        symbols=tuple(g_sym),
        ground_positions=g_pos,
        excited_positions=e_pos,
    )


# ------------------------------------------------------------------------------------- diffraction
def _constant_factors(values: Float[Array, " S"]) -> ScatteringFactors:
    """Scattering factors f_s(q) = values[s] for all q (point scatterers carrying `values` electrons)."""
    values = jnp.asarray(values)
    n = values.shape[0]
    zeros = jnp.zeros((n, 5), values.dtype)
    return ScatteringFactors(
        wk_scale=zeros,
        wk_exponent=zeros,
        wk_offset=values,
        f1=jnp.zeros_like(values),
        f2=jnp.zeros_like(values),
        labels=tuple(f"point{i}" for i in range(n)),
        energy_kev=0.0,
    )


def core_electrons(species_names: Sequence[str], valence: Mapping[str, float] | None = None) -> np.ndarray:
    """Core electrons per species (S,): Z − n_val with n_val from `valence` over `GTH_VALENCE`."""
    counts = {**GTH_VALENCE, **(valence or {})}
    out = []
    for name in species_names:
        if name not in atomic_numbers or name not in counts:
            raise InputError(f"no valence electron count for {name!r}; pass valence={{{name!r}: n}}.")
        z, n_val = atomic_numbers[name], counts[name]
        if not 0 <= n_val <= z:
            raise InputError(f"{name} cannot have {n_val} valence electrons (Z = {z}).")
        out.append(z - n_val)
    return np.asarray(out, np.float64)


def _core_counts(crystal: Nanocrystal, n_core) -> Array:
    dtype = crystal.positions.dtype
    if n_core is None:
        return jnp.asarray(core_electrons(crystal.species_names), dtype)
    if isinstance(n_core, Mapping):
        missing = [s for s in crystal.species_names if s not in n_core]
        if missing:
            raise InputError(f"n_core has no entry for {missing[0]}.")
        return jnp.asarray([n_core[s] for s in crystal.species_names], dtype)
    counts = jnp.asarray(n_core, dtype)
    if counts.shape != (len(crystal.species_names),):
        raise ValueError(f"n_core must have shape ({len(crystal.species_names)},), got {counts.shape}")
    return counts


@eqx.filter_jit
def core_structure_factor(
    crystal: Nanocrystal,
    n_core: Mapping[str, float] | Float[Array, " S"] | None,
    q: Grid | Float[Array, "m 3"],
    engine: Engine = "auto",
    eps: float | None = None,
) -> Complex[Array, ...]:
    """F_core(q) = Σ_i N_i exp(2πi q·r_i) (SI Eq. S2), electrons; core electrons as point scatterers.

    Args:
        crystal: atoms in Å, crystal frame.
        n_core: core electrons per species: None (Z − `GTH_VALENCE`: Cs 46, Pb 78, Br 28), a mapping
            {element: N}, or an (S,) array (differentiable).
        q: a `Grid` (stacked windows allowed) or (m, 3) list, Å⁻¹.
        engine, eps: as in `structure_factor`.

    Returns:
        Complex array shaped like `structure_factor`'s output.
    """
    return structure_factor(crystal, _constant_factors(_core_counts(crystal, n_core)), q, engine, eps)


def _grid_transform(density: ValenceDensity, grid: Grid) -> Array:
    """Σ_v ρ_v ΔV e^{2πi q·r_v} for axis-aligned voxels on an axis-aligned q grid: three 1D DFT contractions."""
    step = jnp.diagonal(density.axes)
    weights = density.data * density.voxel_volume()

    def dft(q_axis, i):  # (Q_i, n_i)
        x = density.origin[i] + step[i] * jnp.arange(density.data.shape[i], dtype=density.data.dtype)
        return jnp.exp(1j * TWO_PI * q_axis[:, None] * x[None, :])

    qx, qy, qz = grid.axes()
    hi = jax.lax.Precision.HIGHEST
    t = jnp.einsum("abc,zc->abz", weights, dft(qz, 2), precision=hi)
    t = jnp.einsum("abz,yb->ayz", t, dft(qy, 1), precision=hi)
    return jnp.einsum("ayz,xa->xyz", t, dft(qx, 0), precision=hi)


@eqx.filter_jit
def valence_structure_factor(
    density: ValenceDensity,
    q: Grid | Float[Array, "m 3"],
    engine: ValenceEngine = "auto",
    eps: float | None = None,
) -> Complex[Array, ...]:
    """F_val(q) = Σ_v ρ_v ΔV exp(2πi q·r_v) (SI Eq. S1, as a full 3D transform), electrons.

    Args:
        density: valence density, crystal frame (`ExternalGeometry.density`).
        q: a `Grid` (stacked windows allowed) or (m, 3) list, Å⁻¹.
        engine: "grid" (axis-aligned voxels and a `Grid` q; "auto" picks it when possible), or a
            `structure_factor` engine applied to the voxels as point scatterers.
        eps: NUFFT tolerance.

    Returns:
        Complex array shaped like `structure_factor`'s output; F_val(0) = `density.total_charge()`.
    """
    separable_grid = isinstance(q, Grid) and density.axis_aligned
    if engine == "grid" and not separable_grid:
        raise ValueError("the 'grid' valence engine needs a Grid q and voxel vectors along x, y, z")
    if isinstance(q, Grid) and separable_grid and engine in ("grid", "auto"):
        if q.centre.ndim == 2:
            return jax.vmap(lambda g: _grid_transform(density, g))(q)
        return _grid_transform(density, q)
    points = density.points().reshape(-1, 3)
    n = points.shape[0]
    pseudo = Nanocrystal(
        positions=points,
        species=jnp.zeros(n, jnp.int32),
        mask=density.data.reshape(-1) * density.voxel_volume(),  # per-voxel weight ρ ΔV (electrons)
        ideal=points,
        size=jnp.max(jnp.ptp(points, axis=0)),
        species_names=("valence",),
        oxidation=(0,),
        blocks=((0, n),),
    )
    unit = _constant_factors(jnp.ones(1, points.dtype))
    return structure_factor(pseudo, unit, q, cast(Engine, engine), eps)  # "grid" returned above


class DFTState(eqx.Module):
    """One DFT state for Eq. S3: the atoms (core point scatterers) and, optionally, the valence density.

    Attributes:
        crystal: atom positions, Å, crystal frame.
        density: valence density in the same frame, or None for core-only diffraction.
    """

    crystal: Nanocrystal
    density: ValenceDensity | None = None


def pair_states(
    crystal: Nanocrystal,
    deformation: Deformation,
    ground_density: ValenceDensity | None = None,
    excited_density: ValenceDensity | None = None,
    *,
    key: Array | None = None,
) -> tuple[DFTState, DFTState]:
    """(ground, excited) states: the excited atoms are the crystal displaced by `deformation`.

    `ExternalDisplacement.amplitude` scales the atom displacements only; the excited density is used as
    given (it belongs to amplitude 1).
    """
    excited = displaced(crystal, deformation.displacement(crystal, key=key))
    return DFTState(crystal, ground_density), DFTState(excited, excited_density)


def dft_amplitude(
    state: DFTState,
    q: Grid | Float[Array, "m 3"],
    *,
    n_core: Mapping[str, float] | Float[Array, " S"] | None = None,
    engine: Engine = "auto",
    valence_engine: ValenceEngine = "auto",
    eps: float | None = None,
) -> Complex[Array, ...]:
    """F_core(q) + F_val(q) of one state (electrons); F_core alone when the state has no density."""
    f = core_structure_factor(state.crystal, n_core, q, engine, eps)
    if state.density is not None:
        f = f + valence_structure_factor(state.density, q, valence_engine, eps)
    return f


def dft_intensity(state: DFTState, q: Grid | Float[Array, "m 3"], **kwargs) -> Float[Array, ...]:
    """|F_core + F_val|² (electrons²); keyword arguments as in `dft_amplitude`."""
    f = dft_amplitude(state, q, **kwargs)
    return jnp.real(f) ** 2 + jnp.imag(f) ** 2


def dft_difference(ground: DFTState, excited: DFTState, q: Grid | Float[Array, "m 3"], **kwargs) -> Float[Array, ...]:
    """ΔI(q) = |F_ES,core + F_ES,val|² − |F_GS,core + F_GS,val|² (SI Eq. S3), electrons².

    Both states must share the crystal frame (build them with `external_pair` / `ExternalGeometry.density`
    or `pair_states`). Keyword arguments as in `dft_amplitude` (one `n_core` for both states).
    """
    return dft_intensity(excited, q, **kwargs) - dft_intensity(ground, q, **kwargs)
