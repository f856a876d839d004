"""Run a reduction stage as map (one unit of frames -> a partial result) and ordered reduce, here or on Dask.

Schedulers (`parse_scheduler`):
  in-process (default)  units run one after another in this process;
  local:N               a Dask LocalCluster of N single-threaded worker processes on this machine;
  tcp://HOST:PORT       a running Dask scheduler (workers started by the user, e.g. on Maxwell nodes);
  cluster slurm[:JOBS]  Dask workers submitted as SLURM jobs through dask-jobqueue (EuXFEL's Maxwell).
Partials are folded into the state strictly in unit order, whatever order workers finish in, so float sums
are bit-identical between schedulers and worker counts; at most `max_in_flight` units are outstanding, and
early finishers wait in a buffer, so memory stays bounded when partials are whole volumes.

Checkpoints: after the fold has reached unit k, the state and k are saved (HDF5, written to a temporary file
and renamed) at most every `every_seconds`, and at the end. A rerun with `resume` skips the first k units and
continues from the saved state; the checkpoint's fingerprint (the caller's hash of configuration and units)
must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """Where units run. kind: "inprocess" | "local" | "tcp" | "slurm"; workers: LocalCluster processes or SLURM
    jobs; address: tcp://HOST:PORT. SLURM job shape: queue (partition), cores, memory, walltime, account."""

    kind: str = "inprocess"
    workers: int = 1
    address: str | None = None
    queue: str = "upex"
    cores: int = 16
    memory: str = "128GB"
    walltime: str = "02:00:00"
    account: str | None = None


def parse_scheduler(text: str | None, cluster: str | None = None) -> SchedulerSpec:
    """The scheduler of `--scheduler TEXT` / `--cluster slurm[:JOBS]`; InputError (one line) for anything else."""
    if text and cluster:
        raise InputError("give either a scheduler or a cluster, not both.")
    if cluster is not None:
        m = re.fullmatch(r"slurm(?::(\d+))?", cluster.strip())
        if not m or (m.group(1) is not None and int(m.group(1)) < 1):
            raise InputError(f"cluster must be 'slurm' or 'slurm:JOBS' with JOBS >= 1, got {cluster!r}.")
        return SchedulerSpec("slurm", workers=int(m.group(1) or 1))
    if text is None or text.strip() in ("", "inprocess", "in-process"):
        return SchedulerSpec()
    text = text.strip()
    m = re.fullmatch(r"local:(\d+)", text)
    if m:
        if int(m.group(1)) < 1:
            raise InputError(f"local:N needs N >= 1 workers, got {text!r}.")
        return SchedulerSpec("local", workers=int(m.group(1)))
    if re.fullmatch(r"tcp://[^\s:/]+:\d+", text):
        return SchedulerSpec("tcp", address=text)
    raise InputError(f"scheduler must be local:N or tcp://HOST:PORT, got {text!r}.")


class _Deferred:
    """An in-process 'future': the call runs when its result is asked for (in the calling process)."""

    def __init__(self, fn, args, kwargs):
        self._call = (fn, args, kwargs)

    def result(self):
        fn, args, kwargs = self._call
        return fn(*args, **kwargs)


class InProcessExecutor:
    n_workers = 1

    def submit(self, fn, *args, **kwargs) -> _Deferred:
        return _Deferred(fn, args, kwargs)

    def broadcast(self, obj):
        return obj


class DaskExecutor:
    """A dask.distributed Client; broadcast() ships a large read-only argument to every worker once."""

    def __init__(self, client):
        self.client = client

    @property
    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def submit(self, fn, *args, **kwargs):
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def broadcast(self, obj):
        return self.client.scatter(obj, broadcast=True)


