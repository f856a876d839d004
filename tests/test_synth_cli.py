"""`jaxpolaron synth-run`: an EXDF run extra-data opens, truth vs bunch pattern, pumped vs dark frames,
robust reading (NaN pixels, truncated file, no bunch pattern), resume, one-line errors.

Small runs only: 3 trains × 8 pulses, 3–4 nm crystals, 65³ tables (undersampled: fine for I/O)."""

import os
import shutil

import h5py
import jax
import numpy as np
import pytest

from data_pipeline import run_io, synth_cli, synthetic
from data_pipeline.bunch_pattern import pumped as decode_pumped
from jaxpolaron.cli import main

SMALL = ["--trains", "3", "--pulses", "8", "--grid", "65", "--sizes", "3,4", "--trains-per-file", "2", "-q"]
PUMPED = [*SMALL, "--hit-fraction", "0.7", "--fluence", "1e15", "--model", "random-hole", "--variants", "2"]
PUMPED += ["--amplitude", "0.5", "--seed", "3"]
AGIPD = "INSTRUMENT/SPB_DET_AGIPD1M-1/CORR/{m}CH0:output/image/{key}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "r0001"
    assert main(["synth-run", str(out), *PUMPED]) == 0
    return out


def _copy(run_dir, tmp_path, name="copy"):
    return shutil.copytree(run_dir, tmp_path / name)


def _read_all(path, report):
    chunks = list(run_io.iter_frames(path, chunk=5, report=report))
    return chunks, (np.concatenate([c.frames for c in chunks]) if chunks else np.zeros((0, 16, 512, 128)))


def test_extra_data_opens_synth_run(run_dir):
    from extra_data import RunDirectory
    from extra_data.components import AGIPD1M

    from data_pipeline.io import read_crystfel_geom

    r = RunDirectory(str(run_dir))
    det = AGIPD1M(r)
    assert det.n_modules == 16 and det.frames_per_train == 8 and len(r.train_ids) == 3
    assert run_io.BUNCH_PATTERN_SOURCE in r.instrument_sources
    assert {"image.data", "image.mask", "image.gain", "image.cellId", "image.pulseId"} <= r[
        run_io.AGIPD_SOURCE.format(m=7)
    ].keys()
    data = det.get_array("image.data")
    assert data.shape == (16, 3, 8, 512, 128) and data.dtype == np.float32
    assert np.isfinite(data.values).all() and data.values.max() > 0
    geom = read_crystfel_geom(run_dir / "agipd.geom")
    assert geom.get_pixel_positions().shape == (16, 512, 128, 3)
    for name in ("config.json", "truth.hdf5", synth_cli.VOLUMES_FILE):
        assert (run_dir / name).is_file()
    assert not (run_dir / run_io.PARTIAL_DIR).exists()


def test_truth_matches_bunch_pattern_and_model(run_dir):
    from extra_data import RunDirectory

    truth = run_io.read_truth(run_dir)
    r = RunDirectory(str(run_dir))
    table = r[run_io.BUNCH_PATTERN_SOURCE, run_io.BUNCH_PATTERN_KEY].ndarray()
    pids = r[run_io.AGIPD_SOURCE.format(m=0), "image.pulseId"].ndarray().astype(np.int64).reshape(3, 8)
    np.testing.assert_array_equal(truth["pumped"], decode_pumped(table, pids).reshape(-1))
    np.testing.assert_array_equal(truth["pulseId"], pids.reshape(-1))
    assert truth["pumped"].reshape(3, 8)[:, 1::2].all() and not truth["pumped"].reshape(3, 8)[:, ::2].any()
    n, variant = truth["n_crystals"], truth["variant"]
    exists = np.arange(variant.shape[1]) < n[:, None]
    assert (variant[~truth["crystal_pumped"]] == -1).all()
    assert ((variant[truth["crystal_pumped"]] >= 0) & (variant[truth["crystal_pumped"]] < 2)).all()
    np.testing.assert_array_equal(truth["crystal_pumped"], exists & truth["pumped"][:, None])
    assert truth["crystal_pumped"].any() and (n > 0).any() and (n == 0).any()
    rot = truth["rotations"]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    assert truth["config"]["model"]["model"] == "random-hole" and truth["config"]["model"]["amplitude"] == 0.5
    holes = truth["run/hole_positions_A"]
    assert holes.shape == (2, 2, 3) and np.isfinite(holes).all() and not np.allclose(holes[:, 0], holes[:, 1])


