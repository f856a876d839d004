"""The `simulate` job: configuration in, dark/pump/difference volumes and a peak table out.

No file I/O here (the CLI reads the CIF path through `structure.read_cif` and writes results through `io`);
this module wires structure -> crystals -> scattering -> q sampling -> engines -> ensemble -> metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from jaxpolaron.ensemble import (
    DEFAULT_GAMMA_SHAPE,
    DEFAULT_MEAN_NM,
    DEFAULT_SIZES_NM,
    GammaSizes,
    ensemble_average,
    size_crystals,
    size_intensities,
    validate_sizes,
)
from jaxpolaron.errors import InputError
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
from jaxpolaron.structure_factor import ENGINES

MODELS = ("none",)
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

    def validate(self) -> None:
        """Raise InputError for values no simulation can use."""
        if self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}; available: {', '.join(MODELS)}.")
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


def simulate(
    structure: CrystalStructure,
    config: SimulateConfig,
    *,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> SimulationResult:
    """Run the configured simulation (model 'none': pump = dark, ΔI = 0)."""
    config.validate()
    check_reachable(structure, config)
    charges = structure.oxidation if config.ions else None
    scattering = scattering_factors(structure.species, config.energy_kev, charges=charges)
    sizes = (config.size_nm,) if config.size_nm is not None else tuple(config.sizes_nm)
    crystals = size_crystals(structure, sizes, exponent=config.exponent, centre=config.centre)
    distribution = GammaSizes(config.gamma_shape, config.mean_nm)
    weights = (
        jnp.ones(1, jnp.result_type(float)) if config.size_nm is not None else distribution.weights(jnp.asarray(sizes))
    )

    def averaged(q: Grid) -> np.ndarray:
        per_size = size_intensities(crystals, scattering, q, engine=config.engine, progress=progress)  # type: ignore[arg-type]
        if config.size_nm is not None:
            return np.asarray(per_size[0])
        return np.asarray(ensemble_average(per_size, jnp.asarray(sizes), distribution))

    volumes: list[VolumeResult] = []
    peaks: dict[str, dict] = {}
    if config.hkls:
        windows = hkl_windows(structure, config.hkls, shape=config.window_shape, voxel=config.window_voxel)
        dark = averaged(windows)
        pump = dark.copy()  # no deformation model yet
        for i, hkl in enumerate(config.hkls):
            axes = tuple(np.asarray(a) for a in grid_item(windows, i).axes())
            volumes.append(VolumeResult(f"hkl_{hkl_label(hkl)}", axes, dark[i], pump[i], tuple(hkl)))  # type: ignore[arg-type]
        peaks = peak_table(windows, config.hkls, jnp.asarray(dark), jnp.asarray(pump))
    if config.grid is not None:
        grid = full_grid(config.grid, config.grid_q_max)
        dark = averaged(grid)
        axes = tuple(np.asarray(a) for a in grid.axes())
        volumes.append(VolumeResult("grid", axes, dark, dark.copy(), None))  # type: ignore[arg-type]
    return SimulationResult(
        volumes=volumes,
        peaks=peaks,
        sizes_nm=sizes,
        weights=tuple(float(w) for w in np.asarray(weights)),
        n_atoms=tuple(int(c.n_atoms) for c in crystals),
    )
