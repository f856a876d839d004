"""Uncertainties at the optimum: Laplace (inverse Hessian), profiles, and information criteria.

With loss = χ²/2 and w the inverse variances, the Laplace covariance of the unconstrained z is H⁻¹
(H = ∇²loss at ẑ); the physical parameters x(z) get J H⁻¹ J with J = diag(dx/dz) (exact to first order at a
minimum, where the gradient vanishes). The weights are only relative when they come from merge counts
("lsq") or from a scaled photon model, so the covariance is also reported multiplied by the reduced χ²
(the Birge ratio χ²/(n − k)); `sigma` is that scaled value when χ²_red > 1 and the plain one otherwise.
Eigenvalues of the correlation matrix near 0 flag degenerate combinations. Where H is not positive definite
(a fit that has not converged, or a direction the data do not constrain) there is no Laplace σ: `sigma` is NaN
and `sigma_note` says why in words, naming the parameters of the flattest direction (profile one of them).

Model comparison: with Gaussian residuals of known variance, AIC = χ² + 2k and BIC = χ² + k ln n; the model
with the lower value wins and Δ > 10 is decisive.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fitting.optimise import StopRule, make_step, minimise
from fitting.parameters import to_physical, to_unconstrained


@dataclasses.dataclass(frozen=True)
class Laplace:
    """Parameter uncertainties at the optimum.

    Attributes:
        names: fitted parameter names.
        values: (k,) physical values.
        sigma: (k,) one-σ uncertainties (scaled by √χ²_red when χ²_red > 1).
        sigma_unscaled: (k,) from H⁻¹ alone.
        covariance: (k, k) physical covariance matching `sigma`.
        correlation: (k, k).
        chi2, n_data, n_free, chi2_reduced: fit statistics.
        condition: largest / smallest eigenvalue of the correlation matrix (large = near-degenerate).
        positive_definite: False when H has a non-positive eigenvalue (σ are then NaN).
        sigma_note: None when every σ is finite, else why σ is unavailable (a sentence to print beside it).
        hessian: (k, k) Hessian of the loss in the unconstrained parameters at the optimum.
        sigma_statistical: (k,) the σ of the data alone, before any model-error term (`with_model_error`).
        sigma_model: (k,) the model-error term added in quadrature (None: none added).
    """

    names: tuple[str, ...]
    values: np.ndarray
    sigma: np.ndarray
    sigma_unscaled: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    chi2: float
    n_data: int
    n_free: int
    chi2_reduced: float
    condition: float
    positive_definite: bool
    sigma_note: str | None = None
    hessian: np.ndarray | None = None
    sigma_statistical: np.ndarray | None = None
    sigma_model: np.ndarray | None = None

    def table(self) -> dict[str, dict]:
        """{name: {"value", "sigma"}}, plus "sigma_note" (the reason) where σ is NaN or infinite."""
        out: dict[str, dict] = {}
        for n, v, s in zip(self.names, self.values, self.sigma, strict=True):
            out[n] = {"value": float(v), "sigma": float(s)}
            if not np.isfinite(s):
                out[n]["sigma_note"] = self.sigma_note
        return out


def laplace(objective, z_hat: np.ndarray) -> Laplace:
    """Laplace uncertainties of `objective` (an `Objective`) at z_hat (module docstring)."""
    z = jnp.asarray(z_hat, float)
    hessian = np.asarray(jax.hessian(objective)(z), float)
    hessian = 0.5 * (hessian + hessian.T)
    chi2 = float(objective.chi2(z))
    n_data, n_free = objective.n_data, objective.n_free
    dof = max(n_data - n_free, 1)
    chi2_red = chi2 / dof
    finite = bool(np.all(np.isfinite(hessian)))
    eig = np.linalg.eigvalsh(hessian) if finite else np.full(len(hessian), np.nan)
    positive = finite and bool(np.all(eig > 0))
    cov_z = np.linalg.pinv(hessian) if positive else np.full_like(hessian, np.nan)
    jac = np.asarray(objective.parameters.jacobian(z), float)
    cov = jac[:, None] * cov_z * jac[None, :]
    sigma0 = np.sqrt(np.diag(cov))
    factor = max(chi2_red, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sigma0, sigma0)
        corr_eig = np.linalg.eigvalsh(corr) if positive else np.array([np.nan])
        condition = float(corr_eig.max() / corr_eig.min()) if positive and corr_eig.min() > 0 else math.inf
    names = objective.parameters.names
    note = None if np.all(np.isfinite(sigma0)) else sigma_unavailable(hessian, names, finite=finite)
    return Laplace(
        names=names,
        values=np.asarray(objective.parameters.physical(z), float),
        sigma=sigma0 * math.sqrt(factor),
        sigma_unscaled=sigma0,
        covariance=cov * factor,
        correlation=corr,
        chi2=chi2,
        n_data=n_data,
        n_free=n_free,
        chi2_reduced=chi2_red,
        condition=condition,
        positive_definite=positive,
        sigma_note=note,
        hessian=hessian,
    )


def model_shift(objective, other, z_hat: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """(k,) physical parameter shift when `objective`'s model is replaced by `other`'s at the optimum z_hat.

    One Newton step of `other` from z_hat: δz = −H⁻¹ ∇L_other(z_hat) (∇L = 0 there for `objective`), mapped to
    physical units by the parameter Jacobian. Exact for quadratic losses with equal Hessians. With `other` the
    same fit on a finer quadrature rule, |δx| is the quadrature error of the fitted values.
    """
    z = jnp.asarray(z_hat, float)
    grad = np.asarray(jax.grad(other)(z), float)
    dz = -np.linalg.pinv(hessian) @ grad
    return np.asarray(objective.parameters.jacobian(z), float) * dz


def with_model_error(unc: Laplace, shift: np.ndarray) -> Laplace:
    """`unc` with |shift| added in quadrature to every σ (a systematic error of the forward model, e.g. the
    quadrature of the hole average); the statistical and model parts are kept apart in the result."""
    model = np.abs(np.asarray(shift, float))
    sigma = np.sqrt(unc.sigma**2 + model**2)
    return dataclasses.replace(unc, sigma=sigma, sigma_statistical=unc.sigma, sigma_model=model)


def sigma_unavailable(hessian: np.ndarray, names: tuple[str, ...], *, finite: bool = True) -> str:
    """Why the Laplace σ of a fit with Hessian `hessian` (in z) is NaN, in words, naming the parameters that
    dominate its lowest-curvature direction (those with at least half the largest eigenvector component)."""
    if not finite:
        return ("σ unavailable: the Hessian of χ² at the minimum is not finite (NaN or infinite χ² or gradient "
                "there); check the fit's loss curve.")  # fmt: skip
    eig, vectors = np.linalg.eigh(hessian)
    weight = np.abs(vectors[:, 0])
    flat = [names[i] for i in np.argsort(-weight) if weight[i] >= 0.5 * weight.max()]
    if eig[0] > 0:  # positive definite, yet σ is not finite: the constraint map overflowed (e.g. exp(z) = inf)
        return (f"σ unavailable: the physical value of {', '.join(flat)} is at the edge of floating-point range; "
                "use --profile NAME for a likelihood interval.")  # fmt: skip
    return (f"σ unavailable: the Hessian at the minimum is not positive definite (smallest eigenvalue "
            f"{eig[0]:.3g}, along {', '.join(flat)}): the fit has not converged, or a parameter is unconstrained by "
            f"the data; use --profile {flat[0]} (a profile-likelihood interval).")  # fmt: skip


PROFILE_STOP = StopRule(max_steps=40, patience=5, rel_tol=1e-7)
PROFILE_OPTIMIZER = optax.lbfgs()  # re-fits from a nearby optimum: a few quasi-Newton steps each
Z_LIMIT = 8.0  # |z| beyond which a unit-interval parameter sits at its bound (sigmoid(±8) = 0.99966, 3.4e-4)
# A positive parameter (x = exp(z)) has its bounds at z → ±∞, so no fixed z marks them (exp(−8) = 3.4e-4 Å is a
# perfectly good amplitude): its scan stops where x has moved by this factor from the fitted value without
# reaching the Δχ² level; below x̂ · 1e-6 (above x̂ · 1e6) χ² no longer depends on x, the constraint is reached.
POSITIVE_SPAN = math.log(1e6)


class _Pinned(eqx.Module):
    """The objective with parameter `index` held at z = `value` (an array, so one compile serves a scan)."""

    objective: eqx.Module
    value: jax.Array
    index: int = eqx.field(static=True)

    def full(self, rest):
        return jnp.insert(rest, self.index, self.value)

    def __call__(self, rest):
        return self.objective(self.full(rest))


@dataclasses.dataclass(frozen=True)
class Profile:
    """χ² along one parameter with the others re-optimised at every point.

    Attributes:
        name: the profiled parameter.
        values: (m,) physical values scanned, ascending.
        chi2: (m,) profiled χ² at each value.
        unit: Δχ² of one σ, max(χ²_red, 1) (the Birge scaling `laplace` applies too).
        bounds: (low, high): the constraint (0, 1 or inf) on a side where the scan reached it below the level,
            else None (there the scan crossed the level, or stopped after max_points: interval end NaN).
    """

    name: str
    values: np.ndarray
    chi2: np.ndarray
    unit: float
    bounds: tuple[float | None, float | None]

    def interval(self, n_sigma: float = 1.0) -> tuple[float, float]:
        """Likelihood-ratio interval {x : χ²(x) − min χ² ≤ n_sigma² · unit} (its hull when it has gaps), ends
        interpolated between scan points; an end that reaches the constraint is the constraint's value."""
        level = self.chi2.min() + n_sigma**2 * self.unit
        inside = np.flatnonzero(self.chi2 <= level)
        lo, hi = inside[0], inside[-1]
        ends = []
        for j, outer, bound in ((lo, lo - 1, self.bounds[0]), (hi, hi + 1, self.bounds[1])):
            if 0 <= outer < len(self.values):
                ends.append(float(np.interp(level, *_ascending(self.chi2[[j, outer]], self.values[[j, outer]]))))
            else:
                ends.append(np.nan if bound is None else float(bound))
        return ends[0], ends[1]


