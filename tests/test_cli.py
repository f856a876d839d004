"""The `jaxpolaron simulate` command: a small end-to-end run and one-line errors for user mistakes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxpolaron import io
from jaxpolaron.cli import main

SMALL = ["simulate", "--size-nm", "3", "--hkl", "200,1-10", "--window", "9", "--voxel", "0.004", "-q"]


def test_simulate_writes_volume_png_and_json(tmp_path, capsys):
    out, png = tmp_path / "v.h5", tmp_path / "v.png"
    assert main([*SMALL, "--grid", "16", "--out", str(out), "--png", str(png), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["peaks"]) == {"200", "1-10"}
    row = table["peaks"]["200"]
    assert row["integrated_dark"] == pytest.approx(row["integrated_pump"]) and row["integrated_dark"] > 0
    assert row["m1_lobe"] == 0.0 and row["odd_fraction"] is None
    vf = io.read_volume_file(out)
    assert set(vf.volumes) == {"hkl_200", "hkl_1-10", "grid"}
    window = vf.volumes["hkl_200"]
    assert window.hkl == (2, 0, 0)
    np.testing.assert_array_equal(window.difference, 0.0)
    assert vf.config["simulate"]["size_nm"] == 3.0
    assert "jax" in vf.provenance["versions"] and "cif" in vf.provenance["inputs"]
    assert png.stat().st_size > 0 and (tmp_path / "v_peaks.png").stat().st_size > 0


def test_ensemble_run(tmp_path, capsys):
    assert main(["simulate", "--sizes-nm", "3,4", "--hkl", "200", "--window", "7", "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peaks"]["200"]["integrated_dark"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size-nm", "0"], "positive"),
        (["--size-nm", "-3"], "positive"),
        (["--hkl", "999"], "out of range"),
        (["--hkl", "2x0"], "cannot read"),
        (["--hkl", "000"], "direct beam"),
        (["--out", "/nonexistent/dir/v.h5"], "does not exist"),
        (["--png", "/proc/v.png"], ""),
        (["--energy-kev", "-1"], "positive"),
        (["--engine", "fast"], "unknown engine"),
        (["--model", "polaron"], "unknown model"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line(args, message, capsys):
    assert main([*SMALL, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpolaron: error:"), err
    assert message in err[0]


def test_unknown_element_cif_from_console(tmp_path):
    """The installed console script: bad CIF -> one stderr line, exit 2, no traceback."""
    from tests.test_structure import CUBIC_CIF

    cif = tmp_path / "bad.cif"
    cif.write_text(CUBIC_CIF.format(br="Qq"))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpolaron", *SMALL, "--cif", str(cif)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"jaxpolaron: error: CIF {cif} : site 'Br1' has unknown element symbol 'Qq'.".replace(" :", ":")]


def test_default_windows_with_grid_and_none(tmp_path, capsys):
    """The main job's shape: --grid keeps the default four peak windows; --hkl none drops them."""
    assert main(["simulate", "--size-nm", "3", "--grid", "8", "--window", "5", "-q", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["peaks"]) == {"200", "110", "111", "400"}
    out = tmp_path / "g.h5"
    assert main(["simulate", "--size-nm", "3", "--grid", "8", "--hkl", "none", "-q", "--out", str(out)]) == 0
    assert set(io.read_volume_file(out).volumes) == {"grid"}
    assert main(["simulate", "--size-nm", "3", "--hkl", "none", "-q"]) == 2
    assert "nothing to simulate" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["central-hole", "random-hole", "tilt", "phonon"])
def test_models_from_the_command_line(model, tmp_path, capsys):
    out = tmp_path / f"{model}.h5"
    args = [*SMALL, "--model", model, "--holes", "4", "--json", "--out", str(out), "--png", str(tmp_path / "m.png")]
    assert main(args) == 0
    peaks = json.loads(capsys.readouterr().out)["peaks"]
    for row in peaks.values():
        assert row["odd_fraction"] is not None and 0.0 <= row["odd_fraction"] <= 1.0
    # the phonon pattern is along y, so (200) barely changes (q ⊥ u); (1-10) always does
    assert peaks["1-10"]["integrated_pump"] != peaks["1-10"]["integrated_dark"]
    vf = io.read_volume_file(out)
    window = vf.volumes["hkl_1-10"]
    np.testing.assert_allclose(window.difference, window.pump - window.dark)
    assert np.abs(window.difference).max() > 0
    assert vf.config["simulate"]["model"] == model
    # the random hole's default ΔI is the accurate one, the others' the linear one
    assert vf.config["simulate"]["method"] == ("accurate" if model == "random-hole" else "linear")


def test_external_model_from_xyz(tmp_path, capsys):
    """Ground = the DFT cube, excited = a 1e-3 expansion of it: ΔI at (200) is an inward shift."""
    from ase import Atoms
    from ase.io import write

    from jaxpolaron.crystal import dft_cube
    from jaxpolaron.structure import read_cif

    cube = dft_cube(read_cif())
    symbols = [cube.species_names[s] for s in np.asarray(cube.species)]
    pos = np.asarray(cube.positions, float)
    write(tmp_path / "gs.xyz", Atoms(symbols, positions=pos))
    write(tmp_path / "es.xyz", Atoms(symbols, positions=pos * 1.001))
    args = ["simulate", "--model", "external", "--ground-xyz", str(tmp_path / "gs.xyz")]
    args += ["--excited-xyz", str(tmp_path / "es.xyz"), "--hkl", "200", "--window", "15", "--voxel", "0.006"]
    assert main([*args, "--json", "-q"]) == 0
    row = json.loads(capsys.readouterr().out)["peaks"]["200"]
    assert row["m1_lobe"] < 0 and row["shift_ls"] < 0 and row["odd_fraction"] > 0.8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "random-hole", "--hole-bias", "2"], "hole-bias"),
        (["--model", "random-hole", "--holes", "0"], "--holes"),
        (["--model", "external"], "--ground-xyz"),
        (["--model", "tilt", "--tilt-profile", "cubic"], "profile"),
        (["--exact", "--linear"], "not allowed with"),
    ],
)
def test_bad_model_input_is_one_line(args, message, capsys):
    assert main([*SMALL, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpolaron: error:"), err
    assert message in err[0]
