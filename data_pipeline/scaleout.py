"""Run a reduction stage as map (one unit of work, e.g. a group of trains -> a partial result) and an ordered
reduce, in this process or on Dask, with checkpoints so an interrupted stage resumes to the identical result.

Schedulers (`parse_scheduler(text, cluster)`):
  None / "inprocess"   (default) units run one after another in this process, no threads, no Dask;
  "local:N"            a Dask LocalCluster of N worker processes with one thread each, on this machine;
  "tcp://HOST:PORT"    a running Dask scheduler (workers started by the user, e.g. on Maxwell nodes);
  cluster="slurm"      Dask workers submitted as SLURM jobs through dask-jobqueue (EuXFEL's Maxwell); options
                       in the string: "slurm:4" (jobs) or "slurm:jobs=4,queue=upex,cores=16,memory=128GB,
                       walltime=04:00:00,account=ACCOUNT" (see `SchedulerSpec`), or `dataclasses.replace(spec, ...)`.

`open_executor(spec)` yields an executor: `submit(fn, *args, **kwargs)` returns a future (`.result()`), and
`broadcast(obj)` ships a large read-only argument to every worker once and returns a handle that can be passed
to `submit` in place of the object (in-process: the object itself).

`run_stage` folds `state = combine(state, fn(unit, ...))` over the units strictly in unit order, whatever order
the workers finish in, so float sums are bit-identical between schedulers and worker counts. At most
`max_in_flight` units are submitted and not yet folded (results that finish early wait on their worker), so
memory stays bounded when partials are whole volumes.

Checkpoints (`Checkpoint`): after the fold has reached unit k, (state, k) is saved to an HDF5 file, written to a
temporary file beside it and renamed (a kill at any moment leaves either the old or the new checkpoint), every
`every_units` units and/or `every_seconds`, when the stage stops on an error or Ctrl-C, and at the end with a
`finished` flag. With `resume` a rerun skips the first k units and continues from the saved state (a finished
stage returns its state at once); the checkpoint's fingerprint (the caller's hash of configuration and units)
must match. States are pytrees of dicts, lists, tuples, numpy arrays and scalars and Python scalars; they
round-trip exactly (dtype and bits), so a resumed stage gives the same bits as an uninterrupted one.

Bits: Dask deserialises numpy arrays at arbitrary byte offsets, and numpy reduces misaligned arrays in another
order; arguments (on the worker) and partials (here) are therefore realigned (`realign`) before use.

JAX in Dask workers: each worker is a fresh process (spawned), so JAX settings of the calling process do not
carry over; `jax_enable_x64` is forwarded per task (the task runs inside `jax.enable_x64(True)` when the caller
had it on at submit time) so in-process and Dask runs compute in the same precision. XLA's own thread pool in
each worker is not limited by Dask's one thread per worker: set XLA_FLAGS in the environment if it oversubscribes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)

KINDS = ("inprocess", "local", "tcp", "slurm")
CHECKPOINT_FORMAT = "jaxpolaron.scaleout.checkpoint/1"


# ------------------------------------------------------------------------------------------------ schedulers
@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """Where the units of a stage run.

    kind: "inprocess" | "local" | "tcp" | "slurm". workers: LocalCluster worker processes (local) or SLURM jobs
    (slurm). address: "tcp://HOST:PORT" (tcp); connect_timeout: seconds to wait for that scheduler.
    SLURM jobs (dask-jobqueue SLURMCluster); the defaults (16 single-threaded workers sharing 128 GB per job on
    the 'upex' partition, 2 h) suit Maxwell user jobs, and every one can be overridden:
      queue: partition (`#SBATCH -p`); cores: CPUs per job (`--cpus-per-task`); processes: Dask worker processes
      per job (None: one single-threaded worker per core, like local:N); memory: per job (`--mem`, dask-jobqueue
      converts GB to GiB); walltime: "HH:MM:SS" or "D-HH:MM:SS"; account: `#SBATCH -A` (None: the user's
      default); interface: network interface the workers and scheduler talk over (e.g. "ib0"; None: the
      hostname's); local_directory: worker spill space on the node (e.g. "/scratch"); log_directory: where the
      job logs go (None: the current folder); job_extra_directives: further `#SBATCH` lines, e.g.
      ("--constraint=Gold-6240",); dashboard_address: the scheduler's dashboard (None: off; ":8787" to enable).
    """

    kind: str = "inprocess"
    workers: int = 1
    address: str | None = None
    connect_timeout: float = 30.0
    queue: str = "upex"
    cores: int = 16
    processes: int | None = None
    memory: str = "128GB"
    walltime: str = "02:00:00"
    account: str | None = None
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    job_extra_directives: tuple[str, ...] = ()
    dashboard_address: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"scheduler kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.workers < 1:
            raise InputError(f"the number of workers/jobs must be >= 1, got {self.workers}.")
        if self.kind == "tcp" and not self.address:
            raise InputError("a tcp scheduler needs an address tcp://HOST:PORT.")
        if self.kind != "slurm":
            return
        if self.cores < 1:
            raise InputError(f"SLURM cores per job must be >= 1, got {self.cores}.")
        if self.processes is not None and not 1 <= self.processes <= self.cores:
            raise InputError(f"SLURM processes per job must be between 1 and cores={self.cores}, got {self.processes}.")
        try:
            from dask.utils import parse_bytes

            if parse_bytes(self.memory) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise InputError(f"SLURM memory must look like '128GB', got {self.memory!r}.") from None
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d\d(:\d\d)?", self.walltime):
            raise InputError(f"SLURM walltime must look like HH:MM:SS or D-HH:MM:SS, got {self.walltime!r}.")

    @property
    def jobs(self) -> int:
        """SLURM jobs to submit (= workers)."""
        return self.workers

    @property
    def worker_processes(self) -> int | None:
        """Worker processes the spec asks for (None for a running scheduler: whatever is connected)."""
        if self.kind == "inprocess":
            return 1
        if self.kind == "local":
            return self.workers
        if self.kind == "slurm":
            return self.workers * (self.processes or self.cores)
        return None


_SLURM_KEYS = {
    "jobs": int, "queue": str, "partition": str, "cores": int, "processes": int, "memory": str, "walltime": str,
    "account": str, "interface": str, "local_directory": str, "log_directory": str,
}  # fmt: skip


def parse_scheduler(text: str | None, cluster: str | None = None) -> SchedulerSpec:
    """The scheduler of `--scheduler TEXT` / `--cluster slurm[:OPTIONS]`; InputError (one line) for anything else.

    text: None, "", "inprocess" -> in-process; "local:N" (N >= 1); "tcp://HOST:PORT".
    cluster: "slurm", "slurm:JOBS" or "slurm:KEY=VALUE,..." with keys jobs, queue (or partition), cores,
    processes, memory, walltime, account, interface, local_directory, log_directory.
    """
    text = None if text is None or not text.strip() else text.strip()
    if text is not None and cluster is not None:
        raise InputError("give either a scheduler (--scheduler) or a cluster (--cluster), not both.")
    if cluster is not None:
        return _parse_slurm(cluster.strip())
    if text is None or text.lower() in ("inprocess", "in-process"):
        return SchedulerSpec()
    m = re.fullmatch(r"local:(\S+)", text)
    if m:
        if not m.group(1).isdigit() or int(m.group(1)) < 1:
            raise InputError(f"local:N needs N >= 1 workers (a whole number), got {text!r}.")
        return SchedulerSpec("local", workers=int(m.group(1)))
    m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})", text)
    if m and 1 <= int(m.group(2)) <= 65535:
        return SchedulerSpec("tcp", address=text)
    raise InputError(f"scheduler must be local:N or tcp://HOST:PORT (or inprocess), got {text!r}.")


def _parse_slurm(cluster: str) -> SchedulerSpec:
    name, _, rest = cluster.partition(":")
    if name.lower() != "slurm":
        raise InputError(f"the only cluster is 'slurm' (dask-jobqueue), got {cluster!r}.")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not eq:
            key, value = "jobs", item
        if key not in _SLURM_KEYS:
            raise InputError(f"unknown SLURM option {item!r} in {cluster!r}; use slurm:JOBS or slurm:KEY=VALUE,... "
                             f"with keys {', '.join(_SLURM_KEYS)}.")  # fmt: skip
        if not value:
            raise InputError(f"SLURM option {key} needs a value in {cluster!r}.")
        if _SLURM_KEYS[key] is int and not value.isdigit():
            raise InputError(f"SLURM option {key} must be a whole number, got {value!r}.")
        field = "queue" if key == "partition" else "workers" if key == "jobs" else key
        options[field] = int(value) if _SLURM_KEYS[key] is int else value
    return SchedulerSpec("slurm", **options)


def slurm_options(spec: SchedulerSpec) -> dict:
    """The keyword arguments of dask_jobqueue.SLURMCluster for `spec`."""
    opts: dict[str, Any] = dict(
        queue=spec.queue, cores=spec.cores, processes=spec.processes or spec.cores, memory=spec.memory,
        walltime=spec.walltime, account=spec.account, interface=spec.interface,
        job_extra_directives=list(spec.job_extra_directives),
        scheduler_options=_scheduler_http(spec),
    )  # fmt: skip
    for key in ("local_directory", "log_directory"):
        if getattr(spec, key) is not None:
            opts[key] = getattr(spec, key)
    return opts


def _scheduler_http(spec: SchedulerSpec) -> dict:
    """The scheduler's HTTP server: the dashboard where asked for, else no dashboard and a free port (the
    health/metrics server would otherwise take 8787 and warn when another cluster holds it)."""
    if spec.dashboard_address:
        return {"dashboard": True, "dashboard_address": spec.dashboard_address}
    return {"dashboard": False, "dashboard_address": ":0"}


def slurm_cluster(spec: SchedulerSpec):
    """A dask-jobqueue SLURMCluster for `spec`. It starts a Dask scheduler in this process but submits no job
    until scaled (`cluster.job_script()` shows what would be submitted); close it when done."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**slurm_options(spec))


