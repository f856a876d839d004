import numpy as np
import pytest

from jaxpolaron.errors import InputError
from jaxpolaron.structure import derive_pseudo_cubic, read_cif

CUBIC_CIF = """data_cubic
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Cs1 Cs 0.5 0.5 0.5
Pb1 Pb 0 0 0
Br1 {br} 0.5 0 0
Br2 Br 0 0.5 0
Br3 Br 0 0 0.5
"""


def test_bundled_pnma(structure):
    assert structure.species == ("Cs", "Pb", "Br")
    assert structure.oxidation == (1, 2, -1)
    assert structure.z_formula == 4
    assert np.bincount(structure.species_index).tolist() == [4, 4, 12]
    assert structure.pseudo_cubic.a_pc == pytest.approx((structure.volume / 4) ** (1 / 3))
    assert structure.pseudo_cubic.a_pc == pytest.approx(5.881, abs=1e-3)
    np.testing.assert_allclose(structure.pseudo_cubic.basis_frac, [[0.5, 0, 0.5], [0, 0.5, 0], [-0.5, 0, 0.5]])
    rot = structure.pseudo_cubic.rotation
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pc", "ortho"), [((2, 0, 0), (2, 0, 2)), ((1, 1, 0), (1, 2, 1)), ((1, 1, 1), (0, 2, 2)), ((4, 0, 0), (4, 0, 4))]
)
def test_pseudo_cubic_to_ortho(structure, pc, ortho):
    np.testing.assert_allclose(structure.hkl_to_ortho(pc), ortho, atol=1e-12)


def test_pseudo_cubic_family_splits(structure):
    """The PBE cell is slightly distorted: {200} splits into 0.3419 and 0.3367 Å⁻¹ (notes/physics.md)."""
    assert np.linalg.norm(structure.q_of_hkl((2, 0, 0))) == pytest.approx(0.3419, abs=1e-4)
    assert np.linalg.norm(structure.q_of_hkl((0, 2, 0))) == pytest.approx(0.3367, abs=1e-4)
    # G·p_i = h_i: the reciprocal vectors are dual to the pseudo-cubic axes
    hkl = np.array([[2, 0, 0], [1, 1, 0], [1, 1, 1], [3, -1, 2]])
    np.testing.assert_allclose(structure.q_of_hkl(hkl) @ structure.pseudo_cubic_axes().T, hkl, atol=1e-12)


def test_ideal_cubic_perovskite(tmp_path):
    path = tmp_path / "cubic.cif"
    path.write_text(CUBIC_CIF.format(br="Br"))
    s = read_cif(path)
    assert s.z_formula == 1
    assert s.pseudo_cubic.a_pc == pytest.approx(4.0)
    np.testing.assert_allclose(s.pseudo_cubic.basis_frac, np.eye(3))
    np.testing.assert_allclose(s.q_of_hkl((1, 0, 0)), [0.25, 0, 0], atol=1e-12)


def test_unknown_element(tmp_path):
    path = tmp_path / "bad.cif"
    path.write_text(CUBIC_CIF.format(br="Qq"))
    with pytest.raises(InputError, match="unknown element symbol 'Qq'"):
        read_cif(path)


def test_unreadable_cifs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_cif(tmp_path / "missing.cif")
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a CIF\n")
    with pytest.raises(InputError, match="cannot parse"):
        read_cif(garbage)


def test_not_perovskite():
    with pytest.raises(InputError, match="not perovskite-like"):
        derive_pseudo_cubic(np.diag([3.0, 5.0, 9.0]), 1)
