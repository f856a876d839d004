"""Detector geometry to reciprocal space: AGIPD-1M pixel positions -> q (Å⁻¹, |q| = 1/d).

Lab frame (EuXFEL convention, as extra-geom returns it): beam along +z, the detector plane at z = clen.
For a pixel at lab position p the scattered direction is p/|p|, so q = (p/|p| − ẑ)/λ, |q| = 2 sin θ / λ.
Pure functions of arrays; reading and writing geometry files lives in `data_pipeline.io`.
"""

from __future__ import annotations

import numpy as np

from jaxpolaron.scattering import wavelength_a

AGIPD_SHAPE = (16, 512, 128)  # modules × slow scan × fast scan
AGIPD_PIXEL_M = 200e-6
DEFAULT_CLEN_M = 0.1224  # the paper's detector distance
DEFAULT_QUAD_POS_MM = ((-525.0, 625.0), (-550.0, -10.0), (520.0, -160.0), (542.5, 475.0))


def default_agipd_geometry():
    """An AGIPD-1M geometry (extra-geom) from typical SPB quadrant positions (mm)."""
    from extra_geom import AGIPD_1MGeometry

    return AGIPD_1MGeometry.from_quad_positions(quad_pos=list(DEFAULT_QUAD_POS_MM))


def pixel_positions(geometry, clen_m: float = DEFAULT_CLEN_M) -> np.ndarray:
    """Lab positions of every pixel centre, (16, 512, 128, 3) in m, with z = clen (extra-geom gives z = 0)."""
    if not clen_m > 0:
        raise ValueError(f"detector distance must be positive, got {clen_m} m")
    pos = np.array(geometry.get_pixel_positions(), dtype=np.float64)
    pos[..., 2] += clen_m
    return pos


def pixel_q(positions_m: np.ndarray, energy_kev: float) -> np.ndarray:
    """q of each pixel in the lab frame, (..., 3) Å⁻¹ with |q| = 2 sin θ / λ (elastic, beam along +z)."""
    direction = positions_m / np.linalg.norm(positions_m, axis=-1, keepdims=True)
    return (direction - np.array([0.0, 0.0, 1.0])) / wavelength_a(energy_kev)


def pixel_radius(positions_m: np.ndarray, pixel_size_m: float = AGIPD_PIXEL_M) -> np.ndarray:
    """Distance of each pixel from the beam axis in pixels, (16, 512, 128) — peakfinder8's radial coordinate."""
    return np.hypot(positions_m[..., 0], positions_m[..., 1]) / pixel_size_m


def solid_angle(positions_m: np.ndarray, pixel_size_m: float = AGIPD_PIXEL_M) -> np.ndarray:
    """Solid angle of each (square, z-facing) pixel in sr: A cos θ₂ / r² with cos θ₂ = z / r."""
    r = np.linalg.norm(positions_m, axis=-1)
    return pixel_size_m**2 * positions_m[..., 2] / r**3


def peak_positions(positions_m: np.ndarray, panel, ss, fs) -> np.ndarray:
    """Lab positions (n, 3) in m of sub-pixel peak coordinates (pixel centres at integers, as peakfinder8).

    Each module is a flat tile, so a position is the nearest pixel's centre plus the sub-pixel offset along
    the module's slow- and fast-scan pixel vectors (exact within an ASIC; never interpolates across gaps).
    positions_m: (n_modules, n_ss, n_fs, 3) from `pixel_positions`; panel, ss, fs: (n,).
    """
    panel = np.asarray(panel, np.int64)
    ss, fs = np.asarray(ss, float), np.asarray(fs, float)
    n_ss, n_fs = positions_m.shape[1:3]
    i = np.clip(np.rint(ss).astype(np.int64), 0, n_ss - 1)
    j = np.clip(np.rint(fs).astype(np.int64), 0, n_fs - 1)
    d_ss = positions_m[:, 1, 0] - positions_m[:, 0, 0]  # (n_modules, 3) one slow-scan pixel
    d_fs = positions_m[:, 0, 1] - positions_m[:, 0, 0]
    return positions_m[panel, i, j] + (ss - i)[:, None] * d_ss[panel] + (fs - j)[:, None] * d_fs[panel]
