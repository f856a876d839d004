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