def _ascending(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x)
    return x[order], y[order]


def profile(
    objective,
    z_hat: np.ndarray,
    index: int,
    *,
    n_sigma: float = 2.0,
    dz: float = 0.25,
    chi2_reduced: float = 1.0,
    optimizer: optax.GradientTransformation | None = None,
    stop: StopRule = PROFILE_STOP,
    max_points: int = 40,
) -> Profile:
    """Profile χ² of parameter `index` outward from the optimum z_hat until Δχ² > n_sigma² · max(χ²_red, 1).

    The scan walks in the unconstrained z of the parameter, on each side of ẑ, in steps of `dz` (of the order
    of its Laplace σ_z, so the re-fits stay short; doubled, up to 1, where χ² rises by less than a quarter σ per
    step), and re-fits the others from the previous point's optimum (continuation: a curved valley is followed
    instead of re-entered from ẑ). A side that reaches the constraint below the level stops there: a
    unit-interval parameter at |z| = Z_LIMIT, a positive one at x̂ · 1e∓6 (`at_bound`). Unlike the Laplace σ
    this holds where χ² is not quadratic in the parameter, e.g. the hole bias, whose valley is flat on one side
    and reaches its bounds.
    """
    params = objective.parameters
    transform = params.transforms[index]
    z_hat = np.asarray(z_hat, float)
    optimizer, step = _optimizer_and_step(optimizer)
    unit = max(chi2_reduced, 1.0)
    best = float(objective.chi2(jnp.asarray(z_hat)))
    points = {float(z_hat[index]): best}
    reached: list[float | None] = []
    for side in (-1.0, 1.0):
        rest, z_i, bound, step_z, previous = np.delete(z_hat, index), float(z_hat[index]), None, dz, best
        for _ in range(max_points):
            z_i += side * step_z
            if at_bound(transform, z_i, float(z_hat[index]), side):
                bound = _bound(transform, side)
                break
            rest, chi2 = _pinned_fit(objective, rest, index, z_i, optimizer, stop, step)
            points[z_i] = chi2
            best = min(best, chi2)
            if chi2 > best + n_sigma**2 * unit:
                break  # a crossing: the interval end lies inside the scan
            if chi2 - previous < 0.25 * unit:  # a flat stretch (e.g. a bounded parameter near its bound): speed up
                step_z = min(2.0 * step_z, 1.0)
            previous = chi2
        reached.append(bound)
    zs = np.array(sorted(points))
    values = np.asarray(to_physical(transform, jnp.asarray(zs)), float)
    chi2s = np.array([points[z] for z in zs])
    return Profile(params.names[index], values, chi2s, unit, (reached[0], reached[1]))


