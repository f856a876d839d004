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


def test_binning_layout_holds_every_good_pixel_once_in_rows_of_one_bin():
    from data_pipeline.peakfinder import make_binning

    _, r = make_frame(CLEAN, seed=21)
    mask = np.random.default_rng(2).random(SHAPE) > 0.05
    cfg = Peakfinder8Config(**{**CFG.__dict__, "min_res": 20.0, "max_res": 150.0})
    bn = make_binning(r, mask, cfg)
    pixels, row_bin, row_len = (np.asarray(x) for x in (bn.pixels, bn.row_bin, bn.row_len))
    assert ((pixels >= 0) & (pixels < r.size)).all()  # every entry in bounds, padding included
    in_row = np.arange(pixels.shape[1]) < row_len[:, None]
    good = np.flatnonzero(mask & (r >= 20.0) & (r <= 150.0))
    np.testing.assert_array_equal(np.sort(pixels[in_row]), good)  # every good pixel exactly once
    bins = np.asarray(bn.bins).ravel()
    assert ((bins[pixels] == row_bin[:, None]) | ~in_row).all()  # one bin per row
    partial = row_len < pixels.shape[1]
    assert len(np.unique(row_bin[partial])) == partial.sum()  # at most one partial row per bin
    assert (np.diff(pixels[:, 0]) > 0).all()  # rows in the order of their first pixel


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


def test_candidate_and_component_tiers_match_whole_frame_path():
    """Frames of few and of many candidates/components take different static sizes inside one program (a
    lax.switch on the counts); each gives exactly the whole-frame path's peaks. The crowded frame has ~2,700
    candidate pixels (the 4096 list) and 133 components (the second measuring size)."""
    from data_pipeline.peakfinder import _find_peaks_one, _paths

    rng = np.random.default_rng(5)
    many = [(int(rng.integers(4)), *rng.uniform(4, 124, 2), float(rng.uniform(2e4, 4e4)), 1.0) for _ in range(150)]
    frames = np.stack([make_frame(CLEAN, seed=40)[0], make_frame(many, seed=41)[0]])
    r, mask = radius_map(), np.ones(SHAPE, bool)
    tiers = _paths(CFG)
    assert tiers == (1024, 4096, CFG.max_num_candidates)
    for f in frames:
        pk, overflow = _find_peaks_one(f, mask, r, CFG, None, tiers)
        assert not bool(overflow)
        _assert_same_peaks(pk, _find_peaks_one(f, mask, r, CFG, None, ())[0], rtol=0, atol=0)
    dense = find_peaks(frames[1], mask, r, CFG)
    assert int(dense.n_components) > 128  # the second component tier was used
    batch = find_peaks_batch(frames, mask, r, CFG)
    for i, f in enumerate(frames):
        _assert_same_peaks(jax.tree.map(lambda x, i=i: x[i], batch), find_peaks(f, mask, r, CFG), rtol=0, atol=0)


# --- agreement with a plain numpy transcription of the reference (OM / CrystFEL peakfinder8) -------------------


