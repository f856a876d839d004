"""The random-hole ΔI at fit speed: exact hole-averaged structure factor plus a first-order diffuse term.

For one electron–hole pair, with D_h = F[u_h] − F0 the change of the structure factor for a hole at node h,

    ΔI = ⟨|F0 + D_h|²⟩ − |F0|² = 2 Re(F0* D̄) + |D̄|² + ⟨|D_h − D̄|²⟩,        D̄ = ⟨F[u]⟩ − F0        (exact)

and two pairs are the same with u → 2u (SI S2), ΔI = P1 ΔI[u] + P2 ΔI[2u]. The method:

1. D̄, the mean (coherent) part, is computed without per-hole structure factors. ⟨F[u]⟩ = Σ_j a_j ⟨e^{iθ_j}⟩ with
   a_j = f_j e^{2πi q·(r_j + e_j)} (e the electron-sphere part, the same for every hole, kept exactly) and
   θ_j = 2π q·v_j (v the hole part). Pairs (node h, atom j) closer than `near_radius` keep their exact
   displaced position: a weighted cloud of points r_j + e_j + v_jh, one per near pair, summed by a type-1 NUFFT
   (a few hundred thousand points cost less than one structure factor). The other pairs have a small phase and
   enter through their quadrature moments (θ here includes the electron part e, which is small for every ion),
   e^{iθ} ≈ 1 + iθ − θ²/2:
       Σ_j f_j e^{2πi q·r_j} (p_j + 2πi q·ū_j − 2π² qᵀ U_j q)
   i.e. nine weighted sums (three components of ū, six of U), shared by one and two pairs, by NUFFT (or the
   exact separable engine, `weighted_structure_factor`); F0 itself comes from the exact separable engine.
   Moments and near pairs come from `hole_quadrature` (deterministic Sobol nodes), so D̄ is smooth in every
   model parameter and has no PRNG seed.
2. The diffuse part ⟨|D_h − D̄|²⟩ is taken to first order in the far pairs' phases and exactly for the near
   pairs, as the sample variance over the first 128 nodes, by NUFFT (one transform per species and component,
   and one per species for each node's near pairs).
3. Small windows (the fit's 68 member windows of 7³) take another route to the same two parts, because a NUFFT
   per window and transform costs as much on a 7³ window as on a large one. Within a window of centre q_c a near
   pair's phase factor is expanded in δq = q − q_c about its exact value at q_c,
       e^{2πi m q·u} = e^{2πi m q_c·u} (1 + z δq·u + (z δq·u)²/2),   z = 2πi m,
   so every near pair becomes per-atom weights of the monomials 1, δq_a, δq_a δq_b (summed onto its atom), the
   far pairs' polynomial is rewritten in δq exactly, and one matrix product per window and species over the
   crystal's own atoms gives D̄ = Σ_α δq^α S_α (`window_mean_changes`). The diffuse part keeps its far
   transforms as one matrix product per window (three weight vectors per node) and each node's near pairs as
   a small cloud summed directly (`window_fluctuation_terms`). Measured against the NUFFT route on the fit's
   windows (voxel 2/256 Å⁻¹, 3 and 8 nm, 0.02–0.05 Å, k_Br 0.3): ΔI within 0.01–0.02 % (the expansion's
   remainder, (z |δq| |u|)³/6 for the nearest pairs); `engine` picks the route.

Why this and not the others (measured, docs/accurate_difference.md has the tables):
- The second-order expansion ("second": 2 Re(F0* F1[ū]) + ⟨|F1|²⟩ + 2 Re(F0* ⟨F2⟩)) is 5 % off the exact ΔI at
  (200) and 15 % at (400) for 0.02 Å, 24–54 % at 0.05 Å (5 nm, hole bias 0.1): a pair closer than a few Å
  to the hole moves by ~1 Å (phase of radians), where e^{iθ} is nowhere near its Taylor polynomial, and these
  pairs carry a large part of the coherent change 2 Re(F0* D̄). Hence item 1's exact near pairs.
- With the mean part exact, the diffuse part is only 0.1–6 % of ΔI (5 nm, 0.005–0.05 Å), and its first-order
  form is within 0.1–0.6 % of ΔI at ≤ 0.02 Å and 2 % at 0.05 Å of the exact diffuse part. Low-rank modes of the
  displacement covariance were not used: the hole field's near part is local, so its covariance has no short
  spectrum, and the window's Fourier content alone needs hundreds of modes at 8 nm. A Huang-type Fourier
  convolution assumes an infinite crystal and uniform holes, which the surface-biased holes (bias 0.1: all
  within ~1 Å of the surface) are not.
- Cost on the fit's windows is set by the diffuse part: 3 × 128 weighted transforms of every atom per window.
  Measured and rejected as ways to cut them: computing it on the 4 canonical windows and rotating it onto the
  other 64 members (the Pnma tilts and the pseudo-cubic distortion make members differ: up to 9.6 % of ΔI at
  (111)); a low-rank basis of the nodes' far fields (the top 32 of 128 singular vectors hold 60–90 % of the
  variance, so no short spectrum); fewer nodes (64: up to 0.85 % of ΔI at 3 nm (111), 32: up to 1.7 %, against
  0.67 % at 128; a smaller near radius: 6 Å moves ΔI by up to 4.7 %).
Error model: (a) quadrature error of the node average, measured by changing the Sobol scramble and the node
count; (b) Taylor error of far pairs, third order in θ at the near radius; (c) the neglected higher orders of the
diffuse part (second order in δv); (d) the NUFFT tolerance (1e-6 relative to the cloud's own size).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.charge_field import RandomHole
from jaxpolaron.errors import InputError
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import (
    DEFAULT_FAR_NODES,
    DEFAULT_FLUCTUATION_NODES,
    DEFAULT_NEAR_BLEND,
    DEFAULT_NEAR_RADIUS,
    MOMENT_PAIRS,
    HoleAverages,
    hole_averages,
)
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors
from jaxpolaron.structure_factor import (
    _complex_dtype,
    _species_factor,
    cloud_structure_factor,
    structure_factor,
    weighted_structure_factor,
    window_structure_factor,
)

TWO_PI = 2.0 * math.pi
_FLUCTUATION_CHUNK = 16
# windows of at most this many voxels (the fit's 7³) take the per-window path (module docstring, item 3), if
# every voxel lies within WINDOW_REACH of its window's centre: the expansion's remainder grows as |δq|³ (0.01–0.02 %
# of ΔI measured at the fit's 0.041 Å⁻¹, so ≲ 0.06 % at 0.06 Å⁻¹)
SMALL_WINDOW_VOXELS = 11**3
WINDOW_REACH = 0.06  # Å⁻¹


def window_reach(grid: Grid) -> Array:
    """The largest |q − centre| of any voxel of the grid's windows, Å⁻¹ (traceable)."""
    half = jnp.asarray([(n - 1) / 2 for n in grid.shape], grid.voxel.dtype)
    return jnp.max(jnp.linalg.norm(grid.voxel.reshape(-1, 3) * half, axis=-1))


