"""Voxel means: the fit's forward averages the model over each voxel like nearest-voxel merging averages pixels,
and synthetic frames interpolate their |F|² tables without smoothing them (docs/closed_loop.md)."""

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.synthetic import _tricubic, _trilinear
from fitting.forward import build_forward, voxel_nodes
from fitting.windows import make_layout


def test_voxel_nodes_integrate_cubics_over_the_voxel():
    for p in (1, 2, 3):
        x, w = voxel_nodes(p)
        assert abs(w.sum() - 1.0) < 1e-12 and np.all(np.abs(x) < 0.5)
        for k in range(2 * p):  # Gauss–Legendre: exact to degree 2p − 1; ∫_{-1/2}^{1/2} x^k dx
            exact = 0.0 if k % 2 else 0.5**k / (k + 1)
            assert abs(np.sum(w * x**k) - exact) < 1e-12


def test_forward_voxel_mean_converges_and_differs_from_centre_values(structure):
    layout = make_layout(structure.q_of_hkl, [(2, 0, 0)], 2 / 256, 2)
    dark = {}
    for p in (1, 2, 4):
        fw = build_forward(structure, layout.member_grid(), sizes_nm=[5.0], gamma_shape=2.0, mean_nm=5.0,
                           method="linear", n_holes=1, voxel_points=p)  # fmt: skip
        dark[p] = np.asarray(fw.dark(), float)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    # a 5 nm crystal's (200) peak is ~2.5 voxels wide: its voxel means are visibly not its centre values, and the
    # 2-point rule (exact for cubics per axis) is already close to the converged 4-point one
    assert rel(dark[1], dark[4]) > 0.03
    assert rel(dark[2], dark[4]) < 0.2 * rel(dark[1], dark[4])
    # the voxel mean of a peak is lower than its centre value and conserves the integrated intensity
    assert dark[4].max() < dark[1].max()
    assert abs(dark[4].sum() / dark[1].sum() - 1.0) < 0.02


def test_tricubic_reproduces_quadratics_where_trilinear_smooths():
    n = 12
    g = jnp.arange(n, dtype=jnp.float32)
    x, y, z = jnp.meshgrid(g, g, g, indexing="ij")
    f = (0.3 * (x - 5.2) ** 2 + 0.1 * (y - 4.0) * (z - 6.5) + 2.0 * y).reshape(-1)
    pts = jnp.asarray(np.random.default_rng(0).uniform(2.0, n - 3.0, (3, 500)), jnp.float32)
    exact = 0.3 * (pts[0] - 5.2) ** 2 + 0.1 * (pts[1] - 4.0) * (pts[2] - 6.5) + 2.0 * pts[1]
    cubic = _tricubic(f, n, jnp.int32(0), pts)
    linear = _trilinear(f, n, jnp.int32(0), pts)
    np.testing.assert_allclose(np.asarray(cubic), np.asarray(exact), rtol=1e-5, atol=1e-4)
    assert float(jnp.max(jnp.abs(linear - exact))) > 0.01
    outside = _tricubic(f, n, jnp.int32(0), jnp.asarray([[0.5], [5.0], [5.0]], jnp.float32))
    assert float(outside[0]) == 0.0  # the 4-sample stencil would leave the table: 0, as outside the volume
    jax.block_until_ready(cubic)
