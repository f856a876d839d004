"""Radial background profiles and their SVD (data_pipeline.background), and the ordered map-reduce with
checkpoints (data_pipeline.scaleout). The powder curves are tested in test_powder.py."""

import numpy as np
import pytest

from data_pipeline import background as bg
from data_pipeline import scaleout
from jaxpolaron.errors import InputError


def _pixels(rng, n=4000, q_max=0.8, width=0.02):
    """A fabricated flat detector: n pixels uniform over a disc of radius q_max Å⁻¹ (so more pixels at high |q|,
    and bins near 0 may hold none)."""
    q = np.sqrt(rng.uniform(0, q_max**2, n))
    bins, index = bg.make_radial_bins(q, width)
    return q, bins, index


def _shapes(q):
    """Three smooth radial shapes (3, ...): a ring at 0.2 Å⁻¹, a falling solvent term, a constant."""
    return np.stack([np.exp(-((q - 0.2) ** 2) / (2 * 0.03**2)), np.exp(-q / 0.3), np.ones_like(q)])


def _profiles(frames, weights, index, bins):
    prof, count = bg.radial_profiles(frames.astype(np.float32), weights.astype(np.float32), index, bins.n_bins)
    return np.asarray(prof, np.float64), np.asarray(count, np.float64)


# ------------------------------------------------------------------------------------------------ bins
def test_radial_bins_are_aligned_and_cover_every_pixel():
    q = np.array([0.0312, 0.05, 0.0999, 0.1, np.nan, 0.2])
    bins, index = bg.make_radial_bins(q, 0.01)
    np.testing.assert_allclose(bins.edges, np.arange(3, 21) * 0.01)  # multiples of the width
    assert index.dtype == np.int32
    assert index.tolist() == [0, 2, 6, 7, -1, 16]  # the largest |q| is in the last (closed) bin, NaN in none
    assert bins.pixels.sum() == 5 and bins.live.sum() == 5
    _, index = bg.make_radial_bins(q, 0.01, q_max=0.1, q_min=0.04)
    assert index.tolist() == [-1, 1, 5, 5, -1, -1]  # below q_min, above q_max: no bin; q_max is in the last bin
    with pytest.raises(ValueError):
        bg.make_radial_bins(q, 0.0)


def test_radial_profiles_are_weighted_bin_means_and_compile_once():
    rng = np.random.default_rng(1)
    q, bins, index = _pixels(rng)
    frames = rng.normal(size=(3, q.size)).astype(np.float32)
    weights = (rng.random((3, q.size)) > 0.2).astype(np.float32)
    prof, count = _profiles(frames, weights, index, bins)
    for f in range(3):
        for b in range(bins.n_bins):
            sel = (index == b) & (weights[f] > 0)
            assert count[f, b] == sel.sum()
            assert prof[f, b] == pytest.approx(frames[f, sel].mean() if sel.any() else 0.0, abs=1e-5)
    before = bg.radial_profiles._cache_size()
    _profiles(frames + 1.0, 1.0 - weights, index, bins)  # same shapes: nothing compiles
    assert bg.radial_profiles._cache_size() == before


# ------------------------------------------------------------------------------------------------ peak discs
def test_peak_pixels_disc_and_module_edges():
    shape = (16, 512, 128)
    inner = bg.peak_pixels([3], [100.2], [60.4], 4.0, shape)
    assert len(inner) == 49  # integer (dy, dx) with dy² + dx² <= 16 around the nearest pixel (100, 60)
    m, s, f = np.unravel_index(inner, shape)
    assert set(m) == {3} and np.hypot(s - 100, f - 60).max() <= 4.0
    edge = bg.peak_pixels([5], [511.4], [0.2], 4.0, shape)  # a module corner: a quarter disc, nothing spills
    m, s, f = np.unravel_index(edge, shape)
    assert set(m) == {5} and len(edge) == 17 and s.min() >= 507 and f.max() <= 4
    both = bg.peak_pixels([3, 3, -1], [100.2, 101.0, 0.0], [60.4, 60.0, 0.0], 4.0, shape)  # -1: padding
    assert set(inner) <= set(both) and len(both) == len(np.unique(both)) < 2 * 49
    assert len(bg.peak_pixels([], [], [], 4.0, shape)) == 0
    with pytest.raises(ValueError):
        bg.peak_pixels([16], [1.0], [1.0], 4.0, shape)


def test_peak_pixels_match_brute_force():
    rng = np.random.default_rng(2)
    shape = (4, 40, 30)
    module = rng.integers(0, 4, 12)
    ss, fs = rng.uniform(-0.4, 39.4, 12), rng.uniform(-0.4, 29.4, 12)
    got = bg.peak_pixels(module, ss, fs, 2.5, shape)
    m, s, f = np.unravel_index(np.arange(np.prod(shape)), shape)
    near = np.zeros(m.size, bool)
    for k in range(12):
        near |= (m == module[k]) & ((s - np.rint(ss[k])) ** 2 + (f - np.rint(fs[k])) ** 2 <= 2.5**2)
    np.testing.assert_array_equal(got, np.flatnonzero(near))


