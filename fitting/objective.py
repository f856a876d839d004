"""The fit objective: weighted squared residuals of measured vs simulated family-averaged ΔI windows.

    χ²(z) = Σ_v w_v (ΔI_meas,v − s · ΔI_sim,v(z))²,    loss = χ² / 2

over the observed voxels of the chosen peak windows. Weights w_v:
- "lsq": the effective merge count of the difference, W_d W_p / (W_d + W_p) (a voxel mean of W unit-variance
  visits has variance 1/W; a difference of two such means 1/W_d + 1/W_p);
- "poisson": shot noise, 1 / (I_d / W_d + I_p / W_p): a voxel mean of W visits with mean photon count I has
  variance I / W, so w is an inverse variance in the volume's units when those are photons per visit;
- "relative": crystal-to-crystal noise, 1 / (I_d² / W_d + I_p² / W_p): when visits differ mainly by the
  crystal's size, scale and excitation error (serial data), a visit's spread is proportional to the mean, so
  bright voxels near the peak centre are the noisiest; up to the squared coefficient of variation (which the
  reported χ²_red then measures) this is the inverse variance;
- "scatter": 1 / var, the variance of the averaged difference estimated from the scatter of its 24
  orientations (`fitting.windows.orientation_scatter`; needs windows extracted from a volume);
- "uniform": 1 (noise-free simulated data).
Scale s (simulation units → measured units):
- "dark": fixed once from the dark volume, s = Σ W_d D_meas I0_sim / Σ W_d I0_sim² (the model's dark is
  parameter-free), so amplitudes are absolute (up to the pair occupancy);
- "free": solved in closed form at every evaluation, s = Σ w ΔI_meas ΔI_sim / Σ w ΔI_sim² (differentiable;
  only shapes of ΔI are fitted);
- "pumped": the dark scale d for the dark class and a separate closed-form scale c for the pumped class,
  fitted ΔI = c P_sim − d D_sim with c = Σ w (ΔI_meas + d D_sim) P_sim / Σ w P_sim². A reduction scales every
  crystal to a common reference, so a change of the overall diffracted intensity on pumping (a Debye–Waller-
  like loss from the displacements) is scaled away in the measured ΔI; c absorbs it, the rest (shifts,
  family-dependent changes) is fitted.

ΔI stays a difference end to end: in float32 the dark is 10³–10⁴ times ΔI, so subtracting the two averaged
simulated classes would lose most of ΔI's digits (χ² that jitters between compiled programs, gradients no
optimiser converges on). With M_d, M_p the means over the dark and pumped counts and I0 the forward's
(parameter-free) dark,
    ΔI_sim = M_p(I0 + ΔI) − M_d(I0) = M_p(ΔI) + offset,   offset = M_p(I0) − M_d(I0),
the offset (0 for equal counts) computed once, in float64, when the objective is built. "pumped" likewise,
with P_sim = M_p(I0) + M_p(ΔI) and D_sim = P_sim − ΔI_sim:
    c P_sim − d D_sim = d ΔI_sim + (c − d) P_sim,   c − d = Σ w P_sim (ΔI_meas − d ΔI_sim) / Σ w P_sim².
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fitting.forward import EnsembleForward
from fitting.parameters import ParameterSet
from fitting.windows import MeasuredWindows, WindowLayout, rotate_back, weighted_mean
from jaxpolaron.deformation.base import Deformation
from jaxpolaron.errors import InputError

Weighting = Literal["lsq", "poisson", "relative", "scatter", "uniform"]
ScaleMode = Literal["dark", "free", "pumped"]
WEIGHTINGS = ("lsq", "poisson", "relative", "scatter", "uniform")
SCALE_MODES = ("dark", "free", "pumped")


def voxel_weights(windows: MeasuredWindows, weighting: Weighting) -> np.ndarray:
    """(n_hkl, m, m, m) weights of the difference (module docstring); 0 where a class has no data."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"unknown weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}.")
    wd, wp = windows.counts_dark.sum(0), windows.counts_pump.sum(0)
    seen = windows.observed
    if weighting == "uniform":
        return seen.astype(float)
    if weighting == "scatter":
        if windows.scatter is None:
            raise InputError("scatter weighting needs windows extracted from a merged volume.")
        ok = seen & np.isfinite(windows.scatter) & (windows.scatter > 0)
        return np.where(ok, 1.0 / np.where(ok, windows.scatter, 1.0), 0.0)
    if weighting == "lsq":
        return np.where(seen, wd * wp / np.where(seen, wd + wp, 1.0), 0.0)
    power = 2 if weighting == "relative" else 1
    variance = np.maximum(windows.dark, 0.0) ** power / np.where(seen, wd, 1.0) + np.maximum(
        windows.pump, 0.0
    ) ** power / np.where(seen, wp, 1.0)
    # a voxel with no photons in either class would get infinite weight: floor its variance at the
    # smallest nonzero variance of the windows (one photon's worth)
    positive = variance[seen & (variance > 0)]
    floor = positive.min() if positive.size else 1.0
    return np.where(seen, 1.0 / np.maximum(variance, floor), 0.0)


