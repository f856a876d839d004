"""Synthetic AGIPD-1M frames of CsPbBr3 nanocrystals (pure: no file I/O; explicit PRNG keys).

Cost (notes/physics.md, "Cost warning for synthetic frames"): a direct sum over ~1 M pixels × ~3,000 atoms
per crystal per frame is far too slow, so each crystal size's |F(q)|² is computed ONCE on a regular
crystal-frame grid covering the detector's |q| (type-1 NUFFT, `jaxpolaron.structure_factor.intensity`), and a
frame then only interpolates that volume (tricubic, `_tricubic`) at q_crystal = Rᵀ q_lab of every pixel
(q_lab = R q_crystal, `jaxpolaron.reciprocal.random_rotations`).

Sampling caveat: the Bragg peaks of an s-nm crystal are ~1/s Å⁻¹ wide (FWHM ~0.02 Å⁻¹ at 5 nm). A grid of n³
voxels over ±q_max has voxel 2 q_max/(n-1): 0.0078 Å⁻¹ at n = 257 (adequately sampled), 0.016 at 129 and
0.032 at 65 (undersampled: peak heights/shapes are wrong by tens of percent; fine for I/O tests only).
The default AGIPD-1M geometry at 122.4 mm reaches |q| = 0.983 Å⁻¹ in its corners, hence q_max = 1.0.

Pumped crystals: a deformation model (`jaxpolaron.simulate.build_model`, the models and parameters of
`jaxpolaron simulate`) displaces the atoms of each size's crystal and its |F|² is tabulated too. A random
model (random-hole) has one hole per crystal, so `n_variants` hole realisations are tabulated per size and
each pumped crystal picks one at random (its index is in the truth); a deterministic model has one variant.

Frame model (expected photons per pixel, then Poisson):
    λ = Σ_crystals I_table(Rᵀ q) · r_e² · Φ · ΔΩ · P   +   ring(|q|) · ΔΩ / ΔΩ_max
with Φ the fluence (photons/Å²), ΔΩ the pixel solid angle, P the polarisation factor (horizontal, lab x),
and ring a Gaussian in |q| (solvent/ligand diffuse scattering). A frame is a hit with probability
`hit_fraction`; a hit holds 1 + Poisson(mean_crystals − 1) crystals (so the mean per hit is
`mean_crystals`), capped at `max_crystals`; a miss is background only. Sizes are drawn among the
precomputed sizes with Gamma weights (`jaxpolaron.ensemble.GammaSizes`). Units of the frame: photons
(float32), not keV.

Speed (2 CPU cores): λ is computed in jitted JAX, looping over the frame's crystals only (a miss costs no
interpolation); the Poisson draw runs on the host with numpy (≈10× faster than `jax.random.poisson` on 1 M
pixels), seeded from the frame's JAX key, so every frame is a pure function of (key, frame index). `frames`
dispatches frame i+1 to XLA before drawing frame i's photons, so the two overlap.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.geometry import DEFAULT_CLEN_M, pixel_positions, pixel_q, solid_angle
from jaxpolaron.ensemble import GammaSizes
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import full_grid, random_rotations

if TYPE_CHECKING:
    from jaxpolaron.simulate import SimulateConfig
    from jaxpolaron.structure import CrystalStructure

R_E_A = 2.8179403262e-5  # classical electron radius, Å
# peakfinder8 settings for photon-count frames (used to choose the default fluence; see SyntheticConfig)
PEAKFINDER_SETTINGS = {"adc_threshold": 2.0, "minimum_snr": 5.0, "min_pixel_count": 2, "max_pixel_count": 200,
                       "local_bg_radius": 3, "max_res": 821.0}  # fmt: skip
SUPPORTED_MODELS = ("none", "central-hole", "random-hole", "tilt", "phonon")  # `external` needs its own crystal


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Physical and sampling parameters of synthetic frames (all JSON-serialisable).

    fluence_ph_per_um2: incident photons per µm² per pulse. The default 5e13 was chosen with peakfinder8
    (`PEAKFINDER_SETTINGS` for `data_pipeline.peakfinder.Peakfinder8Config`) on 100 hit frames at grid 257
    (1.66 crystals per hit): peaks per frame median 7
    (mean 11.8), per crystal median 4.3 (mean 7.5; 10th/90th percentile 0/20); by size, single crystals of
    3–4 nm give 0 peaks, 5 nm ~3, 6 nm ~11, 7–8 nm ~20. Found peaks scale steeply with fluence (1e14:
    per-crystal median 12; 3e13: median 1). It is higher than a typical SPB focus delivers.
    n_variants: hole realisations tabulated per size for a random deformation model.
    interpolation: of the tables at each pixel's q, "cubic" (Catmull–Rom, `_tricubic`) or "linear" (trilinear:
    faster, but smooths the peaks; docs/closed_loop.md).
    paired, noise: switches for bias studies, off in a real-like run. `paired`: every frame of a pump group (the
    `pump_every` consecutive frames of `RunLayout`) holds the same crystals (sizes, orientations), so dark and
    pumped classes differ only by the deformation. `noise` False: frames are λ itself, no Poisson draw.
    """

    energy_kev: float = 13.6
    clen_m: float = DEFAULT_CLEN_M
    sizes_nm: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    gamma_shape: float = 2.0
    mean_size_nm: float = 5.4
    mean_crystals: float = 1.6  # per hit
    max_crystals: int = 6
    hit_fraction: float = 0.3
    fluence_ph_per_um2: float = 5e13  # photons per µm² per pulse
    polarisation: bool = True
    ring_q: float = 0.2  # Å⁻¹, diffuse ring centre
    ring_sigma: float = 0.03  # Å⁻¹
    ring_photons: float = 0.05  # expected photons per pixel at the ring maximum (largest solid angle)
    bad_pixel_fraction: float = 1e-3
    grid_n: int = 257  # volume samples per axis
    q_max: float = 1.0  # Å⁻¹, half-width of the volume (must cover the detector's |q|)
    n_variants: int = 4  # hole realisations per size (random models)
    interpolation: str = "cubic"  # of the |F|² tables at the pixels' q: "cubic" (Catmull–Rom) or "linear"
    # truth-side switches of the closed-loop bias study (experiments/closed_loop_bias.py); defaults = a real run
    paired: bool = False  # the frames of one pump group (pump_every frames) hold the same crystals
    noise: bool = True  # False: the expected photons λ instead of Poisson counts

    def __post_init__(self):
        if not 0.0 <= self.hit_fraction <= 1.0:
            raise InputError(f"hit_fraction must lie in [0, 1], got {self.hit_fraction}.")
        if not 1.0 <= self.mean_crystals <= self.max_crystals:
            raise InputError(f"mean_crystals (per hit) must lie in [1, {self.max_crystals}], got {self.mean_crystals}.")
        if self.max_crystals < 1 or self.grid_n < 3 or not self.q_max > 0 or self.n_variants < 1:
            raise InputError("max_crystals >= 1, grid_n >= 3, q_max > 0 and n_variants >= 1 are required.")
        if not self.sizes_nm or min(self.sizes_nm) <= 0 or not np.all(np.isfinite(self.sizes_nm)):
            raise InputError(f"sizes must be positive numbers of nm, got {list(self.sizes_nm)}.")
        for name in ("energy_kev", "clen_m", "gamma_shape", "mean_size_nm", "ring_sigma"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("fluence_ph_per_um2", "ring_photons"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if self.interpolation not in ("cubic", "linear"):
            raise InputError(f"interpolation must be 'cubic' or 'linear', got {self.interpolation!r}.")
        if not 0.0 <= self.bad_pixel_fraction < 1.0:
            raise InputError(f"bad_pixel_fraction must lie in [0, 1), got {self.bad_pixel_fraction}.")

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

    def __post_init__(self):
        if self.n_trains < 1 or self.n_pulses < 1 or self.spacing < 1 or self.pump_every < 1 or self.first_train < 1:
            raise InputError("a run needs >= 1 train, >= 1 pulse per train, spacing >= 1 and pump_every >= 1.")
        if self.first_slot + self.spacing * (self.n_pulses - 1) >= 2700:
            raise InputError(f"{self.n_pulses} pulses every {self.spacing} slots do not fit in a train (2700 slots).")

    @property
    def n_frames(self) -> int:
        return self.n_trains * self.n_pulses

    def train_ids(self) -> np.ndarray:
        return self.first_train + np.arange(self.n_trains, dtype=np.uint64)

    def pulse_ids(self) -> np.ndarray:
        """(n_pulses,) bunch-pattern slot of each detector frame (AGIPD `image.pulseId`)."""
        return self.first_slot + self.spacing * np.arange(self.n_pulses, dtype=np.uint64)

    def table(self, n_trains: int | None = None) -> np.ndarray:
        """(n_trains, 2700) uint32 bunch-pattern table (every train has the same pattern)."""
        from data_pipeline.bunch_pattern import make_table

        return make_table(
            self.n_trains if n_trains is None else n_trains,
            self.n_pulses,
            spacing=self.spacing,
            first=self.first_slot,
            pump_every=self.pump_every,
        )

    def pumped(self) -> np.ndarray:
        """(n_trains, n_pulses) bool, decoded from the table as the reader will."""
        from data_pipeline.bunch_pattern import pumped

        one = pumped(self.table(1), self.pulse_ids().astype(np.int64)[None])
        return np.repeat(one, self.n_trains, axis=0)

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
    """|F|² tables on the crystal-frame grid (grid_n³ over ±q_max), electrons².

    tables: (n_tables, n, n, n) float32: the dark crystal of each size, then the pumped variants.
    dark_index: (n_sizes,) int32 table of each size's dark crystal.
    pumped_index: (n_sizes, n_variants) int32 table of each size's pumped variants (= dark_index for model
        'none'; all variants equal for a deterministic model).
    sizes_nm: (n_sizes,) float32.
    holes: (n_sizes, n_variants, 3) hole position of each variant, Å, crystal frame (NaN when the model has
        no hole or a fixed one is not drawn).
    voxel: grid spacing, Å⁻¹. origin_index: grid index of q = 0.
    """

    tables: jax.Array
    dark_index: jax.Array
    pumped_index: jax.Array
    sizes_nm: jax.Array
    holes: jax.Array
    voxel: float
    origin_index: int

    @property
    def n_variants(self) -> int:
        return int(self.pumped_index.shape[1])


class Crystals(NamedTuple):
    """Truth of one frame (fixed shapes; entries beyond `n` are unused).

    variant: (max_crystals,) int32, the pumped table variant of each crystal (-1 in a dark frame).
    """

    n: jax.Array  # () int32, 0 for a miss
    rotations: jax.Array  # (max_crystals, 3, 3), q_lab = R q_crystal
    size_index: jax.Array  # (max_crystals,) int32 into sizes_nm
    sizes_nm: jax.Array  # (max_crystals,)
    variant: jax.Array  # (max_crystals,) int32
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
        raise InputError(
            f"the volume (q_max {config.q_max}) does not cover the detector (|q| up to {q_norm.max():.3f} Å⁻¹)."
        )
    ring = config.ring_photons * np.exp(-0.5 * ((q_norm - config.ring_q) / config.ring_sigma) ** 2)
    ring = ring * d_omega / d_omega.max()
    bad = jax.random.bernoulli(key, config.bad_pixel_fraction, q_norm.shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Detector(q=f32(q), q_norm=f32(q_norm), scale=f32(scale), ring=f32(ring), bad=bad)


def model_config(model: str = "none", **params) -> SimulateConfig:
    """The deformation model as `jaxpolaron simulate` configures it (`SimulateConfig`, validated).

    `params` are `SimulateConfig` fields (k_cs, k_pb, k_br, hole_bias, electron_strength, softening_a,
    amplitude, t0, width_fraction, tilt_profile, exponent, centre, seed). Raises InputError for an unknown or
    unsupported model ('external' needs its own DFT crystal, which a size ensemble does not have).
    """
    from jaxpolaron.simulate import SimulateConfig

    if model not in SUPPORTED_MODELS:
        raise InputError(f"synthetic runs support the models {', '.join(SUPPORTED_MODELS)}; got {model!r}.")
    try:
        config = SimulateConfig(model=model, **params)
    except TypeError as exc:
        raise InputError(f"bad model parameter: {exc}.") from None
    config.validate()
    return config


def crystal_volumes(
    structure: CrystalStructure,
    config: SyntheticConfig,
    *,
    model: SimulateConfig | None = None,
    key: jax.Array | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> Volumes:
    """|F|² of one crystal per size, dark and pumped, on a (grid_n)³ grid over ±q_max (NUFFT; once per run).

    Args:
        structure: the unit cell (`jaxpolaron.structure.read_cif`).
        config: grid, sizes, energy and `n_variants`.
        model: deformation of pumped crystals (`model_config`); None or model 'none': pumped = dark. The
            crystal is cut with the model config's `exponent` and `centre`.
        key: PRNG key of the hole realisations (random models); default `jax.random.key(model.seed)`.
            Variant v of size i uses `fold_in(fold_in(key, i), v)`.
        progress: wraps the loop over sizes (e.g. tqdm).

    Memory: (n_sizes × (1 + n_variants)) × grid_n³ × 4 bytes (6 sizes × 5 tables at 257³: 2.0 GB).
    """
    from jaxpolaron.crystal import cut_nanocrystal
    from jaxpolaron.deformation import CentralHole, RandomHole, displaced
    from jaxpolaron.scattering import scattering_factors
    from jaxpolaron.simulate import build_model
    from jaxpolaron.structure_factor import intensity

    if model is None:
        model = model_config("none")
    elif model.model not in SUPPORTED_MODELS:
        raise InputError(f"synthetic runs support the models {', '.join(SUPPORTED_MODELS)}; got {model.model!r}.")
    key = jax.random.key(model.seed) if key is None else key
    grid = full_grid(config.grid_n, config.q_max)
    sf = scattering_factors(structure.species, config.energy_kev, charges=structure.oxidation)
    n_sizes, n = len(config.sizes_nm), config.grid_n
    built = [(cut_nanocrystal(structure, s, exponent=model.exponent, centre=model.centre), s) for s in config.sizes_nm]
    deformations = [build_model(model, structure, c) for c, _ in built]
    random = any(d is not None and d.is_random for d in deformations)
    n_var = config.n_variants if random else 1
    per_size = 1 + (0 if model.model == "none" else n_var)
    if n_sizes * per_size * n**3 >= 2**31:
        raise InputError(f"{n_sizes * per_size} tables of {n}³ exceed the int32 index range: use a smaller grid.")
    tables = np.empty((n_sizes * per_size, n, n, n), np.float32)
    dark_index = np.arange(n_sizes, dtype=np.int32) * per_size
    pumped_index = np.repeat(dark_index[:, None], n_var, axis=1)
    holes = np.full((n_sizes, n_var, 3), np.nan, np.float32)

    def table(crystal):
        return np.asarray(intensity(crystal, sf, grid, engine="nufft"), np.float32)

    for i in progress(range(n_sizes)):
        crystal, deformation = built[i][0], deformations[i]
        tables[dark_index[i]] = table(crystal)
        if deformation is None:
            continue
        for v in range(n_var):
            k = jax.random.fold_in(jax.random.fold_in(key, i), v) if deformation.is_random else None
            if isinstance(deformation, RandomHole):
                holes[i, v] = np.asarray(deformation.hole(crystal, key=k))
            elif isinstance(deformation, CentralHole):
                holes[i, v] = 0.0
            u = deformation.displacement(crystal, key=k)
            pumped_index[i, v] = dark_index[i] + 1 + v
            tables[pumped_index[i, v]] = table(displaced(crystal, u))
    return Volumes(
        tables=jnp.asarray(tables),
        dark_index=jnp.asarray(dark_index),
        pumped_index=jnp.asarray(pumped_index),
        sizes_nm=jnp.asarray(config.sizes_nm, jnp.float32),
        holes=jnp.asarray(holes),
        voxel=config.voxel,
        origin_index=config.grid_n // 2,
    )


def draw_crystals(key: jax.Array, config: SyntheticConfig, n_variants: int, pumped: jax.Array) -> Crystals:
    """Random crystals of one frame (jit-able; `config` and `n_variants` static)."""
    k_hit, k_n, k_size, k_rot, k_var = jax.random.split(key, 5)
    hit = jax.random.bernoulli(k_hit, config.hit_fraction)
    extra = jax.random.poisson(k_n, config.mean_crystals - 1.0) if config.mean_crystals > 1.0 else 0
    n = jnp.where(hit, jnp.minimum(1 + extra, config.max_crystals), 0).astype(jnp.int32)
    weights = GammaSizes(config.gamma_shape, config.mean_size_nm).weights(jnp.asarray(config.sizes_nm))
    idx = jax.random.choice(k_size, len(config.sizes_nm), (config.max_crystals,), p=weights).astype(jnp.int32)
    rot = random_rotations(config.max_crystals, key=k_rot).astype(jnp.float32)
    sizes = jnp.asarray(config.sizes_nm, jnp.float32)[idx]
    pumped = jnp.asarray(pumped, bool)
    variant = jax.random.randint(k_var, (config.max_crystals,), 0, n_variants, jnp.int32)
    variant = jnp.where(pumped, variant, -1)
    return Crystals(n=n, rotations=rot, size_index=idx, sizes_nm=sizes, variant=variant, pumped=pumped)


def _trilinear(tables_flat: jax.Array, n: int, offset: jax.Array, coords: jax.Array) -> jax.Array:
    """Trilinear interpolation of table `offset // n³` at grid coordinates `coords` (3, m); 0 outside."""
    i0 = jnp.floor(coords)
    frac = coords - i0
    i0 = i0.astype(jnp.int32)
    inside = jnp.all((i0 >= 0) & (i0 < n - 1), axis=0)
    i0 = jnp.clip(i0, 0, n - 2)
    base = offset + (i0[0] * n + i0[1]) * n + i0[2]
    out = jnp.zeros(coords.shape[1], tables_flat.dtype)
    for dx in (0, 1):
        wx = frac[0] if dx else 1.0 - frac[0]
        for dy in (0, 1):
            wxy = wx * (frac[1] if dy else 1.0 - frac[1])
            for dz in (0, 1):
                w = wxy * (frac[2] if dz else 1.0 - frac[2])
                out = out + w * tables_flat[base + (dx * n + dy) * n + dz]
    return jnp.where(inside, out, 0.0)


def _catmull_rom_weights(t: jax.Array) -> tuple[jax.Array, ...]:
    """Catmull–Rom weights of the samples at −1, 0, 1, 2 for a point at t ∈ [0, 1) between samples 0 and 1."""
    t2, t3 = t * t, t * t * t
    return (
        0.5 * (-t3 + 2.0 * t2 - t),
        0.5 * (3.0 * t3 - 5.0 * t2 + 2.0),
        0.5 * (-3.0 * t3 + 4.0 * t2 + t),
        0.5 * (t3 - t2),
    )


def _tricubic(tables_flat: jax.Array, n: int, offset: jax.Array, coords: jax.Array) -> jax.Array:
    """Catmull–Rom (tricubic) interpolation of table `offset // n³` at grid coordinates `coords` (3, m); 0 outside.

    Why not trilinear: averaged over a merge voxel, a trilinear interpolant of samples one voxel apart is the
    samples smoothed by [1/8, 3/4, 1/8] per axis, three times the voxel's own box average (variance v²/4 against
    v²/12). Bragg peaks of 4–7 nm crystals are 1.6–3 voxels wide, so that smoothing, which real data do not have,
    was the largest part of the demo fit's bias (docs/closed_loop.md). Catmull–Rom reproduces quadratics, so the
    voxel averages of its interpolant match the box averages of the tabulated intensity to fourth order. It can
    overshoot below zero next to a sharp peak; `bragg_photons` clips the sum at 0.
    """
    i0 = jnp.floor(coords)
    frac = coords - i0
    i0 = i0.astype(jnp.int32)
    inside = jnp.all((i0 >= 1) & (i0 < n - 2), axis=0)
    i0 = jnp.clip(i0, 1, n - 3)
    wx, wy, wz = (_catmull_rom_weights(frac[a]) for a in range(3))
    out = jnp.zeros(coords.shape[1], tables_flat.dtype)
    for dx in range(4):
        for dy in range(4):
            wxy = wx[dx] * wy[dy]
            base = offset + ((i0[0] + dx - 1) * n + (i0[1] + dy - 1)) * n + i0[2] - 1
            for dz in range(4):
                out = out + wxy * wz[dz] * tables_flat[base + dz]
    return jnp.where(inside, out, 0.0)


def bragg_photons(det: Detector, vol: Volumes, crystals: Crystals, interpolation: str = "cubic") -> jax.Array:
    """Expected crystal photons per pixel, (16, 512, 128) (jit-able; loops over the `n` crystals only).
    `interpolation` of the tables: "cubic" (Catmull–Rom, `_tricubic`) or "linear" (static)."""
    interp = _tricubic if interpolation == "cubic" else _trilinear
    crystals = Crystals(*(jnp.asarray(x) for x in crystals))  # truth read back from disk comes as numpy
    q_flat = det.q.reshape(-1, 3)
    n = vol.tables.shape[1]
    flat = vol.tables.reshape(-1)

    def one(i, acc):
        s = crystals.size_index[i]
        v = crystals.variant[i]
        t = jnp.where(v >= 0, vol.pumped_index[s, jnp.maximum(v, 0)], vol.dark_index[s])
        qc = q_flat @ crystals.rotations[i]  # row form of Rᵀ q
        coords = qc.T / vol.voxel + vol.origin_index
        return acc + interp(flat, n, t * n**3, coords)

    total = jax.lax.fori_loop(0, crystals.n, one, jnp.zeros(q_flat.shape[0], jnp.float32))
    return jnp.maximum(total, 0.0).reshape(det.scale.shape) * det.scale


@functools.partial(jax.jit, static_argnames="interpolation")
def expected_photons(det: Detector, vol: Volumes, crystals: Crystals, interpolation: str = "cubic") -> jax.Array:
    """λ = Bragg + diffuse ring, (16, 512, 128) expected photons per pixel."""
    return bragg_photons(det, vol, crystals, interpolation) + det.ring


def poisson_counts(key: jax.Array, lam: np.ndarray, bad: np.ndarray, noise: bool = True) -> np.ndarray:
    """Photon counts ~ Poisson(λ) (float32, bad pixels 0), drawn on the host by numpy from a generator seeded
    with `key`'s data (deterministic in `key`); λ itself when `noise` is False."""
    if not noise:
        counts = np.asarray(lam, np.float32).copy()
        counts[bad] = 0.0
        return counts
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    counts = rng.poisson(np.asarray(lam, np.float64)).astype(np.float32)
    counts[bad] = 0.0
    return counts


_draw = jax.jit(draw_crystals, static_argnums=(1, 2))


def _dispatch(key, det, vol, config, pumped: bool, crystal_key=None):
    k_cryst, k_noise = jax.random.split(key)
    if crystal_key is not None:  # paired classes: the crystals of the frame's pump group
        k_cryst = jax.random.split(crystal_key)[0]
    crystals = _draw(k_cryst, config, vol.n_variants, jnp.asarray(pumped))
    return expected_photons(det, vol, crystals, config.interpolation), crystals, k_noise


def simulate_frame(key: jax.Array, det: Detector, vol: Volumes, config: SyntheticConfig, pumped: bool):
    """One frame: (photons (16, 512, 128) float32 with bad pixels 0, Crystals truth as numpy)."""
    lam, crystals, k_noise = _dispatch(key, det, vol, config, pumped)
    counts = poisson_counts(k_noise, np.asarray(lam), np.asarray(det.bad), config.noise)
    return counts, jax.tree.map(np.asarray, crystals)


def frames(
    key: jax.Array,
    det: Detector,
    vol: Volumes,
    config: SyntheticConfig,
    layout: RunLayout,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[np.ndarray, Crystals]]:
    """Frames `start` .. `stop` − 1 of a run in train/pulse order (a generator: ~two frames in memory).

    Frame i is `simulate_frame(fold_in(key, i), ...)` with the pump state of the layout's bunch pattern, so a
    run can be generated in pieces (resumed) with identical results.
    """
    pumped = layout.pumped().reshape(-1)
    stop = layout.n_frames if stop is None else stop
    bad = np.asarray(det.bad)
    if not 0 <= start <= stop <= layout.n_frames:
        raise ValueError(f"frame range {start}..{stop} outside the run's {layout.n_frames} frames")
    if start == stop:
        return

    def dispatch(i):
        group = jax.random.fold_in(key, i - i % layout.pump_every) if config.paired else None
        return _dispatch(jax.random.fold_in(key, i), det, vol, config, bool(pumped[i]), group)

    pending = dispatch(start)
    for i in range(start, stop):
        lam, crystals, k_noise = pending
        if i + 1 < stop:  # asynchronous: XLA computes the next λ while numpy draws this frame's photons
            pending = dispatch(i + 1)
        yield poisson_counts(k_noise, np.asarray(lam), bad, config.noise), jax.tree.map(np.asarray, crystals)


def bad_pixel_mask(det: Detector) -> np.ndarray:
    """AGIPD `image.mask` (uint32, nonzero = bad) for the detector's bad pixels."""
    return np.asarray(det.bad).astype(np.uint32)
