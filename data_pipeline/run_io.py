"""EuXFEL runs on disk: write synthetic EXDF run directories that `extra_data.RunDirectory` opens unchanged, and
read runs (synthetic or real) back in chunks of frames, robustly. With `io.py`, the only data_pipeline module
that touches files.

Layout written (extra-data's own mock writer `extra_data.tests.mockdata.write_file`, then filled with h5py; one
sequence file per `trains_per_file` trains):
  CORR-R{run}-AGIPD{m:02}-S{seq:05}.h5   source SPB_DET_AGIPD1M-1/CORR/{m}CH0:output, image.data (frames, 512,
                                         128) float32 [photons] (gzip 1, one chunk per frame), image.mask uint32
                                         (nonzero = bad), image.gain uint8 (0: high gain), image.cellId,
                                         image.pulseId (= bunch-pattern slot), image.trainId
  CORR-R{run}-DA01-S{seq:05}.h5          SPB_RR_SYS/TSYS/TIMESERVER:outputBunchPattern data.bunchPatternTable
  agipd.geom                             CrystFEL geometry (data_pipeline.io.write_crystfel_geom)
  truth.hdf5                             per frame and per crystal (see `write_run`); attrs: config JSON
  config.json                            synthetic config, run layout, model, provenance (jaxpolaron.io.provenance)
A sequence is written under `.partial/` and moved into place only when complete, then its truth rows are
appended; `complete_sequences` finds where an interrupted run stops, so it can be resumed. Memory is constant
in the run length (one chunk of frames and one sequence's truth rows).

Reading (`open_run`, `iter_frames`): trains are streamed `chunk` frames at a time (never a whole run or
train); every problem with the data is reported in a `SkipReport` instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

from data_pipeline.bunch_pattern import pumped as decode_pumped
from data_pipeline.io import write_crystfel_geom
from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)

AGIPD_SOURCE = "SPB_DET_AGIPD1M-1/CORR/{m}CH0:output"
TIMESERVER = "SPB_RR_SYS/TSYS/TIMESERVER"
BUNCH_PATTERN_SOURCE = TIMESERVER + ":outputBunchPattern"
BUNCH_PATTERN_KEY = "data.bunchPatternTable"
N_MODULES = 16
MODULE_SHAPE = (512, 128)
PARTIAL_DIR = ".partial"
TRUTH_FILE = "truth.hdf5"
GEOM_FILE = "agipd.geom"
CONFIG_FILE = "config.json"


# ------------------------------------------------------------------------------------------------ writing
def _timeserver_device():
    from extra_data.tests.mockdata.base import DeviceBase

    class TimeServer(DeviceBase):
        output_channels = ("outputBunchPattern/data",)  # EXDF: source "<device>:<channel>", index group "data"
        instrument_keys = [("bunchPatternTable", "u4", (2700,))]  # noqa: RUF012 (mock DeviceBase API)

    return TimeServer(TIMESERVER)


def module_file(run: int, module: int, seq: int) -> str:
    return f"CORR-R{run:04d}-AGIPD{module:02d}-S{seq:05d}.h5"


def timeserver_file(run: int, seq: int) -> str:
    return f"CORR-R{run:04d}-DA01-S{seq:05d}.h5"


def _sequence_files(run: int, seq: int) -> list[str]:
    return [module_file(run, m, seq) for m in range(N_MODULES)] + [timeserver_file(run, seq)]


def _create_sequence(out: Path, run: int, seq: int, first_train: int, n_trains: int, n_pulses: int, table):
    """Empty EXDF files (mock writer) of one sequence in `out`; returns the 16 module file paths."""
    from extra_data.tests.mockdata import write_file
    from extra_data.tests.mockdata.detectors import AGIPDModule

    paths = []
    for m in range(N_MODULES):
        path = out / module_file(run, m, seq)
        dev = AGIPDModule(
            AGIPD_SOURCE.format(m=m).split(":")[0], channel_name="output", raw=False, frames_per_train=n_pulses
        )
        write_file(str(path), [dev], ntrains=n_trains, firsttrain=first_train, chunksize=n_trains, format_version="1.2")
        with h5py.File(path, "r+") as f:  # image.data: gzip 1 (Poisson counts: ~60 kB instead of 4 MB per frame)
            g = f[f"INSTRUMENT/{AGIPD_SOURCE.format(m=m)}/image"]
            shape = g["data"].shape
            del g["data"]
            g.create_dataset(
                "data", shape, np.float32, chunks=(1, *MODULE_SHAPE), maxshape=shape, compression="gzip",
                compression_opts=1,
            )  # fmt: skip
        paths.append(path)
    ts = out / timeserver_file(run, seq)
    write_file(str(ts), [_timeserver_device()], ntrains=n_trains, firsttrain=first_train, chunksize=n_trains,
               format_version="1.2")  # fmt: skip
    with h5py.File(ts, "r+") as f:
        f[f"INSTRUMENT/{BUNCH_PATTERN_SOURCE}/data/bunchPatternTable"][:] = table
    return paths


def _frames_per_sequence(layout, trains_per_file: int) -> int:
    return trains_per_file * layout.n_pulses


def _n_sequences(layout, trains_per_file: int) -> int:
    return -(-layout.n_trains // trains_per_file)


def complete_sequences(out_dir: str | Path, layout, *, trains_per_file: int, run_number: int = 1) -> int:
    """How many leading sequences of an interrupted synthetic run are complete (files and truth rows).

    Cleans up after the interruption: removes `.partial/`, the files of later sequences, and truth rows
    beyond the complete sequences. Raises InputError when the directory is not a synthetic run.
    """
    out = Path(out_dir)
    if not (out / CONFIG_FILE).is_file() or not (out / GEOM_FILE).is_file():
        raise InputError(f"{out} is not a synthetic run to resume ({CONFIG_FILE} or {GEOM_FILE} missing).")
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    n_seq = _n_sequences(layout, trains_per_file)
    files_done = 0
    while files_done < n_seq and all((out / name).is_file() for name in _sequence_files(run_number, files_done)):
        files_done += 1
    rows = 0
    if (out / TRUTH_FILE).is_file():
        try:
            with h5py.File(out / TRUTH_FILE, "r") as f:
                rows = int(f["trainId"].shape[0]) if "trainId" in f else 0
        except OSError as exc:
            raise InputError(f"{out / TRUTH_FILE} is unreadable ({exc}); start again with --overwrite.") from None
    per_seq = _frames_per_sequence(layout, trains_per_file)
    done = min(files_done, -(-rows // per_seq) if rows == layout.n_frames else rows // per_seq)
    for seq in range(done, n_seq):
        for name in _sequence_files(run_number, seq):
            (out / name).unlink(missing_ok=True)
    if (out / TRUTH_FILE).is_file():
        keep = min(done * per_seq, layout.n_frames)
        with h5py.File(out / TRUTH_FILE, "r+") as f:
            for name in list(f):
                if isinstance(f[name], h5py.Dataset) and f[name].shape[0] > keep:
                    f[name].resize(keep, axis=0)
    return done


def write_run(
    out_dir: str | Path,
    frames: Iterable[tuple[np.ndarray, object]],
    *,
    layout,
    geometry,
    mask: np.ndarray,
    config: dict | None = None,
    truth_attrs: dict | None = None,
    run_number: int = 1,
    trains_per_file: int = 250,
    chunk: int = 32,
    progress: bool = True,
    start_sequence: int = 0,
    allow: tuple[str, ...] = (),
) -> Path:
    """Write a synthetic run (or, with `start_sequence` > 0, continue one; see `complete_sequences`).

    Args:
        out_dir: new or empty directory (start_sequence 0).
        frames: iterator of (photons (16, 512, 128), truth) in train/pulse order, starting at frame
            start_sequence · trains_per_file · n_pulses; truth is a `data_pipeline.synthetic.Crystals`.
        layout: `data_pipeline.synthetic.RunLayout` (trains, pulses, bunch pattern).
        geometry: extra-geom AGIPD-1M geometry (written as CrystFEL .geom).
        mask: (16, 512, 128) uint32 bad-pixel mask, written with every frame.
        config: JSON-serialisable settings saved in config.json (key "synthetic": SyntheticConfig.to_dict(),
            whose clen_m/energy_kev are used for the .geom; other keys, e.g. "model", are saved as given).
        truth_attrs: extra arrays/values for truth.hdf5 (e.g. hole positions), written once as datasets
            under `run/`.
        chunk: frames buffered per write.
        allow: file names that may already be in `out_dir` when starting (e.g. a volume cache).

    truth.hdf5 (one row per frame, in file order): trainId, pulseId (uint64), pumped (bool), n_crystals
    (int32); per crystal (frames, max_crystals[, ...]): rotations (3, 3) with q_lab = R q_crystal,
    size_index (int32), sizes_nm (float32), variant (int32 pumped-table variant, -1 dark), crystal_pumped
    (bool); entries beyond n_crystals are unused. Attribute "config": the config JSON.
    """
    from jaxpolaron.io import provenance

    out = Path(out_dir)
    config = dict(config or {})
    synth = dict(config.get("synthetic", {}))
    if start_sequence == 0:
        out.mkdir(parents=True, exist_ok=True)
        if any(p.name not in allow for p in out.iterdir()):
            raise InputError(f"output directory {out} is not empty.")
        write_crystfel_geom(
            geometry, out / GEOM_FILE, clen_m=synth.get("clen_m", 0.1224), energy_kev=synth.get("energy_kev", 13.6)
        )
        doc = {
            **config,
            "layout": layout.to_dict(),
            "trains_per_file": trains_per_file,
            "run_number": run_number,
            "units": "photons",
            "provenance": provenance(),
        }
        (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2, default=str))
        with h5py.File(out / TRUTH_FILE, "w") as truth:
            truth.attrs["config"] = json.dumps(config, default=str)
            truth.attrs["note"] = "q_lab = R q_crystal; per-crystal entries beyond n_crystals are unused"
            for name, value in (truth_attrs or {}).items():
                truth.create_dataset(f"run/{name}", data=np.asarray(value))
    mask = np.asarray(mask, np.uint32)
    table = layout.table(min(trains_per_file, layout.n_trains))
    pulse_ids = layout.pulse_ids()
    n_p = layout.n_pulses
    it = iter(frames)
    n_seq = _n_sequences(layout, trains_per_file)
    done_frames = min(start_sequence * trains_per_file, layout.n_trains) * n_p
    bar = tqdm(total=layout.n_frames, initial=done_frames, unit="frame", disable=not progress, smoothing=0.05)
    partial = out / PARTIAL_DIR
    for seq in range(start_sequence, n_seq):
        t0 = seq * trains_per_file
        nt = min(trains_per_file, layout.n_trains - t0)
        first_train = int(layout.first_train) + t0
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        paths = _create_sequence(partial, run_number, seq, first_train, nt, n_p, table[:nt])
        rows: list = []
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(h5py.File(p, "r+")) for p in paths]
            groups = [f[f"INSTRUMENT/{AGIPD_SOURCE.format(m=m)}/image"] for m, f in enumerate(files)]
            for g in groups:
                g["pulseId"][:] = np.tile(pulse_ids, nt)
                g["cellId"][:] = np.tile(np.arange(n_p, dtype=np.uint16), nt)
            n_seq_frames = nt * n_p
            buf = np.empty((min(chunk, n_seq_frames), N_MODULES, *MODULE_SHAPE), np.float32)
            for a in range(0, n_seq_frames, chunk):
                k = min(chunk, n_seq_frames - a)
                for j in range(k):
                    try:
                        data, crystals = next(it)
                    except StopIteration:
                        raise ValueError(f"frames ended before the {layout.n_frames} the layout needs") from None
                    buf[j] = data
                    rows.append(crystals)
                for m, g in enumerate(groups):
                    g["data"][a : a + k] = buf[:k, m]
                    g["mask"][a : a + k] = np.broadcast_to(mask[m], (k, *MODULE_SHAPE))
                bar.update(k)
        for p in [*paths, partial / timeserver_file(run_number, seq)]:
            os.replace(p, out / p.name)
        _append_truth(out / TRUTH_FILE, rows, first_train, n_p, pulse_ids)
    shutil.rmtree(partial, ignore_errors=True)
    bar.close()
    if next(it, None) is not None:
        raise ValueError(f"more frames than the {layout.n_frames} the layout holds")
    return out


def _append_truth(path: Path, rows, first_train: int, n_p: int, pulse_ids) -> None:
    idx = np.arange(len(rows))
    n = np.array([int(r.n) for r in rows], np.int32)
    max_c = np.asarray(rows[0].rotations).shape[0]
    exists = np.arange(max_c)[None, :] < n[:, None]
    pumped = np.array([bool(r.pumped) for r in rows])
    cols = {
        "trainId": (first_train + idx // n_p).astype(np.uint64),
        "pulseId": pulse_ids[idx % n_p].astype(np.uint64),
        "pumped": pumped,
        "n_crystals": n,
        "rotations": np.stack([np.asarray(r.rotations, np.float32) for r in rows]),
        "size_index": np.stack([np.asarray(r.size_index, np.int32) for r in rows]),
        "sizes_nm": np.stack([np.asarray(r.sizes_nm, np.float32) for r in rows]),
        "variant": np.where(exists, np.stack([np.asarray(r.variant, np.int32) for r in rows]), -1).astype(np.int32),
        "crystal_pumped": exists & pumped[:, None],
    }
    with h5py.File(path, "a") as f:
        for name, v in cols.items():
            if name not in f:
                f.create_dataset(
                    name, (0, *v.shape[1:]), v.dtype, maxshape=(None, *v.shape[1:]), chunks=(1024, *v.shape[1:])
                )
            d = f[name]
            d.resize(d.shape[0] + len(v), axis=0)
            d[-len(v) :] = v


def read_truth(run_dir: str | Path) -> dict[str, np.ndarray]:
    """truth.hdf5 as a dict of arrays (per-frame/per-crystal datasets; `run/...` entries keyed 'run/name')."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(Path(run_dir) / TRUTH_FILE, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["config"] = json.loads(f.attrs.get("config", "{}"))  # type: ignore[assignment]
    return out


