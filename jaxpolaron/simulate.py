"""The `simulate` job: configuration in, dark/pump/difference volumes and a peak table out.

No file I/O here (the CLI reads the CIF path through `structure.read_cif` and writes results through `io`);
this module wires structure -> crystals -> scattering -> q sampling -> engines -> ensemble -> metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxpolaron.accurate_difference import accurate_engine, outside_validated_range
from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation import (
    CentralHole,
    Deformation,
    PhononMode,
    RandomHole,
    TiltRelaxation,
    external_pair,
)
from jaxpolaron.deformation.charge_field import DEFAULT_AMPLITUDE as CHARGE_DEFAULT_AMPLITUDE
from jaxpolaron.deformation.phonon import DEFAULT_WIDTH_FRACTION as PHONON_DEFAULT_WIDTH
from jaxpolaron.deformation.tilt import DEFAULT_WIDTH_FRACTION as TILT_DEFAULT_WIDTH
from jaxpolaron.ensemble import (
    DEFAULT_GAMMA_SHAPE,
    DEFAULT_MEAN_NM,
    DEFAULT_SIZES_NM,
    METHODS,
    GammaSizes,
    Method,
    pumped_difference,
    size_crystals,
    validate_sizes,
)
from jaxpolaron.errors import InputError
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import DEFAULT_NODES, valid_node_count
from jaxpolaron.metrics import peak_table
from jaxpolaron.reciprocal import (
    DEFAULT_WINDOW_SHAPE,
    DEFAULT_WINDOW_VOXEL,
    Grid,
    full_grid,
    grid_item,
    hkl_label,
    hkl_windows,
)
from jaxpolaron.scattering import DEFAULT_ENERGY_KEV, scattering_factors, wavelength_a
from jaxpolaron.structure import CrystalStructure
from jaxpolaron.structure_factor import ENGINES, intensity

MODELS = ("none", "central-hole", "random-hole", "tilt", "phonon", "external")
PHONON_DEFAULT_AMPLITUDE = 0.02  # Å, axial Br; Cannelli et al. give ratios only
DEFAULT_HKLS = ((2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0))


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """Everything that defines a simulation (saved as JSON beside every output).

    Sizes in nm, q in Å⁻¹, energy in keV. `size_nm` simulates one crystal; otherwise the Gamma ensemble
    over `sizes_nm` is used.
    """

    cif: str | None = None
    model: str = "none"
    size_nm: float | None = None
    sizes_nm: tuple[float, ...] = DEFAULT_SIZES_NM
    gamma_shape: float = DEFAULT_GAMMA_SHAPE
    mean_nm: float = DEFAULT_MEAN_NM
    exponent: float = 5.0
    centre: str = "Pb"
    hkls: tuple[tuple[int, int, int], ...] = DEFAULT_HKLS
    window_shape: int = DEFAULT_WINDOW_SHAPE
    window_voxel: float = DEFAULT_WINDOW_VOXEL
    grid: int | None = None
    grid_q_max: float = 0.75
    energy_kev: float = DEFAULT_ENERGY_KEV
    ions: bool = False
    engine: str = "auto"
    x64: bool = False
    # pumped ensemble
    method: str = "linear"
    holes: int = 64
    nodes: int = DEFAULT_NODES
    seed: int = 0
    gamma0_t: float = 1.0
    gamma_ratio: float = 0.4
    # model parameters (None: the model's own default)
    k_cs: float = 1.0
    k_pb: float = 1.0
    k_br: float = 1.0
    hole_bias: float = 0.1
    electron_strength: float = 1.0
    softening_a: float = 1.0
    amplitude: float | None = None
    t0: float = 0.8
    width_fraction: float | None = None
    tilt_profile: str = "quadratic"
    ground_xyz: str | None = None
    excited_xyz: str | None = None

    def validate(self) -> None:
        """Raise InputError for values no simulation can use."""
        if self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}; available: {', '.join(MODELS)}.")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}.")
        if self.holes < 1:
            raise InputError(f"--holes must be >= 1, got {self.holes}.")
        if not valid_node_count(self.nodes):
            raise InputError(f"--nodes must be a power of two >= 32, got {self.nodes}.")
        if self.method == "accurate" and self.model != "random-hole":
            raise InputError(f"--accurate is for --model random-hole; use --exact for {self.model}.")
        if min(self.k_cs, self.k_pb, self.k_br) <= 0:
            raise InputError("spring constants --k-cs/--k-pb/--k-br must be positive.")
        if not 0 < self.hole_bias <= 1:
            raise InputError(f"--hole-bias must be in (0, 1], got {self.hole_bias}.")
        if self.softening_a <= 0:
            raise InputError(f"--softening-a must be positive, got {self.softening_a}.")
        if self.gamma0_t < 0 or self.gamma_ratio < 0:
            raise InputError("occupancy parameters --gamma0-t and --gamma-ratio must be >= 0.")
        if self.model == "external" and not (self.ground_xyz and self.excited_xyz):
            raise InputError("--model external needs --ground-xyz and --excited-xyz.")
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}.")
        if self.size_nm is not None:
            validate_sizes([self.size_nm])
        else:
            validate_sizes(self.sizes_nm)
            if not (self.gamma_shape > 0 and self.mean_nm > 0):
                raise InputError("the Gamma size distribution needs shape > 0 and mean > 0 nm.")
        if not self.hkls and self.grid is None:
            raise InputError("nothing to simulate: give --hkl windows and/or --grid.")
        if self.grid is not None and not 8 <= self.grid <= 1024:
            raise InputError(f"--grid must be between 8 and 1024 samples per axis, got {self.grid}.")
        if self.window_shape < 3 or self.window_voxel <= 0:
            raise InputError("windows need at least 3 voxels per axis and a positive voxel size.")


@dataclasses.dataclass(frozen=True)
class VolumeResult:
    """One simulated volume: name, axes (qx, qy, qz) Å⁻¹, dark/pump (nx, ny, nz) e², hkl for windows."""

    name: str
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    dark: np.ndarray
    pump: np.ndarray
    hkl: tuple[int, int, int] | None


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    volumes: list[VolumeResult]
    peaks: dict[str, dict]
    sizes_nm: tuple[float, ...]
    weights: tuple[float, ...]
    n_atoms: tuple[int, ...]


def check_reachable(structure: CrystalStructure, config: SimulateConfig) -> None:
    """Every requested q must lie within the 2/λ reachable at the beam energy (|q| = 2 sin θ / λ)."""
    q_reach = 2.0 / wavelength_a(config.energy_kev)
    half = config.window_voxel * (config.window_shape // 2) * np.sqrt(3.0)
    for hkl in config.hkls:
        q = float(np.linalg.norm(structure.q_of_hkl(hkl)))
        if q + half > q_reach:
            raise InputError(
                f"hkl {hkl_label(hkl)} (|q| = {q:.3f} Å⁻¹ plus its window) is out of range: "
                f"at {config.energy_kev} keV only |q| <= 2/λ = {q_reach:.3f} Å⁻¹ is reachable."
            )
    if config.grid is not None and config.grid_q_max * np.sqrt(3.0) > q_reach:
        raise InputError(
            f"--grid-q-max {config.grid_q_max} Å⁻¹ reaches beyond 2/λ = {q_reach:.3f} Å⁻¹ at the grid corners."
        )


def build_model(config: SimulateConfig, structure: CrystalStructure, crystal: Nanocrystal) -> Deformation | None:
    """The configured deformation model for `crystal` (None for model 'none'; 'external' is built by `simulate`)."""
    springs = {"Cs": config.k_cs, "Pb": config.k_pb, "Br": config.k_br}
    k = [springs.get(name, 1.0) for name in crystal.species_names]
    charge_amplitude = CHARGE_DEFAULT_AMPLITUDE if config.amplitude is None else config.amplitude
    if config.model in ("central-hole", "random-hole"):
        common = {
            "softening": config.softening_a,
            "electron_strength": config.electron_strength,
            "amplitude": charge_amplitude,
        }
        if config.model == "central-hole":
            return CentralHole.for_crystal(crystal, k=k, **common)
        return RandomHole.for_crystal(crystal, k=k, hole_bias=config.hole_bias, **common)
    if config.model == "tilt":
        width = TILT_DEFAULT_WIDTH if config.width_fraction is None else config.width_fraction
        return TiltRelaxation(t0=config.t0, width_fraction=width, profile=config.tilt_profile)  # type: ignore[arg-type]
    if config.model == "phonon":
        return PhononMode.from_structure(
            structure,
            amplitude=PHONON_DEFAULT_AMPLITUDE if config.amplitude is None else config.amplitude,
            width_fraction=PHONON_DEFAULT_WIDTH if config.width_fraction is None else config.width_fraction,
        )
    return None


def simulate(
    structure: CrystalStructure,
    config: SimulateConfig,
    *,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> SimulationResult:
    """Run the configured simulation: dark and pumped size-ensemble intensities and their difference.

    Each size is simulated with its own crystal and hole samples (sub-keys of `config.seed`); the ensemble
    averages dark and ΔI with the Gamma weights; pump = dark + ΔI.
    """
    config.validate()
    check_reachable(structure, config)
    charges = structure.oxidation if config.ions else None
    scattering = scattering_factors(structure.species, config.energy_kev, charges=charges)
    occupancy = Occupancy(config.gamma0_t, config.gamma_ratio)
    if config.model == "external":
        geometry = external_pair(
            str(config.ground_xyz), str(config.excited_xyz), species_order=structure.species, centre=config.centre
        )
        crystals = [geometry.crystal]
        models: list[Deformation | None] = [with_amplitude(geometry.displacement, config.amplitude)]
        sizes: tuple[float, ...] = (float(geometry.crystal.size) / 10.0,)
        weights = np.ones(1)
    else:
        sizes = (config.size_nm,) if config.size_nm is not None else tuple(config.sizes_nm)
        crystals = size_crystals(structure, sizes, exponent=config.exponent, centre=config.centre)
        models = [build_model(config, structure, c) for c in crystals]
        if config.method == "accurate" and isinstance(models[0], RandomHole):
            warning = outside_validated_range(models[0])
            if warning:
                logging.getLogger(__name__).warning(warning)
        weights = (
            np.ones(1)
            if config.size_nm is not None
            else np.asarray(GammaSizes(config.gamma_shape, config.mean_nm).weights(jnp.asarray(sizes)))
        )
    key = jax.random.key(config.seed)

    method: Method = config.method  # type: ignore[assignment]  # validated above

    def averaged(q: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Gamma-weighted dark and ΔI over the sizes (running sums: one size in memory at a time)."""
        dark: np.ndarray | None = None
        diff: np.ndarray | None = None
        for i in progress(range(len(crystals))):
            crystal, model = crystals[i], models[i]
            if model is None:
                i0, d = intensity(crystal, scattering, q, config.engine), None  # type: ignore[arg-type]
            else:
                i0, d = pumped_difference(
                    crystal,
                    scattering,
                    q,
                    model,
                    occupancy,
                    key=jax.random.fold_in(key, i),
                    n_holes=config.holes,
                    method=method,
                    nodes=config.nodes,
                    engine=config.engine,  # type: ignore[arg-type]
                    accurate_engine=accurate_engine(q) if method == "accurate" and isinstance(q, Grid) else "auto",
                )
            w_dark = weights[i] * np.asarray(i0)
            w_diff = np.zeros_like(w_dark) if d is None else weights[i] * np.asarray(d)
            dark = w_dark if dark is None else dark + w_dark
            diff = w_diff if diff is None else diff + w_diff
        assert dark is not None and diff is not None
        return dark, diff

    volumes: list[VolumeResult] = []
    peaks: dict[str, dict] = {}
    if config.hkls:
        windows = hkl_windows(structure, config.hkls, shape=config.window_shape, voxel=config.window_voxel)
        dark, diff = averaged(windows)
        pump = dark + diff
        for i, hkl in enumerate(config.hkls):
            axes = tuple(np.asarray(a) for a in grid_item(windows, i).axes())
            volumes.append(VolumeResult(f"hkl_{hkl_label(hkl)}", axes, dark[i], pump[i], tuple(hkl)))  # type: ignore[arg-type]
        peaks = peak_table(windows, config.hkls, jnp.asarray(dark), jnp.asarray(pump))
    if config.grid is not None:
        grid = full_grid(config.grid, config.grid_q_max)
        dark, diff = averaged(grid)
        axes = tuple(np.asarray(a) for a in grid.axes())
        volumes.append(VolumeResult("grid", axes, dark, dark + diff, None))  # type: ignore[arg-type]
    return SimulationResult(
        volumes=volumes,
        peaks=peaks,
        sizes_nm=sizes,
        weights=tuple(float(w) for w in weights),
        n_atoms=tuple(int(c.n_atoms) for c in crystals),
    )


def with_amplitude(model: Deformation, amplitude: float | None) -> Deformation:
    """`model` with its `amplitude` field replaced (unchanged when amplitude is None)."""
    if amplitude is None:
        return model
    return eqx.tree_at(lambda m: m.amplitude, model, jnp.asarray(amplitude, jnp.result_type(float)))
