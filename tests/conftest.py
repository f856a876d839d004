"""Shared fixtures. JAX runs in float32 by default; float64 references switch x64 on locally with
`jax.enable_x64(True)` (objects must be *built* inside the context to get float64 arrays)."""

import os
import tempfile

import jax
import pytest

# Two CPU devices (as on the 2-core CI machine): find_peaks_batch then splits its batches across devices, so
# every batched peak-finder test also checks that the split gives the single-device result.
jax.config.update("jax_num_cpu_devices", 2)

# CLI runs in tests keep their XLA compile cache out of the user's ~/.cache
os.environ.setdefault("JAXPOLARON_CACHE", tempfile.mkdtemp(prefix="jaxpolaron-xla-"))

from jaxpolaron.structure import read_cif  # noqa: E402  (after the JAX settings above)


@pytest.fixture(scope="session")
def structure():
    return read_cif()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
