"""Radial background profiles and their SVD (data_pipeline.background), virtual powder sums
(data_pipeline.powder), and the ordered map-reduce with checkpoints (data_pipeline.scaleout)."""

import numpy as np
import pytest

from data_pipeline import background as bg
from data_pipeline import powder, scaleout
from jaxpolaron.errors import InputError

RNG = np.random.default_rng(0)


def _pixels(n=4000, q_max=0.8):
    q = np.sqrt(RNG.uniform(0, q_max**2, n))  # uniform over a disc, like a flat detector
    bins, index = bg.make_radial_bins(q, 0.02)
    return q, bins, index


def _shapes(q):
    """Three smooth radial shapes: a ring at 0.2 Å⁻¹, a falling solvent term, a constant."""
    return np.stack([np.exp(-((q - 0.2) ** 2) / (2 * 0.03**2)), np.exp(-q / 0.3), np.ones_like(q)])


def test_radial_profiles_are_weighted_bin_means():
    q, bins, index = _pixels()
    frames = RNG.normal(size=(3, q.size)).astype(np.float32)
    weights = (RNG.random((3, q.size)) > 0.2).astype(np.float32)
    prof, count = (np.asarray(x) for x in bg.radial_profiles(frames, weights, index, bins.n_bins))
    for f in range(3):
        for b in (0, 5, bins.n_bins - 1):
            sel = (index == b) & (weights[f] > 0)
            assert count[f, b] == sel.sum()
            assert prof[f, b] == pytest.approx(frames[f, sel].mean() if sel.any() else 0.0, abs=1e-5)


def test_rank_three_background_is_recovered_and_matches_numpy_svd():
    _q, bins, _index = _pixels()
    shapes = _shapes(bins.centres)
    coef = RNG.uniform(0.5, 2.0, (40, 3))
    profiles = coef @ shapes  # (frames, bins), exactly rank 3
    half = bg.gram_update(profiles[:17]) + bg.gram_update(profiles[17:])
    np.testing.assert_allclose(half, bg.gram_update(profiles), rtol=1e-12)  # streaming = all at once
    comps = bg.background_components(half, 3)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(bg.reconstruct(profiles, comps), profiles, atol=1e-10)
    vt = np.linalg.svd(profiles, full_matrices=False)[2][:3]
    np.testing.assert_allclose(vt.T @ vt, comps.T @ comps, atol=1e-9)  # the same subspace


def test_excluding_peak_pixels_removes_bragg_spots_from_the_profile():
    shape = (2, 64, 32)
    p = np.arange(np.prod(shape))
    _module, ss, fs = np.unravel_index(p, shape)
    q = np.hypot(ss - 10.0, fs - 16.0) / 60.0  # a fabricated |q| per pixel
    bins, index = bg.make_radial_bins(q, 0.05)
    smooth = (1.0 + 3.0 * q).astype(np.float32)
    peaks = (np.array([0, 0, 1]), np.array([30.3, 45.0, 20.6]), np.array([7.8, 20.2, 3.1]))
    spotted = smooth.copy()
    near = bg.peak_pixels(*peaks, 3.0, shape)
    spotted[near] += 500.0
    keep = np.ones((1, p.size), np.float32)
    keep[0, near] = 0.0
    clean, _ = bg.radial_profiles(smooth[None], np.ones_like(keep), index, bins.n_bins)
    masked, _ = bg.radial_profiles(spotted[None], keep, index, bins.n_bins)
    raw, _ = bg.radial_profiles(spotted[None], np.ones_like(keep), index, bins.n_bins)
    assert np.abs(np.asarray(masked) - np.asarray(clean)).max() < 0.05  # only the bin-mean of a smooth ramp moves
    assert np.abs(np.asarray(raw) - np.asarray(clean)).max() > 10.0


def test_peak_pixels_disc_and_module_edges():
    shape = (16, 512, 128)
    inner = bg.peak_pixels([3], [100.2], [60.4], 4.0, shape)
    assert len(inner) == 49  # pixels with dy² + dx² <= 16
    m, s, f = np.unravel_index(inner, shape)
    assert set(m) == {3} and np.hypot(s - 100, f - 60).max() <= 4.0
    edge = bg.peak_pixels([5], [511.4], [0.2], 4.0, shape)  # a module corner: a quarter disc, nothing spills
    m, s, f = np.unravel_index(edge, shape)
    assert set(m) == {5} and len(edge) == 17 and s.min() >= 507 and f.max() <= 4
    assert len(bg.peak_pixels([], [], [], 4.0, shape)) == 0


def test_svd_background_denoises_poisson_frames():
    """Poisson photons on a rank-3 background: the 3-component reconstruction is closer to the truth than each
    frame's own profile."""
    q, bins, index = _pixels(n=20000)
    truth = RNG.uniform(0.1, 2.0, (60, 3)) @ _shapes(q)  # (frames, pixels) expected photons
    frames = RNG.poisson(truth).astype(np.float32)
    prof, count = (np.asarray(x, np.float64) for x in bg.radial_profiles(frames, np.ones_like(frames), index,
                                                                          bins.n_bins))  # fmt: skip
    prof = bg.fill_empty(prof, count)
    true_prof, _ = bg.radial_profiles(truth.astype(np.float32), np.ones_like(frames), index, bins.n_bins)
    model = bg.reconstruct(prof, bg.background_components(bg.gram_update(prof), 3))
    raw_err = np.sqrt(np.mean((prof - np.asarray(true_prof)) ** 2))
    svd_err = np.sqrt(np.mean((model - np.asarray(true_prof)) ** 2))
    assert svd_err < 0.6 * raw_err


def test_background_image_interpolates_between_bin_centres():
    q, bins, _index = _pixels()
    line = 2.0 + 5.0 * bins.centres  # a linear profile is reproduced exactly between the first and last centre
    img = bg.background_image(line[None], bins, q)
    inside = (q >= bins.centres[0]) & (q <= bins.centres[-1])
    np.testing.assert_allclose(img[0, inside], 2.0 + 5.0 * q[inside], rtol=1e-5)


def test_fill_empty_interpolates_gaps():
    prof = np.array([[1.0, 0.0, 3.0, 0.0]])
    count = np.array([[5, 0, 5, 0]])
    np.testing.assert_allclose(bg.fill_empty(prof, count), [[1.0, 2.0, 3.0, 3.0]])


def test_virtual_powder_sums_bin_peaks_and_add_up():
    edges = np.linspace(0, 1, 11)
    q = [np.array([0.05, 0.25, 0.27]), np.array([0.25]), np.array([])]
    inten = [np.array([1.0, 2.0, 3.0]), np.array([10.0]), np.array([])]
    sums, hits = powder.virtual_powder_sums(q, inten, np.array([0, 1, 0]), edges)
    assert hits.tolist() == [2, 1]
    assert sums[0, 0] == 1.0 and sums[0, 2] == 5.0 and sums[1, 2] == 10.0 and sums.sum() == 16.0
    a = powder.virtual_powder_sums(q[:1], inten[:1], np.array([0]), edges)
    b = powder.virtual_powder_sums(q[1:], inten[1:], np.array([1, 0]), edges)
    np.testing.assert_array_equal(a[0] + b[0], sums)
    curves = powder.PowderCurves.from_sums(0.5 * (edges[1:] + edges[:-1]), sums, hits, sums, np.ones_like(sums))
    assert curves.virtual[0, 2] == 2.5  # per hit
    again = powder.PowderCurves.from_dict(curves.to_dict())
    np.testing.assert_array_equal(again.virtual, curves.virtual)


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
