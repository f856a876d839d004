"""Sparse indexing (SPIND-like) and the Eq. 1 orientation refinement, on ideal Ewald-sphere spots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from data_pipeline import indexing as ix
from data_pipeline import refinement as rf
from jaxpolaron.scattering import wavelength_a

ENERGY = 13.6
K0 = 1.0 / wavelength_a(ENERGY)


@pytest.fixture(scope="module")
def lattice(structure):
    return ix.structure_lattice(structure, q_max=0.9, energy_kev=ENERGY, min_relative_intensity=1e-2)


def ewald_spots(rotation, lattice, *, max_excitation=0.004, q_max=0.8, rng=None, noise=0.0):
    """Lab-frame spots of every allowed reflection within `max_excitation` Å⁻¹ of the Ewald sphere, moved
    radially onto the sphere (what a detector records), with optional Gaussian position noise (Å⁻¹)."""
    g = lattice.g[lattice.g_norm < q_max] @ rotation.T
    k_out = g + np.array([0.0, 0.0, K0])
    excitation = np.linalg.norm(k_out, axis=1) - K0
    keep = np.abs(excitation) < max_excitation
    spots = k_out[keep] * (K0 / np.linalg.norm(k_out[keep], axis=1, keepdims=True)) - np.array([0.0, 0.0, K0])
    if noise:
        spots = spots + rng.normal(0.0, noise, spots.shape)
    return spots, lattice.hkl[lattice.g_norm < q_max][keep]


def random_rotation(seed):
    return Rotation.random(random_state=seed).as_matrix()


def test_pnma_systematic_absences(lattice):
    # Pnma: 0kl k+l = 2n, hk0 h = 2n, h00 h = 2n, 0k0 k = 2n, 00l l = 2n
    absent = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 2], [1, 2, 0], [3, 0, 0], [0, 0, 3]])
    assert not lattice.is_allowed(absent).any()
    present = np.array([[1, 0, 1], [0, 2, 0], [2, 0, 0], [1, 2, 1], [2, 0, 2], [0, 4, 0]])
    assert lattice.is_allowed(present).all()
    assert not lattice.is_allowed(np.zeros((1, 3), int)).any()


def test_misorientation_and_symmetry():
    r = random_rotation(1)
    for s in ix.cubic_rotations():
        assert ix.misorientation_deg(r, r @ s) == pytest.approx(0.0, abs=1e-5)
    tilt = Rotation.from_rotvec(np.deg2rad(7.0) * np.array([0.3, -0.5, 0.81]) / np.linalg.norm([0.3, -0.5, 0.81]))
    assert ix.misorientation_deg(r, r @ tilt.as_matrix()) == pytest.approx(7.0, abs=1e-4)
    assert len(ix.cubic_rotations()) == 24


def test_kabsch_and_pair_rotation_recover_a_rotation():
    rng = np.random.default_rng(0)
    r = random_rotation(2)
    g = rng.normal(size=(6, 3))
    np.testing.assert_allclose(ix.kabsch(g, g @ r.T), r, atol=1e-12)
    np.testing.assert_allclose(ix.pair_rotations(g[0], g[1], r @ g[0], r @ g[1]), r, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_single_crystal_indexed_with_correct_orientation(lattice, seed):
    rng = np.random.default_rng(seed)
    r = random_rotation(100 + seed)
    q, hkl = ewald_spots(r, lattice, rng=rng, noise=5e-4)
    assert len(np.unique(hkl, axis=0)) >= 4  # precondition of the test data
    crystals = ix.index_frame(q, rng.uniform(10, 100, len(q)), lattice, ix.IndexingConfig())
    assert len(crystals) == 1
    c = crystals[0]
    assert len(c.peaks) == len(q)
    assert ix.misorientation_deg(c.rotation, r) < 0.5
    # hkl agree with the truth up to a point-group operation of the orientation found
    h_true = np.rint((hkl @ lattice.basis) @ (r.T @ c.rotation) @ lattice.inverse).astype(int)
    np.testing.assert_array_equal(np.sort(c.hkl, axis=0), np.sort(h_true[c.peaks], axis=0))


def test_two_crystals_in_one_frame(lattice):
    rng = np.random.default_rng(5)
    r1, r2 = random_rotation(11), random_rotation(12)
    q1, _ = ewald_spots(r1, lattice, rng=rng, noise=3e-4)
    q2, _ = ewald_spots(r2, lattice, rng=rng, noise=3e-4)
    q = np.concatenate([q1, q2])
    intensity = np.concatenate([np.full(len(q1), 100.0), np.full(len(q2), 50.0)])
    crystals = ix.index_frame(q, intensity, lattice, ix.IndexingConfig())
    assert len(crystals) == 2
    errors = sorted(min(ix.misorientation_deg(c.rotation, r) for r in (r1, r2)) for c in crystals)
    assert errors[-1] < 0.5
    assert not set(crystals[0].peaks) & set(crystals[1].peaks)


def test_two_reflections_never_index(lattice):
    # split peaks of two reflections: several peaks but two distinct reflections do not fix an orientation
    r = random_rotation(3)
    g = lattice.g[[0, 10]] @ r.T
    q = np.concatenate([g + 1e-4 * k for k in range(3)])
    assert ix.index_frame(q, np.ones(len(q)), lattice, ix.IndexingConfig()) == []
    hkl, dist = ix.assign(r[None], q, lattice)
    assert ix.n_reflections(hkl, dist < 0.02)[0] == 2


def test_random_peaks_are_not_indexed(lattice):
    rng = np.random.default_rng(7)
    wrong = 0
    for _ in range(20):
        direction = rng.normal(size=(6, 3))
        k_out = K0 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
        k_out[:, 2] = np.abs(k_out[:, 2])
        q = k_out - np.array([0.0, 0.0, K0])
        q = q[np.linalg.norm(q, axis=1) < 0.8]
        wrong += len(ix.index_frame(q, np.ones(len(q)), lattice, ix.IndexingConfig()))
    assert wrong <= 1


# --- refinement ---------------------------------------------------------------------------------------------


def test_rotation_from_vector_matches_scipy_and_is_smooth_at_zero(x64):
    w = np.array([0.3, -0.2, 0.5])
    np.testing.assert_allclose(rf.rotation_from_vector(jnp.asarray(w)), Rotation.from_rotvec(w).as_matrix(), atol=1e-12)
    jac = jax.jacobian(lambda v: rf.rotation_from_vector(v))(jnp.zeros(3))
    assert np.all(np.isfinite(jac))
    # d R / d ω_x at 0 is the generator [x]_×
    np.testing.assert_allclose(jac[..., 0], [[0, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)


@pytest.mark.parametrize("ewald", [True, False])
def test_score_gradient_matches_finite_differences(lattice, x64, ewald):
    r = random_rotation(4)
    q, hkl = ewald_spots(r, lattice)
    cfg = rf.RefinementConfig(ewald=ewald)
    g = jnp.asarray(hkl @ lattice.basis)
    s = jnp.linspace(1.0, 2.0, len(q))
    r0 = r @ Rotation.from_rotvec([0.004, -0.003, 0.002]).as_matrix()

    def f(w):
        return rf.cross_peak_score(jnp.asarray(r0) @ rf.rotation_from_vector(w), jnp.asarray(q), g, s, cfg)

    w0 = jnp.array([1e-3, 2e-3, -1e-3])
    grad = jax.grad(f)(w0)
    h = 1e-6
    fd = [(f(w0 + h * e) - f(w0 - h * e)) / (2 * h) for e in jnp.eye(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_refinement_recovers_orientation_from_ewald_spots(lattice):
    rng = np.random.default_rng(9)
    truths, items = [], []
    for seed in range(8):
        r = random_rotation(200 + seed)
        q, hkl = ewald_spots(r, lattice, rng=rng, noise=2e-4)
        start = r @ Rotation.from_rotvec(rng.normal(0, np.deg2rad(0.6), 3)).as_matrix()
        truths.append(r)
        items.append((start, q, hkl @ lattice.basis, np.ones(len(q))))
    rot, q, g, s = rf.pad_crystals(items, n_max=64, batch=8)
    refined, before, after = rf.refine_orientations(rot, q, g, s, rf.RefinementConfig(ewald=True))
    err0 = [ix.misorientation_deg(it[0], t) for it, t in zip(items, truths, strict=True)]
    err1 = [ix.misorientation_deg(np.asarray(refined[i], float), t) for i, t in enumerate(truths)]
    assert np.median(err1) < 0.15 < np.median(err0)
    assert np.all(np.asarray(after) >= np.asarray(before) - 1e-6)
    # padding and batch composition do not change a crystal's result
    alone = rf.refine_orientations(*rf.pad_crystals(items[:1], n_max=64, batch=8), rf.RefinementConfig(ewald=True))
    np.testing.assert_allclose(np.asarray(alone[0][0]), np.asarray(refined[0]), atol=1e-6)


def _tangential_information(rotation, hkl, q, basis, sigma, step=1e-6):
    """Information matrix of the orientation from central differences of the spots' along-sphere residuals."""
    normal = q + np.array([0.0, 0.0, K0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    proj = np.eye(3) - normal[:, :, None] * normal[:, None, :]
    g = hkl @ basis
    cols = []
    for a in range(3):
        dw = np.zeros(3)
        dw[a] = step
        plus = np.einsum("nij,nj->ni", proj, g @ (rotation @ Rotation.from_rotvec(dw).as_matrix()).T)
        minus = np.einsum("nij,nj->ni", proj, g @ (rotation @ Rotation.from_rotvec(-dw).as_matrix()).T)
        cols.append((plus - minus) / (2 * step))
    jac = np.stack(cols, axis=-1)  # (n, 3, 3)
    return np.einsum("nki,nkj->ij", jac, jac) / sigma**2


def test_orientation_sigma_matches_finite_differences(lattice):
    r = random_rotation(21)
    q, hkl = ewald_spots(r, lattice, max_excitation=0.01)
    sigma = ix.orientation_sigma_deg(r, hkl, q, lattice.basis, 0.003)
    info = _tangential_information(r, hkl, q, lattice.basis, 0.003)
    expected = np.degrees(1.0 / np.sqrt(np.linalg.eigvalsh(info)[0]))
    assert sigma == pytest.approx(expected, rel=1e-4)


def test_orientation_sigma_split_spots_scaling_and_low_angle_limit(lattice):
    r = random_rotation(22)
    q, hkl = ewald_spots(r, lattice, max_excitation=0.01)
    base = ix.orientation_sigma_deg(r, hkl, q, lattice.basis, 0.003)
    # a reflection split by the Ewald cut into three spots carries the information of one
    split = ix.orientation_sigma_deg(r, np.concatenate([hkl, hkl[:1], hkl[:1]]),
                                     np.concatenate([q, q[:1], q[:1]]), lattice.basis, 0.003)  # fmt: skip
    assert split == pytest.approx(base, rel=1e-9)
    assert ix.orientation_sigma_deg(r, hkl, q, lattice.basis, 0.006) == pytest.approx(2 * base, rel=1e-9)
    # low-angle spots (sphere normal ≈ beam) hardly fix rotations about axes in the detector plane
    low = np.linalg.norm(q, axis=1) <= np.median(np.linalg.norm(q, axis=1))
    assert low.sum() >= 3 and (~low).sum() >= 3
    assert ix.orientation_sigma_deg(r, hkl[low], q[low], lattice.basis, 0.003) > 2 * base


def test_unsure_orientation_is_rejected(lattice):
    rng = np.random.default_rng(4)
    r = random_rotation(104)
    q, _ = ewald_spots(r, lattice, rng=rng, noise=5e-4)
    (accepted,) = ix.index_frame(q, np.ones(len(q)), lattice, ix.IndexingConfig())
    rejected = []
    strict = ix.IndexingConfig(max_orientation_sigma_deg=0.5 * accepted.sigma_deg)
    assert ix.index_frame(q, np.ones(len(q)), lattice, strict, rejected=rejected) == []
    assert len(rejected) == 1 and rejected[0].sigma_deg == pytest.approx(accepted.sigma_deg)
