"""peakfinder8 Bragg-spot finder in jitted JAX (AGIPD-1M and any tiled detector).

The algorithm follows CrystFEL's ``libcrystfel/src/peakfinder8.c`` (Barty, Mariani, Yefanov), which is
also what OnDA/OM and cfelpyutils implement; the reference we check against is OM 23.8.3's
``Peakfinder8PeakDetection`` (``benchmarks/om_reference.py``):

1. Good pixels: mask and ``min_res <= radius <= max_res`` (OM zeroes its mask where r < min_res or r > max_res).
2. Radial statistics: pixels are binned by ``rint(radius)``; per bin a mean ("offset") and standard
   deviation are computed over good pixels, ``n_sigma_clip_iterations`` times, each pass keeping only pixels
   with ``offset - snr·σ < value < max(adc_threshold, offset + snr·σ)`` of the previous pass (the first pass
   keeps everything). An empty bin gets offset 0, σ 0 and thresholds (FLT_MAX, FLT_MIN) as in the reference.
3. Candidate pixels: good and ``value > threshold[bin]``.
4. 8-connected components of candidates, never across ASIC borders. The reference flood-fills from seeds
   that are *not* on an ASIC's outermost rows/columns, so a component made only of edge pixels is never
   found; we keep that rule.
5. Per component: pixel count in [min_pixel_count, max_pixel_count]; a first centroid weighted by
   ``value - offset[bin]``; local background = mean/std of good pixels with ``value < threshold[bin]``
   (strictly: pixels in any component are above it) in a disc of radius ``2·local_bg_radius`` around the
   rounded first centroid (square loop ``[-2R, 2R)`` as in the reference), restricted to the ASIC; without
   any such pixel the radial offset at the centroid and σ = 0.01. Then total = Σ(value - local_offset),
   max = max(value - local_offset, 0), final centroid weighted by the raw values, ``snr = total / local_sigma``
   (the reference's definition: *not* divided by √npix; 0 when σ <= 1e-10). Accepted when snr >= minimum_snr,
   max >= (max background value, at least 0) - local_offset, and the centroid lies inside the ASIC.

Conventions that decide ties, as in OM on its stacked ``(P·ss, fs)`` AGIPD layout: the centroids are computed
in float32 in *stacked* coordinates (``P_index·ss + ss``, ``fs``), so that ``rint`` of a centroid that falls
on .5 (two equal pixels: the commonest peak) picks the same background disc as OM (rint rounds half to even).

Known difference from OM/CrystFEL (not reproduced): their flood fill loops ``for (p = 0; p <= n; p++)`` over
the pixel list of the growing peak, i.e. one entry past its end; that entry holds the ASIC coordinates of a
pixel of an *earlier* peak (possibly on another ASIC), so a peak may absorb above-threshold pixels next to
that stale position. On sparse photon-counting frames this merges a few neighbouring clusters into one
peak (~2 % of OM's peaks in ``benchmarks/bench_peakfinder.py --ondamonitor``); we find the clusters as the
separate connected components they are. OM keeps the first ``max_num_peaks`` peaks in ASIC scan order; we
keep the ``max_num_peaks`` brightest.

JAX formulation (why it looks different from the C): all shapes are static and nothing loops over pixels.
Frames stay in their (P, ss, fs) layout; ASIC borders are coordinate tests. Radial statistics: with a
``RadialBinning`` (``make_binning``, host side, once per geometry and mask) the good pixels are gathered once
per frame into rows of 64 pixels of one bin, the rows in the order of their first pixel (cache-friendly);
each clipping pass is a dense row reduction plus a small segment sum over rows, the passes unrolled (a loop
would copy the frame-sized layout into its carry on every call). Without it, a scatter over all pixels.
Candidate pixels are rare: they are found in the sorted layout (one threshold per row), compacted by a
row-count prefix sum and a binary search into a list whose static size is picked per frame by a
``lax.switch`` (1024, 4096 or ``max_num_candidates``: the work follows the candidate count) and sorted back
to raster order; components are found on that list by iterative min-label propagation over the 8 neighbours
(adjacent list entries on the same row, one binary search each for the rows above and below) plus pointer
jumping, inside a bounded ``lax.while_loop``; per-component sums are segment sums over the list. A frame with
more candidates is redone on the whole frame (3×3 min-pool propagation and dense segment sums; identical
results). The background discs (one window per component inside its ASIC) are measured for the first 128,
512 or ``max_num_components`` components, again the smallest that holds all that were found.

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

from data_pipeline.host import aligned_empty, is_aligned

_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_MIN = float(np.finfo(np.float32).tiny)  # the reference's (odd) lower threshold of an empty bin
_CANDIDATE_TIERS = (1024, 4096)  # compacted-candidate list sizes (and max_num_candidates)
_MEASURE_TIERS = (128, 512)  # components measured per frame (and max_num_components)
_ROW = 16  # pixels per row of the candidate map's row-count prefix sum


@dataclasses.dataclass(frozen=True)
class Peakfinder8Config:
    """peakfinder8 parameters (hashable: passed to jit as a static argument).

    adc_threshold: lower bound of the per-bin threshold, detector units.
    minimum_snr: σ multiplier of the radial threshold and the minimum peak SNR.
    min_pixel_count, max_pixel_count: accepted component sizes, pixels (inclusive).
    local_bg_radius: R, pixels; the local background disc has radius 2R (as in the reference).
    min_res, max_res: accepted pixel radius from the beam centre, pixels: ``min_res <= r <= max_res``
        (OM takes integers here).
    max_num_peaks: length of the fixed-size output arrays.
    asic_shape: (ss, fs) pixels of one ASIC; panels must be whole multiples of it.
    n_sigma_clip_iterations: passes of the radial sigma clipping.
    max_num_components: components (after size cuts) examined per frame; further ones are dropped in
        raster order and counted in ``PeakList.n_components``.
    max_label_iterations: bound on label-propagation sweeps (pointer jumping converges in far fewer).
    max_num_candidates: above-threshold pixels compacted for labelling and per-component sums (a
        performance knob only: a frame with more candidates falls back to the slower whole-frame path).
    radial_pixels_per_bin: 0 (default): the radial statistics use every good pixel (the reference
        algorithm). N > 0: the analogue of OM's ``fast_mode`` (OM: 100): each bin's statistics use at most N
        of its good pixels, evenly spaced in (panel, raster) order, a fixed subsample chosen with the binning
        (OM draws it at random). Everything else still uses every pixel. Needs a RadialBinning (find_peaks
        builds one, slowly, when none is given).
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
    max_num_candidates: int = 16384
    radial_pixels_per_bin: int = 0

    def __post_init__(self):
        if self.max_res <= self.min_res:
            raise ValueError("max_res must exceed min_res")
        if self.max_num_components < self.max_num_peaks:
            raise ValueError("max_num_components must be >= max_num_peaks")
        if self.max_num_candidates < 1:
            raise ValueError("max_num_candidates must be >= 1")
        if self.local_bg_radius < 1 or self.min_pixel_count < 1:
            raise ValueError("local_bg_radius and min_pixel_count must be >= 1")
        if self.radial_pixels_per_bin < 0:
            raise ValueError("radial_pixels_per_bin must be >= 0 (0 = every pixel)")

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
    good = mask & (radius >= config.min_res) & (radius <= config.max_res)
    bins = jnp.clip(jnp.rint(radius), 0, config.n_radial_bins - 1).astype(jnp.int32)
    return good, bins


