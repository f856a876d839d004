"""How well does a merged volume reproduce the forward-model ensemble it was simulated from? (issue 5)

    .venv/bin/python experiments/merge_pearson.py RUN_DIR VOLUMES.h5 [--index-dir DIR] [--q-max 0.5 0.75]
        [--bin 1 2] [--out F.json]

RUN_DIR is a `jaxpolaron synth-run` directory: volumes.hdf5 holds the forward-model |F|² table of every
crystal size on the merge grid, truth.hdf5 the crystals drawn. VOLUMES.h5 is its `jaxpolaron reduce` output
(with its work folder VOLUMES.work: the crystal table and the per-crystal scales). Two forward-model
ensembles (dark tables):

- "merged crystals": Σ_i u_i·s_i·|F_size_i|² over the crystals the reduction merged, s_i its scale factor,
  u_i its weight in the voxel means (1 for the paper's uniform weighting, 1/s_i for inverse-scale) and
  size_i the size of the true crystal it was indexed as (same frame, smallest misorientation): the crystals
  and weights the merge actually used (indexing finds large crystals more often than small ones, and the
  scale normalises each crystal to the reference's brightest pixels).
- "truth counts": Σ_size n_size·|F_size|², n_size the number of crystals of that size in the truth (every
  frame), i.e. the ensemble as drawn, blind to which crystals were indexed and how they were scaled.

Pearson's r is taken over the voxels that received data (weight > 0) inside |q| <= q_max, at the native
voxel and after b×b×b binning (weighted means of the merged voxels; the model averaged over the same voxels
with the same weights), for the dark volume, the pumped volume and both merged together. For a run without
deformation the pumped volume is an independent second sample of the same model, so r(dark, pumped)
measures the counting-noise limit (Spearman–Brown gives the reliability of both halves together).

Also reported: how well the per-crystal scales follow the true factor, Pearson r of log(scale) vs
log(1 / peak |F_size|²) over the merged crystals (the issue's "scaling factors correlate with the true
per-crystal fluence × size factor"; the synthetic fluence is constant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np

from data_pipeline.crystal_table import read_crystal_table
from data_pipeline.indexing import misorientation_deg
from data_pipeline.run_io import read_truth
from jaxpolaron.io import read_volume_file


def dark_tables(run: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_sizes, n, n, n) dark |F|² tables subsampled to an n³ merge grid, and the sizes (nm)."""
    with h5py.File(f"{run}/volumes.hdf5") as f:
        tables, dark_index, sizes = f["tables"], f["dark_index"][:], f["sizes_nm"][:]
        step = (tables.shape[1] - 1) // (n - 1)
        return np.stack([np.asarray(tables[d, ::step, ::step, ::step], np.float64) for d in dark_index]), sizes


def ensemble_model(truth: dict, tables: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, dict]:
    """Σ_size n_size·|F_size|² from the dark tables, and the crystal counts per size in the truth."""
    drawn = np.concatenate([truth["size_index"][i, :k] for i, k in enumerate(truth["n_crystals"])])
    counts = np.bincount(drawn, minlength=len(tables))
    return np.tensordot(counts.astype(np.float64), tables, axes=1), {
        f"{s:g} nm": int(c) for s, c in zip(sizes, counts, strict=True)
    }


def match_merged_crystals(truth: dict, volumes: str, index_dir: str | None = None) -> dict[str, np.ndarray]:
    """Every merged (accepted) crystal matched to the true crystal of its frame with the smallest
    misorientation: {"pumped", "scale", "size", "error_deg"}, one entry each. index_dir: where the reduction's
    crystals.h5 is (default VOLUMES.work/index, i.e. reduce without --index-dir)."""
    work = Path(volumes).with_name(Path(volumes).stem + ".work")
    table = read_crystal_table(Path(index_dir or work / "index") / "crystals.h5")
    with h5py.File(work / "crystal_scales.h5") as f:
        scaling = {k: f["scaling"][k][:] for k in ("crystal", "scale", "accepted")}
    frame_of = {(int(t), int(p)): i for i, (t, p) in enumerate(zip(truth["trainId"], truth["pulseId"], strict=True))}
    out: dict[str, list] = {"pumped": [], "scale": [], "size": [], "error_deg": []}
    for row, scale, accepted in zip(scaling["crystal"], scaling["scale"], scaling["accepted"], strict=True):
        i = frame_of.get((int(table["trainId"][row]), int(table["pulseId"][row])), -1)
        k = int(truth["n_crystals"][i]) if i >= 0 else 0
        if not accepted or k == 0:
            continue
        err = misorientation_deg(table["rotation"][row][None], truth["rotations"][i, :k])
        out["pumped"].append(bool(table["pumped"][row]))
        out["scale"].append(float(scale))
        out["size"].append(int(truth["size_index"][i, int(np.argmin(err))]))
        out["error_deg"].append(float(err.min()))
    return {k: np.asarray(v) for k, v in out.items()}


