"""Run folders of fits (fitting.runlog) and the fit figures (plot_loss_curve, plot_peak_comparison, plot_profile)."""

import json
import math
from datetime import datetime

import jax.numpy as jnp
import numpy as np
import pytest

from fitting import runlog
from fitting.runlog import PeakComparison, RunLog, read_index, read_metrics
from jaxpolaron.errors import InputError
from jaxpolaron.plotting import _slice_axes, plot_loss_curve, plot_peak_comparison, plot_profile

PNG = b"\x89PNG\r\n\x1a\n"


class _FrozenClock(datetime):
    """Every run starts at the same second, as two fits launched together would."""

    @classmethod
    def now(cls, tz=None):
        return datetime(2024, 5, 6, 7, 8, 9)


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _peak_windows(n: int = 2, m: int = 9, voxel: float = 0.01):
    """n windows whose ΔI is the x-derivative of a Gaussian (a peak shifted along q_x), fitted = 0.8 × it."""
    q = (np.arange(m) - m // 2) * voxel
    x, y, z = np.meshgrid(q, q, q, indexing="ij")
    sigma = 2 * voxel
    d = -x / sigma**2 * np.exp(-(x**2 + y**2 + z**2) / (2 * sigma**2))
    measured = np.stack([d * (j + 1) for j in range(n)])
    measured[0, 0, 0, 0] = np.nan  # a voxel without data is drawn grey, not an error
    hkls = [(2, 0, 0), (1, 1, 1), (2, 1, 0), (2, 2, 0), (3, 0, 0)][:n]
    centres = np.array(hkls, float) / 5.87
    return PeakComparison(hkls, centres, voxel, measured, 0.8 * np.nan_to_num(measured), units="counts")


def _log_two_starts(run: RunLog, steps: int = 5) -> None:
    for start in (0, 1):
        for step in range(steps):
            params = {"r_hole": jnp.asarray(3.0 + step)}
            grad_norm = np.float32(1.0 / (step + 1))
            run.log_step({"start": start, "step": step, "loss": 100.0 / (step + 1 + start), "grad_norm": grad_norm,
                          "params": params})  # fmt: skip


def test_run_folder_unique_suffix_and_config(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "datetime", _FrozenClock)
    config = {"model": "hole", "lr": np.float32(0.01), "init": jnp.array([1.0, 2.0]), "n": np.int64(3)}
    runs = [RunLog(tmp_path / "out" / "nested", "hole fit/1", config) for _ in range(3)]
    names = [r.path.name for r in runs]
    assert names == ["20240506-070809_hole_fit_1", "20240506-070809_hole_fit_1_2", "20240506-070809_hole_fit_1_3"]
    saved = json.loads((runs[0].path / "config.json").read_text())
    assert saved["config"] == {"model": "hole", "lr": pytest.approx(0.01), "init": [1.0, 2.0], "n": 3}
    assert {"versions", "git_commit", "timestamp", "jax_backend"} <= saved["provenance"].keys()
    assert read_metrics(runs[0].path) == []  # an empty log exists from the start


def test_metrics_round_trip(tmp_path):
    run = RunLog(tmp_path, "rt", {})
    records = [
        {"start": 0, "step": 0, "loss": 12.5, "grad_norm": np.float64(3.0), "params": {"a": jnp.array([1.0, 2.0])}},
        {"start": 0, "step": 1, "loss": float("nan"), "params": {"a": np.array([1.5, 2.5])}},
    ]
    for r in records:
        run.log_step(r)
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    back = read_metrics(run.path)
    assert back[0] == {"start": 0, "step": 0, "loss": 12.5, "grad_norm": 3.0, "params": {"a": [1.0, 2.0]}}
    assert math.isnan(back[1]["loss"]) and back[1]["params"] == {"a": [1.5, 2.5]}
    assert read_metrics(run.path / "metrics.jsonl")[0] == back[0]  # the file itself works too


def test_truncated_last_line_is_ignored(tmp_path):
    run = RunLog(tmp_path, "crash", {})
    run.log_step({"step": 0, "loss": 2.0})
    run.log_step({"step": 1, "loss": 1.0})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')  # killed mid-write
    assert read_metrics(run.path) == [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0}]
    # corruption before the last line is not a crash signature: it is reported
    text = (run.path / "metrics.jsonl").read_text()
    (run.path / "metrics.jsonl").write_text("garbage\n" + text + "}\n")
    with pytest.raises(InputError, match="line 1"):
        read_metrics(run.path)