def accurate_engine(grid: Grid) -> str:
    """The route for a concrete grid (host side): "window" for small windows within `WINDOW_REACH`, else "cloud".
    Callers that know their grid pick the route with it; under a trace "auto" can only look at the shape."""
    small = math.prod(grid.shape) <= SMALL_WINDOW_VOXELS
    return "window" if small and float(window_reach(grid)) <= WINDOW_REACH else "cloud"


_FLUCTUATION_EPS = 1e-4
# the near pairs' clouds: the default tolerance. Their displaced and undisplaced sums nearly cancel at small
# amplitudes, so 1e-4 of the cloud's size would be ~1 % of ΔI at 0.005 Å (measured); 1e-6 is not slower here.
_NEAR_EPS = None  # fluctuation nodes per NUFFT batch (memory ~ chunk × 3 × windows × grid)


# A (10 Å)² max_s |q_s| / k_s, Å: the largest displacement scale measured against the exact ΔI (0.05 Å with
# k = 1 at Pb: ≤ 1.6 %; k_Br = 0.3 at 0.05 Å reaches 0.167 and 2.7 %). Beyond it the far pairs' Taylor terms
# are untested.
VALIDATED_DISPLACEMENT_SCALE = 0.1


def outside_validated_range(model: RandomHole) -> str | None:
    """A warning (host-side, concrete model) when `model` displaces ions more than the accurate method was
    measured for (`VALIDATED_DISPLACEMENT_SCALE`), else None."""
    scale = float(model.amplitude) * float(np.max(np.abs(np.asarray(model.charges) / np.asarray(model.k))))
    if scale <= VALIDATED_DISPLACEMENT_SCALE * (1.0 + 1e-6):  # float32 rounding of 0.05 × 2
        return None
    return (
        f"the accurate ΔI was measured up to amplitude × max|q/k| = {VALIDATED_DISPLACEMENT_SCALE} Å (0.05 Å with "
        f"k = 1); this model has {scale:.3g} Å: check against --exact before relying on it."
    )


