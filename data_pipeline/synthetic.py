"""Synthetic AGIPD-1M frames of CsPbBr3 nanocrystals (pure: no file I/O; explicit PRNG keys).

Cost (notes/physics.md, "Cost warning for synthetic frames"): a direct sum over ~1 M pixels × ~3,000 atoms
per crystal per frame is far too slow, so each crystal size's |F(q)|² is computed ONCE on a regular
crystal-frame grid covering the detector's |q| (type-1 NUFFT, `jaxpolaron.structure_factor.intensity`), and a
frame then only interpolates that volume (trilinear, `jax.scipy.ndimage.map_coordinates` order=1) at
q_crystal = Rᵀ q_lab of every pixel (q_lab = R q_crystal, `jaxpolaron.reciprocal.random_rotations`).

Sampling caveat: the Bragg peaks of an s-nm crystal are ~1/s Å⁻¹ wide (FWHM ~0.02 Å⁻¹ at 5 nm). A grid of n³
voxels over ±q_max has voxel 2 q_max/(n-1): 0.0078 Å⁻¹ at n = 257 (adequately sampled), 0.016 at 129 and
0.032 at 65 (undersampled: peak heights/shapes are wrong by tens of percent; fine for I/O tests only).

Frame model (expected photons per pixel, then Poisson):
    λ = Σ_crystals I_size(Rᵀ q) · r_e² · Φ · ΔΩ · P   +   ring(|q|) · ΔΩ / ΔΩ_max
with Φ the fluence (photons/Å²), ΔΩ the pixel solid angle, P the polarisation factor (horizontal, lab x),
and ring a Gaussian in |q| (solvent/ligand diffuse scattering). A frame is a hit with probability
`hit_fraction`; a hit holds 1 + Poisson(mean_crystals − 1) crystals (so the mean per hit is
`mean_crystals`), capped at `max_crystals`; a miss is background only. Sizes are drawn among the
precomputed sizes with Gamma weights (`jaxpolaron.ensemble.GammaSizes`). Pumped frames use the pumped
volume of each size (the dark one when none is given). Units of the frame: photons (float32), not keV.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.geometry import DEFAULT_CLEN_M, pixel_positions, pixel_q, solid_angle
from jaxpolaron.ensemble import GammaSizes
from jaxpolaron.reciprocal import full_grid, random_rotations

R_E_A = 2.8179403262e-5  # classical electron radius, Å


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Physical and sampling parameters of synthetic frames (all JSON-serialisable)."""

    energy_kev: float = 13.6
    clen_m: float = DEFAULT_CLEN_M
    sizes_nm: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    gamma_shape: float = 2.0
    mean_size_nm: float = 5.4
    mean_crystals: float = 1.6  # per hit
    max_crystals: int = 6
    hit_fraction: float = 0.3
    fluence_ph_per_um2: float = 1e12  # photons per µm² per pulse
    polarisation: bool = True
    ring_q: float = 0.2  # Å⁻¹, diffuse ring centre
    ring_sigma: float = 0.03  # Å⁻¹
    ring_photons: float = 0.05  # expected photons per pixel at the ring maximum (largest solid angle)
    bad_pixel_fraction: float = 1e-3
    grid_n: int = 257  # volume samples per axis
    q_max: float = 1.0  # Å⁻¹, half-width of the volume (must cover the detector's |q|)

    def __post_init__(self):
        if not 0.0 <= self.hit_fraction <= 1.0:
            raise ValueError(f"hit_fraction must lie in [0, 1], got {self.hit_fraction}")
        if self.mean_crystals < 1.0:
            raise ValueError(f"mean_crystals (per hit) must be >= 1, got {self.mean_crystals}")
        if self.max_crystals < 1 or self.grid_n < 2 or not self.q_max > 0:
            raise ValueError("max_crystals >= 1, grid_n >= 2 and q_max > 0 are required")
        if not self.sizes_nm or min(self.sizes_nm) <= 0:
            raise ValueError(f"sizes must be positive, got {self.sizes_nm}")

    @property
    def fluence_ph_per_a2(self) -> float:
        return self.fluence_ph_per_um2 * 1e-8

    @property
    def voxel(self) -> float:
        return 2.0 * self.q_max / (self.grid_n - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Trains and pulses of a run; the bunch pattern follows `data_pipeline.bunch_pattern.make_table`."""

    n_trains: int = 2
    n_pulses: int = 16
    first_train: int = 10000
    spacing: int = 4  # bunch-pattern slots between pulses (4 = 1.1 MHz)
    first_slot: int = 0
    pump_every: int = 2

    @property
    def n_frames(self) -> int:
        return self.n_trains * self.n_pulses

    def train_ids(self) -> np.ndarray:
        return self.first_train + np.arange(self.n_trains, dtype=np.uint64)

    def pulse_ids(self) -> np.ndarray:
        """(n_pulses,) bunch-pattern slot of each detector frame (AGIPD `image.pulseId`)."""
        return self.first_slot + self.spacing * np.arange(self.n_pulses, dtype=np.uint64)

    def table(self) -> np.ndarray:
        from data_pipeline.bunch_pattern import make_table

        return make_table(
            self.n_trains, self.n_pulses, spacing=self.spacing, first=self.first_slot, pump_every=self.pump_every
        )

    def pumped(self) -> np.ndarray:
        """(n_trains, n_pulses) bool, decoded from the table as the reader will."""
        from data_pipeline.bunch_pattern import pumped

        ids = np.tile(self.pulse_ids().astype(np.int64), (self.n_trains, 1))
        return pumped(self.table(), ids)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Detector(NamedTuple):
    """Per-pixel constants of a frame, (16, 512, 128[, 3]) float32."""

    q: jax.Array  # lab-frame q, Å⁻¹
    q_norm: jax.Array
    scale: jax.Array  # r_e² Φ ΔΩ P: photons per electron² of |F|²
    ring: jax.Array  # expected diffuse-ring photons
    bad: jax.Array  # bool, bad pixels (masked, data 0)


class Volumes(NamedTuple):
    """|F|² per size on the crystal-frame grid: dark and pumped, (n_sizes, n, n, n) electrons²."""

    dark: jax.Array
    pumped: jax.Array
    sizes_nm: jax.Array
    voxel: float
    origin_index: int  # grid index of q = 0


class Crystals(NamedTuple):
    """Truth of one frame (fixed shapes; entries beyond `n` are unused)."""

    n: jax.Array  # () int32, 0 for a miss
    rotations: jax.Array  # (max_crystals, 3, 3), q_lab = R q_crystal
    size_index: jax.Array  # (max_crystals,) int32 into sizes_nm
    sizes_nm: jax.Array  # (max_crystals,)
    pumped: jax.Array  # () bool


def detector(geometry, config: SyntheticConfig, *, key: jax.Array) -> Detector:
    """Pixel q, photon scale, diffuse ring and a random bad-pixel mask (fixed for a run)."""
    pos = pixel_positions(geometry, config.clen_m)
    q = pixel_q(pos, config.energy_kev)
    d_omega = solid_angle(pos)
    pol = 1.0 - (pos[..., 0] / np.linalg.norm(pos, axis=-1)) ** 2 if config.polarisation else 1.0
    scale = R_E_A**2 * config.fluence_ph_per_a2 * d_omega * pol
    q_norm = np.linalg.norm(q, axis=-1)
    if q_norm.max() > config.q_max:
        raise ValueError(
            f"the volume (q_max {config.q_max}) does not cover the detector (|q| up to {q_norm.max():.3f})"
        )
    ring = config.ring_photons * np.exp(-0.5 * ((q_norm - config.ring_q) / config.ring_sigma) ** 2)
    ring = ring * d_omega / d_omega.max()
    bad = jax.random.bernoulli(key, config.bad_pixel_fraction, q_norm.shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Detector(q=f32(q), q_norm=f32(q_norm), scale=f32(scale), ring=f32(ring), bad=bad)


def crystal_volumes(
    structure, config: SyntheticConfig, *, pumped: Sequence | None = None, progress=lambda it: it
) -> Volumes:
    """|F|² of one crystal per size on a (grid_n)³ grid over ±q_max (NUFFT; once per run).

    `pumped`: optional (n_sizes, n, n, n) pumped volumes on the same grid; None = the dark ones.
    """
    from jaxpolaron.crystal import cut_nanocrystal
    from jaxpolaron.scattering import scattering_factors
    from jaxpolaron.structure_factor import intensity

    grid = full_grid(config.grid_n, config.q_max)
    sf = scattering_factors(structure.species, config.energy_kev, charges=structure.oxidation)
    dark = jnp.stack(
        [
            intensity(cut_nanocrystal(structure, s), sf, grid, engine="nufft").astype(jnp.float32)
            for s in progress(config.sizes_nm)
        ]
    )
    pump = dark if pumped is None else jnp.asarray(pumped, jnp.float32)
    if pump.shape != dark.shape:
        raise ValueError(f"pumped volumes {pump.shape} do not match the dark ones {dark.shape}")
    return Volumes(dark, pump, jnp.asarray(config.sizes_nm, jnp.float32), config.voxel, config.grid_n // 2)


def draw_crystals(key: jax.Array, config: SyntheticConfig, pumped: jax.Array) -> Crystals:
    """Random crystals of one frame (jit-able; `config` static)."""
    k_hit, k_n, k_size, k_rot = jax.random.split(key, 4)
    hit = jax.random.bernoulli(k_hit, config.hit_fraction)
    extra = jax.random.poisson(k_n, config.mean_crystals - 1.0) if config.mean_crystals > 1.0 else 0
    n = jnp.where(hit, jnp.minimum(1 + extra, config.max_crystals), 0).astype(jnp.int32)
    weights = GammaSizes(config.gamma_shape, config.mean_size_nm).weights(jnp.asarray(config.sizes_nm))
    idx = jax.random.choice(k_size, len(config.sizes_nm), (config.max_crystals,), p=weights).astype(jnp.int32)
    rot = random_rotations(config.max_crystals, key=k_rot).astype(jnp.float32)
    sizes = jnp.asarray(config.sizes_nm, jnp.float32)[idx]
    return Crystals(n=n, rotations=rot, size_index=idx, sizes_nm=sizes, pumped=jnp.asarray(pumped, bool))


def bragg_photons(det: Detector, vol: Volumes, crystals: Crystals) -> jax.Array:
    """Expected crystal photons per pixel, (16, 512, 128) (jit-able)."""
    crystals = Crystals(*(jnp.asarray(x) for x in crystals))  # truth read back from disk comes as numpy
    q_flat = det.q.reshape(-1, 3)

    def one(i, acc):
        table = jnp.where(crystals.pumped, vol.pumped[crystals.size_index[i]], vol.dark[crystals.size_index[i]])
        qc = q_flat @ crystals.rotations[i]  # row form of Rᵀ q
        coords = qc.T / vol.voxel + vol.origin_index
        value = jax.scipy.ndimage.map_coordinates(table, list(coords), order=1, mode="constant", cval=0.0)
        return acc + jnp.where(i < crystals.n, value, 0.0)

    total = jax.lax.fori_loop(0, crystals.rotations.shape[0], one, jnp.zeros(q_flat.shape[0], jnp.float32))
    return total.reshape(det.scale.shape) * det.scale


@jax.jit
def _frame(key, det: Detector, vol: Volumes, crystals: Crystals):
    lam = bragg_photons(det, vol, crystals) + det.ring
    counts = jax.random.poisson(key, lam).astype(jnp.float32)
    return jnp.where(det.bad, 0.0, counts)


def simulate_frame(key: jax.Array, det: Detector, vol: Volumes, config: SyntheticConfig, pumped: bool):
    """One frame: (photons (16, 512, 128) float32 with bad pixels 0, Crystals truth)."""
    k_cryst, k_noise = jax.random.split(key)
    crystals = _draw(k_cryst, config, jnp.asarray(pumped))
    return _frame(k_noise, det, vol, crystals), crystals


_draw = jax.jit(draw_crystals, static_argnums=1)


def frames(
    key: jax.Array, det: Detector, vol: Volumes, config: SyntheticConfig, layout: RunLayout
) -> Iterator[tuple[np.ndarray, Crystals]]:
    """All frames of a run in train/pulse order (a generator: one frame in memory at a time)."""
    pumped = layout.pumped().reshape(-1)
    for i, p in enumerate(pumped):
        data, truth = simulate_frame(jax.random.fold_in(key, i), det, vol, config, bool(p))
        yield np.asarray(data), jax.tree.map(np.asarray, truth)


def bad_pixel_mask(det: Detector) -> np.ndarray:
    """AGIPD `image.mask` (uint32, nonzero = bad) for the detector's bad pixels."""
    return np.asarray(det.bad).astype(np.uint32)
