"""Pumped ensembles: exact vs linear vs second order, hole batching = Python loop, device sharding,
zero field -> zero difference, and the SI S2 occupancy."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal
from jaxpolaron.deformation.base import Deformation, displaced
from jaxpolaron.ensemble import pumped_difference
from jaxpolaron.excitation import Occupancy
from jaxpolaron.reciprocal import hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure import read_cif
from jaxpolaron.structure_factor import intensity


class SoftSource(Deformation):
    """A test field: a softened radial source at a random point; ions move by charge-like ±1 per species."""

    amplitude: jax.Array

    def displacement(self, crystal, *, key=None):
        centre = jax.random.uniform(key, (3,), minval=-8.0, maxval=8.0)
        d = crystal.positions - centre
        sign = jnp.where(crystal.species == 2, -1.0, 1.0)[:, None]
        return self.amplitude * sign * d / (jnp.sum(d**2, -1, keepdims=True) + 9.0) * crystal.mask[:, None]

    @property
    def is_random(self):
        return True


def _setup():
    s = read_cif()
    crystal = cut_nanocrystal(s, 3.0)
    sf = scattering_factors(s.species)
    windows = hkl_windows(s, [(2, 0, 0), (1, 1, 0)], shape=9, voxel=0.004)
    return crystal, sf, windows


def test_occupancy_matches_si_s2():
    p = np.asarray(Occupancy(1.0, 0.4).probabilities())
    np.testing.assert_allclose(p, [0.368, 0.504, 0.128], atol=6e-4)
    assert float(Occupancy(1.0, 0.4).mean_pairs()) == pytest.approx(0.760, abs=1e-3)
    near = np.asarray(Occupancy(1.0, 1.0 - 1e-9).probabilities())
    np.testing.assert_allclose(near, np.asarray(Occupancy(1.0, 1.0 - 1e-3).probabilities()), atol=1e-3)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda r: Occupancy(1.0, r).mean_pairs())(1.0))))


def test_zero_field_gives_zero_difference():
    crystal, sf, windows = _setup()
    for method in ("exact", "linear", "second"):
        _, diff = pumped_difference(
            crystal,
            sf,
            windows,
            SoftSource(jnp.asarray(0.0)),
            Occupancy(),
            key=jax.random.key(0),
            n_holes=4,
            method=method,
        )
        assert float(jnp.max(jnp.abs(diff))) == 0.0, method


def test_linear_and_second_order_bound_exact(x64):
    """|q·u| up to ≈ 0.05 rad: linear within 10 %, second order within 0.1 % (relative L2 of ΔI; notes:
    linear 2e-4…6e-2, second order ~3e-3 at this scale)."""
    crystal, sf, windows = _setup()
    model, occ, key = SoftSource(jnp.asarray(0.15)), Occupancy(), jax.random.key(1)
    u = jax.vmap(lambda k: model.displacement(crystal, key=k))(jax.random.split(key, 16))
    assert 0.02 < float(jnp.max(jnp.abs(u)) * 2 * np.pi * 0.34) < 0.2  # phase scale of the test
    diffs = {
        m: np.asarray(pumped_difference(crystal, sf, windows, model, occ, key=key, n_holes=16, method=m)[1])
        for m in ("exact", "linear", "second")
    }
    err = {m: np.linalg.norm(diffs[m] - diffs["exact"]) / np.linalg.norm(diffs["exact"]) for m in diffs}
    assert err["linear"] < 0.1  # measured 5.7e-2
    assert err["second"] < 1e-3  # measured 2.5e-4
    assert err["second"] < err["linear"] / 10


def test_batched_holes_equal_python_loop(x64):
    crystal, sf, windows = _setup()
    model, occ, key = SoftSource(jnp.asarray(0.15)), Occupancy(0.7, 0.4), jax.random.key(2)
    i0, diff = pumped_difference(crystal, sf, windows, model, occ, key=key, n_holes=6, batch=4)
    p = np.asarray(occ.probabilities())
    loop = np.zeros_like(np.asarray(diff))
    for k in jax.random.split(key, 6):
        u = model.displacement(crystal, key=k)
        one = intensity(displaced(crystal, u), sf, windows)
        two = intensity(displaced(crystal, 2 * u), sf, windows)
        loop += p[1] * (np.asarray(one) - np.asarray(i0)) + p[2] * (np.asarray(two) - np.asarray(i0))
    np.testing.assert_allclose(np.asarray(diff), loop / 6, rtol=1e-9, atol=1e-9 * np.abs(loop).max())


_SHARD_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np
from tests.test_pumped import SoftSource, _setup
from jaxpolaron.ensemble import pumped_difference
from jaxpolaron.excitation import Occupancy
crystal, sf, windows = _setup()
out = {}
for method in ("exact", "second"):
    _, d = pumped_difference(crystal, sf, windows, SoftSource(jnp.asarray(0.15)), Occupancy(),
                             key=jax.random.key(3), n_holes=8, method=method)
    out[method] = np.asarray(d).ravel().tolist()
print(json.dumps({"devices": jax.device_count(), **out}))
"""


def _run_on(devices: int) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "1",  # compare summation orders, not float32 cancellation in |F|² − I0
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharding_over_two_devices_matches_one():
    one, two = _run_on(1), _run_on(2)
    assert one["devices"] == 1 and two["devices"] == 2
    for method in ("exact", "second"):
        a, b = np.asarray(one[method]), np.asarray(two[method])
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9 * np.abs(a).max())


@pytest.mark.parametrize("method", ["linear", "exact"])
def test_ensemble_gradients_match_finite_differences(x64, method):
    """∂ΔI/∂(k_Br, hole_bias, amplitude) of the hole-averaged RandomHole ΔI and ∂ΔI/∂t0 of the tilt model,
    through the sharded, batched ensemble path (fixed key)."""
    from jaxpolaron.deformation import RandomHole, TiltRelaxation

    crystal, sf, windows = _setup()
    weights = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, (2, 9, 9, 9)))
    key = jax.random.key(5)

    def hole_loss(k_br, bias, amp):
        model = RandomHole.for_crystal(crystal, k=jnp.stack([1.0, 1.0, k_br]), hole_bias=bias, amplitude=amp)
        _, diff = pumped_difference(crystal, sf, windows, model, Occupancy(), key=key, n_holes=4, method=method)
        return jnp.sum(weights * diff)

    def tilt_loss(t0):
        _, diff = pumped_difference(crystal, sf, windows, TiltRelaxation(t0=t0), Occupancy(), method=method)
        return jnp.sum(weights * diff)

    point = (jnp.asarray(0.5), jnp.asarray(0.3), jnp.asarray(0.02))
    grads = jax.grad(hole_loss, argnums=(0, 1, 2))(*point)
    h = 1e-5
    for i, g in enumerate(grads):
        up = [p + h if j == i else p for j, p in enumerate(point)]
        down = [p - h if j == i else p for j, p in enumerate(point)]
        fd = (hole_loss(*up) - hole_loss(*down)) / (2 * h)
        assert float(g) == pytest.approx(float(fd), rel=1e-5), i
    t0 = jnp.asarray(0.8)
    fd = (tilt_loss(t0 + h) - tilt_loss(t0 - h)) / (2 * h)
    assert float(jax.grad(tilt_loss)(t0)) == pytest.approx(float(fd), rel=1e-5)
