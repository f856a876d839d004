"""Pump/dark labels from the EuXFEL bunch-pattern table (timeserver `data.bunchPatternTable`).

Each train has 2700 slots (4.5 MHz); a slot's bits say where the electron bunch goes (DESTINATION_T4D and
no soft kick = an X-ray pulse in SASE1, i.e. SPB) and which pump-probe lasers fire (PPL_BITS.LP_SPB). Bits
are decoded with `euxfel_bunch_pattern`; this module only maps them onto the detector's pulse ids.
"""

from __future__ import annotations

import euxfel_bunch_pattern as bp
import numpy as np

N_SLOTS = 2700
SPB_LASER = bp.PPL_BITS.LP_SPB


def xray_pulse_ids(table: np.ndarray) -> list[np.ndarray]:
    """Slots with an X-ray pulse to SASE1 for each train: table (n_trains, 2700) -> list of slot indices."""
    return [np.flatnonzero(row) for row in np.asarray(bp.is_sase(np.asarray(table), 1))]


def pumped(table: np.ndarray, pulse_ids: np.ndarray) -> np.ndarray:
    """Whether the SPB pump laser fired with each detector pulse.

    Args:
        table: (n_trains, 2700) uint32 bunch-pattern table.
        pulse_ids: (n_trains, n_pulses) slot index of each detector frame (AGIPD `image.pulseId`).

    Returns:
        (n_trains, n_pulses) bool.
    """
    table = np.asarray(table)
    ids = np.asarray(pulse_ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= table.shape[-1]:
        raise ValueError(f"pulse ids must lie in [0, {table.shape[-1]}), got {ids.min()}..{ids.max()}")
    laser = np.asarray(bp.is_laser(table, SPB_LASER))
    return np.take_along_axis(laser, ids, axis=-1)


def make_table(n_trains: int, n_pulses: int, *, spacing: int = 4, first: int = 0, pump_every: int = 2) -> np.ndarray:
    """A synthetic bunch-pattern table: n_pulses SASE1 pulses every `spacing` slots, the SPB pump laser on
    every `pump_every`-th pulse (starting with the second, so the first frame is dark).

    Returns (n_trains, 2700) uint32. The paper's 3520 frames/s: 352 pulses × 10 Hz, spacing 4 (1.1 MHz).
    """
    slots = first + spacing * np.arange(n_pulses)
    if slots[-1] >= N_SLOTS:
        raise ValueError(f"{n_pulses} pulses every {spacing} slots do not fit in {N_SLOTS} slots")
    row = np.zeros(N_SLOTS, np.uint32)
    row[slots] |= np.uint32(bp.DESTINATION_T4D)
    row[slots[1::pump_every]] |= np.uint32(SPB_LASER)
    return np.tile(row, (n_trains, 1))
