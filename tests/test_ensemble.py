import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxpolaron.ensemble import GammaSizes, ensemble_average, size_crystals, size_intensities
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import hkl_windows
from jaxpolaron.scattering import scattering_factors

SIZES = np.arange(3.0, 16.0)


def test_gamma_weights_match_scipy(x64):
    w = np.asarray(GammaSizes(2.0, 5.4).weights(jnp.asarray(SIZES)))
    pdf = scipy.stats.gamma(a=2.0, scale=5.4 / 2.0).pdf(SIZES)
    np.testing.assert_allclose(w, pdf / pdf.sum(), rtol=1e-12)
    assert w.sum() == pytest.approx(1.0)
    assert SIZES[np.argmax(w)] == pytest.approx(3.0)  # mode = (k-1)θ = 2.7 nm, below the grid


def test_average_differentiable_in_distribution(x64):
    intensities = jnp.asarray(np.random.default_rng(0).uniform(size=(len(SIZES), 4)))

    def total(shape, mean):
        return jnp.sum(ensemble_average(intensities, jnp.asarray(SIZES), GammaSizes(shape, mean)))

    g = jax.grad(total, argnums=(0, 1))(2.0, 5.4)
    h = 1e-6
    fd_shape = (total(2.0 + h, 5.4) - total(2.0 - h, 5.4)) / (2 * h)
    fd_mean = (total(2.0, 5.4 + h) - total(2.0, 5.4 - h)) / (2 * h)
    assert float(g[0]) == pytest.approx(float(fd_shape), rel=1e-6)
    assert float(g[1]) == pytest.approx(float(fd_mean), rel=1e-6)


def test_ensemble_peak_intensity(structure):
    """Integrated Bragg intensity of a crystal scales with its number of cells, so the ensemble average
    sits between the smallest and largest crystal and equals the weighted mean of the single sizes."""
    sizes = (3.0, 4.0, 5.0)
    crystals = size_crystals(structure, sizes)
    sf = scattering_factors(structure.species)
    windows = hkl_windows(structure, [(2, 0, 0)], shape=15, voxel=0.004)
    per_size = size_intensities(crystals, sf, windows)
    assert per_size.shape == (3, 1, 15, 15, 15)
    integrated = np.asarray(per_size.sum(axis=(1, 2, 3, 4)))
    n_pb = np.array([c.composition()["Pb"] for c in crystals])
    np.testing.assert_allclose(integrated / n_pb, (integrated / n_pb)[0], rtol=0.15)
    dist = GammaSizes(2.0, 5.4)
    avg = np.asarray(ensemble_average(per_size, jnp.asarray(sizes), dist))
    w = np.asarray(dist.weights(jnp.asarray(sizes)))
    np.testing.assert_allclose(avg, np.tensordot(w, np.asarray(per_size), 1), rtol=1e-5)


def test_bad_sizes(structure):
    with pytest.raises(InputError, match="positive"):
        size_crystals(structure, [3.0, -2.0])