# ------------------------------------------------------------------------------------------------ executors
class Future(Protocol):
    def result(self) -> Any: ...

    def cancel(self) -> Any: ...


class _Deferred:
    """An in-process 'future': the call runs in the calling process when its result is first asked for."""

    _unset = object()

    def __init__(self, fn, args, kwargs):
        self._call: tuple | None = (fn, args, kwargs)
        self._result: Any = self._unset

    def result(self):
        if self._result is self._unset:
            if self._call is None:
                raise RuntimeError("this call was cancelled")
            fn, args, kwargs = self._call
            self._call = None
            self._result = fn(*args, **kwargs)
        return self._result

    def cancel(self) -> None:
        self._call = None


class InProcessExecutor:
    """Runs every call in this process, sequentially and lazily (at `result()`); no threads, so JAX state is
    the caller's."""

    n_workers = 1
    default_in_flight = 1

    def submit(self, fn: Callable, *args, **kwargs) -> _Deferred:
        return _Deferred(fn, args, kwargs)

    def broadcast(self, obj):
        return obj


def realign(obj, cache: dict | None = None):
    """`obj` with every numpy array that is not aligned to its dtype replaced by an aligned copy; walks dicts,
    lists and tuples (NamedTuples included), other objects are left as they are.

    Dask deserialises arrays in place from network buffers, at any byte offset, and numpy reduces a misaligned
    array in another order (buffered), so e.g. `volume.sum()` would differ in the last bit from the in-process
    run. cache: {id(array): (weakref, copy)}, so an array that stays in worker memory (a broadcast volume) is
    copied once, not once per task.
    """
    if isinstance(obj, np.ndarray):
        if obj.flags.aligned or obj.dtype.hasobject:
            return obj
        if cache is None:
            return obj.copy(order="K")
        hit = cache.get(id(obj))
        if hit is None or hit[0]() is not obj:
            hit = cache[id(obj)] = (weakref.ref(obj), obj.copy(order="K"))
        return hit[1]
    if type(obj) is dict:
        new = {k: realign(v, cache) for k, v in obj.items()}
        return obj if all(new[k] is v for k, v in obj.items()) else new
    if type(obj) is list or isinstance(obj, tuple):
        items = [realign(v, cache) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        if type(obj) is list:
            return items
        if type(obj) is tuple:
            return tuple(items)
        make = getattr(type(obj), "_make", None)  # a NamedTuple
        return make(items) if make is not None else obj
    return obj


_aligned_copies: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # per worker process: see realign()


def _call(fn, args, kwargs, x64: bool):
    """What a Dask worker runs: fn(*args, **kwargs) with aligned arrays, inside jax.enable_x64 when the caller
    had it on."""
    for key in [k for k, (ref, _) in _aligned_copies.items() if ref() is None]:
        _aligned_copies.pop(key, None)
    args, kwargs = realign(args, _aligned_copies), realign(kwargs, _aligned_copies)
    if x64:
        import jax

        with jax.enable_x64(True):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _caller_x64() -> bool:
    jax = sys.modules.get("jax")  # never import JAX just to ask
    return bool(jax is not None and jax.config.read("jax_enable_x64"))


class DaskExecutor:
    """A dask.distributed Client. submit() runs fn on a worker (futures inside args/kwargs, e.g. broadcast
    handles, are resolved there; arrays are realigned there, see `realign`) and returns a dask Future, whose
    result() may hold misaligned arrays (run_stage realigns them); broadcast() ships a large read-only object to
    every worker once."""

    def __init__(self, client, n_workers: int | None = None):
        self.client = client
        self._n_workers = n_workers

    @property
    def n_workers(self) -> int:
        if self._n_workers is not None:
            return self._n_workers
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    @property
    def default_in_flight(self) -> int:
        return 2 * self.n_workers

    def submit(self, fn: Callable, *args, **kwargs):
        key = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}"
        # fn's own kwargs travel in a dict, so names like `key` or `workers` never clash with Client.submit's
        return self.client.submit(_call, fn, args, kwargs, _caller_x64(), key=key, pure=False)

    def broadcast(self, obj):
        # a one-element list: scatter() would split a dict, list or tuple into one future per element
        return self.client.scatter([obj], broadcast=True, hash=False)[0]


