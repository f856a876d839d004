"""Numerical precision of the fit: float32 and float64 fits agree, σ is never a bare NaN, `--x64`, and profiles of
small positive parameters (an amplitude of 1e-4 Å) are not mistaken for profiles that reach the bound 0.

The float32/float64 comparison fits the same noise-free windows (simulated once, in float64) with each precision
built inside its own precision context, as tests/test_objective_precision.py does; every JAX object and the
window layout are built anew per precision (a program traced inside `jax.enable_x64` and reused outside can
fail on cached int64 index constants). The fast version fits the central hole (linear ΔI, deterministic); the
random-hole version uses the deterministic quadrature of method "accurate" (the same holes in both precisions)
and is marked slow: its compiles alone (step, Hessian) take minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fitting.parameters import select
from fitting.run_fit import FitConfig, build_objective, fit, format_result
from fitting.uncertainty import POSITIVE_SPAN, Z_LIMIT, at_bound, laplace, profile
from fitting.windows import MeasuredWindows, make_layout, rotate_back, weighted_mean
from tests.fit_helpers import QuadraticChi2

UNITS = 2.5  # measured units per electron²


@dataclasses.dataclass(frozen=True)
class Problem:
    """A small noise-free fit: `truth` simulated, the `fit` parameters started at `start_factor` × truth (the
    others held at the truth), Poisson weights of `visits` merged visits per voxel and class."""

    model: str
    method: str
    truth: dict
    fit: tuple[str, ...]
    visits: float
    nodes: int = 32
    start_factor: float = 0.8
    hkls: tuple = ((2, 0, 0), (1, 1, 0))
    half: int = 2
    voxel: float = 0.01

    def config(self, *, x64: bool, init: dict) -> FitConfig:
        return FitConfig(model=self.model, fit=self.fit, init=init, hkls=self.hkls, half=self.half, sizes_nm=(3.0,),
                         size_weighting="number", occupancy="one-pair", method=self.method, nodes=self.nodes,
                         weighting="poisson", scale="dark", optimizer="lbfgs", max_steps=60, patience=5,
                         rel_tol=1e-9, starts=1, x64=x64)  # fmt: skip

    def layout(self, structure):
        return make_layout(structure.q_of_hkl, self.hkls, self.voxel, self.half)

    def counts(self, layout) -> np.ndarray:
        return np.full((24, len(self.hkls)) + (layout.side,) * 3, self.visits / 24)


CENTRAL = Problem("central-hole", "linear", {"amplitude": 1e-3, "k_br": 0.5}, ("amplitude", "k_br"), visits=2.0)
RANDOM = Problem("random-hole", "accurate", {"k_br": 0.5, "hole_bias": 0.3, "amplitude": 0.005},
                 ("k_br", "amplitude"), visits=1.0)  # fmt: skip


def _measured(structure, problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(dark, pump) family-averaged windows in measured units, simulated in float64 at the truth."""
    with jax.enable_x64(True):
        layout = problem.layout(structure)
        counts = problem.counts(layout)
        ones = np.ones((len(problem.hkls),) + (layout.side,) * 3)
        obj = build_objective(problem.config(x64=True, init=problem.truth),
                              MeasuredWindows(layout, ones, ones, counts, counts), structure)  # fmt: skip
        z = jnp.asarray(obj.parameters.unconstrained({n: problem.truth[n] for n in problem.fit}))
        delta = np.asarray(obj.simulate(z), np.float64)
        dark = UNITS * weighted_mean(rotate_back(layout, np.asarray(obj.forward.dark(), np.float64)), counts)
    return dark, dark + UNITS * delta


def _fit(structure, problem: Problem, measured, *, x64: bool):
    """The fit of `problem` on `measured`, everything built in the precision JAX is in now."""
    layout = problem.layout(structure)  # a fresh layout per precision (module docstring)
    counts = problem.counts(layout)
    windows = MeasuredWindows(layout, *measured, counts, counts)
    init = {n: (problem.start_factor if n in problem.fit else 1.0) * v for n, v in problem.truth.items()}
    return fit(problem.config(x64=x64, init=init), windows, structure=structure)


