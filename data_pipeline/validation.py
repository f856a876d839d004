"""Indexing results against the truth of a synthetic run (orientation errors, wrong and missed crystals).

An indexed crystal is compared with every true crystal of its frame (matched by train and pulse id); its
error is the smallest misorientation modulo the 24 cube rotations (the pseudo-cubic indexing cannot tell the
orthorhombic axes apart when only fundamental reflections are seen; `strict` errors use the cell's own point
group). A crystal is *wrong* when that error exceeds `wrong_deg` (2°, the issue's definition).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.indexing import misorientation_deg


def orientation_errors(table: dict, truth: dict, symmetry=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per indexed crystal: (error after refinement, error before, truth row) in degrees; truth row -1 when the
    frame is not in the truth file."""
    key = {(int(t), int(p)): i for i, (t, p) in enumerate(zip(truth["trainId"], truth["pulseId"], strict=True))}
    after, before, rows = [], [], []
    columns = (table["trainId"], table["pulseId"], table["rotation"], table["rotation_indexed"])
    for t, p, r, r0 in zip(*columns, strict=True):
        i = key.get((int(t), int(p)), -1)
        rows.append(i)
        n = int(truth["n_crystals"][i]) if i >= 0 else 0
        if n == 0:
            after.append(np.inf)
            before.append(np.inf)
            continue
        true_r = np.asarray(truth["rotations"][i, :n], np.float64)
        after.append(float(misorientation_deg(r[None], true_r, symmetry).min()))
        before.append(float(misorientation_deg(r0[None], true_r, symmetry).min()))
    return np.array(after), np.array(before), np.array(rows)


def validate_against_truth(run_dir: str | Path, crystals_h5: str | Path, lattice, wrong_deg: float = 2.0) -> dict:
    """Summary numbers (JSON-serialisable) of an indexing run on a synthetic run with truth.hdf5."""
    from data_pipeline.crystal_table import read_crystal_table
    from data_pipeline.run_io import read_truth

    truth = read_truth(run_dir)
    table = read_crystal_table(crystals_h5)
    after, before, rows = orientation_errors(table, truth)
    strict, _, _ = orientation_errors(table, truth, lattice.symmetry)
    n = len(after)
    frames_with_truth = int(np.sum(truth["n_crystals"] > 0))

    def med(x):
        return float(np.median(x)) if len(x) else float("nan")

    per_frame = np.bincount(rows[rows >= 0], minlength=len(truth["n_crystals"])) if n else np.zeros(0, int)
    return {
        "indexed_crystals": n,
        "true_crystals": int(np.sum(truth["n_crystals"])),
        "frames_with_crystals": frames_with_truth,
        "median_error_deg_before_refinement": med(before),
        "median_error_deg_after_refinement": med(after),
        "p90_error_deg_after_refinement": float(np.percentile(after, 90)) if n else float("nan"),
        "wrong_deg": wrong_deg,
        "wrong_before_refinement": int(np.sum(before > wrong_deg)),
        "wrong_after_refinement": int(np.sum(after > wrong_deg)),
        "wrong_fraction_after_refinement": float(np.mean(after > wrong_deg)) if n else 0.0,
        "strict_median_error_deg": med(strict),
        "strict_fraction_within_wrong_deg": float(np.mean(strict <= wrong_deg)) if n else 0.0,
        "multi_crystal_frames_indexed": int(np.sum(per_frame >= 2)) if n else 0,
        "multi_crystal_frames_indexed_all_correct": int(
            sum(1 for f in np.flatnonzero(per_frame >= 2) if np.all(after[rows == f] <= wrong_deg))
        )
        if n
        else 0,
    }
