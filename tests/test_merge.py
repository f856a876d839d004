"""Ewald-sphere merging kernels: against a float64 numpy np.add.at merge, known smooth volumes, masks,
classes, scale, and the per-crystal scaling and similarity statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline.geometry import default_agipd_geometry, pixel_positions
from data_pipeline.merge import (
    MergeGrid,
    add_into,
    crystal_statistics,
    detector_pixels,
    empty_accumulator,
    flat_reference,
    merge_batch,
    merged_mean,
    pad_crystals,
)
from jaxpolaron.reciprocal import random_rotations

GRID = MergeGrid(n=41, q_max=1.0)


@pytest.fixture(scope="module")
def det():
    """The real AGIPD-1M pixel q, every 7th pixel (the kernels do not care which pixels they get)."""
    full = detector_pixels(pixel_positions(default_agipd_geometry()), 13.6)
    take = slice(None, None, 7)
    return full._replace(q_lab_t=full.q_lab_t[:, take], q_abs=full.q_abs[take], correction=full.correction[take])


def _rotations(n, seed=0):
    return np.asarray(random_rotations(n, key=jax.random.key(seed)), np.float64)


def _merge(det, intensities, pixel_weight, slot, rot, scale, klass, excluded, *, n_classes=2, mode="nearest",
           weight=None):  # fmt: skip
    p = det.q_abs.size
    batch = pad_crystals(slot, rot, scale, klass, excluded, capacity=8, n_pixels=p, width=64, weight=weight)
    frames = jnp.asarray(intensities, jnp.float32), jnp.asarray(pixel_weight, jnp.float32)
    acc = empty_accumulator(GRID, n_classes)
    acc = merge_batch(acc, *frames, jnp.asarray(det.q_lab_t), batch, grid=GRID, mode=mode)
    return add_into(None, acc, GRID, n_classes)


def _numpy_nearest(det, intensities, pixel_weight, slot, rot, scale, klass, excluded, n_classes=2, weight=None):
    """Reference merge in float64 with np.add.at (weight: per-crystal weights, default 1)."""
    weight = np.ones(len(slot)) if weight is None else weight
    n = GRID.n
    s = np.zeros((n_classes, n**3))
    w = np.zeros((n_classes, n**3))
    for c in range(len(slot)):
        q = det.q_lab_t.T.astype(np.float64) @ rot[c]
        i = np.rint((q + GRID.q_max) / GRID.voxel).astype(np.int64)
        ok = np.all((i >= 0) & (i < n), axis=1)
        wt = pixel_weight[slot[c]].astype(np.float64) * weight[c]
        wt[np.asarray(excluded[c], np.int64)] = 0.0
        flat = ((i[:, 0] * n + i[:, 1]) * n + i[:, 2])[ok]
        np.add.at(s[klass[c]], flat, (scale[c] * wt * intensities[slot[c]])[ok])
        np.add.at(w[klass[c]], flat, wt[ok])
    return s.reshape(n_classes, n, n, n), w.reshape(n_classes, n, n, n)


@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5, 1 / 1.5]])
def test_nearest_matches_numpy_add_at(det, weight):
    rng = np.random.default_rng(1)
    p = det.q_abs.size
    intensities = rng.poisson(2.0, (3, p)).astype(np.float32)
    pixel_weight = (rng.random((3, p)) > 0.01).astype(np.float32)
    slot, rot = [0, 1, 1, 2], _rotations(4)
    scale, klass = [1.0, 0.5, 2.0, 1.5], [0, 1, 0, 1]
    excluded = [rng.choice(p, 30, replace=False) for _ in slot]
    got = _merge(det, intensities, pixel_weight, slot, rot, scale, klass, excluded, weight=weight)
    s, w = _numpy_nearest(det, intensities, pixel_weight, slot, rot, scale, klass, excluded, weight=weight)
    np.testing.assert_allclose(got["weight"], w, rtol=1e-5, atol=1e-3)  # float32 sums of weights 1/1.5
    np.testing.assert_allclose(got["sum"], s, rtol=1e-5, atol=1e-3)
    assert w.sum() > 0 and s[1].sum() > 0


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_merged_mean_reproduces_a_smooth_volume(det, mode):
    """Frames that sample a smooth function of q_crystal merge back to that function on the grid."""

    def f(q):  # (..., 3) crystal frame -> intensity
        return 1.0 + np.exp(-np.sum((q - np.array([0.2, -0.1, 0.3])) ** 2, axis=-1) / (2 * 0.25**2))

    n_cr = 8
    rot = _rotations(n_cr, seed=3)
    intensities = np.stack([f(det.q_lab_t.T.astype(np.float64) @ r) for r in rot]).astype(np.float32)
    got = _merge(det, intensities, np.ones_like(intensities), list(range(n_cr)), rot, [1.0] * n_cr, [0] * n_cr,
                 [[]] * n_cr, n_classes=1, mode=mode)  # fmt: skip
    mean = merged_mean(got)[0]
    g = GRID.axis
    truth = f(np.stack(np.meshgrid(g, g, g, indexing="ij"), -1))
    filled = got["weight"][0] > (0.5 if mode == "trilinear" else 0)
    assert filled.sum() > 1000
    # nearest: a pixel lands up to half a voxel from the centre; trilinear: weighted over the 8 corners
    err = np.abs(mean - truth)[filled]
    slope = 1.0 / 0.25 * 0.61 * GRID.voxel  # max |∇f| · voxel
    assert np.median(err) < 0.5 * slope and err.max() < 1.5 * slope


def test_weights_scale_classes_and_overflow(det):
    p = det.q_abs.size
    intensities = np.ones((1, p), np.float32)
    rot = _rotations(2)
    got = _merge(det, intensities, np.ones((1, p), np.float32), [0, 0], rot, [3.0, 3.0], [0, 1],
                 [np.arange(50), []])  # fmt: skip
    q_max_pix = np.abs(det.q_lab_t).max()
    assert q_max_pix < GRID.q_max  # every pixel lands inside the grid
    assert got["weight"][0].sum() == pytest.approx(p - 50)  # 50 excluded pixels
    assert got["weight"][1].sum() == pytest.approx(p)
    np.testing.assert_allclose(got["sum"], 3.0 * got["weight"], rtol=1e-6)
    # a grid too small to hold the pixels: they go to the overflow slots, not into the volume
    small = MergeGrid(n=11, q_max=0.2)
    batch = pad_crystals([0], rot[:1], [1.0], [0], [[]], capacity=2, n_pixels=p, width=4)
    acc = merge_batch(empty_accumulator(small, 1), jnp.asarray(intensities), jnp.ones((1, p)), jnp.asarray(det.q_lab_t),
                      batch, grid=small)  # fmt: skip
    tot = add_into(None, acc, small, 1)
    inside = np.all(np.abs(det.q_lab_t.T @ rot[0]) <= small.q_max + small.voxel / 2, axis=1).sum()
    assert tot["weight"].sum() == pytest.approx(inside, abs=2)


def test_inverse_scale_weights_are_the_poisson_maximum_likelihood_mean(det):
    """Crystals of one orientation whose gains g span 100× see a flat volume M as Poisson counts of mean g·M;
    scaled by s = 1/g, both weightings are unbiased, but the uniform mean Σ s·I / N carries the faint crystals'
    noise 100×, while weights 1/s give Σ I / Σ g, whose variance M / Σ g is the Cramér–Rao bound."""
    rng = np.random.default_rng(3)
    p = det.q_abs.size
    gain = np.geomspace(0.01, 1.0, 8)
    m = 20.0
    counts = rng.poisson(gain[:, None] * m, (8, p)).astype(np.float32)
    rot = np.repeat(_rotations(1), 8, axis=0)
    ones = np.ones((8, p), np.float32)
    args = (det, counts, ones, np.arange(8), rot, 1.0 / gain, np.zeros(8, int), [[]] * 8)
    merged = {"uniform": _merge(*args, n_classes=1), "inverse-scale": _merge(*args, n_classes=1, weight=gain)}
    hit = merged["uniform"]["weight"][0] > 0
    est = {k: merged_mean(v)[0][hit] for k, v in merged.items()}
    for e in est.values():
        assert abs(e.mean() / m - 1) < 0.02  # unbiased
    # a voxel holding k pixels has variance M / (k Σg) with weights 1/s, M Σ(1/g) / (k N²) uniform: 6.7× more
    assert np.var(est["inverse-scale"]) <= 1.05 * m / gain.sum()
    assert np.var(est["uniform"]) > 4 * np.var(est["inverse-scale"])


def test_second_call_does_not_compile(det):
    p = det.q_abs.size
    batch = pad_crystals([0], _rotations(1), [1.0], [0], [[]], capacity=4, n_pixels=p, width=8)
    args = (jnp.ones((2, p)), jnp.ones((2, p)), jnp.asarray(det.q_lab_t), batch)
    acc = merge_batch(empty_accumulator(GRID, 1), *args, grid=GRID)
    with jax.log_compiles():
        before = merge_batch._cache_size()
        acc = merge_batch(acc, *args, grid=GRID)
        assert merge_batch._cache_size() == before


def test_scale_and_similarity_against_the_reference(det):
    """A crystal whose frame is 0.25 × the reference cut gets scale 4 and similarity 1; the same frame merged
    with a wrong orientation is dissimilar."""
    a_pc = 5.87
    g = GRID.axis
    qq = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1)
    # Bragg-like blobs on the pseudo-cubic lattice over a weak smooth background
    d2 = np.sum((qq - np.rint(qq * a_pc) / a_pc) ** 2, axis=-1)
    volume = 0.01 + np.exp(-d2 / (2 * 0.02**2)) * np.exp(-np.sum(qq**2, -1) / 0.3)
    reference = flat_reference(volume)
    rot = _rotations(2, seed=5)
    n = GRID.n
    i = np.rint((det.q_lab_t.T.astype(np.float64) @ rot[0] + GRID.q_max) / GRID.voxel).astype(int)
    cut = volume[i[:, 0], i[:, 1], i[:, 2]]
    assert np.all((i >= 0) & (i < n))
    frame = (0.25 * cut).astype(np.float32)[None]
    batch = pad_crystals([0, 0], rot, [1.0, 1.0], [0, 0], [[], []], capacity=4, n_pixels=det.q_abs.size, width=8)
    frame = jnp.asarray(frame)
    constants = (jnp.float32(volume.mean()), jnp.float32(a_pc), jnp.float32(GRID.voxel))
    stats = crystal_statistics(reference, frame, jnp.ones_like(frame), jnp.asarray(det.q_lab_t), batch, *constants,
                               grid=GRID)  # fmt: skip
    scale, sim, n_sel = (np.asarray(x) for x in stats)
    assert scale[0] == pytest.approx(4.0, rel=1e-4)
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and n_sel[0] > 10
    assert sim[1] < 0.8
    assert np.isnan(scale[2:]).all() and (n_sel[2:] == 0).all()
