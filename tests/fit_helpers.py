"""Shared test objects for the fitting tests (an importable module, not a test module)."""

import equinox as eqx
import jax


class QuadraticChi2(eqx.Module):
    """χ² = (x − c)ᵀ A (x − c) in the physical values x of `parameters` (A may be singular: a flat direction; the
    inverse of a covariance C gives a Gaussian likelihood of known covariance). The interface `laplace` and
    `profile` use: parameters, chi2, n_data, n_free, loss = χ²/2."""

    parameters: object = eqx.field(static=True)
    centre: jax.Array
    inverse: jax.Array
    n_data: int = eqx.field(static=True, default=100)
    n_free: int = eqx.field(static=True, default=2)

    def chi2(self, z):
        r = self.parameters.physical(z) - self.centre
        return r @ self.inverse @ r

    def __call__(self, z):
        return 0.5 * self.chi2(z)
