import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal
from jaxpolaron.metrics import peak_metrics, peak_table
from jaxpolaron.reciprocal import grid_item, hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure_factor import intensity

HKLS = [(2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0)]


@pytest.fixture(scope="module")
def strained(structure):
    crystal = cut_nanocrystal(structure, 5.0)
    sf = scattering_factors(structure.species)
    windows = hkl_windows(structure, HKLS, shape=33, voxel=0.0025)
    dark = intensity(crystal, sf, windows)
    expanded = eqx.tree_at(lambda c: c.positions, crystal, crystal.positions * (1 + 1e-4))
    return windows, dark, intensity(expanded, sf, windows)


def test_uniform_strain_calibration(strained):
    """A +1e-4 expansion moves every peak inward: m1 ≈ -1e-4 |G| κ with κ near 1, and ΔI is shift-like."""
    windows, dark, pump = strained
    table = peak_table(windows, HKLS, dark, pump)
    for label, row in table.items():
        expected = -1e-4 * row["q_abs"]
        assert row["m1_lobe"] / expected == pytest.approx(1.0, abs=0.12), label
        assert row["m1_window"] / expected == pytest.approx(1.0, abs=0.12), label
        assert row["odd_fraction"] > 0.9, label
        assert row["integrated_pump"] == pytest.approx(row["integrated_dark"], rel=2e-3)


def test_metric_symmetries(strained):
    windows, dark, pump = strained
    g = grid_item(windows, 0)
    m = peak_metrics(g, dark[0], pump[0])
    flipped = peak_metrics(g, dark[0], 2 * dark[0] - pump[0])  # ΔI -> -ΔI flips the shift
    assert float(flipped["m1_lobe"]) == pytest.approx(-float(m["m1_lobe"]), rel=1e-4)
    assert float(flipped["odd_fraction"]) == pytest.approx(float(m["odd_fraction"]), rel=1e-4)
    brighter = peak_metrics(g, dark[0], 1.01 * dark[0])  # a pure intensity change is even
    assert float(brighter["odd_fraction"]) < 0.05
    assert float(brighter["integrated_pump"]) == pytest.approx(1.01 * float(brighter["integrated_dark"]), rel=1e-5)


def test_zero_difference(strained):
    windows, dark, _ = strained
    table = peak_table(windows, HKLS, dark, dark)
    for row in table.values():
        assert row["m1_lobe"] == 0.0
        assert row["m1_window"] == 0.0
        assert row["odd_fraction"] is None
    np.testing.assert_allclose(table["200"]["q"], np.asarray(grid_item(windows, 0).centre))
    assert jnp.isfinite(jnp.asarray(table["400"]["integrated_dark"]))


def test_least_squares_shift_and_intensity(strained):
    """The LS fit separates a shift from an intensity change: +1e-4 expansion -> s ≈ -1e-4 |G|, α ≈ 0;
    a 1 % brighter peak -> s ≈ 0, α ≈ 0.01."""
    windows, dark, pump = strained
    for i, _ in enumerate(HKLS):
        g = grid_item(windows, i)
        q_abs = float(jnp.linalg.norm(g.centre))
        m = peak_metrics(g, dark[i], pump[i])
        assert float(m["shift_ls"]) / (-1e-4 * q_abs) == pytest.approx(1.0, abs=0.1)
        assert abs(float(m["intensity_ls"])) < 2e-4
        both = peak_metrics(g, dark[i], 1.01 * pump[i])
        assert float(both["intensity_ls"]) == pytest.approx(0.01, abs=5e-4)
        assert float(both["shift_ls"]) / (-1e-4 * q_abs) == pytest.approx(1.0, abs=0.15)
        assert float(both["delta_integrated"]) == pytest.approx(0.01, abs=5e-4)
