"""Whole-reduction throughput and peak memory of `jaxpolaron reduce` on synthetic runs of two lengths.

    .venv/bin/python benchmarks/bench_reduce.py                       # 2 and 8 trains × 64 pulses, 129³ tables
    .venv/bin/python benchmarks/bench_reduce.py --trains 2,8 --pulses 64 --grid 257

For each length: a synthetic run (`jaxpolaron synth-run`, every frame a hit), then `jaxpolaron index` and
`jaxpolaron reduce --index-dir` each in a fresh subprocess. Printed: frames, indexed crystals, reduce wall time,
frames/s (the three passes over the run included) and the reduce process's peak resident memory (ru_maxrss):
a streaming reduction's memory must not grow with the run length. The merge kernel alone is timed by
bench_merge.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "jaxpolaron"]


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a child process run to completion."""
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(pid.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {pid.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trains", default="2,8", help="run lengths in trains (comma-separated)")
    ap.add_argument("--pulses", type=int, default=64)
    ap.add_argument("--grid", type=int, default=129, help="synthetic table grid (the merge grid stays 257)")
    ap.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-reduce-"))
    print(f"load {os.getloadavg()}, {os.cpu_count()} cores; runs in {work}")
    rows = []
    for trains in (int(t) for t in args.trains.split(",")):
        run = work / f"run{trains}"
        if not run.exists():
            synth = ["--trains", str(trains), "--pulses", str(args.pulses), "--hit-fraction", "1"]
            synth += ["--grid", str(args.grid)]
            subprocess.run([*EXE, "synth-run", str(run), *synth, "--seed", "3", "-q"], check=True)
        idx = work / f"idx{trains}"
        if not idx.exists():
            subprocess.run([*EXE, "index", str(run), "--out", str(idx), "-q"], check=True)
        out = work / f"vol{trains}.h5"
        for p in (out, work / f"vol{trains}.work"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        wall, rss = timed([*EXE, "reduce", str(run), "--out", str(out), "--index-dir", str(idx), "--no-figures",
                           "-q"])  # fmt: skip
        frames = trains * args.pulses
        n_cryst = int(json.loads((idx / "stats.json").read_text())["table_s1"]["total"]["crystals"])
        rows.append((frames, n_cryst, wall, frames / wall, rss))
    print(f"\n{'frames':>8s} {'crystals':>9s} {'wall s':>8s} {'frames/s':>9s} {'peak RSS MiB':>13s}")
    for r in rows:
        print(f"{r[0]:8d} {r[1]:9d} {r[2]:8.1f} {r[3]:9.1f} {r[4]:13.0f}")
    if len(rows) > 1:
        print(f"peak memory ratio longest/shortest run: {rows[-1][4] / rows[0][4]:.2f} "
              f"for {rows[-1][0] / rows[0][0]:.0f}× the frames")  # fmt: skip


if __name__ == "__main__":
    main()
