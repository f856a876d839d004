"""fitting/: family-averaged windows, constrained parameters, objective gradients, recovery, bad input."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fitting.forward import build_forward, one_pair
from fitting.objective import make_objective, voxel_weights
from fitting.optimise import StopRule, latin_hypercube, minimise
from fitting.parameters import select, template_model, to_physical, to_unconstrained
from fitting.uncertainty import information_criteria, laplace, profile, profiled_chi2
from fitting.windows import MeasuredWindows, cubic_rotations, extract_windows, make_layout, rotate_back, weighted_mean
from jaxpolaron.ensemble import pumped_difference
from jaxpolaron.errors import InputError
from jaxpolaron.io import Volume
from jaxpolaron.structure import read_cif
from tests.fit_helpers import QuadraticChi2

VOXEL = 0.02


@pytest.fixture(scope="module")
def structure():
    return read_cif()


def test_cubic_rotations_form_the_group():
    rots = cubic_rotations()
    assert rots.shape == (24, 3, 3) and np.array_equal(rots[0], np.eye(3))
    assert all(round(np.linalg.det(r)) == 1 for r in rots)
    keys = {r.tobytes() for r in rots}
    assert len(keys) == 24
    assert all((a @ b).tobytes() in keys for a in rots for b in rots)  # closed under products


def _grid_volume(values, n, weight=None):
    axis = VOXEL * (np.arange(n) - n // 2)
    return Volume("grid", (axis, axis, axis), dark=values, pump=values + 1.0, weight=weight, units="counts")


def test_windows_average_every_orientation(structure):
    """Each canonical voxel x is the count-weighted mean of the volume at R(c + x) over the 24 rotations."""
    rng = np.random.default_rng(0)
    n = 41
    values = rng.random((n, n, n))
    counts = rng.integers(0, 3, (n, n, n)).astype(float)
    layout = make_layout(structure.q_of_hkl, [(2, 0, 0), (1, 1, 1)], VOXEL, 2)
    mw = extract_windows(_grid_volume(values, n, {"dark": counts, "pump": counts}), lambda v: layout)
    o = n // 2
    for h_i, c in enumerate(layout.offsets):
        for x in [(0, 0, 0), (1, -2, 0), (2, 1, -1)]:
            pts = [o + r @ (c + np.asarray(x)) for r in cubic_rotations()]
            w = np.array([counts[tuple(p)] for p in pts])
            v = np.array([values[tuple(p)] for p in pts])
            expect = (w * v).sum() / w.sum() if w.sum() else 0.0
            got = mw.dark[(h_i, *(np.asarray(x) + layout.half))]
            assert got == pytest.approx(expect, rel=1e-12, abs=1e-12)
    assert np.allclose(mw.difference[mw.observed], 1.0)
    # the JAX path of rotate_back is the numpy one
    members = rng.random((len(layout.members),) + (layout.side,) * 3).astype(np.float32)
    assert np.array_equal(np.asarray(rotate_back(layout, jnp.asarray(members))), rotate_back(layout, members))


def test_window_errors(structure):
    layout = make_layout(structure.q_of_hkl, [(4, 4, 4)], VOXEL, 3)
    with pytest.raises(InputError, match="reaches outside the volume"):
        extract_windows(_grid_volume(np.ones((41,) * 3), 41), lambda v: layout)
    axis = np.linspace(0.0, 1.0, 41)
    odd = Volume("grid", (axis, axis, axis), dark=np.ones((41,) * 3), pump=np.ones((41,) * 3))
    with pytest.raises(InputError, match="symmetric about q = 0"):
        extract_windows(odd, lambda v: layout)
    dark_only = Volume("grid", _grid_volume(np.ones((41,) * 3), 41).axes, dark=np.ones((41,) * 3))
    with pytest.raises(InputError, match="no dark and difference"):
        extract_windows(dark_only, lambda v: layout)


@pytest.mark.parametrize("transform, x", [("positive", 0.37), ("unit", 0.1), ("free", -0.02)])
def test_transforms_round_trip(transform, x):
    z = to_unconstrained(transform, x)
    assert float(to_physical(transform, jnp.asarray(z))) == pytest.approx(x, rel=1e-6)


def test_parameter_selection_errors():
    species = ("Cs", "Pb", "Br")
    with pytest.raises(InputError, match="k_cs is the fixed reference"):
        select("random-hole", "k_cs,k_br", species, free_scale=False)
    with pytest.raises(InputError, match="no parameter bogus"):
        select("random-hole", "bogus", species, free_scale=False)
    with pytest.raises(InputError, match="degenerate with a free overall scale"):
        select("random-hole", "amplitude,k_br", species, free_scale=True)
    with pytest.raises(InputError, match="must lie in"):
        to_unconstrained("unit", 1.5)
    p = select("tilt", "t0", species, free_scale=True)
    assert p.transforms == ("unit",)


def _tiny_problem(structure, truth_values, *, truth_engine="direct", n_holes=64):
    """Noise-free 'measured' windows from one 3 nm crystal, (200) and (110) families, 5³ windows.

    The truth is computed on the flattened q points with `truth_engine` (the direct sum by default), the
    fit on stacked window grids (the separable engine): the same physics through a different code path.
    """
    layout = make_layout(structure.q_of_hkl, [(2, 0, 0), (1, 1, 0)], 0.01, 2)
    grid = layout.member_grid()
    common = dict(sizes_nm=[3.0], gamma_shape=2.0, mean_nm=5.4, occupancy=one_pair(), n_holes=n_holes)
    fit_fw = build_forward(structure, grid, method="linear", key=jax.random.key(3), **common)
    crystal = fit_fw.crystals[0]
    truth = template_model("random-hole", structure, crystal, truth_values)
    points = grid.points().reshape(-1, 3)
    i0, diff = pumped_difference(crystal, fit_fw.scattering, points, truth, fit_fw.occupancy,
                                 key=jax.random.fold_in(fit_fw.key, 0), n_holes=n_holes, method="linear",
                                 engine=truth_engine)  # fmt: skip
    i0, diff = (np.asarray(a).reshape(len(layout.members), *(layout.side,) * 3) for a in (i0, diff))
    ones = np.ones((24, 2) + (layout.side,) * 3)
    dark = np.asarray(weighted_mean(rotate_back(layout, i0), ones))
    pump = np.asarray(weighted_mean(rotate_back(layout, i0 + diff), ones))
    # measured units differ from electrons² by a factor the dark scale must find
    windows = MeasuredWindows(layout, 2.5 * dark, 2.5 * pump, ones, ones)
    return fit_fw, crystal, windows


def test_objective_gradient_matches_finite_differences(structure):
    jax.config.update("jax_enable_x64", True)
    try:
        fw, crystal, windows = _tiny_problem(structure, {"k_br": 0.5, "hole_bias": 0.3})
        params = select("random-hole", "k_br,hole_bias,amplitude", crystal.species_names, free_scale=False)
        obj = make_objective(fw, template_model("random-hole", structure, crystal), params, windows,
                             weighting="uniform", scale_mode="dark")  # fmt: skip
        assert float(obj.dark_scale) == pytest.approx(2.5, rel=1e-9)
        z = jnp.asarray(params.unconstrained({"k_br": 0.8, "hole_bias": 0.2, "amplitude": 0.03}))
        grad = np.asarray(jax.grad(obj)(z))
        for i in range(3):
            e = np.zeros(3)
            e[i] = 1e-5
            fd = (float(obj(z + e)) - float(obj(z - e))) / 2e-5
            assert grad[i] == pytest.approx(fd, rel=1e-5)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.slow  # ~40 s of compiles and 300 steps; keeps CI under its 10-minute budget
def test_fit_recovers_truth_from_another_engine(structure):
    """ΔI from the direct sum fitted through the separable window engine: k_Br and bias within 5 %.

    (Amplitude and bias form a long curved valley on this one-size problem: Adam crawls along it, so the
    amplitude is held at its true value here; experiments/parameter_recovery.py fits all three.)
    """
    truth = {"k_br": 0.45, "hole_bias": 0.3}
    fw, crystal, windows = _tiny_problem(structure, truth)
    params = select("random-hole", "k_br,hole_bias", crystal.species_names, free_scale=False)
    obj = make_objective(fw, template_model("random-hole", structure, crystal), params, windows,
                         weighting="uniform", scale_mode="dark")  # fmt: skip
    z0 = params.unconstrained({"k_br": 1.0, "hole_bias": 0.1})
    run = minimise(obj, z0, optax.adam(0.1), stop=StopRule(300, 30, 1e-7))
    got = dict(zip(params.names, np.asarray(params.physical(jnp.asarray(run.z))), strict=True))
    for name, value in truth.items():
        assert got[name] == pytest.approx(value, rel=0.05), (name, got)
    unc = laplace(obj, run.z)
    assert unc.positive_definite and np.all(unc.sigma > 0)
    assert unc.n_free == 2


def test_weights_and_criteria():
    ones = np.ones((24, 1, 3, 3, 3))
    layout = None  # voxel_weights does not look at the layout
    dark, pump = np.full((1, 3, 3, 3), 4.0), np.full((1, 3, 3, 3), 6.0)
    mw = MeasuredWindows(layout, dark, pump, 2 * ones, 3 * ones)  # type: ignore[arg-type]
    # 48 dark and 72 pumped visits per voxel: var = 4/48 + 6/72
    assert np.allclose(voxel_weights(mw, "poisson"), 1.0 / (4 / 48 + 6 / 72))
    assert np.allclose(voxel_weights(mw, "lsq"), 48 * 72 / 120)
    crit = information_criteria(10.0, 2, 100)
    assert crit["aic"] == 14.0 and crit["bic"] == pytest.approx(10 + 2 * np.log(100))


def test_latin_hypercube_strata():
    starts = latin_hypercube(np.zeros(2), 5, key=jax.random.key(0), half_width=1.0)
    assert starts.shape == (5, 2) and np.array_equal(starts[0], np.zeros(2))
    for d in range(2):  # one start per quarter of each axis
        assert sorted(np.floor((starts[1:, d] + 1.0) / 0.5).astype(int).tolist()) == [0, 1, 2, 3]


def _volume_file(tmp_path, *, with_pump=True):
    from jaxpolaron.io import write_volume_file

    n = 21
    axis = 0.05 * (np.arange(n) - n // 2)
    dark = np.ones((n, n, n))
    vol = Volume("grid", (axis, axis, axis), dark=dark, pump=dark * 1.01 if with_pump else None, units="counts")
    return str(write_volume_file(tmp_path / "v.h5", [vol], {}, provenance={}))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fit", "k_br,bogus"], "has no parameter bogus"),
        (["--hkl", "400"], "reaches outside the volume"),
        (["--init", "hole_bias=2"], "must lie in (0, 1)"),
        (["--scale", "free"], "degenerate with a free overall scale"),
    ],
)
def test_fit_cli_one_line_errors(tmp_path, capsys, extra, message):
    from jaxpolaron.cli import main

    code = main(["fit", _volume_file(tmp_path), "--out", str(tmp_path / "runs"), "-q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_fit_cli_needs_a_difference(tmp_path, capsys):
    from jaxpolaron.cli import main

    code = main(["fit", _volume_file(tmp_path, with_pump=False), "--out", str(tmp_path / "runs"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no difference" in err[0], err


def test_orientation_scatter_is_the_variance_of_the_weighted_mean():
    """Orientation means of counts_R unit-variance visits: the estimate averages to 1 / Σ counts."""
    from fitting.windows import orientation_scatter

    rng = np.random.default_rng(1)
    counts = rng.integers(1, 20, (24, 2000)).astype(float)
    counts[:3] = 0.0  # orientations without data are left out
    values = 5.0 + rng.standard_normal((24, 2000)) / np.sqrt(np.maximum(counts, 1.0))
    est = orientation_scatter(values, counts)
    assert np.mean(est * counts.sum(0)) == pytest.approx(1.0, rel=0.03)
    # the estimate matches the actual scatter of the weighted means around the truth
    mean = (counts * values).sum(0) / counts.sum(0)
    assert np.mean((mean - 5.0) ** 2) / np.mean(est) == pytest.approx(1.0, rel=0.1)
    one = np.zeros((24, 1))
    one[0] = 3.0
    assert np.isinf(orientation_scatter(np.ones((24, 1)), one)).all()  # one orientation: no scatter estimate


def test_calibrate_to_dark_recovers_a_mixture_per_family(structure):
    """A 'measured' dark that is a known per-family mixture of two sizes gives back exactly those weights."""
    from fitting.forward import calibrate_to_dark
    from jaxpolaron.structure_factor import intensity

    layout = make_layout(structure.q_of_hkl, [(2, 0, 0), (1, 1, 0)], 0.01, 2)
    fw = build_forward(structure, layout.member_grid(), sizes_nm=[3.0, 4.0], gamma_shape=2.0, mean_nm=5.4)
    counts = np.random.default_rng(2).integers(1, 5, (24, 2) + (layout.side,) * 3).astype(float)
    per_size = [np.asarray(weighted_mean(rotate_back(layout, intensity(c, fw.scattering, fw.grid)), counts))
                for c in fw.crystals]  # fmt: skip
    a = np.array([[0.7, 0.3], [0.2, 1.1]])  # (family, size), in measured units per electron²
    dark = np.stack([a[f, 0] * per_size[0][f] + a[f, 1] * per_size[1][f] for f in range(2)])
    mw = MeasuredWindows(layout, dark, dark, counts, counts)
    cal = calibrate_to_dark(fw, mw)
    w = np.asarray(cal.weights)  # (size, member)
    for f in range(2):
        members = np.unique(layout.member_of[:, f])
        assert np.allclose(w[:, members], a[f][:, None], rtol=1e-4)
    # the calibrated forward reproduces the dark, so the objective's dark scale is 1
    again = np.asarray(weighted_mean(rotate_back(layout, cal.dark()), counts))
    assert np.allclose(again, dark, rtol=1e-4, atol=1e-6 * dark.max())


def test_poisson_noise_scales_with_the_crystals(structure):
    from fitting.synthetic import MergeStatistics, with_poisson_noise

    layout = make_layout(structure.q_of_hkl, [(1, 1, 0)], 0.01, 1)
    shape = (1,) + (layout.side,) * 3
    clean = MeasuredWindows(layout, np.full(shape, 2.0), np.full(shape, 2.2), np.ones((24, *shape)),
                            np.ones((24, *shape)))  # fmt: skip
    stats = MergeStatistics(
        ((1, 1, 0),), 1, 0.01, np.full(shape, 0.5), np.full(shape, 0.5), np.full(shape, 4.0), (10, 10)
    )
    # photons per electron² from the dark: 4 / 2; each class gets 0.5 visits per crystal
    draws = np.stack([with_poisson_noise(clean, stats, 1000.0, jax.random.key(i)).difference for i in range(200)])
    assert draws.mean() == pytest.approx(0.4, abs=0.02)  # (2.2 - 2.0) · 2 photons per visit
    assert draws.var() == pytest.approx(4.0 / 500 + 4.4 / 500, rel=0.1)  # I_d / W_d + I_p / W_p
    noisy = with_poisson_noise(clean, stats, 1000.0, jax.random.key(0))
    assert np.allclose(noisy.counts_dark.sum(0), 500.0)


def test_line_search_stops_instead_of_wandering_off():
    """optax.lbfgs on a quadratic: converges, then stops when its line search can no longer lower the loss."""

    class Quadratic(eqx.Module):
        c: jax.Array

        def __call__(self, z):
            return jnp.sum((z - self.c) ** 2) + 1.0

    run = minimise(Quadratic(jnp.array([1.0, -2.0])), np.zeros(2), optax.lbfgs(), stop=StopRule(200, 50, 0.0))
    assert run.steps < 50 and np.isfinite(run.loss)
    assert np.allclose(run.z, [1.0, -2.0], atol=1e-3)


def test_pumped_scale_absorbs_a_per_class_rescaling(structure):
    """A pumped class rescaled by 0.9 (as per-crystal scaling of a dimmer class does): the "pumped" scale mode
    finds c = 0.9 · 2.5 and fits exactly at the truth, the "dark" mode cannot."""
    truth = {"k_br": 0.5, "hole_bias": 0.3}
    fw, crystal, windows = _tiny_problem(structure, truth, n_holes=8)
    rescaled = MeasuredWindows(windows.layout, windows.dark, 0.9 * windows.pump, windows.counts_dark,
                               windows.counts_pump)  # fmt: skip
    params = select("random-hole", "k_br,hole_bias", crystal.species_names, free_scale=False)
    z = jnp.asarray(params.unconstrained(truth))
    template = template_model("random-hole", structure, crystal)
    pumped = make_objective(fw, template, params, rescaled, weighting="uniform", scale_mode="pumped")
    _, c = pumped.predict(z)
    assert float(c) == pytest.approx(0.9 * 2.5, rel=1e-4)
    assert pumped.n_free == 3
    dark = make_objective(fw, template, params, rescaled, weighting="uniform", scale_mode="dark")
    assert float(pumped.chi2(z)) < 1e-6 * float(dark.chi2(z))


def test_demo_cli_checks_names_before_any_work(tmp_path, capsys):
    from jaxpolaron.cli import main

    code = main(["demo", "--out", str(tmp_path / "demo"), "--fit", "amplitude,bogus", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no parameter bogus" in err[0], err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("centre_bias", [0.5, 0.06])
def test_profile_interval_is_the_marginal_sigma_and_stops_at_the_bound(structure, centre_bias):
    """For χ² quadratic in x the profile's Δχ² = 1 interval is x̂ ± the marginal σ (= Laplace σ), whatever the
    correlation; near the bound 0 of the bias the 2σ interval ends at 0 instead of below it."""
    params = select("random-hole", "amplitude,hole_bias", structure.species, free_scale=False)
    sig, rho = np.array([0.004, 0.1]), 0.8
    cov = np.outer(sig, sig) * np.array([[1.0, rho], [rho, 1.0]])
    centre = np.array([0.02, centre_bias])
    toy = QuadraticChi2(params, jnp.asarray(centre), jnp.asarray(np.linalg.inv(cov)))
    z_hat = params.unconstrained({"amplitude": centre[0], "hole_bias": centre[1]})
    unc = laplace(toy, z_hat)
    assert unc.sigma[1] == pytest.approx(0.1, rel=1e-3)
    # one profile point by itself: the likelihood-ratio test of a value, Δχ² = ((b − b̂)/σ_b)²
    assert profiled_chi2(toy, z_hat, 1, centre_bias + 0.15) == pytest.approx(1.5**2, rel=1e-3)
    prof = profile(toy, z_hat, 1, n_sigma=2.0, dz=0.05)
    lo, hi = prof.interval(1.0)
    assert hi == pytest.approx(centre_bias + 0.1, abs=0.004)
    if centre_bias == 0.5:
        assert lo == pytest.approx(centre_bias - 0.1, abs=0.004)
        assert prof.interval(2.0) == pytest.approx((0.3, 0.7), abs=0.006)
    else:  # 0.06 − 0.2 < 0: the scan runs into the constraint
        assert prof.bounds[0] == 0.0 and prof.interval(2.0)[0] == 0.0
        assert prof.interval(2.0)[1] == pytest.approx(centre_bias + 0.2, abs=0.006)


def test_linear_random_hole_fit_warns_at_large_amplitude():
    from types import SimpleNamespace

    from fitting.run_fit import FitConfig, linear_method_warning

    large, small = SimpleNamespace(amplitude=0.02), SimpleNamespace(amplitude=0.001)
    assert "--method accurate" in linear_method_warning(FitConfig(model="random-hole", method="linear"), large)
    assert linear_method_warning(FitConfig(model="random-hole", method="linear"), small) is None
    assert linear_method_warning(FitConfig(model="random-hole", method="exact"), large) is None
    assert linear_method_warning(FitConfig(model="central-hole", method="linear"), large) is None
