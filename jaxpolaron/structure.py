"""Crystal structures (unit cell, species, symmetry-expanded sites) read from CIF with gemmi.

The pseudo-cubic setting of a perovskite (a_pc and the three pseudo-cubic axes expressed in the
conventional cell) is *derived* here from the lattice, never typed in; see `derive_pseudo_cubic`.

Frames:
- "ortho Cartesian": gemmi's orthogonalisation of the conventional cell (a along x for orthorhombic cells).
- "crystal frame": orthonormal axes closest to the three pseudo-cubic axes (x ≈ p1, y ≈ p2, z ≈ p3).
  Nanocrystals, q grids and volumes all live in the crystal frame.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np
from numpy.typing import ArrayLike

from jaxpolaron.errors import InputError

BUNDLED_CIF = "CsPbBr3_Pnma_mp-567629.cif"

# Tolerances for recognising a pseudo-cubic subcell: lengths within 5 % of (V/Z)^(1/3), angles within 5°.
_PC_LENGTH_TOL = 0.05
_PC_ANGLE_TOL_DEG = 5.0


@dataclasses.dataclass(frozen=True, eq=False)
class PseudoCubic:
    """Pseudo-cubic setting of a perovskite-like cell.

    Attributes:
        a_pc: pseudo-cubic lattice parameter (V/Z)^(1/3), Å.
        basis_frac: (3, 3) rows p1, p2, p3 in fractional coordinates of the conventional cell.
        rotation: (3, 3) orthonormal matrix taking ortho-Cartesian vectors into the crystal frame.
    """

    a_pc: float
    basis_frac: np.ndarray
    rotation: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class CrystalStructure:
    """A periodic structure with its symmetry-expanded unit-cell content (host-side numpy data).

    Attributes:
        name: data-block name of the CIF.
        lattice: (3, 3) rows a, b, c in ortho-Cartesian coordinates, Å.
        species: element symbols, one per species index (order of first appearance in the CIF).
        oxidation: formal charge per species (from `_atom_type_oxidation_number`, 0 where absent).
        frac: (n_cell, 3) fractional coordinates of all atoms in one unit cell, in [0, 1).
        species_index: (n_cell,) species index of each atom.
        z_formula: formula units per cell.
        source: where the structure came from (path and sha256 of the file).
        pseudo_cubic: the derived pseudo-cubic setting.
    """

    name: str
    lattice: np.ndarray
    species: tuple[str, ...]
    oxidation: tuple[int, ...]
    frac: np.ndarray
    species_index: np.ndarray
    z_formula: int
    source: str
    pseudo_cubic: PseudoCubic

    @property
    def volume(self) -> float:
        """Unit-cell volume, Å³."""
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def reciprocal(self) -> np.ndarray:
        """(3, 3) rows a*, b*, c* in ortho-Cartesian coordinates, Å⁻¹ (a_i·b_j = δ_ij, no 2π)."""
        return np.linalg.inv(self.lattice).T

    def cartesian_positions(self) -> np.ndarray:
        """(n_cell, 3) atom positions of one unit cell in the crystal frame, Å."""
        return self.frac @ self.lattice @ self.pseudo_cubic.rotation.T

    def hkl_to_ortho(self, hkl: ArrayLike) -> np.ndarray:
        """Pseudo-cubic (..., 3) Miller indices -> conventional-cell indices (..., 3) (may be non-integer)."""
        return np.asarray(hkl, float) @ np.linalg.inv(self.pseudo_cubic.basis_frac).T

    def q_of_hkl(self, hkl: ArrayLike) -> np.ndarray:
        """Reciprocal-lattice vector of pseudo-cubic (..., 3) hkl in the crystal frame, Å⁻¹ (..., 3)."""
        return self.hkl_to_ortho(hkl) @ self.reciprocal @ self.pseudo_cubic.rotation.T

    def pseudo_cubic_axes(self) -> np.ndarray:
        """(3, 3) rows p1, p2, p3 in the crystal frame, Å."""
        return self.pseudo_cubic.basis_frac @ self.lattice @ self.pseudo_cubic.rotation.T


def derive_pseudo_cubic(lattice: np.ndarray, z_formula: int) -> PseudoCubic:
    """Find the pseudo-cubic subcell of a perovskite-like lattice.

    Candidates are the half-integer combinations n/2 (n ∈ {-2..2}³) of the cell vectors whose length is
    within 5 % of a_pc = (V/Z)^(1/3). Among triples spanning exactly V/Z and closest to orthogonal, the
    right-handed permutation/sign choice closest to the conventional axes is kept (largest trace of the
    normalised axes; ties broken by the lexicographically largest fractional basis), which makes the
    choice deterministic.

    Args:
        lattice: (3, 3) rows a, b, c in Å.
        z_formula: formula units per cell (one pseudo-cubic cell per formula unit).

    Raises:
        InputError: when no such subcell exists (the structure is not perovskite-like).
    """
    volume = abs(np.linalg.det(lattice))
    a_pc = (volume / z_formula) ** (1.0 / 3.0)
    candidates: list[np.ndarray] = []
    for n in itertools.product(range(-2, 3), repeat=3):
        v = np.array(n, float) / 2.0
        if not np.any(n) or tuple(-x for x in n) in [tuple(c * 2) for c in candidates]:
            continue
        if abs(np.linalg.norm(v @ lattice) - a_pc) <= _PC_LENGTH_TOL * a_pc:
            candidates.append(v)
    best: tuple[float, float, tuple[float, ...], np.ndarray] | None = None
    cos_tol = math.sin(math.radians(_PC_ANGLE_TOL_DEG))
    for trio in itertools.combinations(candidates, 3):
        frac = np.array(trio)
        if not math.isclose(abs(np.linalg.det(frac)), 1.0 / z_formula, rel_tol=1e-6):
            continue
        cart = frac @ lattice
        unit = cart / np.linalg.norm(cart, axis=1, keepdims=True)
        worst_cos = max(abs(unit[i] @ unit[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
        if worst_cos > cos_tol:
            continue
        for perm in itertools.permutations(range(3)):
            for signs in itertools.product((1.0, -1.0), repeat=3):
                f = frac[list(perm)] * np.array(signs)[:, None]
                if np.linalg.det(f) <= 0:
                    continue
                u = unit[list(perm)] * np.array(signs)[:, None]
                key = (-round(worst_cos, 9), round(float(np.trace(u)), 9), tuple(np.round(f.ravel(), 9)))
                if best is None or key > best[:3]:
                    best = (*key, f)
    if best is None:
        raise InputError(
            f"no pseudo-cubic subcell found: the cell is not perovskite-like (a_pc = {a_pc:.3f} Å, Z = {z_formula})."
        )
    basis_frac = best[3]
    axes = basis_frac @ lattice
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(axes)
    return PseudoCubic(a_pc=float(a_pc), basis_frac=basis_frac, rotation=u @ vt)


def _oxidation_numbers(block: gemmi.cif.Block) -> dict[str, int]:
    symbols = list(block.find_values("_atom_type_symbol"))
    numbers = list(block.find_values("_atom_type_oxidation_number"))
    if len(symbols) != len(numbers):
        return {}
    out = {}
    for sym, num in zip(symbols, numbers, strict=True):
        element = gemmi.Element(gemmi.cif.as_string(sym)).name
        out[element] = round(gemmi.cif.as_number(num))
    return out


def read_cif(path: str | Path | None = None) -> CrystalStructure:
    """Read a CIF (default: the bundled Pnma CsPbBr3) into a symmetry-expanded `CrystalStructure`.

    Raises:
        InputError: missing/unparsable file, an unknown element symbol, no sites, or no pseudo-cubic subcell.
    """
    if path is None:
        ref = resources.files("jaxpolaron") / "data" / BUNDLED_CIF
        text = ref.read_bytes()
        label = f"jaxpolaron/data/{BUNDLED_CIF}"
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"CIF file {str(p)!r} does not exist.")
        text = p.read_bytes()
        label = str(p.resolve())
    try:
        doc = gemmi.cif.read_string(text.decode("utf-8", errors="replace"))
        block = doc.sole_block()
        small = gemmi.make_small_structure_from_block(block)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"cannot parse CIF {label}: {str(exc).splitlines()[0]}") from None
    if not small.sites:
        raise InputError(f"CIF {label} has no atom sites (_atom_site_fract_x/y/z loop missing).")
    for site in small.sites:
        if site.element.atomic_number == 0:
            raise InputError(f"CIF {label}: site {site.label!r} has unknown element symbol {site.type_symbol!r}.")
    if small.cell.a <= 0 or small.cell.volume <= 0:
        raise InputError(f"CIF {label} has no valid unit cell.")
    all_sites = small.get_all_unit_cell_sites()
    species: list[str] = []
    for site in small.sites:
        if site.element.name not in species:
            species.append(site.element.name)
    frac = np.array([[s.fract.x, s.fract.y, s.fract.z] for s in all_sites]) % 1.0
    index = np.array([species.index(s.element.name) for s in all_sites], np.int32)
    lattice = np.array(small.cell.orth.mat.tolist()).T  # gemmi's columns are a, b, c
    counts = np.bincount(index, minlength=len(species))
    z_value = block.find_value("_cell_formula_units_Z")
    z_formula = int(gemmi.cif.as_int(z_value)) if z_value else int(functools.reduce(math.gcd, counts.tolist()))
    ox = _oxidation_numbers(block)
    order = np.argsort(index, kind="stable")  # group atoms by species
    return CrystalStructure(
        name=block.name,
        lattice=lattice,
        species=tuple(species),
        oxidation=tuple(ox.get(s, 0) for s in species),
        frac=frac[order],
        species_index=index[order],
        z_formula=z_formula,
        source=f"{label} (sha256 {hashlib.sha256(text).hexdigest()[:16]})",
        pseudo_cubic=derive_pseudo_cubic(lattice, z_formula),
    )
