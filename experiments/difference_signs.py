"""Do the merged difference volume's (200) and (110) peak shifts have the signs of the model that made the run?

    .venv/bin/python experiments/difference_signs.py RUN_DIR VOLUMES.h5 [--also RUN_DIR2 VOLUMES2.h5 ...]
        [--null NULL_VOLUMES.h5] [--out F.json]

RUN_DIR is a `jaxpolaron synth-run` directory (its volumes.hdf5 holds the forward-model tables on the merge
grid: the dark crystal of every size and the pumped hole variants; truth.hdf5 the crystals drawn); VOLUMES.h5
its `jaxpolaron reduce` output on the same grid. For both the model and the measurement, every member of
the {200} and {110} families is measured with `jaxpolaron.metrics.peak_metrics` on an 11³-voxel window
around it, and the family mean and its standard error are reported (m1_lobe, m1_window, shift_ls; > 0 =
outward). The model volumes are Σ over the run's crystals of their tables (dark: each crystal's size table;
pumped: its size's tables averaged over the hole variants), i.e. the expected merge without noise. An
optional null volume (a run without deformation) gives the noise floor of the same metrics.

`--also` adds further runs of the same model (another --seed: new frames and hole variants): their merged
sums (mean × weight per voxel) are added to the first's before the metrics are taken, and the model volumes
are averaged in proportion to each run's crystals.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import h5py
import jax.numpy as jnp
import numpy as np

from data_pipeline.run_io import read_truth
from jaxpolaron.io import read_volume_file
from jaxpolaron.metrics import peak_metrics
from jaxpolaron.reciprocal import Grid
from jaxpolaron.structure import read_cif

METRICS = ("m1_lobe", "m1_window", "shift_ls")
HALF = 5


def family(hkl):
    """Distinct signed permutations of hkl (the pseudo-cubic family)."""
    out = set()
    for p in itertools.permutations(hkl):
        for s in itertools.product((1, -1), repeat=3):
            out.add(tuple(a * b for a, b in zip(p, s, strict=True)))
    return sorted(out)


def model_volumes(run: str, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Expected dark and pumped volumes per crystal on an n³ grid, and the run's number of crystals."""
    with h5py.File(f"{run}/volumes.hdf5") as f:
        tables, dark_index, pumped_index = f["tables"], f["dark_index"][:], f["pumped_index"][:]
        step = (tables.shape[1] - 1) // (n - 1)
        truth = read_truth(run)
        counts = np.zeros(len(dark_index))
        for i, k in enumerate(truth["n_crystals"]):
            np.add.at(counts, truth["size_index"][i, :k], 1)
        dark = sum(c * tables[d, ::step, ::step, ::step] for c, d in zip(counts, dark_index, strict=True))
        pump = sum(
            c * np.mean([tables[p, ::step, ::step, ::step] for p in row], axis=0)
            for c, row in zip(counts, pumped_index, strict=True)
        )
    return dark / counts.sum(), pump / counts.sum(), float(counts.sum())


def family_metrics(dark, pump, axis, structure, hkl):
    voxel = float(axis[1] - axis[0])
    o = len(axis) // 2
    values = {m: [] for m in METRICS}
    for member in family(hkl):
        c = np.rint(structure.q_of_hkl(np.asarray(member, float)) / voxel).astype(int)
        sl = tuple(slice(o + ci - HALF, o + ci + HALF + 1) for ci in c)
        d, p = dark[sl], pump[sl]
        if not (np.all(np.isfinite(d)) and np.all(np.isfinite(p))):
            continue
        g = Grid(centre=jnp.asarray(c * voxel, jnp.float32), voxel=jnp.full(3, voxel, jnp.float32),
                 shape=(2 * HALF + 1,) * 3)  # fmt: skip
        m = peak_metrics(g, jnp.asarray(d, jnp.float32), jnp.asarray(p, jnp.float32))
        for k in METRICS:
            values[k].append(float(m[k]))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))), len(v)) for k, v in values.items()}


def measured(*paths):
    """Dark and pumped means of one or several volume files merged together (NaN where no data), the axis and
    each file's merge statistics."""
    sums = {"dark": 0.0, "pump": 0.0}
    weights = {"dark": 0.0, "pump": 0.0}
    merge_stats = []
    for path in paths:
        vf = read_volume_file(path)
        merge_stats.append((vf.statistics or {}).get("merge", {}))
        v = vf.volumes["grid"]
        for k, mean in (("dark", v.dark), ("pump", v.pump)):
            w = np.asarray(v.weight[k], np.float64)
            sums[k] = sums[k] + np.asarray(mean, np.float64) * w
            weights[k] = weights[k] + w
    dark, pump = (np.where(weights[k] > 0, sums[k] / np.where(weights[k] > 0, weights[k], 1.0), np.nan)
                  for k in ("dark", "pump"))  # fmt: skip
    return dark, pump, np.asarray(v.axes[0]), merge_stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("volumes")
    ap.add_argument("--also", nargs=2, action="append", default=[], metavar=("RUN", "VOLUMES"))
    ap.add_argument("--null")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    structure = read_cif()
    runs = [(args.run, args.volumes), *map(tuple, args.also)]
    dark, pump, axis, merged = measured(*(vol for _, vol in runs))
    models = [model_volumes(run, len(axis)) for run, _ in runs]
    n_total = sum(m[2] for m in models)
    m_dark = sum(m[0] * m[2] for m in models) / n_total
    m_pump = sum(m[1] * m[2] for m in models) / n_total
    rows = {"runs": [list(r) for r in runs], "merged": merged[0] if len(runs) == 1 else merged}
    null = measured(args.null)[:2] if args.null else None
    for hkl in ((2, 0, 0), (1, 1, 0)):
        label = "".join(map(str, hkl))
        rows[label] = {
            "model": family_metrics(m_dark, m_pump, axis, structure, hkl),
            "measured": family_metrics(dark, pump, axis, structure, hkl),
        }
        if null is not None:
            rows[label]["null"] = family_metrics(*null, axis, structure, hkl)
    for label in ("200", "110"):
        for metric in METRICS:
            parts = []
            for source in ("model", "measured", "null"):
                if source in rows[label]:
                    mean, sem, _ = rows[label][source][metric]
                    parts.append(f"{source} {mean:+.2e} ± {sem:.1e} ({'out' if mean > 0 else 'in'})")
            print(f"({label}) {metric:<10}" + "; ".join(parts))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
