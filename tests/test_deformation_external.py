"""External (DFT) geometries and densities: file reading, frames, displacements, core + valence diffraction."""

from __future__ import annotations

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.io.cube import write_cube
from ase.units import Bohr

from jaxpolaron.crystal import dft_cube
from jaxpolaron.deformation.base import displaced
from jaxpolaron.deformation.external import (
    DFTState,
    ExternalDisplacement,
    ValenceDensity,
    core_electrons,
    core_structure_factor,
    dft_difference,
    dft_intensity,
    external_pair,
    pair_states,
    valence_structure_factor,
)
from jaxpolaron.dft_io import read_cube, read_xyz
from jaxpolaron.errors import InputError
from jaxpolaron.metrics import peak_metrics
from jaxpolaron.reciprocal import Grid, grid_item, hkl_windows

EXPANSION = 1e-3
SPACING_BOHR = 0.2  # exactly representable in the cube header (6 decimals in Bohr)
VALENCE_TOTAL = 200 * 9 + 125 * 4 + 450 * 7  # Cs200Pb125Br450 with GTH Cs q9, Pb q4, Br q7


# --------------------------------------------------------------------------------------------- helpers
def _cube_atoms(structure) -> tuple[list[str], np.ndarray]:
    """The bundled DFT cube (Cs200Pb125Br450) as file symbols and float64 positions, crystal frame."""
    c = dft_cube(structure)
    names = np.array(c.species_names)[np.asarray(c.species)]
    return [str(s) for s in names], np.asarray(c.positions, np.float64)


def _write_xyz(path, symbols, positions) -> None:
    ase.io.write(path, Atoms(symbols=symbols, positions=positions), format="extxyz")


