"""Peak windows of a merged volume, averaged over the cubic point group.

A merged volume lives on a full grid symmetric about q = 0 (odd n, voxel v, index n // 2 at q = 0), indexed
in the pseudo-cubic cell. Indexing a pseudo-cubic lattice cannot tell the 24 cubic orientations of a crystal
apart, so the merged volume is (up to noise) an average over them, and every family member of a reflection
carries the same information. The fit therefore works on *family-averaged* windows: for each rotation R of
the cubic group O (24 signed permutation matrices, det +1) the window around R·c (c the integer voxel
offset of the canonical reflection) is rotated back by Rᵀ and averaged, weighted by the merge counts. The
simulation is averaged the same way with the same counts, so both sides see exactly the same operation.

Conventions: window side m = 2·half + 1 voxels; centres and voxels in Å⁻¹ (crystal frame); intensities in
the volume's units (photons per pixel visit for a reduced run).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxpolaron.errors import InputError
from jaxpolaron.io import Volume
from jaxpolaron.reciprocal import Grid, hkl_label


def cubic_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube, (24, 3, 3) signed permutation matrices (identity first)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3), int)
            r[np.arange(3), perm] = signs
            if round(np.linalg.det(r)) == 1:
                out.append(r)
    out.sort(key=lambda r: (not np.array_equal(r, np.eye(3, dtype=int)),))
    return np.stack(out)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static field of jitted objectives
class WindowLayout:
    """Where the family members of each reflection sit on a symmetric grid, and how to rotate them back.

    Attributes:
        hkls: pseudo-cubic reflections, canonical members.
        half: window half width in voxels (m = 2 half + 1).
        voxel: grid spacing, Å⁻¹.
        offsets: (n_hkl, 3) integer voxel offset of each canonical window centre from q = 0.
        members: (n_members, 3) integer offsets of the distinct member centres (all reflections).
        member_of: (24, n_hkl) index into `members` of the window around R·c.
        gather: (24, m³) flat index into an (m, m, m) member window giving the canonical window's voxels
            (canonical voxel x holds the member voxel R x).
    """

    hkls: tuple[tuple[int, int, int], ...]
    half: int
    voxel: float
    offsets: np.ndarray
    members: np.ndarray
    member_of: np.ndarray
    gather: np.ndarray

    @property
    def side(self) -> int:
        return 2 * self.half + 1

    def centres(self) -> np.ndarray:
        """(n_hkl, 3) canonical window centres, Å⁻¹."""
        return self.offsets * self.voxel

    def member_grid(self) -> Grid:
        """Stacked windows (n_members, m, m, m) around every distinct member centre, for the simulation."""
        dtype = jnp.result_type(float)
        n = len(self.members)
        return Grid(
            centre=jnp.asarray(self.members * self.voxel, dtype),
            voxel=jnp.full((n, 3), self.voxel, dtype),
            shape=(self.side, self.side, self.side),
        )


def make_layout(structure_q_of_hkl, hkls: Sequence[Sequence[int]], voxel: float, half: int) -> WindowLayout:
    """Layout of family-averaged windows of side 2 half + 1 on a grid of spacing `voxel` (Å⁻¹).

    `structure_q_of_hkl` maps (n, 3) pseudo-cubic hkl to crystal-frame q (e.g. `CrystalStructure.q_of_hkl`);
    each canonical window is centred on the voxel nearest to its reflection.
    """
    if half < 1:
        raise InputError(f"window half width must be >= 1 voxel, got {half}.")
    hkls = tuple(tuple(int(x) for x in h) for h in hkls)
    if not hkls or any(h == (0, 0, 0) for h in hkls):
        raise InputError(f"give one or more nonzero reflections, got {[hkl_label(h) for h in hkls]}.")
    q = np.asarray(structure_q_of_hkl(np.asarray(hkls, float)), float).reshape(-1, 3)
    offsets = np.rint(q / voxel).astype(int)
    rotations = cubic_rotations()
    member_index: dict[tuple[int, int, int], int] = {}
    member_of = np.zeros((len(rotations), len(hkls)), int)
    for r_i, r in enumerate(rotations):
        for h_i, c in enumerate(offsets):
            key = tuple(int(x) for x in r @ c)
            member_of[r_i, h_i] = member_index.setdefault(key, len(member_index))
    m = 2 * half + 1
    x = np.stack(np.meshgrid(*[np.arange(-half, half + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    gather = np.stack([np.ravel_multi_index(tuple((x @ r.T + half).T), (m, m, m)) for r in rotations])
    return WindowLayout(
        hkls=hkls,
        half=half,
        voxel=float(voxel),
        offsets=offsets,
        members=np.array(list(member_index), int).reshape(-1, 3),
        member_of=member_of,
        gather=gather,
    )


def rotate_back(layout: WindowLayout, member_windows):
    """(n_members, m, m, m) member windows → (24, n_hkl, m, m, m) windows in the canonical orientation.

    Works on numpy or JAX arrays (pure indexing, differentiable).
    """
    m = layout.side
    flat = member_windows.reshape(member_windows.shape[0], m**3)
    picked = flat[layout.member_of]  # (24, n_hkl, m³)
    rows = np.broadcast_to(layout.gather[:, None, :], picked.shape)
    xp = np if isinstance(picked, np.ndarray) else jnp
    out = xp.take_along_axis(picked, rows, axis=-1)
    return out.reshape(len(layout.member_of), len(layout.hkls), m, m, m)


@dataclasses.dataclass(frozen=True)
class MeasuredWindows:
    """Family-averaged measured windows and the per-rotation counts used to average them.

    Attributes:
        layout: where the windows are.
        dark, pump: (n_hkl, m, m, m) count-weighted means over the 24 orientations.
        counts_dark, counts_pump: (24, n_hkl, m, m, m) merge weights (pixel visits) of every orientation's
            window; zero where the volume has no data. The averaged counts are their sums.
        units: intensity units of the volume.
        scatter: (n_hkl, m, m, m) variance of the averaged difference estimated from how the 24 orientations
            scatter about it (`orientation_scatter`), or None (simulated windows).
        voxel_mean: the voxels hold means over their volume (merged data: every pixel that falls in the voxel),
            not values at their centres (simulated grids); the forward model then averages over the voxel too
            (`fitting.forward.voxel_nodes`).
    """

    layout: WindowLayout
    dark: np.ndarray
    pump: np.ndarray
    counts_dark: np.ndarray
    counts_pump: np.ndarray
    units: str = "counts"
    scatter: np.ndarray | None = None
    voxel_mean: bool = False

    @property
    def difference(self) -> np.ndarray:
        """(n_hkl, m, m, m) pump − dark of the averaged windows (0 where either has no data)."""
        return np.where(self.observed, self.pump - self.dark, 0.0)

    @property
    def observed(self) -> np.ndarray:
        """(n_hkl, m, m, m) voxels with both dark and pumped data."""
        return (self.counts_dark.sum(0) > 0) & (self.counts_pump.sum(0) > 0)


def _check_symmetric_grid(volume: Volume, name: str) -> float:
    axes = [np.asarray(a, float) for a in volume.axes]
    n = len(axes[0])
    voxel = float(axes[0][1] - axes[0][0]) if n > 1 else 0.0
    ok = n % 2 == 1 and n > 2 and all(len(a) == n for a in axes)
    ok = ok and all(np.allclose(a, voxel * (np.arange(n) - n // 2), atol=1e-6 * max(voxel, 1e-12)) for a in axes)
    if not ok:
        raise InputError(
            f"volume {name!r} is not a cubic grid symmetric about q = 0 (as written by `jaxpolaron reduce` or "
            "`jaxpolaron simulate --grid`); fitting needs one."
        )
    return voxel


def extract_windows(volume: Volume, layout_for_voxel, *, name: str = "grid") -> MeasuredWindows:
    """Family-averaged windows of a merged grid volume.

    Args:
        volume: a full grid with dark and pump (or dark and difference) data; merge weights are used when
            present (else every voxel counts once).
        layout_for_voxel: callable voxel (Å⁻¹) → WindowLayout (the grid spacing is only known here).

    Raises InputError (one line) for a volume without pumped/difference data, a non-symmetric grid or a
    window that reaches outside it.
    """
    if volume.dark is None or (volume.pump is None and volume.difference is None):
        raise InputError(f"volume {name!r} has no dark and difference (or pump) data; a fit needs both.")
    voxel = _check_symmetric_grid(volume, name)
    layout = layout_for_voxel(voxel)
    n, h = volume.shape[0], layout.half
    origin = n // 2
    reach = np.abs(layout.members).max(axis=0) + h
    if np.any(reach > origin):
        worst = max(layout.hkls, key=lambda k: np.abs(np.asarray(k)).sum())
        raise InputError(
            f"the window of ({hkl_label(worst)}) ± {h} voxels reaches outside the volume "
            f"(|q| ≤ {origin * voxel:.3g} Å⁻¹ per axis); choose lower-order reflections or a smaller window."
        )
    dark = np.asarray(volume.dark, float)
    pump = np.asarray(volume.pump if volume.pump is not None else volume.dark + volume.difference, float)
    weights = volume.weight or {}
    w_dark = np.asarray(weights.get("dark", np.isfinite(dark)), float)
    w_pump = np.asarray(weights.get("pump", weights.get("dark", np.isfinite(pump))), float)
    w_dark = np.where(np.isfinite(dark), w_dark, 0.0)
    w_pump = np.where(np.isfinite(pump), w_pump, 0.0)
    dark, pump = np.nan_to_num(dark), np.nan_to_num(pump)

    def members(values):
        sl = [
            values[
                origin + c[0] - h : origin + c[0] + h + 1,
                origin + c[1] - h : origin + c[1] + h + 1,
                origin + c[2] - h : origin + c[2] + h + 1,
            ]
            for c in layout.members
        ]
        return rotate_back(layout, np.stack(sl))

    cd, cp = members(w_dark), members(w_pump)
    md, mp = members(dark), members(pump)
    return MeasuredWindows(
        layout=layout,
        dark=weighted_mean(md, cd),
        pump=weighted_mean(mp, cp),
        counts_dark=cd,
        counts_pump=cp,
        units=volume.units,
        scatter=orientation_scatter(mp - md, cd * cp / np.where(cd + cp > 0, cd + cp, 1.0)),
    )


def orientation_scatter(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Variance of the count-weighted mean over orientations, from the orientations' own scatter.

    values, counts: (24, ...) per-orientation means and their visit counts. If orientation R's mean is an
    average of counts_R visits of per-visit variance σ², the weighted mean has variance σ² / Σ counts, and
    σ̂² = Σ_R counts_R (x_R − x̄)² / (n − 1) over the n orientations with data. Unlike shot noise this
    includes the crystal-to-crystal spread (size, scale, excitation error) that dominates serial data.
    Returns (…) variances; inf where fewer than two orientations have data.
    """
    counts = np.where(counts > 0, counts, 0.0)
    total = counts.sum(0)
    n = (counts > 0).sum(0)
    mean = np.asarray(weighted_mean(values, counts))
    spread = (counts * (values - mean) ** 2).sum(0) / np.maximum(n - 1, 1)
    return np.where(n >= 2, spread / np.where(total > 0, total, 1.0), np.inf)


def weighted_mean(values, counts):
    """Σ_R counts·values / Σ_R counts over the leading (orientation) axis; 0 where the counts are 0.

    numpy or JAX arrays (values (24, ...), counts (24, ...) with the same shape).
    """
    xp = np if isinstance(values, np.ndarray) and isinstance(counts, np.ndarray) else jnp
    total = counts.sum(0)
    return xp.where(total > 0, (counts * values).sum(0) / xp.where(total > 0, total, 1.0), 0.0)
