"""The ordered map-reduce engine (data_pipeline.scaleout): in-process and Dask give the same bits, bounded
in-flight work, broadcast arguments, checkpoints that survive a crash or a SIGKILL and resume to the identical
state, exact state round trips, one-line user errors, scheduler parsing and the SLURM job script."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from data_pipeline import scaleout
from jaxpolaron.errors import InputError
from tests import scaleout_helpers as h

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dask2():
    """A LocalCluster of two single-threaded worker processes, shared by the tests of this module."""
    with scaleout.open_executor(scaleout.parse_scheduler("local:2")) as ex:
        yield ex


def assert_identical(a, b, where="state"):
    """Same structure, same types, same dtypes and the same bits (NaN and -0.0 included)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), f"{where}: {a.dtype}{np.shape(a)} vs {b.dtype}"
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{where}: bits differ"
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), where
    else:
        assert a == b, where


class Spy:
    """Wraps an executor: records the most futures outstanding (submitted, result not yet taken) and, for Dask,
    the order in which units completed on the workers."""

    def __init__(self, inner):
        self.inner, self.outstanding, self.max_outstanding, self.completed = inner, 0, 0, []
        self._lock = threading.Lock()

    n_workers = property(lambda self: self.inner.n_workers)
    default_in_flight = property(lambda self: self.inner.default_in_flight)

    def broadcast(self, obj):
        return self.inner.broadcast(obj)

    def submit(self, fn, unit, *args, **kwargs):
        fut = self.inner.submit(fn, unit, *args, **kwargs)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        if hasattr(fut, "add_done_callback"):
            fut.add_done_callback(lambda _, u=unit: self._done(u))
        return _SpyFuture(self, fut)

    def _done(self, unit):
        with self._lock:
            self.completed.append(unit)


class _SpyFuture:
    def __init__(self, spy, fut):
        self.spy, self.fut = spy, fut

    def result(self):
        out = self.fut.result()
        self.spy.outstanding -= 1
        return out

    def cancel(self):
        self.fut.cancel()


def _stage(executor, units, **kw):
    return scaleout.run_stage("sums", h.partial_sum, units, combine=h.add, initial=None, executor=executor, **kw)


def _calls(calls_dir: Path) -> Counter:
    return Counter(int(p.name.split("-")[0]) for p in calls_dir.iterdir())


# ------------------------------------------------------------------------------------------------ ordered fold
def test_inprocess_and_local2_are_bit_identical(dask2):
    units = list(range(12))
    here_spy = Spy(scaleout.InProcessExecutor())
    here = _stage(here_spy, units)
    spy = Spy(dask2)
    there = _stage(spy, units)
    assert_identical(here, there)
    assert [int(u[0]) for u in there["units"]] == units and there["count"] == 12
    # the test is sensitive: another order of additions changes the bits
    reverse = None
    for u in reversed(units):
        reverse = h.add(reverse, h.partial_sum(u))
    assert not np.array_equal(reverse["sum"], here["sum"])
    # the workers finished out of unit order (unit 0 sleeps longest), yet the fold was in order
    assert sorted(spy.completed) == units and spy.completed != units
    # bounded work in flight: 1 in-process, 2 × workers on Dask, or what the caller asks for
    assert here_spy.max_outstanding == 1
    assert dask2.n_workers == 2 and 2 <= spy.max_outstanding <= 4
    spy3 = Spy(dask2)
    assert_identical(_stage(spy3, units, max_in_flight=3), here)
    assert spy3.max_outstanding == 3


def test_tcp_scheduler_runs_on_running_cluster(dask2):
    """tcp://HOST:PORT connects to a running scheduler (here: the fixture's) and leaves it running on exit."""
    address = dask2.client.scheduler.address
    with scaleout.open_executor(scaleout.parse_scheduler(address)) as ex:
        assert ex.n_workers == 2 and ex.default_in_flight == 4
        got = _stage(ex, [3, 1, 2])
    assert_identical(got, _stage(scaleout.InProcessExecutor(), [3, 1, 2]))
    assert dask2.submit(h.jax_default_float, 0).result() == "float32"  # the fixture's client still works
    with pytest.raises(InputError, match="cannot reach the Dask scheduler") as e:
        with scaleout.open_executor(scaleout.SchedulerSpec("tcp", address="tcp://127.0.0.1:1", connect_timeout=1)):
            pass
    assert "\n" not in str(e.value)


