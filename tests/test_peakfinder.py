"""peakfinder8 (data_pipeline.peakfinder): synthetic Poisson frames with injected Gaussian spots.

Geometry of the small test detector: 4 panels of 128×128 pixels (2×2 ASICs of 64×64 each) tiled as
quadrants around the beam with a 10-pixel gap, so that radial bins span several panels (as on AGIPD);
the background is Poisson with a known radial mean λ(r) = 30 + 300·exp(-r/100) counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from data_pipeline.peakfinder import Peakfinder8Config, find_peaks, find_peaks_batch, radial_statistics

SHAPE = (4, 128, 128)
CFG = Peakfinder8Config(
    min_pixel_count=2, max_pixel_count=200, local_bg_radius=3, max_res=700.0, max_num_peaks=64, max_num_components=256
)


def radius_map(shape=SHAPE, n_cols=2, gap=10):
    """Panels tiled n_cols across (fs) and P/n_cols down (ss), beam at the centre of the tiling; pixels."""
    p, ss, fs = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    n_rows = shape[0] // n_cols
    y = ss + (p // n_cols) * (shape[1] + gap) - (n_rows * (shape[1] + gap) - gap) / 2
    x = fs + (p % n_cols) * (shape[2] + gap) - (n_cols * (shape[2] + gap) - gap) / 2
    return np.hypot(y, x).astype(np.float32)


def background(r):
    return 30.0 + 300.0 * np.exp(-r / 100.0)


def spot_image(shape, panel, ss0, fs0, total, sigma):
    """Expected counts of a 2D Gaussian spot integrated over pixels (ss, fs: pixel centres at integers)."""

    def edges(n, c):
        e = (np.arange(n + 1) - 0.5 - c) / (sigma * np.sqrt(2))
        return np.diff(0.5 * erf(e))

    img = np.zeros(shape)
    img[panel] = total * np.outer(edges(shape[1], ss0), edges(shape[2], fs0))
    return img


def make_frame(spots, *, seed, shape=SHAPE):
    r = radius_map(shape)
    lam = background(r)
    for s in spots:
        lam = lam + spot_image(shape, *s)
    return np.random.default_rng(seed).poisson(lam).astype(np.float32), r


# (panel, ss, fs, total counts, sigma px): well inside ASICs, distinct radii and intensities
CLEAN = [
    (0, 20.3, 30.6, 30000.0, 1.0),
    (0, 100.7, 40.2, 40000.0, 1.0),
    (1, 40.1, 100.4, 30000.0, 1.0),
    (2, 90.5, 20.8, 35000.0, 1.0),
    (3, 30.2, 40.3, 40000.0, 1.0),
    (3, 110.6, 80.7, 25000.0, 1.0),
]


def match(pk, panel, ss0, fs0, tol=1.0):
    n = int(pk.n_peaks)
    d = np.hypot(np.asarray(pk.ss[:n]) - ss0, np.asarray(pk.fs[:n]) - fs0)
    d[np.asarray(pk.panel[:n]) != panel] = np.inf
    hits = np.flatnonzero(d < tol)
    return hits


def test_clean_peaks_found_with_centroid_and_intensity():
    data, r = make_frame(CLEAN, seed=1)
    pk = find_peaks(data, np.ones(SHAPE, bool), r, CFG)
    assert int(pk.n_peaks) == len(CLEAN), "no false positives and no misses"
    for panel, ss0, fs0, total, _ in CLEAN:
        (i,) = match(pk, panel, ss0, fs0)
        assert abs(float(pk.ss[i]) - ss0) < 0.3 and abs(float(pk.fs[i]) - fs0) < 0.3
        # above-threshold pixels hold ≥ 97 % of these spots; Poisson noise ~1 %
        assert float(pk.total_intensity[i]) == pytest.approx(total, rel=0.10)
        assert float(pk.snr[i]) >= CFG.minimum_snr
        assert CFG.min_pixel_count <= int(pk.n_pixels[i]) <= CFG.max_pixel_count
    # sorted by intensity, padding zeroed
    ti = np.asarray(pk.total_intensity)
    assert np.all(np.diff(ti[: len(CLEAN)]) <= 0) and np.all(ti[len(CLEAN) :] == 0)
    assert np.all(np.asarray(pk.panel[len(CLEAN) :]) == -1)


def test_no_false_positives_on_background():
    """8 pure-Poisson frames (8 × 65536 px) at minimum_snr 6: zero peaks, i.e. < 1 per 5e5 px at 95 % (0 of 8)."""
    frames = np.stack([make_frame([], seed=100 + i)[0] for i in range(8)])
    r = radius_map()
    pk = find_peaks_batch(frames, np.ones(SHAPE, bool), r, CFG)
    assert np.all(np.asarray(pk.n_peaks) == 0)


def test_size_limits_and_mask_and_resolution():
    r = radius_map()
    spots = [
        (0, 20.3, 30.6, 30000.0, 1.0),  # clean reference spot
        (1, 96.0, 96.0, 4.0e5, 3.0),  # too large: ~250 pixels above threshold, within one ASIC
        (2, 30.0, 90.0, 25000.0, 1.0),  # masked out
        (3, 120.0, 120.0, 25000.0, 1.0),  # beyond max_res of the config below
    ]
    data, _ = make_frame(spots, seed=2)
    data[1, 40, 20] += 5000.0  # single hot pixel: too small for min_pixel_count 2
    mask = np.ones(SHAPE, bool)
    mask[2, 24:37, 84:97] = False
    cfg = Peakfinder8Config(**{**CFG.__dict__, "max_res": float(r[3, 120, 120]) - 5.0})
    pk = find_peaks(data, mask, r, cfg)
    assert int(pk.n_peaks) == 1
    assert len(match(pk, 0, 20.3, 30.6)) == 1
    # the large spot is seen as one component (counted) but rejected by size
    big = find_peaks(data, mask, r, Peakfinder8Config(**{**cfg.__dict__, "max_pixel_count": 2000}))
    assert len(match(big, 1, 96.0, 96.0)) == 1 and int(big.n_pixels[match(big, 1, 96.0, 96.0)[0]]) > 200
    # min_res: excluding the inner spot's radius removes it
    cfg_in = Peakfinder8Config(**{**CFG.__dict__, "min_res": float(r[0, 20, 30]) + 10.0})
    assert len(match(find_peaks(data, mask, r, cfg_in), 0, 20.3, 30.6)) == 0


def test_masked_pixels_do_not_enter_statistics():
    """A masked huge outlier ring must not change the radial statistics (or create peaks)."""
    data, r = make_frame([], seed=3)
    mask = np.ones(SHAPE, bool)
    mask[1, :, 60:64] = False
    bad = data.copy()
    bad[1, :, 60:64] = 1e6
    a = radial_statistics(data, mask, r, CFG)
    b = radial_statistics(bad, mask, r, CFG)
    np.testing.assert_array_equal(np.asarray(a.offset), np.asarray(b.offset))
    assert int(find_peaks(bad, mask, r, CFG).n_peaks) == 0


def test_spot_on_asic_border_is_split_like_reference():
    """A spot centred on the ss boundary between ASICs (63|64) is two components, one per ASIC: the
    reference never flood-fills across ASIC borders, and each half's centroid lies inside its ASIC."""
    data, r = make_frame([(0, 63.5, 30.4, 40000.0, 1.0)], seed=4)
    pk = find_peaks(data, np.ones(SHAPE, bool), r, CFG)
    n = int(pk.n_peaks)
    assert n == 2
    ss = np.sort(np.asarray(pk.ss[:n]))
    assert ss[0] <= 63.0 and ss[1] >= 64.0
    np.testing.assert_allclose(np.asarray(pk.fs[:n]), 30.4, atol=0.3)
    # each half carries about half of the spot
    np.testing.assert_allclose(np.asarray(pk.total_intensity[:n]), 20000.0, rtol=0.15)


