"""fitting/objective.py in float32: the simulated ΔI, the fitted ΔI and the loss gradient match float64.

The dark here is 10⁴–10⁵ times ΔI (a small field amplitude; in measured windows the ratio is 10³–10⁴ and
the rounding is worse), so forming ΔI as the difference of the two averaged classes in float32 loses ~0.5 %
of it and ~1 % of the gradient; the objective keeps ΔI as a difference end to end (its module docstring) and
agrees with float64 to ~1e-6.

The model is the central hole (deterministic): a random-hole model draws different holes from the same key in
float32 and float64 (`jax.random.uniform` depends on the dtype), which would hide the rounding compared here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fitting.forward import build_forward
from fitting.objective import make_objective
from fitting.parameters import select, template_model
from fitting.windows import MeasuredWindows, make_layout, rotate_back, weighted_mean

HKLS = ((2, 0, 0), (1, 1, 0), (1, 1, 1))
TRUTH = {"amplitude": 3e-5, "k_br": 0.5}
START = {"amplitude": 2.4e-5, "k_br": 0.6}
UNITS = 2.5  # measured units per electron²
PUMP_RESCALE = 0.9995  # the measured pumped class a little dimmer: the "pumped" scale c has something to find


@jax.jit
def _evaluate(objective, z):
    """Simulated ΔI, fitted ΔI, loss and its gradient in one program (the forward is traced once)."""

    def loss(z):
        return objective(z), (objective.simulate(z), objective.predict(z)[0])

    (value, (simulated, fitted)), grad = jax.value_and_grad(loss, has_aux=True)(z)
    return {"simulate": simulated, "predict": fitted, "loss": value, "grad": grad}


def _problem(structure):
    """A "pumped"-scale objective builder on (200), (110), (111) windows of 5³ voxels, one 3 nm crystal, in the
    precision JAX is in (every JAX object is built here), the model's dark in measured units and z at TRUTH and
    START. The objectives it builds share their static parts, so `_evaluate` compiles once per precision.

    The dark and pumped counts differ slightly, as in a merge, so the objective's parameter-free offset is not
    zero.
    """
    layout = make_layout(structure.q_of_hkl, HKLS, 2.0 / 256, 2)
    fw = build_forward(structure, layout.member_grid(), sizes_nm=[3.0], gamma_shape=2.0, mean_nm=5.4,
                       method="linear")  # fmt: skip
    crystal = fw.crystals[0]
    params = select("central-hole", tuple(TRUTH), crystal.species_names, free_scale=False)
    template = template_model("central-hole", structure, crystal)
    rng = np.random.default_rng(0)
    counts_dark = rng.integers(1000, 1101, (24, len(HKLS)) + (layout.side,) * 3).astype(float)
    counts_pump = counts_dark + (rng.random(counts_dark.shape) < 0.05)
    dark = UNITS * weighted_mean(rotate_back(layout, np.asarray(fw.dark(), np.float64)), counts_dark)

    def objective(dark, pump):
        windows = MeasuredWindows(layout, dark, pump, counts_dark, counts_pump)
        return make_objective(fw, template, params, windows, weighting="uniform", scale_mode="pumped")

    return objective, dark, jnp.asarray(params.unconstrained(TRUTH)), jnp.asarray(params.unconstrained(START))


@pytest.fixture(scope="module")
def both(structure):
    """(float32, float64 results at START, max dark / max |ΔI| per window) for the same measured windows
    (numpy float64): the truth simulated in float64, its pumped class dimmed by PUMP_RESCALE."""
    with jax.enable_x64(True):
        objective, dark, z_truth, z_start = _problem(structure)
        delta = np.asarray(_evaluate(objective(dark, dark), z_truth)["simulate"], np.float64)
        pump = PUMP_RESCALE * (dark + UNITS * delta)
        double = {k: np.asarray(v, np.float64) for k, v in _evaluate(objective(dark, pump), z_start).items()}
    objective, _, _, z_start = _problem(structure)
    single_objective = objective(dark, pump)
    assert single_objective.measured.dtype == jnp.float32 and single_objective.offset.dtype == jnp.float32
    single = {k: np.asarray(v, np.float64) for k, v in _evaluate(single_objective, z_start).items()}
    ratio = np.abs(dark).max(axis=(1, 2, 3)) / np.abs(UNITS * delta).max(axis=(1, 2, 3))
    return single, double, ratio


def _relative_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per window (leading axis) ‖a − b‖ / ‖b‖."""
    axes = tuple(range(1, a.ndim))
    return np.sqrt(np.sum((a - b) ** 2, axis=axes) / np.sum(b**2, axis=axes))


@pytest.mark.parametrize("key", ["simulate", "predict"])
def test_float32_delta_i_matches_float64(both, key):
    single, double, ratio = both
    assert np.all(ratio > 1e4)  # where pump − dark of the averaged classes loses ΔI in float32
    err = _relative_l2(single[key], double[key])
    assert np.all(err <= 1e-3), dict(zip(HKLS, err.tolist(), strict=True))


def test_float32_loss_and_gradient_match_float64(both):
    single, double, _ = both
    assert single["loss"] == pytest.approx(double["loss"], rel=1e-3)
    g32, g64 = single["grad"], double["grad"]
    assert np.linalg.norm(g64) > 0
    assert np.linalg.norm(g32 - g64) <= 3e-3 * np.linalg.norm(g64), (g32, g64)
