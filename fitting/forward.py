"""The simulated side of a fit: size- and hole-averaged dark and difference intensities on the fit windows.

`EnsembleForward(model)` returns, on every distinct family-member window of a `WindowLayout`,
    I0 = Σ_s w_s I0_s,   ΔI = Σ_s w_s ΔI_s[model]          (electrons², (n_members, m, m, m))
with `jaxpolaron.ensemble.pumped_difference` per size s (holes drawn from one fixed key, so the objective is
a deterministic, differentiable function of the model: common random numbers across steps). The size
weights w_s are the Gamma weights of the sampled sizes, optionally divided by each size's peak intensity
("peak" weighting) to mimic the reduction's per-crystal scaling to a common peak height.

A merged voxel is not the intensity at its centre: nearest-voxel merging averages the pixels that fall anywhere in
the voxel, i.e. the box average of I over the voxel. For 4–7 nm crystals the Bragg peaks are 1.6–3 voxels wide
(voxel 2/256 Å⁻¹), so the box average lowers and widens them by ~10 %, and a size mixture calibrated on the dark
then turns that into a deformation bias (−14 % in the amplitude on the demo's windows, docs/closed_loop.md).
`voxel_points` = p evaluates the model at the p³ Gauss–Legendre nodes of the voxel and averages them (p = 2:
exact for every polynomial of degree 3 per axis; `voxel_nodes`); p = 1 is the centre value, right for
point-sampled volumes (`jaxpolaron simulate --grid`). Cost: p³ times the windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.accurate_difference import accurate_engine
from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.base import Deformation
from jaxpolaron.ensemble import GammaSizes, Method, pumped_difference, size_crystals
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import DEFAULT_NODES
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors, scattering_factors
from jaxpolaron.structure import CrystalStructure
from jaxpolaron.structure_factor import intensity

SizeWeighting = Literal["number", "peak"]


def voxel_nodes(points: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes of one voxel axis, as fractions of the voxel in (−1/2, 1/2), and weights (sum 1)."""
    if points < 1:
        raise ValueError(f"voxel_points must be >= 1, got {points}.")
    x, w = np.polynomial.legendre.leggauss(points)
    return x / 2.0, w / 2.0


def sampling_grid(grid: Grid, points: int) -> Grid:
    """The windows of `grid` repeated at the p³ voxel nodes: (p³ · n_windows, m, m, m), node-major."""
    if points == 1:
        return grid
    x, _ = voxel_nodes(points)
    offsets = jnp.asarray(np.stack(np.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3), grid.centre.dtype)
    centre = (grid.centre[None] + offsets[:, None, :] * grid.voxel[None]).reshape(-1, 3)
    return Grid(centre=centre, voxel=jnp.tile(grid.voxel, (len(offsets), 1)), shape=grid.shape)


def voxel_mean(values: Array, points: int) -> Array:
    """(p³ · n_windows, m, m, m) values at the voxel nodes (`sampling_grid`) → their voxel means (n_windows, ...)."""
    if points == 1:
        return values
    _, w = voxel_nodes(points)
    w3 = jnp.asarray(np.einsum("i,j,k->ijk", w, w, w).reshape(-1), values.dtype)
    return jnp.tensordot(w3, values.reshape(len(w3), -1, *values.shape[1:]), axes=1)


class EnsembleForward(eqx.Module):
    """Ensemble dark and difference intensities on fixed q windows, as a function of a deformation model.

    Attributes:
        crystals: one crystal per sampled size.
        weights: (n_sizes,) size weights (sum 1 before any peak normalisation), or (n_sizes, n_members) weights
            per member window (`calibrate_to_dark`: one size mixture per reflection family).
        scattering: per-species f(q) at the beam energy.
        grid: stacked member windows (n_members, m, m, m), Å⁻¹.
        occupancy: pair probabilities of the pumped ensemble.
        key: PRNG key of the hole samples (fixed: the same holes at every step).
        n_holes: hole samples per size (random models; "exact", "second" and the mean field of "linear").
        method: "accurate" (quadrature hole average, within 1–2 % of exact), "linear" (first order in the
            hole-averaged field), "exact" or "second".
        nodes: quadrature nodes of the "accurate" method (a power of two, >= 32).
        accurate_engine: its route for these windows (`jaxpolaron.accurate_difference.accurate_engine`).
        voxel_points: Gauss–Legendre nodes per axis of the voxel average (module docstring; 1: centre values).
    """

    crystals: tuple[Nanocrystal, ...]
    weights: Float[Array, " n_sizes *members"]
    scattering: ScatteringFactors
    grid: Grid
    occupancy: Occupancy
    key: Array
    n_holes: int = eqx.field(static=True)
    method: str = eqx.field(static=True)
    nodes: int = eqx.field(static=True, default=DEFAULT_NODES)
    accurate_engine: str = eqx.field(static=True, default="auto")
    voxel_points: int = eqx.field(static=True, default=1)

    def dark_of(self, crystal: Nanocrystal) -> Float[Array, "n_members m m m"]:
        """|F|² of one crystal on the windows (voxel means), electrons²."""
        return voxel_mean(intensity(crystal, self.scattering, sampling_grid(self.grid, self.voxel_points)),
                          self.voxel_points)  # fmt: skip

    def dark(self) -> Float[Array, "n_members m m m"]:
        """Σ_s w_s |F_s|² on the windows (independent of the model), electrons²."""
        return sum(_per_member(w) * self.dark_of(c) for w, c in zip(self.weights, self.crystals, strict=True))

    def __call__(self, model: Deformation) -> tuple[Float[Array, "n_members m m m"], Float[Array, "n_members m m m"]]:
        """(I0, ΔI) of the ensemble pumped with `model`, electrons²."""
        i0 = jnp.zeros(self.grid.centre.shape[:1] + self.grid.shape)
        diff = jnp.zeros_like(i0)
        grid = sampling_grid(self.grid, self.voxel_points)
        for i, (w, crystal) in enumerate(zip(self.weights, self.crystals, strict=True)):
            d_i, diff_i = pumped_difference(
                crystal,
                self.scattering,
                grid,
                model,
                self.occupancy,
                key=jax.random.fold_in(self.key, i),
                n_holes=self.n_holes,
                method=self.method,  # type: ignore[arg-type]
                nodes=self.nodes,
                accurate_engine=self.accurate_engine,
            )
            d_i, diff_i = voxel_mean(d_i, self.voxel_points), voxel_mean(diff_i, self.voxel_points)
            i0, diff = i0 + _per_member(w) * d_i, diff + _per_member(w) * diff_i
        return i0, diff


