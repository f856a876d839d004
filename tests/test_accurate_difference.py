"""The accurate random-hole ΔI: against the exact per-hole average on the same quadrature nodes, its limits,
its gradients, and the weighted / point-cloud structure-factor engines it is built from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.accurate_difference import accurate_difference
from jaxpolaron.crystal import cut_nanocrystal
from jaxpolaron.deformation.base import displaced
from jaxpolaron.deformation.charge_field import RandomHole, hole_position
from jaxpolaron.ensemble import pumped_difference
from jaxpolaron.errors import InputError
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import (
    DEFAULT_NEAR_RADIUS,
    hole_averages,
    near_pairs_complete,
    sobol_nodes,
)
from jaxpolaron.reciprocal import hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure_factor import (
    cloud_structure_factor,
    intensity,
    structure_factor,
    weighted_structure_factor,
    window_structure_factor,
)

NODES = 128


def _setup(structure, size_nm=3.0, shape=11, voxel=0.005):
    crystal = cut_nanocrystal(structure, size_nm)
    sf = scattering_factors(structure.species, 13.6, charges=structure.oxidation)
    windows = hkl_windows(structure, [(2, 0, 0), (1, 1, 0), (1, 1, 1)], shape=shape, voxel=voxel)
    return crystal, sf, windows


def _exact_on_nodes(crystal, sf, windows, model, occupancy, nodes):
    """P1 ⟨|F[u]|² − I0⟩ + P2 ⟨|F[2u]|² − I0⟩ with the holes at the quadrature nodes (the reference)."""
    holes = hole_position(nodes, model.hole_bias, crystal.size)
    i0 = intensity(crystal, sf, windows, "separable")
    p = occupancy.probabilities()

    def one(h):
        u = model.displacement_at(crystal, h)
        return p[1] * (intensity(displaced(crystal, u), sf, windows, "separable") - i0) + p[2] * (
            intensity(displaced(crystal, 2 * u), sf, windows, "separable") - i0
        )

    return jax.lax.map(one, holes).mean(0)


def _rel(a, b):
    return [float(jnp.linalg.norm(a[i] - b[i]) / jnp.linalg.norm(b[i])) for i in range(b.shape[0])]


@pytest.mark.parametrize(
    ("amplitude", "bias", "k_br", "engine"),
    [(0.02, 0.1, 1.0, "window"), (0.02, 1.0, 0.3, "window"), (0.02, 1.0, 0.3, "cloud")],
)
def test_matches_exact_on_the_same_nodes(structure, x64, amplitude, bias, k_br, engine):
    tol = 0.02
    crystal, sf, windows = _setup(structure)
    occupancy = Occupancy()  # SI S2: one and two pairs
    model = RandomHole.for_crystal(crystal, amplitude=amplitude, hole_bias=bias, k=[1.0, 1.0, k_br])
    nodes = sobol_nodes(NODES)
    i0, diff = accurate_difference(crystal, sf, windows, model, occupancy, nodes, engine=engine)
    reference = _exact_on_nodes(crystal, sf, windows, model, occupancy, nodes)
    np.testing.assert_allclose(i0, intensity(crystal, sf, windows, "separable"), rtol=1e-10)
    errors = _rel(diff, reference)
    assert max(errors) < tol, errors
    # the linear method is far worse here: the test would notice a regression to it
    _, linear = pumped_difference(crystal, sf, windows, model, occupancy, key=jax.random.key(0), n_holes=NODES)
    assert max(_rel(linear, reference)) > 3 * max(errors)


def test_zero_amplitude_and_no_seed(structure, x64):
    crystal, sf, windows = _setup(structure)
    model = RandomHole.for_crystal(crystal, amplitude=0.0)
    _, diff = pumped_difference(crystal, sf, windows, model, Occupancy(), method="accurate", nodes=64)
    i0 = intensity(crystal, sf, windows, "separable")
    assert float(jnp.max(jnp.abs(diff))) < 1e-9 * float(jnp.max(i0))
    # deterministic: no key, and a key does not change anything
    model = RandomHole.for_crystal(crystal)
    a = pumped_difference(crystal, sf, windows, model, Occupancy(), method="accurate", nodes=64)[1]
    b = pumped_difference(crystal, sf, windows, model, Occupancy(), method="accurate", nodes=64, key=jax.random.key(5))[
        1
    ]
    np.testing.assert_array_equal(a, b)


def test_near_lists_cover_the_radius(structure):
    for size in (3.0, 5.0):
        crystal = cut_nanocrystal(structure, size)
        for bias in (0.1, 1.0):
            model = RandomHole.for_crystal(crystal, hole_bias=bias)
            averages = hole_averages(model, crystal, sobol_nodes(256))
            assert near_pairs_complete(averages, DEFAULT_NEAR_RADIUS)
            # every pair is either near or far: the weights add up to one per atom
            near = jnp.zeros(crystal.positions.shape[0])
            for pairs in averages.near:
                near = near.at[pairs.atom.ravel()].add(pairs.weight.ravel())
            np.testing.assert_allclose(averages.far_weight + near, 1.0, atol=1e-5)


def test_cell_search_finds_every_near_pair(structure):
    """The cell-based near search returns, for every node, exactly the atoms a brute-force search finds within
    the radius (with their switch weights), also for holes outside the crystal (hole bias 0.01)."""
    from jaxpolaron.hole_quadrature import DEFAULT_NEAR_BLEND, switch

    crystal = cut_nanocrystal(structure, 3.0)
    for bias in (0.01, 1.0):
        model = RandomHole.for_crystal(crystal, hole_bias=bias)
        nodes = sobol_nodes(64)
        averages = hole_averages(model, crystal, nodes)
        holes = np.asarray(hole_position(nodes, model.hole_bias, crystal.size))
        positions = np.asarray(crystal.positions)
        for (a, b), pairs in zip(crystal.blocks, averages.near, strict=True):
            d = np.linalg.norm(positions[None, a:b] - holes[:, None], axis=-1)  # (h, n_s)
            want = np.asarray(switch(jnp.asarray(d), DEFAULT_NEAR_RADIUS, DEFAULT_NEAR_BLEND)) / len(nodes)
            got = np.zeros_like(want)
            np.add.at(got, (np.arange(len(nodes))[:, None], np.asarray(pairs.atom) - a), np.asarray(pairs.weight))
            np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.mark.parametrize("engine", ["window", "cloud"])
def test_gradients_match_central_differences(structure, x64, engine):
    crystal, sf, windows = _setup(structure, shape=7, voxel=0.008)
    nodes = sobol_nodes(32)
    weights = jax.random.normal(jax.random.key(3), (3, 7, 7, 7))

    def loss(params):
        bias, k_pb, k_br, amplitude = params
        k = jnp.stack([jnp.asarray(1.0), k_pb, k_br])  # species order Cs, Pb, Br
        model = RandomHole.for_crystal(crystal, amplitude=amplitude, hole_bias=bias, k=k)
        return jnp.sum(weights * accurate_difference(crystal, sf, windows, model, Occupancy(), nodes, engine=engine)[1])

    assert crystal.species_names == ("Cs", "Pb", "Br")
    x = jnp.asarray([0.3, 1.2, 0.5, 0.02])
    grad = jax.grad(loss)(x)
    for i in range(4):
        h = 1e-5 * float(x[i])
        e = jnp.zeros(4).at[i].set(h)
        fd = (loss(x + e) - loss(x - e)) / (2 * h)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-5), i


def test_accurate_refuses_other_models(structure):
    from jaxpolaron.deformation.charge_field import CentralHole

    crystal, sf, windows = _setup(structure)
    with pytest.raises(InputError, match="random-hole"):
        pumped_difference(crystal, sf, windows, CentralHole.for_crystal(crystal), Occupancy(), method="accurate")


def test_weighted_and_cloud_engines_match_direct_sums(structure, x64):
    crystal, sf, windows = _setup(structure, shape=7, voxel=0.005)
    n = crystal.positions.shape[0]
    w = jax.random.normal(jax.random.key(1), (2, n))
    got = weighted_structure_factor(crystal, sf, windows, w)  # (windows, 2, 7, 7, 7)
    for k in range(2):
        want = structure_factor(eqx_weighted(crystal, w[k]), sf, windows, "direct")
        np.testing.assert_allclose(got[:, k], want, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(want))))
    points = tuple(crystal.positions[a:b] + 0.3 for a, b in crystal.blocks)
    cw = tuple(w[:, a:b] for a, b in crystal.blocks)
    cloud = cloud_structure_factor(points, cw, sf, windows)
    moved = eqx_weighted(displaced(crystal, jnp.full((n, 3), 0.3)), w[1])
    want = structure_factor(moved, sf, windows, "direct")
    np.testing.assert_allclose(cloud[:, 1], want, atol=1e-8 * float(jnp.max(jnp.abs(want))))


def test_window_and_cloud_routes_agree(structure):
    """The small-window route (per-window expansion) against the NUFFT route: the same ΔI to 2e-4 of it."""
    crystal, sf, windows = _setup(structure, shape=7, voxel=2 / 256)
    model = RandomHole.for_crystal(crystal, amplitude=0.05, hole_bias=0.3, k=[1.0, 1.0, 0.3])
    nodes = sobol_nodes(256)
    window = accurate_difference(crystal, sf, windows, model, Occupancy(), nodes, engine="window")[1]
    cloud = accurate_difference(crystal, sf, windows, model, Occupancy(), nodes, engine="cloud")[1]
    assert max(_rel(window, cloud)) < 2e-4


def test_window_engine_matches_direct_sums(structure, x64):
    crystal, sf, windows = _setup(structure, shape=5, voxel=0.006)
    n = crystal.positions.shape[0]
    w = jax.random.normal(jax.random.key(2), (2, n)) + 1j * jax.random.normal(jax.random.key(4), (2, n))
    got = window_structure_factor(crystal, sf, windows, lambda g, i: w * (1.0 + i), jnp.arange(3.0))
    for k in range(2):
        for i in range(3):
            want = structure_factor(eqx_weighted(crystal, w[k] * (1.0 + i)), sf, windows, "direct")[i]
            np.testing.assert_allclose(got[i, k], want, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(want))))


def eqx_weighted(crystal, weights):
    """The crystal with per-atom weights in place of its mask (the direct engine multiplies by the mask)."""
    import equinox as eqx

    return eqx.tree_at(lambda c: c.mask, crystal, weights)


def test_warns_outside_the_measured_range(structure):
    from jaxpolaron.accurate_difference import outside_validated_range

    crystal = cut_nanocrystal(structure, 3.0)
    assert outside_validated_range(RandomHole.for_crystal(crystal, amplitude=0.05)) is None
    assert "--exact" in outside_validated_range(RandomHole.for_crystal(crystal, amplitude=0.5))
    assert outside_validated_range(RandomHole.for_crystal(crystal, amplitude=0.05, k=[1.0, 1.0, 0.1])) is not None


def test_window_route_only_within_its_reach(structure):
    """Small windows of a coarse voxel reach beyond the expansion's tested range: `accurate_engine` sends them to
    the NUFFT route, and the window route forced onto them returns NaN instead of a quietly wrong ΔI."""
    from jaxpolaron.accurate_difference import WINDOW_REACH, accurate_engine, window_reach

    crystal, sf, fine = _setup(structure, shape=7, voxel=2 / 256)
    _, _, coarse = _setup(structure, shape=7, voxel=0.03)
    assert float(window_reach(fine)) < WINDOW_REACH < float(window_reach(coarse))
    assert accurate_engine(fine) == "window" and accurate_engine(coarse) == "cloud"
    model = RandomHole.for_crystal(crystal)
    nodes = sobol_nodes(64)
    forced = accurate_difference(crystal, sf, coarse, model, Occupancy(), nodes, engine="window")[1]
    assert bool(jnp.all(jnp.isnan(forced)))
    routed = pumped_difference(crystal, sf, coarse, model, Occupancy(), method="accurate", nodes=64,
                               accurate_engine=accurate_engine(coarse))[1]  # fmt: skip
    assert bool(jnp.all(jnp.isfinite(routed))) and float(jnp.max(jnp.abs(routed))) > 0
