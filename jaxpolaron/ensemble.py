"""Ensembles: sizes (Gamma-weighted incoherent averages) and pumped crystals (averages over hole samples).

The paper averages crystals of 3–15 nm weighted by a Gamma distribution of shape 2.0 and mean 5.4 nm.
Sizes are sampled on a fixed grid (default 3, 4, …, 15 nm); the weights are the Gamma density at the
grid points, normalised to sum to one, so the average is differentiable in the distribution's shape
and mean while each size's intensity is computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from jaxpolaron.accurate_difference import accurate_difference
from jaxpolaron.crystal import Nanocrystal, cut_nanocrystal
from jaxpolaron.deformation.base import Deformation, displaced
from jaxpolaron.deformation.charge_field import RandomHole
from jaxpolaron.errors import InputError
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import DEFAULT_NODES, sobol_nodes
from jaxpolaron.reciprocal import Grid
from jaxpolaron.scattering import ScatteringFactors
from jaxpolaron.structure import CrystalStructure
from jaxpolaron.structure_factor import Engine, intensity, structure_factor

DEFAULT_SIZES_NM = tuple(float(s) for s in range(3, 16))
DEFAULT_GAMMA_SHAPE = 2.0
DEFAULT_MEAN_NM = 5.4


class GammaSizes(eqx.Module):
    """Gamma size distribution (number-weighted) with differentiable shape k and mean (nm).

    p(s) ∝ s^(k-1) exp(-s k / mean), i.e. scale θ = mean / k.
    """

    shape: Float[Array, ""]
    mean_nm: Float[Array, ""]

    def __init__(self, shape: float | Array = DEFAULT_GAMMA_SHAPE, mean_nm: float | Array = DEFAULT_MEAN_NM):
        self.shape = jnp.asarray(shape, jnp.result_type(float))
        self.mean_nm = jnp.asarray(mean_nm, jnp.result_type(float))

    def weights(self, sizes_nm: Float[Array, " n"]) -> Float[Array, " n"]:
        """Normalised weights (n,) of the sampled sizes (nm); the Gamma normalisation cancels."""
        s = jnp.asarray(sizes_nm, self.shape.dtype)
        log_p = (self.shape - 1.0) * jnp.log(s) - s * self.shape / self.mean_nm
        log_p = log_p - jnp.max(log_p)
        p = jnp.exp(log_p)
        return p / jnp.sum(p)


def validate_sizes(sizes_nm: Iterable[float]) -> tuple[float, ...]:
    """Check sizes (nm) are positive and finite; return them as a tuple of floats."""
    sizes = tuple(float(s) for s in sizes_nm)
    if not sizes or any(not np.isfinite(s) or s <= 0 for s in sizes):
        raise InputError(f"crystal sizes must be positive numbers of nm, got {list(sizes)}.")
    return sizes


def size_crystals(structure: CrystalStructure, sizes_nm: Sequence[float], **cut_kwargs) -> list[Nanocrystal]:
    """One crystal per size (nm), cut with `cut_nanocrystal`."""
    return [cut_nanocrystal(structure, s, **cut_kwargs) for s in validate_sizes(sizes_nm)]


def size_intensities(
    crystals: Sequence[Nanocrystal],
    scattering: ScatteringFactors,
    q: Grid | Float[Array, "n 3"],
    *,
    engine: Engine = "auto",
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Float[Array, "n_sizes ..."]:
    """|F|² of each crystal, stacked: (n_sizes, *q_shape), electrons².

    Crystals of different sizes have different atom counts, so each is its own (cached) compilation;
    `progress` wraps the loop (e.g. tqdm) for long runs.
    """
    return jnp.stack([intensity(c, scattering, q, engine) for c in progress(crystals)])


def ensemble_average(
    intensities: Float[Array, "n_sizes ..."], sizes_nm: Float[Array, " n_sizes"], distribution: GammaSizes
) -> Float[Array, ...]:
    """Σ_i w_i I_i with Gamma weights at `sizes_nm`; differentiable in the distribution parameters."""
    w = distribution.weights(jnp.asarray(sizes_nm))
    return jnp.tensordot(w, intensities, axes=1)


# ------------------------------------------------------------------------------------------ pumped
Method = Literal["accurate", "exact", "linear", "second"]
METHODS = ("accurate", "exact", "linear", "second")


def _with_positions(crystal: Nanocrystal, positions: Array) -> Nanocrystal:
    return eqx.tree_at(lambda c: c.positions, crystal, positions)


def _hole_sum(fn: Callable[[Array, Any], Any], keys: Array, params: Any, batch: int) -> Any:
    """Σ_k fn(key_k, params) over `keys` (n,), batched with vmap and sharded over all local devices.

    Each device takes a contiguous share of the keys and scans over batches of `batch` (memory stays
    ~batch × one sample); partial sums are added with psum. `params` is replicated.
    """
    devices = np.array(jax.devices())
    n = keys.shape[0]
    if n % len(devices):
        raise InputError(f"the number of hole samples ({n}) must be a multiple of the {len(devices)} devices.")
    per_device = n // len(devices)
    batch = max(b for b in range(1, min(batch, per_device) + 1) if per_device % b == 0)
    mesh = Mesh(devices, ("holes",))

    def local(keys_local, params_local):
        def step(acc, key_batch):
            out = jax.vmap(lambda k: fn(k, params_local))(key_batch)
            return jax.tree.map(lambda a, o: a + jnp.sum(o, axis=0), acc, out), None

        shapes = jax.eval_shape(lambda k: fn(k, params_local), keys_local[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        acc, _ = jax.lax.scan(step, zeros, keys_local.reshape(-1, batch))
        return jax.tree.map(lambda a: jax.lax.psum(a, "holes"), acc)

    # check_vma=False: the engines scan from fresh zero carries, which the varying-axis checker rejects.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("holes"), P()), out_specs=P(), check_vma=False)
    return sharded(keys, params)


def _first_and_second(crystal, scattering, q, u, engine):
    """F0, F1 = dF[u], F2 = ½ d²F[u, u] (directional derivatives w.r.t. positions along u)."""

    def f(positions):
        return structure_factor(_with_positions(crystal, positions), scattering, q, engine)

    def f_and_f1(positions):
        return jax.jvp(f, (positions,), (u,))

    (f0, f1), (_, f2x2) = jax.jvp(f_and_f1, (crystal.positions,), (u,))
    return f0, f1, 0.5 * f2x2


def _abs2(z: Array) -> Array:
    return jnp.real(z) ** 2 + jnp.imag(z) ** 2


@eqx.filter_jit
def pumped_difference(
    crystal: Nanocrystal,
    scattering: ScatteringFactors,
    q: Grid | Float[Array, "n 3"],
    model: Deformation,
    occupancy: Occupancy,
    *,
    key: Array | None = None,
    n_holes: int = 1,
    method: Method = "exact",
    engine: Engine = "auto",
    batch: int = 4,
    nodes: int = DEFAULT_NODES,
    accurate_engine: str = "auto",
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Dark intensity and pumped − dark difference of one crystal, averaged over hole samples.

    Two pairs are taken to give twice the displacement of one (SI S2), so with occupancy (P0, P1, P2):
    - "exact":  ΔI = P1 ⟨|F[u]|² − I0⟩ + P2 ⟨|F[2u]|² − I0⟩, three structure factors per sample;
    - "linear": ΔI = (P1 + 2 P2) · 2 Re(F0* F1[⟨u⟩]), F1 the directional derivative along the mean field
      (one JVP whatever the number of holes);
    - "second": linear + (P1 + 4 P2) ⟨|F1[u]|² + 2 Re(F0* F2[u])⟩ (per-sample second-order terms);
    - "accurate" (random-hole model on grids): the hole average by a fixed quadrature rule of `nodes` points,
      exact hole-averaged structure factor plus a first-order diffuse term (`jaxpolaron.accurate_difference`):
      within 1–2 % of "exact" at physical amplitudes, no PRNG key, ~10 structure factors.
    Deterministic models ignore `key`/`n_holes`.

    Args:
        crystal, scattering, q, engine: as for `structure_factor`.
        model: a deformation model.
        occupancy: pair probabilities.
        key: PRNG key for random models (one sub-key per hole sample).
        n_holes: hole samples (a multiple of the number of local devices).
        batch: samples per vmapped batch (bounds memory; 2-4 is as fast as 8 on CPU with a quarter of the
            memory, benchmarks/bench_ensemble.py).
        nodes: quadrature nodes of the "accurate" method (a power of two, >= 32).
        accurate_engine: its route (`accurate_difference`'s engine; `accurate_engine(q)` picks it for a grid).

    Returns:
        (I_dark, ΔI), both shaped like `structure_factor`'s output, electrons².
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method == "accurate":
        if not isinstance(model, RandomHole):
            raise InputError(f'method "accurate" is for the random-hole model; use "exact" for {type(model).__name__}.')
        if not isinstance(q, Grid):
            raise InputError('method "accurate" needs grid-aligned q (windows or a grid), not a q list.')
        rule = sobol_nodes(nodes, dtype=crystal.positions.dtype)
        return accurate_difference(crystal, scattering, q, model, occupancy, rule, engine=accurate_engine)
    p = occupancy.probabilities()
    f0 = structure_factor(crystal, scattering, q, engine)
    i0 = _abs2(f0)
    random = model.is_random
    if random and key is None:
        raise InputError(f"{type(model).__name__} is random: give a PRNG key.")
    # one sub-key per hole sample (unused by deterministic models)
    keys = jax.random.split(key if key is not None else jax.random.key(0), n_holes if random else 1)
    params = (crystal, scattering, q, model)

    def u_of(k, prm):
        c, _, _, m = prm
        return m.displacement(c, key=k)

    def mean_u():
        if not random:
            return model.displacement(crystal)
        return _hole_sum(u_of, keys, params, batch) / n_holes

    if method == "exact":

        def sample(k, prm):
            # dark, one pair, two pairs through one vmapped kernel: identical inputs give identical
            # rounding, so a zero field gives exactly zero difference
            c, s, qq, m = prm
            u = m.displacement(c, key=k)
            scaled = jnp.stack([jnp.zeros_like(u), u, 2.0 * u])
            i = jax.vmap(lambda v: intensity(displaced(c, v), s, qq, engine))(scaled)
            return i[1] - i[0], i[2] - i[0]

        if random:
            one, two = jax.tree.map(lambda a: a / n_holes, _hole_sum(sample, keys, params, batch))
        else:
            one, two = sample(None, params)
        return i0, p[1] * one + p[2] * two

    u_bar = mean_u() * crystal.mask[:, None]
    _, f1_bar, _ = _first_and_second(crystal, scattering, q, u_bar, engine)
    first = 2.0 * jnp.real(jnp.conj(f0) * f1_bar)
    diff = (p[1] + 2.0 * p[2]) * first
    if method == "second":

        def second(k, prm):
            c, s, qq, m = prm
            u = m.displacement(c, key=k) * c.mask[:, None]
            g0, g1, g2 = _first_and_second(c, s, qq, u, engine)
            return _abs2(g1) + 2.0 * jnp.real(jnp.conj(g0) * g2)

        mean_second = _hole_sum(second, keys, params, batch) / n_holes if random else second(None, params)
        diff = diff + (p[1] + 4.0 * p[2]) * mean_second
    return i0, diff