def test_radial_statistics_match_numpy_reference():
    data, r = make_frame(CLEAN, seed=5)
    mask = np.ones(SHAPE, bool)
    mask[0, :10] = False
    st = radial_statistics(data, mask, r, CFG)

    # straightforward float64 numpy transcription of the reference's clipping loop
    nb = CFG.n_radial_bins
    good = mask & (r >= CFG.min_res) & (r < CFG.max_res)
    b = np.clip(np.rint(r), 0, nb - 1).astype(int)[good]
    v = data[good].astype(np.float64)
    upper, lower = np.full(nb, 1e9), np.full(nb, -1e9)
    for _ in range(CFG.n_sigma_clip_iterations):
        k = (v < upper[b]) & (v > lower[b])
        cnt = np.bincount(b[k], minlength=nb)
        s1 = np.bincount(b[k], v[k], minlength=nb)
        s2 = np.bincount(b[k], v[k] ** 2, minlength=nb)
        nz = cnt > 0
        off = np.where(nz, s1 / np.maximum(cnt, 1), 0.0)
        sig = np.where(nz, np.sqrt(np.maximum(s2 / np.maximum(cnt, 1) - off**2, 0)), 0.0)
        upper = np.where(nz, np.maximum(off + CFG.minimum_snr * sig, CFG.adc_threshold), np.finfo(np.float32).max)
        lower = np.where(nz, off - CFG.minimum_snr * sig, np.finfo(np.float32).tiny)
    used = cnt > 50
    assert used.sum() > 100
    np.testing.assert_array_equal(np.asarray(st.n_pixels), cnt)
    np.testing.assert_allclose(np.asarray(st.offset)[used], off[used], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.sigma)[used], sig[used], rtol=1e-3)
    # physics: the clipped offset follows the injected radial profile λ(r) within the Poisson error
    rc = np.flatnonzero(used)
    # (the Poisson mean of a bin differs from λ at its centre by ≤ |dλ/dr|·0.5 px of spread, < 1.5 counts here)
    tol = 5 * np.sqrt(background(rc) / cnt[used]) + 1.5
    assert np.all(np.abs(off[used] - background(rc)) < tol)