def test_pumped_frames_differ_from_dark_only_where_pumped(run_dir):
    """Same seed, same tables: model 'none' (pumped = dark tables) vs the run's random-hole pumped tables."""
    from jaxpolaron.cli import build_parser

    args = build_parser().parse_args(["synth-run", str(run_dir), *PUMPED])
    synth, layout, _ = synth_cli.configs(args)
    vol = synth_cli._load_volumes(run_dir / synth_cli.VOLUMES_FILE)
    none = vol._replace(pumped_index=np.repeat(np.asarray(vol.dark_index)[:, None], 2, axis=1))
    k_det, k_frames, _ = jax.random.split(jax.random.key(3), 3)
    from data_pipeline.geometry import default_agipd_geometry

    det = synthetic.detector(default_agipd_geometry(), synth, key=k_det)
    truth = run_io.read_truth(run_dir)
    pumped_hit = truth["pumped"] & (truth["n_crystals"] > 0)
    on_disk = [c.frames for c in run_io.iter_frames(run_dir, chunk=8)]
    on_disk = np.concatenate(on_disk)
    for i, (dark_model, _) in enumerate(synthetic.frames(k_frames, det, none, synth, layout)):
        same = np.array_equal(dark_model, on_disk[i])
        assert same == (not pumped_hit[i]), f"frame {i}: pumped {truth['pumped'][i]}, n {truth['n_crystals'][i]}"


def test_reader_reports_nan_truncated_and_missing_bunch_pattern(run_dir, tmp_path, caplog):
    report = run_io.SkipReport()
    chunks, frames = _read_all(run_dir, report)
    assert report.ok and report.counts["frames read"] == 24 and report.counts["trains read"] == 3
    np.testing.assert_array_equal(np.concatenate([c.pumped for c in chunks]), run_io.read_truth(run_dir)["pumped"])

    nan_dir = _copy(run_dir, tmp_path, "nan")
    with h5py.File(nan_dir / "CORR-R0001-AGIPD03-S00000.h5", "r+") as f:
        ds = f[AGIPD.format(m=3, key="data")]
        x = ds[2]
        x[10, 10], x[11, 12] = np.nan, -np.inf
        ds[2] = x
    report = run_io.SkipReport()
    chunks, got = _read_all(nan_dir, report)
    assert len(got) == 24 and np.isfinite(got).all()
    assert report.counts["nonfinite pixels"] == 2 and report.counts["frames with nonfinite pixels"] == 1
    good = np.concatenate([c.good for c in chunks])
    assert not good[2, 3, 10, 10] and not good[2, 3, 11, 12] and good[2, 3, 10, 11] == good[3, 3, 10, 11]
    assert "nonfinite pixels 2" in str(report)

    trunc_dir = _copy(run_dir, tmp_path, "trunc")
    path = trunc_dir / "CORR-R0001-AGIPD05-S00001.h5"  # the last train's sequence
    os.truncate(path, path.stat().st_size // 2)
    report = run_io.SkipReport()
    chunks, got = _read_all(trunc_dir, report)
    assert sorted({c.train_id for c in chunks}) == [10000, 10001]
    np.testing.assert_array_equal(got, frames[:16])
    assert report.counts["files unreadable"] == 1 and report.counts["trains skipped"] == 1
    assert any("AGIPD05-S00001" in where for where, _ in report.entries)
    assert any(where == "train 10002" for where, _ in report.entries)

    nobp_dir = _copy(run_dir, tmp_path, "nobp")
    for p in nobp_dir.glob("*DA01*.h5"):
        p.unlink()
    report = run_io.SkipReport()
    with caplog.at_level("WARNING", logger="data_pipeline.run_io"):
        chunks, got = _read_all(nobp_dir, report)
    np.testing.assert_array_equal(got, frames)
    assert all((c.pumped == -1).all() for c in chunks)
    assert sum("pump state unknown" in r.getMessage() for r in caplog.records) == 1
    # the first reader's tuple API still works
    first = next(run_io.read_frames(run_dir, chunk=3))
    assert first[0] == 10000 and first[2].shape == (3, 16, 512, 128) and first[4].dtype == bool


def test_resume_gives_identical_run(run_dir, tmp_path):
    cut = _copy(run_dir, tmp_path, "cut")
    # as if killed while writing sequence 1: its files half there, a partial directory, truth rows of seq 1
    for p in list(cut.glob("*-S00001.h5"))[:5]:
        p.unlink()
    (cut / run_io.PARTIAL_DIR).mkdir()
    (cut / run_io.PARTIAL_DIR / "junk.h5").write_bytes(b"x")
    assert main(["synth-run", str(cut), *PUMPED, "--resume"]) == 0
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in run_dir.iterdir())
    for m in (0, 9):
        for seq in (0, 1):
            name = run_io.module_file(1, m, seq)
            with h5py.File(run_dir / name) as a, h5py.File(cut / name) as b:
                for key in ("data", "mask", "pulseId", "trainId"):
                    np.testing.assert_array_equal(a[AGIPD.format(m=m, key=key)][()], b[AGIPD.format(m=m, key=key)][()])
    t0, t1 = run_io.read_truth(run_dir), run_io.read_truth(cut)
    for key in ("trainId", "pulseId", "pumped", "n_crystals", "rotations", "variant"):
        np.testing.assert_array_equal(t0[key], t1[key])
    assert main(["synth-run", str(cut), *PUMPED, "--resume"]) == 0  # already complete: nothing to do


