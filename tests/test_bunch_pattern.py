import numpy as np
import pytest

from data_pipeline.bunch_pattern import SPB_LASER, make_table, pumped, xray_pulse_ids


def test_synthetic_table_round_trip():
    table = make_table(3, 352, spacing=4)
    ids = xray_pulse_ids(table)
    assert len(ids) == 3 and all(np.array_equal(i, 4 * np.arange(352)) for i in ids)
    flags = pumped(table, np.stack(ids))
    assert flags.shape == (3, 352)
    np.testing.assert_array_equal(flags[0], np.arange(352) % 2 == 1)  # pump on every other pulse


def test_laser_bits_without_xrays_and_other_destinations():
    table = make_table(1, 10, spacing=8)
    table[0, 200] |= np.uint32(SPB_LASER)  # the pump laser alone on an empty slot is no X-ray pulse
    assert len(xray_pulse_ids(table)[0]) == 10
    with pytest.raises(ValueError, match="pulse ids"):
        pumped(table, np.array([[2700]]))
    with pytest.raises(ValueError, match="do not fit"):
        make_table(1, 700, spacing=4)