def profiled_chi2(
    objective,
    z_hat: np.ndarray,
    index: int,
    value: float,
    optimizer: optax.GradientTransformation | None = None,
    *,
    stop: StopRule = PROFILE_STOP,
) -> float:
    """χ² with parameter `index` held at the physical `value` and the others re-fitted from ẑ: one point of the
    profile. χ²(value) − min χ² ≤ n² · max(χ²_red, 1) says `value` lies in the profile's nσ interval (the
    likelihood-ratio test), at the cost of one re-fit instead of a scan."""
    optimizer, step = _optimizer_and_step(optimizer)
    z_hat = np.asarray(z_hat, float)
    rest = np.delete(z_hat, index)
    z_value = to_unconstrained(objective.parameters.transforms[index], value)
    return _pinned_fit(objective, rest, index, z_value, optimizer, stop, step)[1]


def _pinned_fit(objective, rest: np.ndarray, index: int, z_value: float, optimizer, stop, step):
    """(re-fitted other z, χ²) with z[index] = z_value, starting from `rest`."""
    pinned = _Pinned(objective, jnp.asarray(z_value), index)
    if rest.size:
        rest = minimise(pinned, rest, optimizer, stop=stop, step=step).z
    return rest, float(objective.chi2(pinned.full(jnp.asarray(rest))))


