"""Simulated 'measured' windows for recovery studies and model comparison.

`simulated_windows` runs a known model through an `EnsembleForward` of its own (typically the exact ΔI method
and another hole key than the fit's, so truth and fit share no code path beyond the structure factor) and
averages the member windows over the 24 orientations, as `fitting.windows.extract_windows` does for a
merged volume.

`MergeStatistics` carries the photon statistics of a real reduction, per merged crystal: the pixel visits
each voxel of the family-averaged windows receives per crystal of a class and the dark photons per visit.
`with_poisson_noise` scales them to any number of crystals per class and draws the merged means
    D = Poisson(W_d s I0) / W_d,   P = Poisson(W_p s (I0 + ΔI)) / W_p
(a sum of Poisson visits is Poisson, so drawing the family total is the same as drawing every visit), with s
the photons per electron² that makes the simulated dark match the measured one.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fitting.forward import EnsembleForward
from fitting.windows import MeasuredWindows, WindowLayout, rotate_back, weighted_mean
from jaxpolaron.deformation.base import Deformation
from jaxpolaron.errors import InputError


def simulated_windows(forward: EnsembleForward, model: Deformation, layout: WindowLayout) -> MeasuredWindows:
    """Noise-free family-averaged (dark, pump) windows of `model`, electrons², one visit per orientation.

    `forward.grid` must be `layout.member_grid()`.
    """
    i0, diff = (np.asarray(a, float) for a in forward(model))
    ones = np.ones((24, len(layout.hkls)) + (layout.side,) * 3)
    dark = np.asarray(weighted_mean(rotate_back(layout, i0), ones))
    pump = np.asarray(weighted_mean(rotate_back(layout, i0 + diff), ones))
    return MeasuredWindows(layout, dark, pump, ones, ones.copy(), units="electrons^2")


@dataclasses.dataclass(frozen=True)
class MergeStatistics:
    """Photon statistics of a reduction on family-averaged windows, per merged crystal of a class.

    Attributes:
        hkls, half, voxel: the windows they belong to (must match the windows they are applied to).
        visits_dark, visits_pump: (n_hkl, m, m, m) pixel visits per merged dark / pumped crystal.
        photons_dark: (n_hkl, m, m, m) mean dark photons per visit (the merged dark mean).
        crystals: (dark, pumped) merged crystals of the reduction they were measured on.
    """

    hkls: tuple[tuple[int, int, int], ...]
    half: int
    voxel: float
    visits_dark: np.ndarray
    visits_pump: np.ndarray
    photons_dark: np.ndarray
    crystals: tuple[int, int]

    @classmethod
    def from_windows(cls, windows: MeasuredWindows, n_dark: int, n_pump: int) -> MergeStatistics:
        """Statistics of measured windows of a reduction that merged n_dark / n_pump crystals."""
        if n_dark < 1 or n_pump < 1:
            raise InputError(f"need merged crystals of both classes, got {n_dark} dark and {n_pump} pumped.")
        lay = windows.layout
        return cls(
            hkls=tuple(tuple(int(i) for i in h) for h in lay.hkls),
            half=lay.half,
            voxel=float(lay.voxel),
            visits_dark=windows.counts_dark.sum(0) / n_dark,
            visits_pump=windows.counts_pump.sum(0) / n_pump,
            photons_dark=np.where(windows.counts_dark.sum(0) > 0, windows.dark, 0.0),
            crystals=(int(n_dark), int(n_pump)),
        )

    def check_matches(self, layout: WindowLayout) -> None:
        same = (
            tuple(map(tuple, self.hkls)) == tuple(map(tuple, layout.hkls))
            and self.half == layout.half
            and np.isclose(self.voxel, layout.voxel, rtol=1e-6)
        )
        if not same:
            raise InputError(
                f"merge statistics are for windows {self.hkls} half {self.half} voxel {self.voxel:.5g}, "
                f"not {layout.hkls} half {layout.half} voxel {layout.voxel:.5g}."
            )


def with_poisson_noise(
    clean: MeasuredWindows, stats: MergeStatistics, crystals_per_class: float, key: jax.Array
) -> MeasuredWindows:
    """Merged means of `clean` (electrons²) in photons per visit with shot noise for `crystals_per_class`."""
    stats.check_matches(clean.layout)
    wd = stats.visits_dark * crystals_per_class
    wp = stats.visits_pump * crystals_per_class
    seen = (wd > 0) & (wp > 0)
    # photons per electron² from the dark (visit-weighted least squares, as the objective's dark scale)
    den = float(np.sum(wd * clean.dark**2 * seen))
    s = float(np.sum(wd * stats.photons_dark * clean.dark * seen)) / den
    kd, kp = jax.random.split(key)
    rng_d = np.random.default_rng(np.asarray(jax.random.key_data(kd)).ravel().tolist())
    rng_p = np.random.default_rng(np.asarray(jax.random.key_data(kp)).ravel().tolist())
    lam_d = np.where(seen, wd * s * np.maximum(clean.dark, 0.0), 0.0)
    lam_p = np.where(seen, wp * s * np.maximum(clean.pump, 0.0), 0.0)
    dark = np.where(seen, rng_d.poisson(lam_d) / np.where(seen, wd, 1.0), 0.0)
    pump = np.where(seen, rng_p.poisson(lam_p) / np.where(seen, wp, 1.0), 0.0)
    # the windows hold totals; spread them evenly over the 24 orientations (only their sums are used)
    per = np.broadcast_to(np.where(seen, 1.0, 0.0) / 24, (24, *seen.shape))
    return MeasuredWindows(clean.layout, dark, pump, per * wd, per * wp, units="photons/visit")