class Objective(eqx.Module):
    """loss(z) = χ²/2 of a parameter vector z (unconstrained); see the module docstring.

    Attributes:
        forward: ensemble simulation on the member windows.
        template: the deformation model the fitted parameters are written into.
        measured: (n_hkl, m, m, m) measured family-averaged ΔI.
        weights: (n_hkl, m, m, m) voxel weights (0 = not used).
        counts_dark, counts_pump: (24, n_hkl, m, m, m) per-orientation counts (the averaging weights).
        dark_scale: () simulation → measured scale from the dark volume (used with scale "dark").
        dark_pump: (n_hkl, m, m, m) the simulated dark averaged with the pumped counts, M_p(I0) (parameter-free;
            the large part of the simulated pumped class).
        offset: (n_hkl, m, m, m) M_p(I0) − M_d(I0), the simulated dark's share of ΔI_sim that comes from the
            classes' different counts (parameter-free, computed in float64; 0 for equal counts).
        parameters: the fitted parameters (static).
        layout: the window layout (static).
        scale_mode: "dark", "free" or "pumped" (static).
    """

    forward: EnsembleForward
    template: Deformation
    measured: Float[Array, "n m m m"]
    weights: Float[Array, "n m m m"]
    counts_dark: Float[Array, "24 n m m m"]
    counts_pump: Float[Array, "24 n m m m"]
    dark_scale: Float[Array, ""]
    dark_pump: Float[Array, "n m m m"]
    offset: Float[Array, "n m m m"]
    parameters: ParameterSet = eqx.field(static=True)
    layout: WindowLayout = eqx.field(static=True)
    scale_mode: str = eqx.field(static=True)

    def model(self, z: Float[Array, " k"]) -> Deformation:
        return self.parameters.apply(self.template, z)

    def _diff_mean(self, z: Float[Array, " k"]) -> Float[Array, "n m m m"]:
        """M_p(ΔI): the forward's difference averaged with the pumped counts (the model-dependent part)."""
        _, diff = self.forward(self.model(z))
        return weighted_mean(rotate_back(self.layout, diff), self.counts_pump)

    def simulate_classes(self, z: Float[Array, " k"]) -> tuple[Float[Array, "n m m m"], Float[Array, "n m m m"]]:
        """Family-averaged simulated (dark, pumped) intensities (n_hkl, m, m, m), simulation units.

        For plots only: in float32 their difference has lost most of ΔI's digits; use `simulate`.
        """
        return self.dark_pump - self.offset, self.dark_pump + self._diff_mean(z)

    def simulate(self, z: Float[Array, " k"]) -> Float[Array, "n m m m"]:
        """Family-averaged simulated ΔI (n_hkl, m, m, m) in simulation units (before the scale)."""
        return self._diff_mean(z) + self.offset

    def scale(self, simulated: Float[Array, "n m m m"]) -> Float[Array, ""]:
        if self.scale_mode == "dark":
            return self.dark_scale
        num = jnp.sum(self.weights * self.measured * simulated)
        den = jnp.sum(self.weights * simulated**2)
        return num / jnp.where(den > 0, den, 1.0)

    def predict(self, z: Float[Array, " k"]) -> tuple[Float[Array, "n m m m"], Float[Array, ""]]:
        """(fitted ΔI in measured units (n_hkl, m, m, m), the scale s; for "pumped" the pumped scale c)."""
        if self.scale_mode == "pumped":
            # c P − d D = d ΔI_sim + (c − d) P: no difference of the large classes (module docstring)
            delta = self._diff_mean(z)
            sim = delta + self.offset
            d = self.dark_scale
            pump = self.dark_pump + delta
            num = jnp.sum(self.weights * pump * (self.measured - d * sim))
            den = jnp.sum(self.weights * pump**2)
            excess = num / jnp.where(den > 0, den, 1.0)  # c − d
            return d * sim + excess * pump, d + excess
        sim = self.simulate(z)
        s = self.scale(sim)
        return s * sim, s

    def chi2(self, z: Float[Array, " k"]) -> Float[Array, ""]:
        fitted, _ = self.predict(z)
        return jnp.sum(self.weights * (self.measured - fitted) ** 2)

    def __call__(self, z: Float[Array, " k"]) -> Float[Array, ""]:
        return 0.5 * self.chi2(z)

    @property
    def n_data(self) -> int:
        return int(np.count_nonzero(np.asarray(self.weights)))

    @property
    def n_free(self) -> int:
        """Free parameters: the fitted ones plus the scale when it is solved from ΔI."""
        return len(self.parameters.names) + (1 if self.scale_mode in ("free", "pumped") else 0)


