"""Uncertainties at the optimum: Laplace (inverse Hessian), profiles, and information criteria.

With loss = χ²/2 and w the inverse variances, the Laplace covariance of the unconstrained z is H⁻¹
(H = ∇²loss at ẑ); the physical parameters x(z) get J H⁻¹ J with J = diag(dx/dz) (exact to first order at a
minimum, where the gradient vanishes). The weights are only relative when they come from merge counts
("lsq") or from a scaled photon model, so the covariance is also reported multiplied by the reduced χ²
(the Birge ratio χ²/(n − k)); `sigma` is that scaled value when χ²_red > 1 and the plain one otherwise.
Eigenvalues of the correlation matrix near 0 flag degenerate combinations.

Model comparison: with Gaussian residuals of known variance, AIC = χ² + 2k and BIC = χ² + k ln n; the model
with the lower value wins and Δ > 10 is decisive.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fitting.optimise import StopRule, make_step, minimise
from fitting.parameters import to_unconstrained


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

    def table(self) -> dict[str, dict[str, float]]:
        return {
            n: {"value": float(v), "sigma": float(s)}
            for n, v, s in zip(self.names, self.values, self.sigma, strict=True)
        }


def laplace(objective, z_hat: np.ndarray) -> Laplace:
    """Laplace uncertainties of `objective` (an `Objective`) at z_hat (module docstring)."""
    z = jnp.asarray(z_hat, float)
    hessian = np.asarray(jax.hessian(objective)(z), float)
    hessian = 0.5 * (hessian + hessian.T)
    chi2 = float(objective.chi2(z))
    n_data, n_free = objective.n_data, objective.n_free
    dof = max(n_data - n_free, 1)
    chi2_red = chi2 / dof
    eig = np.linalg.eigvalsh(hessian)
    positive = bool(np.all(eig > 0))
    cov_z = np.linalg.pinv(hessian) if positive else np.full_like(hessian, np.nan)
    jac = np.asarray(objective.parameters.jacobian(z), float)
    cov = jac[:, None] * cov_z * jac[None, :]
    sigma0 = np.sqrt(np.diag(cov))
    factor = max(chi2_red, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sigma0, sigma0)
        corr_eig = np.linalg.eigvalsh(corr) if positive else np.array([np.nan])
        condition = float(corr_eig.max() / corr_eig.min()) if positive and corr_eig.min() > 0 else math.inf
    return Laplace(
        names=objective.parameters.names,
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
    )


PROFILE_STOP = StopRule(max_steps=30, patience=8)


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
    """χ² along one parameter with the others re-optimised: values (m,), chi2 (m,), and the 1σ interval
    where Δχ² = max(χ²_red, 1) (NaN ends when the scan does not reach it)."""

    name: str
    values: np.ndarray
    chi2: np.ndarray
    interval: tuple[float, float]


def profile(
    objective,
    z_hat: np.ndarray,
    index: int,
    values: np.ndarray,
    optimizer: optax.GradientTransformation | None = None,
    *,
    stop: StopRule = PROFILE_STOP,
    chi2_reduced: float = 1.0,
) -> Profile:
    """Profile χ² of parameter `index` over physical `values`, re-optimising the others from ẑ each time."""
    params = objective.parameters
    transform = params.transforms[index]
    z_hat = np.asarray(z_hat, float)
    others = [i for i in range(len(z_hat)) if i != index]
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    chi2 = []
    step = make_step(optimizer)
    for v in values:
        pinned = _Pinned(objective, jnp.asarray(to_unconstrained(transform, float(v))), index)
        rest = minimise(pinned, z_hat[others], optimizer, stop=stop, step=step).z if others else np.zeros(0)
        chi2.append(float(objective.chi2(pinned.full(jnp.asarray(rest)))))
    chi2 = np.asarray(chi2)
    level = chi2.min() + max(chi2_reduced, 1.0)
    i_min = int(np.argmin(chi2))
    below = chi2 <= level
    lo = hi = np.nan
    if not below[0]:
        j = i_min
        while j > 0 and below[j - 1]:
            j -= 1
        lo = float(np.interp(level, [chi2[j], chi2[j - 1]], [values[j], values[j - 1]])) if j > 0 else np.nan
    if not below[-1]:
        j = i_min
        while j < len(values) - 1 and below[j + 1]:
            j += 1
        hi = (
            float(np.interp(level, [chi2[j], chi2[j + 1]], [values[j], values[j + 1]]))
            if j < len(values) - 1
            else np.nan
        )
    return Profile(params.names[index], np.asarray(values, float), chi2, (lo, hi))


def information_criteria(chi2: float, n_free: int, n_data: int) -> dict[str, float]:
    """AIC = χ² + 2k and BIC = χ² + k ln n for Gaussian residuals of known variance."""
    return {"aic": chi2 + 2.0 * n_free, "bic": chi2 + n_free * math.log(max(n_data, 1))}
