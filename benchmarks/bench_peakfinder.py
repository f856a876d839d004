"""peakfinder8 throughput on AGIPD-1M frames (16, 512, 128): single frame and batches of 8.

    .venv/bin/python benchmarks/bench_peakfinder.py             # current data_pipeline.peakfinder
    .venv/bin/python benchmarks/bench_peakfinder.py --baseline [REV]  # also the version at git REV (HEAD)
    .venv/bin/python benchmarks/bench_peakfinder.py --repeats 9 --parts
    .venv/bin/python benchmarks/bench_peakfinder.py --ondamonitor   # vs OM's peakfinder8 (make om-venv)

``find_peaks_batch`` spreads a batch over one CPU device per core (``data_pipeline.host``, which also
keeps freed memory for reuse; ``--cores 1`` keeps the batch on one core); ``find_peaks`` (one frame) always
runs on one core.

Frames: Poisson background λ(r) = 30 + 300·exp(-r/100) on the default AGIPD-1M geometry
(data_pipeline.geometry), plus 50 Gaussian spots (σ = 1 px, 5e3…4e4 counts) at random
positions inside ASICs. Each jitted function is compiled and run once, then timed ``--repeats`` times
(median, each call ended with ``block_until_ready``). The machine is shared and noisy, so the same-run
reference is a plain numpy implementation of just the radial sigma-clipping step (``np.bincount``, float32
input, 5 passes; the binning is precomputed outside the timing) — compare the "× numpy-clip" column between
runs rather than absolute frames/s.

With ``--parts`` the stages of the fast path are timed separately (each its own jit).

With ``--ondamonitor`` the same frames are written to a temporary .npz and run through OM's peakfinder8
(``.venv-om/bin/python benchmarks/om_reference.py``: normal and fast_mode, 1 and 2 processes) in alternating
rounds with ours (single frame, batched, and our fast mode ``radial_pixels_per_bin=100``); each timing is the
best of ``--rounds`` rounds. Single frames are device arrays; batches are host (numpy) arrays, as the ``index``
command reads them from the run (64-byte aligned, as ``index`` allocates them: XLA then takes them
uncopied). Two frame sets: the spot frames above, and synthetic AGIPD frames of the product
(``data_pipeline.synthetic``: 4/5/6 nm CsPbBr3 crystals, every frame a hit, 1e14 photons/µm², photon units;
peak finder settings adc_threshold 2, minimum_snr 5, max_pixel_count 400 as for photon data, and with
adc_threshold 0). Recall = fraction of OM (normal mode) peaks matched by one of ours within 1.5 px on the same
panel; "extra" = our peaks matching none of OM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
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

from data_pipeline import host  # noqa: E402
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


def load_committed(rev="HEAD"):
    src = subprocess.run(
        ["git", "show", f"{rev}:data_pipeline/peakfinder.py"], cwd=ROOT, capture_output=True, text=True, check=True
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
    ap.add_argument("--baseline", nargs="?", const="HEAD", metavar="REV",
                    help="also time the version committed at git REV (default HEAD)")  # fmt: skip
    ap.add_argument("--parts", action="store_true", help="time the stages of the fast path separately")
    ap.add_argument("--ondamonitor", action="store_true", help="compare with OM's peakfinder8 (needs .venv-om)")
    ap.add_argument("--om-python", default=os.path.join(ROOT, ".venv-om", "bin", "python"))
    ap.add_argument("--rounds", type=int, default=3, help="--ondamonitor: alternating timing rounds")
    ap.add_argument("--frames", type=int, default=16, help="--ondamonitor: frames per set")
    ap.add_argument("--no-synthetic", action="store_true", help="--ondamonitor: spot frames only")
    ap.add_argument("--cores", type=int, help="CPU devices find_peaks_batch spreads a batch over (default: all)")
    args = ap.parse_args()
    n_dev = host.use_cpu_cores(args.cores)  # before any JAX computation
    print(f"glibc keeps freed memory: {host.keep_freed_memory()}")
    print(f"find_peaks_batch over {n_dev} CPU device(s); find_peaks (single frame) on one")
    if args.ondamonitor:
        return compare_ondamonitor(args)

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
        impls.insert(0, ("committed", load_committed(args.baseline)))
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


def synthetic_frames(n, seed=0, fluence=1e14):
    """(frames (n, 16, 512, 128) photons, good-pixel mask, radius) from data_pipeline.synthetic (all hits)."""
    from data_pipeline import synthetic as syn
    from data_pipeline.geometry import default_agipd_geometry, pixel_positions, pixel_radius
    from jaxpolaron.structure import read_cif

    scfg = syn.SyntheticConfig(sizes_nm=(4.0, 5.0, 6.0), grid_n=129, hit_fraction=1.0, fluence_ph_per_um2=fluence)
    geom = default_agipd_geometry()
    det = syn.detector(geom, scfg, key=jax.random.key(seed + 1))
    vol = syn.crystal_volumes(read_cif(), scfg)
    layout = syn.RunLayout(n_trains=1, n_pulses=n)
    frames = np.stack([f for f, _ in syn.frames(jax.random.key(seed + 2), det, vol, scfg, layout)])
    radius = pixel_radius(pixel_positions(geom)).astype(np.float32)
    return frames.astype(np.float32), ~np.asarray(det.bad), radius


def match_peaks(ours, om, tol=1.5):
    """(OM peaks, OM peaks matched by one of ours within tol px on the same panel, our unmatched peaks)."""
    n_om = n_hit = n_extra = 0
    for i in range(len(ours.n_peaks)):
        n = int(ours.n_peaks[i])
        fs, ss, pan = (np.asarray(x[i, :n]) for x in (ours.fs, ours.ss, ours.panel))
        sel = om["frame"] == i
        d = np.hypot(om["fs"][sel][:, None] - fs[None], om["ss"][sel][:, None] - ss[None])
        d[om["panel"][sel][:, None] != pan[None]] = np.inf
        close = d <= tol
        n_om += int(sel.sum())
        n_hit += int(close.any(axis=1).sum())
        n_extra += int((~close.any(axis=0)).sum())
    return n_om, n_hit, n_extra


def om_as_peaklist(z, mode, n_frames):
    """OM's peaks of one mode as a (ragged -> padded) PeakList-like object for match_peaks."""
    fr = z[f"{mode}_frame"]
    m = max(int(np.bincount(fr, minlength=n_frames).max()) if fr.size else 0, 1)
    cols = {k: np.zeros((n_frames, m)) for k in ("fs", "ss")}
    cols["panel"] = np.full((n_frames, m), -1)
    counts = np.zeros(n_frames, int)
    for j in range(fr.size):
        i = fr[j]
        for k in ("fs", "ss", "panel"):
            cols[k][i, counts[i]] = z[f"{mode}_{k}"][j]
        counts[i] += 1
    return type("OmPeaks", (), {"n_peaks": counts, **cols})