def merged_crystal_model(
    matched: dict[str, np.ndarray], tables: np.ndarray, pumped: bool = False, weighting: str = "uniform"
) -> tuple[np.ndarray, dict]:
    """Σ_i u_i·s_i·|F_size_i|² over the merged crystals of one class (see the module docstring); matched: from
    `match_merged_crystals`; weighting: the reduction's crystal_weighting."""
    sel = matched["pumped"] == pumped
    scale, size, errors = matched["scale"][sel], matched["size"][sel].astype(int), matched["error_deg"][sel]
    u_s = np.ones_like(scale) if weighting == "inverse-scale" else scale
    weight = np.bincount(size, weights=u_s, minlength=len(tables))
    model = np.tensordot(weight, tables, axes=1)
    info = {"crystals": len(errors), "median_misorientation_deg": float(np.median(errors)) if len(errors) else None,
            "scale_vs_truth": scale_correlation(scale, size, tables)}  # fmt: skip
    return model, info


def scale_correlation(scale: np.ndarray, size: np.ndarray, tables: np.ndarray) -> dict:
    """Pearson r of log(scale) vs log(true factor) over the merged crystals, the true factor being 1 / the peak
    |F|² of the crystal's true size (the fluence is the same for every crystal of a synthetic run)."""
    if len(scale) < 3:
        return {"r_log": None, "crystals": len(scale)}
    peak = tables.reshape(len(tables), -1).max(axis=1)
    r = np.corrcoef(np.log(scale), np.log(1.0 / peak[size]))[0, 1]
    return {"r_log": float(r), "crystals": len(scale)}


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
    ap.add_argument("--index-dir", help="the crystals.h5 folder when reduce ran with --index-dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    volume_file = read_volume_file(args.volumes)
    v = volume_file.volumes["grid"]
    axis = np.asarray(v.axes[0], np.float64)
    tables, sizes = dark_tables(args.run, len(axis))
    truth = read_truth(args.run)
    truth_model, counts = ensemble_model(truth, tables, sizes)
    models = {"merged crystals": {}, "truth counts": {}}
    merged, info = models["merged crystals"], {}
    weighting = (volume_file.config or {}).get("reduce", {}).get("crystal_weighting", "uniform")
    matched = match_merged_crystals(truth, args.volumes, args.index_dir)
    for name, pumped in (("dark", False), ("pumped", True)):
        merged[name], info[name] = merged_crystal_model(matched, tables, pumped, weighting)
    info_d, info_p = info["dark"], info["pumped"]
    models["merged crystals"]["dark+pumped"] = models["merged crystals"]["dark"] + models["merged crystals"]["pumped"]
    for name in ("dark", "pumped", "dark+pumped"):
        models["truth counts"][name] = truth_model
    wd, wp = np.asarray(v.weight["dark"], np.float64), np.asarray(v.weight["pump"], np.float64)
    dark, pump = np.asarray(v.dark, np.float64), np.asarray(v.pump, np.float64)
    both_w = wd + wp
    both = np.where(both_w > 0, (dark * wd + pump * wp) / np.maximum(both_w, 1e-30), 0.0)
    stats = volume_file.statistics or {}
    result = {
        "crystals_per_size_in_truth": counts,
        "merged_crystals_matched": {"dark": info_d, "pumped": info_p},
        "merge": stats.get("merge", {}),
        "crystal_weighting": weighting,
        "pearson": {},
    }
    voxel = float(axis[1] - axis[0])
    print(f"truth crystals per size: {counts}; merged crystals matched to the truth: dark {info_d}, pumped {info_p}")
    for b in args.bin:
        db, wdb = bin_volume(dark, wd, b)
        pb, wpb = bin_volume(pump, wp, b)
        ab, wab = bin_volume(both, both_w, b)
        q = q_norm(axis, b)
        for qmax in args.q_max:
            inside = q <= qmax
            row = {"voxel_inv_A": voxel * b, "q_max": qmax}
            for model_name, per_class in models.items():
                row[model_name] = {}
                for name, vol, w, w_full in (
                    ("dark", db, wdb, wd),
                    ("pumped", pb, wpb, wp),
                    ("dark+pumped", ab, wab, both_w),
                ):
                    mb, _ = bin_volume(per_class[name], w_full, b)
                    sel = inside & (w > 0)
                    row[model_name][name] = {"r": pearson(vol[sel], mb[sel]), "voxels": int(sel.sum())}
            sel = inside & (wdb > 0) & (wpb > 0)
            r_half = pearson(db[sel], pb[sel])
            row["dark_vs_pumped"] = {"r": r_half, "spearman_brown": 2 * r_half / (1 + r_half)}
            result["pearson"][f"bin{b}_q{qmax:g}"] = row
            for model_name in models:
                r = row[model_name]
                print(
                    f"voxel {voxel * b:.4f} Å⁻¹, |q| <= {qmax:g}, {model_name}: dark {r['dark']['r']:.4f} "
                    f"({r['dark']['voxels']} voxels), pumped {r['pumped']['r']:.4f}, "
                    f"dark+pumped {r['dark+pumped']['r']:.4f}"
                )
            print(f"    r(dark, pumped) = {r_half:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
