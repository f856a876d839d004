"""Host settings for long batch jobs on CPU (`jaxpolaron find-peaks` / `index`, benchmarks): call before the
first JAX computation. Neither changes any result, only how fast the host gets there."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import jax
import numpy as np

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def use_cpu_cores(n: int | None = None) -> int:
    """Run XLA on the host as `n` CPU devices (default: the cores this process may use), so that
    `peakfinder.find_peaks_batch` spreads a batch over the cores: XLA:CPU runs one program on one core,
    and the peak finder is a chain of small memory-bound kernels that gain nothing from intra-op threads.

    Effective only before JAX initialises its backend; afterwards the backend keeps its devices.
    Returns the number of devices in use.
    """
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        jax.config.update("jax_num_cpu_devices", max(1, int(n)))
    except RuntimeError:  # the backend is already up
        pass
    return jax.local_device_count()


def keep_freed_memory() -> bool:
    """Let glibc keep large freed blocks for reuse instead of unmapping them.

    Every batch hands XLA ~4 MB per AGIPD frame; glibc serves blocks that large with a fresh mmap and
    returns them on free, so each transfer first page-faults its way through new memory (~20 ms per
    8 frames here, a quarter of the peak finder's time). Raising the mmap and trim thresholds makes the
    next batch reuse the same pages. The process keeps its peak memory until exit. Returns False where
    there is no glibc (macOS, musl): nothing is changed.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1


_ALIGN = 64  # bytes: XLA:CPU takes a numpy array this aligned without copying it (device_put aliases it)


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on a 64-byte boundary.

    `jax.device_put` of such an array to a CPU device aliases it instead of copying it (a copy costs ~0.7 ms
    per AGIPD frame, and more while the pages are fresh); numpy's own allocations are only 16-byte aligned.
    An aliased array must not be written while JAX may still read it."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + n].view(dtype).reshape(shape)


def is_aligned(x: np.ndarray) -> bool:
    """True when `x` is C-contiguous and starts on a 64-byte boundary (see `aligned_empty`)."""
    return bool(x.flags.c_contiguous) and x.ctypes.data % _ALIGN == 0