def _abs2(z: Array) -> Array:
    return jnp.real(z) ** 2 + jnp.imag(z) ** 2


def _axes(grid: Grid) -> tuple[Array, Array, Array]:
    """q along x, y, z broadcastable against (n_windows?, K, nx, ny, nz) outputs."""
    qx, qy, qz = grid.axes()
    lead = qx.shape[:-1]
    return (
        qx.reshape(*lead, 1, -1, 1, 1),
        qy.reshape(*lead, 1, 1, -1, 1),
        qz.reshape(*lead, 1, 1, 1, -1),
    )


def _species_points(crystal: Nanocrystal, positions: Array, weights: Array) -> tuple[tuple, tuple]:
    """Per-species (positions, weights[..., block]) for `cloud_structure_factor`."""
    pts = tuple(positions[a:b] for a, b in crystal.blocks)
    ws = tuple(weights[..., a:b] for a, b in crystal.blocks)
    return pts, ws


def far_moments(averages: HoleAverages, electron: Float[Array, "n 3"]) -> Array:
    """(10, n) weights: 1, then the far pairs' moments of the whole displacement u = e + v.

    Σ_h w_h (1 − s_jh) u = p e + v̄ (3 rows), Σ_h w_h (1 − s_jh) u uᵀ = p e eᵀ + e v̄ᵀ + v̄ eᵀ + M (6 rows: xx, yy,
    zz, xy, xz, yz). The mask row gives F0 in the same pass.
    """
    p, vbar, m = averages.far_weight, averages.far_mean, averages.far_moment
    e = electron
    mean = p[:, None] * e + vbar
    second = (
        jnp.stack(
            [p * e[:, a] * e[:, b] + e[:, a] * vbar[:, b] + vbar[:, a] * e[:, b] for a, b in MOMENT_PAIRS], axis=1
        )
        + m
    )
    return jnp.concatenate([jnp.ones_like(p)[None], mean.T, second.T], axis=0)


def mean_changes(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    electron: Float[Array, "n 3"],
    averages: HoleAverages,
    factors: tuple[float, ...],
    moments_engine: str = "nufft",
) -> tuple[Array, list[Array]]:
    """F0 and D̄ = ⟨F[m·u]⟩ − F0 for each factor m (one pair: 1, two pairs: 2) on the grid (module docstring,
    item 1); complex, electrons. The far pairs' moments are weighted sums shared by all factors: by NUFFT
    (`moments_engine="nufft"`, ~1e-5 relative: D̄ is computed directly, never as a difference of large structure
    factors, so that error stays ~1e-5 of ΔI) or by the exact separable engine; F0 is always exact."""
    weights = far_moments(averages, electron) * crystal.mask[None]
    if moments_engine == "separable":
        s = weighted_structure_factor(crystal, scattering, grid, weights)
    else:
        pts, ws = _species_points(crystal, crystal.positions, weights[1:])
        s = cloud_structure_factor(pts, ws, scattering, grid)
        f0_exact = structure_factor(crystal, scattering, grid, "separable")
        s = jnp.concatenate([jnp.expand_dims(f0_exact, -4), s], axis=-4)
    qx, qy, qz = (x[..., 0, :, :, :] for x in _axes(grid))  # drop the K axis
    take = lambda i: s[..., i, :, :, :]  # noqa: E731
    f0 = take(0)
    first = TWO_PI * 1j * (qx * take(1) + qy * take(2) + qz * take(3))
    second = (
        -2.0
        * math.pi**2
        * (
            qx**2 * take(4)
            + qy**2 * take(5)
            + qz**2 * take(6)
            + 2.0 * qx * qy * take(7)
            + 2.0 * qx * qz * take(8)
            + 2.0 * qy * qz * take(9)
        )
    )
    # near pairs enter with their exact displaced points; the mask row above counted their weight
    # (Σ_h w_h s_jh = 1 − p_j) at the undisplaced sites, which the same NUFFT takes off again
    pts, ws = _species_points(crystal, crystal.positions, (1.0 - averages.far_weight) * crystal.mask)
    undisplaced = cloud_structure_factor(pts, ws, scattering, grid, _NEAR_EPS)
    changes = []
    for m in factors:
        clouds_p, clouds_w = [], []
        for pairs in averages.near:
            u = electron[pairs.atom] + pairs.hole_part  # (h, k, 3)
            clouds_p.append((crystal.positions[pairs.atom] + m * u).reshape(-1, 3))
            clouds_w.append(pairs.weight.reshape(-1))
        near = cloud_structure_factor(tuple(clouds_p), tuple(clouds_w), scattering, grid, _NEAR_EPS) - undisplaced
        changes.append(m * first + m**2 * second + near)
    return f0, changes