def test_resume_of_a_run_killed_in_its_first_sequence(run_dir, tmp_path):
    cut = _copy(run_dir, tmp_path, "first")
    for p in cut.glob("*-S0000*.h5"):  # no sequence complete: only config, geometry, truth and tables remain
        p.unlink()
    (cut / run_io.PARTIAL_DIR).mkdir()
    assert main(["synth-run", str(cut), *PUMPED, "--resume"]) == 0
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in run_dir.iterdir())
    t0, t1 = run_io.read_truth(run_dir), run_io.read_truth(cut)
    for key in ("trainId", "pulseId", "n_crystals", "rotations"):
        np.testing.assert_array_equal(t0[key], t1[key])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hit-fraction", "1.5"], "hit_fraction must lie in [0, 1]"),
        (["--trains", "0"], "--trains: must be >= 1"),
        (["--grid", "64"], "--grid must be odd"),
        (["--model", "external"], "synthetic runs support the models"),
        (["--model", "random-hole", "--hole-bias", "2"], "--hole-bias must be in (0, 1]"),
        (["--mean-crystals", "0.5"], "mean_crystals (per hit) must lie in"),
        (["--fluence", "nan"], "--fluence must be a finite number"),
        (["--sizes", "3,x"], "is not a comma-separated list of numbers"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["synth-run", str(tmp_path / "new"), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxpolaron: error:") and message in err and "\n" not in err
    assert not (tmp_path / "new").exists()


def test_existing_output_and_resume_mismatch_are_one_line_errors(run_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["synth-run", str(busy), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty; pass --overwrite" in err and "\n" not in err and (busy / "keep.txt").exists()
    assert main(["synth-run", str(busy), *SMALL, "--overwrite"]) == 2  # never deletes what is not a synthetic run
    assert "does not look like one" in capsys.readouterr().err and (busy / "keep.txt").exists()
    assert main(["synth-run", str(tmp_path / "absent"), *SMALL, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    other = _copy(run_dir, tmp_path, "other")
    assert main(["synth-run", str(other), *PUMPED[:-1], "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "settings differ" in err and "seed" in err and "\n" not in err
