"""Structure-factor engines behind one function, `structure_factor`.

    F(q) = Σ_j m_j f_{s(j)}(|q|) exp(2πi q·r_j)        q in Å⁻¹ (|q| = 1/d), r in Å, m_j the atom mask

Engines (all jit/vmap-safe and differentiable w.r.t. positions, mask and scattering factors):

- "direct": the reference. A chunked sum over atoms × q points for any q (a grid or an (n, 3) list);
  float64-capable. Cost N·n_q sin/cos.
- "separable": grid-aligned q only. exp(2πi q·r) = e_x(q_x) e_y(q_y) e_z(q_z), so per species
  S(q_x, q_y, q_z) = Σ_j e_x[j, a] e_y[j, b] e_z[j, c]: matrix products contracting over the atoms, with
  only N (n_x + n_y + n_z) exponentials. Exact (no approximation); the pure-JAX path on GPUs.
- "nufft": grid-aligned q only. A type-1 NUFFT (jax-finufft) per species; the fast path for full grids
  on CPU. Accuracy set by `eps`: in float32 it reaches ~1e-5 relative to max |F| (several 1e-5 on
  256³ grids), not the requested 1e-6 (float64: eps 1e-11 by default).

"auto" picks direct for q lists, NUFFT for big grids on CPU, and keeps the exact separable engine for hkl
windows on purpose even where a NUFFT would be faster: the pump-probe ΔI signals measured on windows are
small differences of large intensities, and the NUFFT's ~1e-5 error would be a visible fraction of them.

Separable and NUFFT compute per-species partial sums S_s(q) = Σ_{j∈s} m_j exp(2πi q·r_j) and combine
F = Σ_s f_s(|q|) S_s(q), with f_s factored along the grid axes; the direct engine gathers f per atom
instead, so it checks the other two independently.
"""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors

Engine = Literal["auto", "direct", "separable", "nufft"]
ENGINES = ("auto", "direct", "separable", "nufft")

# Memory bound for one chunk of (atoms × q) complex intermediates: 2^22 elements ≈ 32 MB in complex64.
_CHUNK_ELEMENTS = 1 << 22
# The separable engine's per-row-batch e_x ⊙ e_y product: ~4 MB in complex64 stays in cache, and was
# faster than larger batches (measured, 2 CPU cores).
_ROW_ELEMENTS = 1 << 19
# 'auto' sends grids of at least this many points to the NUFFT (on CPU); smaller ones, the hkl windows, stay
# on the exact separable engine on purpose (see the module docstring).
_NUFFT_MIN_POINTS = 64**3

TWO_PI = 2.0 * math.pi


def _complex_dtype(x: Array):
    return jnp.complex128 if x.dtype == jnp.float64 else jnp.complex64


