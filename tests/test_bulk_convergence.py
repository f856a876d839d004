"""Integrated intensities of an undistorted 10 nm crystal vs the bulk N_cells·|F_hkl|² from gemmi.

With q = 1/d, ∫ over one Bragg peak |F(q)|² d³q = N_cells |F_cell(G)|² / V_cell. Our side: the separable
engine's window sum Σ |F|² voxel³ around structure.q_of_hkl(hkl). The other side: gemmi's own structure
factor of the bundled CIF (IT92 f0; f′, f″ set to the same xraydb Chantler values we use), so the comparison
checks the structure expansion, the pseudo-cubic mapping, the crystal cut and the engine, not the f0 tables
(IT92 and Waasmaier–Kirfel agree to < 0.1 % at these |q|).

Window: ±0.02 Å⁻¹ (33³ voxels of 0.00125 Å⁻¹, ~8 voxels per 1/L fringe). This is the cleanest choice here
(see experiments/bulk_convergence.py for the scan): the Pnma superlattice reflections sit 0.084–0.087 Å⁻¹
from every pseudo-cubic G along each axis and are strong next to (400) (|F|²/|F_G|² up to 0.34); their
1/q² tails add ≈ +0.3 % to 400/200 per 0.01 Å⁻¹ of half-width (+4 % at ±0.06, +2.05 % at ±0.03). At ±0.02
the window still holds 88 % of the crystal's shape-function peak (η below), and what is left of the
deviation is the surface termination: this crystal has 4.8 % fewer Cs and 1.8 % fewer Br than its N_Pb
formula units, which lowers (200) (Cs and Br give 57 % of F_200) more than the Pb-dominated (400).
"""

from __future__ import annotations

from importlib import resources

import gemmi
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal
from jaxpolaron.reciprocal import hkl_windows
from jaxpolaron.scattering import ScatteringFactors, scattering_factors
from jaxpolaron.structure import BUNDLED_CIF, read_cif
from jaxpolaron.structure_factor import intensity

HKLS = ((2, 0, 0), (1, 1, 0), (4, 0, 0))
HALF_WIDTH = 0.02  # Å⁻¹
HALF_VOXELS = 16


def _gemmi_bulk_f(structure, f1: dict[str, float], f2: dict[str, float], hkl_ortho) -> tuple[complex, complex]:
    """gemmi's F_o(hkl) per orthorhombic cell with f0_IT92 + f′ + i f″, and F with f0 only."""
    small = gemmi.read_small_structure(str(resources.files("jaxpolaron") / "data" / BUNDLED_CIF))
    # gemmi applies every symmetry operation to every site: sites on special positions need their
    # crystallographic occupancy (1/2 for Cs 4c, Pb 4b, Br 4c in Pnma), or they count twice.
    small.change_occupancies_to_crystallographic()
    hkl = [round(h) for h in hkl_ortho]

    def sf(addends: dict[str, float]) -> complex:
        calc = gemmi.StructureFactorCalculatorX(small.cell)
        for el, value in addends.items():
            calc.addends.set(gemmi.Element(el), value)
        return complex(calc.calculate_sf_from_small_structure(small, hkl))

    f_real = sf(f1)  # gemmi's addends are real: Σ (f0 + f′) S_el
    # f″ through gemmi's own per-element geometric sums S_el = F(addend_el + 1) − F(addend_el).
    f_imag = sum(1j * f2[el] * (sf({**f1, el: f1[el] + 1.0}) - f_real) for el in structure.species)
    return f_real + f_imag, sf({})


def _window_integrals(crystal, scattering, structure) -> np.ndarray:
    """Σ_window |F|² voxel³ for each of HKLS, e²·Å⁻³."""
    voxel = HALF_WIDTH / HALF_VOXELS
    grid = hkl_windows(structure, HKLS, shape=2 * HALF_VOXELS + 1, voxel=voxel)
    inten = np.asarray(intensity(crystal, scattering, grid, engine="separable"), np.float64)
    return inten.reshape(len(HKLS), -1).sum(axis=1) * voxel**3


