"""Synthetic frames -> EXDF run -> extra-data round trip (small: 3 trains × 8 pulses, 3–4 nm crystals)."""

import jax
import numpy as np
import pytest

from data_pipeline import run_io, synthetic
from data_pipeline.geometry import default_agipd_geometry
from data_pipeline.io import read_crystfel_geom
from jaxpolaron.errors import InputError

CFG = synthetic.SyntheticConfig(
    sizes_nm=(3.0, 4.0), grid_n=65, hit_fraction=0.5, fluence_ph_per_um2=1e15, bad_pixel_fraction=1e-3
)
LAYOUT = synthetic.RunLayout(n_trains=3, n_pulses=8)


@pytest.fixture(scope="module")
def run(structure, tmp_path_factory):
    geom = default_agipd_geometry()
    det = synthetic.detector(geom, CFG, key=jax.random.key(0))
    vol = synthetic.crystal_volumes(structure, CFG)
    written = []

    def keep(it):  # keep what was written to compare after the round trip (fine at 24 frames)
        for data, truth in it:
            written.append(data)
            yield data, truth

    out = tmp_path_factory.mktemp("synth") / "r0001"
    frames = keep(synthetic.frames(jax.random.key(1), det, vol, CFG, LAYOUT))
    run_io.write_run(
        out,
        frames,
        layout=LAYOUT,
        geometry=geom,
        mask=synthetic.bad_pixel_mask(det),
        config=CFG.to_dict(),
        trains_per_file=2,
        chunk=5,
        progress=False,
    )
    return out, np.stack(written), det, vol, geom


def test_extra_data_opens_run(run):
    from extra_data import RunDirectory
    from extra_data.components import AGIPD1M

    out, *_ = run
    r = RunDirectory(str(out))
    det = AGIPD1M(r)
    assert det.n_modules == 16
    assert det.frames_per_train == LAYOUT.n_pulses
    assert len(r.train_ids) == LAYOUT.n_trains
    assert run_io.BUNCH_PATTERN_SOURCE in r.instrument_sources
    data = det.get_array("image.data")  # (module, train, pulse, ss, fs)
    assert data.shape == (16, LAYOUT.n_trains, LAYOUT.n_pulses, 512, 128)
    assert data.dtype == np.float32


def test_read_frames_round_trip(run):
    out, written, det, *_ = run
    tids, pids, frames, masks, pumped = [], [], [], [], []
    for tid, p, f, m, pu in run_io.read_frames(out, chunk=5):
        assert f.shape[1:] == (16, 512, 128) and len(f) <= 5
        tids += [tid] * len(p)
        pids.append(p)
        frames.append(f)
        masks.append(m)
        pumped.append(pu)
    frames = np.concatenate(frames)
    assert len(frames) == LAYOUT.n_frames
    np.testing.assert_array_equal(frames, written)  # exact
    np.testing.assert_array_equal(np.concatenate(masks) != 0, np.broadcast_to(np.asarray(det.bad), frames.shape))
    np.testing.assert_array_equal(np.concatenate(pids), np.tile(LAYOUT.pulse_ids(), LAYOUT.n_trains))
    np.testing.assert_array_equal(tids, np.repeat(LAYOUT.train_ids(), LAYOUT.n_pulses))
    pumped = np.concatenate(pumped)
    np.testing.assert_array_equal(pumped, np.tile(np.arange(LAYOUT.n_pulses) % 2 == 1, LAYOUT.n_trains))
    np.testing.assert_array_equal(pumped, run_io.read_truth(out)["pumped"])


def test_geom_round_trip(run):
    out, _, _, _, geom = run
    back = read_crystfel_geom(out / "agipd.geom")
    np.testing.assert_allclose(back.get_pixel_positions(), geom.get_pixel_positions(), atol=1e-9)


