"""Finite nanocrystals as jit/vmap-friendly pytrees.

A `Nanocrystal` holds atom positions in the crystal frame (Å, origin at the chosen centre site), a species
index per atom and a 0/1 mask so that crystals of different sizes can be padded to a common atom count and
batched with `jax.vmap`. Atoms are grouped by species in contiguous, statically known blocks; the fast
structure-factor engines use the blocks to run one matrix product per species instead of one per
species × atom.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxpolaron.errors import InputError
from jaxpolaron.structure import CrystalStructure

DEFAULT_EXPONENT = 5.0  # superellipsoid exponent of the paper (rounds the cube's corners)


class Nanocrystal(eqx.Module):
    """A finite crystal.

    Attributes:
        positions: (n, 3) atom positions in the crystal frame, Å; padded atoms sit at the origin.
        species: (n,) species index into `species_names`.
        mask: (n,) 1.0 for a real atom, 0.0 for padding (same dtype as positions).
        ideal: (n, 3) the atom's site in the untilted ideal perovskite, Å (same lattice vectors, fractional
            coordinates rounded to the nearest 1/4; notes/physics.md). positions - ideal is the Pnma tilt.
        size: () edge length of the envelope, Å (the s of the paper's Eq. 5).
        species_names: element symbol per species index.
        oxidation: formal charge per species index.
        blocks: (start, stop) of the contiguous atom block of each species.
    """

    positions: Float[Array, "n 3"]
    species: Int[Array, " n"]
    mask: Float[Array, " n"]
    ideal: Float[Array, "n 3"]
    size: Float[Array, ""]
    species_names: tuple[str, ...] = eqx.field(static=True)
    oxidation: tuple[int, ...] = eqx.field(static=True)
    blocks: tuple[tuple[int, int], ...] = eqx.field(static=True)

    @property
    def n_atoms(self) -> Array:
        """Number of real (unpadded) atoms."""
        return jnp.sum(self.mask)

    def composition(self) -> dict[str, int]:
        """Real atoms per element (host-side; not for use under jit)."""
        mask = np.asarray(self.mask) > 0
        species = np.asarray(self.species)
        return {n: int(np.sum(mask & (species == i))) for i, n in enumerate(self.species_names)}


def _as_crystal(
    structure: CrystalStructure, positions: np.ndarray, ideal: np.ndarray, species: np.ndarray, size_a: float
) -> Nanocrystal:
    order = np.argsort(species, kind="stable")
    positions, ideal, species = positions[order], ideal[order], species[order]
    counts = np.bincount(species, minlength=len(structure.species))
    stops = np.cumsum(counts)
    blocks = tuple((int(a), int(b)) for a, b in zip(stops - counts, stops, strict=True))
    return Nanocrystal(
        positions=jnp.asarray(positions, dtype=jnp.result_type(float)),
        species=jnp.asarray(species, jnp.int32),
        mask=jnp.ones(len(species), jnp.result_type(float)),
        ideal=jnp.asarray(ideal, dtype=jnp.result_type(float)),
        size=jnp.asarray(size_a, jnp.result_type(float)),
        species_names=structure.species,
        oxidation=structure.oxidation,
        blocks=blocks,
    )


def _block_of_atoms(structure: CrystalStructure, reach: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, ideal-perovskite sites (both Å, crystal frame) and species of all atoms within `reach` Å."""
    lengths = np.linalg.norm(structure.lattice, axis=1)
    n = int(np.ceil(reach / lengths.min())) + 1
    cells = np.array(list(itertools.product(range(-n, n + 1), repeat=3)), float)
    frac = (cells[:, None, :] + structure.frac[None]).reshape(-1, 3)
    rot = structure.pseudo_cubic.rotation
    pos = frac @ structure.lattice @ rot.T
    ideal = np.round(frac * 4.0) / 4.0 @ structure.lattice @ rot.T
    species = np.tile(structure.species_index, len(cells))
    keep = np.max(np.abs(pos), axis=1) <= reach
    return pos[keep], ideal[keep], species[keep]


def _centre_site(structure: CrystalStructure, centre: str) -> np.ndarray:
    """Crystal-frame position (3,) of the `centre` species' site nearest the unit-cell centre."""
    if centre not in structure.species:
        raise InputError(f"centre site {centre!r} is not a species of {structure.name} ({structure.species}).")
    index = structure.species.index(centre)
    frac = structure.frac[structure.species_index == index]
    mid = np.full(3, 0.5)
    nearest = frac[np.argmin(np.linalg.norm((frac - mid) @ structure.lattice, axis=1))]
    return nearest @ structure.lattice @ structure.pseudo_cubic.rotation.T


def cut_nanocrystal(
    structure: CrystalStructure,
    size_nm: float,
    *,
    exponent: float = DEFAULT_EXPONENT,
    centre: str = "Pb",
) -> Nanocrystal:
    """Cut a crystal of edge `size_nm` along the pseudo-cubic <100> axes with a superellipsoid envelope.

    An atom at crystal-frame position r (relative to the centre site) is kept when
    |x/h|^p + |y/h|^p + |z/h|^p <= 1 with h = size/2 and p = `exponent` (p -> ∞ is a cube, 2 a sphere).

    Args:
        structure: the periodic structure.
        size_nm: edge length in nm (> 0).
        exponent: superellipsoid exponent p (>= 1); the paper uses 5.0.
        centre: species whose site (nearest the cell centre) becomes the origin.
    """
    if not np.isfinite(size_nm) or size_nm <= 0:
        raise InputError(f"crystal size must be a positive number of nm, got {size_nm}.")
    if not np.isfinite(exponent) or exponent < 1:
        raise InputError(f"superellipsoid exponent must be >= 1, got {exponent}.")
    half = 5.0 * size_nm  # Å
    origin = _centre_site(structure, centre)
    pos, ideal, species = _block_of_atoms(structure, half + 2 * structure.pseudo_cubic.a_pc)
    pos, ideal = pos - origin, ideal - origin
    inside = np.sum(np.abs(pos / half) ** exponent, axis=1) <= 1.0 + 1e-9
    if not inside.any():
        raise InputError(f"a {size_nm} nm crystal contains no atoms.")
    return _as_crystal(structure, pos[inside], ideal[inside], species[inside], 2 * half)


# Cs vacancies of the DFT model beyond the 8 corners, as doubled pseudo-cubic coordinates of A sites
# (odd integers; ±5 is the outer layer for the 5-cell cube). "edges": one Cs on each of the 4 x- and
# 4 y-parallel edges, placed centrosymmetrically; "edges+facets": 4 edge and 4 facet Cs.
_EDGE_VACANCIES = {
    "edges": [
        (1, 5, 5),
        (-1, -5, -5),
        (-1, 5, -5),
        (1, -5, 5),
        (5, 1, 5),
        (-5, -1, -5),
        (5, -1, -5),
        (-5, 1, 5),
    ],
    "edges+facets": [
        (1, 5, 5),
        (-1, -5, -5),
        (-1, 5, -5),
        (1, -5, 5),
        (1, 1, 5),
        (-1, -1, -5),
        (-1, 1, 5),
        (1, -1, -5),
    ],
}


def dft_cube(
    structure: CrystalStructure,
    *,
    vacancies: str | Sequence[tuple[int, int, int]] = "edges",
) -> Nanocrystal:
    """The paper's DFT model cube: Cs200Pb125Br450 (SI S4).

    5×5×5 Pb (B sites) with their full Br octahedra (450 Br), inside the 6×6×6 frame of Cs (A sites);
    the 8 corner Cs and 8 more (`vacancies`) are removed. Sites are identified on the pseudo-cubic grid, so
    the atoms keep their Pnma positions. Requires a perovskite with its B site (Pb) at the origin.

    Args:
        structure: a perovskite structure with species Cs, Pb, Br.
        vacancies: "edges" (default), "edges+facets", or 8 A sites as doubled pseudo-cubic coordinates
            (odd integers, e.g. (1, 5, 5) = (0.5, 2.5, 2.5) cells from the centre Pb).
    """
    if not {"Cs", "Pb", "Br"} <= set(structure.species):
        raise InputError("the DFT cube needs a CsPbBr3 structure (species Cs, Pb, Br).")
    sites = _EDGE_VACANCIES.get(vacancies) if isinstance(vacancies, str) else list(vacancies)
    if sites is None:
        raise InputError(f"unknown vacancy pattern {vacancies!r}; use one of {sorted(_EDGE_VACANCIES)}.")
    if len(sites) != 8:
        raise InputError(f"the DFT cube needs exactly 8 extra Cs vacancies, got {len(sites)}.")
    origin = _centre_site(structure, "Pb")
    a_pc = structure.pseudo_cubic.a_pc
    pos, ideal, species = _block_of_atoms(structure, 4 * a_pc)
    pos, ideal = pos - origin, ideal - origin
    doubled = np.rint(2 * pos @ np.linalg.inv(structure.pseudo_cubic_axes())).astype(int)
    name = np.array(structure.species)[species]
    odd = doubled % 2 == 1
    n_odd = odd.sum(axis=1)
    keep = np.zeros(len(pos), bool)
    keep |= (name == "Pb") & (n_odd == 0) & (np.abs(doubled) <= 4).all(axis=1)
    keep |= (name == "Br") & (n_odd == 1) & (np.abs(doubled) <= 5).all(axis=1)
    corner = (np.abs(doubled) == 5).all(axis=1)
    removed = {tuple(s) for s in sites}
    extra = np.array([tuple(d) in removed for d in doubled])
    keep |= (name == "Cs") & (n_odd == 3) & (np.abs(doubled) <= 5).all(axis=1) & ~corner & ~extra
    crystal = _as_crystal(structure, pos[keep], ideal[keep], species[keep], 5 * a_pc)
    if crystal.composition() != {"Cs": 200, "Pb": 125, "Br": 450}:
        raise InputError(f"DFT cube came out as {crystal.composition()}; check the vacancy sites {sites}.")
    return crystal


def pad(crystal: Nanocrystal, block_sizes: Sequence[int]) -> Nanocrystal:
    """Pad each species block to `block_sizes[s]` atoms (mask 0, at the origin) so crystals can be stacked."""
    pieces_p, pieces_i, pieces_s, pieces_m, blocks = [], [], [], [], []
    start = 0
    for s, ((a, b), n) in enumerate(zip(crystal.blocks, block_sizes, strict=True)):
        if n < b - a:
            raise ValueError(f"block {s} has {b - a} atoms, cannot pad to {n}")
        extra = n - (b - a)
        pieces_p += [crystal.positions[a:b], jnp.zeros((extra, 3), crystal.positions.dtype)]
        pieces_i += [crystal.ideal[a:b], jnp.zeros((extra, 3), crystal.ideal.dtype)]
        pieces_s += [crystal.species[a:b], jnp.full((extra,), s, jnp.int32)]
        pieces_m += [crystal.mask[a:b], jnp.zeros((extra,), crystal.mask.dtype)]
        blocks.append((start, start + n))
        start += n
    return Nanocrystal(
        positions=jnp.concatenate(pieces_p),
        species=jnp.concatenate(pieces_s),
        mask=jnp.concatenate(pieces_m),
        ideal=jnp.concatenate(pieces_i),
        size=crystal.size,
        species_names=crystal.species_names,
        oxidation=crystal.oxidation,
        blocks=tuple(blocks),
    )


def stack(crystals: Sequence[Nanocrystal], multiple: int = 256) -> Nanocrystal:
    """Pad crystals to common species blocks (rounded up to `multiple`) and stack them along axis 0."""
    sizes = [max(c.blocks[s][1] - c.blocks[s][0] for c in crystals) for s in range(len(crystals[0].blocks))]
    sizes = [int(np.ceil(n / multiple) * multiple) for n in sizes]
    padded = [pad(c, sizes) for c in crystals]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)
