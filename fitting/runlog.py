"""Logged fit runs: the only module of `fitting` that writes files.

Every fit gets a run folder ROOT/<YYYYmmdd-HHMMSS>_<label>[_N]/ (local start time; _2, _3 … when the name
is taken) holding

    config.json    {"config": ..., "provenance": jaxpolaron.io.provenance()}   written at the start
    metrics.jsonl  one JSON object per optimiser step, appended, flushed and fsync'ed line by line, so a
                   killed fit leaves a readable partial log (`read_metrics` skips a half-written last line)
    result.json    {"result": ..., "provenance": ...}                          written by `finish`
    loss.png       loss (and gradient norm) vs step per multi-start            written by `finish`
    peaks.png      measured vs fitted ΔI in up to four peak windows            with a `PeakComparison`

and `finish` appends one line per run to ROOT/index.jsonl and one table row to ROOT/index.md, so a folder
of many fits can be compared at a glance. JSON files are written atomically (temporary file + os.replace).
NaN/inf losses are written as the JSON extensions NaN/Infinity, which Python's json reads back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
from datetime import datetime
from pathlib import Path

import jax
import numpy as np

from jaxpolaron.errors import InputError
from jaxpolaron.io import _json_default as _io_json_default
from jaxpolaron.io import check_writable, provenance

logger = logging.getLogger(__name__)

_MAX_SUFFIX = 1000  # run folders with one name per second; more is a runaway loop, not a use case


def _json_default(obj):
    """jax arrays like numpy ones (-> numbers and nested lists); the rest as in jaxpolaron.io."""
    if isinstance(obj, jax.Array):
        return np.asarray(obj).tolist()
    return _io_json_default(obj)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _append_line(path: Path, text: str) -> None:
    """Append `text` + newline in one write, then flush and fsync: a crash loses at most this line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    """JSON lines of `path`; an undecodable *last* line (a write cut short by a crash) is dropped, an
    undecodable line elsewhere is corruption and raises InputError."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a truncated last line", path)
                break
            raise InputError(f"{path}: line {i + 1} is not valid JSON ({e.msg}).") from e
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class PeakComparison:
    """Measured vs fitted ΔI in peak windows, for the four-peak figure (like the paper's Fig. 3b vs 5c).

    Attributes:
        hkls: (n,) pseudo-cubic (h, k, l).
        centres: (n, 3) window-centre q, Å⁻¹ (crystal frame).
        voxel: window voxel, Å⁻¹ (sample i at centre + voxel (i − m // 2)).
        measured, fitted: (n, m, m, m) ΔI, in `units`; NaN where there is no data.
        units: label of the ΔI units ("counts", "electrons^2", …).
    """

    hkls: list
    centres: np.ndarray
    voxel: float
    measured: np.ndarray
    fitted: np.ndarray
    units: str = "counts"

    def __post_init__(self):
        object.__setattr__(self, "centres", np.asarray(self.centres, float).reshape(-1, 3))
        object.__setattr__(self, "measured", np.asarray(self.measured, float))
        object.__setattr__(self, "fitted", np.asarray(self.fitted, float))
        n = len(self.hkls)
        if self.measured.shape != self.fitted.shape or self.measured.ndim != 4 or len(self.measured) != n:
            raise ValueError(f"measured and fitted must both be ({n}, m, m, m), got {self.measured.shape} "
                             f"and {self.fitted.shape}.")  # fmt: skip
        if len(self.centres) != n or not self.voxel > 0:
            raise ValueError(f"need {n} centres and voxel > 0, got {len(self.centres)} and {self.voxel}.")


class RunLog:
    """A run folder ROOT/<YYYYmmdd-HHMMSS>_<label>[_N]/ (a suffix _2, _3 … if the name exists).

    Creates ROOT (with parents) and the folder, and writes config.json = {"config": config,
    "provenance": jaxpolaron.io.provenance()}. Raises InputError (one line) if ROOT cannot be created or
    written to. `path` is the run folder.
    """

    def __init__(self, root: str | Path, label: str, config: dict):
        self.root = Path(root).expanduser()
        self.started = datetime.now().astimezone()
        # the label becomes part of a folder name: keep it to characters that are safe everywhere
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "run"
        stem = f"{self.started:%Y%m%d-%H%M%S}_{safe}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the run root {root}: {e.strerror or e}.") from e
        check_writable(self.root / "index.jsonl")
        self.path = self._claim(stem)
        self._metrics = self.path / "metrics.jsonl"
        self._metrics.touch()
        self._finished = False
        _write_json(self.path / "config.json", {"config": config, "provenance": provenance()})
        logger.info("run folder %s", self.path)

    def _claim(self, stem: str) -> Path:
        # mkdir (not exists + mkdir) so that two fits starting in the same second never share a folder
        for n in range(1, _MAX_SUFFIX + 1):
            path = self.root / (stem if n == 1 else f"{stem}_{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
            except OSError as e:
                raise InputError(f"cannot create the run folder {path}: {e.strerror or e}.") from e
        raise InputError(f"{self.root} already holds {_MAX_SUFFIX} runs named {stem}; choose another label.")

    def log_step(self, record: dict) -> None:
        """Append one step's metrics, e.g. {"start": 0, "step": 12, "loss": 1.2e3, "grad_norm": 4.5,
        "params": {...}}, as one JSON line of metrics.jsonl (flushed and fsync'ed)."""
        _append_line(self._metrics, json.dumps(record, default=_json_default))

    def finish(self, result: dict, *, summary: dict, comparison: PeakComparison | None = None) -> Path:
        """Close the run: write result.json (`result` + provenance), loss.png (if any step was logged),
        peaks.png (if `comparison` is given), and append one line to ROOT/index.jsonl,
        {"run": folder name, "time": ISO start time, **summary}, and one row to ROOT/index.md.

        summary: a small flat dict (model, loss, aic, bic, n_params, "parameter": value, …).
        Returns the run folder. A run can be finished once."""
        from jaxpolaron.plotting import plot_loss_curve, plot_peak_comparison

        if self._finished:
            raise RuntimeError(f"run {self.path.name} is already finished.")
        _write_json(self.path / "result.json", {"result": result, "provenance": provenance()})
        records = [r for r in read_metrics(self.path) if "loss" in r]
        if records:
            plot_loss_curve(records, self.path / "loss.png", title=self.path.name)
        if comparison is not None:
            c = comparison
            plot_peak_comparison(c.hkls, c.centres, c.voxel, c.measured, c.fitted, self.path / "peaks.png",
                                 units=c.units, title=self.path.name)  # fmt: skip
        entry = {"run": self.path.name, "time": self.started.isoformat(timespec="seconds"), **summary}
        line = json.dumps(entry, default=_json_default)  # serialise first: a bad summary leaves the index intact
        _append_line(self.root / "index.jsonl", line)
        self._append_markdown_row(json.loads(line))
        self._finished = True
        logger.info("finished run %s", self.path)
        return self.path

    def _append_markdown_row(self, entry: dict) -> None:
        md = self.root / "index.md"
        try:  # "x": only the first run writes the header, even with two fits finishing together
            with open(md, "x", encoding="utf-8") as f:
                f.write("| run | time | summary |\n|---|---|---|\n")
        except FileExistsError:
            pass

        def fmt(v) -> str:
            text = f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, dict | list) else str(v)
            return text.replace("|", "\\|")

        summary = ", ".join(f"{k}={fmt(v)}" for k, v in entry.items() if k not in ("run", "time"))
        _append_line(md, f"| {entry['run']} | {entry['time']} | {summary} |")


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a run folder's metrics.jsonl (or of that file itself), in logged order.
    A truncated last line (a crash mid-write) is ignored; a missing file raises InputError."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file} does not exist; is {path} a run folder?")
    return _read_jsonl(file)


def read_index(root: str | Path) -> list[dict]:
    """The lines of ROOT/index.jsonl (one per finished run, oldest first); [] when no run has finished."""
    file = Path(root) / "index.jsonl"
    return _read_jsonl(file) if file.is_file() else []
