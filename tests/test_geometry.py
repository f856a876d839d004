"""AGIPD-1M geometry: CrystFEL .geom round trip and pixel -> q (notes/physics.md figures)."""

import numpy as np
import pytest

from data_pipeline.geometry import (
    DEFAULT_CLEN_M,
    default_agipd_geometry,
    pixel_positions,
    pixel_q,
    pixel_radius,
    solid_angle,
)
from data_pipeline.io import read_crystfel_geom, write_crystfel_geom
from jaxpolaron.errors import InputError
from jaxpolaron.scattering import wavelength_a


@pytest.fixture(scope="module")
def positions():
    return pixel_positions(default_agipd_geometry())


def test_geom_round_trip_is_exact(tmp_path):
    geom = default_agipd_geometry()
    path = write_crystfel_geom(geom, tmp_path / "agipd.geom", clen_m=DEFAULT_CLEN_M, energy_kev=13.6)
    text = path.read_text()
    assert "clen = 0.1224" in text and "photon_energy = 13600" in text
    back = read_crystfel_geom(path)
    np.testing.assert_allclose(back.get_pixel_positions(), geom.get_pixel_positions(), rtol=0, atol=1e-15)


def test_bad_geometry_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_crystfel_geom(tmp_path / "missing.geom")
    bad = tmp_path / "bad.geom"
    bad.write_text("this is = not a geometry\n")
    with pytest.raises(InputError, match="cannot read CrystFEL geometry"):
        read_crystfel_geom(bad)
    with pytest.raises(InputError, match="cannot write geometry"):
        write_crystfel_geom(default_agipd_geometry(), tmp_path / "no" / "x.geom", clen_m=0.1, energy_kev=13.6)


def test_pixel_q_scale(positions):
    """At 13.6 keV and 122.4 mm: Δq ≈ 0.2/(122.4·0.9116) ≈ 1.8e-3 Å⁻¹ per pixel near the centre, the corner
    reaches |q| ≈ 1 Å⁻¹ (the edge midpoints ≈ 0.75, the d ≈ 1.3 Å of the notes), and q is elastic:
    |q + ẑ/λ| = 1/λ (on the Ewald sphere)."""
    assert positions.shape == (16, 512, 128, 3)
    q = pixel_q(positions, 13.6)
    lam = wavelength_a(13.6)
    np.testing.assert_allclose(np.linalg.norm(q + np.array([0, 0, 1 / lam]), axis=-1), 1 / lam, rtol=1e-12)
    q_abs = np.linalg.norm(q, axis=-1)
    inner = np.argmin(q_abs)
    m, s, f = np.unravel_index(inner, q_abs.shape)
    step = np.linalg.norm(q[m, s, f + 1] - q[m, s, f]) if f + 1 < 128 else np.linalg.norm(q[m, s, f - 1] - q[m, s, f])
    assert step == pytest.approx(0.2 / (122.4 * lam), rel=0.01)
    assert 0.9 < q_abs.max() < 1.05
    per_module_max = q_abs.reshape(16, -1).max(axis=1)
    assert 0.7 < per_module_max.min() < 0.85
    # |q| = 2 sin θ / λ with tan 2θ = r / clen
    r = np.hypot(positions[..., 0], positions[..., 1])
    np.testing.assert_allclose(q_abs, 2 * np.sin(np.arctan2(r, positions[..., 2]) / 2) / lam, rtol=1e-10)


def test_radius_and_solid_angle(positions):
    radius = pixel_radius(positions)
    assert 10 < radius.min() < 100 and radius.max() < 850  # central hole of the AGIPD, corners
    omega = solid_angle(positions)
    centre = np.unravel_index(np.argmin(radius), radius.shape)
    assert omega[centre] == pytest.approx((200e-6 / DEFAULT_CLEN_M) ** 2, rel=0.01)
    assert np.all(omega <= omega[centre] * 1.0001)
