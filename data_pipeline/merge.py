"""Ewald-sphere merging of whole AGIPD frames into a 3D crystal-frame q grid (the paper's "3D intensity
generation"), and the per-crystal Ewald cuts of a merged volume used for scaling and rejection.

Every pixel of a frame sits at q_lab on the Ewald sphere; a crystal of orientation R (q_lab = R q_crystal)
sees it at q_crystal = Rᵀ q_lab. Merging adds the pixel's (corrected, background-subtracted, scaled)
intensity and its weight to the voxel(s) of q_crystal:

    nearest:    S[v(q)] += s·w·I,  W[v(q)] += w                 (v = the voxel whose centre is nearest)
    trilinear:  S[v_c] += s·w·t_c·I,  W[v_c] += w·t_c            (the 8 corners c, t_c trilinear fractions)

and the merged intensity is S / W where W > 0. s is the crystal's scale and w = u·p its weight u (1 in the
paper's plain mean) times the pixel weight p. Grid: n samples per axis at −q_max + i·voxel, i = 0..n−1,
voxel = 2 q_max / (n − 1) (the same sampling as `data_pipeline.synthetic` and `jaxpolaron.io` volumes).
The accumulator is one flat complex64 array of `n_classes × (n³ + 1)`: real part S, imaginary part W, so one
scatter-add updates both (XLA's CPU scatter costs per index: one complex scatter is ~1.5× faster than a
float32 scatter for S and another for W). Class c owns [c (n³+1), (c+1)(n³+1)); the last element of each
block collects pixels that fall outside the grid (so every scatter index is in bounds and nothing is branched
on). The accumulator is *donated* to the jitted kernel so XLA updates it in place: without donation each call
copies the whole grid (17 M voxels at n = 257) and costs 10× more.
Sums of many frames are kept in float64 on the host (`add_into`); a kernel call adds one batch.

Pixel weights p: 1 for good pixels, 0 for bad ones and for pixels near peaks of *other* crystals in the
frame (the paper: "pixels in the neighbourhood of peaks in the pattern, but not indexed into the lattice were
excluded"); those are given per crystal as flat pixel indices (`CrystalBatch.excluded`, P = none).

Units: I is detector units (photons for synthetic runs) divided by the pixel's relative solid angle and
polarisation factor (`DetectorPixels.correction`), i.e. photons per pixel at the detector centre.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.geometry import AGIPD_PIXEL_M, pixel_q, solid_angle
from jaxpolaron.scattering import wavelength_a

MODES = ("nearest", "trilinear")


@dataclasses.dataclass(frozen=True)
class MergeGrid:
    """A cubic crystal-frame q grid: n samples per axis over [−q_max, q_max] Å⁻¹ (n odd puts q = 0 on a
    voxel centre)."""

    n: int = 257
    q_max: float = 1.0

    def __post_init__(self):
        if self.n < 3 or not self.q_max > 0:
            raise ValueError(f"a merge grid needs n >= 3 and q_max > 0, got n={self.n}, q_max={self.q_max}.")

    @property
    def voxel(self) -> float:
        """Sample spacing, Å⁻¹."""
        return 2.0 * self.q_max / (self.n - 1)

    @property
    def size(self) -> int:
        """Voxels per class, n³."""
        return self.n**3

    @property
    def axis(self) -> np.ndarray:
        """Sample positions along each axis, (n,) Å⁻¹."""
        return np.linspace(-self.q_max, self.q_max, self.n)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DetectorPixels(NamedTuple):
    """What merging needs of the detector, flattened to P = 16·512·128 pixels (p = (module·512 + ss)·128 + fs).

    q_lab_t: (3, P) float32 lab-frame q of each pixel centre, Å⁻¹ (|q| = 1/d), transposed for contiguous rows.
    q_abs: (P,) float32 |q|, Å⁻¹.
    correction: (P,) float32 1 / (ΔΩ·P_pol) relative to the pixel with the largest ΔΩ·P_pol, so corrected
        intensities are photons per pixel at the detector centre.
    dq_pixel: Å⁻¹ spanned by one pixel at the detector centre (p / (clen λ)).
    """

    q_lab_t: np.ndarray
    q_abs: np.ndarray
    correction: np.ndarray
    dq_pixel: float


def detector_pixels(positions_m: np.ndarray, energy_kev: float, *, polarisation: bool = True) -> DetectorPixels:
    """Per-pixel q and intensity correction from lab positions (n_modules, n_ss, n_fs, 3) in m (beam along +z,
    horizontal polarisation along lab x, as EuXFEL and `data_pipeline.synthetic`)."""
    q = pixel_q(positions_m, energy_kev).reshape(-1, 3)
    factor = solid_angle(positions_m).reshape(-1)
    if polarisation:
        r = np.linalg.norm(positions_m, axis=-1).reshape(-1)
        factor = factor * (1.0 - (positions_m[..., 0].reshape(-1) / r) ** 2)
    clen = float(np.median(positions_m[..., 2]))
    return DetectorPixels(
        q_lab_t=np.ascontiguousarray(q.T, np.float32),
        q_abs=np.linalg.norm(q, axis=1).astype(np.float32),
        correction=(factor.max() / factor).astype(np.float32),
        dq_pixel=AGIPD_PIXEL_M / clen / wavelength_a(energy_kev),
    )


class CrystalBatch(NamedTuple):
    """The crystals of a batch of frames, padded to a fixed length C (only the first `count` are used).

    slot: (C,) int32 row of the crystal's frame in the batch. rotation: (C, 3, 3) float32, q_lab = R q_crystal.
    scale: (C,) float32 multiplies the intensities (1 for an unscaled merge). klass: (C,) int32 accumulator
    class (0 dark, 1 pumped, or 0 for a single reference). excluded: (C, K) int32 flat pixel indices given
    zero weight for this crystal (P = padding). count: () int32 number of real crystals. weight: (C,) float32
    the crystal's weight in the voxel means (1 for all: the paper's plain mean of scaled intensities).
    """

    slot: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    klass: np.ndarray
    excluded: np.ndarray
    count: np.ndarray
    weight: np.ndarray


def pad_crystals(
    slot, rotation, scale, klass, excluded: list[np.ndarray], *, capacity: int, n_pixels: int, width: int,
    weight=None,
) -> CrystalBatch:  # fmt: skip
    """A CrystalBatch of fixed shapes (capacity crystals, `width` excluded pixels each) from lists; excluded
    lists longer than `width` are cut (the nearest peaks' pixels come first by construction of the caller).
    weight: per crystal, default 1."""
    n = len(slot)
    if n > capacity:
        raise ValueError(f"{n} crystals exceed the batch capacity {capacity}.")
    ex = np.full((capacity, width), n_pixels, np.int32)
    for i, e in enumerate(excluded):
        e = np.asarray(e, np.int32)[:width]
        ex[i, : len(e)] = e
    rot = np.tile(np.eye(3, dtype=np.float32), (capacity, 1, 1))
    rot[:n] = np.asarray(rotation, np.float32).reshape(n, 3, 3)

    def col(values, dtype, fill):
        out = np.full(capacity, fill, dtype)
        out[:n] = values
        return out

    weight = np.ones(n) if weight is None else weight
    return CrystalBatch(col(slot, np.int32, 0), rot, col(scale, np.float32, 0.0), col(klass, np.int32, 0), ex,
                        np.int32(n), col(weight, np.float32, 0.0))  # fmt: skip


def empty_accumulator(grid: MergeGrid, n_classes: int) -> jax.Array:
    """A zeroed flat (n_classes · (n³ + 1),) complex64 accumulator (S + iW) on the default device."""
    return jnp.zeros((n_classes * (grid.size + 1),), jnp.complex64)


def _crystal_coords(q_lab_t: jax.Array, rotation: jax.Array, grid: MergeGrid) -> list[jax.Array]:
    """Continuous voxel coordinates (3 × (P,)) of every pixel in the crystal frame: (Rᵀ q + q_max) / voxel.
    Written out per component: XLA's CPU dot for a (P, 3) × (3, 3) product is several times slower."""
    return [
        (q_lab_t[0] * rotation[0, c] + q_lab_t[1] * rotation[1, c] + q_lab_t[2] * rotation[2, c] + grid.q_max)
        / grid.voxel
        for c in range(3)
    ]


def _flat(i: list[jax.Array], grid: MergeGrid, base: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flat accumulator index of integer voxel coords (3 × (P,)) in the class block starting at `base`; the
    block's overflow slot for coordinates outside the grid. Returns (index, inside)."""
    n = grid.n
    inside = (i[0] >= 0) & (i[0] < n) & (i[1] >= 0) & (i[1] < n) & (i[2] >= 0) & (i[2] < n)
    flat = jnp.where(inside, (i[0] * n + i[1]) * n + i[2], grid.size)
    return base + flat, inside


@functools.partial(jax.jit, static_argnames=("grid", "mode"), donate_argnums=0)
def merge_batch(
    accumulator: jax.Array,
    intensities: jax.Array,
    pixel_weight: jax.Array,
    q_lab_t: jax.Array,
    crystals: CrystalBatch,
    *,
    grid: MergeGrid,
    mode: str = "nearest",
) -> jax.Array:
    """Add every crystal of a batch into the accumulator (donated: do not reuse the argument).

    Args:
        accumulator: flat (n_classes · (n³ + 1),) complex64 S + iW (`empty_accumulator`).
        intensities: (B, P) float32 corrected, background-subtracted frames.
        pixel_weight: (B, P) float32 per-frame pixel weights (0 = bad pixel).
        q_lab_t: (3, P) float32 `DetectorPixels.q_lab_t`, Å⁻¹.
        crystals: a padded `CrystalBatch`; crystal c merges frame crystals.slot[c].
        grid: the merge grid (static). mode: "nearest" or "trilinear" (static).
    Returns:
        the updated accumulator.
    """
    if mode not in MODES:
        raise ValueError(f"merge mode must be one of {MODES}, got {mode!r}.")
    block = grid.size + 1

    def body(c, acc):
        slot = crystals.slot[c]
        w = pixel_weight[slot].at[crystals.excluded[c]].set(0.0, mode="drop") * crystals.weight[c]
        value = intensities[slot] * (w * crystals.scale[c])
        base = crystals.klass[c] * block
        coords = _crystal_coords(q_lab_t, crystals.rotation[c], grid)
        if mode == "nearest":
            flat, _ = _flat([jnp.rint(x).astype(jnp.int32) for x in coords], grid, base)
            return acc.at[flat].add(jax.lax.complex(value, w), mode="promise_in_bounds")
        lower = [jnp.floor(x) for x in coords]
        frac = [x - lo for x, lo in zip(coords, lower, strict=True)]
        lower = [lo.astype(jnp.int32) for lo in lower]
        for corner in range(8):
            bits = [(corner >> k) & 1 for k in range(3)]
            t = functools.reduce(jnp.multiply, [f if b else 1.0 - f for f, b in zip(frac, bits, strict=True)])
            flat, _ = _flat([lo + b for lo, b in zip(lower, bits, strict=True)], grid, base)
            acc = acc.at[flat].add(jax.lax.complex(value * t, w * t), mode="promise_in_bounds")
        return acc

    return jax.lax.fori_loop(0, crystals.count, body, accumulator)


def add_into(total: dict[str, np.ndarray] | None, accumulator: jax.Array, grid: MergeGrid,
             n_classes: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Fold a complex64 accumulator into float64 host totals {"sum", "weight"}: (n_classes, n, n, n) each,
    dropping the overflow slots."""
    acc = np.asarray(accumulator).reshape(n_classes, grid.size + 1)[:, :-1]
    shape = (n_classes, grid.n, grid.n, grid.n)
    part = {"sum": acc.real.astype(np.float64).reshape(shape), "weight": acc.imag.astype(np.float64).reshape(shape)}
    if total is None:
        return part
    total["sum"] += part["sum"]
    total["weight"] += part["weight"]
    return total


def merged_mean(total: dict[str, np.ndarray]) -> np.ndarray:
    """S / W where W > 0, else 0; same shape as total["sum"]."""
    w = total["weight"]
    return np.divide(total["sum"], w, out=np.zeros_like(total["sum"]), where=w > 0)


class CrystalStatistics(NamedTuple):
    """Per crystal of a batch: scale (C,) = mean of the reference's 10 brightest cut pixels / mean of the
    crystal's intensities there (NaN when undefined); similarity (C,) cosine between the crystal's pixels and
    the reference cut near predicted Bragg peaks (NaN when no pixel qualifies); n_selected (C,) int32 pixels
    that entered the similarity."""

    scale: jax.Array
    similarity: jax.Array
    n_selected: jax.Array


@functools.partial(jax.jit, static_argnames=("grid", "n_brightest"))
def crystal_statistics(
    reference: jax.Array,
    intensities: jax.Array,
    pixel_weight: jax.Array,
    q_lab_t: jax.Array,
    crystals: CrystalBatch,
    reference_mean: jax.Array,
    a_pc: jax.Array,
    near_radius: jax.Array,
    *,
    grid: MergeGrid,
    n_brightest: int = 10,
) -> CrystalStatistics:
    """Scaling factor and similarity of each crystal against a merged reference (the paper's Methods).

    Scaling: the crystal's Ewald cut of the reference (the reference sampled at every pixel's q_crystal,
    nearest voxel) is ranked; over its `n_brightest` pixels (usable for this crystal), scale = mean(reference)
    / mean(crystal intensity). Rejection metric: pixels within `near_radius` Å⁻¹ of a pseudo-cubic lattice
    point G = hkl / a_pc (the paper's 4 px of a predicted peak: pass 4 · dq_pixel) whose reference value
    exceeds 0.01 × `reference_mean`; the metric is the normalised scalar product (cosine) of the crystal's
    intensities and the reference there, which is what the paper's "normalise to the brightest pixel, then
    scalar product" measures, without depending on how many pixels qualify.

    Args:
        reference: (n³ + 1,) float32 merged mean intensity, flat, overflow slot last (0 = no data).
        intensities, pixel_weight, q_lab_t, crystals: as `merge_batch`.
        reference_mean: () mean of the reference over voxels with data. a_pc: () pseudo-cubic cell, Å.
        near_radius: () Å⁻¹.
    Returns:
        CrystalStatistics of shape (C,); entries past crystals.count are NaN / 0.
    """

    def one(c):
        slot = crystals.slot[c]
        w = pixel_weight[slot].at[crystals.excluded[c]].set(0.0, mode="drop")
        coords = _crystal_coords(q_lab_t, crystals.rotation[c], grid)
        flat, inside = _flat([jnp.rint(x).astype(jnp.int32) for x in coords], grid, 0)
        usable = inside & (w > 0)
        cut = jnp.where(usable, reference[flat], 0.0)
        intensity = intensities[slot]
        top_values, top = jax.lax.top_k(jnp.where(usable, cut, -jnp.inf), n_brightest)
        ok_top = jnp.isfinite(top_values)
        ref_top = jnp.sum(jnp.where(ok_top, top_values, 0.0))
        own_top = jnp.sum(jnp.where(ok_top, intensity[top], 0.0))
        scale = jnp.where((own_top > 0) & (ref_top > 0), ref_top / jnp.where(own_top > 0, own_top, 1.0), jnp.nan)
        # distance of q_crystal to the nearest pseudo-cubic lattice point, Å⁻¹
        q_c = [x * grid.voxel - grid.q_max for x in coords]
        d2 = sum((qc - jnp.rint(qc * a_pc) / a_pc) ** 2 for qc in q_c)
        selected = usable & (d2 < near_radius**2) & (cut > 0.01 * reference_mean)
        a = jnp.where(selected, intensity, 0.0)
        b = jnp.where(selected, cut, 0.0)
        norm = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
        similarity = jnp.where(norm > 0, jnp.sum(a * b) / jnp.where(norm > 0, norm, 1.0), jnp.nan)
        real = c < crystals.count
        return (
            jnp.where(real, scale, jnp.nan),
            jnp.where(real, similarity, jnp.nan),
            jnp.where(real, jnp.sum(selected), 0).astype(jnp.int32),
        )

    scale, similarity, n_selected = jax.lax.map(one, jnp.arange(crystals.slot.shape[0]))
    return CrystalStatistics(scale, similarity, n_selected)


def flat_reference(mean: np.ndarray) -> jax.Array:
    """A (n, n, n) merged mean as the flat (n³ + 1,) float32 array `crystal_statistics` samples."""
    return jnp.asarray(np.append(np.asarray(mean, np.float32).reshape(-1), np.float32(0.0)))
