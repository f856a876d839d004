"""DFT geometry and density files: `.xyz` atom coordinates and Gaussian `.cube` volumetric densities.

The only module that opens `.xyz`/`.cube` files (through ASE). Everything it returns is host-side numpy,
in Å and electrons/Å³:

- `read_xyz`: element symbols and positions (n, 3) in Å. Plain XYZ (as CP2K writes its trajectories) and
  extended XYZ both work; of a multi-frame file the last frame is taken (a geometry optimisation's result).
- `read_cube`: a `CubeDensity`. Cube files store lengths in Bohr and, for CP2K densities, values in
  electrons/Bohr³ (SI S4 of the paper: "all spatial dimensions are expressed in units of the Bohr radius");
  both are converted here with a0 = `ase.units.Bohr` = 0.529177 Å. Voxel (i, j, k) is the point sample at
  origin + i·axes[0] + j·axes[1] + k·axes[2] (the cube-format convention).

Mistakes in the files (missing, empty, unparsable, NaN values, unknown elements) raise `InputError` with
one sentence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase.data import chemical_symbols
from ase.units import Bohr

from jaxpolaron.errors import InputError

BOHR_A = float(Bohr)  # Å per Bohr radius


@dataclasses.dataclass(frozen=True)
class CubeDensity:
    """A volumetric density read from a cube file, in Å and electrons/Å³ (host-side numpy).

    Attributes:
        origin: (3,) position of voxel (0, 0, 0), Å (the file's frame).
        axes: (3, 3) voxel step vectors as rows (axes[0] moves index i by one), Å.
        data: (nx, ny, nz) density at the voxel points, electrons/Å³.
        symbols: element symbol per atom listed in the file.
        positions: (n_atoms, 3) atom positions, Å (same frame as `origin`).
    """

    origin: np.ndarray
    axes: np.ndarray
    data: np.ndarray
    symbols: tuple[str, ...]
    positions: np.ndarray

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel, Å³ (|det axes|)."""
        return float(abs(np.linalg.det(self.axes)))

    def total_charge(self) -> float:
        """Σ ρ ΔV over the grid: the number of electrons the density holds."""
        return float(np.sum(self.data) * self.voxel_volume)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _existing(path: str | Path, kind: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{kind} file {str(p)!r} does not exist.")
    if p.stat().st_size == 0:
        raise InputError(f"{kind} file {str(p)!r} is empty.")
    return p


def _symbols(numbers: np.ndarray, path: Path, kind: str) -> list[str]:
    bad = [int(z) for z in numbers if not 1 <= int(z) < len(chemical_symbols)]
    if bad:
        raise InputError(f"{kind} file {str(path)!r} lists an unknown element (atomic number {bad[0]}).")
    return [chemical_symbols[int(z)] for z in numbers]


def read_xyz(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read atoms from an XYZ file (the last frame of a multi-frame file).

    Args:
        path: `.xyz` file (plain or extended XYZ), positions in Å.

    Returns:
        (symbols, positions): element symbols (n,) and positions (n, 3) float64 in Å, in file order.
    """
    p = _existing(path, "XYZ")
    try:
        atoms: Any = ase.io.read(p, index=-1, format="extxyz")
    except KeyError as err:  # ASE's lookup of an unknown element symbol
        raise InputError(f"XYZ file {str(p)!r} lists an unknown element {_one_line(err)}.") from err
    except Exception as err:
        raise InputError(f"cannot read {str(p)!r} as an XYZ file: {_one_line(err)}.") from err
    positions = np.asarray(atoms.positions, np.float64)
    if len(atoms) == 0:
        raise InputError(f"XYZ file {str(p)!r} contains no atoms.")
    if not np.all(np.isfinite(positions)):
        raise InputError(f"XYZ file {str(p)!r} has non-finite (NaN or inf) coordinates.")
    return _symbols(atoms.numbers, p, "XYZ"), positions


def read_cube(path: str | Path) -> CubeDensity:
    """Read a Gaussian cube file holding a density in electrons/Bohr³ (CP2K's convention).

    Args:
        path: `.cube` file; header lengths in Bohr, values in electrons/Bohr³.

    Returns:
        A `CubeDensity` in Å and electrons/Å³ (values divided by a0³).
    """
    p = _existing(path, "cube")
    try:
        # ase.io.cube.read_cube_data drops the origin and voxel vectors; full_output keeps them.
        out: Any = ase.io.read(p, format="cube", read_data=True, full_output=True)
    except Exception as err:
        raise InputError(f"cannot read {str(p)!r} as a cube file: {_one_line(err)}.") from err
    data = np.asarray(out["data"], np.float64)
    if data.ndim != 3 or data.size == 0:
        raise InputError(f"cube file {str(p)!r} holds no 3D grid of values.")
    if not np.all(np.isfinite(data)):
        raise InputError(f"cube file {str(p)!r} has non-finite (NaN or inf) density values.")
    axes = np.asarray(out["spacing"], np.float64)
    if abs(np.linalg.det(axes)) <= 0:
        raise InputError(f"cube file {str(p)!r} has degenerate voxel vectors (zero voxel volume).")
    atoms = out["atoms"]
    return CubeDensity(
        origin=np.asarray(out["origin"], np.float64),
        axes=axes,
        data=data / BOHR_A**3,
        symbols=tuple(_symbols(atoms.numbers, p, "cube")),
        positions=np.asarray(atoms.positions, np.float64),
    )
