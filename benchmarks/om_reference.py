"""Reference peakfinder8 of OnDA Monitor (OM 23.8.3): peaks and frames/s on given frames.

Run with the OM virtual environment (numpy < 2; ``make om-venv``), never with the project's:

    .venv-om/bin/python benchmarks/om_reference.py frames.npz --out om_peaks.npz [--modes normal,fast]
        [--adc-threshold 0 --minimum-snr 6 --min-pixel-count 2 --max-pixel-count 200 --local-bg-radius 3
         --min-res 0 --max-res 1200 --asic-shape 64 64 --max-num-peaks 2048 --repeats 3 --processes 1]

Input (.npz, or .h5 with the same dataset names): ``frames`` (N, P, ss, fs) detector units, ``mask``
(P, ss, fs) nonzero = good pixel, ``radius`` (P, ss, fs) pixels from the beam centre. The parameters are those
of ``data_pipeline.peakfinder.Peakfinder8Config`` under the same names; OM wants integer ``min_res`` and
``max_res`` and keeps pixels with ``min_res <= r <= max_res`` (it zeroes its mask where r < min_res or
r > max_res).

Data layout: OM's peakfinder8 works on one 2D array of ``nasics_y × nasics_x`` ASICs of ``asic_ny × asic_nx``
pixels. Panels (P, ss, fs) are stacked along ss, as OM/Cheetah do for AGIPD-1M: (16·512, 128) with 64×64
ASICs, i.e. ``asic_nx = 64, asic_ny = 64, nasics_x = 2, nasics_y = 128``. A peak at stacked (fs, ss) is on
panel ``ss // P_ss`` at panel ss ``ss % P_ss`` (centroids never leave their ASIC, so this is exact).

Modes: ``normal`` (radial statistics over every good pixel) and ``fast`` (OM's ``fast_mode``: the radial
statistics of each integer-radius bin use at most ``--pixels-per-bin`` (OM default 100) randomly sampled
pixels, drawn once when the detector is set up; Python's ``random`` is seeded with ``--seed`` so the
sample is reproducible).

Timing: the algorithm object is built and run once on the first frame (warm-up, mask set-up), then all frames
are processed ``--repeats`` times; frames/s is the best of the repeats (the machine is shared). With
``--processes K > 1`` the frames are split into K contiguous chunks processed by K worker processes (a
``multiprocessing`` pool, started and warmed up before the clock starts), as a multi-core OM deployment
would (OM parallelises over processes, one frame per process at a time).

Output (.npz): for each mode M, per peak (concatenated over frames, in OM's order): ``M_frame``, ``M_panel``,
``M_fs``, ``M_ss`` (panel pixels, integer values at pixel centres), ``M_intensity`` (total, local background
subtracted), ``M_npix``, ``M_max_intensity``, ``M_sigma`` (local background σ: OM's result field ``snr`` holds
this), ``M_snr`` (= intensity / sigma, the quantity the SNR cut is applied to) and ``M_frames_per_s``; a JSON
summary is printed on stdout's last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np

MODES = ("normal", "fast")


def load_input(path):
    """frames (N, P, ss, fs) float32, mask (P, ss, fs) int8 (1 = good), radius (P, ss, fs) float32."""
    if path.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            frames, mask, radius = (f[k][()] for k in ("frames", "mask", "radius"))
    else:
        with np.load(path) as z:
            frames, mask, radius = (z[k] for k in ("frames", "mask", "radius"))
    if frames.ndim == 3:
        frames = frames[None]
    return frames.astype(np.float32), (mask != 0).astype(np.int8), radius.astype(np.float32)


def om_parameters(args, mode):
    """OM's crystallography parameter group for our Peakfinder8Config values."""
    for name in ("min_res", "max_res"):
        v = getattr(args, name)
        if v != int(v):
            raise ValueError(f"OM takes integer {name}; got {v}")
    return {
        "name": "crystallography",
        "max_num_peaks": int(args.max_num_peaks),
        "adc_threshold": float(args.adc_threshold),
        "minimum_snr": float(args.minimum_snr),
        "min_pixel_count": int(args.min_pixel_count),
        "max_pixel_count": int(args.max_pixel_count),
        "local_bg_radius": int(args.local_bg_radius),
        "min_res": int(args.min_res),
        "max_res": int(args.max_res),
        "bad_pixel_map_filename": None,
        "bad_pixel_map_hdf5_path": None,
        "fast_mode": mode == "fast",
        "number_of_pixel_per_bin_in_radial_statistics": int(args.pixels_per_bin),
    }


