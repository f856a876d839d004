import jax
import numpy as np
import pytest

from jaxpolaron.crystal import cut_nanocrystal, dft_cube, pad, stack
from jaxpolaron.errors import InputError


def test_superellipsoid_cut(structure):
    c = cut_nanocrystal(structure, 5.0)
    pos = np.asarray(c.positions)
    assert np.all(np.sum(np.abs(pos / 25.0) ** 5, axis=1) <= 1 + 1e-6)
    # a Pb sits at the origin and the species blocks are contiguous
    pb = slice(*c.blocks[c.species_names.index("Pb")])
    assert np.min(np.linalg.norm(pos[pb], axis=1)) < 1e-5
    assert np.all(np.asarray(c.species)[pb] == 1)
    comp = c.composition()
    assert 2.5 < comp["Br"] / comp["Pb"] < 3.0  # CsPbBr3 with a surface
    assert float(c.size) == pytest.approx(50.0)


def test_size_scaling_and_shape(structure):
    n5 = int(cut_nanocrystal(structure, 5.0).n_atoms)
    n10 = int(cut_nanocrystal(structure, 10.0).n_atoms)
    assert n10 / n5 == pytest.approx(8.0, rel=0.1)
    n_cube = int(cut_nanocrystal(structure, 5.0, exponent=50.0).n_atoms)
    n_sphere = int(cut_nanocrystal(structure, 5.0, exponent=2.0).n_atoms)
    assert n_sphere < n5 < n_cube
    # volume of a p=5 superellipsoid relative to its cube: Γ(1+1/5)³/Γ(1+3/5) ≈ 0.8
    per_atom = structure.pseudo_cubic.a_pc**3 / 5
    assert n_cube * per_atom / 50.0**3 == pytest.approx(1.0, rel=0.12)


@pytest.mark.parametrize("size", [0.0, -1.0, float("nan")])
def test_bad_size(structure, size):
    with pytest.raises(InputError, match="positive"):
        cut_nanocrystal(structure, size)


def test_bad_centre(structure):
    with pytest.raises(InputError, match="not a species"):
        cut_nanocrystal(structure, 5.0, centre="Xe")


@pytest.mark.parametrize("pattern", ["edges", "edges+facets"])
def test_dft_cube(structure, pattern):
    c = dft_cube(structure, vacancies=pattern)
    assert c.composition() == {"Cs": 200, "Pb": 125, "Br": 450}
    pos = np.asarray(c.positions)
    pb = pos[slice(*c.blocks[1])]
    # 5×5×5 Pb spanning 4 pseudo-cubic cells per axis
    assert np.ptp(pb, axis=0) == pytest.approx(np.full(3, 4 * structure.pseudo_cubic.a_pc), rel=0.03)


def test_dft_cube_bad_vacancies(structure):
    with pytest.raises(InputError, match="unknown vacancy pattern"):
        dft_cube(structure, vacancies="random")
    with pytest.raises(InputError, match="exactly 8"):
        dft_cube(structure, vacancies=[(1, 5, 5)])


def test_pad_and_stack(structure):
    small, big = cut_nanocrystal(structure, 3.0), cut_nanocrystal(structure, 4.0)
    batch = stack([small, big], multiple=64)
    assert batch.positions.shape[0] == 2
    assert all((b - a) % 64 == 0 for a, b in batch.blocks)
    np.testing.assert_allclose(np.asarray(batch.mask.sum(axis=1)), [small.n_atoms, big.n_atoms])
    padded = pad(small, [b - a for a, b in batch.blocks])
    assert padded.composition() == small.composition()
    # a stacked batch is a pytree that vmaps
    counts = jax.vmap(lambda c: c.n_atoms)(batch)
    np.testing.assert_allclose(np.asarray(counts), [small.n_atoms, big.n_atoms])