def test_excluding_peak_pixels_removes_bragg_spots_from_the_profile():
    """Bright Gaussian spots (σ = 1 pixel, 1000× the background) on a smooth radial background: with the
    radius-4 discs excluded the profile is the spot-free one; without, it is far off."""
    shape = (2, 64, 32)
    m, ss, fs = np.unravel_index(np.arange(np.prod(shape)), shape)
    q = np.hypot(ss - 10.0 + 80.0 * m, fs - 16.0) / 200.0  # a fabricated |q| per pixel (0 to ~0.8 Å⁻¹)
    bins, index = bg.make_radial_bins(q, 0.05)
    smooth = 1.0 + 3.0 * q
    peaks = (np.array([0, 0, 1, 1]), np.array([30.3, 45.0, 20.6, 0.4]), np.array([7.8, 20.2, 3.1, 30.9]))
    spotted = smooth.copy()
    for k in range(4):
        r2 = (ss - peaks[1][k]) ** 2 + (fs - peaks[2][k]) ** 2
        spotted += np.where(m == peaks[0][k], 1000.0 * np.exp(-0.5 * r2), 0.0)
    keep = np.ones((1, q.size))
    keep[0, bg.peak_pixels(*peaks, 4.0, shape)] = 0.0
    clean, _ = _profiles(smooth[None], np.ones_like(keep), index, bins)  # spot-free, every pixel
    masked, _ = _profiles(spotted[None], keep, index, bins)
    raw, _ = _profiles(spotted[None], np.ones_like(keep), index, bins)
    # Left: the spot tails beyond ~4σ (1000·e⁻⁸ ≈ 0.3 per pixel) and the missing discs' share of the ramp.
    np.testing.assert_allclose(masked, clean, rtol=0.015)
    assert np.max(raw / clean) > 1.3


# ------------------------------------------------------------------------------------------------ SVD
def test_rank_three_background_is_recovered_and_matches_numpy_svd():
    """Frames made of 3 radial shapes with random per-frame weights: the Gram route (streamed in two parts)
    gives the subspace of numpy's SVD of the stacked profiles and reconstructs them to float32 precision."""
    rng = np.random.default_rng(3)
    q, bins, index = _pixels(rng, n=6000)
    frames = rng.uniform(0.5, 2.0, (40, 3)) @ _shapes(q)  # (frames, pixels), rank 3
    prof, count = _profiles(frames, np.ones_like(frames), index, bins)
    prof = bg.fill_empty(prof, count, bins.live)
    gram = bg.gram_update(prof[:17]) + bg.gram_update(prof[17:])
    np.testing.assert_allclose(gram, bg.gram_update(prof), rtol=1e-12)  # streaming = all at once
    comps = bg.background_components(gram, 3)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(bg.reconstruct(prof, comps), prof, rtol=2e-6, atol=1e-6 * np.abs(prof).max())
    _, s, vt = np.linalg.svd(prof, full_matrices=False)
    np.testing.assert_allclose(vt[:3].T @ vt[:3], comps.T @ comps, atol=1e-6)  # the same subspace
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(gram))[::-1][:3], s[:3] ** 2, rtol=1e-9)
    assert s[3] < 1e-5 * s[0]  # rank 3 up to float32 rounding
    w = bins.pixels  # weighted: the SVD of √w ∘ b, and still an exact reconstruction of a rank-3 background
    comps_w = bg.background_components(bg.gram_update(prof, w), 3)
    vt_w = np.linalg.svd(prof * np.sqrt(w), full_matrices=False)[2][:3]
    np.testing.assert_allclose(vt_w.T @ vt_w, comps_w.T @ comps_w, atol=1e-6)
    np.testing.assert_allclose(bg.reconstruct(prof, comps_w, w)[:, bins.live], prof[:, bins.live], rtol=2e-6,
                               atol=1e-6 * np.abs(prof).max())  # fmt: skip