def test_jit_second_call_does_not_recompile_and_vmap_matches_loop():
    frames = np.stack([make_frame(CLEAN[i:], seed=10 + i)[0] for i in range(3)])
    r, mask = radius_map(), np.ones(SHAPE, bool)
    find_peaks(frames[0], mask, r, CFG)
    before = find_peaks._cache_size()
    loop = [find_peaks(f, mask, r, CFG) for f in frames]
    assert find_peaks._cache_size() == before
    batch = find_peaks_batch(frames, mask, r, CFG)
    for i, single in enumerate(loop):
        for name, a, bb in zip(single._fields, single, batch, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(bb)[i], rtol=1e-6, atol=1e-4, err_msg=name)
    assert [int(x) for x in batch.n_peaks] == [len(CLEAN) - i for i in range(3)]


def test_agipd_shape_background_frame():
    """A full AGIPD-1M frame (16, 512, 128) of Poisson background: no peaks; one clean spot is found."""
    shape = (16, 512, 128)
    r = radius_map(shape, n_cols=8, gap=4)  # 2 rows of 8 modules around the beam
    lam = background(r) + spot_image(shape, 5, 200.4, 70.6, 20000.0, 1.0)
    data = np.random.default_rng(6).poisson(lam).astype(np.float32)
    cfg = Peakfinder8Config(max_res=float(r.max()) + 1)
    pk = find_peaks(jnp.asarray(data), jnp.ones(shape, bool), jnp.asarray(r), cfg)
    assert int(pk.n_peaks) == 1
    assert int(pk.panel[0]) == 5
    assert abs(float(pk.ss[0]) - 200.4) < 0.3 and abs(float(pk.fs[0]) - 70.6) < 0.3
    assert jax.numpy.isfinite(pk.snr[0])


# --- precomputed radial binning and compacted-candidate fast path -------------------------------------------


def _assert_same_peaks(a, b, rtol=1e-5, atol=1e-3):
    for name, x, y in zip(a._fields, a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=name)


def test_binning_path_matches_scatter_path():
    """make_binning + the sorted-layout statistics give the same statistics and peaks as the plain path."""
    from data_pipeline.peakfinder import make_binning

    data, r = make_frame([*CLEAN, (1, 63.5, 30.4, 40000.0, 1.0)], seed=21)
    mask = np.ones(SHAPE, bool)
    mask[0, :10] = False
    mask[2, 24:37, 84:97] = False
    for cfg in (CFG, Peakfinder8Config(**{**CFG.__dict__, "min_res": 40.0, "max_res": 160.0})):
        bn = make_binning(r, mask, cfg)
        a, b = radial_statistics(data, mask, r, cfg), radial_statistics(data, mask, r, cfg, binning=bn)
        np.testing.assert_array_equal(np.asarray(a.n_pixels), np.asarray(b.n_pixels))
        np.testing.assert_allclose(np.asarray(a.offset), np.asarray(b.offset), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(a.sigma), np.asarray(b.sigma), rtol=1e-3, atol=1e-4)
        _assert_same_peaks(find_peaks(data, mask, r, cfg), find_peaks(data, mask, r, cfg, binning=bn))
    pk = find_peaks(data, mask, r, CFG, binning=make_binning(r, mask, CFG))
    assert int(pk.n_peaks) == len(CLEAN) + 2


def test_candidate_overflow_falls_back_to_whole_frame():
    """More candidate pixels than max_num_candidates: the whole-frame path gives identical results."""
    frames = np.stack([make_frame(CLEAN[i:], seed=30 + i)[0] for i in range(2)])
    r, mask = radius_map(), np.ones(SHAPE, bool)
    small = Peakfinder8Config(**{**CFG.__dict__, "max_num_candidates": 8})
    for f in frames:
        _assert_same_peaks(find_peaks(f, mask, r, CFG), find_peaks(f, mask, r, small), rtol=0, atol=0)
    _assert_same_peaks(find_peaks_batch(frames, mask, r, CFG), find_peaks_batch(frames, mask, r, small), rtol=0, atol=0)
    # under an outer jit the fallback is a lax.cond
    jitted = jax.jit(lambda f: find_peaks(f, mask, r, small))
    _assert_same_peaks(find_peaks(frames[0], mask, r, CFG), jitted(frames[0]), rtol=0, atol=0)
