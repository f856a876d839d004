"""Diffuse background of indexed frames: radial profiles with peak neighbourhoods excluded, and their SVD.

The paper (Methods, "3D intensity generation"): "the radial average for each pattern was calculated,
excluding outlier values from the vicinity of Bragg peaks, generating a 1D array depicting the background
variation with respect to |q| for each frame. Following this, SVD was applied on these 1D feature arrays, with
the first three components employed to reconstruct the background."

Here: each frame's profile b_f (n_bins,) is the weighted mean of its pixels in |q| bins (pixels near found
peaks and bad pixels have weight 0). Stacking them as X (n_frames, n_bins), the right singular vectors of X
are the eigenvectors of the Gram matrix G = Xᵀ X = Σ_f b_f b_fᵀ, which adds up over frames (map-reduce, any
run length in constant memory). The background of frame f is the projection of b_f onto the first k of
them, V_k V_kᵀ b_f, which keeps what varies smoothly from frame to frame (ring strength, fluence, water) and
drops each frame's own noise and residual Bragg intensity. A frame's pixel background is its profile
interpolated linearly in |q| between bin centres (no steps at bin edges).

A bin with no usable pixel in a frame (detector gaps at that |q|) takes the value interpolated from the
frame's filled neighbours, so it neither pulls the Gram matrix towards zero nor biases the projection.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RadialBins:
    """|q| bins: edges (n_bins + 1,) in Å⁻¹, equal width."""

    edges: np.ndarray

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    @property
    def centres(self) -> np.ndarray:
        """(n_bins,) bin centres, Å⁻¹."""
        return 0.5 * (self.edges[1:] + self.edges[:-1])


def make_radial_bins(q_abs: np.ndarray, width: float = 0.005, q_max: float | None = None):
    """Bins of `width` Å⁻¹ from 0 to q_max (default the largest |q|) and each pixel's bin, (P,) int32, -1 for
    pixels beyond q_max. Returns (RadialBins, bin_index)."""
    if not width > 0:
        raise ValueError(f"bin width must be positive, got {width}.")
    q_abs = np.asarray(q_abs, np.float64)
    top = float(q_abs.max()) if q_max is None else float(q_max)
    n = max(1, int(np.ceil(top / width)))
    edges = np.arange(n + 1) * width
    index = np.floor(q_abs / width).astype(np.int64)
    index = np.where((index >= 0) & (index < n) & (q_abs <= top), index, -1).astype(np.int32)
    return RadialBins(edges), index


def peak_pixels(module, ss, fs, radius_px: float, shape: tuple[int, int, int] = (16, 512, 128)) -> np.ndarray:
    """Flat pixel indices (p = (module·n_ss + ss)·n_fs + fs; unique, int64) within `radius_px` of the peaks
    (module (n,), ss (n,), fs (n,) sub-pixel coordinates, pixel centres at integers): a disc around each
    peak's nearest pixel, clipped at its module's edges (never spilling into another module)."""
    module = np.asarray(module, np.int64)
    if module.size == 0:
        return np.zeros(0, np.int64)
    _, n_ss, n_fs = shape
    r = int(np.floor(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius_px**2
    dy, dx = dy[inside], dx[inside]
    i = np.rint(np.asarray(ss, np.float64)).astype(np.int64)[:, None] + dy[None]
    j = np.rint(np.asarray(fs, np.float64)).astype(np.int64)[:, None] + dx[None]
    ok = (i >= 0) & (i < n_ss) & (j >= 0) & (j < n_fs)
    flat = (module[:, None] * n_ss + i) * n_fs + j
    return np.unique(flat[ok])


@functools.partial(jax.jit, static_argnames="n_bins")
def radial_profiles(frames: jax.Array, weights: jax.Array, bin_index: jax.Array, n_bins: int):
    """Weighted mean of every frame's pixels per |q| bin.

    frames: (B, P) intensities; weights: (B, P) (0 = excluded); bin_index: (P,) int32 (-1 = no bin).
    Returns (profiles (B, n_bins), counts (B, n_bins) = sum of weights); a bin with zero count has profile 0.
    """
    idx = jnp.where(bin_index >= 0, bin_index, n_bins)  # the extra segment collects unbinned pixels

    def one(frame, weight):
        s = jax.ops.segment_sum(frame * weight, idx, num_segments=n_bins + 1)[:n_bins]
        c = jax.ops.segment_sum(weight, idx, num_segments=n_bins + 1)[:n_bins]
        return jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), 0.0), c

    return jax.vmap(one)(frames, weights)


def fill_empty(profiles: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Profiles (B, n_bins) with bins of zero count replaced by linear interpolation between the frame's
    filled bins (constant beyond the first/last filled bin); an all-empty frame stays 0."""
    out = np.array(profiles, np.float64, copy=True)
    x = np.arange(out.shape[1])
    for f in range(out.shape[0]):
        filled = counts[f] > 0
        if filled.any() and not filled.all():
            out[f, ~filled] = np.interp(x[~filled], x[filled], out[f, filled])
    return out


def gram_update(profiles: np.ndarray) -> np.ndarray:
    """Σ_f b_f b_fᵀ over the frames of profiles (B, n_bins), float64 (n_bins, n_bins): partial Gram matrices
    of any split of the frames add up to the whole one."""
    x = np.asarray(profiles, np.float64)
    return x.T @ x


def background_components(gram: np.ndarray, k: int = 3) -> np.ndarray:
    """The k leading right singular vectors of the stacked profiles, (k, n_bins) orthonormal rows, from their
    Gram matrix (eigenvectors of largest eigenvalue; sign fixed so each row sums to >= 0)."""
    values, vectors = np.linalg.eigh(np.asarray(gram, np.float64))
    comps = vectors[:, np.argsort(values)[::-1][:k]].T
    return comps * np.where(comps.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)


def reconstruct(profiles: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Projection of profiles (B, n_bins) onto the span of components (k, n_bins): (B, n_bins)."""
    c = np.asarray(components, np.float64)
    return (np.asarray(profiles, np.float64) @ c.T) @ c


def background_image(profiles: np.ndarray, bins: RadialBins, q_abs: np.ndarray) -> np.ndarray:
    """Per-pixel background (B, P) float32: each frame's profile (B, n_bins) interpolated linearly in |q|
    (pixels at q_abs (P,) Å⁻¹) between bin centres, constant beyond the first and last centre."""
    centres = bins.centres
    q = np.asarray(q_abs, np.float64)
    hi = np.clip(np.searchsorted(centres, q), 1, len(centres) - 1) if len(centres) > 1 else np.zeros(q.shape, int)
    if len(centres) == 1:
        return np.repeat(np.asarray(profiles, np.float32)[:, :1], q.size, axis=1)
    lo = hi - 1
    t = np.clip((q - centres[lo]) / (centres[hi] - centres[lo]), 0.0, 1.0).astype(np.float32)
    p = np.asarray(profiles, np.float32)
    return p[:, lo] * (1.0 - t) + p[:, hi] * t