@contextlib.contextmanager
def open_executor(spec: SchedulerSpec) -> Iterator[InProcessExecutor | DaskExecutor]:
    """The executor of `spec`. For Dask the client and the cluster it started are closed on exit, also after an
    exception or Ctrl-C. InputError when a tcp:// scheduler cannot be reached."""
    if spec.kind == "inprocess":
        yield InProcessExecutor()
        return
    from dask.distributed import Client

    cluster = client = None
    try:
        if spec.kind == "local":
            from dask.distributed import LocalCluster

            http = {} if spec.dashboard_address else {"dashboard_address": "127.0.0.1:0"}  # not 8787: no clash
            cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=spec.dashboard_address, scheduler_kwargs=http,
                                   silence_logs=logging.ERROR)  # fmt: skip
            client = Client(cluster)
        elif spec.kind == "tcp":
            try:
                client = Client(spec.address, timeout=spec.connect_timeout)
            except (OSError, TimeoutError) as exc:
                msg = " ".join(str(exc).split())
                raise InputError(f"cannot reach the Dask scheduler at {spec.address}: {msg.rstrip('.')}.") from None
        else:
            cluster = slurm_cluster(spec)
            log.debug("SLURM job script:\n%s", cluster.job_script())
            cluster.scale(jobs=spec.jobs)
            client = Client(cluster)
            log.info("submitted %d SLURM job(s) to %s; units wait in the queue until workers start", spec.jobs,
                     spec.queue)  # fmt: skip
        log.info("Dask scheduler %s (%s)", getattr(client.scheduler, "address", "?"), spec.kind)
        yield DaskExecutor(client, spec.worker_processes)
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()