def compare_ondamonitor(args):
    """Ours vs OM's peakfinder8 on identical frames: frames/s (alternating rounds) and recall."""
    if not os.path.exists(args.om_python):
        raise SystemExit(f"{args.om_python} not found: run `make om-venv` first")
    print(f"jax {jax.__version__} {jax.devices()[0].platform}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    r = radius_map()
    max_res = float(np.ceil(r.max()) + 1)  # OM takes integer radii; every pixel is inside
    sets = [("spots", make_frames(args.frames, r), np.ones(SHAPE, bool), r, {})]
    if not args.no_synthetic:
        t0 = time.perf_counter()
        fr, good, rs = synthetic_frames(args.frames)
        print(f"synthetic AGIPD frames: {time.perf_counter() - t0:.0f} s to simulate")
        photon = {"adc_threshold": 2.0, "minimum_snr": 5.0, "max_pixel_count": 400}
        sets += [("synthetic adc2", fr, good, rs, photon), ("synthetic adc0", fr, good, rs, {})]
    tmp = tempfile.mkdtemp(prefix="bench-pf8-")
    rows = []
    for name, frames, mask, radius, kw in sets:
        cfg = pf.Peakfinder8Config(max_res=max_res, max_num_peaks=2048, **kw)
        fast = dataclasses.replace(cfg, radial_pixels_per_bin=100)
        inp = os.path.join(tmp, "frames.npz")
        np.savez(inp, frames=frames, mask=mask, radius=radius)
        om_args = [f"--{k.replace('_', '-')}={getattr(cfg, k)}" for k in OM_PARAMS]
        fr_d, mask_d, r_d = jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(radius)
        bn, bn_fast = pf.make_binning(radius, mask, cfg), pf.make_binning(radius, mask, fast)
        a = (fr_d, mask_d, r_d)
        # what `jaxpolaron index` hands find_peaks_batch: host frames, 64-byte aligned (reach XLA uncopied)
        aligned = host.aligned_empty(frames.shape, np.float32)
        aligned[:] = frames
        on_host = (aligned, mask, radius)
        ours = {
            "ours single": lambda c=cfg, b=bn, a=a: [pf.find_peaks(f, a[1], a[2], c, b) for f in a[0]],
            "ours batched": lambda c=cfg, b=bn, h=on_host: pf.find_peaks_batch(*h, c, b),
            "ours fast batched": lambda c=fast, b=bn_fast, h=on_host: pf.find_peaks_batch(*h, c, b),
        }
        best = dict.fromkeys([*ours, "OM normal", "OM fast", "OM fast 2 proc"], 0.0)
        om_out = os.path.join(tmp, "om.npz")
        for _ in range(args.rounds):
            for label, fn in ours.items():
                best[label] = max(best[label], len(frames) / timeit(fn, 1))
            for procs, modes in ((1, "normal,fast"), (2, "fast")):
                out = om_out if procs == 1 else os.path.join(tmp, "om2.npz")
                cmd = [args.om_python, os.path.join(ROOT, "benchmarks", "om_reference.py"), inp, "--out", out]
                cmd += [f"--modes={modes}", f"--processes={procs}", "--repeats=2", *om_args]
                res = json.loads(
                    subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
                )
                for mode in modes.split(","):
                    key = {"normal": "OM normal", "fast": "OM fast"}[mode] + (" 2 proc" if procs == 2 else "")
                    best[key] = max(best[key], res[mode]["frames_per_s"])
        z = dict(np.load(om_out))
        ref = {k[len("normal_") :]: v for k, v in z.items() if k.startswith("normal_")}
        results = {
            "ours": pf.find_peaks_batch(fr_d, mask_d, r_d, cfg, bn),
            "ours fast": pf.find_peaks_batch(fr_d, mask_d, r_d, fast, bn_fast),
            "OM fast": om_as_peaklist(z, "fast", len(frames)),
        }
        recall = {k: match_peaks(v, ref) for k, v in results.items()}
        rows.append((name, len(frames), best, recall))
    print_comparison(rows)


OM_PARAMS = ("adc_threshold", "minimum_snr", "min_pixel_count", "max_pixel_count", "local_bg_radius", "min_res")
OM_PARAMS += ("max_res", "max_num_peaks")


def print_comparison(rows):
    for name, n, best, recall in rows:
        print(f"\n{name}: {n} frames (16×512×128); frames/s = best of the rounds")
        ref = best["OM fast"]
        for label, fps in best.items():
            ratios = f"{fps / ref:5.2f} × OM fast   {fps / best['OM normal']:5.2f} × OM normal"
            print(f"  {label:22s} {fps:8.1f} frames/s   {ratios}")
        for label, (n_om, n_hit, n_extra) in recall.items():
            frac = n_hit / max(n_om, 1)
            print(f"  recall of OM normal's {n_om} peaks by {label:10s}: {n_hit} ({frac:.2%}), extra peaks {n_extra}")


def time_parts(frame, cfg, bn, repeats):
    """Stages of the fast path (private functions of data_pipeline.peakfinder; they may change). Every input
    is a jit argument, not a closure constant (XLA would fold a constant stage away)."""
    sizes = pf._paths(cfg)
    front = jax.jit(lambda x, bb: pf._front(x, None, None, cfg, bb))
    d, g, b, stats, v = front(frame, bn)
    rows, to_flat = pf._candidate_rows(d, g, b, stats, v, bn)
    row_count = jnp.sum(rows, axis=1, dtype=jnp.int32)
    cum = jnp.cumsum(row_count)
    n_cand = int(cum[-1])
    m = next((z for z in sizes if z >= n_cand), sizes[-1])
    ci = to_flat(pf._compact(rows, m, row_count, cum))
    comps = jax.jit(lambda *a: pf._components_compact(*a, cfg, m))(d, ci, b, stats.offset)

    def stats_only(x, bb):
        return pf._radial_statistics_binned(pf._sorted_values(x.reshape(-1), bb), bb, cfg)

    def candidates(dd, gg, bb_, st, vv, bb):
        rr, tf = pf._candidate_rows(dd, gg, bb_, st, vv, bb)
        rc = jnp.sum(rr, axis=1, dtype=jnp.int32)
        cu = jnp.cumsum(rc)
        return tf(pf._compact(rr, m, rc, cu))

    parts = [
        ("radial statistics (5 passes)", stats_only, (frame, bn)),
        ("  of which: gather into sorted layout", lambda x, bb: pf._sorted_values(x.reshape(-1), bb), (frame, bn)),
        ("front: gather + statistics", lambda x, bb: pf._front(x, None, None, cfg, bb), (frame, bn)),
        (f"candidate map + compact indices ({m})", candidates, (d, g, b, stats, v, bn)),
        ("components (compact)", lambda *a: pf._components_compact(*a, cfg, m), (d, ci, b, stats.offset)),
        ("local background + acceptance + sort", lambda *a: pf._measure(*a, cfg), (d, g, b, stats, comps)),
        ("whole find_peaks", lambda x: pf.find_peaks(x, None, None, cfg, binning=bn), (frame,)),
    ]
    print(f"  ({n_cand} candidate pixels, {int(comps[0])} components)")
    out = []
    for label, fn, a in parts:
        f = jax.jit(fn) if label != "whole find_peaks" else fn
        out.append((label, timeit(lambda f=f, a=a: f(*a), repeats)))
    return out


if __name__ == "__main__":
    main()
