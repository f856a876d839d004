"""Ewald-sphere merging throughput (whole AGIPD-1M frames/s) against a plain numpy np.add.at merge, one run.

    .venv/bin/python benchmarks/bench_merge.py                 # 64 frames, 257³ grid, nearest and trilinear
    .venv/bin/python benchmarks/bench_merge.py --frames 128 --grid 257 --repeats 3

Every frame is one crystal (random orientation) on the real detector q of the default AGIPD-1M geometry with
Poisson(0.1) photons per pixel; what is timed does not depend on the values. Timed (best of --repeats):
  - ours: `data_pipeline.merge.merge_batch`, 16 frames per call, frames already on the device, accumulators
    donated; on one CPU device, and with the batches dealt alternately to every CPU device (each with its own
    accumulators, summed at the end, as the reduction does with Dask workers);
  - baseline: numpy, q_crystal = q_lab @ R, nearest voxel, two np.add.at calls (sum, weight) into float64
    volumes — the plain merge a user would write (the same frames, the same run).
Printed: frames/s of each and the ratio to the baseline, and the merged sums' agreement (they must match).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from data_pipeline import host  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--grid", type=int, default=257)
    ap.add_argument("--q-max", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-frames", type=int, default=8, help="frames merged by np.add.at (it is slow)")
    args = ap.parse_args()
    n_dev = host.use_cpu_cores()
    host.keep_freed_memory()
    import jax.numpy as jnp

    from data_pipeline.geometry import default_agipd_geometry, pixel_positions
    from data_pipeline.merge import MergeGrid, add_into, empty_accumulator, merge_batch, pad_crystals
    from jaxpolaron.reciprocal import random_rotations

    print(f"jax {jax.__version__} {jax.devices()[0].platform}, {n_dev} CPU devices, load {os.getloadavg()}")
    det_q = __import__("data_pipeline.merge", fromlist=["detector_pixels"]).detector_pixels(
        pixel_positions(default_agipd_geometry()), 13.6
    )
    p = det_q.q_abs.size
    grid = MergeGrid(args.grid, args.q_max)
    rng = np.random.default_rng(0)
    batch = 16
    n_batches = max(1, args.frames // batch)
    frames = rng.poisson(0.1, (batch, p)).astype(np.float32)
    good = (rng.random((batch, p)) > 1e-3).astype(np.float32)
    rotations = np.asarray(random_rotations(n_batches * batch, key=jax.random.key(1)), np.float32)
    devices = jax.local_devices()
    per_dev = []
    for d in devices:
        per_dev.append(tuple(jax.device_put(x, d) for x in (frames, good, det_q.q_lab_t)))
    crystal_batches = [pad_crystals(np.arange(batch), rotations[b * batch : (b + 1) * batch], np.ones(batch),
                                    np.zeros(batch), [[]] * batch, capacity=batch, n_pixels=p, width=8)
                       for b in range(n_batches)]  # fmt: skip
    print(f"grid {grid.n}³ over ±{grid.q_max} Å⁻¹ (voxel {grid.voxel:.4f}), {p} pixels per frame, "
          f"{n_batches * batch} frames in batches of {batch}")  # fmt: skip

    def run(mode, n_devices):
        accs = [jax.device_put(empty_accumulator(grid, 1), devices[k]) for k in range(n_devices)]
        jax.block_until_ready(accs)
        t0 = time.perf_counter()
        for b, cb in enumerate(crystal_batches):
            k = b % n_devices
            accs[k] = merge_batch(accs[k], *per_dev[k][:2], per_dev[k][2], jax.device_put(cb, devices[k]), grid=grid,
                                  mode=mode)  # fmt: skip
        jax.block_until_ready(accs)
        dt = time.perf_counter() - t0
        total = None
        for acc in accs:
            total = add_into(total, acc, grid, 1)
        return dt, total

    results = {}
    for mode in ("nearest", "trilinear"):
        for nd in sorted({1, len(devices)}):
            run(mode, nd)  # compile
            best, total = np.inf, None
            for _ in range(args.repeats):
                dt, total = run(mode, nd)
                best = min(best, dt)
            results[(mode, nd)] = (n_batches * batch / best, total)

    # numpy baseline on the first frames (np.add.at is slow; frames/s does not depend on how many)
    nb = min(args.baseline_frames, n_batches * batch)
    q64 = det_q.q_lab_t.T.astype(np.float64)
    n = grid.n
    best_np = np.inf
    for _ in range(max(1, args.repeats - 1)):
        s_np, w_np = np.zeros(n**3), np.zeros(n**3)
        t0 = time.perf_counter()
        for f in range(nb):
            i = np.rint((q64 @ rotations[f].astype(np.float64) + grid.q_max) / grid.voxel).astype(np.int64)
            ok = np.all((i >= 0) & (i < n), axis=1) & (good[f % batch] > 0)
            flat = ((i[:, 0] * n + i[:, 1]) * n + i[:, 2])[ok]
            np.add.at(s_np, flat, frames[f % batch][ok])
            np.add.at(w_np, flat, 1.0)
        best_np = min(best_np, time.perf_counter() - t0)
    fps_np = nb / best_np

    # agreement: our nearest merge of the same first nb frames
    cb = pad_crystals(np.arange(nb) % batch, rotations[:nb], np.ones(nb), np.zeros(nb), [[]] * nb, capacity=nb,
                      n_pixels=p, width=8)  # fmt: skip
    acc = merge_batch(empty_accumulator(grid, 1), jnp.asarray(frames), jnp.asarray(good), jnp.asarray(det_q.q_lab_t),
                      cb, grid=grid)  # fmt: skip
    ours = add_into(None, acc, grid, 1)
    agree = np.abs(ours["sum"].reshape(-1) - s_np).max(), np.abs(ours["weight"].reshape(-1) - w_np).max()

    print(f"\nnumpy np.add.at baseline (1 core): {fps_np:8.1f} frames/s")
    for (mode, nd), (fps, _) in results.items():
        print(f"ours {mode:9s} {nd} device(s):     {fps:8.1f} frames/s   {fps / fps_np:6.1f}× baseline")
    print(f"max |ours − numpy| over {nb} frames: sum {agree[0]:.3g} photons, weight {agree[1]:.3g} pixels")


if __name__ == "__main__":
    main()
