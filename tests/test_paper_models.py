"""Smoke test of experiments/paper_models.py: the --quick run writes every table, figure and summary."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_models.py"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up at class creation
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_all_outputs(tmp_path, capsys, monkeypatch):
    pm = _load(monkeypatch)
    out = tmp_path / "run"
    assert pm.main(["--quick", "--out", str(out), "-q"]) == 0
    assert "Paper model analyses" in capsys.readouterr().out

    for name in ("table.md", "table.csv", "config.json", "summary.md", "kscan_central_hole.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("dI_*.png")), "no ΔI window figure"

    with open(out / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_case: dict[str, set[str]] = {}
    for r in rows:
        by_case.setdefault(r["case"], set()).add(r["hkl"])
        assert r["m1_lobe_sign"] in ("in", "out", "0") and r["window"], r
    assert all(peaks == set(pm.PEAKS) for peaks in by_case.values())
    models = {r["model"] for r in rows}
    assert models == {"central-hole", "random-hole", "tilt", "phonon"}
    groups = {r["group"] for r in rows}
    assert {"a-scan", "a-central", "b", "c", "d"} <= groups
    n_scan = len({r["case"] for r in rows if r["group"] == "a-scan"})
    assert n_scan == len(pm.scan_directions(4)) == 3
    # both biases and both Br strengths of (b), both tilts of (c)
    b_cases = {r["case"] for r in rows if r["group"] == "b"}
    assert len(b_cases) == 4 and any("bias 0.1" in c and "weak Br" in c for c in b_cases)
    assert len({r["case"] for r in rows if r["group"] == "c"}) == 2

    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["method"] == "accurate" and "versions" in config["provenance"]
    # the deterministic models keep linear with its per-species bases, which match the direct runs
    assert config["basis_checks"] and all(c["rel_l2_dI"] < 1e-3 for c in config["basis_checks"])
    assert all("central hole" in c["case"] for c in config["basis_checks"])
    # the random holes ran accurate, each with its quadrature error (a second rule of twice the nodes)
    for case in config["cases"]:
        assert case["method"] == ("accurate" if case["model"] == "random-hole" else "linear"), case
        if case["group"] == "b":
            q = case["quadrature_error"]
            assert set(q) == set(pm.PEAKS) and all(v >= 0 for row in q.values() for v in row.values())
    # and their k scan ran directly, at both biases
    scan = [c for c in config["cases"] if c["group"] == "b-scan"]
    assert {c["params"]["hole_bias"] for c in scan} == {0.1, 1.0} and all(c["source"] == "direct" for c in scan)
    summary = (out / "summary.md").read_text()
    for heading in ("## (1)", "## (2)", "## (3)", "## (4)", "## (5)"):
        assert heading in summary
    assert "Margins (|m| / q" in summary and "Random-hole k scan (accurate" in summary