def test_svd_background_denoises_poisson_frames():
    """Photon-sparse Poisson frames (0.01–0.3 photons per pixel) on a rank-3 background: with the bins weighted
    by their pixel counts, every frame's 3-component reconstruction is closer to its true profile (rms over
    pixels) than the Poisson noise of its raw profile, and the weighting beats the plain SVD."""
    rng = np.random.default_rng(4)
    q, bins, index = _pixels(rng, n=20000)
    truth = rng.uniform(0.01, 0.1, (60, 3)) @ _shapes(q)  # (frames, pixels) expected photons
    frames = rng.poisson(truth).astype(np.float32)
    prof, count = _profiles(frames, np.ones_like(frames), index, bins)
    prof = bg.fill_empty(prof, count, bins.live)
    true_prof, _ = _profiles(truth, np.ones_like(truth), index, bins)
    w = bins.pixels / bins.pixels.sum()  # rms over pixels = √(Σ_b w_b err_b²)

    def rms(x):
        return np.sqrt(np.sum(w * x**2, axis=1))

    noise = np.sqrt(np.sum(w * true_prof / np.maximum(count, 1), axis=1))  # expected rms Poisson error per frame
    raw_err = rms(prof - true_prof)
    np.testing.assert_allclose(raw_err.mean(), noise.mean(), rtol=0.1)  # the raw profiles hold Poisson noise
    model = bg.reconstruct(prof, bg.background_components(bg.gram_update(prof, bins.pixels), 3), bins.pixels)
    svd_err = rms(model - true_prof)
    assert np.all(svd_err < noise)
    assert svd_err.mean() < 0.5 * noise.mean()  # ideal: √(3 / n_bins) ≈ 0.27 of it
    plain = bg.reconstruct(prof, bg.background_components(bg.gram_update(prof), 3))
    assert svd_err.mean() < 0.8 * rms(plain - true_prof).mean()  # noisy inner bins spoil the plain SVD


