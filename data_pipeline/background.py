"""Diffuse background of indexed frames: radial profiles with peak neighbourhoods excluded, and their SVD.

The paper (Methods, "3D intensity generation"): "the radial average for each pattern was calculated, excluding
outlier values from the vicinity of Bragg peaks, generating a 1D array depicting the background variation with
respect to |q| for each frame. Following this, SVD was applied on these 1D feature arrays, with the first three
components employed to reconstruct the background."

Here, in order:

1. `make_radial_bins`: equal-width |q| bins (Å⁻¹, |q| = 1/d) aligned to multiples of the width, and every
   pixel's bin (flat pixel index p = (module·512 + ss)·128 + fs for AGIPD-1M).
2. `peak_pixels`: the pixels within a few pixels of the frame's found peaks; their weight is set to 0.
3. `radial_profiles` (jit, B frames at once): each frame's profile b_f (n_bins,) = the weighted mean of its
   pixels per bin. Outliers are excluded by the peak discs only, not by σ-clipping: the diffuse background is
   photon-sparse (~0.05 photons per pixel), where clipping at mean + nσ throws away every 1-photon pixel and
   pulls the mean to zero.
4. `fill_empty`: a bin with no usable pixel in one frame (all its pixels masked there) takes the value
   interpolated linearly from the frame's filled neighbours, so a 0 never enters the SVD as if it were
   measured. Bins no pixel of the geometry reaches (`RadialBins.live` False, e.g. a q_max beyond the detector)
   are set to 0 in every frame: a column of zeros adds nothing to the Gram matrix and its components are 0
   there.
5. `gram_update` / `background_components` / `reconstruct`: stacking the profiles as X (n_frames, n_bins), the
   right singular vectors of X are the eigenvectors of G = Xᵀ X = Σ_f b_f b_fᵀ (float64), which adds up over
   frames: a run of any length in constant memory, map-reduce over any split. The background of frame f is the
   projection V_k V_kᵀ b_f onto the first k (paper: 3) of them: it keeps what varies smoothly from frame to
   frame (ring strength, fluence, solvent) and drops each frame's own noise and residual Bragg intensity. The
   SVD is not mean-centred (the paper mentions no centring): the first component is close to the mean profile.
   Optional per-bin weights (use `RadialBins.pixels`) make it the SVD of the pixels rather than of the bins, so
   that the few-pixel, noisy bins at the detector's inner edge do not take over the weaker components.
6. `background_image`: a frame's pixel background, its profile interpolated linearly in |q| between the
   centres of the live bins (no steps at bin edges); constant between the outermost centre and edge, 0 for
   pixels outside the bins.

All functions are pure (numpy on the host, `radial_profiles` in JAX); none does I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

AGIPD_SHAPE = (16, 512, 128)  # modules × slow scan × fast scan (as data_pipeline.geometry)


@dataclasses.dataclass(frozen=True, eq=False)
class RadialBins:
    """Equal-width |q| bins.

    edges: (n_bins + 1,) float64 in Å⁻¹, increasing. pixels: (n_bins,) int64, pixels of the geometry in each
    bin (good or not), or None when unknown (every bin is then taken as live).
    """

    edges: np.ndarray
    pixels: np.ndarray | None = None

    def __post_init__(self):
        edges = np.asarray(self.edges, np.float64)
        if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"bin edges must be an increasing 1D array of at least 2 values, got {edges!r}.")
        object.__setattr__(self, "edges", edges)
        if self.pixels is not None:
            pixels = np.asarray(self.pixels, np.int64)
            if pixels.shape != (edges.size - 1,):
                raise ValueError(f"pixels per bin must have shape {(edges.size - 1,)}, got {pixels.shape}.")
            object.__setattr__(self, "pixels", pixels)

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    @property
    def centres(self) -> np.ndarray:
        """(n_bins,) bin centres, Å⁻¹."""
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def live(self) -> np.ndarray:
        """(n_bins,) bool: bins holding at least one pixel of the geometry (all True when `pixels` is None)."""
        if self.pixels is None:
            return np.ones(self.n_bins, bool)
        return self.pixels > 0


def make_radial_bins(
    q_abs: np.ndarray, width: float = 0.005, q_max: float | None = None, q_min: float | None = None
) -> tuple[RadialBins, np.ndarray]:
    """|q| bins of `width` Å⁻¹ and each pixel's bin.

    q_abs: (P,) |q| of every pixel in Å⁻¹ (NaN allowed: no bin). The edges lie on multiples of `width`, from the
    multiple at or below q_min (default: the smallest finite |q|) to the first multiple at or above q_max
    (default: the largest |q|), so curves from different geometries share their bin centres. The last bin is
    closed on the right (a pixel at exactly q_max is counted).

    Returns (RadialBins (with the pixel count per bin), bin_index (P,) int32, -1 for pixels below q_min, above
    q_max or with non-finite |q|).
    """
    if not width > 0:
        raise ValueError(f"bin width must be positive, got {width}.")
    q_abs = np.asarray(q_abs, np.float64).reshape(-1)
    finite = np.isfinite(q_abs)
    if not finite.any():
        raise ValueError("no pixel has a finite |q|.")
    lo = float(q_abs[finite].min()) if q_min is None else float(q_min)
    hi = float(q_abs[finite].max()) if q_max is None else float(q_max)
    if not hi >= lo >= 0:
        raise ValueError(f"need 0 <= q_min <= q_max, got q_min={lo}, q_max={hi} Å⁻¹.")
    k0 = int(np.floor(lo / width))
    # 1e-9 keeps a q_max that is a multiple of width (up to rounding) as the last edge instead of adding a bin.
    n = max(1, int(np.ceil(hi / width - 1e-9)) - k0)
    edges = (k0 + np.arange(n + 1)) * width
    with np.errstate(invalid="ignore"):
        index = np.minimum(np.floor(q_abs / width) - k0, n - 1)
        inside = finite & (q_abs >= lo) & (q_abs <= hi) & (index >= 0)
    bin_index = np.where(inside, index, -1).astype(np.int32)
    pixels = np.bincount(bin_index[inside], minlength=n).astype(np.int64)
    log.debug("%d radial bins of %.4g Å⁻¹ from %.4g to %.4g Å⁻¹", n, width, edges[0], edges[-1])
    return RadialBins(edges, pixels), bin_index


def peak_pixels(module, ss, fs, radius_px: float, shape: tuple[int, int, int] = AGIPD_SHAPE) -> np.ndarray:
    """Flat pixel indices of the discs around peaks.

    module, ss, fs: (n,) peak module (int; negative = padding of a padded peak list, ignored) and sub-pixel
    slow-/fast-scan coordinates (pixel centres at integers, as peakfinder8 and CXI files). The disc is centred
    on the peak's nearest pixel (rint) and holds the pixels whose centres lie within `radius_px` of it (radius 4
    -> 49 pixels), so every peak removes the same pattern whatever its sub-pixel offset. It is clipped at the
    peak's own module edges: never spills into the next module.

    Returns the unique flat indices p = (module·n_ss + ss)·n_fs + fs, sorted, int64.
    """
    module = np.asarray(module, np.int64).reshape(-1)
    ss = np.asarray(ss, np.float64).reshape(-1)
    fs = np.asarray(fs, np.float64).reshape(-1)
    if not module.shape == ss.shape == fs.shape:
        raise ValueError(f"module, ss, fs must have one length, got {module.shape}, {ss.shape}, {fs.shape}.")
    if not radius_px >= 0:
        raise ValueError(f"radius must be >= 0 pixels, got {radius_px}.")
    n_modules, n_ss, n_fs = shape
    use = module >= 0
    module, ss, fs = module[use], ss[use], fs[use]
    if module.size == 0:
        return np.zeros(0, np.int64)
    if module.max() >= n_modules or not (np.isfinite(ss).all() and np.isfinite(fs).all()):
        raise ValueError(f"peaks must lie on modules 0..{n_modules - 1} at finite coordinates.")
    r = int(np.floor(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius_px**2
    dy, dx = dy[inside], dx[inside]
    i = np.rint(ss).astype(np.int64)[:, None] + dy[None]  # (n, disc)
    j = np.rint(fs).astype(np.int64)[:, None] + dx[None]
    ok = (i >= 0) & (i < n_ss) & (j >= 0) & (j < n_fs)
    flat = (module[:, None] * n_ss + i) * n_fs + j
    return np.unique(flat[ok])


@functools.partial(jax.jit, static_argnames="n_bins")
def radial_profiles(frames: jax.Array, weights: jax.Array, bin_index: jax.Array, n_bins: int):
    """Weighted mean of every frame's pixels per |q| bin, all frames in one compiled call.

    frames: (B, P) float32 pixel values (corrected, any unit); weights: (B, P) float32, 0 = excluded (bad pixel,
    peak disc), 1 = used (fractional weights are allowed); bin_index: (P,) int32 from `make_radial_bins`
    (-1 = no bin); n_bins: static. Compiles once per (B, P, n_bins) and dtype.

    Returns (profiles (B, n_bins), counts (B, n_bins) = sum of weights per bin), frames' dtype. A bin with zero
    count has profile 0 and count 0 (see `fill_empty`).
    """
    weights = weights.astype(frames.dtype)
    # Unbinned pixels (-1) go to an extra segment that is dropped, rather than a masked scatter.
    idx = jnp.where(bin_index >= 0, bin_index, n_bins)

    def one(frame, weight):
        s = jax.ops.segment_sum(frame * weight, idx, num_segments=n_bins + 1)[:n_bins]
        c = jax.ops.segment_sum(weight, idx, num_segments=n_bins + 1)[:n_bins]
        return jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), 0.0), c

    return jax.vmap(one)(frames, weights)


def fill_empty(profiles: np.ndarray, counts: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
    """Profiles ready for the SVD: bins no pixel of a frame was used in take the value interpolated linearly
    (in bin number) between the frame's nearest filled live bins, constant beyond the first/last one.

    profiles, counts: (B, n_bins) from `radial_profiles`. live: (n_bins,) bool, `RadialBins.live` (default: all
    live); dead bins are 0 in every frame and never serve as neighbours. A frame with no filled live bin stays 0.
    Returns (B, n_bins) float64.
    """
    out = np.array(profiles, np.float64, copy=True)
    if out.ndim != 2 or np.shape(counts) != out.shape:
        raise ValueError(f"profiles and counts must be (B, n_bins) of one shape, got {out.shape}, {np.shape(counts)}.")
    n_frames, n = out.shape
    live = np.ones(n, bool) if live is None else np.asarray(live, bool)
    filled = (np.asarray(counts) > 0) & live[None]
    x = np.arange(n)
    # Vectorised over frames: the nearest filled bin to the left and to the right of every bin.
    left = np.maximum.accumulate(np.where(filled, x, -1), axis=1)
    right = np.minimum.accumulate(np.where(filled, x, n)[:, ::-1], axis=1)[:, ::-1]
    has_l, has_r = left >= 0, right < n
    rows = np.arange(n_frames)[:, None]
    v_l = out[rows, np.clip(left, 0, n - 1)]
    v_r = out[rows, np.clip(right, 0, n - 1)]
    t = np.where(has_l & has_r, (x - left) / np.maximum(right - left, 1), 0.0)
    interp = np.where(has_l & has_r, v_l + t * (v_r - v_l), np.where(has_l, v_l, np.where(has_r, v_r, 0.0)))
    out = np.where(filled, out, interp)
    out[:, ~live] = 0.0
    return out


def _root_weights(weights, n_bins: int) -> np.ndarray:
    """√w (n_bins,) float64 of per-bin weights (None: ones)."""
    if weights is None:
        return np.ones(n_bins)
    w = np.asarray(weights, np.float64)
    if w.shape != (n_bins,) or not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"bin weights must be (n_bins,) = ({n_bins},), finite and >= 0, got shape {w.shape}.")
    return np.sqrt(w)


def gram_update(profiles: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Σ_f (√w ∘ b_f)(√w ∘ b_f)ᵀ over the frames of profiles (B, n_bins): (n_bins, n_bins) float64.

    weights: (n_bins,) per-bin weights, the same for every partial sum. None is the paper's plain SVD of the
    profiles. `RadialBins.pixels` (pixels per bin) makes it the SVD of the background pixel by pixel, i.e.
    each bin weighted by the inverse variance of its mean: without it, the few-pixel bins at the inner edge of
    the detector (tens of pixels against thousands elsewhere) are so noisy that they take over the weaker
    components. Gram matrices of any split of the frames add up to that of all of them (map-reduce; sum
    partials in a fixed order for bit-identical results). Profiles must be finite (see `fill_empty`)."""
    x = np.asarray(profiles, np.float64)
    if x.ndim != 2:
        raise ValueError(f"profiles must be (B, n_bins), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("profiles hold NaN or inf; they would poison the Gram matrix.")
    x = x * _root_weights(weights, x.shape[1])
    return x.T @ x


def background_components(gram: np.ndarray, k: int = 3) -> np.ndarray:
    """The k leading right singular vectors of the stacked (weighted) profiles, from their Gram matrix.

    gram: (n_bins, n_bins) from `gram_update` (summed over all frames). Returns (k, n_bins) float64 orthonormal
    rows, eigenvectors of the k largest eigenvalues (= squared singular values), largest first, each signed so
    that its sum is >= 0 (the SVD fixes no sign). With bin weights they are orthonormal in the weighted space:
    pass the same weights to `reconstruct`."""
    g = np.asarray(gram, np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"the Gram matrix must be square, got shape {g.shape}.")
    if not 1 <= k <= g.shape[0]:
        raise ValueError(f"k must be in 1..{g.shape[0]} (bins), got {k}.")
    values, vectors = np.linalg.eigh(0.5 * (g + g.T))  # symmetrised: partial sums may differ in the last bits
    order = np.argsort(values)[::-1]
    comps = vectors[:, order[:k]].T
    total = values.clip(0).sum()
    if total > 0:
        log.debug("background: %d components explain %.6f of Σ‖b‖²", k, values[order[:k]].clip(0).sum() / total)
    return comps * np.where(comps.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)


def reconstruct(profiles: np.ndarray, components: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Each frame's background profile: profiles (B, n_bins) projected onto the span of components (k, n_bins)
    (orthonormal rows) in the metric of the bin weights (n_bins,) given to `gram_update`, W^-½ V Vᵀ W^½ b
    (plain projection V Vᵀ b for None). Bins of weight 0 come out 0. Returns (B, n_bins) float64."""
    c = np.asarray(components, np.float64)
    x = np.asarray(profiles, np.float64)
    root = _root_weights(weights, c.shape[1])
    y = ((x * root) @ c.T) @ c
    return np.divide(y, root, out=np.zeros_like(y), where=root > 0)


def background_image(profiles: np.ndarray, bins: RadialBins, q_abs: np.ndarray) -> np.ndarray:
    """Per-pixel background (B, P) float32 of each frame's profile (B, n_bins).

    q_abs: (P,) pixel |q| in Å⁻¹ (as given to `make_radial_bins`). Linear interpolation in |q| between the
    centres of the live bins (dead bins, 0 after `fill_empty`, are skipped rather than interpolated towards 0);
    constant between the outermost live centre and the outer bin edge; 0 for pixels outside [edges[0],
    edges[-1]] or with non-finite |q| (the pixels `make_radial_bins` put in no bin, up to a q_min/q_max inside a
    bin)."""
    p = np.asarray(profiles, np.float32)
    if p.ndim != 2 or p.shape[1] != bins.n_bins:
        raise ValueError(f"profiles must be (B, {bins.n_bins}), got shape {p.shape}.")
    q = np.asarray(q_abs, np.float64).reshape(-1)
    live = np.flatnonzero(bins.live)
    if live.size == 0:
        return np.zeros((p.shape[0], q.size), np.float32)
    centres = bins.centres[live]
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(q) & (q >= bins.edges[0]) & (q <= bins.edges[-1])
    qc = np.where(inside, q, centres[0])
    # Interval [centres[j], centres[j+1]] holding each pixel; t clipped to [0, 1] gives the constant ends.
    j = np.clip(np.searchsorted(centres, qc) - 1, 0, max(live.size - 2, 0))
    j1 = np.minimum(j + 1, live.size - 1)
    span = centres[j1] - centres[j]
    t = np.clip((qc - centres[j]) / np.where(span > 0, span, 1.0), 0.0, 1.0).astype(np.float32)
    lo, hi = p[:, live[j]], p[:, live[j1]]
    return np.where(inside[None], lo + t[None] * (hi - lo), np.float32(0.0)).astype(np.float32)