def _optimizer_and_step(optimizer):
    """(optimizer, its jitted step); the default optimiser's step is shared, so a scan per seed compiles once."""
    return (PROFILE_OPTIMIZER, _default_step()) if optimizer is None else (optimizer, make_step(optimizer))


@functools.cache
def _default_step():
    return make_step(PROFILE_OPTIMIZER)


def scan_step(unc: Laplace, parameters, z_hat: np.ndarray, index: int) -> float:
    """A profile step: half the Laplace σ of parameter `index` in its unconstrained z, clipped to [0.05, 0.5]
    (0.25 where the Hessian gave no σ)."""
    jac = abs(float(parameters.jacobian(jnp.asarray(z_hat, float))[index]))
    sigma_z = float(unc.sigma[index]) / jac if jac > 0 else np.nan
    return float(np.clip(0.5 * sigma_z, 0.05, 0.5)) if np.isfinite(sigma_z) else 0.25


def at_bound(transform: str, z: float, z_hat: float, side: float) -> bool:
    """Whether a profile scan at z, walking in direction `side` (±1) from the optimum z_hat, has reached the
    constraint of its parameter: |z| > Z_LIMIT on that side for a unit-interval one, a factor 1e6 from the fitted
    value for a positive one (its bounds 0 and ∞ lie at z → ∓∞), never for a free one."""
    if transform == "unit":
        return side * z > Z_LIMIT
    if transform == "positive":
        return side * (z - z_hat) > POSITIVE_SPAN
    return False


def _bound(transform: str, side: float) -> float:
    if transform == "unit":
        return 0.0 if side < 0 else 1.0
    return 0.0 if side < 0 else np.inf  # positive


def information_criteria(chi2: float, n_free: int, n_data: int) -> dict[str, float]:
    """AIC = χ² + 2k and BIC = χ² + k ln n for Gaussian residuals of known variance."""
    return {"aic": chi2 + 2.0 * n_free, "bic": chi2 + n_free * math.log(max(n_data, 1))}
