"""`jaxpolaron find-peaks` / `jaxpolaron index` on a small synthetic run: outputs agree with each other and with
the truth, an interrupted run resumed gives identical outputs, user mistakes give one-line errors.

Small run: 3 trains × 8 pulses of 5–6 nm crystals on 257³ tables (Bragg peaks sampled at 0.008 Å⁻¹; the
orientation accuracy figures come from the large run of the closing note, not from these few crystals)."""

import filecmp
import json
import shutil

import h5py
import numpy as np
import pytest

from data_pipeline import io as dio
from data_pipeline.crystal_table import read_crystal_table
from jaxpolaron.cli import main

SYNTH = ["--trains", "3", "--pulses", "8", "--grid", "257", "--sizes", "5,6", "--hit-fraction", "1"]
SYNTH += ["--fluence", "1e14", "--trains-per-file", "2", "--seed", "11", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "r0001"
    assert main(["synth-run", str(out), *SYNTH]) == 0
    return out


@pytest.fixture(scope="module")
def indexed(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "full"
    assert main(["index", str(run_dir), "--out", str(out), "--chunk", "8", "-q"]) == 0
    return out


def _same_outputs(a, b):
    ta, tb = read_crystal_table(a / "crystals.h5"), read_crystal_table(b / "crystals.h5")
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    assert filecmp.cmp(a / "crystals.stream", b / "crystals.stream", shallow=False)
    with h5py.File(a / "peaks.cxi", "r") as fa, h5py.File(b / "peaks.cxi", "r") as fb:
        for k in fa["entry_1/result_1"]:
            np.testing.assert_array_equal(fa["entry_1/result_1"][k][()], fb["entry_1/result_1"][k][()], err_msg=k)
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    assert sa["table_s1"] == sb["table_s1"]


def test_index_outputs_are_consistent(indexed):
    stats = json.loads((indexed / "stats.json").read_text())
    total = stats["table_s1"]["total"]
    assert stats["finished"] and total["frames"] == 24
    table = read_crystal_table(indexed / "crystals.h5")
    assert total["crystals"] == len(table["frame"]) > 5
    assert total["indexed_peaks"] == int(table["n_peaks"].sum())
    assert np.all(table["n_reflections"] >= 3)
    stream = dio.read_stream(indexed / "crystals.stream")
    assert len(stream.chunks) == total["hits"]
    assert sum(len(c.crystals) for c in stream.chunks) == total["crystals"]
    cxi = dio.read_cxi_peaks(indexed / "peaks.cxi")
    assert len(cxi.peaks.n_peaks) == 24 and int(np.sum(cxi.peaks.n_peaks >= 2)) == total["hits"]
    # stream crystals are the table's refined orientations: astar = B Rᵀ
    by_event = {c.event: c for c in stream.chunks}
    first = by_event[dio.event_id(int(table["frame"][0]))].crystals[0]
    assert np.linalg.det(first.astar) != 0
    v = stats["validation"]
    assert v["indexed_crystals"] == total["crystals"]
    assert v["median_error_deg_after_refinement"] < 1.5  # accuracy: see the 5,000-frame run in the closing note
    assert stats["table_s1"]["dark"]["frames"] == stats["table_s1"]["pumped"]["frames"] == 12


def test_find_peaks_only(run_dir, tmp_path):
    assert main(["find-peaks", str(run_dir), "--out", str(tmp_path / "p"), "--chunk", "8", "-q"]) == 0
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["table_s1"]["total"]["frames"] == 24 and stats["table_s1"]["total"]["crystals"] == 0
    assert not (tmp_path / "p" / "crystals.stream").exists()
    assert (tmp_path / "p" / "peaks.geom").is_file()


def test_resume_gives_identical_outputs(run_dir, indexed, tmp_path):
    out = tmp_path / "resumed"
    assert main(["index", str(run_dir), "--out", str(out), "--chunk", "8", "--max-frames", "8", "-q"]) == 0
    assert not json.loads((out / "progress.json").read_text())["finished"]
    # a crash after the outputs of the next chunk were partly written but before progress.json was replaced
    with open(out / "crystals.stream", "a") as f:
        f.write("----- Begin chunk -----\nImage filename: peaks.cxi\nEvent: //99\n")
    assert main(["index", str(run_dir), "--out", str(out), "--chunk", "8", "--resume", "-q"]) == 0
    _same_outputs(indexed, out)


def test_resume_after_a_finished_run_changes_nothing(run_dir, indexed, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(indexed, out)
    assert main(["index", str(run_dir), "--out", str(out), "--chunk", "8", "--resume", "-q"]) == 0
    _same_outputs(indexed, out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "/nonexistent/run", "--out", "OUT"], "does not exist"),
        (["index", "RUN", "--out", "OUT", "--min-peaks", "3", "--min-peaks-second-round", "4"], "second-round"),
        (["index", "RUN", "--out", "OUT", "--geometry", "/no/such.geom"], "does not exist"),
        (["index", "RUN", "--out", "INDEXED"], "--resume"),
        (["index", "RUN", "--out", "INDEXED", "--resume", "--min-snr", "7"], "different configuration"),
    ],
)
def test_one_line_errors(run_dir, indexed, tmp_path, capsys, args, message):
    args = [
        a.replace("RUN", str(run_dir)).replace("INDEXED", str(indexed)).replace("OUT", str(tmp_path / "o"))
        for a in args
    ]
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpolaron: error:") and message in err[0]
