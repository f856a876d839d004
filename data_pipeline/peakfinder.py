"""peakfinder8 Bragg-spot finder in jitted JAX (AGIPD-1M and any tiled detector).

The algorithm follows CrystFEL's ``libcrystfel/src/peakfinder8.c`` (Barty, Mariani, Yefanov), which is
also what OnDA/OM and cfelpyutils implement:

1. Radial statistics: pixels are binned by ``rint(radius)``; per bin a mean ("offset") and standard
   deviation are computed over good pixels, ``n_sigma_clip_iterations`` times, each pass keeping only pixels
   with ``offset - snr·σ < value < max(adc_threshold, offset + snr·σ)`` of the previous pass (the first pass
   keeps everything). An empty bin gets offset 0, σ 0 and thresholds (FLT_MAX, FLT_MIN) as in the reference.
2. Candidate pixels: good (mask, ``min_res <= radius < max_res``) and ``value > threshold[bin]``.
3. 8-connected components of candidates, never across ASIC borders. The reference flood-fills from seeds
   that are *not* on an ASIC's outermost rows/columns, so a component made only of edge pixels is never
   found; we keep that rule.
4. Per component: pixel count in [min_pixel_count, max_pixel_count]; a first centroid weighted by
   ``value - offset[bin]``; local background = mean/std of good, below-threshold pixels in a disc of radius
   ``2·local_bg_radius`` around the rounded first centroid (square loop ``[-2R, 2R)`` as in the reference),
   restricted to the ASIC; then total = Σ(value - local_offset), max = max(value - local_offset, 0),
   final centroid weighted by the raw values, ``snr = total / local_sigma`` (the reference's definition:
   *not* divided by √npix). Accepted when snr >= minimum_snr, max >= (max background pixel - local_offset),
   and the centroid lies inside the ASIC.

JAX formulation (why it looks different from the C): frames are reshaped into ASIC tiles
``(n_tiles, asic_ss, asic_fs)`` so that "never across an ASIC border" is just padding of each tile.
Components are found by iterative min-label propagation (3×3 min-pool restricted to candidates) plus pointer
jumping, inside a bounded ``lax.while_loop``; per-component sums are one dense ``segment_sum`` keyed by the
root label; the at most ``max_num_components`` surviving roots are compacted with ``nonzero(size=…)`` to
gather their background discs. All shapes are static, so the function jits and vmaps.

Coordinates: ``fs``/``ss`` are in pixels of the panel (module) array, with integer values at pixel centres
(OM/cfelpyutils convention; CrystFEL adds 0.5 when it stores a peak). Intensities are in detector units (ADU
or photons, whatever ``data`` holds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_MIN = float(np.finfo(np.float32).tiny)  # the reference's (odd) lower threshold of an empty bin


@dataclasses.dataclass(frozen=True)
class Peakfinder8Config:
    """peakfinder8 parameters (hashable: passed to jit as a static argument).

    adc_threshold: lower bound of the per-bin threshold, detector units.
    minimum_snr: σ multiplier of the radial threshold and the minimum peak SNR.
    min_pixel_count, max_pixel_count: accepted component sizes, pixels (inclusive).
    local_bg_radius: R, pixels; the local background disc has radius 2R (as in the reference).
    min_res, max_res: accepted pixel radius from the beam centre, pixels: ``min_res <= r < max_res``.
    max_num_peaks: length of the fixed-size output arrays.
    asic_shape: (ss, fs) pixels of one ASIC; panels must be whole multiples of it.
    n_sigma_clip_iterations: passes of the radial sigma clipping.
    max_num_components: components (after size cuts) examined per frame; further ones are dropped in
        raster order and counted in ``PeakList.n_components``.
    max_label_iterations: bound on label-propagation sweeps (pointer jumping converges in far fewer).
    """

    adc_threshold: float = 0.0
    minimum_snr: float = 6.0
    min_pixel_count: int = 2
    max_pixel_count: int = 200
    local_bg_radius: int = 3
    min_res: float = 0.0
    max_res: float = 1200.0
    max_num_peaks: int = 1024
    asic_shape: tuple[int, int] = (64, 64)
    n_sigma_clip_iterations: int = 5
    max_num_components: int = 4096
    max_label_iterations: int = 256

    def __post_init__(self):
        if self.max_res <= self.min_res:
            raise ValueError("max_res must exceed min_res")
        if self.max_num_components < self.max_num_peaks:
            raise ValueError("max_num_components must be >= max_num_peaks")
        if self.local_bg_radius < 1 or self.min_pixel_count < 1:
            raise ValueError("local_bg_radius and min_pixel_count must be >= 1")

    @property
    def n_radial_bins(self) -> int:
        """Static number of radial bins: every good pixel has ``rint(r) <= ceil(max_res)``."""
        return int(np.ceil(self.max_res)) + 1


class RadialStats(NamedTuple):
    """Per radial bin (n_bins,): offset (mean), sigma, threshold (detector units), n_pixels (good pixels, int32)."""

    offset: jax.Array
    sigma: jax.Array
    threshold: jax.Array
    n_pixels: jax.Array


class PeakList(NamedTuple):
    """Fixed-size peak list, sorted by total intensity (descending); entries >= n_peaks are padding (0, panel -1).

    n_peaks: () int32. n_components: () int32, components passing the size cuts (> max_num_components means
    some were never examined). fs, ss: (max_num_peaks,) panel pixels, centres at integers. panel: int32.
    total_intensity, max_intensity, local_sigma: detector units. n_pixels: int32. snr: dimensionless
    (total / local_sigma, the reference's definition).
    """

    n_peaks: jax.Array
    n_components: jax.Array
    fs: jax.Array
    ss: jax.Array
    panel: jax.Array
    total_intensity: jax.Array
    n_pixels: jax.Array
    max_intensity: jax.Array
    local_sigma: jax.Array
    snr: jax.Array


def _good_and_bins(mask, radius, config):
    good = mask & (radius >= config.min_res) & (radius < config.max_res)
    bins = jnp.clip(jnp.rint(radius), 0, config.n_radial_bins - 1).astype(jnp.int32)
    return good, bins


def radial_statistics(data, mask, radius, config: Peakfinder8Config) -> RadialStats:
    """Sigma-clipped radial background of one frame.

    data: (P, ss, fs) float32, detector units; mask: (P, ss, fs) bool, True = good;
    radius: (P, ss, fs) float32, pixels from the beam centre. Returns RadialStats over
    ``config.n_radial_bins`` bins (bin i holds pixels with rint(r) == i).
    """
    good, bins = _good_and_bins(mask, radius, config)
    d, b, g = data.reshape(-1), bins.reshape(-1), good.reshape(-1)
    nb = config.n_radial_bins

    def one_pass(_, carry):
        upper, lower, *_ = carry
        keep = g & (d < upper[b]) & (d > lower[b])
        w = jnp.where(keep, 1.0, 0.0).astype(d.dtype)
        # One scatter for the three moments (count, Σx, Σx²) instead of three.
        mom = jax.ops.segment_sum(jnp.stack([w, w * d, w * d * d], axis=-1), b, num_segments=nb)
        count = mom[:, 0]
        nz = count > 0
        safe = jnp.where(nz, count, 1.0)
        offset = jnp.where(nz, mom[:, 1] / safe, 0.0)
        # The reference leaves a (rounding-)negative variance un-rooted; we clamp it at 0.
        sigma = jnp.where(nz, jnp.sqrt(jnp.maximum(mom[:, 2] / safe - offset**2, 0.0)), 0.0)
        upper = jnp.where(nz, jnp.maximum(offset + config.minimum_snr * sigma, config.adc_threshold), _FLT_MAX)
        lower = jnp.where(nz, offset - config.minimum_snr * sigma, _FLT_MIN)
        return upper, lower, offset, sigma, count.astype(jnp.int32)

    init = (
        jnp.full(nb, 1e9, d.dtype),
        jnp.full(nb, -1e9, d.dtype),
        jnp.zeros(nb, d.dtype),
        jnp.zeros(nb, d.dtype),
        jnp.zeros(nb, jnp.int32),
    )
    upper, _, offset, sigma, count = lax.fori_loop(0, config.n_sigma_clip_iterations, one_pass, init)
    return RadialStats(offset, sigma, upper, count)


def _to_tiles(x, asic_shape):
    """(P, ss, fs) -> (P·n_ss·n_fs, a_ss, a_fs): one slab per ASIC, tiles ordered (panel, asic_ss, asic_fs)."""
    p, ss, fs = x.shape
    a_ss, a_fs = asic_shape
    x = x.reshape(p, ss // a_ss, a_ss, fs // a_fs, a_fs)
    return x.transpose(0, 1, 3, 2, 4).reshape(-1, a_ss, a_fs)


def _label_components(cand, max_iter):
    """8-connected component labels of ``cand`` (T, a, b) bool, per tile.

    Returns (T, a, b) int32: for candidates the smallest flat index (tile layout) in the component, else N.
    """
    n = cand.size
    own = jnp.arange(n, dtype=jnp.int32).reshape(cand.shape)
    lab0 = jnp.where(cand, own, n)

    def sweep(state):
        lab, _, it = state
        # 3×3 min over each tile; padding with N keeps labels from leaking across ASIC borders.
        nb = lax.reduce_window(lab, n, lax.min, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)))
        new = jnp.where(cand, nb, n)
        # Pointer jumping: a label is the index of a pixel of the same component, so adopting that pixel's
        # label keeps the minimum and shortens long chains (snakes) from O(length) to O(log length) sweeps.
        flat = jnp.concatenate([new.reshape(-1), jnp.array([n], jnp.int32)])
        new = jnp.where(cand, flat[new], n)
        return new, jnp.any(new != lab), it + 1

    lab, _, _ = lax.while_loop(lambda s: s[1] & (s[2] < max_iter), sweep, (lab0, jnp.array(True), 0))
    return lab


@functools.partial(jax.jit, static_argnames="config")
def find_peaks(data, mask, radius, config: Peakfinder8Config) -> PeakList:
    """peakfinder8 on one frame.

    data: (P, ss, fs) float32, detector units; mask: (P, ss, fs) bool, True = good pixel;
    radius: (P, ss, fs) float32, distance of each pixel from the beam centre in pixels (from the geometry).
    ss and fs must be multiples of ``config.asic_shape`` (AGIPD-1M: (16, 512, 128), ASICs 64×64).
    Returns a PeakList of length ``config.max_num_peaks``.
    """
    _, ss, fs = data.shape
    a_ss, a_fs = config.asic_shape
    if ss % a_ss or fs % a_fs:
        raise ValueError(f"panel shape {(ss, fs)} is not a multiple of asic_shape {config.asic_shape}")
    n_as, n_af = ss // a_ss, fs // a_fs
    data = data.astype(jnp.float32)
    stats = radial_statistics(data, mask, radius, config)
    good, bins = _good_and_bins(mask, radius, config)

    d, g, b = (_to_tiles(x, config.asic_shape) for x in (data, good, bins))
    n = d.size
    above = d > stats.threshold[b]
    cand = g & above
    # Reference background pixels: good, below threshold (pixels already in a peak are above threshold).
    bg_ok = g & ~above

    lab = _label_components(cand, config.max_label_iterations)

    # Dense per-component sums keyed by root label (out-of-range label N drops non-candidates).
    yy, xx = jnp.meshgrid(jnp.arange(a_ss, dtype=jnp.float32), jnp.arange(a_fs, dtype=jnp.float32), indexing="ij")
    yy, xx = jnp.broadcast_to(yy, d.shape), jnp.broadcast_to(xx, d.shape)
    interior = (yy >= 1) & (yy <= a_ss - 2) & (xx >= 1) & (xx <= a_fs - 2)
    net = d - stats.offset[b]  # first-pass weights: value minus the radial offset
    cols = [jnp.ones_like(d), net, net * yy, net * xx, d, d * yy, d * xx]
    sums = jax.ops.segment_sum(jnp.stack([c.reshape(-1) for c in cols], -1), lab.reshape(-1), num_segments=n)
    dmax = jax.ops.segment_max(d.reshape(-1), lab.reshape(-1), num_segments=n)
    has_seed = jax.ops.segment_max((cand & interior).reshape(-1), lab.reshape(-1), num_segments=n)

    npix = sums[:, 0]
    is_root = cand.reshape(-1) & (lab.reshape(-1) == jnp.arange(n))
    sized = is_root & (npix >= config.min_pixel_count) & (npix <= config.max_pixel_count)
    valid0 = sized & has_seed & (jnp.abs(sums[:, 1]) >= 1e-10)
    n_components = jnp.sum(valid0, dtype=jnp.int32)

    # Compact to at most K roots (raster order), then work on (K,) arrays.
    k = config.max_num_components
    (root,) = jnp.nonzero(valid0, size=k, fill_value=0)
    ok = jnp.arange(k) < n_components
    s = sums[root]
    tile = root // (a_ss * a_fs)
    abs_net = jnp.abs(s[:, 1])
    com_y0 = jnp.rint(s[:, 2] / abs_net).astype(jnp.int32)
    com_x0 = jnp.rint(s[:, 3] / abs_net).astype(jnp.int32)

    # Local background in a disc of radius 2R around the rounded first centroid, inside the ASIC.
    r2 = 2 * config.local_bg_radius
    grid_y, grid_x = np.meshgrid(np.arange(-r2, r2), np.arange(-r2, r2), indexing="ij")
    disc = grid_y**2 + grid_x**2 <= r2**2
    oy, ox = jnp.asarray(grid_y[disc]), jnp.asarray(grid_x[disc])
    py, px = com_y0[:, None] + oy, com_x0[:, None] + ox  # (K, n_disc)
    inside = (py >= 0) & (py < a_ss) & (px >= 0) & (px < a_fs)
    py_c, px_c = jnp.clip(py, 0, a_ss - 1), jnp.clip(px, 0, a_fs - 1)
    vals = d[tile[:, None], py_c, px_c]
    w = inside & bg_ok[tile[:, None], py_c, px_c]
    n_bg = jnp.sum(w, axis=1)
    safe_n = jnp.maximum(n_bg, 1)
    mean_bg = jnp.sum(jnp.where(w, vals, 0.0), axis=1) / safe_n
    var_bg = jnp.sum(jnp.where(w, vals * vals, 0.0), axis=1) / safe_n - mean_bg**2
    bg_max = jnp.maximum(jnp.max(jnp.where(w, vals, -jnp.inf), axis=1), 0.0)
    # No background pixel: fall back to the radial offset at the centroid pixel and σ = 0.01 (reference).
    cy, cx = jnp.clip(com_y0, 0, a_ss - 1), jnp.clip(com_x0, 0, a_fs - 1)
    local_offset = jnp.where(n_bg > 0, mean_bg, stats.offset[b[tile, cy, cx]])
    local_sigma = jnp.where((n_bg > 0) & (var_bg >= 0), jnp.sqrt(jnp.maximum(var_bg, 0.0)), 0.01)

    # Re-integrate with the local background; centroid weighted by raw values (as the reference).
    n_k = s[:, 0]
    raw = s[:, 4]
    abs_raw = jnp.where(jnp.abs(raw) >= 1e-10, jnp.abs(raw), 1.0)
    com_y, com_x = s[:, 5] / abs_raw, s[:, 6] / abs_raw
    total = raw - n_k * local_offset
    peak_max = jnp.maximum(dmax[root] - local_offset, 0.0)
    snr = jnp.where(jnp.abs(local_sigma) > 1e-10, total / local_sigma, 0.0)
    accept = (
        ok
        & (jnp.abs(raw) >= 1e-10)
        & (snr >= config.minimum_snr)
        & (peak_max >= bg_max - local_offset)
        & (com_y >= 0)
        & (com_y <= a_ss - 1)
        & (com_x >= 0)
        & (com_x <= a_fs - 1)
    )

    # Sort accepted peaks by total intensity and keep max_num_peaks of them.
    m = config.max_num_peaks
    _, order = lax.top_k(jnp.where(accept, total, -jnp.inf), m)
    keep = accept[order]
    t = tile[order]
    panel = t // (n_as * n_af)
    ss_out = com_y[order] + ((t // n_af) % n_as) * a_ss
    fs_out = com_x[order] + (t % n_af) * a_fs

    def pad(x, fill=0):
        return jnp.where(keep, x, fill)

    return PeakList(
        n_peaks=jnp.minimum(jnp.sum(accept, dtype=jnp.int32), m),
        n_components=n_components,
        fs=pad(fs_out),
        ss=pad(ss_out),
        panel=pad(panel.astype(jnp.int32), -1),
        total_intensity=pad(total[order]),
        n_pixels=pad(n_k[order].astype(jnp.int32)),
        max_intensity=pad(peak_max[order]),
        local_sigma=pad(local_sigma[order]),
        snr=pad(snr[order]),
    )


@functools.partial(jax.jit, static_argnames="config")
def find_peaks_batch(frames, mask, radius, config: Peakfinder8Config) -> PeakList:
    """peakfinder8 on a batch: frames (B, P, ss, fs) float32; mask and radius (P, ss, fs), shared by all frames.

    Returns a PeakList whose fields have a leading batch axis B.
    """
    return jax.vmap(lambda f: find_peaks(f, mask, radius, config))(frames)