# ------------------------------------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class Checkpoint:
    """Where and how often a stage saves its state.

    path: the HDF5 checkpoint file. fingerprint: the caller's hash of everything that determines the result
    (configuration and units); a checkpoint with another one is refused. every_seconds: save when this long has
    passed since the last save (None: never by time); every_units: save every this many folded units (None:
    never by count); either trigger saves. resume: load an existing checkpoint (False: an existing file is an
    error, so a finished or half-done stage is never silently overwritten). `run_stage(resume=...)` overrides it.
    (every_seconds is the third positional field, as callers pass it positionally.)
    """

    path: Path
    fingerprint: str
    every_seconds: float | None = 60.0
    every_units: int | None = dataclasses.field(default=None, kw_only=True)
    resume: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self):
        self.path = Path(self.path)
        if self.every_units is not None and self.every_units < 1:
            raise InputError(f"checkpoint every_units must be >= 1, got {self.every_units}.")
        if self.every_seconds is not None and self.every_seconds < 0:
            raise InputError(f"checkpoint every_seconds must be >= 0, got {self.every_seconds}.")

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, name: str | None = None, n_units: int | None = None) -> tuple[int, Any, bool] | None:
        """(units done, state, finished) of the checkpoint, None if there is none. InputError when it was
        written for another fingerprint (or stage name / number of units, when given) or cannot be read."""
        if not self.path.is_file():
            return None
        different = (f"{self.path} was written with a different configuration or input; rerun without --resume "
                     "after removing it, or resume with the original configuration.")  # fmt: skip
        try:
            with h5py.File(self.path, "r") as f:
                a = f.attrs
                if a.get("format") != CHECKPOINT_FORMAT:
                    raise InputError(f"{self.path} is not a stage checkpoint of this version; remove it to start over.")
                if a["fingerprint"] != self.fingerprint or (name is not None and a["stage"] != name):
                    raise InputError(different)
                if n_units is not None and int(a["n_units"]) != n_units:
                    raise InputError(different)
                done, finished = int(a["units_done"]), bool(a["finished"])
                state = _get(f["state"])
        except (OSError, KeyError) as exc:
            msg = " ".join(str(exc).split())
            raise InputError(f"cannot read checkpoint {self.path} ({msg}); remove it to start over.") from None
        return done, state, finished

    def save(self, done: int, state, *, finished: bool, name: str = "", n_units: int = -1) -> None:
        """Write (state, done) atomically: a temporary file beside `path`, flushed to disk, then renamed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=CHECKPOINT_FORMAT, fingerprint=self.fingerprint, stage=name, n_units=n_units,
                           units_done=done, finished=finished)  # fmt: skip
            _put(f, "state", state)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


# State <-> HDF5. Every node is named by its position and tagged with attrs["kind"]:
#   dict/list/tuple  group with attrs n (and per child attrs key: the dict key as JSON);
#   ndarray/scalar   dataset (numeric dtypes natively; other dtypes as the bytes of an .npy file, "npy");
#   py               empty dataset, attrs value: the Python value as JSON (floats exact, NaN/inf included).
def _put(parent: h5py.Group, name: str, obj) -> None:
    if isinstance(obj, Mapping | list | tuple):
        is_map = isinstance(obj, Mapping)
        g = parent.create_group(name)
        g.attrs.update(kind="dict" if is_map else "list" if isinstance(obj, list) else "tuple", n=len(obj))
        pairs = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
        for i, (k, v) in enumerate(pairs):
            _put(g, str(i), v)
            if is_map:
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise TypeError(f"checkpoint dict keys must be str or int, got {k!r}")
                g[str(i)].attrs["key"] = json.dumps(k)
        return
    scalar = isinstance(obj, np.generic)  # before the Python types: np.float64 is a float, np.str_ a str
    if not scalar and (obj is None or isinstance(obj, bool | int | float | str)):
        parent.create_dataset(name, data=h5py.Empty("i1")).attrs.update(kind="py", value=json.dumps(obj))
        return
    if not scalar and isinstance(obj, complex):
        ds = parent.create_dataset(name, data=h5py.Empty("i1"))
        ds.attrs.update(kind="complex", value=json.dumps([obj.real, obj.imag]))
        return
    if not scalar and not isinstance(obj, np.ndarray):
        if not hasattr(obj, "__array__"):
            raise TypeError(f"cannot checkpoint a {type(obj).__name__}; states hold dicts, lists, tuples, numpy "
                            "arrays and scalars, and Python scalars")  # fmt: skip
        obj = np.asarray(obj)  # e.g. a jax.Array: comes back as numpy
    arr = np.asarray(obj)
    native = arr.dtype.kind in "biu" or (arr.dtype.kind in "fc" and arr.dtype.itemsize <= 16)
    if native:
        ds = parent.create_dataset(name, data=arr)
        ds.attrs["kind"] = "scalar" if scalar else "ndarray"
    else:
        if arr.dtype.hasobject:
            raise TypeError(f"cannot checkpoint an object array ({arr.dtype})")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        ds = parent.create_dataset(name, data=np.frombuffer(buf.getvalue(), np.uint8))
        ds.attrs.update(kind="npy", scalar=scalar)


def _get(node):
    kind = node.attrs["kind"]
    if kind in ("dict", "list", "tuple"):
        items = [node[str(i)] for i in range(int(node.attrs["n"]))]
        if kind == "dict":
            return {json.loads(c.attrs["key"]): _get(c) for c in items}
        values = [_get(c) for c in items]
        return values if kind == "list" else tuple(values)
    if kind == "py":
        return json.loads(node.attrs["value"])
    if kind == "complex":
        return complex(*json.loads(node.attrs["value"]))
    if kind == "npy":
        arr = np.load(io.BytesIO(node[()].tobytes()), allow_pickle=False)
        return arr[()] if node.attrs["scalar"] else arr
    value = node[()]
    return value if kind == "scalar" else np.asarray(value)


# ------------------------------------------------------------------------------------------------ the stage
def run_stage(
    name: str,
    fn: Callable,
    units: Sequence,
    *,
    combine: Callable,
    initial,
    executor: InProcessExecutor | DaskExecutor,
    checkpoint: Checkpoint | None = None,
    resume: bool | None = None,
    progress: bool = False,
    max_in_flight: int | None = None,
    fn_args: tuple = (),
    fn_kwargs: Mapping | None = None,
):
    """Fold fn(unit, *fn_args, **fn_kwargs) over `units` strictly in unit order:
    state = combine(state, partial), starting from `initial`; returns the final state.

    units: picklable items (for Dask, fn and its arguments must be importable/picklable by the workers).
    max_in_flight: units submitted but not yet folded (default 2 × workers; in-process 1).
    checkpoint: save the state as the fold advances (see `Checkpoint`); resume (default checkpoint.resume):
    continue from a matching checkpoint, skipping the units it holds; a finished checkpoint returns its state
    without running anything. Without resume an existing checkpoint is an InputError.
    progress: a tqdm bar over units.
    """
    from tqdm import tqdm

    units = list(units)
    n = len(units)
    fn_kwargs = dict(fn_kwargs or {})
    state, start = initial, 0
    if checkpoint is not None:
        resume = checkpoint.resume if resume is None else resume
        if not resume and checkpoint.exists():
            raise InputError(f"{checkpoint.path} holds a checkpoint of stage {name!r}; pass --resume to continue "
                             "it or remove it.")  # fmt: skip
        saved = checkpoint.load(name, n) if resume else None
        if saved is not None:
            start, state, finished = saved
            if finished:
                log.info("stage %s: finished earlier (%s)", name, checkpoint.path)
                return state
            log.info("stage %s: resuming after %d of %d units from %s", name, start, n, checkpoint.path)
    limit = executor.default_in_flight if max_in_flight is None else max_in_flight
    if limit < 1:
        raise InputError(f"max_in_flight must be >= 1, got {limit}.")
    log.info("stage %s: %d units, %d in flight at most", name, n - start, limit)

    folded = (start, state)  # (units done, state): one binding, so an interrupt never splits the pair
    saved_at, saved_time = start, time.monotonic()
    pending: dict[int, Future] = {}
    next_submit = start
    bar = tqdm(total=n, initial=start, unit="unit", desc=name, disable=not progress)
    try:
        for k in range(start, n):
            while next_submit < n and len(pending) < limit:
                pending[next_submit] = executor.submit(fn, units[next_submit], *fn_args, **fn_kwargs)
                next_submit += 1
            partial = realign(pending.pop(k).result())  # Dask hands back arrays at arbitrary byte offsets
            folded = (k + 1, combine(folded[1], partial))
            del partial
            bar.update(1)
            if checkpoint is not None and _due(checkpoint, k + 1 - saved_at, time.monotonic() - saved_time):
                checkpoint.save(*folded, finished=False, name=name, n_units=n)
                saved_at, saved_time = k + 1, time.monotonic()
                log.debug("stage %s: checkpoint after %d units", name, k + 1)
    except BaseException:
        for f in pending.values():
            f.cancel()
        if checkpoint is not None and folded[0] > saved_at:
            try:  # keep what was folded before the failure
                checkpoint.save(*folded, finished=False, name=name, n_units=n)
                log.info("stage %s: stopped after %d of %d units; checkpoint %s", name, folded[0], n, checkpoint.path)
            except Exception as exc:  # the original error matters more
                log.warning("stage %s: could not save checkpoint %s: %s", name, checkpoint.path, exc)
        raise
    finally:
        bar.close()
    if checkpoint is not None:
        checkpoint.save(n, folded[1], finished=True, name=name, n_units=n)
    return folded[1]


def _due(checkpoint: Checkpoint, units_since: int, seconds_since: float) -> bool:
    by_units = checkpoint.every_units is not None and units_since >= checkpoint.every_units
    by_time = checkpoint.every_seconds is not None and seconds_since >= checkpoint.every_seconds
    return by_units or by_time


__all__ = [
    "Checkpoint",
    "DaskExecutor",
    "InProcessExecutor",
    "SchedulerSpec",
    "open_executor",
    "parse_scheduler",
    "run_stage",
    "slurm_cluster",
    "slurm_options",
]