def fluctuation_terms(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    averages: HoleAverages,
    factors: tuple[float, ...],
) -> list[Array]:
    """The diffuse term ⟨|X_h − X̄|²⟩ over the fluctuation nodes for each factor m (module docstring, item 2).

    X_h = Σ_j a_j [(1 − s_jh) i m θ_jh + s_jh (e^{i m θ_jh} − 1)]: first order in the far pairs' phases, exact for
    the near pairs (whose phases are radians: a first-order |F1|² would overcount them); the variance is the sample
    variance over the nodes. Real, electrons², one array per factor. NUFFT tolerance 1e-4: the term is a few % of
    ΔI, so 1e-4 of it is negligible.
    """
    positions = crystal.positions
    far = averages.fluctuation  # (f, n, 3)
    n_f = far.shape[0]
    n_nodes = averages.near[0].weight.shape[0]
    chunk = math.gcd(n_f, _FLUCTUATION_CHUNK)
    qx, qy, qz = _axes(grid)

    def near_cloud(points, weights):  # one node's near pairs: Σ s f (e^{2πiq·(r + m v)} − e^{2πiq·r})
        return cloud_structure_factor(points, weights, scattering, grid, _FLUCTUATION_EPS)

    def one_chunk(args):  # c nodes -> per factor (Σ X, Σ |X|²) over them, on the grid
        v_far, near = args
        pts, ws = _species_points(crystal, positions, jnp.moveaxis(v_far, -1, 1))  # strengths (c, 3, n)
        t = cloud_structure_factor(pts, ws, scattering, grid, _FLUCTUATION_EPS)  # (..., c, 3, nx, ny, nz)
        first = TWO_PI * 1j * (qx * t[..., 0, :, :, :] + qy * t[..., 1, :, :, :] + qz * t[..., 2, :, :, :])
        out = []
        for m in factors:
            points = tuple(jnp.concatenate([positions[i] + m * v, positions[i]], axis=1) for i, _, v in near)
            weights = tuple(jnp.concatenate([s, -s], axis=1) for _, s, _ in near)
            x = m * first + jnp.moveaxis(jax.vmap(near_cloud)(points, weights), 0, -4)
            out.append((jnp.sum(x, axis=-4), jnp.sum(_abs2(x), axis=-4)))
        return out

    near = tuple((p.atom[:n_f], p.weight[:n_f] * n_nodes, p.hole_part[:n_f]) for p in averages.near)
    split = lambda a: a.reshape(n_f // chunk, chunk, *a.shape[1:])  # noqa: E731
    per_chunk = jax.lax.map(one_chunk, (split(far), jax.tree.map(split, near)))
    terms = []
    for sums, squares in per_chunk:
        total, total2 = jnp.sum(sums, axis=0), jnp.sum(squares, axis=0)
        terms.append((total2 - _abs2(total) / n_f) / max(n_f - 1, 1))
    return terms


# monomials δq^α of the window expansion (module docstring, "small windows"), by order
_MONOMIALS = (
    ((0, 0, 0),),
    ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)),
    ((3, 0, 0), (0, 3, 0), (0, 0, 3), (2, 1, 0), (2, 0, 1), (1, 2, 0), (0, 2, 1), (1, 0, 2), (0, 1, 2), (1, 1, 1)),
)