def make_objective(
    forward: EnsembleForward,
    template: Deformation,
    parameters: ParameterSet,
    windows: MeasuredWindows,
    *,
    weighting: Weighting = "poisson",
    scale_mode: ScaleMode = "dark",
) -> Objective:
    """Build the objective; the dark scale is fitted here once (a weighted linear least squares)."""
    if scale_mode not in SCALE_MODES:
        raise InputError(f"unknown scale {scale_mode!r}; choose from {', '.join(SCALE_MODES)}.")
    weights = voxel_weights(windows, weighting)
    if not np.any(weights > 0):
        raise InputError("no voxel of the chosen windows has both dark and pumped data.")
    # the simulated dark is parameter-free: its class averages once, in float64 (module docstring)
    i0 = rotate_back(windows.layout, np.asarray(forward.dark(), np.float64))
    counts_dark = np.asarray(windows.counts_dark, np.float64)
    counts_pump = np.asarray(windows.counts_pump, np.float64)
    dark_sim = weighted_mean(i0, counts_dark)
    dark_pump = weighted_mean(i0, counts_pump)
    wd = counts_dark.sum(0)
    den = float(np.sum(wd * dark_sim**2))
    dark_scale = float(np.sum(wd * windows.dark * dark_sim)) / den if den > 0 else 1.0
    return Objective(
        forward=forward,
        template=template,
        measured=jnp.asarray(windows.difference),
        weights=jnp.asarray(weights),
        counts_dark=jnp.asarray(counts_dark, float),
        counts_pump=jnp.asarray(counts_pump, float),
        dark_scale=jnp.asarray(dark_scale),
        dark_pump=jnp.asarray(dark_pump, float),
        offset=jnp.asarray(dark_pump - dark_sim, float),
        parameters=parameters,
        layout=windows.layout,
        scale_mode=scale_mode,
    )
