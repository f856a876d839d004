"""The orientation matching experiments/closed_loop_bias.py relies on to put truth orientations into a crystal
table (`data_pipeline.indexing.misorientation_deg`, which it uses)."""

import numpy as np
from scipy.spatial.transform import Rotation

from data_pipeline.indexing import misorientation_deg
from fitting.windows import cubic_rotations


def test_misorientation_ignores_the_lattice_setting_and_measures_the_rest():
    r = Rotation.random(random_state=3).as_matrix()
    for s in cubic_rotations()[::5]:  # another pseudo-cubic setting of the same orientation
        assert misorientation_deg(r, r @ s) < 1e-5
    tilt = Rotation.from_rotvec(np.radians(2.5) * np.array([0.6, 0.0, 0.8])).as_matrix()
    assert abs(misorientation_deg(tilt @ r, r @ cubic_rotations()[7]) - 2.5) < 1e-6
