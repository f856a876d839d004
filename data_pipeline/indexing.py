"""Sparse indexing of still diffraction patterns (the paper's modified SPIND), several crystals per frame.

SPIND (Li et al., IUCrJ 6, 72 (2019)) indexes patterns with few peaks by matching *pairs* of peaks to pairs
of reciprocal-lattice vectors: |q| is orientation independent, and so is the angle between two q vectors.
Following the paper's modification, reference pairs are not read from a pre-generated table but generated on
the fly: the reflections whose |G| matches a peak's |q| are looked up in a sorted list of |G|, and the
pairs among them are filtered by angle. Each matching pair fixes an orientation; the orientation that
indexes the most peaks wins.

Per frame (host-side numpy, vectorised over candidate orientations; a frame has ~3–50 peaks):
1. Seeds: the `n_seed_peaks` strongest peaks; every pair of them that is not nearly collinear.
2. For a seed pair (p1, p2): reflections G1, G2 with ||G| − |p|| < q_tol and ∠(G1, G2) within
   angle_tol of ∠(p1, p2); the rotation R taking the triad of (G1, G2) onto that of (p1, p2).
3. Score: a peak is indexed by R when Rᵀp lies within match_tol (Å⁻¹) of a reciprocal-lattice point.
   The candidate with most indexed peaks (then the smallest mean residual) is refined by least squares
   (weighted Kabsch on the indexed peaks) and re-scored.
4. Accepted when it indexes at least `min_peaks` and its orientation is determined to better than
   `max_orientation_sigma_deg` (`orientation_sigma_deg`); its peaks are removed and the frame is searched
   again for another crystal. Frames with no crystal in that round get a second round at
   `min_peaks_second_round` (the paper: 4, then 3).

Why the orientation test: a still shows where the Ewald sphere cuts each Bragg peak, so a spot fixes its
reflection's direction only *along* the sphere; along the sphere normal the reflection may lie anywhere
within its rocking width (~1/L, a large fraction of |G| for 5 nm crystals). A few low-angle reflections
(normals ≈ the beam) therefore leave the rotations about axes in the detector plane nearly free: such a
crystal indexes its peaks, yet its orientation can be degrees off, and merged it would blur the volume.

Conventions: q in Å⁻¹ as 1/d, lab frame of `data_pipeline.geometry` (beam +z); q_lab = R q_crystal with the
crystal frame of `jaxpolaron.structure` (pseudo-cubic axes ≈ x, y, z); hkl are pseudo-cubic indices.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class IndexingConfig:
    """Tolerances and limits of the sparse indexer (JSON-serialisable).

    q_tol: Å⁻¹, largest ||G| − |q|| for a seed peak to be matched to a reflection.
    angle_tol_deg: largest difference between the angle of a peak pair and of a reflection pair.
    match_tol: Å⁻¹, largest distance of Rᵀq to its nearest reciprocal-lattice point for a peak to count as
        indexed (~ the half-width of a 5 nm crystal's Bragg peak; peaks are cut off-centre by the Ewald sphere).
    n_seed_peaks: strongest peaks among which seed pairs are formed.
    min_pair_angle_deg: seed pairs closer than this to collinear are skipped (the orientation is undefined).
    min_peaks, min_peaks_second_round: distinct indexed reflections needed to accept a crystal in the two
        rounds (peaks split by the Ewald cut count once; see `n_reflections`).
    max_crystals: crystals searched per frame.
    q_min: Å⁻¹, reflections below this are not used (|q| = 0 is not a reflection).
    match_tol_second_round: Å⁻¹, match_tol of the second round: three reflections are matched by chance far
        more often than four, so they must fit tighter.
    ambiguity_deg: two equally good solutions further apart than this (modulo the cube rotations) make a
        crystal ambiguous; it is not accepted.
    max_orientation_sigma_deg: a crystal whose orientation uncertainty (`orientation_sigma_deg`, worst axis)
        exceeds this is not accepted (inf: no test).
    centroid_sigma: Å⁻¹, assumed error of a spot centroid along the Ewald sphere (for that uncertainty).
    """

    q_tol: float = 0.005
    angle_tol_deg: float = 1.5
    match_tol: float = 0.02
    n_seed_peaks: int = 6
    min_pair_angle_deg: float = 10.0
    min_peaks: int = 4
    min_peaks_second_round: int = 3
    max_crystals: int = 4
    q_min: float = 0.05
    ambiguity_deg: float = 5.0
    match_tol_second_round: float = 0.01
    max_orientation_sigma_deg: float = 0.6
    centroid_sigma: float = 0.003

    def __post_init__(self):
        if min(self.q_tol, self.angle_tol_deg, self.match_tol) <= 0:
            raise ValueError("q_tol, angle_tol_deg and match_tol must be positive")
        if self.n_seed_peaks < 2 or self.min_peaks_second_round < 2 or self.min_peaks < self.min_peaks_second_round:
            raise ValueError("need n_seed_peaks >= 2 and min_peaks >= min_peaks_second_round >= 2")
        if not (self.max_orientation_sigma_deg > 0 and self.centroid_sigma > 0):
            raise ValueError("max_orientation_sigma_deg and centroid_sigma must be positive")
        if self.max_crystals < 1:
            raise ValueError(f"max_crystals must be >= 1, got {self.max_crystals}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ReferenceLattice(NamedTuple):
    """Reflections of the indexing cell.

    basis: (3, 3) rows a*, b*, c* of the indexing cell in the crystal frame, Å⁻¹ (G = hkl @ basis).
    hkl: (m, 3) int, the allowed reflections with q_min <= |G| <= q_max, sorted by |G|.
    g: (m, 3) Å⁻¹, their vectors. g_norm: (m,) Å⁻¹, ascending.
    allowed: (2H+1,)*3 bool, allowed[h+H, k+H, l+H] (systematic absences and negligible |F|² are False).
    symmetry: (s, 3, 3) proper rotations of the cell's point group in the crystal frame (orientations that
        differ by one of them are the same solution).
    """

    basis: np.ndarray
    hkl: np.ndarray
    g: np.ndarray
    g_norm: np.ndarray
    allowed: np.ndarray
    symmetry: np.ndarray

    @property
    def inverse(self) -> np.ndarray:
        """(3, 3) with hkl = q_crystal @ inverse."""
        return np.linalg.inv(self.basis)

    @property
    def h_max(self) -> int:
        return self.allowed.shape[0] // 2

    def is_allowed(self, hkl: np.ndarray) -> np.ndarray:
        """(...,) bool for integer hkl (..., 3); False outside the table and for 000."""
        h = self.h_max
        inside = np.all(np.abs(hkl) <= h, axis=-1)
        idx = np.clip(hkl + h, 0, 2 * h)
        return inside & self.allowed[idx[..., 0], idx[..., 1], idx[..., 2]] & np.any(hkl != 0, axis=-1)


def _hkl_box(basis: np.ndarray, q_max: float) -> tuple[int, np.ndarray]:
    h_max = int(np.ceil(q_max / np.linalg.svd(basis, compute_uv=False).min())) + 1
    r = np.arange(-h_max, h_max + 1)
    return h_max, np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def reference_lattice(
    basis: np.ndarray,
    q_max: float,
    *,
    q_min: float = 0.05,
    allowed: np.ndarray | None = None,
    symmetry: np.ndarray | None = None,
) -> ReferenceLattice:
    """Reflections of the lattice with reciprocal basis `basis` ((3, 3) rows, Å⁻¹) up to q_max (Å⁻¹).

    allowed: (m,) bool over `_hkl_box(basis, q_max)[1]` (None = every lattice point).
    symmetry: crystal-frame point-group rotations (None = the 24 cube rotations).
    """
    basis = np.asarray(basis, float)
    h_max, hkl = _hkl_box(basis, q_max)
    ok = np.ones(len(hkl), bool) if allowed is None else np.asarray(allowed, bool)
    ok &= np.any(hkl != 0, axis=1)
    g = hkl @ basis
    norm = np.linalg.norm(g, axis=1)
    keep = ok & (norm >= q_min) & (norm <= q_max)
    order = np.argsort(norm[keep], kind="stable")
    table = ok.reshape((2 * h_max + 1,) * 3)
    sym = cubic_rotations() if symmetry is None else np.asarray(symmetry, float)
    return ReferenceLattice(basis, hkl[keep][order], g[keep][order], norm[keep][order], table, sym)


def pseudo_cubic_lattice(structure, q_max: float, q_min: float = 0.05) -> ReferenceLattice:
    """Primitive pseudo-cubic lattice of a `jaxpolaron.structure.CrystalStructure` (crystal frame); every
    point allowed, cube symmetry. Superstructure reflections of the real cell are not indexed by it."""
    return reference_lattice(np.linalg.inv(structure.pseudo_cubic_axes()).T, q_max, q_min=q_min)


def structure_lattice(
    structure, q_max: float, *, energy_kev: float, min_relative_intensity: float = 1e-3, q_min: float = 0.05
) -> ReferenceLattice:
    """The conventional cell of the structure (e.g. Pnma), allowed = |F_cell(hkl)|² at least
    `min_relative_intensity` × the strongest (this removes systematic absences and negligible reflections).
    Symmetry: the point-group rotations of the orthorhombic cell (2-folds about its axes) in the crystal frame.
    """
    from jaxpolaron.scattering import scattering_factors

    rot = structure.pseudo_cubic.rotation  # ortho-Cartesian -> crystal frame
    basis = structure.reciprocal @ rot.T
    _, hkl = _hkl_box(basis, q_max)
    g = hkl @ basis
    sf = scattering_factors(structure.species, energy_kev, charges=structure.oxidation)
    f = np.asarray(sf(np.linalg.norm(g, axis=1)))  # (species, m) complex
    phase = np.exp(2j * np.pi * hkl @ structure.frac.T)  # (m, atoms)
    fcell = np.einsum("am,ma->m", f[structure.species_index], phase)
    inten = np.abs(fcell) ** 2 * np.any(hkl != 0, axis=1)
    allowed = inten >= min_relative_intensity * inten.max()
    twofolds = np.array([np.diag(d) for d in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))], float)
    symmetry = rot @ twofolds @ rot.T
    return reference_lattice(basis, q_max, q_min=q_min, allowed=allowed, symmetry=symmetry)


class IndexedCrystal(NamedTuple):
    """One crystal found in a frame.

    rotation: (3, 3), q_lab = rotation @ q_crystal.
    peaks: (n,) int, indices of its peaks in the frame's peak list.
    hkl: (n, 3) int, their reflections (pseudo-cubic).
    residual: (n,) Å⁻¹, |Rᵀq − G| of each.
    round: 1 or 2 (the acceptance round).
    sigma_deg: orientation uncertainty, degrees (`orientation_sigma_deg`).
    """

    rotation: np.ndarray
    peaks: np.ndarray
    hkl: np.ndarray
    residual: np.ndarray
    round: int
    sigma_deg: float


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _triad(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., 3, 3) orthonormal columns (â, n̂, â × n̂) with n̂ ∥ a × b."""
    u = _unit(a)
    n = _unit(np.cross(a, b))
    return np.stack([u, n, np.cross(u, n)], axis=-1)


