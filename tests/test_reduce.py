"""`jaxpolaron reduce` end to end on a small synthetic run: the volumes and statistics, Bragg peaks where the
lattice puts them, Dask LocalCluster = in-process, an interrupted reduction resumed = uninterrupted, a corrupt
file skipped and reported, one-line errors.

Small run: 2 trains × 12 pulses of 5–6 nm crystals on 129³ tables, merged on a 41³ grid (the accuracy figures
of the closing note come from the 5,000-frame runs, not from these few crystals)."""

import shutil

import h5py
import numpy as np
import pytest

from data_pipeline import reduce_run
from jaxpolaron.cli import main
from jaxpolaron.io import read_volume_file
from jaxpolaron.structure import read_cif

SYNTH = ["--trains", "2", "--pulses", "12", "--grid", "129", "--sizes", "5,6", "--hit-fraction", "1"]
SYNTH += ["--fluence", "1e14", "--trains-per-file", "1", "--seed", "5", "-q"]
# trilinear tables: these checks are of the reduction's bookkeeping on a run of a few crystals, whose counts
# below were set on this run (the default cubic tables give another set of frames)
SYNTH += ["--interpolation", "linear"]
REDUCE = ["--grid", "41", "--unit-frames", "6", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("red") / "r0001"
    assert main(["synth-run", str(out), *SYNTH]) == 0
    return out


@pytest.fixture(scope="module")
def reduced(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("red") / "vol.h5"
    assert main(["reduce", str(run_dir), "--out", str(out), *REDUCE]) == 0
    return out


def _arrays(path):
    v = read_volume_file(path).volumes["grid"]
    return {"dark": v.dark, "pump": v.pump, "w_dark": v.weight["dark"], "w_pump": v.weight["pump"]}


def test_volumes_statistics_and_figures(reduced):
    vf = read_volume_file(reduced)
    v = vf.volumes["grid"]
    assert v.groups == ("dark", "pump", "difference") and v.units == "counts"
    np.testing.assert_array_equal(v.difference, v.pump - v.dark)
    for cls in ("dark", "pumped"):
        m = vf.statistics["merge"][cls]
        assert m["crystals_seen"] == m["crystals_merged"] + m["rejected_dissimilar"] + m["rejected_no_scale"]
    assert sum(vf.statistics["merge"][c]["crystals_merged"] for c in ("dark", "pumped")) >= 5
    assert vf.statistics["background"]["components"] == 3
    assert vf.config["reduce"]["grid_n"] == 41 and "provenance" not in vf.config
    stem = reduced.with_suffix("")
    for suffix in ("slices", "powder", "scaling"):
        assert (stem.parent / f"{stem.name}_{suffix}.png").stat().st_size > 1000
    with h5py.File(reduced.with_name("vol.work") / "crystal_scales.h5") as f:
        assert len(f["scaling/scale"]) == sum(vf.statistics["merge"][c]["crystals_seen"] for c in ("dark", "pumped"))


def test_bright_voxels_sit_on_the_lattice(reduced):
    """The strongest merged voxels are Bragg peaks: within ~1 voxel of G = hkl / a_pc (pseudo-cubic)."""
    v = read_volume_file(reduced).volumes["grid"]
    w = v.weight["dark"] + v.weight["pump"]
    total = np.where(w > 0, (v.dark * v.weight["dark"] + v.pump * v.weight["pump"]) / np.maximum(w, 1e-30), 0.0)
    a_pc = read_cif().pseudo_cubic.a_pc
    ax = v.axes[0]
    voxel = ax[1] - ax[0]
    top = np.argsort(total.reshape(-1))[-20:]
    q = np.stack([ax[i] for i in np.unravel_index(top, total.shape)], axis=-1)
    off = np.linalg.norm(q - np.rint(q * a_pc) / a_pc, axis=1)
    assert np.median(off) < 1.0 * voxel, off


def test_dask_local_cluster_gives_the_identical_volume(run_dir, reduced, tmp_path):
    out = tmp_path / "dask.h5"
    args = ["reduce", str(run_dir), "--out", str(out), "--index-dir", str(reduced.with_name("vol.work") / "index")]
    assert main([*args, "--scheduler", "local:2", "--no-figures", *REDUCE]) == 0
    a, b = _arrays(reduced), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_interrupted_reduction_resumes_to_the_identical_volume(run_dir, reduced, tmp_path, monkeypatch):
    index = reduced.with_name("vol.work") / "index"
    out = tmp_path / "resumed.h5"
    calls = []
    real = reduce_run.final_stage

    def crash_on_second_unit(unit, *args):
        calls.append(unit.index)
        if unit.index == 1:
            raise KeyboardInterrupt  # as if killed half-way through the final stage
        return real(unit, *args)

    config = reduce_run.ReduceConfig(grid_n=41, unit_frames=2)  # several units per stage
    kwargs = dict(config=config, index_dir=index, progress=False, figures=False, checkpoint_seconds=0.0)
    reduce_run.reduce_run(run_dir, tmp_path / "whole.h5", **kwargs)
    monkeypatch.setattr(reduce_run, "final_stage", crash_on_second_unit)
    with pytest.raises(KeyboardInterrupt):
        reduce_run.reduce_run(run_dir, out, **kwargs)
    assert not out.exists() and (tmp_path / "resumed.work" / "stage_final.h5").is_file()
    monkeypatch.setattr(reduce_run, "final_stage", real)
    reduce_run.reduce_run(run_dir, out, resume=True, **kwargs)
    assert calls == [0, 1]  # the resumed run did not redo unit 0 (and ran the rest with the real stage)
    a, b = _arrays(tmp_path / "whole.h5"), _arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_file_is_skipped_and_reported(run_dir, reduced, tmp_path):
    broken = tmp_path / "r0001"
    shutil.copytree(run_dir, broken)
    victim = broken / "CORR-R0001-AGIPD03-S00001.h5"
    data = bytearray(victim.read_bytes())
    data[: len(data) // 2] = b"\0" * (len(data) // 2)  # header and half the data gone
    victim.write_bytes(bytes(data))
    out = tmp_path / "vol.h5"
    index = reduced.with_name("vol.work") / "index"
    assert main(["reduce", str(broken), "--out", str(out), "--index-dir", str(index), "--no-figures", *REDUCE]) == 0
    stats = read_volume_file(out).statistics
    report = stats["read_report"]
    assert report["files"]["counts"]["files unreadable"] == 1 and victim.name in str(report["files"]["entries"])
    assert report["frames"]["counts"]["trains skipped"] == 1, report
    seen = sum(stats["merge"][c]["crystals_seen"] for c in ("dark", "pumped"))
    full = read_volume_file(reduced).statistics
    assert 0 < seen < sum(full["merge"][c]["crystals_seen"] for c in ("dark", "pumped"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "cubic"], "merge mode must be one of"),
        (["--crystal-weighting", "mean"], "crystal weighting must be one of"),
        (["--scheduler", "local:0"], "local:N needs N >= 1"),
        (["--scheduler", "http://x:1"], "scheduler must be local:N or tcp://HOST:PORT"),
    ],
)
def test_one_line_errors(run_dir, reduced, tmp_path, capsys, extra, message):
    index = reduced.with_name("vol.work") / "index"
    code = main(["reduce", str(run_dir), "--out", str(tmp_path / "v.h5"), "--index-dir", str(index), *extra, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_existing_work_needs_resume(run_dir, reduced, capsys):
    code = main(["reduce", str(run_dir), "--out", str(reduced), *REDUCE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--resume" in err and len(err.splitlines()) == 1, err
