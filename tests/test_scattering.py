import numpy as np
import pytest
import xraydb

from jaxpolaron.errors import InputError
from jaxpolaron.scattering import ion_label, scattering_factors, wavelength_a


def test_matches_xraydb():
    q = np.linspace(0.0, 1.5, 31)
    sf = scattering_factors(("Cs", "Pb", "Br"), 13.6)
    f = np.asarray(sf(q))
    for i, el in enumerate(("Cs", "Pb", "Br")):
        expected = xraydb.f0(el, q / 2) + xraydb.f1_chantler(el, 13600.0) + 1j * xraydb.f2_chantler(el, 13600.0)
        np.testing.assert_allclose(f[i], expected, rtol=2e-6)
    # the anomalous terms quoted in notes/physics.md at 13.6 keV
    np.testing.assert_allclose(np.asarray(sf.f1), [-0.06, -8.52, -4.03], atol=0.01)
    np.testing.assert_allclose(np.asarray(sf.f2), [3.20, 9.35, 3.72], atol=0.01)


def test_forward_limit_is_electron_count():
    neutral = scattering_factors(("Cs", "Pb", "Br"), anomalous=False)
    np.testing.assert_allclose(np.asarray(neutral.forward()).real, [55, 82, 35], atol=0.02)
    ions = scattering_factors(("Cs", "Pb", "Br"), anomalous=False, charges=(1, 2, -1))
    assert ions.labels == ("Cs1+", "Pb2+", "Br1-")
    np.testing.assert_allclose(np.asarray(ions.forward()).real, [54, 80, 36], atol=0.05)


def test_energy_dependence_and_errors():
    assert wavelength_a(13.6) == pytest.approx(0.9116, abs=1e-4)
    below = scattering_factors(("Br",), 13.4)
    above = scattering_factors(("Br",), 13.6)
    assert float(above.f2[0]) > 3 * float(below.f2[0])  # Br K edge at 13.474 keV
    with pytest.raises(InputError, match="beam energy"):
        scattering_factors(("Br",), -1.0)
    with pytest.raises(InputError, match="no X-ray form factor"):
        scattering_factors(("Br",), charges=(3,))
    assert ion_label("Pb", 2) == "Pb2+"