@pytest.fixture(scope="module")
def result():
    structure = read_cif()
    scat = scattering_factors(structure.species)  # 13.6 keV, neutral atoms, Chantler f′, f″
    f1 = dict(zip(structure.species, np.asarray(scat.f1, float).tolist(), strict=True))
    f2 = dict(zip(structure.species, np.asarray(scat.f2, float).tolist(), strict=True))
    crystal = cut_nanocrystal(structure, 10.0)  # p = 5 superellipsoid, Pb-centred
    comp = crystal.composition()
    i_int = _window_integrals(crystal, scat, structure)

    # Shape-function capture η: the bare Pb lattice (f = 1 on Pb, 0 elsewhere) in the same windows. The
    # Pb sites form an exact pseudo-cubic Bravais lattice with ∫ over a peak = N_Pb / V_pc.
    pb = structure.species.index("Pb")
    n_s = len(structure.species)
    lattice = crystal  # the unit_pb form factors below switch the other species off
    dtype = crystal.positions.dtype
    unit_pb = ScatteringFactors(
        wk_scale=jnp.zeros((n_s, 5), dtype),
        wk_exponent=jnp.zeros((n_s, 5), dtype),
        wk_offset=jnp.asarray([float(i == pb) for i in range(n_s)], dtype),
        f1=jnp.zeros(n_s, dtype),
        f2=jnp.zeros(n_s, dtype),
        labels=scat.labels,
        energy_kev=scat.energy_kev,
    )
    v_pc = structure.volume / structure.z_formula
    eta = _window_integrals(lattice, unit_pb, structure) * v_pc / comp["Pb"]

    bulk = {hkl: _gemmi_bulk_f(structure, f1, f2, structure.hkl_to_ortho(hkl)) for hkl in HKLS}
    return {"structure": structure, "comp": comp, "i_int": i_int, "eta": eta, "bulk": bulk, "v_pc": v_pc}


def test_gemmi_reference_is_independent_and_anomalous(result):
    structure = result["structure"]
    for hkl, (f_full, f_bare) in result["bulk"].items():
        assert np.allclose(structure.hkl_to_ortho(hkl), np.round(structure.hkl_to_ortho(hkl)))
        # the anomalous addends really change gemmi's F (Pb f′ ≈ −8.5 e on 4 Pb alone: > 20 e)
        assert abs(f_full - f_bare) > 20.0, hkl
    # the shape-function capture is the same for every G (one Bravais lattice) and < 1 (finite window)
    eta = result["eta"]
    assert np.ptp(eta) < 1e-4 * eta[0]
    assert 0.8 < eta[0] < 0.95


def test_ratios_match_gemmi_within_2_percent(result):
    i_int, bulk = result["i_int"], result["bulk"]
    f2 = [abs(bulk[hkl][0]) ** 2 for hkl in HKLS]
    for k, hkl in enumerate(HKLS[1:], start=1):
        ours = i_int[k] / i_int[0]
        ref = f2[k] / f2[0]
        # measured: 110/200 −0.1 %, 400/200 +1.75 % (surface termination, see the module docstring)
        assert ours == pytest.approx(ref, rel=0.02), (hkl, ours, ref)


def test_absolute_200_matches_n_cells_f_squared(result):
    """I_int·V_pc/N_Pb vs |F_o/4|² (F per pseudo-cubic cell), after the window's shape-function capture η.

    Tolerance 3 %: the crystal's Cs and Br counts fall 4.8 % and 1.8 % short of N_Pb formula units (its
    surfaces cut through Cs layers); weighting each element's missing fraction by its share of |F_200|²
    (nested sublattices: I ∝ Σ Re(F_e F_e'*) min(c_e, c_e')) predicts I/(η I_bulk) = 0.974; we see 0.980.
    Without η the window (±0.02 Å⁻¹ for a 10 nm crystal) holds only 86 % of the peak, 1/(π² L Q) per face pair.
    """
    comp, i_int, eta, v_pc = result["comp"], result["i_int"], result["eta"], result["v_pc"]
    f_pc2 = abs(result["bulk"][(2, 0, 0)][0]) ** 2 / 16.0  # |F_o / 4|²: 4 pseudo-cubic cells per ortho cell
    captured = i_int[0] * v_pc / (comp["Pb"] * f_pc2)
    assert captured / eta[0] == pytest.approx(1.0, abs=0.03)
    # pin the stoichiometry the 3 % tolerance was derived for (re-derive it if the cut changes)
    assert 0.95 < comp["Cs"] / comp["Pb"] < 0.96
    assert 2.9 < comp["Br"] / comp["Pb"] < 3.0
