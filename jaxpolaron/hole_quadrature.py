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
Near pairs are found per species as the K nearest atoms of each node (`lax.top_k`; K from the radius and
the atom density, so that every atom within the radius is among them; `near_pairs_complete` checks it).
"""

from __future__ import annotations

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
DEFAULT_NODES = 4096  # quadrature nodes of the mean field (docs/accurate_difference.md: convergence table)
DEFAULT_FLUCTUATION_NODES = 128  # the prefix of them used for the diffuse (fluctuation) term
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

    index: Int[Array, "h k"]  # atom index into the crystal
    weight: Float[Array, "h k"]  # w_h s_jh (0 for atoms beyond the radius)
    hole_part: Float[Array, "h k 3"]  # v_jh, Å


class HoleAverages(NamedTuple):
    """Per-atom hole averages of the hole part of the field (see the module docstring), Å-based units."""

    far_weight: Float[Array, " n"]  # p_j
    far_mean: Float[Array, "n 3"]  # v̄_j (far pairs), Å
    far_moment: Float[Array, "n 6"]  # M_j (far pairs): xx, yy, zz, xy, xz, yz, Å²
    near: tuple[NearPairs, ...]  # per species
    fluctuation: Float[Array, "f n 3"]  # (1 − s_jh) v_jh on the first f nodes, Å
    nearest_outside: Float[Array, ""]  # smallest distance of a K+1-th neighbour (must exceed the radius), Å


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


def hole_averages(
    model: RandomHole,
    crystal: Nanocrystal,
    nodes: Float[Array, "h 3"],
    *,
    n_fluctuation: int = DEFAULT_FLUCTUATION_NODES,
    near_radius: float = DEFAULT_NEAR_RADIUS,
    near_blend: float = DEFAULT_NEAR_BLEND,
) -> HoleAverages:
    """Quadrature averages over holes at `nodes` (unit-cube points r̃, (h, 3)), equal weights 1/h.

    Pure and differentiable in the model's arrays (the near-pair selection is piecewise constant, and the
    smooth switch makes the result continuous across it). Cost ~ h × n_atoms field evaluations.
    """
    n_nodes = nodes.shape[0]
    if n_nodes % _CHUNK and n_nodes > _CHUNK:
        raise InputError(f"the number of nodes ({n_nodes}) must be a multiple of {_CHUNK}.")
    n_fluctuation = min(n_fluctuation, n_nodes)
    chunk = min(_CHUNK, n_nodes)
    positions, mask = crystal.positions, crystal.mask
    scale = model.scale(crystal)
    weight = 1.0 / n_nodes
    capacity = near_capacity(crystal, near_radius)
    holes = hole_position(nodes.astype(positions.dtype), model.hole_bias, crystal.size)

    def hole_part(h):  # (c, 3) -> (c, n, 3)
        return jax.vmap(lambda r: scale[:, None] * hole_field(positions, r, model.softening))(h)

    @jax.checkpoint
    def body(h):
        v = hole_part(h)  # (c, n, 3)
        d = jnp.linalg.norm(positions[None] - h[:, None], axis=-1)  # (c, n)
        s = switch(d, near_radius, near_blend) * mask
        far = weight * (1.0 - s)
        p = jnp.sum(far, 0)
        mean = jnp.einsum("cn,cna->na", far, v)
        outer = jnp.stack([v[..., a] * v[..., b] for a, b in MOMENT_PAIRS], -1)
        moment = jnp.einsum("cn,cnm->nm", far, outer)
        near, outside = [], []
        far_away = jnp.where(mask > 0, jax.lax.stop_gradient(d), jnp.inf)
        for (a, b), k in zip(crystal.blocks, capacity, strict=True):
            kk = min(k + 1, b - a)
            _, idx = jax.lax.top_k(-far_away[:, a:b], kk)  # nearest kk atoms of this species
            if kk > k:  # the (K+1)-th nearest must lie beyond the radius
                outside.append(jnp.min(jnp.take_along_axis(far_away[:, a:b], idx[:, k:], 1)))
            idx = idx[:, :k] + a
            sel = jnp.take_along_axis(s, idx, 1)
            near.append((idx, weight * sel, jnp.take_along_axis(v, idx[..., None], 1)))
        return (p, mean, moment), near, jnp.min(jnp.stack(outside)) if outside else jnp.inf

    def step(carry, h):
        (p, mean, moment), near, outside = body(h)
        acc = jax.tree.map(jnp.add, carry[0], (p, mean, moment))
        return (acc, jnp.minimum(carry[1], outside)), near

    n = positions.shape[0]
    zeros = (jnp.zeros(n, positions.dtype), jnp.zeros((n, 3), positions.dtype), jnp.zeros((n, 6), positions.dtype))
    init = (zeros, jnp.asarray(jnp.inf, positions.dtype))
    (acc, outside), near = jax.lax.scan(step, init, holes.reshape(-1, chunk, 3))
    p, mean, moment = acc
    near = tuple(
        NearPairs(i.reshape(n_nodes, -1), w.reshape(n_nodes, -1), v.reshape(n_nodes, -1, 3)) for i, w, v in near
    )
    first = holes[:n_fluctuation]
    far = 1.0 - switch(jnp.linalg.norm(positions[None] - first[:, None], axis=-1), near_radius, near_blend)
    return HoleAverages(p, mean, moment, near, far[..., None] * hole_part(first), outside)


def near_pairs_complete(averages: HoleAverages, near_radius: float = DEFAULT_NEAR_RADIUS) -> bool:
    """True when no atom within `near_radius` of a node was left out of its near list (host-side check)."""
    return bool(np.asarray(averages.nearest_outside) >= near_radius)
