"""Physics checks of the structure-factor engines: forward limit, Friedel symmetry, Bragg positions,
engine agreement (float64 and float32), finite-difference gradients, vmap and compile caching."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal, stack
from jaxpolaron.reciprocal import Grid, full_grid, grid_item, hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure_factor import intensity, structure_factor

HKLS = [(2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0)]


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("engine", ["direct", "separable", "nufft"])
def test_forward_limit(structure, x64, engine):
    """F(0) = Σ_j f_j(0), complex with the anomalous terms."""
    crystal = cut_nanocrystal(structure, 3.0)
    sf = scattering_factors(structure.species)
    expected = complex(jnp.sum(sf.forward()[crystal.species]))
    grid = Grid(centre=jnp.zeros(3), voxel=jnp.full(3, 0.01), shape=(5, 5, 5))
    f = structure_factor(crystal, sf, grid, engine)
    assert complex(f[2, 2, 2]) == pytest.approx(expected, rel=1e-9)
    assert abs(expected.imag) > 1000  # the f'' term is really there


def test_friedel(structure, x64):
    """|F(q)| = |F(-q)| without anomalous terms; f'' breaks it (so the check has teeth).

    A Pb-centred cut is centrosymmetric (Pb sits on an inversion centre of Pnma), where F(-q) = F(q) holds
    even with f''; centring on Cs (a mirror-plane site) removes the inversion centre.
    """
    crystal = cut_nanocrystal(structure, 3.0, centre="Cs")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.uniform(-0.6, 0.6, (200, 3)))
    plain = scattering_factors(structure.species, anomalous=False)
    fp, fm = structure_factor(crystal, plain, q), structure_factor(crystal, plain, -q)
    np.testing.assert_allclose(np.abs(fp), np.abs(fm), rtol=1e-10)
    anomalous = scattering_factors(structure.species)
    fp, fm = structure_factor(crystal, anomalous, q), structure_factor(crystal, anomalous, -q)
    assert np.max(np.abs(np.abs(fp) - np.abs(fm)) / np.abs(fp)) > 1e-3


def test_bragg_peaks_at_pseudo_cubic_positions(structure):
    crystal = cut_nanocrystal(structure, 5.0)
    sf = scattering_factors(structure.species)
    windows = hkl_windows(structure, HKLS, shape=21, voxel=0.002)
    i = np.asarray(intensity(crystal, sf, windows))
    for w in range(len(HKLS)):
        peak = np.unravel_index(np.argmax(i[w]), i[w].shape)
        assert peak == (10, 10, 10), HKLS[w]
        # intensity-weighted centroid of the main lobe within a fraction of a voxel of G
        g = grid_item(windows, w)
        pts = np.asarray(g.points())
        lobe = np.linalg.norm(pts - np.asarray(g.centre), axis=-1) < 0.01
        centroid = np.sum(pts[lobe] * i[w][lobe, None], axis=0) / np.sum(i[w][lobe])
        assert np.linalg.norm(centroid - np.asarray(g.centre)) < 1e-3
    # between Bragg peaks (half-way to (300)) the intensity is orders of magnitude lower
    mid = hkl_windows(structure, [(2.5, 0, 0)], shape=3, voxel=0.002)
    assert float(intensity(crystal, sf, mid).max()) < 5e-3 * i[0].max()


def _problem(structure):
    crystal = cut_nanocrystal(structure, 3.0)
    sf = scattering_factors(structure.species)
    windows = hkl_windows(structure, HKLS, shape=9, voxel=0.004)
    grid = full_grid(16, 0.45)
    return crystal, sf, windows, grid


def test_engines_agree_float64(structure, x64):
    crystal, sf, windows, grid = _problem(structure)
    for q in (windows, grid):
        ref = structure_factor(crystal, sf, q, "direct")
        assert ref.dtype == jnp.complex128
        assert _rel_err(structure_factor(crystal, sf, q, "separable"), ref) < 1e-10
        assert _rel_err(structure_factor(crystal, sf, q, "nufft"), ref) < 1e-5


def test_engines_agree_float32(structure):
    crystal, sf, windows, grid = _problem(structure)
    with jax.enable_x64(True):
        c64, s64, w64, g64 = _problem(structure)
        refs = [np.asarray(structure_factor(c64, s64, q, "direct")) for q in (w64, g64)]
    for q, ref in zip((windows, grid), refs, strict=True):
        for engine in ("direct", "separable", "nufft"):
            f = structure_factor(crystal, sf, q, engine)
            assert f.dtype == jnp.complex64
            assert _rel_err(f, ref) < 1e-3, engine


def test_q_list_matches_grid(structure, x64):
    crystal, sf, windows, _ = _problem(structure)
    w0 = grid_item(windows, 0)
    on_grid = structure_factor(crystal, sf, w0, "separable")
    listed = structure_factor(crystal, sf, w0.points().reshape(-1, 3))
    np.testing.assert_allclose(listed.reshape(w0.shape), on_grid, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("engine", ["direct", "separable", "nufft"])
def test_gradients_match_finite_differences(structure, x64, engine):
    """d/dθ of L = Σ w |F|² w.r.t. atom positions and the anomalous f' of Br (central differences)."""
    crystal = cut_nanocrystal(structure, 2.0)
    sf = scattering_factors(structure.species)
    window = grid_item(hkl_windows(structure, [(1, 1, 0)], shape=5, voxel=0.01), 0)
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, window.shape))

    def loss(positions, f1):
        c = eqx.tree_at(lambda c: c.positions, crystal, positions)
        s = eqx.tree_at(lambda s: s.f1, sf, f1)
        return jnp.sum(weights * intensity(c, s, window, engine))

    grad_pos, grad_f1 = jax.grad(loss, argnums=(0, 1))(crystal.positions, sf.f1)
    direction = jnp.asarray(np.random.default_rng(2).normal(size=crystal.positions.shape))
    h = 1e-4
    fd_pos = (loss(crystal.positions + h * direction, sf.f1) - loss(crystal.positions - h * direction, sf.f1)) / (2 * h)
    assert float(jnp.sum(grad_pos * direction)) == pytest.approx(float(fd_pos), rel=1e-5)
    e_br = jnp.zeros(3).at[2].set(1.0)
    fd_f1 = (loss(crystal.positions, sf.f1 + h * e_br) - loss(crystal.positions, sf.f1 - h * e_br)) / (2 * h)
    assert float(grad_f1[2]) == pytest.approx(float(fd_f1), rel=1e-6)