def test_broadcast_large_array_to_workers(dask2):
    volume = np.random.default_rng(7).normal(size=(8, 100, 100, 100))  # 64 MB
    handle = dask2.broadcast(volume)
    holders = dask2.client.who_has([handle])[handle.key]
    assert len(holders) == 2  # on both workers before any task asks for it
    units = list(range(8))
    kw = dict(combine=h.add_slices, initial=None)
    there = scaleout.run_stage("b", h.slice_of, units, executor=dask2, fn_args=(handle,), fn_kwargs={"scale": 2.0},
                               **kw)  # fmt: skip
    by_kwarg = scaleout.run_stage("b", h.slice_of, units, executor=dask2, fn_kwargs={"volume": handle}, **kw)
    here_ex = scaleout.InProcessExecutor()
    assert here_ex.broadcast(volume) is volume
    here = scaleout.run_stage("b", h.slice_of, units, executor=here_ex, fn_args=(volume,), fn_kwargs={"scale": 2.0},
                              **kw)  # fmt: skip
    assert_identical(there, here)
    np.testing.assert_array_equal(by_kwarg["slice"] * 2.0, here["slice"])
    assert here["total"][0] == 8 * volume.sum()


def test_jax_x64_is_forwarded_to_workers(dask2):
    assert dask2.submit(h.jax_default_float, 0).result() == "float32"
    with jax.enable_x64(True):
        assert h.jax_default_float(0) == "float64"
        assert dask2.submit(h.jax_default_float, 0).result() == "float64"


def test_open_executor_closes_dask_on_interrupt():
    from distributed.core import Status

    with pytest.raises(KeyboardInterrupt):
        with scaleout.open_executor(scaleout.parse_scheduler("local:1")) as ex:
            client, cluster = ex.client, ex.client.cluster
            assert ex.submit(h.jax_default_float, 0).result() == "float32"
            raise KeyboardInterrupt
    assert client.status == "closed" and cluster.status == Status.closed


class Pair(NamedTuple):
    rows: np.ndarray
    name: str


def test_realign_copies_only_misaligned_arrays():
    rng = np.random.default_rng(3)
    good = rng.normal(size=100_000)
    buf = np.zeros(good.nbytes + 1, np.uint8)
    bad = buf[1:].view(np.float64)  # one byte off, as Dask may deserialise
    bad[:] = good
    assert not bad.flags.aligned and bad.sum() != good.sum()  # numpy sums a misaligned array in another order
    tree = {"unit": Pair(bad, "u"), "fine": [good, 3], "t": (1, "x")}
    out = scaleout.realign(tree)
    assert isinstance(out["unit"], Pair) and out["unit"].name == "u" and out["unit"].rows.flags.aligned
    assert out["unit"].rows.sum() == good.sum() and out["fine"] is tree["fine"] and out["t"] is tree["t"]
    assert scaleout.realign(tree["fine"]) is tree["fine"]
    cache: dict = {}
    assert scaleout.realign(bad, cache) is scaleout.realign(bad, cache)  # one copy per living array


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("where", ["inprocess", "local:2"])
def test_crash_then_resume_is_identical(tmp_path, request, where):
    executor = scaleout.InProcessExecutor() if where == "inprocess" else request.getfixturevalue("dask2")
    units = list(range(8))
    whole = _stage(scaleout.InProcessExecutor(), units)
    calls = tmp_path / "calls"
    calls.mkdir()
    kw = dict(fn_kwargs=dict(calls_dir=str(calls), crash_unit=5, marker=str(tmp_path / "crashed")))
    ckpt = scaleout.Checkpoint(tmp_path / "stage.h5", "fp-1", None, every_units=2)
    with pytest.raises(RuntimeError, match="unit 5 crashed"):
        _stage(executor, units, checkpoint=ckpt, **kw)
    done, _, finished = ckpt.load()
    assert done == 5 and not finished  # units 0-4 folded: saved on the way out
    again = _stage(executor, units, checkpoint=ckpt, resume=True, **kw)
    assert_identical(again, whole)
    n = _calls(calls)
    assert all(n[u] == 1 for u in range(5)), n  # units before the checkpoint were not recomputed
    assert n[5] == 2 and all(n[u] >= 1 for u in (6, 7))  # (on Dask 6, 7 may have run before the crash too)
    assert ckpt.load()[0] == 8 and ckpt.load()[2]
    before = sum(n.values())
    done_again = _stage(executor, units, checkpoint=ckpt, resume=True, **kw)  # finished: returns at once
    assert_identical(done_again, whole) and sum(_calls(calls).values()) == before


