"""Where the closed loop's bias comes from: the demo's loop rerun with truth-side switches.

The demo (`jaxpolaron demo`: synthetic run → reduction → fit) recovers its amplitude with a bias far outside its σ.
This script reruns the same loop (same run flags, same fit) while switching the truth in, one source at a time:

  case                        run                         crystals merged                      scales
  as reduced                  the demo's run              indexed (found, indexed, refined)    from the reference
  true orientations           the demo's run              the indexed ones, truth orientation  from the reference
  no selection                the demo's run              every crystal, truth orientation,    from the reference
                                                          none rejected as dissimilar
  unit scales                 the demo's run              every crystal, truth orientation     1 (true: fluence fixed)
  paired classes              pump groups share crystals  every crystal, truth orientation     1
  no noise                    paired, λ without Poisson   every crystal, truth orientation     1

Each row removes one more source, so the change from one row to the next is the bias of that source: orientation
error (and wrong indexings), selection of which crystals are indexed, per-crystal scaling, the dark and pumped
classes holding different crystals, photon noise. What remains in the last row is the reduction's own treatment
(background subtraction, nearest-voxel merging of trilinearly interpolated tables) and the fit's model (size
mixture calibrated on the dark, scale handling). Truth comes from the run's truth.hdf5; a truth crystal table is
written in the format of `jaxpolaron index` (crystals.h5) and handed to `reduce --index-dir`.

Two sources the study found are fixed, and switch back to see them: the synthetic tables' interpolation
(`--interpolation linear`: trilinear tables, 3× the voxel's own smoothing) and the fit's voxel average
(`--voxel-points 1`: the model at voxel centres while merged voxels are means over the voxel).

Usage:
  python experiments/closed_loop_bias.py --out runs/closed_loop_bias [--trains 10] [--seed 1] [--cases a,b,...]
      [--interpolation cubic|linear] [--voxel-points 0|1|2]
Resumable: each run, index, reduction and fit is kept in OUT and skipped when rerun. Results: OUT/summary.md and
OUT/results.json (copy to experiments/results/closed_loop/).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("closed_loop_bias")

# name: (run variant, crystals, scaling, description)
CASES = {
    "as-reduced": ("real", "indexed", "reference", "as reduced"),
    "true-orientations": ("real", "matched", "reference", "true orientations of the indexed crystals"),
    "no-selection": ("real", "all", "reference", "every crystal merged, true orientations"),
    "unit-scales": ("real", "all", "unit", "+ true (unit) per-crystal scales"),
    "paired": ("paired", "all", "unit", "+ dark and pumped frames hold the same crystals"),
    "no-noise": ("quiet", "all", "unit", "+ no photon noise"),
}
RUN_SWITCHES = {"real": [], "paired": ["--paired-classes"], "quiet": ["--paired-classes", "--no-noise"]}
MATCH_DEG = 3.0  # an indexed crystal is the truth crystal of its frame within this misorientation


def _state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def synth_run(out: Path, variant: str, trains: int, seed: int, interpolation: str) -> Path:
    from fitting.demo_cli import MODEL, RUN_FLAGS, TRUTH, _subcommand

    run_dir = out / f"run_{variant}"
    if (run_dir / "done").is_file():
        return run_dir
    resume = ["--resume"] if run_dir.is_dir() and any(run_dir.iterdir()) else []
    truth = [f"--{k.replace('_', '-')}={v}" for k, v in TRUTH.items()]
    _subcommand(["synth-run", str(run_dir), "--trains", str(trains), *RUN_FLAGS, "--model", MODEL, *truth,
                 "--seed", str(seed), "--interpolation", interpolation, *RUN_SWITCHES[variant], *resume,
                 "-q"])  # fmt: skip
    (run_dir / "done").write_text("")
    return run_dir


def index_run(run_dir: Path) -> Path:
    from data_pipeline.index_run import process_run

    index_dir = run_dir.with_name(run_dir.name + "_index")
    state = index_dir / "progress.json"
    if not (state.is_file() and json.loads(state.read_text()).get("finished")):
        process_run(run_dir, index_dir, resume=state.is_file(), progress=False)
    return index_dir


def truth_index(index_dir: Path, run_dir: Path, mode: str) -> tuple[Path, dict]:
    """A copy of `index_dir` whose crystals.h5 holds truth orientations: "matched" (the indexed crystals that
    match a truth crystal of their frame, with its exact orientation) or "all" (every truth crystal, every frame
    a hit). Returns the folder and counts."""
    import h5py

    from data_pipeline.crystal_table import COLUMNS, CrystalTableWriter, read_crystal_table
    from data_pipeline.indexing import misorientation_deg
    from data_pipeline.io import read_cxi_frames

    dest = index_dir.with_name(index_dir.name + f"_truth_{mode}")
    info_path = dest / "truth_info.json"
    if info_path.is_file():
        return dest, json.loads(info_path.read_text())
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(index_dir, dest, ignore=shutil.ignore_patterns("crystals.h5", "crystals.stream"))
    frames = read_cxi_frames(dest / "peaks.cxi")
    with h5py.File(run_dir / "truth.hdf5", "r") as f:
        t_train, t_pulse = f["trainId"][()].astype(np.int64), f["pulseId"][()].astype(np.int64)
        n_true, rot_true = f["n_crystals"][()], f["rotations"][()].astype(np.float64)
    row_of = {(int(t), int(p)): i for i, (t, p) in enumerate(zip(t_train, t_pulse, strict=True))}
    truth_row = np.array([row_of[(int(t), int(p))] for t, p in zip(frames["trainId"], frames["pulseId"], strict=True)])
    rows: dict[str, list] = {name: [] for name in COLUMNS}
    info: dict = {"mode": mode}
    if mode == "matched":
        table = read_crystal_table(index_dir / "crystals.h5")
        angles, unmatched = [], 0
        for i in range(len(table["frame"])):
            t = truth_row[int(table["frame"][i])]
            cands = rot_true[t, : n_true[t]]
            if not len(cands):
                unmatched += 1
                continue
            d = [float(misorientation_deg(table["rotation"][i], c)) for c in cands]
            best = int(np.argmin(d))
            if d[best] > MATCH_DEG:
                unmatched += 1
                continue
            angles.append(d[best])
            for name in COLUMNS:
                rows[name].append(table[name][i])
            rows["rotation"][-1] = cands[best]
        info.update(indexed=len(table["frame"]), matched=len(angles), unmatched=unmatched,
                    misorientation_median_deg=float(np.median(angles)) if angles else None,
                    misorientation_p90_deg=float(np.percentile(angles, 90)) if angles else None)  # fmt: skip
    else:
        for r in range(len(frames["trainId"])):
            t = truth_row[r]
            for c in range(n_true[t]):
                row = {name: np.zeros(shape, dtype) for name, (shape, dtype) in COLUMNS.items()}
                row.update(frame=r, trainId=frames["trainId"][r], pulseId=frames["pulseId"][r],
                           pumped=frames["pumped"][r], rotation=rot_true[t, c],
                           rotation_indexed=rot_true[t, c])  # fmt: skip
                for name in COLUMNS:
                    rows[name].append(row[name])
        info.update(crystals=len(rows["frame"]))
        cfg = json.loads((dest / "config.json").read_text())
        cfg["config"]["hit_min_peaks"] = 0  # every frame is a hit: no crystal is lost for want of peaks
        (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    with CrystalTableWriter(dest / "crystals.h5", attrs={"note": f"truth orientations ({mode})"}) as w:
        w.append({name: np.asarray(v) for name, v in rows.items()})
    info_path.write_text(json.dumps(info, indent=1))
    return dest, info


def reduce(run_dir: Path, index_dir: Path, out: Path, scaling: str, every_crystal: bool) -> Path:
    from data_pipeline.reduce_run import ReduceConfig, reduce_run

    volume = out / "volumes.h5"
    if not volume.is_file():
        work = out / "volumes.work"
        # without selection no crystal is rejected as dissimilar either (similarity −1 accepts every cosine)
        config = ReduceConfig(scaling=scaling, **({"min_similarity": -1.0} if every_crystal else {}))
        reduce_run(run_dir, volume, config=config, index_dir=index_dir, work_dir=work,
                   resume=work.is_dir() and any(work.iterdir()), progress=False, figures=False)  # fmt: skip
    return volume


def fit_case(out: Path, run_dir: Path, volume: Path, voxel_points: int) -> dict:
    from fitting.demo_cli import _fit
    from jaxpolaron.io import read_volume_file
    from jaxpolaron.structure import read_cif

    path = out / "fit.json"
    if path.is_file():
        return json.loads(path.read_text())
    # patience 2 (the demo: 4): L-BFGS on one parameter has converged when two steps bring nothing
    result = _fit(out, run_dir, volume, ("amplitude",), read_cif(), quiet=True, voxel_points=voxel_points, patience=2)
    merge = (read_volume_file(volume).statistics or {}).get("merge", {})
    result["merged"] = {k: v.get("crystals_merged") for k, v in merge.items()}
    path.write_text(json.dumps(result, indent=1))
    return result


def summary(results: dict) -> str:
    lines = [
        "| case | merged dark / pumped | amplitude ± 1σ | deviation | deviation / σ | change from the row above |",
        "|---|---|---|---|---|---|",
    ]
    previous = None
    for name, r in results.items():
        p, true = r["parameters"]["amplitude"], r["truth"]["amplitude"]
        dev = p["value"] - true
        change = "" if previous is None else f"{(p['value'] - previous) / true:+.1%}"
        merged = r.get("merged", {})
        lines.append(f"| {CASES[name][3]} | {merged.get('dark', '?')} / {merged.get('pumped', '?')} | "
                     f"{p['value']:.4g} ± {p['sigma']:.2g} | {dev / true:+.1%} | {dev / p['sigma']:+.1f} | "
                     f"{change} |")  # fmt: skip
        previous = p["value"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trains", type=int, default=10, help="trains of 100 frames (10, as the demo)")
    parser.add_argument("--seed", type=int, default=1, help="synthetic run seed (1, as the demo)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"cases to run ({','.join(CASES)})")
    parser.add_argument(
        "--interpolation",
        default="cubic",
        choices=("cubic", "linear"),
        help="of the synthetic run's |F|² tables (cubic; linear: as before the fix)",
    )
    parser.add_argument(
        "--voxel-points",
        type=int,
        default=0,
        help="the fit's voxel average (0: automatic, 2 for merged volumes; 1: as before the fix)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "results.json"
    state = _state(state_path)
    settings = {"trains": args.trains, "seed": args.seed, "interpolation": args.interpolation,
                "voxel_points": args.voxel_points}  # fmt: skip
    if state.get("settings", settings) != settings:
        raise SystemExit(f"{out} holds a study with other settings {state['settings']}; use another --out.")
    state["settings"] = settings
    results = state.setdefault("cases", {})
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
        variant, crystals, scaling, _ = CASES[name]
        t0 = time.perf_counter()
        run_dir = synth_run(out, variant, args.trains, args.seed, args.interpolation)
        index_dir = index_run(run_dir)
        info = {}
        if crystals != "indexed":
            index_dir, info = truth_index(index_dir, run_dir, crystals)
        case_dir = out / name
        case_dir.mkdir(exist_ok=True)
        volume = reduce(run_dir, index_dir, case_dir, scaling, crystals == "all")
        result = fit_case(case_dir, run_dir, volume, args.voxel_points)
        results[name] = {**result, "truth_index": info, "seconds": round(time.perf_counter() - t0, 1)}
        _save(state_path, state)
        p = result["parameters"]["amplitude"]
        log.info("%s: amplitude %.4g ± %.2g (truth %g)", name, p["value"], p["sigma"], result["truth"]["amplitude"])
    ordered = {k: results[k] for k in CASES if k in results}
    text = "# Closed-loop bias, attributed\n\n" + summary(ordered) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
