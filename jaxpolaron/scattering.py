"""Atomic X-ray scattering factors f(|q|, E) = f0(|q|) + f'(E) + i f''(E), one per species.

f0 comes from xraydb's Waasmaier–Kirfel fits (neutral atoms or ions), evaluated in JAX from the library's
own coefficients so it can be jitted; f' and f'' are xraydb's Chantler values at the beam energy. f' and
f'' are array fields: near the Br K (13.474 keV) and Pb L3 (13.035 keV) edges f' changes fast with energy,
so they are worth refining.

Units: |q| in Å⁻¹ with |q| = 1/d; the tables take s = sin θ / λ = |q| / 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import xraydb
from jaxtyping import Array, Complex, Float

from jaxpolaron.errors import InputError

DEFAULT_ENERGY_KEV = 13.6
HC_KEV_A = 12.398419843320026  # h c in keV·Å


def wavelength_a(energy_kev: float) -> float:
    """X-ray wavelength in Å for a photon energy in keV."""
    return HC_KEV_A / energy_kev


def ion_label(element: str, charge: int) -> str:
    """xraydb's label for an element with a formal charge ('Pb', 2) -> 'Pb2+'."""
    if charge == 0:
        return element
    return f"{element}{abs(charge)}{'+' if charge > 0 else '-'}"


class ScatteringFactors(eqx.Module):
    """Per-species complex scattering factors at one beam energy.

    Attributes:
        wk_scale: (S, 5) Waasmaier–Kirfel a_i.
        wk_exponent: (S, 5) Waasmaier–Kirfel b_i, Å².
        wk_offset: (S,) Waasmaier–Kirfel c.
        f1: (S,) anomalous f' (electrons).
        f2: (S,) anomalous f'' (electrons).
        labels: the f0 label per species ('Pb' or 'Pb2+').
        energy_kev: beam energy the anomalous terms belong to.
    """

    wk_scale: Float[Array, "S 5"]
    wk_exponent: Float[Array, "S 5"]
    wk_offset: Float[Array, " S"]
    f1: Float[Array, " S"]
    f2: Float[Array, " S"]
    labels: tuple[str, ...] = eqx.field(static=True)
    energy_kev: float = eqx.field(static=True)

    def f0(self, q_abs: Float[Array, ...]) -> Float[Array, "S ..."]:
        """Thomson scattering factor f0 per species at |q| (Å⁻¹, any shape) -> (S, *q.shape)."""
        s2 = (jnp.asarray(q_abs) / 2.0) ** 2
        expo = jnp.exp(-self.wk_exponent[(..., *([None] * s2.ndim))] * s2)
        return self.wk_offset[(..., *([None] * s2.ndim))] + jnp.sum(
            self.wk_scale[(..., *([None] * s2.ndim))] * expo, axis=1
        )

    def __call__(self, q_abs: Float[Array, ...]) -> Complex[Array, "S ..."]:
        """Complex f per species at |q| (Å⁻¹, any shape) -> (S, *q.shape)."""
        extra = (..., *([None] * jnp.ndim(q_abs)))
        return self.f0(q_abs) + self.f1[extra] + 1j * self.f2[extra]

    def on_axes(
        self, qx: Float[Array, " nx"], qy: Float[Array, " ny"], qz: Float[Array, " nz"]
    ) -> tuple[Complex[Array, " S"], tuple[Float[Array, "S 5 nx"], Float[Array, "S 5 ny"], Float[Array, "S 5 nz"]]]:
        """f on the grid qx × qy × qz in factored form, without building |q| on the grid.

        exp(-b |q|²/4) = exp(-b qx²/4) exp(-b qy²/4) exp(-b qz²/4), so
        f_s(q) = const_s + Σ_i gx[s, i, a] gy[s, i, b] gz[s, i, c]   (the a_i are folded into gx).

        Returns:
            const (S,) = c + f' + i f'' and the per-axis factors (gx, gy, gz), each (S, 5, n_axis).
        """
        gx, gy, gz = (jnp.exp(-self.wk_exponent[..., None] * (q / 2.0) ** 2) for q in (qx, qy, qz))
        return self.wk_offset + self.f1 + 1j * self.f2, (self.wk_scale[..., None] * gx, gy, gz)

    def forward(self) -> Complex[Array, " S"]:
        """f at q = 0 per species (S,): Z - charge + f' + i f''."""
        return self.wk_offset + jnp.sum(self.wk_scale, axis=1) + self.f1 + 1j * self.f2


def _wk_row(label: str):
    rows = [r for r in xraydb.get_xraydb().get_cache("Waasmaier") if r.ion == label]
    if not rows:
        raise InputError(f"no X-ray form factor for {label!r} in xraydb (known ions: see xraydb.f0_ions).")
    return rows[0]


def scattering_factors(
    species: Sequence[str],
    energy_kev: float = DEFAULT_ENERGY_KEV,
    *,
    charges: Mapping[str, int] | Sequence[int] | None = None,
    anomalous: bool = True,
) -> ScatteringFactors:
    """Build per-species scattering factors from xraydb.

    Args:
        species: element symbols, in species-index order.
        energy_kev: beam energy in keV (> 0.03, the start of the Chantler tables).
        charges: formal charge per species (mapping or sequence) to use ion f0 tables; None = neutral atoms.
        anomalous: include f' and f'' (False gives f0 only, e.g. to test Friedel symmetry).
    """
    if not np.isfinite(energy_kev) or not 0.03 <= energy_kev <= 400.0:
        raise InputError(f"beam energy must be between 0.03 and 400 keV, got {energy_kev}.")
    if charges is None:
        charge_list = [0] * len(species)
    elif isinstance(charges, Mapping):
        charge_list = [int(charges.get(s, 0)) for s in species]
    else:
        charge_list = [int(c) for c in charges]
    labels = tuple(ion_label(s, c) for s, c in zip(species, charge_list, strict=True))
    rows = [_wk_row(label) for label in labels]
    energy_ev = 1000.0 * energy_kev
    f1 = [xraydb.f1_chantler(s, energy_ev) if anomalous else 0.0 for s in species]
    f2 = [xraydb.f2_chantler(s, energy_ev) if anomalous else 0.0 for s in species]
    dtype = jnp.result_type(float)
    return ScatteringFactors(
        wk_scale=jnp.asarray([json.loads(r.scale) for r in rows], dtype),
        wk_exponent=jnp.asarray([json.loads(r.exponents) for r in rows], dtype),
        wk_offset=jnp.asarray([r.offset for r in rows], dtype),
        f1=jnp.asarray(f1, dtype),
        f2=jnp.asarray(f2, dtype),
        labels=labels,
        energy_kev=float(energy_kev),
    )