# ------------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass
class SkipReport:
    """What a reader skipped or repaired, and why (print it: `str(report)`).

    entries: (where, reason) per skipped train/file/source; `where` is a file name, 'train <id>' or a source.
    counts: tallies, e.g. 'trains read', 'frames read', 'trains skipped', 'nonfinite pixels', 'frames with
    nonfinite pixels', 'files unreadable'.
    """

    entries: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    counts: Counter = dataclasses.field(default_factory=Counter)

    def skip(self, where: str, reason: str, count: str | None = None) -> None:
        self.entries.append((where, reason))
        if count:
            self.counts[count] += 1
        log.warning("skipped %s: %s", where, reason)

    @property
    def ok(self) -> bool:
        return not self.entries and not self.counts["nonfinite pixels"]

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "entries": [list(e) for e in self.entries]}

    def __str__(self) -> str:
        lines = ["read report: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))]
        lines += [f"  {where}: {reason}" for where, reason in self.entries]
        return "\n".join(lines)


class FrameChunk(NamedTuple):
    """Up to `chunk` consecutive frames of one train.

    train_id: int. pulse_ids: (n,) int64 bunch-pattern slots. frames: (n, 16, 512, 128) float32, detector
    units (photons for synthetic runs), non-finite values replaced by 0. good: (n, 16, 512, 128) bool, True
    where a pixel is usable (image.mask == 0, finite, module present). pumped: (n,) int8, 1 pumped, 0 dark,
    -1 unknown (no bunch pattern).
    """

    train_id: int
    pulse_ids: np.ndarray
    frames: np.ndarray
    good: np.ndarray
    pumped: np.ndarray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def open_run(path_or_proposal: str | Path | int, run: int | None = None, *, data: str = "proc", report=None):
    """An extra-data `DataCollection` of a run directory (path) or of (proposal, run) at EuXFEL (`data` 'proc'
    or 'raw'). Files extra-data cannot open are left out and listed in `report` (a `SkipReport`); a run with
    nothing readable raises InputError."""
    import extra_data

    report = SkipReport() if report is None else report
    stderr = io.StringIO()  # extra-data prints "Skipping file X / (error was: Y)" for files it cannot open
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        try:
            if run is None:
                path = Path(path_or_proposal)
                if not path.is_dir():
                    raise InputError(f"run directory {path} does not exist.")
                dc = extra_data.RunDirectory(str(path))
            else:
                dc = extra_data.open_run(int(path_or_proposal), int(run), data=data)
        except InputError:
            raise
        except Exception as exc:  # extra-data raises assorted errors (no files, all unreadable, no proposal)
            raise InputError(f"cannot open run {path_or_proposal}{'' if run is None else f' {run}'}: "
                             f"{_first_line(exc)}.") from None  # fmt: skip
    skipped = re.findall(r"Skipping file (\S+)\n\s*\(error was: (.*)\)", stderr.getvalue())
    for name, reason in skipped:
        report.skip(name, f"unreadable, left out: {reason}", "files unreadable")
    rest = re.sub(r"Skipping file \S+\n\s*\(error was: .*\)\n?", "", stderr.getvalue()).strip()
    if rest:
        sys.stderr.write(rest + "\n")
    for w in caught:
        report.skip("run", f"extra-data: {str(w.message).splitlines()[0]}", "extra-data warnings")
    return dc


def iter_frames(
    run,
    *,
    chunk: int = 32,
    report: SkipReport | None = None,
    modules: Iterable[int] = range(N_MODULES),
    progress: bool = False,
) -> Iterator[FrameChunk]:
    """Stream the AGIPD-1M frames of a run, `chunk` frames at a time (never a whole train in memory).

    Args:
        run: an extra-data DataCollection (`open_run`) or a run directory path.
        chunk: frames per yielded `FrameChunk`.
        report: collects what was skipped (a new one when None; pass your own to read it afterwards).
        modules: module numbers expected (default all 16).

    Problems never stop the iteration; each becomes a report entry:
      - a module source absent from the whole run: that module is marked not good in every frame;
      - a train where a present module has no or a different number of frames: the train is skipped;
      - a read error (truncated/corrupt file): the rest of the train is skipped ('train <id>');
      - NaN/inf pixels: set to 0, marked not good, counted ('nonfinite pixels');
      - no bunch-pattern source: a warning (once), pumped = -1 for every frame; a train missing from it: -1.
    """
    from extra_data import by_id

    report = SkipReport() if report is None else report
    if isinstance(run, str | Path):
        run = open_run(run, report=report)
    modules = list(modules)
    sources = {m: AGIPD_SOURCE.format(m=m) for m in modules}
    present = {m: s for m, s in sources.items() if s in run.instrument_sources}
    for m, s in sources.items():
        if m not in present:
            report.skip(s, "module source missing from the run: module masked", "modules missing")
    if not present:
        raise InputError("the run has no AGIPD-1M module sources (SPB_DET_AGIPD1M-1/CORR/*CH0:output).")
    # frames per train and module, from the INDEX sections only (no data read)
    train_ids = np.unique(np.concatenate([np.asarray(run[s, "image.data"].train_ids) for s in present.values()]))
    counts = np.zeros((len(present), len(train_ids)), np.int64)
    for row, s in enumerate(present.values()):
        kd = run[s, "image.data"]
        counts[row, np.searchsorted(train_ids, np.asarray(kd.train_ids))] = kd.data_counts(labelled=False)
    table_kd = None
    if BUNCH_PATTERN_SOURCE in run.instrument_sources:
        table_kd = run[BUNCH_PATTERN_SOURCE, BUNCH_PATTERN_KEY]
        table_trains = set(int(t) for t in table_kd.train_ids)
    else:
        log.warning("no bunch-pattern source %s: pump state unknown (pumped = -1)", BUNCH_PATTERN_SOURCE)
        report.counts["bunch pattern missing"] = 1
    bar = tqdm(total=int(counts.max(axis=0).sum()), unit="frame", disable=not progress)
    for col, tid in enumerate(train_ids):
        tid = int(tid)
        c = counts[:, col]
        if c.max() == 0:
            continue
        if (c != c.max()).any():
            bad = [m for m, k in zip(present, c, strict=True) if k != c.max()]
            report.skip(f"train {tid}", f"module(s) {bad} have {sorted(set(c.tolist()))} frames", "trains skipped")
            continue
        n = int(c[0])
        try:
            keys = {m: (run[s, "image.data"].select_trains(by_id[[tid]]),
                        run[s, "image.mask"].select_trains(by_id[[tid]]),
                        run[s, "image.pulseId"].select_trains(by_id[[tid]])) for m, s in present.items()}  # fmt: skip
            pids = np.asarray(next(iter(keys.values()))[2].ndarray(), np.int64).reshape(-1)
            pumped = np.full(n, -1, np.int8)
            if table_kd is not None:
                if tid in table_trains:
                    table = table_kd.select_trains(by_id[[tid]]).ndarray()
                    pumped = decode_pumped(table, pids[None])[0].astype(np.int8)
                else:
                    report.counts["trains without bunch pattern"] += 1
        except Exception as exc:  # truncated/corrupt files: h5py/extra-data raise OSError, KeyError, ...
            report.skip(f"train {tid}", f"cannot read: {_first_line(exc)}", "trains skipped")
            continue
        read = 0
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            frames = np.zeros((b - a, len(modules), *MODULE_SHAPE), np.float32)
            good = np.zeros(frames.shape, bool)
            try:
                for i, m in enumerate(modules):
                    if m not in keys:
                        continue
                    kd_data, kd_mask, _ = keys[m]
                    frames[:, i] = _read_frames(kd_data, a, b)
                    good[:, i] = _read_frames(kd_mask, a, b) == 0
            except Exception as exc:
                report.skip(f"train {tid}", f"cannot read frames {a}..{n - 1}: {_first_line(exc)}", "trains skipped")
                break
            finite = np.isfinite(frames)
            if not finite.all():
                bad_px = ~finite
                report.counts["nonfinite pixels"] += int(bad_px.sum())
                report.counts["frames with nonfinite pixels"] += int(bad_px.any(axis=(1, 2, 3)).sum())
                frames[bad_px] = 0.0
                good &= finite
            read += b - a
            bar.update(b - a)
            yield FrameChunk(tid, pids[a:b], frames, good, pumped[a:b])
        report.counts["frames read"] += read
        report.counts["trains read"] += int(read == n)
    bar.close()


def _read_frames(kd, a: int, b: int) -> np.ndarray:
    """Frames a..b-1 of a one-train KeyData selection, (b - a, 512, 128), reading only those frames.

    Uses extra-data's per-file chunk list (`KeyData._data_chunks_nonempty`, private in 1.25) to slice the HDF5
    datasets directly; falls back to reading the train (`KeyData.ndarray`) if that changes.
    """
    chunks = getattr(kd, "_data_chunks_nonempty", None)
    if chunks is None:
        return kd.ndarray()[a:b]
    out = np.empty((b - a, *kd.entry_shape), kd.dtype)
    done = 0
    for ch in chunks:  # one (file, slice) per contiguous run of this train's frames
        lo, hi = max(a - done, 0), min(b - done, ch.total_count)
        if hi > lo:
            out[done + lo - a : done + hi - a] = ch.dataset[ch.slice.start + lo : ch.slice.start + hi]
        done += ch.total_count
    return out


def read_frames(
    run_dir: str | Path, chunk: int = 32
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a run: yields (train_id, pulse_ids (n,), frames (n, 16, 512, 128), mask (n, 16, 512, 128) uint32
    (nonzero = bad), pumped (n,) bool) with n <= chunk frames of one train (`iter_frames` without the report;
    kept for callers of the first version)."""
    for c in iter_frames(run_dir, chunk=chunk):
        yield c.train_id, c.pulse_ids, c.frames, (~c.good).astype(np.uint32), c.pumped == 1


def load_geometry(path: str | Path | None = None, run_dir: str | Path | None = None):
    """AGIPD-1M geometry: a CrystFEL .geom `path`; else the run directory's agipd.geom; else the default quadrant
    positions (`data_pipeline.geometry.default_agipd_geometry`, with a warning)."""
    from data_pipeline.geometry import default_agipd_geometry
    from data_pipeline.io import read_crystfel_geom

    if path is not None:
        return read_crystfel_geom(path)
    if run_dir is not None and (Path(run_dir) / GEOM_FILE).is_file():
        return read_crystfel_geom(Path(run_dir) / GEOM_FILE)
    log.warning("no geometry given: using the default AGIPD-1M quadrant positions")
    return default_agipd_geometry()