def _compare(structure, problem: Problem) -> dict:
    """Fit `problem` in float64 and float32; checks (below) and returns {names, values and σ of both}."""
    measured = _measured(structure, problem)
    with jax.enable_x64(True):
        double = _fit(structure, problem, measured, x64=True)
    single = _fit(structure, problem, measured, x64=False)
    assert double.objective.measured.dtype == jnp.float64 and single.objective.measured.dtype == jnp.float32
    d, s = double.laplace, single.laplace
    assert d.positive_definite and s.positive_definite and d.sigma_note is None and s.sigma_note is None
    truth = np.array([problem.truth[n] for n in d.names])
    report = {"names": d.names, "float64": d.values, "float32": s.values, "sigma64": d.sigma, "sigma32": s.sigma}
    # σ: percent-level, not so small that a float32 rounding error would pass as a deviation
    assert np.all((d.sigma > 1e-3 * truth) & (d.sigma < 0.3 * truth)), report
    # both fits find the truth and each other within their σ, and agree to a few per cent
    assert np.all(np.abs(d.values - truth) < d.sigma), report
    assert np.all(np.abs(s.values - truth) < s.sigma), report
    assert np.all(np.abs(s.values - d.values) < np.minimum(s.sigma, d.sigma)), report
    assert np.allclose(s.values, d.values, rtol=0.02), report
    # and float32 reports the same σ (its Hessian is not dominated by rounding)
    assert np.allclose(s.sigma, d.sigma, rtol=0.1), report
    return report


def test_float32_and_float64_fits_agree_central_hole(structure):
    _compare(structure, CENTRAL)


@pytest.mark.slow  # the accurate method's step and Hessian compiles take minutes per precision on 2 cores
def test_float32_and_float64_fits_agree_random_hole_accurate(structure):
    _compare(structure, RANDOM)


def test_fit_refuses_x64_config_in_float32(structure):
    from jaxpolaron.errors import InputError

    layout = CENTRAL.layout(structure)
    ones = np.ones((2,) + (layout.side,) * 3)
    counts = CENTRAL.counts(layout)
    with pytest.raises(InputError, match="jax_enable_x64"):
        fit(CENTRAL.config(x64=True, init={}), MeasuredWindows(layout, ones, ones, counts, counts),
            structure=structure)  # fmt: skip


# --- σ in words, not a bare NaN ---------------------------------------------------------------------------


def _toy(structure, names: str, centre, inverse) -> tuple[QuadraticChi2, np.ndarray]:
    params = select("random-hole", names, structure.species, free_scale=False)
    toy = QuadraticChi2(params, jnp.asarray(centre, float), jnp.asarray(inverse, float))
    return toy, params.unconstrained(dict(zip(params.names, centre, strict=True)))


def test_sigma_of_a_flat_direction_says_why(structure):
    """χ² independent of k_br: the Hessian is singular, σ is NaN and the note names k_br and --profile."""
    toy, z_hat = _toy(structure, "amplitude,k_br", [0.01, 0.5], np.diag([1.0 / 0.001**2, 0.0]))
    unc = laplace(toy, z_hat)
    assert not unc.positive_definite and np.all(np.isnan(unc.sigma))
    assert unc.sigma_note.startswith("σ unavailable: the Hessian at the minimum is not positive definite")
    assert "along k_br" in unc.sigma_note and "--profile k_br" in unc.sigma_note
    table = unc.table()
    assert math.isnan(table["k_br"]["sigma"]) and table["k_br"]["sigma_note"] == unc.sigma_note
    assert json.loads(json.dumps(table))["amplitude"]["sigma_note"] == unc.sigma_note  # NaN stays numeric

    outcome = _Outcome(unc)
    text = format_result(outcome, truth={"amplitude": 0.01, "k_br": 0.5})  # type: ignore[arg-type]
    assert "nan" not in text.lower() and text.count("n/a") == 4
    assert unc.sigma_note in text.splitlines()
    # a well-determined fit prints numbers and no note
    toy, z_hat = _toy(structure, "amplitude,k_br", [0.01, 0.5], np.diag([1.0 / 0.001**2, 1.0 / 0.05**2]))
    good = laplace(toy, z_hat)
    assert good.sigma_note is None and "sigma_note" not in good.table()["k_br"]
    assert "n/a" not in format_result(_Outcome(good))  # type: ignore[arg-type]