def slurm_cluster(spec: SchedulerSpec):
    """A dask-jobqueue SLURMCluster of one single-process worker per job (no job is submitted until scaled)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(queue=spec.queue, cores=spec.cores, processes=1, memory=spec.memory,
                        walltime=spec.walltime, account=spec.account)  # fmt: skip


@contextlib.contextmanager
def open_executor(spec: SchedulerSpec) -> Iterator[InProcessExecutor | DaskExecutor]:
    """The executor of `spec`; a Dask client and cluster are closed on exit (also after an error)."""
    if spec.kind == "inprocess":
        yield InProcessExecutor()
        return
    from dask.distributed import Client, LocalCluster

    cluster = None
    try:
        if spec.kind == "local":
            cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)  # fmt: skip
            client = Client(cluster)
        elif spec.kind == "tcp":
            try:
                client = Client(spec.address, timeout=30)
            except OSError as exc:
                raise InputError(f"cannot reach the Dask scheduler at {spec.address}: {exc}.") from None
        else:
            cluster = slurm_cluster(spec)
            cluster.scale(jobs=spec.workers)
            client = Client(cluster)
            client.wait_for_workers(1)
        try:
            yield DaskExecutor(client)
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class Checkpoint:
    """Where a stage saves its state: path (HDF5), fingerprint (caller's hash of configuration and units)."""

    path: Path
    fingerprint: str
    every_seconds: float = 60.0

    def __post_init__(self):
        self.path = Path(self.path)

    def load(self) -> tuple[int, object, bool] | None:
        """(units done, state, finished) of a matching checkpoint, None if there is none; InputError if it
        belongs to a different configuration or cannot be read."""
        if not self.path.is_file():
            return None
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("fingerprint") != self.fingerprint:
                    raise InputError(f"{self.path} was written with a different configuration or input; "
                                     "rerun without --resume (or remove it).")  # fmt: skip
                done, finished = int(f.attrs["units_done"]), bool(f.attrs["finished"])
                state = _read_state(f["state"]) if "state" in f else None
        except OSError as exc:
            raise InputError(f"cannot read checkpoint {self.path}: {str(exc).splitlines()[0]}.") from None
        return done, state, finished

    def save(self, done: int, state, finished: bool) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = self.fingerprint
            f.attrs["units_done"] = done
            f.attrs["finished"] = finished
            if state is not None:
                _write_state(f.create_group("state"), state)
        os.replace(tmp, self.path)


def _write_state(g: h5py.Group, state: dict) -> None:
    """A dict of numpy arrays, nested dicts of arrays, and JSON-able values (exact dtypes and bits)."""
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            g.create_dataset(k, data=v)
        elif isinstance(v, dict) and all(isinstance(x, np.ndarray) for x in v.values()) and v:
            _write_state(g.create_group(k), v)
        else:
            g.attrs[k] = json.dumps(v)


def _read_state(g: h5py.Group) -> dict:
    out: dict = {k: json.loads(v) for k, v in g.attrs.items()}
    for k, v in g.items():
        out[k] = _read_state(v) if isinstance(v, h5py.Group) else v[()]
    return out


# ------------------------------------------------------------------------------------------------ the stage
def run_stage(
    name: str,
    fn: Callable,
    units: Sequence,
    *,
    combine: Callable,
    initial,
    executor,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    progress: bool = False,
    max_in_flight: int | None = None,
    fn_args: tuple = (),
) -> object:
    """Fold fn(unit, *fn_args) over `units` in order: state = combine(state, partial), starting from `initial`.

    With `checkpoint` the state is saved as the fold advances; `resume` continues from a matching checkpoint
    (a finished one returns its state at once). Returns the final state.
    """
    from tqdm import tqdm

    state, start = initial, 0
    if checkpoint is not None and resume:
        saved = checkpoint.load()
        if saved is not None:
            start, state, finished = saved
            if finished:
                log.info("stage %s: complete in %s", name, checkpoint.path)
                return state
            log.info("stage %s: resuming after %d of %d units", name, start, len(units))
    limit = max_in_flight or 2 * executor.n_workers
    pending: dict[int, object] = {}
    next_submit = start
    last_save = time.monotonic()
    bar = tqdm(total=len(units), initial=start, unit="unit", desc=name, disable=not progress)
    try:
        for k in range(start, len(units)):
            while next_submit < len(units) and len(pending) < limit:
                pending[next_submit] = executor.submit(fn, units[next_submit], *fn_args)
                next_submit += 1
            state = combine(state, pending.pop(k).result())
            bar.update(1)
            if checkpoint is not None and time.monotonic() - last_save >= checkpoint.every_seconds:
                checkpoint.save(k + 1, state, finished=False)
                last_save = time.monotonic()
    finally:
        bar.close()
        for f in pending.values():
            if hasattr(f, "cancel"):
                f.cancel()
    if checkpoint is not None:
        checkpoint.save(len(units), state, finished=True)
    return state
