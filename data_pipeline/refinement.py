"""Orientation refinement with the cross-shaped peak model of cube-shaped crystals (the paper's Eq. 1).

The Bragg peaks of a cube-shaped nanocrystal are crosses: truncation streaks run along the cube axes. A peak
found on a still is where the Ewald sphere cuts that cross, so it may sit off the lattice point along a
cube axis. Eq. 1 scores an orientation Ω (lab -> crystal) by

    T(Ω) = Σ_peaks s · exp(−(|d|² − r · max_i d_i²) / (2 W²)),     d = Ω q − G_hkl  (crystal frame, voxels)

with s the integrated peak intensity, W = 4.6 voxel the peak width and r = 0.3 the bias ratio: subtracting
r·max_i d_i² widens the Gaussian along whichever cube axis the deviation is largest, i.e. along the streak.
We maximise T (minimise −T / Σ s) over Ω = Rᵀ, R = R₀ exp([ω]ₓ), with any optax optimiser, for a batch of
crystals at once (vmap; padded peaks have s = 0). The hkl assignment of indexing is kept fixed.

The paper does not state its voxel; we take the q-spacing of one AGIPD pixel at the detector centre,
p / (clen λ) = 200 µm / (122.4 mm · 0.9116 Å) = 1.79e-3 Å⁻¹, so W = 0.0082 Å⁻¹ ≈ the Gaussian σ of a 5 nm
crystal's Bragg peak (FWHM ≈ 0.9 / L).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_VOXEL_Q = 200e-6 / 0.1224 / (12.398419843320026 / 13.6)  # Å⁻¹, one AGIPD pixel at 122.4 mm, 13.6 keV


@dataclasses.dataclass(frozen=True)
class RefinementConfig:
    """Eq. 1 hyper-parameters and the optimiser schedule (hashable, JSON-serialisable).

    width_voxels: W; bias_ratio: r (0 <= r < 1); voxel_q: Å⁻¹ per voxel; steps: optimiser steps;
    learning_rate: radians per Adam step (the scale of the orientation correction).
    ewald: measure d between the spot and the lattice point moved radially onto the Ewald sphere (where the
        cut through an isotropic peak is centred) instead of the lattice point itself; the distance e of the
        lattice point from the sphere (its excitation error) then enters only through
    excitation_width_voxels: W_e, a Gaussian factor exp(−e²/(2 W_e²)) (None: no such factor). ewald=False is
        the paper's literal Eq. 1, which penalises e with the peak width W itself.
    """

    width_voxels: float = 4.6
    bias_ratio: float = 0.3
    voxel_q: float = DEFAULT_VOXEL_Q
    steps: int = 150
    learning_rate: float = 2e-3
    ewald: bool = False
    excitation_width_voxels: float | None = None
    energy_kev: float = 13.6

    def __post_init__(self):
        if not (self.width_voxels > 0 and self.voxel_q > 0 and 0 <= self.bias_ratio < 1 and self.steps >= 0):
            raise ValueError("need width_voxels > 0, voxel_q > 0, 0 <= bias_ratio < 1 and steps >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rotation_from_vector(omega: jax.Array) -> jax.Array:
    """Rodrigues: (..., 3) rotation vector (rad) -> (..., 3, 3), smooth (finite gradient) at ω = 0."""
    theta2 = jnp.sum(omega**2, axis=-1)[..., None, None]
    small = theta2 < 1e-12
    safe2 = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(safe2)
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / safe2)
    x, y, z = omega[..., 0], omega[..., 1], omega[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)], -2)
    return jnp.eye(3, dtype=omega.dtype) + a * k + b * (k @ k)


def cross_peak_score(rotation, q, g, s, config: RefinementConfig):
    """Eq. 1 normalised by Σ s, for one crystal: rotation (3, 3) lab <- crystal; q (n, 3) lab Å⁻¹;
    g (n, 3) the assigned reciprocal-lattice vectors, crystal frame Å⁻¹; s (n,) weights (0 = padding).
    Returns a scalar in [0, 1] (1 = every peak on its lattice point)."""
    excitation = 0.0
    if config.ewald:
        k0 = 1.0 / (12.398419843320026 / config.energy_kev)
        gl = g @ rotation.T + jnp.array([0.0, 0.0, k0])  # k_out of the lattice point, lab frame
        norm = jnp.linalg.norm(gl, axis=-1, keepdims=True)
        spot = gl * (k0 / norm) - jnp.array([0.0, 0.0, k0])
        d = ((q - spot) @ rotation) / config.voxel_q
        if config.excitation_width_voxels is not None:
            e = (norm[..., 0] - k0) / config.voxel_q
            excitation = e**2 / (2.0 * config.excitation_width_voxels**2)
    else:
        d = (q @ rotation - g) / config.voxel_q  # row form of Rᵀq − G, voxels
    d2 = d**2
    expo = (jnp.sum(d2, -1) - config.bias_ratio * jnp.max(d2, -1)) / (2.0 * config.width_voxels**2) + excitation
    return jnp.sum(s * jnp.exp(-expo)) / jnp.maximum(jnp.sum(s), 1e-30)


@functools.partial(jax.jit, static_argnames=("config",))
def refine_orientations(rotations, q, g, s, config: RefinementConfig):
    """Maximise Eq. 1 for a batch of crystals.

    Args:
        rotations: (c, 3, 3) starting orientations (q_lab = R q_crystal), e.g. from `indexing.index_frame`.
        q: (c, n, 3) Å⁻¹ lab-frame peak positions (padded). g: (c, n, 3) Å⁻¹ assigned G in the crystal frame.
        s: (c, n) integrated intensities, 0 for padding.

    Returns (refined rotations (c, 3, 3), score before (c,), score after (c,)).
    """
    opt = optax.adam(config.learning_rate)

    def loss(omega):
        r = rotations @ rotation_from_vector(omega)
        return -jnp.sum(jax.vmap(cross_peak_score, (0, 0, 0, 0, None))(r, q, g, s, config))

    def step(carry, _):
        omega, state = carry
        grads = jax.grad(loss)(omega)
        updates, state = opt.update(grads, state, omega)
        return (optax.apply_updates(omega, updates), state), None

    omega0 = jnp.zeros((*rotations.shape[:-2], 3), rotations.dtype)
    (omega, _), _ = jax.lax.scan(step, (omega0, opt.init(omega0)), None, length=config.steps)
    score = jax.vmap(cross_peak_score, (0, 0, 0, 0, None))
    refined = rotations @ rotation_from_vector(omega)
    return refined, score(rotations, q, g, s, config), score(refined, q, g, s, config)


def pad_crystals(items, n_max: int | None = None, batch: int | None = None):
    """Stack per-crystal (rotation (3, 3), q (n_i, 3), g (n_i, 3), s (n_i,)) into padded float32 arrays.

    Padding to fixed `n_max` peaks and `batch` crystals keeps one compiled shape across calls (and makes a
    crystal's result independent of which others share its batch). Returns (rotations, q, g, s) numpy arrays.
    """
    n_max = max((len(it[3]) for it in items), default=1) if n_max is None else n_max
    c = len(items) if batch is None else batch
    rot = np.tile(np.eye(3, dtype=np.float32), (c, 1, 1))
    q = np.zeros((c, n_max, 3), np.float32)
    g = np.zeros((c, n_max, 3), np.float32)
    s = np.zeros((c, n_max), np.float32)
    for i, (r_i, q_i, g_i, s_i) in enumerate(items):
        k = min(len(s_i), n_max)
        rot[i], q[i, :k], g[i, :k], s[i, :k] = r_i, q_i[:k], g_i[:k], s_i[:k]
    return rot, q, g, s