def _per_member(w: Array) -> Array:
    """A size weight, scalar or (n_members,), broadcastable against (n_members, m, m, m) windows."""
    return w.reshape((*w.shape, 1, 1, 1)) if w.ndim else w


def build_forward(
    structure: CrystalStructure,
    grid: Grid,
    *,
    sizes_nm: Sequence[float],
    gamma_shape: float,
    mean_nm: float,
    size_weighting: SizeWeighting = "number",
    energy_kev: float = 13.6,
    ions: bool = True,
    exponent: float = 5.0,
    centre: str = "Pb",
    occupancy: Occupancy | None = None,
    n_holes: int = 64,
    method: Method = "linear",
    key: Array | None = None,
    nodes: int = DEFAULT_NODES,
    voxel_points: int = 1,
) -> EnsembleForward:
    """An `EnsembleForward` for `structure` on `grid` (see the class); `ions` selects ionic f0 (formal charges).

    "peak" weighting divides each size's Gamma weight by that size's brightest dark voxel on the windows.
    """
    crystals = tuple(size_crystals(structure, sizes_nm, exponent=exponent, centre=centre))
    sf = scattering_factors(structure.species, energy_kev, charges=structure.oxidation if ions else None)
    weights = GammaSizes(gamma_shape, mean_nm).weights(jnp.asarray(sizes_nm))
    if size_weighting == "peak":
        samples = sampling_grid(grid, voxel_points)
        peaks = jnp.stack([jnp.max(voxel_mean(intensity(c, sf, samples), voxel_points)) for c in crystals])
        weights = weights / peaks
        weights = weights / jnp.sum(weights)
    elif size_weighting != "number":
        raise ValueError(f"size_weighting must be 'number' or 'peak', got {size_weighting!r}.")
    return EnsembleForward(
        crystals=crystals,
        weights=weights,
        scattering=sf,
        grid=grid,
        occupancy=Occupancy() if occupancy is None else occupancy,
        key=jax.random.key(0) if key is None else key,
        n_holes=int(n_holes),
        method=str(method),
        nodes=int(nodes),
        accurate_engine=accurate_engine(grid),
        voxel_points=int(voxel_points),
    )


def one_pair() -> Occupancy:
    """Occupancy with (P0, P1, P2) ≈ (0, 1, 0): every pumped crystal holds one pair (synthetic runs)."""
    # with γ1 = 0 a dot absorbs at most one pair; γ0 t = 40 leaves P0 = e^-40
    return Occupancy(gamma0_t=40.0, gamma_ratio=0.0)


def calibrate_to_dark(forward: EnsembleForward, windows) -> EnsembleForward:
    """The forward with its size weights refitted, per reflection family, to the measured dark windows.

    A merged volume is not the plain Gamma ensemble: indexing succeeds more often on crystals whose strong
    reflections cross the Ewald sphere (larger ones), and per-crystal scaling, partiality and masking weight
    them further, differently for each family. The dark needs no deformation model, so it calibrates that
    effective mixture: for each family f, non-negative weights a_fs minimise Σ_v W_d (D_meas − Σ_s a_fs D_s)²
    over its window (D_s the family-averaged dark of size s with the measured counts; scipy's NNLS). The same
    a_fs then weight the sizes' ΔI. Weights absorb the intensity scale (the objective's dark scale becomes ~1).
    Returns a forward whose weights are (n_sizes, n_members).
    """
    from scipy.optimize import nnls

    from fitting.windows import rotate_back, weighted_mean

    layout = windows.layout
    per_size = [
        np.asarray(weighted_mean(rotate_back(layout, forward.dark_of(c)), windows.counts_dark))
        for c in forward.crystals
    ]
    visits = windows.counts_dark.sum(0)
    weights = np.zeros((len(forward.crystals), len(layout.members)))
    for f in range(len(layout.hkls)):
        root = np.sqrt(visits[f]).ravel()
        basis = np.stack([d[f].ravel() * root for d in per_size], axis=1)
        a, _ = nnls(basis, windows.dark[f].ravel() * root)
        # every member window of family f (the 24 rotations of its canonical member) gets the family's mixture
        weights[:, np.unique(layout.member_of[:, f])] = a[:, None]
    return eqx.tree_at(lambda fw: fw.weights, forward, jnp.asarray(weights, forward.weights.dtype))