def test_sigkill_then_resume_is_identical(tmp_path):
    """A process killed with SIGKILL (no cleanup runs) resumes from its last periodic checkpoint."""
    calls = tmp_path / "calls"
    calls.mkdir()
    marker = tmp_path / "hanging"
    kw = dict(calls_dir=str(calls), hang_unit=4, marker=str(marker))
    script = textwrap.dedent(f"""
        from data_pipeline import scaleout
        from tests import scaleout_helpers as h
        ckpt = scaleout.Checkpoint({str(tmp_path / "stage.h5")!r}, "fp-2", None, every_units=1)
        scaleout.run_stage("sums", h.partial_sum, list(range(8)), combine=h.add, initial=None,
                           executor=scaleout.InProcessExecutor(), checkpoint=ckpt, fn_kwargs={kw!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        t0 = time.monotonic()
        while not marker.exists():  # unit 4 is running (and hangs): units 0-3 are checkpointed
            assert proc.poll() is None and time.monotonic() - t0 < 30, "the stage did not reach unit 4"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = scaleout.Checkpoint(tmp_path / "stage.h5", "fp-2", None, every_units=1, resume=True)
    assert ckpt.load()[0] == 4
    resumed = _stage(scaleout.InProcessExecutor(), list(range(8)), checkpoint=ckpt, fn_kwargs=kw)
    assert_identical(resumed, _stage(scaleout.InProcessExecutor(), list(range(8))))
    n = _calls(calls)
    assert [n[u] for u in range(8)] == [1, 1, 1, 1, 2, 1, 1, 1]


def test_checkpoint_every_seconds(tmp_path, monkeypatch):
    ckpt = scaleout.Checkpoint(tmp_path / "s.h5", "fp", 0.0)  # due after every unit
    saves = []
    real_save = scaleout.Checkpoint.save
    monkeypatch.setattr(
        scaleout.Checkpoint, "save", lambda self, done, *a, **k: (saves.append(done), real_save(self, done, *a, **k))
    )
    _stage(scaleout.InProcessExecutor(), [0, 1, 2], checkpoint=ckpt)
    assert saves == [1, 2, 3, 3]  # after each unit, then the finished one
    saves.clear()
    ckpt2 = scaleout.Checkpoint(tmp_path / "s2.h5", "fp")  # 60 s: only the final save in a short stage
    _stage(scaleout.InProcessExecutor(), [0, 1, 2], checkpoint=ckpt2)
    assert saves == [3]


def test_state_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "f64": rng.normal(size=(3, 4)),
        "f32": rng.normal(size=5).astype(np.float32),
        "special": np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324]),
        "big_endian": np.arange(4, dtype=">f8"),
        "i8": np.arange(-3, 3, dtype=np.int8), "u64": np.array([2**64 - 1], np.uint64),
        "bool": np.array([True, False]), "c128": np.array([1 + 2j, np.nan * 1j]), "f16": np.ones(2, np.float16),
        "empty": np.zeros((0, 3)), "zero_d": np.array(2.5), "fortran": np.asfortranarray(rng.normal(size=(2, 3))),
        "np_scalars": [np.float32(1.5), np.float64(0.1), np.int64(-7), np.bool_(True), np.complex128(1j)],
        "text": np.array(["dark", "pumped"]), "bytes": np.array([b"ab", b"c"]), "np_str": np.str_("x"),
        "times": np.array(["2026-01-01T00:00"], "datetime64[s]"),
        "py": [None, True, 3, 2**70, 0.1, float("nan"), -0.0, "train 1", 1 - 2j],
        "nested": {"report": {"train missing": 2}, "deep": {"a": [np.zeros(2), (1, "b")]}, 7: "int key"},
        "empty_dict": {}, "empty_list": [], "tuple": (np.ones(1),),
    }  # fmt: skip
    ckpt = scaleout.Checkpoint(tmp_path / "s.h5", "fp")
    ckpt.save(3, state, finished=False)
    done, loaded, finished = ckpt.load()
    assert (done, finished) == (3, False)
    assert_identical(loaded, state)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed
    with pytest.raises(TypeError, match="cannot checkpoint"):
        ckpt.save(1, {"x": object()}, finished=False)


def test_checkpoint_user_errors_are_one_line(tmp_path):
    units = [0, 1, 2]
    path = tmp_path / "stage.h5"
    _stage(scaleout.InProcessExecutor(), units, checkpoint=scaleout.Checkpoint(path, "fp"))

    def raises(match, **kw):
        with pytest.raises(InputError, match=match) as e:
            _stage(scaleout.InProcessExecutor(), kw.pop("units", units), **kw)
        assert "\n" not in str(e.value)

    raises("pass --resume to continue it or remove it", checkpoint=scaleout.Checkpoint(path, "fp"))
    raises("different configuration", checkpoint=scaleout.Checkpoint(path, "other"), resume=True)
    raises("different configuration", checkpoint=scaleout.Checkpoint(path, "fp", resume=True), units=[0, 1])
    path.write_bytes(b"not hdf5")
    raises("cannot read checkpoint", checkpoint=scaleout.Checkpoint(path, "fp", resume=True))
    raises("max_in_flight", max_in_flight=0)
    with pytest.raises(InputError):
        scaleout.Checkpoint(path, "fp", every_units=0)


# ------------------------------------------------------------------------------------------------ schedulers
@pytest.mark.parametrize(("text", "cluster", "expected"), [
    (None, None, scaleout.SchedulerSpec()),
    ("inprocess", None, scaleout.SchedulerSpec()),
    ("  ", None, scaleout.SchedulerSpec()),
    ("local:3", None, scaleout.SchedulerSpec("local", workers=3)),
    ("tcp://10.0.0.1:8786", None, scaleout.SchedulerSpec("tcp", address="tcp://10.0.0.1:8786")),
    ("tcp://max-exfl-display001.desy.de:8786", None,
     scaleout.SchedulerSpec("tcp", address="tcp://max-exfl-display001.desy.de:8786")),
    ("tcp://[::1]:8786", None, scaleout.SchedulerSpec("tcp", address="tcp://[::1]:8786")),
    (None, "slurm", scaleout.SchedulerSpec("slurm")),
    (None, "slurm:4", scaleout.SchedulerSpec("slurm", workers=4)),
    (None, "slurm:jobs=2,partition=exfel,cores=32,processes=8,memory=500GB,walltime=1-00:00:00,account=p002345",
     scaleout.SchedulerSpec("slurm", workers=2, queue="exfel", cores=32, processes=8, memory="500GB",
                            walltime="1-00:00:00", account="p002345")),
])  # fmt: skip
def test_parse_scheduler_accepts(text, cluster, expected):
    assert scaleout.parse_scheduler(text, cluster) == expected


@pytest.mark.parametrize(("text", "cluster"), [
    ("local:0", None), ("local:x", None), ("local:", None), ("local:-1", None), ("http://host:8786", None),
    ("tcp://host", None), ("tcp://host:99999", None), ("gpu", None), ("local:2", "slurm"), (None, "pbs"),
    (None, "slurm:0"), (None, "slurm:queue="), (None, "slurm:nodes=3"), (None, "slurm:cores=x"),
    (None, "slurm:cores=8,processes=16"), (None, "slurm:memory=lots"), (None, "slurm:walltime=2h"),
])  # fmt: skip
def test_parse_scheduler_rejects_with_one_line(text, cluster):
    with pytest.raises(InputError) as e:
        scaleout.parse_scheduler(text, cluster)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_slurm_job_script_has_the_chosen_options():
    """SLURMCluster starts a scheduler here but submits nothing (no sbatch needed) until scaled."""
    spec = scaleout.parse_scheduler(None, "slurm:jobs=3,partition=exfel,cores=32,memory=500GB,walltime=04:00:00,"
                                          "account=p002345,local_directory=/scratch")  # fmt: skip
    assert spec.jobs == 3 and spec.worker_processes == 96
    cluster = scaleout.slurm_cluster(spec)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p exfel", "#SBATCH --cpus-per-task=32", "#SBATCH --mem=466G", "#SBATCH -t 04:00:00",
                 "#SBATCH -A p002345", "--nworkers 32", "--nthreads 1", "--local-directory /scratch"):  # fmt: skip
        assert line in script, script
    defaults = scaleout.slurm_options(scaleout.parse_scheduler(None, "slurm"))
    assert defaults["queue"] == "upex" and defaults["cores"] == defaults["processes"] == 16
    assert defaults["scheduler_options"] == {"dashboard": False, "dashboard_address": ":0"}
