"""How well does a merged volume reproduce the forward-model ensemble it was simulated from? (issue 5)

    .venv/bin/python experiments/merge_pearson.py RUN_DIR VOLUMES.h5 [--q-max 0.5 0.75] [--bin 1 2] [--out F.json]

RUN_DIR is a `jaxpolaron synth-run` directory: volumes.hdf5 holds the forward-model |F|² table of every
crystal size on the merge grid, truth.hdf5 the crystals drawn. VOLUMES.h5 is its `jaxpolaron reduce` output.
The model is the ensemble intensity Σ_size n_size·|F_size|², n_size the number of crystals of that size
in the truth (every frame, dark and pumped; the dark tables). Pearson's r is taken over the voxels that
received data (weight > 0) inside |q| <= q_max, at the native voxel and after b×b×b binning (weighted
means of the merged voxels; the model averaged over the same voxels with the same weights), for the dark volume, the pumped volume and
both merged together. For a run without deformation the pumped volume is an independent second sample
of the same model, so r(dark, pumped) measures the counting-noise limit (Spearman–Brown gives the
reliability of both halves together).
"""

from __future__ import annotations

import argparse
import json
import sys

import h5py
import numpy as np

from data_pipeline.run_io import read_truth
from jaxpolaron.io import read_volume_file


def ensemble_model(run: str, n: int) -> tuple[np.ndarray, dict]:
    """Σ_size n_size·|F_size|² (dark tables) subsampled to an n³ merge grid, and the crystal counts per size."""
    truth = read_truth(run)
    with h5py.File(f"{run}/volumes.hdf5") as f:
        tables, dark_index, sizes = f["tables"], f["dark_index"][:], f["sizes_nm"][:]
        step = (tables.shape[1] - 1) // (n - 1)
        drawn = np.concatenate([truth["size_index"][i, :k] for i, k in enumerate(truth["n_crystals"])])
        counts = np.bincount(drawn, minlength=len(dark_index))
        model = sum(float(c) * tables[d, ::step, ::step, ::step] for c, d in zip(counts, dark_index, strict=True))
    return np.asarray(model, np.float64), {f"{s:g} nm": int(c) for s, c in zip(sizes, counts, strict=True)}


def bin_volume(values: np.ndarray, weight: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """b×b×b blocks (the grid cropped to a multiple of b about its centre voxel): weighted mean and weight sum."""
    if b == 1:
        return values, weight
    n = values.shape[0]
    o = n // 2
    half = (o // b) * b  # keep the centre voxel at a block centre when b is odd, at a corner otherwise
    sl = slice(o - half, o + half)
    v, w = values[sl, sl, sl], weight[sl, sl, sl]
    m = (half * 2) // b
    shape = (m, b, m, b, m, b)
    vw = np.where(w > 0, v * w, 0.0).reshape(shape).sum(axis=(1, 3, 5))
    ws = w.reshape(shape).sum(axis=(1, 3, 5))
    return np.where(ws > 0, vw / np.maximum(ws, 1e-30), 0.0), ws


def q_norm(axis: np.ndarray, b: int) -> np.ndarray:
    """|q| at the voxel (block) centres of the n³ grid binned by b, Å⁻¹."""
    if b > 1:
        o = len(axis) // 2
        half = (o // b) * b
        axis = axis[o - half : o + half].reshape(-1, b).mean(axis=1)
    return np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("volumes")
    ap.add_argument("--q-max", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--bin", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    v = read_volume_file(args.volumes).volumes["grid"]
    axis = np.asarray(v.axes[0], np.float64)
    model, counts = ensemble_model(args.run, len(axis))
    wd, wp = np.asarray(v.weight["dark"], np.float64), np.asarray(v.weight["pump"], np.float64)
    dark, pump = np.asarray(v.dark, np.float64), np.asarray(v.pump, np.float64)
    both_w = wd + wp
    both = np.where(both_w > 0, (dark * wd + pump * wp) / np.maximum(both_w, 1e-30), 0.0)
    stats = read_volume_file(args.volumes).statistics or {}
    result = {"crystals_per_size_in_truth": counts, "merge": stats.get("merge", {}), "pearson": {}}
    voxel = float(axis[1] - axis[0])
    print(f"truth crystals per size: {counts}")
    for b in args.bin:
        db, wdb = bin_volume(dark, wd, b)
        pb, wpb = bin_volume(pump, wp, b)
        ab, wab = bin_volume(both, both_w, b)
        q = q_norm(axis, b)
        for qmax in args.q_max:
            inside = q <= qmax
            row = {"voxel_inv_A": voxel * b, "q_max": qmax}
            for name, vol, w in (("dark", db, wdb), ("pumped", pb, wpb), ("dark+pumped", ab, wab)):
                mb, _ = bin_volume(model, {"dark": wd, "pumped": wp}.get(name, both_w), b)
                sel = inside & (w > 0)
                row[name] = {"r": pearson(vol[sel], mb[sel]), "voxels": int(sel.sum())}
            sel = inside & (wdb > 0) & (wpb > 0)
            r_half = pearson(db[sel], pb[sel])
            row["dark_vs_pumped"] = {"r": r_half, "spearman_brown": 2 * r_half / (1 + r_half)}
            result["pearson"][f"bin{b}_q{qmax:g}"] = row
            print(
                f"voxel {voxel * b:.4f} Å⁻¹, |q| <= {qmax:g}: r(dark, model) = {row['dark']['r']:.4f} "
                f"({row['dark']['voxels']} voxels), r(pumped, model) = {row['pumped']['r']:.4f}, "
                f"r(dark+pumped, model) = {row['dark+pumped']['r']:.4f}, r(dark, pumped) = {r_half:.4f}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
