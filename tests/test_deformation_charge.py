"""Physics checks of the hole + electron charge-field models (RandomHole, CentralHole): the Coulomb and
uniform-sphere fields against a numpy reference, zero amplitude -> zero difference, charge/spring/amplitude
scaling, the radial field of a central hole, the hole-sampling distributions of Eqs. 3–4, finite values and
gradients at singular hole positions, finite differences vs grad of ΔI, vmap over keys and compile caching."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal, pad
from jaxpolaron.deformation import displaced
from jaxpolaron.deformation.charge_field import (
    DEFAULT_AMPLITUDE,
    CentralHole,
    RandomHole,
    hole_position,
    sample_holes,
)
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import grid_item, hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure_factor import intensity

CS, PB, BR = 0, 1, 2


def _reference_u(positions, species, hole, size, *, charges, k, amplitude, softening, electron_strength):
    """Independent float64 numpy evaluation of u = A (10 Å)² q/k (E_hole + ε E_sphere), one atom at a time."""
    out = np.zeros_like(positions)
    radius = size / 2
    for j, (r, s) in enumerate(zip(positions, species, strict=True)):
        d = r - hole
        e_hole = d / (d @ d + softening**2) ** 1.5
        rr = np.linalg.norm(r)
        e_electron = -r / radius**3 if rr <= radius else -r / rr**3
        out[j] = amplitude * 100.0 * charges[s] / k[s] * (e_hole + electron_strength * e_electron)
    return out


def test_for_crystal_defaults_and_checks(structure):
    crystal = cut_nanocrystal(structure, 3.0)
    model = RandomHole.for_crystal(crystal)
    assert model.species == ("Cs", "Pb", "Br")
    np.testing.assert_array_equal(model.charges, [1.0, 2.0, -1.0])
    np.testing.assert_array_equal(model.k, [1.0, 1.0, 1.0])
    assert float(model.amplitude) == pytest.approx(DEFAULT_AMPLITUDE)
    assert float(model.hole_bias) == pytest.approx(0.1)
    assert model.is_random and not CentralHole.for_crystal(crystal).is_random
    with pytest.raises(InputError, match="key"):
        model.displacement(crystal)
    with pytest.raises(InputError, match="positive"):
        RandomHole.for_crystal(crystal, k=[1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="softening"):
        CentralHole.for_crystal(crystal, softening=0.0)
    with pytest.raises(InputError, match="hole_bias"):
        RandomHole.for_crystal(crystal, hole_bias=-0.5)
    with pytest.raises(InputError, match="species"):
        RandomHole(charges=[1.0, -1.0], k=[1.0, 1.0]).displacement(crystal, key=jax.random.key(0))


def test_matches_coulomb_and_sphere_reference(structure, x64):
    """u for an off-centre hole equals the numpy formula, including corner atoms outside the electron sphere."""
    crystal = cut_nanocrystal(structure, 3.0)
    params = dict(charges=[1.0, 2.0, -1.0], k=[0.7, 1.3, 0.4], amplitude=0.03, softening=0.8, electron_strength=1.4)
    model = RandomHole(**params)
    hole = np.array([6.1, -9.3, 11.7])
    u = np.asarray(model.displacement_at(crystal, jnp.asarray(hole)))
    pos = np.asarray(crystal.positions)
    expected = _reference_u(pos, np.asarray(crystal.species), hole, float(crystal.size), **params)
    np.testing.assert_allclose(u, expected, rtol=1e-12, atol=1e-15)
    assert np.any(np.linalg.norm(pos, axis=1) > float(crystal.size) / 2)  # the outside branch is exercised


def test_electron_sphere_field_is_gauss_law(structure, x64):
    """With the hole at the centre and tiny softening, the neutral exciton has no field outside the sphere,
    and the electron field is continuous across |r| = R."""
    crystal = cut_nanocrystal(structure, 5.0)
    unit = CentralHole(charges=[1.0, 1.0, 1.0], k=[1.0, 1.0, 1.0], amplitude=0.01, softening=1e-6)  # u = E
    e = np.asarray(unit.displacement(crystal))
    r = np.linalg.norm(np.asarray(crystal.positions), axis=1)
    radius = float(crystal.size) / 2
    outside = r > radius
    assert outside.sum() > 10
    assert np.max(np.linalg.norm(e[outside], axis=1)) < 1e-9 * np.max(np.linalg.norm(e, axis=1))
    electron_only = CentralHole(charges=[1.0, 1.0, 1.0], k=[1.0, 1.0, 1.0], amplitude=0.01, electron_strength=1.0)
    bare = eqx.tree_at(lambda m: m.electron_strength, electron_only, jnp.asarray(0.0))
    e_sphere = np.asarray(electron_only.displacement(crystal)) - np.asarray(bare.displacement(crystal))
    magnitude = np.linalg.norm(e_sphere, axis=1)
    shell = np.abs(r - radius) < 2.0
    np.testing.assert_allclose(magnitude[shell], np.minimum(r[shell] / radius**3, 1 / r[shell] ** 2), rtol=1e-12)
    assert np.max(np.abs(magnitude[shell] - 1 / radius**2)) < 2.5 * 2.0 / radius**3  # no jump at R


@pytest.mark.parametrize("model_cls", [RandomHole, CentralHole])
def test_zero_amplitude_gives_zero_difference(structure, model_cls):
    crystal = cut_nanocrystal(structure, 3.0)
    sf = scattering_factors(structure.species)
    window = grid_item(hkl_windows(structure, [(2, 0, 0)], shape=9, voxel=0.004), 0)
    model = model_cls.for_crystal(crystal, amplitude=0.0)
    u = model.displacement(crystal, key=jax.random.key(3))
    assert np.all(np.asarray(u) == 0.0)
    diff = intensity(displaced(crystal, u), sf, window) - intensity(crystal, sf, window)
    assert np.all(np.asarray(diff) == 0.0)
    # ... and a nonzero amplitude does change the intensity (the check has teeth)
    u = model_cls.for_crystal(crystal).displacement(crystal, key=jax.random.key(3))
    diff = intensity(displaced(crystal, u), sf, window) - intensity(crystal, sf, window)
    assert float(jnp.max(jnp.abs(diff))) > 1e-3 * float(jnp.max(intensity(crystal, sf, window)))


def test_charge_spring_and_amplitude_scaling(structure, x64):
    crystal = cut_nanocrystal(structure, 3.0)
    key = jax.random.key(7)
    base = RandomHole.for_crystal(crystal, k=[0.8, 1.5, 0.6])
    u = np.asarray(base.displacement(crystal, key=key))
    species = np.asarray(crystal.species)

    # flipping every charge flips every displacement
    flipped = eqx.tree_at(lambda m: m.charges, base, -base.charges)
    np.testing.assert_allclose(np.asarray(flipped.displacement(crystal, key=key)), -u, rtol=1e-14, atol=0)

    # cations move along the local field, anions against it (field from a unit-charge, unit-k copy)
    unit = eqx.tree_at(lambda m: (m.charges, m.k), base, (jnp.ones(3), jnp.ones(3)))
    field = np.asarray(unit.displacement(crystal, key=key))
    along = np.sum(u * field, axis=1)
    strong = np.linalg.norm(field, axis=1) > 1e-6 * np.linalg.norm(field, axis=1).max()
    assert np.all(along[strong & (species != BR)] > 0)
    assert np.all(along[strong & (species == BR)] < 0)

    # u ∝ 1/k_s, species by species
    stiff = eqx.tree_at(lambda m: m.k, base, base.k.at[BR].multiply(4.0))
    u_stiff = np.asarray(stiff.displacement(crystal, key=key))
    np.testing.assert_allclose(u_stiff[species == BR], u[species == BR] / 4.0, rtol=1e-13)
    np.testing.assert_array_equal(u_stiff[species != BR], u[species != BR])

    # linear in the amplitude
    doubled = eqx.tree_at(lambda m: m.amplitude, base, 2.0 * base.amplitude)
    np.testing.assert_allclose(np.asarray(doubled.displacement(crystal, key=key)), 2.0 * u, rtol=1e-14)

    # amplitude = displacement of a unit charge, unit spring, 10 Å from the bare hole
    probe = eqx.tree_at(lambda c: c.positions, crystal, crystal.positions.at[0].set(jnp.array([0.0, 0.0, 10.0])))
    bare = RandomHole.for_crystal(probe, k=[1.0, 1.0, 1.0], softening=1e-8, electron_strength=0.0, amplitude=0.05)
    u0 = np.asarray(bare.displacement_at(probe, jnp.zeros(3)))[0]
    np.testing.assert_allclose(u0, [0.0, 0.0, 0.05 * probe.oxidation[int(probe.species[0])]], rtol=1e-12)


def test_central_hole_field_is_radial(structure, x64):
    """Net field of a +1 point at the centre and a −1 uniform sphere of radius R: E = r[(r²+a²)^(-3/2) − R^-3],
    outward for r < √(R² − a²). Cations (Cs, Pb) move away from the centre, Br towards it."""
    crystal = cut_nanocrystal(structure, 5.0)  # Pb-centred
    model = CentralHole.for_crystal(crystal)
    u = np.asarray(model.displacement(crystal))
    pos = np.asarray(crystal.positions)
    species = np.asarray(crystal.species)
    r = np.linalg.norm(pos, axis=1)
    radius, a = float(crystal.size) / 2, float(model.softening)
    centre = r == 0.0
    assert centre.sum() == 1 and species[centre][0] == PB
    np.testing.assert_array_equal(u[centre], 0.0)  # the hole sits on the centre Pb: no force, no NaN

    off = ~centre
    cross = np.linalg.norm(np.cross(u[off], pos[off]), axis=1)
    assert np.all(cross <= 1e-9 * np.linalg.norm(u[off], axis=1) * r[off] + 1e-15)  # radial
    radial = np.sum(u * pos, axis=1) / np.where(centre, 1.0, r)
    inside = off & (r < np.sqrt(radius**2 - a**2) - 0.5)
    assert np.all(radial[inside & (species != BR)] > 0)
    assert np.all(radial[inside & (species == BR)] < 0)
    q_over_k = np.asarray(model.charges / model.k)[species]
    expected = float(model.amplitude) * 100.0 * q_over_k * r * ((r**2 + a**2) ** -1.5 - radius**-3)
    np.testing.assert_allclose(radial[inside], expected[inside], rtol=1e-10)
    outside = r > radius
    assert outside.any()
    assert np.max(np.abs(radial[outside])) < 1e-2 * np.max(np.abs(radial))  # neutral: only a softening residue


def test_holes_uniform_for_bias_one(structure):
    size = 50.0
    holes = np.asarray(sample_holes(jax.random.key(0), 40_000, 1.0, size)) / (size / 2)
    assert np.all(np.abs(holes) <= 1.0)
    np.testing.assert_allclose(holes.mean(axis=0), 0.0, atol=0.015)
    np.testing.assert_allclose(holes.var(axis=0), 1.0 / 3.0, rtol=0.03)
    # fixed for a key, different for another
    np.testing.assert_array_equal(np.asarray(sample_holes(jax.random.key(0), 40_000, 1.0, size)), holes * size / 2)
    assert not np.allclose(np.asarray(sample_holes(jax.random.key(1), 5, 1.0, size)), holes[:5] * size / 2)


def test_paper_bias_pushes_holes_to_the_surface():
    size = 50.0
    holes = np.asarray(sample_holes(jax.random.key(0), 40_000, 0.1, size)) / (size / 2)
    norm5 = np.sum(np.abs(holes) ** 5, axis=1) ** 0.2
    assert np.median(norm5) > 0.9
    outside = np.mean(norm5 > 1.0)
    assert 0.05 < outside < 0.25  # ~13 %: the paper's algorithm rescales the whole cube, corners included
    assert norm5.max() <= 1.03
    # the same unit-cube draws: only the radial l5 coordinate changes, ‖r̃‖₅ -> ‖r̃‖₅^0.1
    uniform = np.asarray(sample_holes(jax.random.key(0), 40_000, 1.0, size)) / (size / 2)
    n_uniform = np.sum(np.abs(uniform) ** 5, axis=1) ** 0.2
    np.testing.assert_allclose(norm5, n_uniform**0.1, rtol=2e-5)


def _atom_sites(crystal):
    pos = np.asarray(crystal.positions)
    species = np.asarray(crystal.species)
    r = np.linalg.norm(pos, axis=1)
    picks = [int(np.argmin(r))]  # centre Pb
    picks += [int(np.argmin(np.where(species == s, r, np.inf))) for s in (CS, BR)]  # innermost Cs, Br
    picks += [int(np.argmax(r))]  # a corner atom
    return [pos[i] for i in picks]


def test_finite_values_and_gradients_at_singular_holes(structure):
    """Holes exactly on atom sites, at r̃ = 0 and outside the crystal; padded atoms sitting on the hole."""
    crystal = cut_nanocrystal(structure, 3.0)
    crystal = pad(crystal, [b - a + 5 for a, b in crystal.blocks])  # 5 padded atoms per species at the origin
    half = float(crystal.size) / 2
    sites = _atom_sites(crystal)
    holes = [*sites, np.zeros(3), np.array([1.1, -1.2, 1.05]) * half]

    def loss(model, hole):
        u = model.displacement_at(crystal, hole)
        return jnp.sum(u**2) + jnp.sum(u)

    @eqx.filter_jit
    def u_and_grads(model, hole):
        return model.displacement_at(crystal, hole), eqx.filter_grad(loss)(model, hole), jax.grad(loss, 1)(model, hole)

    model = RandomHole.for_crystal(crystal, k=[0.9, 1.1, 0.5])
    for hole in holes:
        u, g_model, g_hole = u_and_grads(model, jnp.asarray(hole, jnp.float32))
        assert np.all(np.isfinite(np.asarray(u)))
        assert np.all(np.asarray(u)[np.asarray(crystal.mask) == 0] == 0.0)
        for name in ("k", "softening", "amplitude", "electron_strength"):
            assert np.all(np.isfinite(np.asarray(getattr(g_model, name)))), name
        assert np.all(np.isfinite(np.asarray(g_hole)))
        assert np.abs(np.asarray(g_model.amplitude)) > 0

    # hole_bias enters through the sampling transform: finite at r̃ = 0 and at r̃ that land on atoms
    def biased_loss(bias, r_tilde):
        return loss(model, hole_position(r_tilde, bias, crystal.size))

    biased = jax.jit(jax.value_and_grad(biased_loss))
    for r_tilde in [np.zeros(3), *(s / half for s in sites[1:])]:
        for bias in (1.0, 0.1):
            value, grad = biased(jnp.asarray(bias), jnp.asarray(r_tilde, jnp.float32))
            assert np.isfinite(float(value)) and np.isfinite(float(grad))
    jacobian = jax.jacobian(hole_position, argnums=(0, 1))(jnp.zeros(3), jnp.asarray(0.1), crystal.size)
    assert all(np.all(np.isfinite(np.asarray(j))) for j in jacobian)

    # the central hole sits on the centre Pb (and on the padded atoms)
    central = CentralHole.for_crystal(crystal)
    u = central.displacement(crystal)
    assert np.all(np.isfinite(np.asarray(u)))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m.displacement(crystal) ** 2)))(central)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_gradients_match_finite_differences(structure, x64):
    crystal = cut_nanocrystal(structure, 3.0)
    sf = scattering_factors(structure.species)
    window = grid_item(hkl_windows(structure, [(2, 0, 0)], shape=9, voxel=0.004), 0)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=window.shape))
    dark = intensity(crystal, sf, window)
    key = jax.random.key(11)

    def objective(theta):
        k_br, bias, amplitude, strength = theta
        model = RandomHole.for_crystal(
            crystal, k=jnp.stack([1.0, 1.2, k_br]), hole_bias=bias, amplitude=amplitude, electron_strength=strength
        )
        u = model.displacement(crystal, key=key)
        return jnp.sum(weights * (intensity(displaced(crystal, u), sf, window) - dark))

    theta = jnp.array([0.7, 0.3, 0.03, 1.2])
    value_and_grad = jax.jit(jax.value_and_grad(objective))  # one compilation serves the differences too
    grad = np.asarray(value_and_grad(theta)[1])
    for i in range(4):
        h = 1e-5 * float(theta[i])
        step = jnp.zeros(4).at[i].set(h)
        fd = (float(value_and_grad(theta + step)[0]) - float(value_and_grad(theta - step)[0])) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=1e-5), i
        assert abs(grad[i]) > 0


def test_vmap_over_keys_equals_loop(structure):
    crystal = cut_nanocrystal(structure, 3.0)
    model = RandomHole.for_crystal(crystal)
    keys = jax.random.split(jax.random.key(5), 8)
    batched = np.asarray(jax.vmap(lambda k: model.displacement(crystal, key=k))(keys))
    looped = np.stack([np.asarray(model.displacement(crystal, key=k)) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-9)
    holes = np.asarray(jax.vmap(lambda k: model.hole(crystal, key=k))(keys))
    assert len({tuple(h) for h in holes.round(4)}) == 8  # eight different holes, not one broadcast


def test_second_call_compiles_nothing(structure):
    crystal = cut_nanocrystal(structure, 3.0)
    traces = []

    @eqx.filter_jit
    def run(model, key):
        traces.append(1)
        return model.displacement(crystal, key=key)

    run(RandomHole.for_crystal(crystal), jax.random.key(0))
    run(RandomHole.for_crystal(crystal, amplitude=0.05, hole_bias=0.5, k=[1.0, 2.0, 3.0]), jax.random.key(1))
    assert len(traces) == 1
