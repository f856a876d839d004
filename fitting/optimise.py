"""Gradient descent of an objective with any optax optimiser: one jitted step, early stopping, multi-start.

`minimise` runs one start: z ← z + optax update of ∇loss, keeping the best z seen, and stops after
`patience` steps without a relative improvement of `rel_tol` (or after `max_steps`). `latin_hypercube`
draws starts in the unconstrained space around the initial guess; `multistart` runs them all and keeps the
lowest loss. The step is compiled once per (objective structure, optimiser) and reused by every start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

StepCallback = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Early stopping: at most `max_steps`; stop after `patience` steps without loss < best · (1 − rel_tol)."""

    max_steps: int = 300
    patience: int = 30
    rel_tol: float = 1e-5


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One start: best z (n,), its loss, the loss per step and why it stopped."""

    start: int
    z: np.ndarray
    loss: float
    losses: np.ndarray
    steps: int
    converged: bool


def make_step(optimizer: optax.GradientTransformation):
    """The jitted step (objective, z, state) → (z', state', loss(z), |∇loss(z)|)."""

    @eqx.filter_jit
    def step(objective, z, state):
        loss, grad = jax.value_and_grad(objective)(z)
        # line-search optimisers (optax.lbfgs) also take the value and the function itself
        extra = {"value": loss, "grad": grad, "value_fn": objective}
        if not isinstance(optimizer, optax.GradientTransformationExtraArgs):
            extra = {}
        updates, state = optimizer.update(grad, state, z, **extra)
        return optax.apply_updates(z, updates), state, loss, jnp.linalg.norm(grad)

    return step


def minimise(
    objective: Callable[[Float[Array, " n"]], Float[Array, ""]],
    z0: Float[Array, " n"],
    optimizer: optax.GradientTransformation,
    *,
    stop: StopRule = StopRule(),
    start: int = 0,
    step=None,
    callback: StepCallback | None = None,
) -> Trajectory:
    """Minimise `objective` from z0 (see the module docstring); `callback` gets one dict per step."""
    step = make_step(optimizer) if step is None else step
    # committed to the device like the step's outputs, so the first call compiles the same program as the rest
    z = jax.device_put(jnp.asarray(z0, float))
    state = jax.device_put(optimizer.init(z))
    # a line-search optimiser only accepts steps that lower the loss: a loss no lower than the best means the
    # search failed (flat or noisy minimum) and the next steps would wander off, so stop there
    monotone = _has_line_search(state)
    best_z, best, since, losses = np.asarray(z), np.inf, 0, []
    converged = False
    for i in range(stop.max_steps):
        z_new, state, loss, gnorm = step(objective, z, state)
        loss = float(loss)
        if not np.isfinite(loss):
            break
        losses.append(loss)
        if loss < best * (1.0 - stop.rel_tol) or not np.isfinite(best):
            since = 0
        else:
            since += 1
        improved = loss < best
        if improved:
            best, best_z = loss, np.asarray(z)
        if callback is not None:
            callback({"start": start, "step": i, "loss": loss, "grad_norm": float(gnorm), "z": np.asarray(z).tolist()})
        if since >= stop.patience or (monotone and not improved):
            converged = True
            break
        z = z_new
    return Trajectory(start, best_z, float(best), np.asarray(losses), len(losses), converged)


def _has_line_search(state) -> bool:
    """Whether an optax state holds a line-search state (optax.lbfgs: zoom; or a backtracking search)."""

    def is_search(x) -> bool:
        return type(x).__name__.endswith("LinesearchState")

    return any(is_search(x) for x in jax.tree_util.tree_leaves(state, is_leaf=is_search))


def latin_hypercube(z0: np.ndarray, n: int, *, key: Array, half_width: float = 1.0) -> np.ndarray:
    """n starts (n, d) in the box z0 ± half_width, one per stratum of every axis; start 0 is z0 itself."""
    z0 = np.asarray(z0, float)
    d = z0.size
    if n <= 1:
        return z0[None]
    k_perm, k_jit = jax.random.split(key)
    perms = np.stack([np.asarray(jax.random.permutation(k, n - 1)) for k in jax.random.split(k_perm, d)], 1)
    u = (perms + np.asarray(jax.random.uniform(k_jit, (n - 1, d)))) / (n - 1)
    return np.concatenate([z0[None], z0 + half_width * (2.0 * u - 1.0)])


def multistart(
    objective,
    starts: np.ndarray,
    optimizer: optax.GradientTransformation,
    *,
    stop: StopRule = StopRule(),
    callback: StepCallback | None = None,
    step=None,
) -> tuple[Trajectory, list[Trajectory]]:
    """Run `minimise` from every row of `starts` (n, d); returns (best, all). `step` (from `make_step`): pass one
    to reuse its compilation across objectives of the same structure."""
    step = make_step(optimizer) if step is None else step
    runs = [
        minimise(objective, s, optimizer, stop=stop, start=i, step=step, callback=callback)
        for i, s in enumerate(starts)
    ]
    return min(runs, key=lambda r: r.loss), runs