def _monomials(order: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(a for level in _MONOMIALS[: order + 1] for a in level)


def _power(x: Array, alpha: tuple[int, int, int]) -> Array:
    """x^α = Π_a x[..., a]^α_a for (..., 3) arrays."""
    out = jnp.ones(x.shape[:-1], x.dtype)
    for a, k in enumerate(alpha):
        if k:
            out = out * x[..., a] ** k
    return out


def _near_concat(crystal: Nanocrystal, electron: Array, averages: HoleAverages) -> tuple[Array, Array, Array]:
    """All species' near pairs as flat arrays: atom (P,), weight (P,), displacement u = e + v (P, 3)."""
    atom = jnp.concatenate([p.atom.reshape(-1) for p in averages.near])
    weight = jnp.concatenate([p.weight.reshape(-1) for p in averages.near])
    hole = jnp.concatenate([p.hole_part.reshape(-1, 3) for p in averages.near])
    return atom, weight, electron[atom] + hole


def _window_offsets(g: Grid) -> Array:
    """δq = q − centre along each axis of one window: (3, m) (the axes' offsets from the window centre)."""
    return jnp.stack([axis - c for axis, c in zip(g.axes(), g.centre, strict=True)])


def window_mean_changes(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    electron: Float[Array, "n 3"],
    averages: HoleAverages,
    factors: tuple[float, ...],
    order: int = 2,
) -> tuple[Array, list[Array]]:
    """F0 and D̄ for each factor m on small windows, as `mean_changes`, with the near pairs expanded per window.

    Within a window of centre q_c, a near pair's phase factor is e^{z q·u} = e^{z q_c·u} Σ_n (z δq·u)^n / n!
    (z = 2πi m, δq = q − q_c), summed to `order`: every pair then contributes per-atom weights for the monomials
    δq^α, so the near clouds reduce to weights on the crystal's own atoms, and the far pairs' polynomial
    (module docstring, item 1) is rewritten in δq the same way (exactly: it is of second order). One matrix
    product per window and species (`window_structure_factor`) then gives every monomial's sum S_α, and
    D̄(q) = Σ_α δq^α S_α(q). The remainder is (z |δq| |u|)^{order+1} / (order+1)! of a near pair's term.
    """
    monomials = _monomials(order)
    atom, weight, u = _near_concat(crystal, electron, averages)
    n = crystal.positions.shape[0]
    far = far_moments(averages, electron)  # (10, n): 1, mean (3), second moments (6: MOMENT_PAIRS order)
    mean = far[1:4].T  # (n, 3)
    second = jnp.zeros((n, 3, 3), far.dtype)
    for i, (a, b) in enumerate(MOMENT_PAIRS):
        second = second.at[:, a, b].set(far[4 + i]).at[:, b, a].set(far[4 + i])
    mask = crystal.mask
    cdt = _complex_dtype(crystal.positions)
    # window-independent parts: a near pair's monomial w u^α / α! (its factor z^|α| is applied per atom), and
    # Σ_h w_h s_jh = 1 − p_j, the "− 1" of every near pair's e^{iθ} − 1
    basis = jnp.stack([weight * _power(u, a) / math.prod(math.factorial(x) for x in a) for a in monomials], axis=1)
    near_mass = 1.0 - averages.far_weight

    def far_part(alpha: tuple[int, int, int], z: complex, qc: Array, u_qc: Array) -> Array | float:
        """The far pairs' z q·ū + z²/2 qᵀUq rewritten in δq = q − q_c: the coefficient of δq^α, per atom."""
        k = sum(alpha)
        if k == 0:
            return z * (mean @ qc) + 0.5 * z**2 * (u_qc @ qc)
        if k == 1:
            a = alpha.index(1)
            return z * mean[:, a] + z**2 * u_qc[:, a]
        if k == 2:
            a, b = [ax for ax, x in enumerate(alpha) for _ in range(x)]
            return z**2 * second[:, a, b] / (2.0 if a == b else 1.0)
        return 0.0

    def weights_of(g: Grid, _) -> Array:
        qc = g.centre
        phase = jnp.exp(TWO_PI * 1j * (u @ qc))  # e^{2πi q_c·u} per pair; its m-th power for m pairs
        phases = [phase ** int(m) if float(m).is_integer() else jnp.exp(TWO_PI * 1j * m * (u @ qc)) for m in factors]
        per_atom = jax.ops.segment_sum(
            jnp.concatenate([ph[:, None] * basis for ph in phases], axis=1), atom, n
        )  # (n, F·M)
        u_qc = second @ qc
        rows = [mask.astype(cdt)]  # F0
        for i_m, m in enumerate(factors):
            z = TWO_PI * 1j * m
            for i, alpha in enumerate(monomials):
                w = z ** sum(alpha) * per_atom[:, i_m * len(monomials) + i] + far_part(alpha, z, qc, u_qc)
                rows.append((w - near_mass if i == 0 else w) * mask)
        return jnp.stack(rows)

    sums = window_structure_factor(crystal, scattering, grid, weights_of)  # (w, 1 + F·M, m, m, m)
    offsets = jax.vmap(_window_offsets)(grid) if grid.centre.ndim == 2 else _window_offsets(grid)
    dx = offsets[..., 0, :, None, None]
    dy = offsets[..., 1, None, :, None]
    dz = offsets[..., 2, None, None, :]
    f0 = sums[..., 0, :, :, :]
    changes = []
    for i_m in range(len(factors)):
        start = 1 + i_m * len(monomials)
        d = jnp.zeros_like(f0)
        for i, (ax, ay, az) in enumerate(monomials):
            d = d + dx**ax * dy**ay * dz**az * sums[..., start + i, :, :, :]
        changes.append(d)
    return f0, changes


def window_fluctuation_terms(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    averages: HoleAverages,
    factors: tuple[float, ...],
) -> list[Array]:
    """`fluctuation_terms` on small windows: the far parts by one matrix product per window (3 weight vectors
    per node), each node's near pairs as its own small cloud of displaced and undisplaced points."""
    positions = crystal.positions
    far = averages.fluctuation  # (f, n, 3)
    n_f = far.shape[0]
    n_nodes = averages.near[0].weight.shape[0]
    near = [(p.atom[:n_f], p.weight[:n_f] * n_nodes, p.hole_part[:n_f]) for p in averages.near]
    far_weights = jnp.moveaxis(far, -1, 1).reshape(n_f * 3, -1)  # rows (node, component)

    def cloud(g: Grid, points: Array, weights: Array) -> Array:
        """Σ_k w_hk e^{2πi q·p_hk} per node h: (f, m, m, m) for points (f, k, 3)."""
        qx, qy, qz = g.axes()
        ex = jnp.exp(TWO_PI * 1j * points[..., 0:1] * qx) * weights[..., None]
        ey = jnp.exp(TWO_PI * 1j * points[..., 1:2] * qy)
        ez = jnp.exp(TWO_PI * 1j * points[..., 2:3] * qz)
        return jnp.einsum("hka,hkb,hkc->habc", ex, ey, ez)

    def one(g: Grid) -> Array:
        t = window_structure_factor(crystal, scattering, g, lambda *_: far_weights)
        t = t.reshape(n_f, 3, *g.shape)
        qx, qy, qz = (x.reshape(shape) for x, shape in zip(g.axes(), ((-1, 1, 1), (1, -1, 1), (1, 1, -1)), strict=True))
        first = TWO_PI * 1j * (qx * t[:, 0] + qy * t[:, 1] + qz * t[:, 2])  # (f, m, m, m)
        # per species: f_s(q), the near atoms' sites and their undisplaced cloud (the same for every factor)
        species = []
        for s, (atom, w, v) in enumerate(near):
            pts = positions[atom]
            species.append((_species_factor(scattering, g, s), pts, w, v, cloud(g, pts, w)))
        out = []
        for m in factors:
            x = m * first
            for f_s, pts, w, v, undisplaced in species:
                x = x + f_s * (cloud(g, pts + m * v, w) - undisplaced)
            out.append((jnp.sum(x, axis=0), jnp.sum(_abs2(x), axis=0)))
        return jnp.stack([jnp.stack([b, _abs2(a)]) for a, b in out])  # (F, 2, m, m, m): Σ|X|², |ΣX|²

    per_window = jax.lax.map(one, grid) if grid.centre.ndim == 2 else one(grid)
    terms = []
    for i in range(len(factors)):
        total2, abs_total = per_window[..., i, 0, :, :, :], per_window[..., i, 1, :, :, :]
        terms.append((total2 - abs_total / n_f) / max(n_f - 1, 1))
    return terms


@eqx.filter_jit
def accurate_difference(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    grid: Grid,
    model: RandomHole,
    occupancy: Occupancy,
    nodes: Float[Array, "h 3"],
    *,
    n_far: int = DEFAULT_FAR_NODES,
    n_fluctuation: int = DEFAULT_FLUCTUATION_NODES,
    near_radius: float = DEFAULT_NEAR_RADIUS,
    near_blend: float = DEFAULT_NEAR_BLEND,
    engine: str = "auto",
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Dark intensity and pumped − dark ΔI of one random-hole crystal (module docstring), electrons².

    Args:
        crystal, scattering: the crystal and its per-species f(|q|).
        grid: a grid or stacked hkl windows (Å⁻¹); q lists are not supported.
        model: a `RandomHole`.
        occupancy: pair probabilities (P0, P1, P2).
        nodes: (h, 3) unit-cube quadrature nodes r̃ (`hole_quadrature.sobol_nodes`), h a multiple of 32.
        n_far: nodes (a prefix) used for the far pairs' moments.
        n_fluctuation: nodes (a prefix) used for the diffuse term.
        near_radius, near_blend: Å; pairs closer than the radius are exact (module docstring).
        engine: "window" (per-window expansion and matrix products, item 3; NaN where a voxel lies beyond
            `WINDOW_REACH` of its window's centre), "cloud" (NUFFTs of the point clouds) or "auto": "window" for
            windows of at most `SMALL_WINDOW_VOXELS` voxels (`accurate_engine` also checks the reach, host side).

    Returns:
        (I_dark, ΔI), shaped like the grid (stacked windows lead), float.
    """
    if not isinstance(model, RandomHole):
        raise InputError(f"the accurate method is for the random-hole model, not {type(model).__name__}.")
    if not isinstance(grid, Grid):
        raise InputError("the accurate method needs grid-aligned q (windows or a grid), not a q list.")
    if engine not in ("auto", "window", "cloud"):
        raise InputError(f"engine must be 'auto', 'window' or 'cloud', got {engine!r}.")
    p = occupancy.probabilities()
    averages = hole_averages(
        model,
        crystal,
        nodes,
        n_far=n_far,
        n_fluctuation=n_fluctuation,
        near_radius=near_radius,
        near_blend=near_blend,
    )
    electron = model.electron_displacement(crystal)
    factors = (1.0, 2.0)  # one and two pairs (SI S2)
    if engine == "window" or (engine == "auto" and math.prod(grid.shape) <= SMALL_WINDOW_VOXELS):
        diffuse = window_fluctuation_terms(crystal, scattering, grid, averages, factors)
        f0, changes = window_mean_changes(crystal, scattering, grid, electron, averages, factors)
        # beyond its reach the expansion is untested: NaN, never a quietly wrong ΔI (pick engine="cloud")
        valid = window_reach(grid) <= WINDOW_REACH * (1.0 + 1e-6)
        changes = [jnp.where(valid, d, jnp.nan) for d in changes]
    else:
        diffuse = fluctuation_terms(crystal, scattering, grid, averages, factors)
        f0, changes = mean_changes(crystal, scattering, grid, electron, averages, factors)
    diff = jnp.zeros(diffuse[0].shape, diffuse[0].dtype)
    for prob, d, fluct in zip((p[1], p[2]), changes, diffuse, strict=True):
        diff = diff + prob * (2.0 * jnp.real(jnp.conj(f0) * d) + _abs2(d) + fluct)
    return _abs2(f0), diff
