"""Map and combine functions for tests/test_scaleout.py. They live in an importable module (not the test module)
so Dask worker processes can unpickle them by reference whatever pytest's import mode is."""

import time
import uuid
from pathlib import Path

import numpy as np


def partial_sum(unit: int, *, calls_dir=None, crash_unit=None, hang_unit=None, marker=None) -> dict:
    """A unit's partial: a (50, 50, 50) float64 volume from a per-unit seeded RNG whose magnitude varies over
    12 decades (so the bits of a sum depend on the order of additions), a count, the unit id in a list and a
    nested dict. Sleeps a little (unit 0 longest), so workers finish out of unit order.

    calls_dir: every call leaves a file `UNIT-RANDOM` there. crash_unit / hang_unit: on the first call for that
    unit (while `marker` does not exist) create `marker`, then raise RuntimeError / sleep for ten minutes.
    """
    if calls_dir is not None:
        (Path(calls_dir) / f"{unit}-{uuid.uuid4().hex}").touch()
    if unit in (crash_unit, hang_unit) and not Path(marker).exists():
        Path(marker).touch()
        if unit == crash_unit:
            raise RuntimeError(f"unit {unit} crashed (first attempt)")
        time.sleep(600)
    rng = np.random.default_rng(unit)
    time.sleep(0.25 if unit == 0 else rng.uniform(0.0, 0.03))
    volume = rng.normal(size=(50, 50, 50)) * 10.0 ** rng.uniform(-6, 6)
    return {"sum": volume, "count": np.int64(1), "units": [np.array([unit])], "extra": {"sq": volume**2, "n": 1}}


def add(state, part):
    """Ordered reduce of partial_sum partials: sums add, the unit lists concatenate."""
    if state is None:
        return part
    return {
        "sum": state["sum"] + part["sum"],
        "count": state["count"] + part["count"],
        "units": state["units"] + part["units"],
        "extra": {"sq": state["extra"]["sq"] + part["extra"]["sq"], "n": state["extra"]["n"] + part["extra"]["n"]},
    }


def slice_of(unit: int, volume, *, scale: float = 1.0) -> dict:
    """Uses a broadcast volume (k, ...): unit's slice times scale, and the volume's total (proves it is whole)."""
    return {"slice": volume[unit % len(volume)] * scale, "total": np.array([volume.sum()])}


def add_slices(state, part):
    return part if state is None else {k: state[k] + part[k] for k in part}


def jax_default_float(unit: int) -> str:
    """The dtype JAX gives a Python float where this runs (float64 only with x64 on)."""
    import jax.numpy as jnp

    return jnp.asarray(1.0 + unit).dtype.name