class RadialBinning(NamedTuple):
    """Precomputed radial binning of one geometry + mask (build it with :func:`make_binning`, host side).

    The good pixels (mask, ``min_res <= r <= max_res``) sorted by radial bin, then raster order, cut into rows
    of ``W`` pixels of a single bin: the full rows of every bin and its last, partial row, the rows ordered by
    their first pixel. A per-bin reduction is then a dense row reduction plus a segment sum over the rows.

    pixels: (R, W) int32 flat index into the (P, ss, fs) frame; the entries past a row's length repeat its
    first pixel (in bounds, so the whole layout is gathered without bounds handling) and are read as NaN.
    row_bin: (R,) int32 the bin of each row; row_len: (R,) int32 its number of pixels (W but for the last row
    of a bin). good: (P, ss, fs) bool and bins: (P, ss, fs) int32, the good-pixel map and radial bin of every
    pixel.
    """

    pixels: jax.Array
    row_bin: jax.Array
    row_len: jax.Array
    good: jax.Array
    bins: jax.Array


def make_binning(radius, mask, config: Peakfinder8Config, row_width: int = 64) -> RadialBinning:
    """Host-side (numpy) RadialBinning for ``radius`` (P, ss, fs) pixels and ``mask`` (P, ss, fs) True = good.

    Fixed per geometry and mask: build it once and pass it to find_peaks / find_peaks_batch /
    radial_statistics (which then ignore their mask and radius arguments). Depends on config only through
    min_res, max_res, n_radial_bins and asic_shape.
    """
    radius = np.asarray(radius, np.float32)
    mask = np.asarray(mask, bool)
    _check_shape(radius.shape, config)
    nb = config.n_radial_bins
    # Same float32 arithmetic as _good_and_bins (python floats are weakly typed on both sides).
    good = mask & (radius >= np.float32(config.min_res)) & (radius <= np.float32(config.max_res))
    bins = np.clip(np.rint(radius), 0, nb - 1).astype(np.int32)
    pix = np.flatnonzero(good)
    if config.radial_pixels_per_bin:
        pix = pix[_subsample(bins.reshape(-1)[pix], config.radial_pixels_per_bin)]
    # Rows are cut by bin only (not panel first): a bin's ~1000 pixels make few partial rows.
    key = bins.reshape(-1)[pix]
    order = np.argsort(key, kind="stable")
    pix, key = pix[order], key[order]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    counts = np.diff(np.r_[start, key.size])
    rank = np.arange(pix.size) - np.repeat(start, counts)
    rows_per_bin = -(-counts // row_width)
    row = np.repeat(np.cumsum(rows_per_bin) - rows_per_bin, counts) + rank // row_width
    n_rows = max(int(rows_per_bin.sum()), 1)
    pixels = np.full((n_rows, row_width), -1, np.int64)
    pixels[row, rank % row_width] = pix
    row_len = (pixels >= 0).sum(axis=1).astype(np.int32)
    # Padding repeats the row's first pixel (clip: the one placeholder row of a binning with no good pixel).
    pixels = np.where(pixels >= 0, pixels, pixels[:, :1]).clip(0).astype(np.int32)
    row_bin = np.zeros(n_rows, np.int32)
    row_bin[: int(rows_per_bin.sum())] = np.repeat(key[start], rows_per_bin)
    # Rows in the order of their first pixel, not of their bin: rows of neighbouring bins that cover the same
    # detector rows then follow each other and share cache lines, and the gather of a frame into this layout
    # takes a third of the time it takes with the rows in bin order (0.6 vs 1.7 ms on one core).
    by_pixel = np.argsort(pixels[:, 0], kind="stable")
    pixels, row_bin, row_len = pixels[by_pixel], row_bin[by_pixel], row_len[by_pixel]
    return RadialBinning(*(jnp.asarray(x) for x in (pixels, row_bin, row_len, good, bins)))


def _subsample(pixel_bins, n_per_bin):
    """Boolean selection of at most n_per_bin entries per bin, evenly spaced in the given (raster) order:
    ranks floor(j·count/n) for j < n of each bin with count > n, every entry of the others."""
    order = np.argsort(pixel_bins, kind="stable")
    b = pixel_bins[order]
    start = np.flatnonzero(np.r_[True, b[1:] != b[:-1]]) if b.size else np.zeros(0, np.int64)
    counts = np.diff(np.r_[start, b.size])
    rank = np.arange(b.size) - np.repeat(start, counts)
    c = np.repeat(counts, counts).astype(np.int64)
    n = np.int64(n_per_bin)
    chosen = (c <= n) | ((rank + 1) * n // c > rank * n // c)
    out = np.zeros(b.size, bool)
    out[order] = chosen
    return out


def _clip_pass(mom, config):
    """Offset, sigma, upper, lower thresholds and count from per-bin moments (count, Σx, Σx²) (nb, 3)."""
    count = mom[:, 0]
    nz = count > 0
    safe = jnp.where(nz, count, 1.0)
    offset = jnp.where(nz, mom[:, 1] / safe, 0.0)
    # The reference leaves a (rounding-)negative variance un-rooted; we clamp it at 0.
    sigma = jnp.where(nz, jnp.sqrt(jnp.maximum(mom[:, 2] / safe - offset**2, 0.0)), 0.0)
    upper = jnp.where(nz, jnp.maximum(offset + config.minimum_snr * sigma, config.adc_threshold), _FLT_MAX)
    lower = jnp.where(nz, offset - config.minimum_snr * sigma, _FLT_MIN)
    return upper, lower, offset, sigma, count.astype(jnp.int32)


def _clip_loop(one_pass, dtype, config):
    nb = config.n_radial_bins
    carry = (
        jnp.full(nb, 1e9, dtype),
        jnp.full(nb, -1e9, dtype),
        jnp.zeros(nb, dtype),
        jnp.zeros(nb, dtype),
        jnp.zeros(nb, jnp.int32),
    )
    # Unrolled (a handful of passes): a lax.fori_loop would copy the frame-sized loop invariants into its
    # carry on every call.
    for i in range(config.n_sigma_clip_iterations):
        carry = one_pass(i, carry)
    upper, _, offset, sigma, count = carry
    return RadialStats(offset, sigma, upper, count)


def _radial_statistics_scatter(data, mask, radius, config):
    good, bins = _good_and_bins(mask, radius, config)
    d, b, g = data.reshape(-1), bins.reshape(-1), good.reshape(-1)
    nb = config.n_radial_bins

    def one_pass(_, carry):
        upper, lower, *_ = carry
        keep = g & (d < upper[b]) & (d > lower[b])
        w = jnp.where(keep, 1.0, 0.0).astype(d.dtype)
        # One scatter for the three moments (count, Σx, Σx²) instead of three.
        mom = jax.ops.segment_sum(jnp.stack([w, w * d, w * d * d], axis=-1), b, num_segments=nb)
        return _clip_pass(mom, config)

    return _clip_loop(one_pass, d.dtype, config)


def _row_moments(v, keep):
    """(count, Σx, Σx²) of the kept entries of each row: v, keep (R, W) -> (R, 3)."""
    w = jnp.where(keep, v, 0.0)
    # One matrix-vector product for the three row sums: faster on CPU than three reductions.
    x = jnp.stack([keep.astype(v.dtype), w, w * w])  # (3, R, W)
    return jnp.einsum("krw,w->rk", x, jnp.ones(v.shape[1], v.dtype), precision=lax.Precision.HIGHEST)


def _sorted_values(d_flat, binning: RadialBinning):
    """The frame's values in the binning's layout (R, W), NaN past each row's length: NaN fails every
    threshold comparison, so nothing downstream needs a separate validity mask."""
    v = d_flat.at[binning.pixels].get(mode="promise_in_bounds")
    return jnp.where(jnp.arange(v.shape[1]) < binning.row_len[:, None], v, jnp.nan)


def _radial_statistics_binned(v, binning: RadialBinning, config):
    """Same statistics from the values in the layout (`_sorted_values`): dense row sums per pass."""
    row_bin = binning.row_bin

    def one_pass(_, carry):
        upper, lower, *_ = carry
        rows = _row_moments(v, (v < upper[row_bin][:, None]) & (v > lower[row_bin][:, None]))
        return _clip_pass(jax.ops.segment_sum(rows, row_bin, num_segments=config.n_radial_bins), config)

    return _clip_loop(one_pass, v.dtype, config)


def radial_statistics(
    data, mask, radius, config: Peakfinder8Config, binning: RadialBinning | None = None
) -> RadialStats:
    """Sigma-clipped radial background of one frame.

    data: (P, ss, fs) float32, detector units; mask: (P, ss, fs) bool, True = good;
    radius: (P, ss, fs) float32, pixels from the beam centre. Returns RadialStats over
    ``config.n_radial_bins`` bins (bin i holds pixels with rint(r) == i). With ``binning`` (from
    make_binning for this mask and radius) mask and radius are not used and the faster sorted layout is.
    """
    data = jnp.asarray(data, jnp.float32)
    binning = _ensure_binning(mask, radius, config, binning)
    if binning is None:
        return _radial_statistics_scatter(data, mask, radius, config)
    return _radial_statistics_binned(_sorted_values(data.reshape(-1), binning), binning, config)


def _check_shape(shape, config):
    _, ss, fs = shape
    a_ss, a_fs = config.asic_shape
    if ss % a_ss or fs % a_fs:
        raise ValueError(f"panel shape {(ss, fs)} is not a multiple of asic_shape {config.asic_shape}")


# --- candidates and connected components ------------------------------------------------------------------------


def _compact(rows, size, row_count, cum):
    """Flat indices of the True entries of ``rows`` (n_rows, w) bool in raster order, padded with n = rows.size
    to ``size`` (incomplete when there are more than ``size``; the count is ``cum[-1]``).

    No whole-array nonzero/scatter (slow on CPU): a prefix sum of the row counts, a binary search of each
    output slot's row, and the slot's rank among its row's True entries. row_count: (n_rows,) int32 True
    entries per row; cum: its inclusive prefix sum."""
    n_rows, w = rows.shape
    j = jnp.arange(size, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(cum, j, side="right").astype(jnp.int32), n_rows - 1)
    rank = j - (cum[row] - row_count[row])
    # Prefix sums along the rows as a product with a triangular matrix: exact in float32, and a fraction of
    # the time of a cumsum (a reduce-window on CPU).
    tri = jnp.triu(jnp.ones((w, w), jnp.float32))
    prefix = jnp.dot(rows[row].astype(jnp.float32), tri, precision=lax.Precision.HIGHEST)  # (size, w)
    col = jnp.sum(prefix <= rank[:, None].astype(jnp.float32), axis=1, dtype=jnp.int32)
    return jnp.where(j < cum[-1], row * w + col, rows.size).astype(jnp.int32)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _coords(flat, shape, config):
    """Stacked row (P_index·ss + ss), panel ss, fs and in-ASIC (ss, fs) of raw flat indices."""
    _, s, f = shape
    a_ss, a_fs = config.asic_shape
    stacked = flat // f
    x = flat % f
    y = stacked % s
    return stacked, y, x, y % a_ss, x % a_fs


def _component_columns(dv, net, flat, shape, config):
    """Per-pixel columns summed per component: count, net, net·Y, net·X, raw, raw·Y, raw·X, raw·y (panel)."""
    stacked, y, x, _, _ = _coords(flat, shape, config)
    ys, yp, xf = stacked.astype(jnp.float32), y.astype(jnp.float32), x.astype(jnp.float32)
    return jnp.stack([jnp.ones_like(dv), net, net * ys, net * xf, dv, dv * ys, dv * xf, dv * yp], -1)


def _size_cuts(npix, is_root, has_seed, net_sum, config):
    sized = is_root & (npix >= config.min_pixel_count) & (npix <= config.max_pixel_count)
    return sized & has_seed & (jnp.abs(net_sum) >= 1e-10)


def _interior(ay, ax, config):
    a_ss, a_fs = config.asic_shape
    return (ay >= 1) & (ay <= a_ss - 2) & (ax >= 1) & (ax <= a_fs - 2)


def _components_compact(d, ci, bins, offset, config, m):
    """Components of the candidate pixels compacted to ``m`` entries (raster order, so a component's smallest
    compact index is its smallest flat index: labels, roots and their order are those of _components_dense).
    ci: (m,) int32 candidate flat indices in ascending (raster) order, padded with d.size (complete only when
    the frame has at most m candidates, else the dense version must be used).
    Returns (n_components, root flat index (K,), sums (K, 8), max value (K,)) for the first K =
    max_num_components surviving roots in raster order."""
    shape = d.shape
    n, f = d.size, shape[2]
    a_ss, a_fs = config.asic_shape
    ok = ci < n
    own = jnp.arange(m, dtype=jnp.int32)
    _, _, _, ay, ax = _coords(ci, shape, config)

    inb = jnp.stack(
        [ok & (ay + dy >= 0) & (ay + dy < a_ss) & (ax + dx >= 0) & (ax + dx < a_fs) for dy, dx in _NEIGHBOURS], -1
    )
    # ci is sorted (raster order), so the neighbours are found without a frame-sized inverse map: those on
    # the same row are the adjacent entries, and the three of the row above (below) are among the three
    # entries from the first one >= ci - f - 1 (ci + f - 1): one binary search per row, not per neighbour.
    padded = jnp.concatenate([ci, jnp.full(3, np.iinfo(np.int32).min, jnp.int32)])  # no target past the end

    def position_of(target, positions):
        """The one of ``positions`` (each (m,)) whose entry is ``target``, else m."""
        return functools.reduce(lambda acc, p: jnp.where(padded[p] == target, p, acc), positions, jnp.int32(m))

    first = {dy: jnp.searchsorted(ci, ci + (dy * f - 1)).astype(jnp.int32) for dy in (-1, 1)}
    near = {-1: [first[-1] + j for j in range(3)], 0: [own - 1, own + 1], 1: [first[1] + j for j in range(3)]}
    cols = [position_of(ci + (dy * f + dx), near[dy]) for dy, dx in _NEIGHBOURS]
    nbr = jnp.where(inb, jnp.stack(cols, -1), m)  # (m, 8) in _NEIGHBOURS order, m = no candidate neighbour

    def sweep(state):
        lab, _, it = state
        ext = jnp.concatenate([lab, jnp.array([m], jnp.int32)])
        new = jnp.where(ok, jnp.minimum(lab, jnp.min(ext[nbr], axis=1)), m)
        # Pointer jumping: a label is the index of a pixel of the same component, so adopting that pixel's
        # label keeps the minimum and shortens long chains from O(length) to O(log length) sweeps.
        ext = jnp.concatenate([new, jnp.array([m], jnp.int32)])
        new = jnp.where(ok, ext[new], m)
        return new, jnp.any(new != lab), it + 1

    lab0 = jnp.where(ok, own, m)
    lab, _, _ = lax.while_loop(lambda s: s[1] & (s[2] < config.max_label_iterations), sweep, (lab0, jnp.array(True), 0))

    cj = jnp.where(ok, ci, 0)
    dv = d.reshape(-1)[cj]
    net = dv - offset[bins.reshape(-1)[cj]]
    sums = jax.ops.segment_sum(_component_columns(dv, net, cj, shape, config), lab, num_segments=m)
    dmax = jax.ops.segment_max(dv, lab, num_segments=m)
    has_seed = jax.ops.segment_max(ok & _interior(ay, ax, config), lab, num_segments=m)
    valid0 = _size_cuts(sums[:, 0], ok & (lab == own), has_seed, sums[:, 1], config)
    n_components = jnp.sum(valid0, dtype=jnp.int32)
    (rc,) = jnp.nonzero(valid0, size=config.max_num_components, fill_value=0)
    return n_components, cj[rc], sums[rc], dmax[rc]


def _components_dense(d, cand, bins, offset, config):
    """Same as _components_compact over the whole frame (any number of candidates; slower)."""
    shape = d.shape
    p, s, f = shape
    n = d.size
    a_ss, a_fs = config.asic_shape
    # (P·ss/a_ss, a_ss, fs/a_fs, a_fs) is a free reshape of the frame with the ASICs as blocks.
    blocks = (p * s // a_ss, a_ss, f // a_fs, a_fs)
    c4 = cand.reshape(blocks)
    lab0 = jnp.where(c4, jnp.arange(n, dtype=jnp.int32).reshape(blocks), n)

    def sweep(state):
        lab, _, it = state
        # 3×3 min within each ASIC; padding with N keeps labels from leaking across ASIC borders.
        window = (1, 3, 1, 3)
        nb = lax.reduce_window(lab, n, lax.min, window, (1, 1, 1, 1), ((0, 0), (1, 1), (0, 0), (1, 1)))
        new = jnp.where(c4, nb, n)
        flat = jnp.concatenate([new.reshape(-1), jnp.array([n], jnp.int32)])
        new = jnp.where(c4, flat[new], n)
        return new, jnp.any(new != lab), it + 1

    init = (lab0, jnp.array(True), 0)
    lab, _, _ = lax.while_loop(lambda st: st[1] & (st[2] < config.max_label_iterations), sweep, init)
    lab = lab.reshape(-1)
    flat = jnp.arange(n, dtype=jnp.int32)
    dv = d.reshape(-1)
    net = dv - offset[bins.reshape(-1)]
    sums = jax.ops.segment_sum(_component_columns(dv, net, flat, shape, config), lab, num_segments=n)
    dmax = jax.ops.segment_max(dv, lab, num_segments=n)
    _, _, _, ay, ax = _coords(flat, shape, config)
    has_seed = jax.ops.segment_max(cand.reshape(-1) & _interior(ay, ax, config), lab, num_segments=n)
    valid0 = _size_cuts(sums[:, 0], cand.reshape(-1) & (lab == flat), has_seed, sums[:, 1], config)
    n_components = jnp.sum(valid0, dtype=jnp.int32)
    (root,) = jnp.nonzero(valid0, size=config.max_num_components, fill_value=0)
    return n_components, root, sums[root], dmax[root]


# --- local background, acceptance, output ----------------------------------------------------------------------


def _measure_chunk(d_flat, g_flat, b_flat, stats, root, s, dmax_r, shape, config):
    """Local background and acceptance of C components: root flat index (C,), sums (C, 8), max value (C,).
    Returns (accept, total, peak_max, local_sigma, snr, fs, ss, panel, npix)."""
    _, s_panel, f = shape
    a_ss, a_fs = config.asic_shape
    stacked, _, x, ay, ax = _coords(root, shape, config)
    y0 = stacked - ay  # ASIC origin, stacked rows
    x0 = x - ax
    abs_net = jnp.abs(s[:, 1])
    abs_net = jnp.where(abs_net > 0, abs_net, 1.0)
    # First centroid in stacked coordinates (as OM): decides the background disc, rint half to even.
    com_y0 = jnp.rint(s[:, 2] / abs_net).astype(jnp.int32)
    com_x0 = jnp.rint(s[:, 3] / abs_net).astype(jnp.int32)
    cy, cx = com_y0 - y0, com_x0 - x0  # in the ASIC

    # The background disc (radius 2R about the centroid pixel, offsets -2R..2R-1 as the reference) clipped
    # to the ASIC, read as one window per component that stays inside the ASIC: contiguous rows instead of
    # a gather per disc pixel with its own index arithmetic.
    r2 = 2 * config.local_bg_radius
    ny, nx = min(2 * r2, a_ss), min(2 * r2, a_fs)
    wy, wx = jnp.clip(cy - r2, 0, a_ss - ny), jnp.clip(cx - r2, 0, a_fs - nx)  # window origin in the ASIC
    start_y, start_x = y0 + wy, x0 + wx  # in the (P·ss, fs) stacked frame

    def windows(a):
        a2 = a.reshape(-1, f)
        return jax.vmap(lambda y, x: lax.dynamic_slice(a2, (y, x), (ny, nx)))(start_y, start_x).reshape(len(root), -1)

    oy, ox = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    dy = wy[:, None] + jnp.asarray(oy.ravel()) - cy[:, None]  # (C, ny·nx) offsets from the centroid pixel
    dx = wx[:, None] + jnp.asarray(ox.ravel()) - cx[:, None]
    disc = (dy >= -r2) & (dy < r2) & (dx >= -r2) & (dx < r2) & (dy * dy + dx * dx <= r2 * r2)
    vals = windows(d_flat)
    # Background pixels: good and strictly below their bin's threshold (pixels of any peak are above it).
    w = disc & windows(g_flat) & (vals < stats.threshold[windows(b_flat)])
    n_bg = jnp.sum(w, axis=1)
    safe_n = jnp.maximum(n_bg, 1)
    mean_bg = jnp.sum(jnp.where(w, vals, 0.0), axis=1) / safe_n
    var_bg = jnp.sum(jnp.where(w, vals * vals, 0.0), axis=1) / safe_n - mean_bg**2
    bg_max = jnp.maximum(jnp.max(jnp.where(w, vals, -jnp.inf), axis=1), 0.0)
    # No background pixel: the radial offset at the centroid pixel and σ = 0.01 (reference).
    centre = jnp.clip(com_y0 * f + com_x0, 0, d_flat.size - 1)
    local_offset = jnp.where(n_bg > 0, mean_bg, stats.offset[b_flat[centre]])
    local_sigma = jnp.where((n_bg > 0) & (var_bg >= 0), jnp.sqrt(jnp.maximum(var_bg, 0.0)), 0.01)

    # Re-integrate with the local background; centroid weighted by raw values (as the reference).
    n_k, raw = s[:, 0], s[:, 4]
    abs_raw = jnp.where(jnp.abs(raw) >= 1e-10, jnp.abs(raw), 1.0)
    com_y, com_x, com_ss = s[:, 5] / abs_raw, s[:, 6] / abs_raw, s[:, 7] / abs_raw
    total = raw - n_k * local_offset
    peak_max = jnp.maximum(dmax_r - local_offset, 0.0)
    snr = jnp.where(jnp.abs(local_sigma) > 1e-10, total / local_sigma, 0.0)
    y0f, x0f = y0.astype(jnp.float32), x0.astype(jnp.float32)
    accept = (
        (jnp.abs(raw) >= 1e-10)
        & (snr >= config.minimum_snr)
        & (peak_max >= bg_max - local_offset)
        & (com_y >= y0f)
        & (com_y <= y0f + (a_ss - 1))
        & (com_x >= x0f)
        & (com_x <= x0f + (a_fs - 1))
    )
    panel = (stacked // s_panel).astype(jnp.int32)
    return accept, total, peak_max, local_sigma, snr, com_x, com_ss, panel, n_k.astype(jnp.int32)


def _measure(d, g, b, stats, comps, config) -> PeakList:
    """Local background, re-integration, acceptance and sorting of the compacted components. Only the first
    n of them are measured and sorted, n the smallest of _MEASURE_TIERS (or max_num_components) that holds
    them all."""
    n_components, root, s, dmax_r = comps
    k, m = config.max_num_components, config.max_num_peaks
    d_flat, g_flat, b_flat = d.reshape(-1), g.reshape(-1), b.reshape(-1)

    def measure_first(size):
        part = _measure_chunk(d_flat, g_flat, b_flat, stats, root[:size], s[:size], dmax_r[:size], d.shape, config)
        accept, total, peak_max, local_sigma, snr, fs, ss, panel, npix = part
        accept = accept & (jnp.arange(size) < n_components)
        # The accepted peaks by total intensity, the first max_num_peaks of them (ties: raster order).
        _, order = lax.top_k(jnp.where(accept, total, -jnp.inf), min(size, m))
        keep = accept[order]

        def out(x, fill=0):
            return jnp.pad(jnp.where(keep, x[order], fill), (0, m - len(order)), constant_values=fill)

        return PeakList(
            n_peaks=jnp.minimum(jnp.sum(accept, dtype=jnp.int32), m),
            n_components=n_components,
            fs=out(fs),
            ss=out(ss),
            panel=out(panel, -1),
            total_intensity=out(total),
            n_pixels=out(npix),
            max_intensity=out(peak_max),
            local_sigma=out(local_sigma),
            snr=out(snr),
        )

    # A lax.switch over static sizes rather than a loop over chunks: a while loop would copy the frame-sized
    # arrays it reads into its carry on every call.
    sizes = sorted({min(z, k) for z in _MEASURE_TIERS} | {k})
    tier = jnp.searchsorted(jnp.asarray(sizes), jnp.minimum(n_components, k))
    return lax.switch(tier, [functools.partial(measure_first, z) for z in sizes])


# --- whole frames ----------------------------------------------------------------------------------------------


def _front(data, mask, radius, config, binning):
    """Radial statistics and the frame arrays: value, good, bin, stats, and the values in the sorted layout
    when that layout holds every good pixel (no subsampling; else None)."""
    d = data.astype(jnp.float32)
    if binning is None:
        stats = _radial_statistics_scatter(d, mask, radius, config)
        g, b = _good_and_bins(mask, radius, config)
        return d, g, b, stats, None
    v = _sorted_values(d.reshape(-1), binning)
    stats = _radial_statistics_binned(v, binning, config)
    return d, binning.good, binning.bins, stats, (None if config.radial_pixels_per_bin else v)


def _paths(config):
    """Static candidate-list sizes; each frame takes the smallest that holds its candidates (a lax.switch in
    the program), and a frame with more than the largest is redone on the whole frame."""
    top = config.max_num_candidates
    return tuple(sorted({min(z, top) for z in _CANDIDATE_TIERS} | {top}))


def _candidate_rows(d, g, b, stats, v, binning):
    """The candidate map (good and above its bin's threshold) as rows for `_compact`, and the function taking
    the compacted positions to ascending flat pixel indices (padding: d.size).

    With the values in the sorted layout at hand (v), the map is taken there: a dense compare against one
    threshold per row, instead of a frame-sized gather of per-pixel thresholds. Its candidates then come in
    bin order and are sorted back to raster order (a few thousand entries)."""
    if v is None:
        f = d.shape[2]
        rows = (g & (d > stats.threshold[b])).reshape(-1, min(_ROW, f) if f % _ROW == 0 else f)
        return rows, lambda idx: idx
    cand = v > stats.threshold[binning.row_bin][:, None]
    w = v.shape[1]
    rows = cand.reshape(-1, _ROW if w % _ROW == 0 else w)

    def to_flat(idx):
        return jnp.sort(binning.pixels.reshape(-1).at[idx].get(mode="fill", fill_value=d.size))

    return rows, to_flat


def _back(front, config, tiers, binning):
    """Components and measurement; tiers: compacted-candidate list sizes from _paths (() = whole-frame path).
    Returns (peaks, overflow)."""
    d, g, b, stats, v = front
    if not tiers:
        cand = g & (d > stats.threshold[b])
        comps, overflow = _components_dense(d, cand, b, stats.offset, config), jnp.array(False)
        return _measure(d, g, b, stats, comps, config), overflow
    rows, to_flat = _candidate_rows(d, g, b, stats, v, binning)
    row_count = jnp.sum(rows, axis=1, dtype=jnp.int32)
    cum = jnp.cumsum(row_count)  # inclusive
    count = cum[-1]

    def tier(m):
        return _components_compact(d, to_flat(_compact(rows, m, row_count, cum)), b, stats.offset, config, m)

    which = jnp.minimum(jnp.searchsorted(jnp.asarray(tiers, jnp.int32), count), len(tiers) - 1)
    comps = lax.switch(which, [functools.partial(tier, m) for m in tiers])
    return _measure(d, g, b, stats, comps, config), count > tiers[-1]


@functools.partial(jax.jit, static_argnames=("config", "tiers"))
def _find_peaks_one(data, mask, radius, config, binning, tiers):
    _check_shape(data.shape, config)
    return _back(_front(data, mask, radius, config, binning), config, tiers, binning)


@functools.partial(jax.jit, static_argnames=("config", "tiers"))
def _find_peaks_many(frames, mask, radius, config, binning, tiers):
    _check_shape(frames.shape[1:], config)
    # One frame after the other (lax.map) rather than vmap: on CPU the vmapped program is no faster per frame
    # and its B-times-larger buffers cost page faults on every call.
    return lax.map(lambda f: _back(_front(f, mask, radius, config, binning), config, tiers, binning), frames)


def _traced(*xs):
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _ensure_binning(mask, radius, config, binning):
    """The subsampled statistics (radial_pixels_per_bin > 0) live in a RadialBinning: build one if needed."""
    if binning is not None or not config.radial_pixels_per_bin:
        return binning
    if _traced(mask, radius):
        raise ValueError("radial_pixels_per_bin > 0 under jit needs a binning (make_binning, outside jit)")
    return make_binning(np.asarray(radius), np.asarray(mask), config)


def _traced_tiers(run, sizes):
    """Under an outer jit: the compacted path, then the whole-frame path under a lax.cond."""
    pk, overflow = run(sizes)
    return lax.cond(jnp.any(overflow), lambda: run(())[0], lambda: pk)


def find_peaks(data, mask, radius, config: Peakfinder8Config, binning: RadialBinning | None = None) -> PeakList:
    """peakfinder8 on one frame.

    data: (P, ss, fs) float32, detector units; mask: (P, ss, fs) bool, True = good pixel;
    radius: (P, ss, fs) float32, distance of each pixel from the beam centre in pixels (from the geometry).
    ss and fs must be multiples of ``config.asic_shape`` (AGIPD-1M: (16, 512, 128), ASICs 64×64).
    binning: optional ``make_binning(radius, mask, config)``, built once per geometry and mask: much faster
    radial statistics (mask and radius are then not used).
    Returns a PeakList of length ``config.max_num_peaks``.

    Components are found on the compacted candidate pixels (jitted ``_find_peaks_one``, at most
    ``config.max_num_candidates``); a frame with more candidates is redone on the whole frame (same results,
    slower). That decision is taken on the host (it waits for the frame's result), outside jit: a
    whole-frame branch inside the same program would cost every call its (large) buffers. Called under an
    outer jit it becomes a ``lax.cond``.
    """
    sizes = _paths(config)
    binning = _ensure_binning(mask, radius, config, binning)

    def run(tiers):
        return _find_peaks_one(data, mask, radius, config, binning, tiers)

    if _traced(data, mask, radius, binning):
        return _traced_tiers(run, sizes)
    for tiers in (sizes, ()):
        pk, overflow = run(tiers)
        if not bool(overflow):
            return pk
    return pk


find_peaks._cache_size = _find_peaks_one._cache_size  # type: ignore[attr-defined]
# the compiled-program cache (one entry per shape/config)


_DEVICE_COPIES: dict = {}


def _on_device(shared, device):
    """`shared` (mask, radius, binning) on `device`. Immutable (jax) arrays are copied once per device and kept
    for later batches: they are fixed per geometry and mask, and copying ~15 MB on every batch cost ~0.3 ms
    per frame. The cache keeps the arrays it was keyed on alive, so their ids cannot be reused."""
    leaves = jax.tree.leaves(shared)
    if not all(isinstance(x, jax.Array) for x in leaves):
        return jax.device_put(shared, device)
    key = (tuple(map(id, leaves)), device)
    if key not in _DEVICE_COPIES:
        if len(_DEVICE_COPIES) >= 2 * len(jax.local_devices()):
            _DEVICE_COPIES.clear()
        _DEVICE_COPIES[key] = (leaves, jax.device_put(shared, device))
    return _DEVICE_COPIES[key][1]


def _run_on_devices(frames, mask, radius, config, binning, tiers):
    """`_find_peaks_many` with the batch split across the local devices (several CPU devices: see
    `data_pipeline.host.use_cpu_cores`), all dispatched before any result is awaited, so the parts run
    concurrently. Frames from `host.aligned_empty` reach the devices without a copy.

    Every part is padded to the same length (one compiled program per device) with copies of its first frame.
    Returns (PeakList, overflow) with the leading batch axis of `frames`.
    """
    devices = jax.local_devices()
    n = len(frames)
    if len(devices) == 1 or n < 2:
        return _find_peaks_many(frames, mask, radius, config, binning, tiers)
    per = -(-n // len(devices))
    devices = devices[: -(-n // per)]  # no empty parts
    frames = np.asarray(frames)
    # With a binning the program reads neither mask nor radius: they are not sent.
    shared = (None, None, binning) if binning is not None else (np.asarray(mask), np.asarray(radius), None)
    parts = []
    for k, dev in enumerate(devices):
        part = frames[k * per : (k + 1) * per]
        if len(part) < per or part.dtype != np.float32 or not is_aligned(part):
            # an aligned float32 part is passed without a copy (host.aligned_empty); else it is copied here once
            buf = aligned_empty((per, *part.shape[1:]), np.float32)
            buf[: len(part)] = part
            buf[len(part) :] = part[:1]
            part = buf
        mk, r, b = _on_device(shared, dev)
        parts.append(_find_peaks_many(jax.device_put(part, dev), mk, r, config, b, tiers))
    out = [jax.tree.map(np.asarray, p) for p in parts]  # the one wait, after every part is dispatched
    joined = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *out)
    return PeakList(*joined[0]), joined[1]


def find_peaks_batch(frames, mask, radius, config: Peakfinder8Config, binning: RadialBinning | None = None) -> PeakList:
    """peakfinder8 on a batch: frames (B, P, ss, fs) float32; mask and radius (P, ss, fs), shared by all frames.

    binning: optional ``make_binning(radius, mask, config)`` (see find_peaks). The batch runs on the compacted
    candidates; only frames with more than ``max_num_candidates`` are redone one by one on the whole frame.
    Returns a PeakList whose fields have a leading batch axis B.
    """
    sizes = _paths(config)
    binning = _ensure_binning(mask, radius, config, binning)

    def run(tiers):
        return _find_peaks_many(frames, mask, radius, config, binning, tiers)

    if _traced(frames, mask, radius, binning):
        return _traced_tiers(run, sizes)
    pk, overflow = _run_on_devices(frames, mask, radius, config, binning, sizes)
    redo = np.flatnonzero(np.asarray(overflow))
    if redo.size:
        fields = [np.array(x) for x in pk]
        for i in redo:
            one, _ = _find_peaks_one(frames[i], mask, radius, config, binning, ())
            for arr, x in zip(fields, one, strict=True):
                arr[i] = np.asarray(x)
        pk = PeakList(*(jnp.asarray(x) for x in fields))
    return pk