def test_vmap_over_crystals_and_nufft(structure):
    """vmap over a stacked batch equals per-crystal calls (guards the jax-finufft/jax pin for vmap)."""
    crystals = [cut_nanocrystal(structure, s) for s in (2.0, 3.0)]
    sf = scattering_factors(structure.species)
    grid = full_grid(12, 0.4)
    batch = stack(crystals, multiple=32)
    for engine in ("separable", "nufft"):
        batched = jax.vmap(lambda c, e=engine: intensity(c, sf, grid, e))(batch)
        for i, c in enumerate(crystals):
            single = intensity(c, sf, grid, engine)
            assert _rel_err(batched[i], single) < 1e-4


def test_second_call_does_not_recompile(structure):
    crystal = cut_nanocrystal(structure, 3.0)
    sf = scattering_factors(structure.species)
    windows = hkl_windows(structure, HKLS, shape=7, voxel=0.004)
    # new values, same shapes (built before counting: eager array ops compile too)
    moved = eqx.tree_at(lambda c: c.positions, crystal, crystal.positions * 1.001)
    shifted = hkl_windows(structure, [(2, 2, 0)] * 4, shape=7, voxel=0.003)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        intensity(crystal, sf, windows, "separable").block_until_ready()
        first = len(compiles)
        intensity(moved, sf, shifted, "separable").block_until_ready()
        assert first >= 1
        assert len(compiles) == first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
