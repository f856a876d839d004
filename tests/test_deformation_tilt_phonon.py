"""Physics of the orthorhombic-relaxation (tilt) and LO-phonon deformation models.

Numbers quoted in comments were measured on the bundled mp-567629 Pnma structure (3, 4 and 5 nm crystals,
21³ windows of 0.003 Å⁻¹) and are the basis for the margins below.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal, pad
from jaxpolaron.deformation.base import displaced
from jaxpolaron.deformation.phonon import PhononMode, long_axis
from jaxpolaron.deformation.tilt import TiltRelaxation
from jaxpolaron.errors import InputError
from jaxpolaron.metrics import peak_metrics
from jaxpolaron.reciprocal import grid_item, hkl_windows
from jaxpolaron.scattering import scattering_factors
from jaxpolaron.structure_factor import intensity

HKLS = [(2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0)]
# Pnma superlattice reflections (half-integer pseudo-cubic hkl, integer ortho hkl) that are strong in the
# dark crystal: |F|²/|F(200)|² ≈ 0.06, 0.10, 0.10 at 4 nm (the strongest of a scan over h,k,l <= 2.5).
SUPERLATTICE = [(0.5, 1.5, 0.5), (1.5, 0.0, 2.5), (2.5, 1.5, 1.5)]


@pytest.fixture(scope="module")
def crystal(structure):
    return cut_nanocrystal(structure, 4.0)


@pytest.fixture(scope="module")
def sf(structure):
    return scattering_factors(structure.species)


@eqx.filter_jit
def _u(model, crystal):
    """Displacements (n, 3) Å, jitted (one compilation per model type and crystal shape)."""
    return model.displacement(crystal)


_metrics = eqx.filter_jit(peak_metrics)


def _pc(structure, r):
    """Crystal-frame Å (n, 3) -> pseudo-cubic cell coordinates (n, 3)."""
    return np.asarray(r) @ np.linalg.inv(structure.pseudo_cubic_axes())


def _shift_per_change(grid, dark, pump):
    """|m1_lobe| per relative L2 change of the window (Å⁻¹): large for a peak shift, small for an intensity change."""
    m = _metrics(grid, dark, pump)
    rel = float(jnp.linalg.norm(pump - dark) / jnp.linalg.norm(dark))
    return abs(float(m["m1_lobe"])) / rel, float(m["odd_fraction"])


# ------------------------------------------------------------------------------------------------ tilt
def test_tilt_limits(structure, crystal):
    """t ≡ 1 is the dark Pnma crystal; t ≡ 0 is the ideal perovskite on the Pnma lattice vectors."""
    u = _u(TiltRelaxation(t0=1.0), crystal)
    assert np.all(np.asarray(u) == 0.0)

    cubic = displaced(crystal, _u(TiltRelaxation(t0=0.0, width_fraction=1e6), crystal))
    np.testing.assert_allclose(np.asarray(cubic.positions), np.asarray(crystal.ideal), atol=1e-5)
    # a real perovskite: Pb on the pseudo-cubic lattice, Br one half-integer coordinate, Cs three
    doubled = 2 * _pc(structure, cubic.positions)
    np.testing.assert_allclose(doubled, np.rint(doubled), atol=1e-5)
    n_half = np.sum(np.rint(doubled).astype(int) % 2, axis=1)
    species = np.asarray(crystal.species)
    for name, expected in (("Pb", 0), ("Br", 1), ("Cs", 3)):
        assert np.all(n_half[species == crystal.species_names.index(name)] == expected), name
    # and the Pnma tilt really is gone: Pb does not move, Br and Cs do (by up to ~0.6 Å)
    tilt = np.linalg.norm(np.asarray(crystal.positions - crystal.ideal), axis=1)
    assert tilt[species == crystal.species_names.index("Pb")].max() < 1e-5
    assert tilt[species == crystal.species_names.index("Br")].max() > 0.3


def test_tilt_superlattice_reflections(structure, crystal, sf):
    """The Pnma superlattice peaks vanish for the cubic reference and grow with the tilt amplitude t."""
    q = jnp.asarray(structure.q_of_hkl(np.array(SUPERLATTICE)), crystal.positions.dtype)
    i200 = float(intensity(crystal, sf, jnp.asarray(structure.q_of_hkl([[2, 0, 0]]), q.dtype))[0])

    def at(t):
        return np.asarray(intensity(displaced(crystal, _u(TiltRelaxation(t, 1e6), crystal)), sf, q))

    dark, half, cubic = at(1.0), at(0.5), at(0.0)
    assert np.all(dark / i200 > 0.03)
    # measured: cubic/dark 2e-3 .. 1e-3 at 4 nm (a finite-size remainder, ~1/N²)
    assert np.all(cubic / dark < 1e-2)
    # first order F ∝ t, so I ∝ t²: measured I(0.5)/I(1) = 0.32 .. 0.41 (higher orders: 2π q·δ ~ 1 rad)
    assert np.all((half / dark > 0.15) & (half / dark < 0.5))


@pytest.fixture(scope="module")
def tilt_windows(structure, crystal, sf):
    windows = hkl_windows(structure, HKLS, shape=21, voxel=0.003)
    dark = intensity(crystal, sf, windows)

    def pump(model):
        return intensity(displaced(crystal, _u(model, crystal)), sf, windows)

    strained = eqx.tree_at(lambda c: c.positions, crystal, crystal.positions * (1 + 1e-4))
    return windows, dark, pump(TiltRelaxation(0.8)), pump(TiltRelaxation(1.2)), intensity(strained, sf, windows)


def test_tilt_sign_flips_with_t0(tilt_windows):
    """Relaxed (t0 = 0.8) and increased (t0 = 1.2) central tilt give ΔI of opposite sign (paper, Methods)."""
    _, dark, relaxed, increased, _ = tilt_windows
    for i, hkl in enumerate(HKLS):
        a = np.asarray(relaxed[i] - dark[i]).ravel()
        b = np.asarray(increased[i] - dark[i]).ravel()
        # measured correlation -0.9992 .. -0.99998; ‖a + b‖/‖a − b‖ 0.013 .. 0.13 (second order, largest at 400)
        assert np.corrcoef(a, b)[0, 1] < -0.99, hkl
        assert np.linalg.norm(a + b) / np.linalg.norm(a - b) < 0.25, hkl
        # the integrated intensity changes by 2 % .. 24 %, in opposite directions
        da, db = a.sum() / float(jnp.sum(dark[i])), b.sum() / float(jnp.sum(dark[i]))
        assert abs(da) > 0.01 and abs(db) > 0.01 and da * db < 0, hkl


def test_tilt_changes_intensity_not_position(tilt_windows):
    """Fig. 3c: the tilt model changes integrated intensities but does not shift peaks.

    Measured at 4 nm (200, 110, 111, 400): odd_fraction 0.0004, 0.0005, 0.007, 0.0006 for t0 = 0.8
    (0.0003 .. 0.008 for t0 = 1.2) against 0.95 .. 0.99 for a uniform 1e-4 expansion. The raw m1 is *not*
    small (1e-5 .. 7e-5 Å⁻¹, as large as the 1e-4 strain's) because the intensity changes by 2 .. 24 %
    and the dark peak is slightly asymmetric; per unit of relative change (|m1| / (‖ΔI‖/‖I₀‖)) the tilt gives
    1e-4 .. 4e-4 Å⁻¹ against 1.2e-2 Å⁻¹ for the strain, i.e. ≤ 1/30 as shift-like.
    """
    windows, dark, relaxed, increased, strained = tilt_windows
    for i, hkl in enumerate(HKLS):
        g = grid_item(windows, i)
        r_strain, odd_strain = _shift_per_change(g, dark[i], strained[i])
        assert odd_strain > 0.9, hkl
        for pump in (relaxed, increased):
            r_tilt, odd_tilt = _shift_per_change(g, dark[i], pump[i])
            assert odd_tilt < 0.03, hkl
            assert r_tilt < 0.1 * r_strain, hkl


def test_tilt_profiles(crystal):
    """t(0) = t0, t = 1 beyond w for the paper's profile; the Gaussian profile agrees near the centre."""
    quad = TiltRelaxation(0.8, 0.5)
    gauss = TiltRelaxation(0.8, 0.5, profile="gaussian")
    d = np.linalg.norm(np.asarray(crystal.ideal), axis=1)
    w = 0.5 * float(crystal.size) / 2
    tq, tg = np.asarray(quad.tilt(crystal)), np.asarray(gauss.tilt(crystal))
    centre = np.argmin(d)
    assert tq[centre] == pytest.approx(0.8) and tg[centre] == pytest.approx(0.8)
    assert np.all(tq[d >= w] == 1.0)
    np.testing.assert_allclose(tq[d < w], 0.8 + 0.2 * (d[d < w] / w) ** 2, rtol=1e-6)
    near = d < 0.2 * w
    np.testing.assert_allclose(tg[near], tq[near], atol=0.2 * 0.2**4)  # differ at O((d/w)⁴)
    with pytest.raises(InputError, match="profile"):
        TiltRelaxation(profile="cubic")  # type: ignore[arg-type]


def test_padded_atoms_do_not_move(structure, crystal):
    blocks = [b - a + 7 for a, b in crystal.blocks]
    padded = pad(crystal, blocks)
    mask = np.asarray(padded.mask) == 0
    for model in (TiltRelaxation(0.5), PhononMode.from_structure(structure, amplitude=0.1)):
        u = np.asarray(_u(model, padded))
        assert np.all(u[mask] == 0.0)
        np.testing.assert_allclose(u[~mask], np.asarray(_u(model, crystal)), rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------- phonon
def test_phonon_axis_is_long_orthorhombic_axis(structure):
    """Cannelli's (Pbnm) c axis = Pnma b = p2 = crystal y."""
    assert long_axis(structure) == 1
    b = structure.lattice[1]
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(structure.lattice, axis=1).max())
    mode = PhononMode.from_structure(structure, amplitude=0.1)
    assert mode.axis == 1
    np.testing.assert_allclose(mode.direction, [0.0, 1.0, 0.0], atol=1e-12)
    with pytest.raises(InputError, match="species"):
        PhononMode.from_structure(structure, amplitude=0.1, sites=("Cs", "Pb", "I"))


def test_phonon_pattern(structure, crystal):
    amplitude = 0.05
    mode = PhononMode.from_structure(structure, amplitude=amplitude, width_fraction=1e6)  # envelope ≡ 1
    u = np.asarray(_u(mode, crystal))
    species = np.asarray(crystal.species)
    cs, pb, br = (species == crystal.species_names.index(n) for n in ("Cs", "Pb", "Br"))
    axial = np.asarray(mode.axial(crystal))
    assert not np.any(axial & ~br)
    # all along crystal y; cations +y, anions −y for amplitude > 0; Cs still by default
    assert np.all(u[:, [0, 2]] == 0.0)
    assert np.all(u[cs] == 0.0)
    assert np.all(u[pb, 1] > 0) and np.all(u[br, 1] < 0)
    np.testing.assert_allclose(u[axial, 1], -amplitude, rtol=1e-6)
    # Cannelli et al.: |u_axial| / |u_Pb| = 2.5, |u_axial| / |u_equatorial| = 6
    np.testing.assert_allclose(amplitude / u[pb, 1], 2.5, rtol=1e-5)
    np.testing.assert_allclose(amplitude / -u[br & ~axial, 1], 6.0, rtol=1e-5)
    # one Br in three bridges along y (exactly 1/3 for the 3-5 nm cuts)
    assert axial.sum() / br.sum() == pytest.approx(1 / 3, abs=0.02)
    # sign flips the pattern; amplitude 0 moves nothing
    flipped = np.asarray(_u(eqx.tree_at(lambda m: m.amplitude, mode, -mode.amplitude), crystal))
    np.testing.assert_array_equal(flipped, -u)
    zero = PhononMode.from_structure(structure, amplitude=0.0)
    assert np.all(np.asarray(_u(zero, crystal)) == 0.0)


def test_phonon_axial_br_bridge_pb_along_y(structure, crystal):
    """Independent check of the classification: an axial Br's nearest Pb sites lie along ±y."""
    mode = PhononMode.from_structure(structure, amplitude=0.05, width_fraction=1e6)
    species = np.asarray(crystal.species)
    ideal = np.asarray(crystal.ideal)
    pb_sites = ideal[species == crystal.species_names.index("Pb")]
    br = np.flatnonzero(species == crystal.species_names.index("Br"))
    axial = np.asarray(mode.axial(crystal))[br]
    a_pc = structure.pseudo_cubic.a_pc
    checked = 0
    for j, is_axial in zip(br, axial, strict=True):
        v = pb_sites - ideal[j]
        dist = np.linalg.norm(v, axis=1)
        near = v[dist < 0.6 * a_pc]  # the one or two Pb the Br bridges
        if len(near) == 0:
            continue
        along_y = np.abs(near[:, 1]) > 0.9 * np.linalg.norm(near, axis=1)
        assert np.all(along_y == is_axial)
        checked += 1
    assert checked > 0.9 * len(br)
    # asymmetric bond change at the centre Pb: the +y Pb–Br bond shortens, the −y one lengthens, by 1.4 A
    u = np.asarray(_u(mode, crystal))
    centre = np.argmin(np.where(species == crystal.species_names.index("Pb"), np.linalg.norm(ideal, axis=1), 1e9))
    for sign in (1, -1):
        j = np.argmin(np.linalg.norm(ideal - sign * structure.pseudo_cubic_axes()[1] / 2, axis=1))
        bond0 = np.linalg.norm(np.asarray(crystal.positions)[j] - np.asarray(crystal.positions)[centre])
        bond1 = np.linalg.norm(
            np.asarray(crystal.positions)[j] + u[j] - np.asarray(crystal.positions)[centre] - u[centre]
        )
        assert sign * (bond1 - bond0) < 0
        assert abs(bond1 - bond0) == pytest.approx(0.05 * 1.4, rel=0.05)  # Br −A, Pb +A/2.5 along the bond


def test_phonon_envelope(structure, crystal):
    uniform = PhononMode.from_structure(structure, amplitude=0.05, width_fraction=1e6)
    local = PhononMode.from_structure(structure, amplitude=0.05, width_fraction=0.4)
    sigma = 0.4 * float(crystal.size) / 2
    r2 = np.sum(np.asarray(crystal.ideal) ** 2, axis=1)
    u0 = np.asarray(_u(uniform, crystal))[:, 1]
    u1 = np.asarray(_u(local, crystal))[:, 1]
    np.testing.assert_allclose(u1, u0 * np.exp(-r2 / (2 * sigma**2)), rtol=1e-5, atol=1e-9)


def test_phonon_changes_intensity_not_position(structure, crystal, sf):
    """A uniform sublattice shift changes structure factors, not peak positions; q ⊥ y does not see it.

    Measured at 4 nm, amplitude 0.05 Å: odd_fraction 0.0007 (020), 0.038 (110), 0.002 (111), 0.001 (022);
    relative L2 change 2.3e-3, 5.8e-4, 2.8e-2, 2.3e-3, but only 1.8e-6 at (200) where q·u = 0.
    """
    hkls = [(0, 2, 0), (1, 1, 0), (1, 1, 1), (0, 2, 2), (2, 0, 0)]
    windows = hkl_windows(structure, hkls, shape=21, voxel=0.003)
    dark = intensity(crystal, sf, windows)
    mode = PhononMode.from_structure(structure, amplitude=0.05)
    pump = intensity(displaced(crystal, _u(mode, crystal)), sf, windows)
    rel = [float(jnp.linalg.norm(pump[i] - dark[i]) / jnp.linalg.norm(dark[i])) for i in range(len(hkls))]
    for i, hkl in enumerate(hkls[:-1]):
        m = _metrics(grid_item(windows, i), dark[i], pump[i])
        assert float(m["odd_fraction"]) < 0.1, hkl
        assert rel[-1] < 1e-2 * rel[i], hkl


# ------------------------------------------------------------------------------------------- gradients
def _fd_check(loss, params, names, h=1e-6, rtol=1e-5):
    grads = jax.grad(loss)(params)
    for name in names:
        up = dict(params, **{name: params[name] + h})
        down = dict(params, **{name: params[name] - h})
        fd = (float(loss(up)) - float(loss(down))) / (2 * h)
        assert float(grads[name]) == pytest.approx(fd, rel=rtol), name
        assert abs(fd) > 0, name


@pytest.mark.parametrize("profile", ["quadratic", "gaussian"])
def test_tilt_gradients(structure, profile):
    with jax.enable_x64(True):
        crystal = cut_nanocrystal(structure, 3.0)
        sf = scattering_factors(structure.species)
        # a 7³ window around (111) as a q list: the direct engine compiles its gradient fastest
        q = grid_item(hkl_windows(structure, [(1, 1, 1)], shape=7, voxel=0.005), 0).points().reshape(-1, 3)
        dark = intensity(crystal, sf, q)
        weights = jnp.asarray(np.random.default_rng(0).normal(size=q.shape[0]))
        # no site within the finite-difference step of the kink d = w (quadratic profile)
        d = np.linalg.norm(np.asarray(crystal.ideal), axis=1)
        assert np.min(np.abs(d - 0.7 * float(crystal.size) / 2)) > 1e-3

        def loss(p):
            model = TiltRelaxation(p["t0"], p["width_fraction"], profile=profile)
            pump = intensity(displaced(crystal, _u(model, crystal)), sf, q)
            return jnp.sum(weights * (pump - dark))

        params = {"t0": jnp.asarray(0.8), "width_fraction": jnp.asarray(0.7)}
        _fd_check(loss, params, ["t0", "width_fraction"])


def test_phonon_gradients(structure):
    with jax.enable_x64(True):
        crystal = cut_nanocrystal(structure, 3.0)
        sf = scattering_factors(structure.species)
        # a 7³ window around (111) as a q list: the direct engine compiles its gradient fastest
        q = grid_item(hkl_windows(structure, [(1, 1, 1)], shape=7, voxel=0.005), 0).points().reshape(-1, 3)
        dark = intensity(crystal, sf, q)
        weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[0]))
        base = PhononMode.from_structure(structure, amplitude=0.05, cs_ratio=0.1)

        def loss(p):
            model = eqx.tree_at(
                lambda m: (m.amplitude, m.width_fraction, m.pb_ratio, m.equatorial_ratio, m.cs_ratio),
                base,
                (p["amplitude"], p["width_fraction"], p["pb_ratio"], p["equatorial_ratio"], p["cs_ratio"]),
            )
            pump = intensity(displaced(crystal, _u(model, crystal)), sf, q)
            return jnp.sum(weights * (pump - dark))

        params = {
            "amplitude": jnp.asarray(0.05),
            "width_fraction": jnp.asarray(0.6),
            "pb_ratio": jnp.asarray(0.4),
            "equatorial_ratio": jnp.asarray(1 / 6),
            "cs_ratio": jnp.asarray(0.1),
        }
        _fd_check(loss, params, list(params))