def _write_blob_cube(path, symbols, positions, centre, sigma, charge, half_width=None):
    """A Gaussian density blob of `charge` electrons, width σ (Å), centred at `centre` (Å) on a grid of
    SPACING_BOHR steps; values in e/Bohr³ as CP2K writes them. The discrete sum is normalised to `charge`
    so the file's ∫ρ dV is `charge` up to the 7 printed digits. Returns the voxel points (nx, ny, nz, 3) Å."""
    half_width = 6.0 * sigma if half_width is None else half_width
    n = 2 * int(np.ceil(half_width / (SPACING_BOHR * Bohr))) + 1
    origin_bohr = np.round(np.asarray(centre) / Bohr - SPACING_BOHR * (n // 2), 6)
    axis = np.arange(n) * SPACING_BOHR * Bohr
    pts = origin_bohr * Bohr + np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    rho = np.exp(-np.sum((pts - centre) ** 2, axis=-1) / (2 * sigma**2))
    rho *= charge / (rho.sum() * SPACING_BOHR**3)  # e/Bohr³
    atoms = Atoms(symbols=symbols, positions=positions, cell=np.eye(3) * n * SPACING_BOHR * Bohr)
    with open(path, "w") as f:
        write_cube(f, atoms, rho, origin=origin_bohr * Bohr)
    return pts


@pytest.fixture(scope="module")
def cube_files(structure, tmp_path_factory):
    """Ground xyz = the bundled DFT cube; excited xyz = the same atoms expanded uniformly by EXPANSION."""
    d = tmp_path_factory.mktemp("dft")
    symbols, pos = _cube_atoms(structure)
    _write_xyz(d / "ground.xyz", symbols, pos)
    _write_xyz(d / "excited.xyz", symbols, (1 + EXPANSION) * pos)
    return d, symbols, pos


def _one_line_input_error(fn, *args, match=None):
    with pytest.raises(InputError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value) and str(info.value).endswith((".", "?"))


# ------------------------------------------------------------------------------------------------- io
def test_xyz_round_trip(cube_files):
    d, symbols, pos = cube_files
    got_symbols, got_pos = read_xyz(d / "ground.xyz")
    assert got_symbols == symbols
    np.testing.assert_allclose(got_pos, pos, atol=1e-6)


def test_xyz_last_frame_of_cp2k_trajectory(tmp_path):
    frame = " {n}\n i =       12, E =     -4470.123456789\n Cs {x} 0.0 0.0\n Br 2.9 0.0 0.0\n"
    (tmp_path / "pos-1.xyz").write_text(frame.format(n=2, x=0.0) + frame.format(n=2, x=0.25))
    symbols, pos = read_xyz(tmp_path / "pos-1.xyz")
    assert symbols == ["Cs", "Br"]
    np.testing.assert_allclose(pos, [[0.25, 0, 0], [2.9, 0, 0]])


def test_cube_units_bohr_to_angstrom(tmp_path):
    centre = np.array([0.3, -0.2, 0.1])
    pts = _write_blob_cube(tmp_path / "blob.cube", ["Pb"], [centre], centre, sigma=0.5, charge=14.0)
    cube = read_cube(tmp_path / "blob.cube")
    assert cube.data.shape == pts.shape[:3]
    np.testing.assert_allclose(cube.axes, np.eye(3) * SPACING_BOHR * Bohr, atol=1e-12)
    np.testing.assert_allclose(cube.origin, pts[0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(cube.positions, [centre], atol=1e-6)
    assert cube.symbols == ("Pb",)
    assert abs(cube.total_charge() - 14.0) < 1e-6  # e/Bohr³ · Bohr³ -> e/Å³ · Å³
    assert abs(cube.data.max() - 14.0 / (2 * np.pi * 0.25) ** 1.5) < 1e-3 * cube.data.max()  # peak in e/Å³


def test_bad_files_raise_one_line_input_errors(tmp_path):
    _one_line_input_error(read_xyz, tmp_path / "missing.xyz", match="does not exist")
    (tmp_path / "empty.xyz").write_text("")
    _one_line_input_error(read_xyz, tmp_path / "empty.xyz", match="empty")
    (tmp_path / "garbage.xyz").write_text("this is not\nan xyz file\n")
    _one_line_input_error(read_xyz, tmp_path / "garbage.xyz", match="cannot read")
    (tmp_path / "element.xyz").write_text("2\n\nCs 0 0 0\nXq 1 1 1\n")
    _one_line_input_error(read_xyz, tmp_path / "element.xyz", match="unknown element")
    (tmp_path / "dummy.xyz").write_text("2\n\nCs 0 0 0\nX 1 1 1\n")
    _one_line_input_error(read_xyz, tmp_path / "dummy.xyz", match="unknown element")
    (tmp_path / "nan.xyz").write_text("2\n\nCs 0 0 0\nBr nan 1 1\n")
    _one_line_input_error(read_xyz, tmp_path / "nan.xyz", match="non-finite")

    _one_line_input_error(read_cube, tmp_path / "missing.cube", match="does not exist")
    (tmp_path / "garbage.cube").write_text("not a cube\n")
    _one_line_input_error(read_cube, tmp_path / "garbage.cube", match="cannot read")
    _write_blob_cube(tmp_path / "ok.cube", ["Br"], [[0, 0, 0]], np.zeros(3), sigma=0.3, charge=7.0)
    lines = (tmp_path / "ok.cube").read_text().splitlines()
    (tmp_path / "short.cube").write_text("\n".join(lines[:-10]) + "\n")
    _one_line_input_error(read_cube, tmp_path / "short.cube", match="cannot read")
    (tmp_path / "nan.cube").write_text("\n".join([*lines[:-1], "nan"]) + "\n")
    _one_line_input_error(read_cube, tmp_path / "nan.cube", match="non-finite")


# ----------------------------------------------------------------------------------- geometry pair
def test_pair_reproduces_dft_cube_frame_and_field(structure, cube_files):
    d, _, pos = cube_files
    geo = external_pair(d / "ground.xyz", d / "excited.xyz", species_order=structure.species, centre="Pb")
    ref = dft_cube(structure)
    assert geo.crystal.species_names == ref.species_names and geo.crystal.blocks == ref.blocks
    assert geo.crystal.oxidation == structure.oxidation
    np.testing.assert_allclose(geo.crystal.positions, ref.positions, atol=1e-5)
    np.testing.assert_allclose(geo.crystal.ideal, geo.crystal.positions)
    assert float(geo.crystal.size) == pytest.approx(float(np.ptp(pos, axis=0).max()), rel=1e-6)
    u = geo.displacement.displacement(geo.crystal)
    np.testing.assert_allclose(u, EXPANSION * np.asarray(ref.positions), atol=1e-6)  # the known field ε r
    np.testing.assert_allclose(geo.excited_crystal().positions, (1 + EXPANSION) * ref.positions, atol=1e-5)


def test_pair_groups_shuffled_atoms_and_centres(structure):
    symbols, pos = _cube_atoms(structure)
    perm = np.random.default_rng(0).permutation(len(symbols))
    symbols, pos = [symbols[i] for i in perm], pos[perm] + np.array([10.0, -3.0, 7.0])
    excited = pos + EXPANSION * (pos - pos.mean(axis=0))
    geo = external_pair((symbols, pos), (symbols, excited), species_order=("Cs", "Pb", "Br"))
    species = np.asarray(geo.crystal.species)
    assert np.all(np.diff(species) >= 0)  # grouped in blocks
    for s, (a, b) in enumerate(geo.crystal.blocks):
        assert np.all(species[a:b] == s)
    np.testing.assert_allclose(np.asarray(geo.crystal.positions).mean(axis=0), 0.0, atol=1e-4)  # centroid
    np.testing.assert_allclose(geo.crystal.positions, pos[geo.order] - pos.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(geo.displacement.u, EXPANSION * np.asarray(geo.crystal.positions), atol=1e-6)
    # an atom as origin; a file-order default species order
    geo = external_pair((symbols, pos), (symbols, excited), centre=5)
    assert geo.crystal.species_names == tuple(dict.fromkeys(symbols))
    np.testing.assert_allclose(geo.to_crystal_frame(pos[5]), 0.0)


def test_pair_rejects_mismatched_geometries(structure):
    symbols, pos = _cube_atoms(structure)
    _one_line_input_error(external_pair, (symbols, pos), (symbols[:-1], pos[:-1]), match="atoms")
    swapped = list(symbols)
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    _one_line_input_error(external_pair, (symbols, pos), (swapped, pos), match="atom 0 is Cs")
    moved = pos.copy()
    moved[[0, 1]] = moved[[1, 0]]  # two Cs listed in another order
    _one_line_input_error(external_pair, (symbols, pos), (symbols, moved), match="same order")
    with pytest.raises(InputError, match="species_order"):
        external_pair((symbols, pos), (symbols, pos), species_order=("Cs", "Pb"))
    with pytest.raises(InputError, match="centre"):
        external_pair((symbols, pos), (symbols, pos), centre="I")


def test_displacement_shape_must_match_crystal(structure):
    disp = ExternalDisplacement(jnp.zeros((10, 3)))
    with pytest.raises(ValueError, match="10 atoms"):
        disp.displacement(dft_cube(structure))


# ----------------------------------------------------------------------------------------- diffraction
def test_core_forward_scattering_is_the_papers_31550(structure):
    crystal = dft_cube(structure)
    np.testing.assert_array_equal(core_electrons(("Cs", "Pb", "Br")), [46, 78, 28])
    f0 = core_structure_factor(crystal, None, jnp.zeros((1, 3)))
    assert float(jnp.abs(f0[0])) == pytest.approx(31550.0, rel=1e-6)  # SI S4: I(0) = 31550²
    f14 = core_structure_factor(crystal, {"Cs": 46, "Pb": 68, "Br": 28}, jnp.zeros((1, 3)))
    assert float(jnp.abs(f14[0])) == pytest.approx(30300.0, rel=1e-6)  # the GTH-q14 alternative for Pb


def test_valence_gaussian_blob_matches_analytic_transform(tmp_path, x64):
    centre, sigma, charge = np.array([0.37, -0.21, 0.55]), 0.4, 7.0
    _write_blob_cube(
        tmp_path / "blob.cube", ["Br"], [centre], centre, sigma=sigma, charge=charge, half_width=5.5 * sigma
    )
    density = ValenceDensity.from_cube(read_cube(tmp_path / "blob.cube"))
    assert density.axis_aligned
    assert float(density.total_charge()) == pytest.approx(charge, abs=1e-6)
    q = jnp.asarray(np.random.default_rng(1).uniform(-0.7, 0.7, (24, 3)))
    q = jnp.concatenate([jnp.zeros((1, 3)), q])
    expected = charge * np.exp(-2 * np.pi**2 * sigma**2 * np.sum(np.asarray(q) ** 2, -1))
    expected = expected * np.exp(2j * np.pi * np.asarray(q) @ centre)
    f = valence_structure_factor(density, q)  # q list -> point scatterers, direct engine
    assert float(jnp.real(f[0])) == pytest.approx(charge, abs=1e-6)  # F_val(0) = valence electrons
    np.testing.assert_allclose(np.abs(f), np.abs(expected), atol=1e-6 * charge, rtol=1e-5)
    np.testing.assert_allclose(f, expected, atol=1e-5 * charge)
    # the grid path, the point-scatterer engines and the analytic transform agree on a window
    grid = Grid(centre=jnp.array([0.3, -0.1, 0.2]), voxel=jnp.full(3, 0.05), shape=(5, 4, 3))
    by_grid = valence_structure_factor(density, grid, "grid")
    analytic = charge * np.exp(-2 * np.pi**2 * sigma**2 * np.sum(np.asarray(grid.points()) ** 2, -1))
    np.testing.assert_allclose(np.abs(by_grid), analytic, atol=1e-6 * charge, rtol=1e-5)
    for engine in ("separable", "nufft"):  # "direct" is the q-list path above
        np.testing.assert_allclose(valence_structure_factor(density, grid, engine), by_grid, atol=1e-7 * charge)


def test_density_frame_follows_the_crystal(structure, cube_files, tmp_path):
    """A blob on one atom in the file frame sits on that atom in the crystal frame (centroid centring)."""
    _, symbols, pos = cube_files
    shifted = pos + np.array([12.0, 11.0, 13.0])  # a CP2K-like box frame; the crystal frame is centred
    atom = 260  # a Pb
    _write_blob_cube(tmp_path / "gs.cube", symbols, shifted, shifted[atom], sigma=0.5, charge=VALENCE_TOTAL)
    geo = external_pair((symbols, shifted), (symbols, shifted), species_order=structure.species)
    density = geo.density(read_cube(tmp_path / "gs.cube"))
    r_atom = np.asarray(geo.crystal.positions)[np.flatnonzero(geo.order == atom)[0]]
    q = jnp.asarray([[0.0, 0.0, 0.0], [0.34, 0.0, 0.0], [0.1, 0.2, -0.3]], jnp.float32)
    phase = np.exp(-2j * np.pi * np.asarray(q) @ r_atom)
    f = np.asarray(valence_structure_factor(density, q)) * phase
    np.testing.assert_allclose(np.angle(f[np.abs(f) > 0]), 0.0, atol=2e-3)
    # the cube's atoms must be the state's atoms; its charge must fit the valence counts
    with pytest.raises(InputError, match="same frame"):
        geo.density(read_cube(tmp_path / "gs.cube"), "ground", atol=1e-9)
    _write_blob_cube(tmp_path / "off.cube", symbols, pos, pos[atom], sigma=0.5, charge=VALENCE_TOTAL)
    _one_line_input_error(geo.density, read_cube(tmp_path / "off.cube"), match="same frame")
    _write_blob_cube(tmp_path / "low.cube", symbols, shifted, shifted[atom], sigma=0.5, charge=1000.0)
    _one_line_input_error(geo.density, read_cube(tmp_path / "low.cube"), match="valence electrons")


def test_zero_amplitude_and_identical_states_give_zero_difference(structure, cube_files, tmp_path):
    d, symbols, pos = cube_files
    _write_blob_cube(tmp_path / "gs.cube", symbols, pos, pos[300], sigma=0.5, charge=VALENCE_TOTAL)
    geo = external_pair(d / "ground.xyz", d / "excited.xyz", species_order=structure.species, centre="Pb")
    density = geo.density(read_cube(tmp_path / "gs.cube"))
    window = grid_item(hkl_windows(structure, [(2, 0, 0)], shape=9), 0)
    frozen = ExternalDisplacement(geo.displacement.u, 0.0)
    ground, excited = pair_states(geo.crystal, frozen, density, density)
    assert float(jnp.max(jnp.abs(dft_difference(ground, excited, window)))) == 0.0
    same = DFTState(geo.crystal, density)
    assert float(jnp.max(jnp.abs(dft_difference(same, same, window)))) == 0.0
    ground, excited = pair_states(geo.crystal, geo.displacement, density, density)
    assert float(jnp.max(jnp.abs(dft_difference(ground, excited, window)))) > 0.0


def test_uniform_expansion_moves_200_inward(structure, cube_files):
    d, _, _ = cube_files
    geo = external_pair(d / "ground.xyz", d / "excited.xyz", species_order=structure.species, centre="Pb")
    window = grid_item(hkl_windows(structure, [(2, 0, 0)]), 0)
    ground, excited = pair_states(geo.crystal, geo.displacement)
    dark = dft_intensity(ground, window)
    pump = dft_intensity(excited, window)
    np.testing.assert_allclose(pump - dark, dft_difference(ground, excited, window), rtol=1e-5, atol=1e-3 * dark.max())
    m = peak_metrics(window, dark, pump)
    shift = EXPANSION * float(jnp.linalg.norm(window.centre))  # ε|G|
    assert -2.0 * shift < float(m["m1_lobe"]) < -0.3 * shift
    assert float(m["m1_window"]) < 0


def test_amplitude_gradient_matches_finite_difference(structure, cube_files, x64):
    d, _, _ = cube_files
    geo = external_pair(d / "ground.xyz", d / "excited.xyz", species_order=structure.species, centre="Pb")
    g200 = np.asarray(structure.q_of_hkl(np.array([[2.0, 0.0, 0.0]])))[0]
    q = jnp.asarray(g200[None, :] * np.linspace(0.96, 1.04, 9)[:, None])  # a radial cut through (200)

    def loss(amplitude):
        disp = ExternalDisplacement(geo.displacement.u, amplitude)
        excited = displaced(geo.crystal, disp.displacement(geo.crystal))
        return jnp.sum(dft_difference(DFTState(geo.crystal), DFTState(excited), q) * jnp.linspace(-1, 1, 9))

    grad = jax.grad(loss)(0.7)
    h = 1e-4
    fd = (loss(0.7 + h) - loss(0.7 - h)) / (2 * h)
    assert np.isfinite(float(grad)) and float(grad) != 0.0
    assert float(grad) == pytest.approx(float(fd), rel=1e-5)