def test_hits_have_bragg_intensity_and_misses_do_not(run):
    out, written, det, vol, _ = run
    truth = run_io.read_truth(out)
    hit = truth["n_crystals"] > 0
    assert hit.any() and (~hit).any()
    bragg_region = np.asarray(det.q_norm) > 0.3  # beyond the diffuse ring (0.2 ± 0.03 Å⁻¹) and the SAXS
    peak = np.array([f[bragg_region].max() for f in written])
    assert peak[~hit].max() <= 3  # background: ≲ 1e-3 photons/pixel out there
    assert peak[hit].min() > max(4, peak[~hit].max())
    # the photons sit where the truth crystals put them: noise-free expectation vs counts
    for i in np.flatnonzero(hit)[:3]:
        crystals = synthetic.Crystals(
            n=truth["n_crystals"][i],
            rotations=truth["rotations"][i],
            size_index=truth["size_index"][i],
            sizes_nm=truth["sizes_nm"][i],
            variant=truth["variant"][i],
            pumped=truth["pumped"][i],
        )
        expected = np.asarray(synthetic.bragg_photons(det, vol, crystals))
        strong = (expected > 0.05) & bragg_region & ~np.asarray(det.bad)
        assert expected[strong].sum() > 50
        observed = written[i][strong].sum()
        assert abs(observed - expected[strong].sum()) < 5 * np.sqrt(expected[strong].sum()) + 0.02 * observed


def test_config_rejects_bad_hit_fraction():
    with pytest.raises(InputError, match="hit_fraction"):
        synthetic.SyntheticConfig(hit_fraction=1.5)


def test_frames_are_keyed_by_index_and_misses_skip_the_crystal_loop(run):
    _, written, det, vol, _ = run
    # frames 5..8 generated on their own equal the same frames of the whole run (what --resume relies on)
    part = [f for f, _ in synthetic.frames(jax.random.key(1), det, vol, CFG, LAYOUT, start=5, stop=9)]
    np.testing.assert_array_equal(np.stack(part), written[5:9])
    miss = synthetic.Crystals(*synthetic.draw_crystals(jax.random.key(0), CFG, 1, False))._replace(n=np.int32(0))
    np.testing.assert_array_equal(np.asarray(synthetic.bragg_photons(det, vol, miss)), 0.0)


def test_poisson_counts_deterministic_and_unbiased():
    lam = np.full((200, 500), 0.7)
    bad = np.zeros(lam.shape, bool)
    bad[0, :10] = True
    a = synthetic.poisson_counts(jax.random.key(3), lam, bad)
    np.testing.assert_array_equal(a, synthetic.poisson_counts(jax.random.key(3), lam, bad))
    assert not np.array_equal(a, synthetic.poisson_counts(jax.random.key(4), lam, bad))
    assert a.dtype == np.float32 and (a[0, :10] == 0).all()
    assert abs(a[1:].mean() - 0.7) < 4 * np.sqrt(0.7 / a[1:].size) and abs(a[1:].var() - 0.7) < 0.02


def test_paired_classes_share_crystals_and_noise_off_gives_lambda(run, structure):
    _, _, det, _, _ = run
    cfg = synthetic.SyntheticConfig(sizes_nm=(3.0, 4.0), grid_n=65, hit_fraction=1.0, fluence_ph_per_um2=1e15,
                                    paired=True, noise=False)  # fmt: skip
    vol = synthetic.crystal_volumes(structure, cfg, model=synthetic.model_config("central-hole", amplitude=0.3))
    layout = synthetic.RunLayout(n_trains=1, n_pulses=4, pump_every=2)
    out = list(synthetic.frames(jax.random.key(5), det, vol, cfg, layout))
    pumped = layout.pumped().reshape(-1)
    for a, b in ((0, 1), (2, 3)):  # a pump group: same crystals, only the pump state (and variant) differs
        ta, tb = out[a][1], out[b][1]
        assert pumped[a] != pumped[b] and ta.n == tb.n > 0
        np.testing.assert_array_equal(ta.rotations, tb.rotations)
        np.testing.assert_array_equal(ta.size_index, tb.size_index)
        # without noise a frame is λ itself: deterministic, fractional, and the pumped one differs (deformation)
        lam = synthetic.expected_photons(det, vol, synthetic.Crystals(*ta))
        expected = np.where(np.asarray(det.bad), 0.0, np.asarray(lam))
        np.testing.assert_allclose(out[a][0], expected, rtol=1e-6)
        assert not np.array_equal(out[a][0], out[b][0])
    assert not np.array_equal(out[0][1].rotations, out[2][1].rotations)  # groups differ