def test_fill_empty_interpolates_gaps_and_zeroes_dead_bins():
    prof = np.array([[1.0, 0.0, 3.0, 0.0, 7.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    count = np.array([[5, 0, 5, 0, 5, 0], [0, 5, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_allclose(bg.fill_empty(prof, count), [[1, 2, 3, 5, 7, 7], [2] * 6, [0] * 6])
    live = np.array([True, True, True, False, True, True])  # bin 3: no pixel at that |q|
    np.testing.assert_allclose(bg.fill_empty(prof, count, live)[0], [1, 2, 3, 0, 7, 7])


def test_background_image_interpolates_between_bin_centres():
    rng = np.random.default_rng(5)
    q, bins, _index = _pixels(rng)
    line = 2.0 + 5.0 * bins.centres  # a linear profile is reproduced exactly between the first and last centre
    img = bg.background_image(np.stack([line, 2 * line]), bins, q)
    inside = (q >= bins.centres[0]) & (q <= bins.centres[-1])
    np.testing.assert_allclose(img[0, inside], 2.0 + 5.0 * q[inside], rtol=1e-5)
    np.testing.assert_allclose(img[1], 2 * img[0], rtol=1e-6)
    out = bg.background_image(line[None], bins, np.array([-1.0, np.nan, bins.edges[-1] + 0.01, bins.edges[-1]]))
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.0, line[-1]], rtol=1e-6)  # outside the bins: 0
    dead = bg.RadialBins(bins.edges, np.where(np.arange(bins.n_bins) == 10, 0, 1))
    hole = np.where(dead.live, line, 0.0)  # a dead bin (0 after fill_empty) is bridged, not dipped into
    np.testing.assert_allclose(bg.background_image(hole[None], dead, q)[0, inside], img[0, inside], rtol=1e-5)


def test_full_agipd_frames_with_bragg_spots():
    """The real AGIPD-1M shape and default geometry, 4 frames: a rank-3 radial background with bad pixels and
    bright Bragg spots; with the spot discs excluded, the SVD background image matches the true one."""
    from data_pipeline.geometry import AGIPD_SHAPE, default_agipd_geometry, pixel_positions, pixel_q

    rng = np.random.default_rng(6)
    q = np.linalg.norm(pixel_q(pixel_positions(default_agipd_geometry()), 13.6), axis=-1).reshape(-1)
    bins, index = bg.make_radial_bins(q, 0.005)
    assert q.size == 16 * 512 * 128 and np.all(index >= 0) and bins.live.all()
    truth = (rng.uniform(0.5, 2.0, (4, 3)) @ _shapes(q)).astype(np.float32)  # (4, P)
    good = (rng.random(truth.shape) > 0.02).astype(np.float32)  # 2 % bad pixels, different in every frame
    frames = truth.copy()
    masked = good.copy()
    for f in range(4):
        module, ss, fs = rng.integers(0, 16, 30), rng.uniform(0, 511, 30), rng.uniform(0, 127, 30)
        for k in range(30):  # Gaussian spots (σ = 1 pixel) confined to their radius-4 discs
            disc = bg.peak_pixels(module[k : k + 1], ss[k : k + 1], fs[k : k + 1], 4.0)
            _, sd, fd = np.unravel_index(disc, AGIPD_SHAPE)
            frames[f, disc] += 500.0 * np.exp(-0.5 * ((sd - ss[k]) ** 2 + (fd - fs[k]) ** 2))
        masked[f, bg.peak_pixels(module, ss, fs, 4.0)] = 0.0
    prof, count = _profiles(frames, masked, index, bins)
    clean, _ = _profiles(truth, masked, index, bins)
    np.testing.assert_allclose(prof, clean, rtol=1e-6)  # the spots are gone from the profiles
    spotted, _ = _profiles(frames, good, index, bins)
    assert np.abs(spotted - clean).max() > 1.0
    prof = bg.fill_empty(prof, count, bins.live)
    comps = bg.background_components(bg.gram_update(prof, bins.pixels), 3)
    model = bg.reconstruct(prof, comps, bins.pixels)
    np.testing.assert_allclose(model, prof, atol=1e-4 * np.abs(prof).max())
    image = bg.background_image(model, bins, q)
    assert image.shape == truth.shape and image.dtype == np.float32
    assert np.abs(image - truth).max() < 0.01 * np.abs(truth).max()  # interpolation between 5 mÅ⁻¹ centres


# ------------------------------------------------------------------------------------------------ scaleout
def _partial(unit, offset=0.0):
    """A unit's partial: a float64 volume whose sum depends on the order of additions in the last bits."""
    rng = np.random.default_rng(unit)
    return {"sum": rng.normal(size=(20, 20, 20)) * 10.0 ** rng.uniform(-8, 8) + offset, "n": np.array([1])}


def _add(state, part):
    return part if state is None else {k: state[k] + part[k] for k in part}


def test_ordered_fold_is_identical_across_schedulers(tmp_path):
    units = list(range(9))
    with scaleout.open_executor(scaleout.parse_scheduler(None)) as ex:
        here = scaleout.run_stage("t", _partial, units, combine=_add, initial=None, executor=ex)
    with scaleout.open_executor(scaleout.parse_scheduler("local:2")) as ex:
        big = ex.broadcast(np.full(1000, 0.5))
        dask = scaleout.run_stage("t", _partial, units, combine=_add, initial=None, executor=ex)
        shifted = scaleout.run_stage("t", _partial, units, combine=_add, initial=None, executor=ex, fn_args=(1.0,))
        assert ex.submit(np.sum, big).result() == 500.0
    np.testing.assert_array_equal(here["sum"], dask["sum"])
    assert here["n"][0] == 9 and np.allclose(shifted["sum"], here["sum"] + 9.0)


def test_checkpoint_resume_and_errors(tmp_path):
    units = list(range(6))
    whole = scaleout.run_stage("t", _partial, units, combine=_add, initial=None,
                               executor=scaleout.InProcessExecutor())  # fmt: skip
    seen = []

    def flaky(unit):
        seen.append(unit)
        if unit == 4 and len(seen) < 6:
            raise RuntimeError("worker died")
        return _partial(unit)

    ckpt = scaleout.Checkpoint(tmp_path / "c.h5", "abc", every_seconds=0.0)
    ex = scaleout.InProcessExecutor()
    with pytest.raises(RuntimeError):
        scaleout.run_stage("t", flaky, units, combine=_add, initial=None, executor=ex, checkpoint=ckpt)
    again = scaleout.run_stage("t", flaky, units, combine=_add, initial=None, executor=ex, checkpoint=ckpt,
                               resume=True)  # fmt: skip
    assert seen == [0, 1, 2, 3, 4, 4, 5]  # units 0-3 were not recomputed
    np.testing.assert_array_equal(again["sum"], whole["sum"])
    done = scaleout.run_stage("t", flaky, units, combine=_add, initial=None, executor=ex, checkpoint=ckpt,
                              resume=True)  # fmt: skip
    assert len(seen) == 7 and np.array_equal(done["sum"], whole["sum"])  # finished: nothing rerun
    with pytest.raises(InputError, match="different configuration"):
        scaleout.run_stage("t", flaky, units, combine=_add, initial=None, executor=ex, resume=True,
                           checkpoint=scaleout.Checkpoint(tmp_path / "c.h5", "other"))  # fmt: skip


@pytest.mark.parametrize("text", ["local:0", "local:x", "http://host:1", "tcp://host", "gpu"])
def test_bad_schedulers_are_one_line_errors(text):
    with pytest.raises(InputError) as e:
        scaleout.parse_scheduler(text)
    assert "\n" not in str(e.value)


def test_scheduler_specs_and_slurm_job_script():
    assert scaleout.parse_scheduler("local:3") == scaleout.SchedulerSpec("local", workers=3)
    assert scaleout.parse_scheduler("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    spec = scaleout.parse_scheduler(None, "slurm:4")
    assert spec.kind == "slurm" and spec.workers == 4
    with pytest.raises(InputError):
        scaleout.parse_scheduler("local:2", "slurm")
    cluster = scaleout.slurm_cluster(scaleout.SchedulerSpec("slurm", queue="upex", cores=8, memory="64GB"))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p upex", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=60G", "#SBATCH -t 02:00:00"):
        assert line in script, script
