"""Hole averages of the random-hole displacement field by deterministic quadrature.

A random-hole crystal's displacement is u_j(r_h) = e_j + v_j(r_h): the electron-sphere part e_j is the same
for every hole, the hole part v_j = c_j E_h(r_j − r_h) (c_j = A (10 Å)² q_s / k_s, `RandomHole.scale`) depends on
where the hole is. The hole position is r_h = r̃ ‖r̃‖₅^(b−1) s/2 with r̃ uniform in [−1, 1]³ (Eqs. 3–4,
`hole_position`), so an average over holes is an integral over the unit cube, taken here with a fixed
quadrature rule: the first n points of a scrambled Sobol sequence (scipy.stats.qmc.Sobol, d = 3, Owen scrambling
with seed `SOBOL_SEED`), equal weights 1/n, n a power of two. The points are constants of the program, so every
average is a deterministic, smooth function of hole_bias, amplitude, springs, electron strength and softening;
a different scramble seed gives an independent rule of the same quality, which is how the quadrature error
is measured (docs/accurate_difference.md).

What is averaged, per atom j (the ΔI assembly is `jaxpolaron.accurate_difference`):
- near pairs (atom j within `near_radius` of node h): kept one by one (the atom's exact displaced position
  enters the ΔI), blended out smoothly between `near_radius - near_blend` and `near_radius` by a weight s_jh;
- far pairs, weight (1 − s_jh): only their moments are needed,
      p_j = Σ_h w_h (1 − s_jh),  v̄_j = Σ_h w_h (1 − s_jh) v_jh,  M_j = Σ_h w_h (1 − s_jh) v_jh v_jhᵀ,
  because for them the phase 2π q·v is small and e^{iθ} = 1 + iθ − θ²/2 to third order;
- fluctuations: the far part (1 − s_jh) v_jh on a prefix of the nodes (with the near lists, the diffuse term).
Near pairs use all nodes (the near part varies on the atomic scale), the far moments the first 1024 (a smooth
integrand; a Sobol prefix of a power of two is itself a balanced rule). Near pairs are found per species among
the atoms of the 27 cells (edge >= the radius) around each node, as its K nearest (`lax.top_k`; K from the radius
and the atom density, so that every atom within the radius is among them; `near_pairs_complete` checks it).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.charge_field import RandomHole, hole_field, hole_position
from jaxpolaron.errors import InputError

SOBOL_SEED = 20261207  # the scramble of the default rule (any seed gives a rule of the same quality)
DEFAULT_NODES = 4096  # quadrature nodes of the near pairs (docs/accurate_difference.md: convergence table)
DEFAULT_FAR_NODES = 1024  # the prefix of them used for the far pairs' moments
DEFAULT_FLUCTUATION_NODES = 128  # the prefix of them used for the diffuse term (32: up to 1.2 % error at 3 nm)
DEFAULT_NEAR_RADIUS = 8.0  # Å: pairs closer than this are treated exactly (blended out over the last 2 Å)
DEFAULT_NEAR_BLEND = 2.0  # Å
ATOM_DENSITY = 0.0246  # atoms per Å³ in CsPbBr3 (20 atoms in 813 Å³); sizes the near-pair lists
MOMENT_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # the six components of a symmetric 3×3
_CHUNK = 32  # nodes per scan step (memory ~ chunk × n_atoms × 3)


def valid_node_count(n: int) -> bool:
    """A usable number of quadrature nodes: a power of two, at least one scan chunk (32)."""
    return n >= _CHUNK and not n & (n - 1)


def sobol_nodes(n: int, *, seed: int = SOBOL_SEED, dtype=None) -> Float[Array, "n 3"]:
    """The first n points (n a power of two) of a scrambled 3D Sobol sequence mapped to [−1, 1]³."""
    from scipy.stats import qmc

    if n < 1 or n & (n - 1):
        raise InputError(f"the number of quadrature nodes must be a power of two, got {n}.")
    points = qmc.Sobol(d=3, scramble=True, seed=seed).random_base2(int(math.log2(n)))
    return jnp.asarray(2.0 * points - 1.0, dtype or jnp.result_type(float))


class NearPairs(NamedTuple):
    """The exactly treated (node, atom) pairs of one species: (n_nodes, K) each."""

    atom: Int[Array, "h k"]  # atom index into the crystal
    weight: Float[Array, "h k"]  # w_h s_jh (0 for atoms beyond the radius)
    hole_part: Float[Array, "h k 3"]  # v_jh, Å


class HoleAverages(NamedTuple):
    """Per-atom hole averages of the hole part of the field (see the module docstring), Å-based units."""

    far_weight: Float[Array, " n"]  # p_j = 1 − Σ_h w_h s_jh (near pairs' nodes)
    far_mean: Float[Array, "n 3"]  # v̄_j (far pairs), Å
    far_moment: Float[Array, "n 6"]  # M_j (far pairs): xx, yy, zz, xy, xz, yz, Å²
    near: tuple[NearPairs, ...]  # per species
    fluctuation: Float[Array, "f n 3"]  # (1 − s_jh) v_jh on the first f nodes, Å
    nearest_outside: Float[Array, ""]  # smallest distance of a K+1-th neighbour (must exceed the radius), Å;
    # −inf when a cell held more atoms than its table (atoms would have been missed)


def near_capacity(crystal: Nanocrystal, radius: float) -> tuple[int, ...]:
    """K per species: 1.6× the expected atoms of that species within `radius` (+8), at most the block size."""
    names = crystal.species_names
    sizes = [b - a for a, b in crystal.blocks]
    total = max(sum(sizes), 1)
    expected = ATOM_DENSITY * 4.0 / 3.0 * math.pi * radius**3
    return tuple(min(n, int(1.6 * expected * n / total) + 8) for n in sizes[: len(names)])


def switch(distance: Array, radius: float, blend: float) -> Array:
    """Smooth step s(d): 1 for d ≤ radius − blend, 0 for d ≥ radius, quintic (C²) in between."""
    t = jnp.clip((radius - distance) / blend, 0.0, 1.0)
    return t * t * t * (10.0 - 15.0 * t + 6.0 * t * t)


class _Cells(NamedTuple):
    """Atoms of one species binned into cubic cells (built inside jit with static shapes)."""

    origin: Array  # (3,) Å, corner of cell (0, 0, 0)
    size: Array  # () Å, cell edge (>= the near radius)
    table: Array  # (n_c³, M) atom indices into the block, `sentinel` where a cell has fewer atoms
    overflow: Array  # () bool: some cell had more than M atoms (then atoms would be missed)


def _bin_atoms(block: Array, mask: Array, radius: float, dims: int, capacity: int) -> _Cells:
    """Bin a species block's atoms (n_s, 3) into dims³ cells of edge max(radius, extent / dims)."""
    n_s = block.shape[0]
    real = mask > 0
    lo = jnp.min(jnp.where(real[:, None], block, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(real[:, None], block, -jnp.inf), axis=0)
    size = jnp.maximum(radius, jnp.max(hi - lo) / dims * (1.0 + 1e-6))
    ijk = jnp.clip(jnp.floor((block - lo) / size).astype(jnp.int32), 0, dims - 1)
    key = jnp.where(real, (ijk[:, 0] * dims + ijk[:, 1]) * dims + ijk[:, 2], dims**3)  # padding: past the end
    order = jnp.argsort(key)
    sorted_key = key[order]
    start = jnp.searchsorted(sorted_key, jnp.arange(dims**3 + 1))
    count = start[1:] - start[:-1]
    slot = start[:-1, None] + jnp.arange(capacity)[None]  # (n_c³, M)
    table = jnp.where(jnp.arange(capacity)[None] < count[:, None], order[jnp.clip(slot, 0, n_s - 1)], n_s)
    return _Cells(lo, size, table, jnp.max(count) > capacity)


def _cell_layout(crystal: Nanocrystal, radius: float) -> tuple[int, tuple[int, ...]]:
    """Static cells per axis and atoms per cell of each species, from the (static) atom counts.

    The crystal's edge is estimated from its atom count (superellipsoid p = 5: volume ≈ 0.94 s³); padding can only
    make the real crystal smaller, which makes cells no larger than estimated here (edge >= radius always).
    """
    sizes = [b - a for a, b in crystal.blocks]
    total = max(sum(sizes), 1)
    edge = (total / (ATOM_DENSITY * 0.94)) ** (1.0 / 3.0)
    dims = max(1, int(edge // radius))
    cell = max(radius, edge / dims)
    per_cell = ATOM_DENSITY * cell**3
    return dims, tuple(min(n, int(2.0 * per_cell * n / total) + 8) for n in sizes)


def hole_averages(
    model: RandomHole,
    crystal: Nanocrystal,
    nodes: Float[Array, "h 3"],
    *,
    n_far: int = DEFAULT_FAR_NODES,
    n_fluctuation: int = DEFAULT_FLUCTUATION_NODES,
    near_radius: float = DEFAULT_NEAR_RADIUS,
    near_blend: float = DEFAULT_NEAR_BLEND,
) -> HoleAverages:
    """Quadrature averages over holes at `nodes` (unit-cube points r̃, (h, 3)), equal weights.

    Near pairs use all h nodes (the near part varies on the atomic scale and needs them); the far moments use
    the first `n_far` (a Sobol prefix of a power of two is itself a balanced rule; the far part is smooth and
    converges much faster), so their cost is n_far × n_atoms. Near pairs are found through cells of atoms
    (27 cells around the node, then the nearest K), not by a search over all atoms. Pure and differentiable in
    the model's arrays (the pair selection is piecewise constant; the smooth switch keeps the result continuous).
    """
    n_nodes = nodes.shape[0]
    if not valid_node_count(n_nodes):
        raise InputError(f"the number of quadrature nodes must be a power of two >= {_CHUNK}, got {n_nodes}.")
    n_far = min(n_far, n_nodes)
    n_fluctuation = min(n_fluctuation, n_nodes)
    positions, mask = crystal.positions, crystal.mask
    dtype = positions.dtype
    scale = model.scale(crystal)
    capacity = near_capacity(crystal, near_radius)
    holes = hole_position(nodes.astype(dtype), model.hole_bias, crystal.size)

    def hole_part(h):  # (c, 3) -> (c, n, 3)
        return jax.vmap(lambda r: scale[:, None] * hole_field(positions, r, model.softening))(h)

    # ---- far moments: the first n_far nodes, all atoms
    @jax.checkpoint
    def far_body(h):
        v = hole_part(h)  # (c, n, 3)
        s = switch(jnp.linalg.norm(positions[None] - h[:, None], axis=-1), near_radius, near_blend) * mask
        far = (1.0 - s) / n_far
        outer = jnp.stack([v[..., a] * v[..., b] for a, b in MOMENT_PAIRS], -1)
        return jnp.einsum("cn,cna->na", far, v), jnp.einsum("cn,cnm->nm", far, outer)

    def far_step(acc, h):
        return jax.tree.map(jnp.add, acc, far_body(h)), None

    n = positions.shape[0]
    zeros = (jnp.zeros((n, 3), dtype), jnp.zeros((n, 6), dtype))
    chunk = min(_CHUNK, n_far)
    (mean, moment), _ = jax.lax.scan(far_step, zeros, holes[:n_far].reshape(-1, chunk, 3))

    # ---- near pairs: every node, the K nearest atoms of each species among 27 cells around it
    dims, per_cell = _cell_layout(crystal, near_radius)
    offsets = jnp.asarray(list(itertools.product((-1, 0, 1), repeat=3)), jnp.int32)  # (27, 3)
    near, overflow, outside = [], [], []
    for (a, b), k, m_cell in zip(crystal.blocks, capacity, per_cell, strict=True):
        block, block_mask, block_scale = positions[a:b], mask[a:b], scale[a:b]
        cells = _bin_atoms(jax.lax.stop_gradient(block), block_mask, near_radius, dims, m_cell)
        overflow.append(cells.overflow)
        kk = min(k + 1, 27 * m_cell)

        def one_node(h, a=a, block=block, block_mask=block_mask, block_scale=block_scale, cells=cells, k=k, kk=kk):
            ijk = jnp.floor((jax.lax.stop_gradient(h) - cells.origin) / cells.size).astype(jnp.int32)
            nb = jnp.clip(ijk[None] + offsets, 0, dims - 1)
            # clipping can repeat a cell at the grid's edge: keep each cell once
            key = (nb[:, 0] * dims + nb[:, 1]) * dims + nb[:, 2]
            first = jnp.all(jnp.triu(key[:, None] != key[None, :], 1) | jnp.tril(jnp.ones((27, 27), bool)), axis=0)
            cand = jnp.where(first[:, None], cells.table[key], block.shape[0]).reshape(-1)  # (27 M,)
            safe = jnp.minimum(cand, block.shape[0] - 1)
            valid = (cand < block.shape[0]) & (block_mask[safe] > 0)
            d = jnp.linalg.norm(block[safe] - h, axis=-1)
            dist = jnp.where(valid, jax.lax.stop_gradient(d), jnp.inf)
            _, pick = jax.lax.top_k(-dist, kk)
            beyond = dist[pick[k]] if kk > k else jnp.asarray(jnp.inf, dtype)
            idx = safe[pick[:k]]
            sel = switch(d[pick[:k]], near_radius, near_blend) * valid[pick[:k]]
            v = block_scale[idx, None] * jax.vmap(lambda r: hole_field(r[None], h, model.softening)[0])(block[idx])
            return idx + a, sel / n_nodes, v, beyond

        idx, w, v, beyond = jax.lax.map(one_node, holes, batch_size=_CHUNK)
        near.append(NearPairs(idx, w, v))
        outside.append(jnp.min(beyond))
    # p_j from the near pairs' own nodes: the electron part e_j, the same for every hole, then gets total weight
    # exactly 1 (far p_j + near Σ w s = 1); the far nodes' estimate of p_j would leave a quadrature error on it
    near_mass = jnp.zeros(n, dtype)
    for pairs in near:
        near_mass = near_mass.at[pairs.atom.reshape(-1)].add(pairs.weight.reshape(-1))
    p = (1.0 - near_mass) * mask
    first = holes[:n_fluctuation]
    far = 1.0 - switch(jnp.linalg.norm(positions[None] - first[:, None], axis=-1), near_radius, near_blend)
    return HoleAverages(
        p,
        mean,
        moment,
        tuple(near),
        far[..., None] * mask[None, :, None] * hole_part(first),
        jnp.where(jnp.any(jnp.stack(overflow)), -jnp.inf, jnp.min(jnp.stack(outside))),
    )


def near_pairs_complete(averages: HoleAverages, near_radius: float = DEFAULT_NEAR_RADIUS) -> bool:
    """True when no atom within `near_radius` of a node was left out of its near list (host-side check)."""
    return bool(np.asarray(averages.nearest_outside) >= near_radius)