@dataclasses.dataclass
class _Outcome:
    """The parts of a FitOutcome that `format_result` reads."""

    laplace: object
    criteria: dict = dataclasses.field(default_factory=lambda: {"aic": 1.0, "bic": 2.0})
    steps: int = 3
    seconds: float = 0.0
    profile: object = None
    objective: object = dataclasses.field(
        default_factory=lambda: type("O", (), {"layout": type("L", (), {"hkls": ((2, 0, 0),)})()})()
    )


# --- profiles of small positive parameters ------------------------------------------------------------------


def test_profile_of_a_small_amplitude_is_not_at_its_bound(structure):
    """An amplitude fitted at 1e-4 Å (z = ln 1e-4 = −9.2, beyond the old |z| = 8 "bound" test) with σ = 2e-5 Å:
    both ends of the 2σ interval are crossings inside the scan, no bound is reported."""
    sig = np.array([2e-5, 0.05])
    toy, z_hat = _toy(structure, "amplitude,k_br", [1e-4, 0.5], np.diag(1.0 / sig**2))
    assert z_hat[0] < -Z_LIMIT
    prof = profile(toy, z_hat, 0, n_sigma=2.0, dz=0.05)
    assert prof.bounds == (None, None)
    assert prof.interval(1.0) == pytest.approx((8e-5, 1.2e-4), rel=0.02)
    assert prof.interval(2.0) == pytest.approx((6e-5, 1.4e-4), rel=0.02)


def test_profile_of_an_unconstrained_small_amplitude_reaches_zero(structure):
    """σ = 1e-3 Å ≫ the fitted 1e-4 Å: the data do not exclude 0, so the lower end is the bound 0 (reached at
    1e-6 × the fitted value), the upper end a crossing near 1e-4 + 2e-3."""
    toy, z_hat = _toy(structure, "amplitude,k_br", [1e-4, 0.5], np.diag([1.0 / 1e-3**2, 1.0 / 0.05**2]))
    prof = profile(toy, z_hat, 0, n_sigma=2.0, dz=0.25)
    assert prof.bounds == (0.0, None)
    assert prof.values.min() < 1e-4 * math.exp(-POSITIVE_SPAN + 1.0)
    lo, hi = prof.interval(2.0)
    # the upper end is interpolated linearly in x between scan points up to e (a z step of 1) apart: ~10 %
    assert lo == 0.0 and hi == pytest.approx(1e-4 + 2e-3, rel=0.15)


def test_bound_tests_per_transform():
    z_hat = math.log(1e-4)
    assert not at_bound("positive", z_hat - 1.0, z_hat, -1.0)  # 1e-4 / e: far from 0 relative to its value
    assert at_bound("positive", z_hat - POSITIVE_SPAN - 0.1, z_hat, -1.0)
    assert at_bound("positive", z_hat + POSITIVE_SPAN + 0.1, z_hat, 1.0)
    assert not at_bound("free", -100.0, 0.0, -1.0)
    # a unit-interval parameter near 1 (z = 9) scanned downwards is not at its lower bound 0
    assert not at_bound("unit", 8.9, 9.2, -1.0) and at_bound("unit", 9.4, 9.2, 1.0)
    assert at_bound("unit", -8.1, 0.0, -1.0) and not at_bound("unit", -8.1, 0.0, 1.0)


# --- the --x64 flag ---------------------------------------------------------------------------------------


def test_fit_cli_x64_flag_is_parsed_and_recorded(monkeypatch, tmp_path):
    """`jaxpolaron fit --x64` switches JAX to float64 before anything is built and records x64 in the config;
    without it the config says False. The fit itself is stubbed out (its result plumbing is tested below)."""
    import fitting.run_fit as run_fit
    from jaxpolaron.cli import build_parser

    seen = []

    def fake_fit(config, windows, **kwargs):
        seen.append((config, str(jnp.result_type(float))))
        raise _Stop

    monkeypatch.setattr(run_fit, "load_windows", lambda *a, **k: None)
    monkeypatch.setattr(run_fit, "fit", fake_fit)
    parser = build_parser()
    base = ["fit", "v.h5", "--out", str(tmp_path), "--model", "central-hole", "--fit", "amplitude", "-q"]
    assert parser.parse_args(base).x64 is False
    try:
        for extra in ([], ["--x64"]):
            args = parser.parse_args(base + extra)
            with pytest.raises(_Stop):
                args.func(args)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert [(c.x64, p) for c, p in seen] == [(False, "float32"), (True, "float64")]
    assert dataclasses.asdict(seen[1][0])["x64"] is True  # what config.json holds