# --------------------------------------------------------------------------------------------- direct
def _direct(crystal: Nanocrystal, scattering: ScatteringFactors, q: Float[Array, "n 3"]) -> Array:
    n_atoms = crystal.positions.shape[0]
    chunk = max(1, min(q.shape[0], _CHUNK_ELEMENTS // max(n_atoms, 1)))
    n_chunks = -(-q.shape[0] // chunk)
    q_pad = jnp.concatenate([q, jnp.zeros((n_chunks * chunk - q.shape[0], 3), q.dtype)]).reshape(n_chunks, chunk, 3)

    def one_chunk(qc):
        f_atom = scattering(jnp.linalg.norm(qc, axis=-1))[crystal.species]  # (N, chunk)
        phase = TWO_PI * crystal.positions @ qc.T  # (N, chunk)
        return jnp.sum(crystal.mask[:, None] * f_atom * jnp.exp(1j * phase), axis=0)

    return jax.lax.map(one_chunk, q_pad).reshape(-1)[: q.shape[0]]


# ------------------------------------------------------------------------------------------ separable
def _separable_block(positions, weights, axes) -> Array:
    """Σ_j w_j e^{2πi(q_x x_j + q_y y_j + q_z z_j)} on the grid spanned by `axes`; (nx, ny, nz).

    Atoms go in long chunks (their exponentials take c (nx + ny + nz) elements); within a chunk each batch
    of x rows a is one matrix product S[a] += (e_x[:, a] ⊙ e_y)ᵀ @ e_z contracting over the c atoms. Long
    contractions keep the products efficient (a chunk of c·nx·ny would leave only ~64 atoms on a 256²
    plane), and the (rows, c, ny) intermediate stays within _ROW_ELEMENTS.
    """
    qx, qy, qz = axes
    nx, ny, nz = qx.shape[0], qy.shape[0], qz.shape[0]
    n = positions.shape[0]
    cdt = _complex_dtype(positions)
    if n == 0:
        return jnp.zeros((nx, ny, nz), cdt)
    # balanced chunks: n just above the limit would otherwise pad a second, nearly empty chunk
    n_chunks = -(-n // max(1, _CHUNK_ELEMENTS // (nx + ny + nz)))
    chunk = -(-n // n_chunks)
    # x rows per product: the largest divisor of nx within _ROW_ELEMENTS, so lax.map needs no remainder
    # batch (a second copy of the body to compile, and a concatenation).
    rows_max = max(1, _ROW_ELEMENTS // (chunk * ny))
    rows = max(d for d in range(1, min(nx, rows_max) + 1) if nx % d == 0)
    pad = n_chunks * chunk - n
    pos = jnp.concatenate([positions, jnp.zeros((pad, 3), positions.dtype)]).reshape(n_chunks, chunk, 3)
    w = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)]).reshape(n_chunks, chunk)

    def step(acc, xs):
        p, wc = xs
        ex = jnp.exp(1j * TWO_PI * p[:, 0:1] * qx[None, :]) * wc[:, None]  # (c, nx)
        ey = jnp.exp(1j * TWO_PI * p[:, 1:2] * qy[None, :])  # (c, ny)
        ez = jnp.exp(1j * TWO_PI * p[:, 2:3] * qz[None, :])  # (c, nz)

        # Checkpointed so reverse mode recomputes e_x ⊙ e_y per row (cheap) instead of storing all
        # c·nx·ny of it per chunk: gradient memory stays ~ N (nx + ny + nz) + the grid.
        @jax.checkpoint
        def row(ex_a):  # (c,) -> (ny, nz)
            return (ex_a[:, None] * ey).T @ ez

        return acc + jax.lax.map(row, ex.T, batch_size=rows), None

    acc, _ = jax.lax.scan(step, jnp.zeros((nx, ny, nz), cdt), (pos, w))
    return acc


def _separable_multi(positions, weights, axes) -> Array:
    """Σ_j w_jk e^{2πi q·r_j} for K weight vectors at once: (K, nx, ny, nz); weights (n, K) real or complex.

    Same scheme as `_separable_block`, with e_z ⊙ w widened to (c, K·nz) so the K sums share the atoms'
    exponentials and run as one matrix product per x row (K times wider).
    """
    qx, qy, qz = axes
    nx, ny, nz = qx.shape[0], qy.shape[0], qz.shape[0]
    n, k = weights.shape
    cdt = _complex_dtype(positions)
    if n == 0:
        return jnp.zeros((k, nx, ny, nz), cdt)
    n_chunks = -(-n // max(1, _CHUNK_ELEMENTS // (nx + ny + k * nz)))
    chunk = -(-n // n_chunks)
    rows_max = max(1, _ROW_ELEMENTS // (chunk * ny))
    rows = max(d for d in range(1, min(nx, rows_max) + 1) if nx % d == 0)
    pad = n_chunks * chunk - n
    pos = jnp.concatenate([positions, jnp.zeros((pad, 3), positions.dtype)]).reshape(n_chunks, chunk, 3)
    w = jnp.concatenate([weights, jnp.zeros((pad, k), weights.dtype)]).reshape(n_chunks, chunk, k)

    def step(acc, xs):
        p, wc = xs
        ex = jnp.exp(1j * TWO_PI * p[:, 0:1] * qx[None, :])  # (c, nx)
        ey = jnp.exp(1j * TWO_PI * p[:, 1:2] * qy[None, :])  # (c, ny)
        ez = jnp.exp(1j * TWO_PI * p[:, 2:3] * qz[None, :])  # (c, nz)
        ezw = (wc[:, :, None] * ez[:, None, :]).reshape(chunk, k * nz)

        @jax.checkpoint
        def row(ex_a):  # (c,) -> (ny, K nz)
            return (ex_a[:, None] * ey).T @ ezw

        return acc + jax.lax.map(row, ex.T, batch_size=rows), None

    acc, _ = jax.lax.scan(step, jnp.zeros((nx, ny, k * nz), cdt), (pos, w))
    return jnp.moveaxis(acc.reshape(nx, ny, k, nz), 2, 0)


def _window_block(positions, weights, axes) -> Array:
    """Σ_j w_kj e^{2πi q·r_j} on one small grid: (K, nx, ny, nz); weights (K, n) real or complex.

    One matrix product (nx·ny × n) @ (n × K·nz) over all atoms at once. For the fit's small windows (7³–11³)
    this keeps the contraction long and the product wide, where `_separable_multi`'s per-row products
    ((ny × c) @ (c × K nz)) are too small to run efficiently. Memory n (nx ny + K nz) complex: small windows only.
    """
    qx, qy, qz = axes
    nx, ny, nz = qx.shape[0], qy.shape[0], qz.shape[0]
    k, n = weights.shape
    cdt = _complex_dtype(positions)
    if n == 0:
        return jnp.zeros((k, nx, ny, nz), cdt)
    ex = jnp.exp(1j * TWO_PI * positions[:, 0:1] * qx[None, :])  # (n, nx)
    ey = jnp.exp(1j * TWO_PI * positions[:, 1:2] * qy[None, :])
    ez = jnp.exp(1j * TWO_PI * positions[:, 2:3] * qz[None, :])
    exy = (ex[:, :, None] * ey[:, None, :]).reshape(n, nx * ny)
    ezw = (weights.T.astype(cdt)[:, :, None] * ez[:, None, :]).reshape(n, k * nz)
    return jnp.moveaxis((exy.T @ ezw).reshape(nx, ny, k, nz), 2, 0)


# ---------------------------------------------------------------------------------------------- nufft
def _nufft_block(positions, weights, grid: Grid, eps: float) -> Array:
    from jax_finufft import nufft1
    from jax_finufft.options import Opts

    cdt = _complex_dtype(positions)
    if positions.shape[0] == 0:
        return jnp.zeros(weights.shape[:-1] + grid.shape, cdt)
    # Grid index i <-> NUFFT mode k = i - n // 2; the centre offset goes into the strengths, the voxel
    # into the (2π-periodic) point coordinates.
    strengths = weights.astype(cdt) * jnp.exp(1j * TWO_PI * positions @ grid.centre)
    pts = [jnp.mod(TWO_PI * grid.voxel[i] * positions[:, i] + math.pi, TWO_PI) - math.pi for i in range(3)]
    # upsampfac 1.25: ~10x faster than the default 2.0 on CPU for these sizes (measured).
    # jax-finufft takes one batch axis of strength vectors sharing the points: flatten any others
    batch = strengths.shape[:-1]
    if len(batch) > 1:
        strengths = strengths.reshape(-1, strengths.shape[-1])
    out = nufft1(grid.shape, strengths, *pts, eps=eps, iflag=1, opts=Opts(upsampfac=1.25))
    return out.reshape(*batch, *grid.shape)


# ------------------------------------------------------------------------------------------ interface
def choose_engine(q: Grid | Array, engine: Engine = "auto") -> str:
    """Resolve 'auto': q lists -> direct; small grids (windows) -> separable; big grids -> NUFFT on CPU."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    if not isinstance(q, Grid):
        if engine not in ("auto", "direct"):
            raise ValueError(f"engine {engine!r} needs a grid-aligned q (a Grid), got a q list")
        return "direct"
    if engine != "auto":
        return engine
    if math.prod(q.shape) >= _NUFFT_MIN_POINTS and jax.default_backend() == "cpu":
        return "nufft"
    return "separable"


def _on_grid(crystal: Nanocrystal, scattering: ScatteringFactors, grid: Grid, engine: str, eps) -> Array:
    """F = Σ_s f_s(|q|) S_s(q), accumulated one species at a time.

    f_s comes factored per axis (`ScatteringFactors.on_axes`), so neither the (nx, ny, nz, 3) points, |q|
    on the grid nor an (S, nx, ny, nz) stack of partial sums is built; XLA fuses each species' term into
    one pass over the grid (~10x faster than evaluating f(|q|) on the points, measured on 256³).
    """
    if engine == "nufft" and eps is None:
        eps = 1e-11 if crystal.positions.dtype == jnp.float64 else 1e-6
    axes = grid.axes()
    const, (gx, gy, gz) = scattering.on_axes(*axes)
    out = jnp.zeros(grid.shape, _complex_dtype(crystal.positions))
    for s, (a, b) in enumerate(crystal.blocks):
        pos, mask = crystal.positions[a:b], crystal.mask[a:b].astype(crystal.positions.dtype)
        partial = _separable_block(pos, mask, axes) if engine == "separable" else _nufft_block(pos, mask, grid, eps)
        f0 = sum(
            gx[s, i, :, None, None] * gy[s, i, None, :, None] * gz[s, i, None, None, :] for i in range(gx.shape[1])
        )
        out = out + (const[s] + f0) * partial
    return out


def _species_factor(scattering: ScatteringFactors, grid: Grid, s: int) -> Array:
    """f_s(q) of species s on the grid (nx, ny, nz), from the per-axis factors (see `_on_grid`)."""
    const, (gx, gy, gz) = scattering.on_axes(*grid.axes())
    return const[s] + sum(
        gx[s, i, :, None, None] * gy[s, i, None, :, None] * gz[s, i, None, None, :] for i in range(gx.shape[1])
    )


def _over_windows(fn, grid: Grid, batched_nufft: bool = False):
    """fn(grid) on one grid, or mapped over a stack of windows (lax.map; vmap for NUFFT batching)."""
    if grid.centre.ndim == 2:
        return jax.vmap(fn)(grid) if batched_nufft else jax.lax.map(fn, grid)
    return fn(grid)


@eqx.filter_jit
def weighted_structure_factor(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    weights: Float[Array, "k n"],
) -> Complex[Array, "... k nx ny nz"]:
    """K weighted structure factors Σ_j f_j(q) w_kj e^{2πi q·r_j} in one pass of the exact separable engine.

    Args:
        crystal: positions (n, 3) Å (the mask is not applied: put it into the weights).
        scattering: per-species f(|q|).
        grid: a grid or stacked windows, Å⁻¹.
        weights: (K, n) per-atom weights (real or complex), e.g. displacement components or their moments.

    Returns:
        (K, nx, ny, nz), or (n_windows, K, nx, ny, nz) for stacked windows; complex, electrons × weight units.
    """
    cdt = _complex_dtype(crystal.positions)

    def one(g: Grid) -> Array:
        axes = g.axes()
        out = jnp.zeros((weights.shape[0], *g.shape), cdt)
        for s, (a, b) in enumerate(crystal.blocks):
            partial = _separable_multi(crystal.positions[a:b], weights[:, a:b].T.astype(cdt), axes)
            out = out + _species_factor(scattering, g, s) * partial
        return out

    return _over_windows(one, grid)


def window_structure_factor(crystal: Nanocrystal, scattering: ScatteringFactors, grid: Grid, weights_of, extra=None):
    """Σ_j f_j(q) W_kj e^{2πi q·r_j} on each small window, with weights W made per window.

    Args:
        crystal: positions (n, 3) Å (the mask is not applied: put it into the weights).
        scattering: per-species f(|q|).
        grid: stacked small windows (n_windows, m, m, m) or one small grid, Å⁻¹.
        weights_of: (window Grid, its slice of `extra`) -> (K, n) weights; called once per window inside a
            `lax.map`, so per-window weights never exist for all windows at once.
        extra: a pytree with a leading window axis (or None), passed to `weights_of`.

    Returns:
        (n_windows, K, m, m, m) (or (K, m, m, m) for one grid), complex, electrons × weight units.
    """

    def one(args) -> Array:
        g, x = args
        w = weights_of(g, x)
        terms = [
            _species_factor(scattering, g, s) * _window_block(crystal.positions[a:b], w[:, a:b], g.axes())
            for s, (a, b) in enumerate(crystal.blocks)
        ]
        return sum(terms[1:], terms[0])

    if grid.centre.ndim == 2:
        return jax.lax.map(one, (grid, extra))
    return one((grid, extra))


@eqx.filter_jit
def cloud_structure_factor(
    points: tuple[Float[Array, "m 3"], ...],
    weights: tuple[Float[Array, "*k m"], ...],
    scattering: ScatteringFactors,
    grid: Grid,
    eps: float | None = None,
) -> Complex[Array, "... *k nx ny nz"]:
    """Σ_s f_s(q) Σ_i w_i e^{2πi q·p_i} for a weighted cloud of points per species, by type-1 NUFFT.

    For clouds much larger than a crystal (e.g. every atom near every quadrature hole, displaced), where the
    separable engine's cost N·n_q would dominate; the NUFFT costs ~N·w³ + an FFT of the (upsampled) window.
    Accuracy ~1e-5 of max |output| in float32 (the engine's, see the module docstring), so use it for terms
    that are a modest part of a signal, not for the dominant F0 whose small differences carry ΔI.

    Args:
        points: one (m_s, 3) array of positions per species, Å.
        weights: one (*K, m_s) array of weights per species (K a batch of weight vectors sharing the points).
        scattering: per-species f(|q|) (len(points) species, in that order).
        grid: a grid or stacked windows (Å⁻¹).
        eps: NUFFT tolerance (default 1e-6 in float32, 1e-11 in float64).

    Returns:
        (*K, nx, ny, nz), or (n_windows, *K, nx, ny, nz) for stacked windows; complex.
    """
    dtype = points[0].dtype
    tol = eps if eps is not None else (1e-11 if dtype == jnp.float64 else 1e-6)

    def one(g: Grid) -> Array:
        terms = [
            _species_factor(scattering, g, s) * _nufft_block(p, w, g, tol)
            for s, (p, w) in enumerate(zip(points, weights, strict=True))
        ]
        return sum(terms[1:], terms[0])

    return _over_windows(one, grid, batched_nufft=True)


def _single(crystal, scattering, q, engine: str, eps):
    if engine != "direct":
        return _on_grid(crystal, scattering, q, engine, eps)
    if isinstance(q, Grid):
        return _direct(crystal, scattering, q.points().reshape(-1, 3)).reshape(q.shape)
    return _direct(crystal, scattering, q)


@eqx.filter_jit
def structure_factor(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    q: Grid | Float[Array, "n 3"],
    engine: Engine = "auto",
    eps: float | None = None,
) -> Complex[Array, ...]:
    """Complex structure factor F(q) of a finite crystal (electrons).

    Args:
        crystal: the crystal (positions in Å, crystal frame). Batched crystals: use `jax.vmap`.
        scattering: per-species f(|q|) matching `crystal.species_names`.
        q: a `Grid` (windows stacked along a leading axis are vmapped) or an (n, 3) array, Å⁻¹.
        engine: "auto", "direct", "separable" or "nufft" (see the module docstring).
        eps: NUFFT tolerance (default 1e-6 in float32, which delivers ~1e-5; 1e-11 in float64).

    Returns:
        (*grid.shape) or (n_windows, *grid.shape) for grids; (n,) for a q list. Complex, electrons.
    """
    resolved = choose_engine(q, engine)
    if isinstance(q, Grid) and q.centre.ndim == 2:
        one = lambda g: _single(crystal, scattering, g, resolved, eps)  # noqa: E731
        # jax-finufft batches vmapped transforms; the other engines run faster one window at a time (measured),
        # which also keeps their memory at one window's worth.
        return jax.vmap(one)(q) if resolved == "nufft" else jax.lax.map(one, q)
    return _single(crystal, scattering, q, resolved, eps)


def intensity(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    q: Grid | Float[Array, "n 3"],
    engine: Engine = "auto",
    eps: float | None = None,
) -> Float[Array, ...]:
    """|F(q)|² in electrons² (same shapes as `structure_factor`)."""
    f = structure_factor(crystal, scattering, q, engine, eps)
    return jnp.real(f) ** 2 + jnp.imag(f) ** 2