def test_finish_writes_results_figures_and_one_index_line_per_run(tmp_path):
    root = tmp_path / "fits"
    for i in range(2):
        run = RunLog(root, f"run{i}", {"i": i})
        _log_two_starts(run)
        summary = {"model": "hole", "loss": 25.0 + i, "aic": np.float64(31.0), "n_params": 3, "r_hole": 3.2}
        folder = run.finish({"params": {"r_hole": jnp.asarray(3.2)}, "loss": 25.0}, summary=summary,
                            comparison=_peak_windows())  # fmt: skip
        assert folder == run.path
        result = json.loads((folder / "result.json").read_text())
        assert result["result"] == {"params": {"r_hole": pytest.approx(3.2)}, "loss": 25.0}
        assert "versions" in result["provenance"]
        assert _is_png(folder / "loss.png") and _is_png(folder / "peaks.png")
        index = read_index(root)
        assert len(index) == i + 1
        assert index[-1]["run"] == folder.name and index[-1]["loss"] == 25.0 + i and index[-1]["aic"] == 31.0
        datetime.fromisoformat(index[-1]["time"])
        md = (root / "index.md").read_text().splitlines()
        assert len(md) == 2 + i + 1  # header + separator + one row per run
        assert md[-1].startswith(f"| {folder.name} |") and "loss=" + f"{25.0 + i:.6g}" in md[-1]
    with pytest.raises(RuntimeError, match="already finished"):
        run.finish({}, summary={})
    assert len(read_index(root)) == 2


def test_finish_without_steps_or_comparison(tmp_path):
    run = RunLog(tmp_path, "empty", {})
    run.finish({"loss": None}, summary={"model": "none"})
    assert (run.path / "result.json").is_file()
    assert not (run.path / "loss.png").exists() and not (run.path / "peaks.png").exists()
    assert read_index(tmp_path)[0]["model"] == "none"
    assert read_index(tmp_path / "nothing-here") == []


def test_unwritable_root_is_an_input_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot"):
        RunLog(blocker / "runs", "x", {})
    with pytest.raises(InputError):
        read_metrics(tmp_path / "not-a-run")


def test_peak_comparison_validates_shapes():
    good = _peak_windows()
    with pytest.raises(ValueError, match="measured and fitted"):
        PeakComparison(good.hkls, good.centres, good.voxel, good.measured, good.fitted[:, :-1])
    with pytest.raises(ValueError, match="centres"):
        PeakComparison(good.hkls, good.centres[:1], good.voxel, good.measured, good.fitted)


def test_plot_functions_on_synthetic_data(tmp_path):
    c = _peak_windows(n=5)  # more than four peaks: the first four are drawn
    out = plot_peak_comparison(c.hkls, c.centres, c.voxel, c.measured, c.fitted, tmp_path / "sub" / "peaks.png",
                               units="electrons^2", title="synthetic")  # fmt: skip
    assert _is_png(out)
    # loss only (no gradient norm), one start, and a loss that is not positive everywhere (linear axis)
    records = [{"step": s, "loss": 1.0 - 0.5 * s} for s in range(5)] + [{"step": 9, "note": "no loss"}]
    assert _is_png(plot_loss_curve(records, tmp_path / "deep" / "loss.png", title="linear"))
    with pytest.raises(ValueError, match="loss"):
        plot_loss_curve([{"step": 0}], tmp_path / "none.png")
    # a profile that runs to an unbounded end (inf) on a log axis, as `jaxpolaron fit --profile k_br` can give
    values = np.geomspace(0.2, 3000.0, 9)
    chi2 = 100.0 + np.minimum((np.log(values) - np.log(1.5)) ** 2 * 4.0, 2.3)
    intervals = {"2σ": (0.3, np.inf), "1σ": (0.7, np.inf)}
    assert _is_png(plot_profile("k_br", values, chi2, 2.5, tmp_path / "profile.png", intervals=intervals))


@pytest.mark.parametrize(
    ("g", "expected"),
    [((2, 0, 0), (0, 2, 1)), ((0, 0, 2), (2, 1, 0)), ((2, 1, 0), (0, 1, 2)), ((1, 1, 1), (0, 2, 1))],
)
def test_slice_plane_contains_g_main_axis(g, expected):
    main, perp, normal = _slice_axes(np.array(g, float))
    assert (main, perp, normal) == expected
    assert abs(g[normal]) == min(abs(g[i]) for i in (perp, normal))  # the cut is across G's smallest component