def reference_peakfinder8(data, mask, r, cfg):
    """Straight float32 transcription of OM 23.8.3's peakfinder8 (C) on the stacked (P·ss, fs) layout:
    radial sigma clipping, seeds in the ASIC interior in scan order, flood fill, local background disc,
    re-integration and cuts. Without OM's one-past-the-end read of the flood-fill list (see the module docs).
    Returns a list of (panel, ss, fs, total, npix)."""
    f32 = np.float32
    p_, s_, f_ = data.shape
    data, r = data.reshape(p_ * s_, f_).astype(f32), r.reshape(p_ * s_, f_)
    good = mask.reshape(p_ * s_, f_) & (r >= cfg.min_res) & (r <= cfg.max_res)
    rb = np.rint(r).astype(int)
    nb = rb.max() + 1
    up, lo = np.full(nb, 1e9, f32), np.full(nb, -1e9, f32)
    v, b = data[good], rb[good]
    for _ in range(cfg.n_sigma_clip_iterations):
        k = (v < up[b]) & (v > lo[b])
        cnt = np.bincount(b[k], minlength=nb)
        s1 = np.bincount(b[k], v[k], minlength=nb)
        s2 = np.bincount(b[k], v[k].astype(np.float64) ** 2, minlength=nb)
        nz = cnt > 0
        off = np.where(nz, s1 / np.maximum(cnt, 1), 0).astype(f32)
        sig = np.sqrt(np.maximum(np.where(nz, s2 / np.maximum(cnt, 1), 0) - off.astype(np.float64) ** 2, 0)).astype(f32)
        up = np.where(nz, np.maximum(off + f32(cfg.minimum_snr) * sig, f32(cfg.adc_threshold)), f32(3.4028235e38))
        lo = np.where(nz, off - f32(cfg.minimum_snr) * sig, f32(1.1754944e-38))
        up, lo = up.astype(f32), lo.astype(f32)
    thr, offset = up[rb], off[rb]
    cand = good & (data > thr)
    visited = np.zeros(cand.shape, bool)
    a_ss, a_fs = cfg.asic_shape
    peaks = []
    for y0 in range(0, p_ * s_, a_ss):
        for x0 in range(0, f_, a_fs):
            seeds = np.argwhere(cand[y0 + 1 : y0 + a_ss - 1, x0 + 1 : x0 + a_fs - 1]) + 1
            for sy, sx in seeds:
                if visited[y0 + sy, x0 + sx]:
                    continue
                pix, stack = [], [(y0 + sy, x0 + sx)]
                visited[y0 + sy, x0 + sx] = True
                while stack:  # flood fill inside the ASIC
                    y, x = stack.pop()
                    pix.append((y, x))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            yy, xx = y + dy, x + dx
                            inside = y0 <= yy < y0 + a_ss and x0 <= xx < x0 + a_fs
                            if inside and cand[yy, xx] and not visited[yy, xx]:
                                visited[yy, xx] = True
                                stack.append((yy, xx))
                pix.sort()
                if not cfg.min_pixel_count <= len(pix) <= cfg.max_pixel_count:
                    continue
                ys, xs = np.array(pix).T
                vals = data[ys, xs]
                net = (vals - offset[ys, xs]).astype(f32)
                s_net = f32(net.sum(dtype=f32))
                cy = int(np.rint(f32((net * ys.astype(f32)).sum(dtype=f32)) / abs(s_net))) - y0
                cx = int(np.rint(f32((net * xs.astype(f32)).sum(dtype=f32)) / abs(s_net))) - x0
                bg = []
                rw = 2 * cfg.local_bg_radius
                for dy in range(-rw, rw):
                    for dx in range(-rw, rw):
                        yy, xx = cy + dy, cx + dx
                        if 0 <= yy < a_ss and 0 <= xx < a_fs and dy * dy + dx * dx <= rw * rw:
                            yy, xx = yy + y0, xx + x0
                            if good[yy, xx] and data[yy, xx] < thr[yy, xx]:
                                bg.append(data[yy, xx])
                bg = np.array(bg, f32)
                if bg.size:
                    loc = f32(bg.sum(dtype=f32) / f32(bg.size))
                    var = f32((bg * bg).sum(dtype=f32) / f32(bg.size) - loc * loc)
                    sigma, bg_max = (np.sqrt(var) if var >= 0 else f32(0.01)), max(float(bg.max()), 0.0)
                else:
                    loc, sigma, bg_max = offset[cy + y0, cx + x0], f32(0.01), 0.0
                total = f32((vals - loc).sum(dtype=f32))
                raw = f32(vals.sum(dtype=f32))
                com_y = f32((vals * ys.astype(f32)).sum(dtype=f32)) / abs(raw)
                com_x = f32((vals * xs.astype(f32)).sum(dtype=f32)) / abs(raw)
                snr = total / sigma if abs(sigma) > 1e-10 else 0.0
                if snr < cfg.minimum_snr or max(float(vals.max() - loc), 0.0) < bg_max - loc:
                    continue
                if not (y0 <= com_y <= y0 + a_ss - 1 and x0 <= com_x <= x0 + a_fs - 1):
                    continue
                peaks.append((int(com_y) // s_, float(com_y) % s_, float(com_x), float(total), len(pix)))
    return peaks


def _photon_frame(seed, shape=SHAPE):
    """Sparse photon counts (λ ≈ 0.05–0.3) with a few 5-nm-crystal-like blobs: integer data, many 2-pixel
    components, thresholds that fall on integers and centroids on .5 (the reference's tie rules matter)."""
    r = radius_map(shape)
    rng = np.random.default_rng(seed)
    lam = 0.05 + 0.25 * np.exp(-r / 150.0)
    for _ in range(12):
        p, ss0, fs0 = rng.integers(shape[0]), rng.uniform(3, shape[1] - 3), rng.uniform(3, shape[2] - 3)
        lam = lam + spot_image(shape, p, ss0, fs0, rng.uniform(10, 60), 1.5)
    return rng.poisson(lam).astype(np.float32), r


@pytest.mark.parametrize("kind", ["spots", "photons"])
def test_matches_numpy_reference_transcription(kind):
    """Same peaks (position, total, pixel count) as the float32 numpy transcription of the reference, on
    Poisson spots and on sparse photon frames (where ties in thresholds and centroids are common)."""
    if kind == "spots":
        data, r = make_frame([*CLEAN, (1, 63.5, 30.4, 40000.0, 1.0), (2, 5.0, 1.0, 20000.0, 0.8)], seed=40)
        cfg = CFG
    else:
        data, r = _photon_frame(41)
        cfg = Peakfinder8Config(**{**CFG.__dict__, "max_res": float(np.ceil(r.max())), "minimum_snr": 5.0})
    mask = np.ones(SHAPE, bool)
    mask[3, 70:75, 10:20] = False
    ref = sorted(reference_peakfinder8(data, mask, r, cfg))
    pk = find_peaks(data, mask, r, cfg)
    n = int(pk.n_peaks)
    ours = sorted(
        zip(
            *(np.asarray(x[:n]).tolist() for x in (pk.panel, pk.ss, pk.fs, pk.total_intensity, pk.n_pixels)),
            strict=True,
        )
    )
    assert len(ref) >= 6 and len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a[0] == b[0] and a[4] == b[4]
        np.testing.assert_allclose(a[1:4], b[1:4], rtol=1e-4, atol=2e-3)


def test_background_pixels_strictly_below_threshold():
    """A disc pixel exactly at its bin's threshold is not background (reference: value < threshold): the
    peak's local σ is that of the pixel raised above the threshold, not that of one just below it."""
    r = radius_map()
    data = np.zeros(SHAPE, np.float32)
    data[0, 1::2, :] = 0.5  # every other row 0.5: radial σ 0.25, thresholds set by adc_threshold = 3
    data[0, 30, 30:32] = 9.0  # a 2-pixel peak
    cfg = Peakfinder8Config(**{**CFG.__dict__, "adc_threshold": 3.0, "minimum_snr": 2.0})

    def sigma_with(value):
        data[0, 33, 30] = value  # inside the background disc (radius 6 around (30, 30))
        pk = find_peaks(data, np.ones(SHAPE, bool), r, cfg)
        assert int(pk.n_peaks) == 1
        return float(pk.local_sigma[0])

    at, above, below = sigma_with(3.0), sigma_with(3.5), sigma_with(2.9)
    assert at == above and abs(at - below) > 1e-3


def test_max_res_is_inclusive_like_reference():
    """OM keeps pixels with min_res <= r <= max_res."""
    r = radius_map()
    data, _ = make_frame([], seed=50)
    edge = float(r[0, 0, 0])
    cfg = Peakfinder8Config(**{**CFG.__dict__, "max_res": edge})
    st = radial_statistics(data, np.ones(SHAPE, bool), r, cfg)
    assert int(np.asarray(st.n_pixels).sum()) == int(np.sum(r <= np.float32(edge)))


def test_fast_mode_uses_evenly_spaced_subsample():
    """radial_pixels_per_bin = N: each bin's statistics come from at most N pixels, evenly spaced in raster
    order (numpy check); with and without an explicit binning the results agree; clean spots are found."""
    from data_pipeline.peakfinder import make_binning

    data, r = make_frame(CLEAN, seed=60)
    mask = np.ones(SHAPE, bool)
    cfg = Peakfinder8Config(**{**CFG.__dict__, "radial_pixels_per_bin": 50})
    st = radial_statistics(data, mask, r, cfg)
    counts = np.asarray(st.n_pixels)
    assert counts.max() <= 50 and (counts == 50).sum() > 100
    # numpy: the first pass (every pixel kept) of a bin is the mean of its evenly spaced subsample
    b = np.rint(r).astype(int).ravel()
    big = int(np.argmax(np.bincount(b)))
    idx = np.flatnonzero(b == big)
    c = idx.size
    chosen = idx[[j for j in range(c) if (j + 1) * 50 // c > j * 50 // c]]
    one = Peakfinder8Config(**{**cfg.__dict__, "n_sigma_clip_iterations": 1})
    assert float(radial_statistics(data, mask, r, one).offset[big]) == pytest.approx(
        data.ravel()[chosen].mean(), rel=1e-5
    )
    pk = find_peaks(data, mask, r, cfg)
    _assert_same_peaks(pk, find_peaks(data, mask, r, cfg, binning=make_binning(r, mask, cfg)))
    assert int(pk.n_peaks) == len(CLEAN)
