"""peakfinder8 throughput on AGIPD-1M frames (16, 512, 128): single frame and batches of 8.

    .venv/bin/python benchmarks/bench_peakfinder.py             # current data_pipeline.peakfinder
    .venv/bin/python benchmarks/bench_peakfinder.py --baseline  # also the committed version (git show HEAD:…)
    .venv/bin/python benchmarks/bench_peakfinder.py --repeats 9 --parts

Frames: Poisson background λ(r) = 30 + 300·exp(-r/100) on the default AGIPD-1M geometry
(data_pipeline.geometry), plus 50 Gaussian spots (σ = 1 px, 5e3…4e4 counts) at random
positions inside ASICs. Each jitted function is compiled and run once, then timed ``--repeats`` times
(median, each call ended with ``block_until_ready``). The machine is shared and noisy, so the same-run
reference is a plain numpy implementation of just the radial sigma-clipping step (``np.bincount``, float32
input, 5 passes; the binning is precomputed outside the timing) — compare the "× numpy-clip" column between
runs rather than absolute frames/s.

With ``--parts`` the stages of the fast path are timed separately (each its own jit).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from data_pipeline import peakfinder as pf  # noqa: E402

SHAPE = (16, 512, 128)


def radius_map():
    """Pixel distance from the beam axis (pixels) for the default AGIPD-1M geometry at 122.4 mm."""
    from data_pipeline.geometry import default_agipd_geometry, pixel_positions, pixel_radius

    return pixel_radius(pixel_positions(default_agipd_geometry())).astype(np.float32)


def make_frames(n, r, n_spots=50, seed=0):
    rng = np.random.default_rng(seed)
    lam0 = 30.0 + 300.0 * np.exp(-r / 100.0)
    out = []
    yy, xx = np.arange(-4, 5)[:, None], np.arange(-4, 5)[None, :]
    for _ in range(n):
        lam = lam0.copy()
        for _ in range(n_spots):
            p = rng.integers(SHAPE[0])
            s0 = rng.integers(0, SHAPE[1] // 64) * 64 + rng.uniform(6, 58)
            f0 = rng.integers(0, SHAPE[2] // 64) * 64 + rng.uniform(6, 58)
            tot = rng.uniform(5e3, 4e4)
            si, fi = int(s0), int(f0)
            g = np.exp(-((yy + si - s0) ** 2 + (xx + fi - f0) ** 2) / 2.0)
            lam[p, si - 4 : si + 5, fi - 4 : fi + 5] += tot * g / g.sum()
        out.append(rng.poisson(lam).astype(np.float32))
    return np.stack(out)


def numpy_clip(data, b, good_idx, nb, cfg):
    """Plain numpy radial sigma clipping (float32 data, float64 sums); b, good_idx precomputed."""
    v = data.reshape(-1)[good_idx]
    upper, lower = np.full(nb, 1e9), np.full(nb, -1e9)
    for _ in range(cfg.n_sigma_clip_iterations):
        k = (v < upper[b]) & (v > lower[b])
        cnt = np.bincount(b[k], minlength=nb)
        s1 = np.bincount(b[k], v[k], minlength=nb)
        s2 = np.bincount(b[k], v[k].astype(np.float64) ** 2, minlength=nb)
        nz = cnt > 0
        off = np.where(nz, s1 / np.maximum(cnt, 1), 0.0)
        sig = np.where(nz, np.sqrt(np.maximum(s2 / np.maximum(cnt, 1) - off**2, 0)), 0.0)
        upper = np.where(nz, np.maximum(off + cfg.minimum_snr * sig, cfg.adc_threshold), np.finfo(np.float32).max)
        lower = np.where(nz, off - cfg.minimum_snr * sig, np.finfo(np.float32).tiny)
    return off, sig, upper


def timeit(fn, repeats):
    jax.block_until_ready(fn())  # compile + first
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def load_committed():
    src = subprocess.run(
        ["git", "show", "HEAD:data_pipeline/peakfinder.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "peakfinder_committed.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("peakfinder_committed", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--baseline", action="store_true", help="also time the committed (git HEAD) version")
    ap.add_argument("--parts", action="store_true", help="time the stages of the fast path separately")
    args = ap.parse_args()

    flags = os.environ.get("XLA_FLAGS", "")
    print(f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} cpus, XLA_FLAGS={flags!r}")
    r = radius_map()
    cfg = pf.Peakfinder8Config(max_res=float(r.max()) + 1)
    frames = make_frames(args.batch, r)
    mask = np.ones(SHAPE, bool)
    fr_d, mask_d, r_d = jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(r)

    nb = cfg.n_radial_bins
    good = mask & (r >= cfg.min_res) & (r < cfg.max_res)
    good_idx = np.flatnonzero(good)
    b = np.clip(np.rint(r), 0, nb - 1).astype(np.int64).reshape(-1)[good_idx]
    t_np = timeit(lambda: numpy_clip(frames[0], b, good_idx, nb, cfg), args.repeats)

    rows = [("numpy radial clip only (reference)", t_np, 1)]
    impls = [("current", pf)]
    if args.baseline:
        impls.insert(0, ("committed", load_committed()))
    results = {}
    for name, mod in impls:
        kw = {}
        if hasattr(mod, "make_binning"):
            kw["binning"] = mod.make_binning(r, mask, cfg)
            t_bin = timeit(lambda mod=mod: mod.make_binning(r, mask, cfg), 1)
            print(f"{name}: make_binning (host, once per geometry) {t_bin * 1e3:.0f} ms")
        t1 = timeit(lambda mod=mod, kw=kw: mod.find_peaks(fr_d[0], mask_d, r_d, cfg, **kw), args.repeats)
        tb = timeit(lambda mod=mod, kw=kw: mod.find_peaks_batch(fr_d, mask_d, r_d, cfg, **kw), args.repeats)
        rows.append((f"{name}: find_peaks, 1 frame", t1, 1))
        rows.append((f"{name}: find_peaks_batch, {args.batch} frames", tb, args.batch))
        pk = mod.find_peaks_batch(fr_d, mask_d, r_d, cfg, **kw)
        results[name] = pk
        print(f"{name}: peaks per frame {np.asarray(pk.n_peaks).tolist()}")
    if len(results) == 2:
        a, c = results["committed"], results["current"]
        same = all(np.allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-3) for x, y in zip(a, c, strict=True))
        print(f"committed vs current peak lists agree (rtol 1e-5): {same}")

    print(f"\n{'':44s} {'ms/call':>9s} {'frames/s':>9s} {'× numpy-clip':>13s}")
    for label, t, n in rows:
        print(f"{label:44s} {t * 1e3:9.1f} {n / t:9.1f} {t_np / (t / n):13.2f}")

    if args.parts and hasattr(pf, "make_binning"):
        print("\nstages of find_peaks (each jitted on its own, 1 frame):")
        for label, t in time_parts(fr_d[0], cfg, pf.make_binning(r, mask, cfg), args.repeats):
            print(f"  {label:42s} {t * 1e3:8.2f} ms")


def time_parts(frame, cfg, bn, repeats):
    """Stages of the fast path (private functions of data_pipeline.peakfinder; they may change)."""
    panel = frame.shape[1:]
    front = jax.jit(lambda x, b: pf._front(x, None, None, cfg, b))(frame, bn)
    d, g, b, above, stats = front
    cand = g & above
    comps = jax.jit(lambda *a: pf._components_compact(*a, cfg))(d, cand, b, stats.offset)[0]
    tiles = lambda x: pf._to_tiles(x, cfg.asic_shape).reshape(-1)  # noqa: E731
    parts = [
        ("tile layout + radial statistics (5 passes)", lambda: pf._radial_statistics_binned(tiles(frame), bn, cfg), ()),
        ("  of which: gather into sorted layout", lambda: tiles(frame)[bn.pixels], ()),
        ("front: statistics + above-threshold map", lambda: pf._front(frame, None, None, cfg, bn), ()),
        (
            "compact candidate indices",
            lambda c: pf._compact_indices(c.reshape(-1, cfg.asic_shape[1]), cfg.max_num_candidates),
            (cand,),
        ),
        ("components (compact, incl. indices)", lambda *a: pf._components_compact(*a, cfg), (d, cand, b, stats.offset)),
        (
            "local background + acceptance + sort",
            lambda *a: pf._measure(*a, panel, cfg),
            (d, g, b, above, stats, comps),
        ),
        ("whole find_peaks", lambda: pf.find_peaks(frame, None, None, cfg, binning=bn), ()),
    ]
    print(f"  ({int(jnp.sum(cand))} candidate pixels, {int(comps[0])} components)")
    out = []
    for label, fn, a in parts:
        f = jax.jit(fn) if label != "whole find_peaks" else fn
        out.append((label, timeit(lambda f=f, a=a: f(*a), repeats)))
    return out


if __name__ == "__main__":
    main()
