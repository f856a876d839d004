"""Excitation occupancy of the pumped ensemble (SI S2).

Sequential absorption with the cross-section reduced to γ1/γ0 after the first pair and blocked after two:
    dP0/dt = -γ0 P0,  dP1/dt = γ0 P0 - γ1 P1,  dP2/dt = γ1 P1
    P0 = e^{-γ0 t},  P1 = γ0/(γ0 - γ1) (e^{-γ1 t} - e^{-γ0 t}),  P2 = 1 - P0 - P1.
At the paper's fluence γ0 t = 1 and γ1 t = 0.4: P = (0.368, 0.504, 0.128), i.e. 0.760 pairs per dot, with
two pairs assumed to give twice the distortion of one.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class Occupancy(eqx.Module):
    """Probabilities of 0, 1, 2 electron-hole pairs per dot.

    Attributes:
        gamma0_t: γ0 t, excitations per dot at the end of the pulse for the unexcited cross-section (> 0).
        gamma_ratio: γ1/γ0, the relative cross-section with one pair present (the paper: 0.4).
    """

    gamma0_t: Float[Array, ""]
    gamma_ratio: Float[Array, ""]

    def __init__(self, gamma0_t: float | Array = 1.0, gamma_ratio: float | Array = 0.4):
        self.gamma0_t = jnp.asarray(gamma0_t, jnp.result_type(float))
        self.gamma_ratio = jnp.asarray(gamma_ratio, jnp.result_type(float))

    def probabilities(self) -> Float[Array, "3"]:
        """(P0, P1, P2); differentiable, finite at γ1 = γ0 (limit P1 = γ0 t e^{-γ0 t})."""
        g, r = self.gamma0_t, self.gamma_ratio
        p0 = jnp.exp(-g)
        near = jnp.abs(1.0 - r) < 1e-6
        safe = jnp.where(near, 0.5, 1.0 - r)
        p1 = jnp.where(near, g * jnp.exp(-g), (jnp.exp(-r * g) - jnp.exp(-g)) / safe)
        return jnp.stack([p0, p1, 1.0 - p0 - p1])

    def mean_pairs(self) -> Float[Array, ""]:
        """Mean number of pairs per dot, P1 + 2 P2 (the first-order scale of ΔI)."""
        p = self.probabilities()
        return p[1] + 2.0 * p[2]