def make_detector(args, mode, mask, radius):
    """An OM Peakfinder8PeakDetection for the stacked (P·ss, fs) layout (see the module docstring)."""
    from om.algorithms.crystallography import Peakfinder8PeakDetection

    p, ss, fs = radius.shape
    a_ss, a_fs = args.asic_shape
    if ss % a_ss or fs % a_fs:
        raise ValueError(f"panel {(ss, fs)} is not a multiple of the ASIC {(a_ss, a_fs)}")
    layout = {"asic_nx": a_fs, "asic_ny": a_ss, "nasics_x": fs // a_fs, "nasics_y": p * ss // a_ss}
    random.seed(args.seed)  # fast_mode samples its radial-statistics pixels with `random`
    det = Peakfinder8PeakDetection(
        radius_pixel_map=np.ascontiguousarray(radius.reshape(p * ss, fs), dtype=np.float32),
        layout_info=layout,
        crystallography_parameters=om_parameters(args, mode),
    )
    det.set_bad_pixel_map(np.ascontiguousarray(mask.reshape(p * ss, fs), dtype=np.int8))
    return det


def run_frames(det, frames):
    p, ss, fs = frames.shape[1:]
    return [det.find_peaks(data=np.ascontiguousarray(f.reshape(p * ss, fs))) for f in frames]


# --- worker processes for --processes K ------------------------------------------------------------------------

_WORKER = {}


def _worker_init(args, mode, mask, radius, frames):
    _WORKER["det"] = make_detector(args, mode, mask, radius)
    _WORKER["frames"] = frames


def _worker_run(chunk):
    lo, hi = chunk
    if hi <= lo:  # warm-up call
        run_frames(_WORKER["det"], _WORKER["frames"][:1])
        return []
    return run_frames(_WORKER["det"], _WORKER["frames"][lo:hi])


def time_mode(args, mode, frames, mask, radius):
    """(peak dicts per frame, frames/s, all repeat times in s)."""
    n = len(frames)
    if args.processes <= 1:
        det = make_detector(args, mode, mask, radius)
        run_frames(det, frames[:1])  # warm-up: builds OM's mask
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run_frames(det, frames)
            times.append(time.perf_counter() - t0)
        return out, n / min(times), times
    k = args.processes
    bounds = np.linspace(0, n, k + 1).astype(int)
    chunks = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    ctx = mp.get_context("fork")
    with ctx.Pool(k, initializer=_worker_init, initargs=(args, mode, mask, radius, frames)) as pool:
        pool.map(_worker_run, [(0, 0)] * k, chunksize=1)  # start and warm up every worker
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = pool.map(_worker_run, chunks, chunksize=1)
            times.append(time.perf_counter() - t0)
            out = [pk for part in res for pk in part]
    return out, n / min(times), times


def to_arrays(peaks, panel_ss):
    """Concatenate OM peak dicts (one per frame) into per-peak arrays in panel coordinates."""
    cols = {k: [] for k in ("frame", "panel", "fs", "ss", "intensity", "npix", "max_intensity", "sigma", "snr")}
    for i, pk in enumerate(peaks):
        n = pk["num_peaks"]
        ss = np.asarray(pk["ss"], np.float64)
        sigma = np.asarray(pk["snr"], np.float64)  # OM 23.8.3's 'snr' field is the local sigma
        inten = np.asarray(pk["intensity"], np.float64)
        cols["frame"].append(np.full(n, i, np.int32))
        cols["panel"].append((np.rint(ss).astype(np.int64) // panel_ss).astype(np.int32))
        cols["ss"].append(ss - (np.rint(ss).astype(np.int64) // panel_ss) * panel_ss)
        cols["fs"].append(np.asarray(pk["fs"], np.float64))
        cols["intensity"].append(inten)
        cols["npix"].append(np.asarray(pk["num_pixels"], np.float64).astype(np.int32))
        cols["max_intensity"].append(np.asarray(pk["max_pixel_intensity"], np.float64))
        cols["sigma"].append(sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["snr"].append(np.where(np.abs(sigma) > 1e-10, inten / sigma, 0.0))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=".npz or .h5 with frames, mask, radius")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--modes", default="normal,fast", help="comma-separated subset of normal,fast")
    ap.add_argument("--adc-threshold", type=float, default=0.0)
    ap.add_argument("--minimum-snr", type=float, default=6.0)
    ap.add_argument("--min-pixel-count", type=int, default=2)
    ap.add_argument("--max-pixel-count", type=int, default=200)
    ap.add_argument("--local-bg-radius", type=int, default=3)
    ap.add_argument("--min-res", type=float, default=0.0)
    ap.add_argument("--max-res", type=float, default=1200.0)
    ap.add_argument("--max-num-peaks", type=int, default=2048)
    ap.add_argument("--asic-shape", type=int, nargs=2, default=(64, 64), metavar=("SS", "FS"))
    ap.add_argument("--pixels-per-bin", type=int, default=100, help="fast mode: pixels per radial bin (OM: 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import om

    frames, mask, radius = load_input(args.input)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        raise SystemExit(f"unknown mode in {modes}; choose from {MODES}")
    out, summary = {}, {"om_version": getattr(om, "__version__", "?"), "numpy": np.__version__}
    summary.update(n_frames=len(frames), processes=args.processes, cpus=os.cpu_count())
    for mode in modes:
        peaks, fps, times = time_mode(args, mode, frames, mask, radius)
        arrs = to_arrays(peaks, radius.shape[1])
        out.update({f"{mode}_{k}": v for k, v in arrs.items()})
        out[f"{mode}_frames_per_s"] = np.float64(fps)
        summary[mode] = {"frames_per_s": fps, "times_s": times, "n_peaks": int(arrs["fs"].size)}
    np.savez(args.out, **out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