class _Stop(Exception):
    pass


def test_fit_result_records_precision_and_sigma_reason(structure, monkeypatch, tmp_path):
    """A run whose Laplace σ is unavailable: result.json keeps σ numeric (NaN) beside the reason in words,
    records the precision, and the printed table says n/a with the reason."""
    import fitting.run_fit as run_fit

    real = run_fit.laplace

    def singular(objective, z):  # what a non-positive-definite Hessian gives
        unc = real(objective, z)
        nan = np.full_like(unc.sigma, np.nan)
        note = "σ unavailable: the Hessian at the minimum is not positive definite."
        return dataclasses.replace(unc, sigma=nan, sigma_unscaled=nan, positive_definite=False, sigma_note=note)

    monkeypatch.setattr(run_fit, "laplace", singular)
    layout = CENTRAL.layout(structure)
    counts = CENTRAL.counts(layout)
    dark = np.full((2,) + (layout.side,) * 3, 100.0)
    problem = dataclasses.replace(CENTRAL, fit=("amplitude",))
    config = dataclasses.replace(problem.config(x64=False, init={}), max_steps=2)
    outcome = fit(config, MeasuredWindows(layout, dark, dark + 0.1, counts, counts), structure=structure,
                  out_root=tmp_path)  # fmt: skip
    result = json.loads((outcome.run_dir / "result.json").read_text())["result"]
    assert result["precision"] == "float32"
    assert result["sigma_unavailable"].startswith("σ unavailable")
    assert math.isnan(result["parameters"]["amplitude"]["sigma"])
    assert result["parameters"]["amplitude"]["sigma_note"] == result["sigma_unavailable"]
    config_json = json.loads((outcome.run_dir / "config.json").read_text())["config"]
    assert config_json["fit"]["x64"] is False
    text = format_result(outcome)
    assert "n/a" in text and "nan" not in text.lower() and result["sigma_unavailable"] in text


def test_model_shift_is_the_minimiser_shift_of_a_quadratic():
    """`model_shift` (one Newton step of the other model from the optimum) equals the exact move of the minimum
    for quadratic losses with one Hessian, and `with_model_error` adds it to σ in quadrature."""
    from fitting.uncertainty import model_shift, with_model_error

    params = select("central-hole", "k_br,amplitude", ("Cs", "Pb", "Br"), free_scale=False)
    inverse = jnp.asarray([[4.0e2, 30.0], [30.0, 9.0e4]])
    centre = jnp.asarray([0.5, 0.02])
    here, there = QuadraticChi2(params, centre, inverse), QuadraticChi2(params, centre * 1.001, inverse)
    z_hat = params.unconstrained(dict(zip(params.names, [0.5, 0.02], strict=True)))
    unc = laplace(here, np.asarray(z_hat))
    shift = model_shift(here, there, np.asarray(z_hat), unc.hessian)
    # the loss is quadratic in x, not in z (log parameters): the Newton step is exact to second order in the shift
    np.testing.assert_allclose(shift, np.asarray(centre) * 1e-3, rtol=2e-3)
    total = with_model_error(unc, shift)
    np.testing.assert_allclose(total.sigma, np.sqrt(unc.sigma**2 + shift**2))
    np.testing.assert_array_equal(total.sigma_statistical, unc.sigma)


def test_accurate_fit_sigma_includes_the_quadrature_error(structure):
    """An accurate random-hole fit adds the quadrature error (its shift on twice the nodes) to σ in quadrature,
    keeps the parts apart, prints it, and still finds the truth within σ."""
    # one parameter on one family of windows: the point is σ, not the fit
    problem = dataclasses.replace(RANDOM, fit=("amplitude",), hkls=((2, 0, 0),))
    outcome = _fit(structure, problem, _measured(structure, problem), x64=False)
    lp = outcome.laplace
    assert lp.sigma_model is not None and np.all(np.isfinite(lp.sigma_model)) and np.all(lp.sigma_model > 0)
    np.testing.assert_allclose(lp.sigma, np.sqrt(lp.sigma_statistical**2 + lp.sigma_model**2), rtol=1e-6)
    truth = np.array([problem.truth[n] for n in lp.names])
    assert np.all(np.abs(lp.values - truth) < lp.sigma), (lp.values, lp.sigma)
    assert "quadrature error of the hole average" in format_result(outcome)
