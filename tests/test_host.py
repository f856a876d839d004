"""Host buffers for batch jobs: 64-byte aligned frames reach XLA:CPU without a copy."""

import jax
import numpy as np
import pytest

from data_pipeline.host import aligned_empty, is_aligned


@pytest.mark.parametrize("shape", [(3, 16, 512, 128), (5,), (2, 7)])
def test_aligned_empty_is_aligned_and_contiguous(shape):
    x = aligned_empty(shape, np.float32)
    assert x.shape == shape and x.dtype == np.float32 and is_aligned(x)
    assert not is_aligned(x.reshape(-1)[1:])  # 4 bytes off the boundary
    assert not is_aligned(np.asfortranarray(np.ones((4, 32), np.float32))[:, ::2])


def test_aligned_frames_are_aliased_by_device_put_and_read_unchanged():
    x = aligned_empty((2, 64, 128), np.float32)
    x[:] = np.random.default_rng(0).random(x.shape)
    y = jax.device_put(x, jax.devices()[-1])
    assert y.unsafe_buffer_pointer() == x.ctypes.data  # no copy
    np.testing.assert_array_equal(np.asarray(y), x)
