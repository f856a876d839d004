"""experiments/closed_loop_bias.py: the orientation matching it uses to put truth orientations into a crystal table."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from fitting.windows import cubic_rotations

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "closed_loop_bias.py"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("closed_loop_bias", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_misorientation_ignores_the_lattice_setting_and_measures_the_rest(monkeypatch):
    m = _load(monkeypatch)
    r = Rotation.random(random_state=3).as_matrix()
    for s in cubic_rotations()[::5]:  # another pseudo-cubic setting of the same orientation
        assert m.misorientation_deg(r, r @ s) < 1e-5
    tilt = Rotation.from_rotvec(np.radians(2.5) * np.array([0.6, 0.0, 0.8])).as_matrix()
    assert abs(m.misorientation_deg(tilt @ r, r @ cubic_rotations()[7]) - 2.5) < 1e-6