def pair_rotations(g1: np.ndarray, g2: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations R with R ĝ1 = p̂1 and R (g1 × g2) ∥ p1 × p2 (the pair's plane), all (..., 3).

    The bisector of the two unit vectors is used as the first axis so that the angle mismatch is split
    evenly between the two peaks.
    """
    g_bis, p_bis = _unit(g1) + _unit(g2), _unit(p1) + _unit(p2)
    tg = _triad(g_bis, np.cross(g_bis, _unit(g2) - _unit(g1)))
    tp = _triad(p_bis, np.cross(p_bis, _unit(p2) - _unit(p1)))
    return tp @ np.swapaxes(tg, -1, -2)


def kabsch(g: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """(3, 3) rotation R minimising Σ w |p − R g|² (det R = +1). g, p: (n, 3); w: (n,) or None."""
    w = np.ones(len(g)) if w is None else np.asarray(w, float)
    h = (p * w[:, None]).T @ g
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def assign(rotations: np.ndarray, q: np.ndarray, lattice: ReferenceLattice):
    """Nearest reflection of each peak under each rotation.

    rotations: (c, 3, 3); q: (n, 3) Å⁻¹ lab. Returns hkl (c, n, 3) int and the distance (c, n) Å⁻¹ of
    Rᵀq from its lattice point; a point that is not an allowed reflection gets distance inf.
    """
    qc = np.einsum("cji,nj->cni", rotations, q)  # Rᵀ q for every candidate
    hkl = np.rint(qc @ lattice.inverse).astype(np.int64)
    dist = np.linalg.norm(qc - hkl @ lattice.basis, axis=-1)
    return hkl, np.where(lattice.is_allowed(hkl), dist, np.inf)


def n_reflections(hkl: np.ndarray, indexed: np.ndarray) -> np.ndarray:
    """Distinct reflections among the indexed peaks: hkl (..., n, 3) int, indexed (..., n) bool -> (...,) int.

    A Bragg peak cut by the Ewald sphere along its streaks can be found as several peaks; they count once
    (two distinct reflections never fix an orientation: the 2-fold about their plane's normal maps them onto
    their Friedel mates).
    """
    key = (hkl[..., 0] * 4096 + hkl[..., 1]) * 4096 + hkl[..., 2]
    key = np.sort(np.where(indexed, key, np.iinfo(np.int64).min), axis=-1)
    new = np.concatenate([key[..., :1] != np.iinfo(np.int64).min, key[..., 1:] != key[..., :-1]], axis=-1)
    return new.sum(axis=-1)


def _cross_matrices(v: np.ndarray) -> np.ndarray:
    """(..., 3, 3) matrices [v]ₓ with [v]ₓ w = v × w."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    o = np.zeros_like(x)
    return np.stack([np.stack([o, -z, y], -1), np.stack([z, o, -x], -1), np.stack([-y, x, o], -1)], -2)


def orientation_sigma_deg(rotation: np.ndarray, hkl: np.ndarray, q: np.ndarray, basis: np.ndarray,
                          centroid_sigma: float) -> float:  # fmt: skip
    """Standard deviation (degrees) of the worst-determined rotation angle of an indexed crystal.

    Linearised least squares over the orientation ω (R → R exp([ω]ₓ)): a spot at q (lab, Å⁻¹, on the
    Ewald sphere) measures RG only along the sphere, i.e. through P = 1 − n nᵀ with n the sphere normal at q
    (the direction of k_out). With d(RG)/dω = −R [G]ₓ the information matrix is
    F = Σ_reflections (P R [G]ₓ)ᵀ (P R [G]ₓ) / σ²; the result is 1/√(smallest eigenvalue of F).
    Spots of one reflection (split by the Ewald cut) share its weight, so a reflection counts once.

    rotation: (3, 3); hkl: (n, 3) int; q: (n, 3) Å⁻¹ lab (beam +z); basis: (3, 3) reciprocal basis (rows);
    centroid_sigma: Å⁻¹, σ of a centroid along the sphere. The sphere's wavenumber k follows from each spot:
    |q + k ẑ| = k gives k = −|q|²/(2 q_z).
    """
    q = np.asarray(q, float)
    k = -np.sum(q * q, axis=-1) / (2.0 * np.minimum(q[:, 2], -1e-12))
    normal = _unit(q + k[:, None] * np.array([0.0, 0.0, 1.0]))
    jac = (np.eye(3) - normal[:, :, None] * normal[:, None, :]) @ rotation @ _cross_matrices(hkl @ basis)
    _, inverse, counts = np.unique(hkl, axis=0, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inverse.reshape(-1)]
    info = np.einsum("n,nki,nkj->ij", weight, jac, jac) / centroid_sigma**2
    return float(np.degrees(1.0 / np.sqrt(max(np.linalg.eigvalsh(info)[0], 1e-300))))


def _candidates(q: np.ndarray, seeds: np.ndarray, lattice: ReferenceLattice, config: IndexingConfig) -> np.ndarray:
    """(c, 3, 3) orientations from all seed pairs (may be empty)."""
    norms = np.linalg.norm(q, axis=1)
    cos_tol = np.deg2rad(config.angle_tol_deg)
    out = []
    for i, j in itertools.combinations(seeds, 2):
        p1, p2 = q[i], q[j]
        ang = np.arccos(np.clip(_unit(p1) @ _unit(p2), -1.0, 1.0))
        if min(ang, np.pi - ang) < np.deg2rad(config.min_pair_angle_deg):
            continue
        lo1, hi1 = np.searchsorted(lattice.g_norm, [norms[i] - config.q_tol, norms[i] + config.q_tol])
        lo2, hi2 = np.searchsorted(lattice.g_norm, [norms[j] - config.q_tol, norms[j] + config.q_tol])
        if lo1 == hi1 or lo2 == hi2:
            continue
        g1, g2 = lattice.g[lo1:hi1], lattice.g[lo2:hi2]
        cos = (g1 / lattice.g_norm[lo1:hi1, None]) @ (g2 / lattice.g_norm[lo2:hi2, None]).T
        a, b = np.nonzero(np.abs(np.arccos(np.clip(cos, -1.0, 1.0)) - ang) < cos_tol)
        if len(a):
            out.append(pair_rotations(g1[a], g2[b], p1[None], p2[None]))
    return np.concatenate(out) if out else np.zeros((0, 3, 3))


def _best(q, weights, candidates, lattice, config, need):
    """Refined best candidate: (rotation, indexed mask (n,), hkl (n, 3), distance (n,)) or None.

    The candidates indexing the most distinct reflections (then the smallest mean residual) win, unless an
    orientation that is not cube-equivalent indexes as many reflections sharing at least two of its peaks:
    such a crystal is ambiguous (typically 3 nearly coplanar reflections on a flat Ewald cut) and is skipped.
    """
    if len(candidates) == 0:
        return None
    hkl, dist = assign(candidates, q, lattice)
    ok = dist < config.match_tol
    n_ok = n_reflections(hkl, ok)
    mean_res = np.where(n_ok > 0, np.where(ok, dist, 0.0).sum(axis=1) / np.maximum(n_ok, 1), np.inf)
    order = np.lexsort((mean_res, -n_ok))
    tied = order[n_ok[order] == n_ok[order[0]]]
    if n_ok[tied[0]] < need:
        return None
    shared = ok[tied].astype(np.int32) @ ok[tied].T.astype(np.int32) >= 2
    distinct = misorientation_deg(candidates[tied][:, None], candidates[tied][None, :]) > config.ambiguity_deg
    unique = ~np.any(shared & distinct, axis=1)
    if not unique.any():
        return None
    c = tied[np.argmax(unique)]
    best = (candidates[c], ok[c], hkl[c], dist[c])
    for _ in range(3):  # least squares on the indexed peaks, then re-assign (a refined R may index more)
        _, sel, h, _ = best
        if sel.sum() < 2:
            break
        rot = kabsch(h[sel] @ lattice.basis, q[sel], weights[sel])
        h_new, d_new = (x[0] for x in assign(rot[None], q, lattice))
        if n_reflections(h_new, d_new < config.match_tol) < n_reflections(h, sel):
            break  # never trade indexed reflections for a smaller residual
        best = (rot, d_new < config.match_tol, h_new, d_new)
    return best


def index_frame(
    q: np.ndarray,
    intensity: np.ndarray,
    lattice: ReferenceLattice,
    config: IndexingConfig,
    rejected: list[IndexedCrystal] | None = None,
) -> list[IndexedCrystal]:
    """Index the peaks of one frame into up to `max_crystals` crystals.

    Args:
        q: (n, 3) peak positions in the lab frame, Å⁻¹ (`peak_q`), on the Ewald sphere (beam +z).
        intensity: (n,) integrated peak intensities (seed ranking and least-squares weights).
        lattice: reference reflections (`pseudo_cubic_lattice`); must reach beyond the largest |q|.
        config: tolerances.
        rejected: if given, crystals that indexed enough peaks but failed the orientation-uncertainty test
            are appended to it (their peaks are not offered to further crystals, nor to the second round).

    Returns the accepted crystals in the order found; each peak belongs to at most one crystal.
    """
    q = np.asarray(q, float).reshape(-1, 3)
    intensity = np.asarray(intensity, float).reshape(-1)
    weights = np.sqrt(np.clip(intensity, 0.0, None)) + 1e-12  # ~ 1/σ of a Poisson-limited centroid
    crystals: list[IndexedCrystal] = []
    second = dataclasses.replace(config, match_tol=config.match_tol_second_round)
    rounds = ((1, config.min_peaks, config), (2, config.min_peaks_second_round, second))
    unsure = np.zeros(len(q), bool)  # peaks of rejected crystals: explained by a lattice, not offered again
    for round_, need, cfg in rounds:
        if round_ == 2 and crystals:
            break  # the second round is only for frames with no crystal
        free = ~unsure
        while len(crystals) < config.max_crystals and free.sum() >= need:
            idx = np.flatnonzero(free)
            seeds = idx[np.argsort(-intensity[idx], kind="stable")[: config.n_seed_peaks]]
            cands = _candidates(q, seeds, lattice, cfg)
            best = _best(q[idx], weights[idx], cands, lattice, cfg, need)
            if best is None or n_reflections(best[2], best[1]) < need:
                break
            rot, ok, hkl, dist = best
            peaks = idx[ok]
            sigma = orientation_sigma_deg(rot, hkl[ok], q[peaks], lattice.basis, config.centroid_sigma)
            crystal = IndexedCrystal(rot, peaks, hkl[ok], dist[ok], round_, sigma)
            if sigma <= config.max_orientation_sigma_deg:
                crystals.append(crystal)
            else:
                unsure[peaks] = True
                if rejected is not None:
                    rejected.append(crystal)
            free[peaks] = False
    return crystals


# --- orientation errors ------------------------------------------------------------------------------------


def cubic_rotations() -> np.ndarray:
    """(24, 3, 3) proper rotations of the cube (signed permutation matrices with det +1)."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                mats.append(m)
    return np.array(mats)


def misorientation_deg(r_a: np.ndarray, r_b: np.ndarray, symmetry: np.ndarray | None = None) -> np.ndarray:
    """Smallest rotation angle (degrees) between orientations r_a and r_b · S over the symmetry operations S.

    r_a, r_b: (..., 3, 3) with q_lab = R q_crystal. symmetry: (s, 3, 3) crystal-frame operations (default:
    the 24 cube rotations, because the pseudo-cubic indexing cannot tell the orthorhombic axes apart).
    """
    sym = cubic_rotations() if symmetry is None else symmetry
    rel = np.einsum("...ji,...jk,skl->...sil", r_a, r_b, sym)  # r_aᵀ r_b S
    tr = np.trace(rel, axis1=-2, axis2=-1)
    return np.degrees(np.arccos(np.clip((tr.max(axis=-1) - 1.0) / 2.0, -1.0, 1.0)))
