"""Pumped-ensemble ΔI over crystal sizes and hole samples: exact vs linear, time and peak memory.

    ΔI = P1 ⟨|F[u]|² − I0⟩ + P2 ⟨|F[2u]|² − I0⟩            exact: 3 structure factors per hole sample
    ΔI ≈ (P1 + 2 P2) · 2 Re(F0* dF[⟨u⟩])                    linear: F0 and one JVP along the mean field

`jaxpolaron.ensemble.pumped_difference` with the paper's random hole model (`RandomHole.for_crystal(crystal,
hole_bias=0.1)`, k = 1) and the SI S2 occupancy, one call per crystal size (3, 4, …, 15 nm) with H = 256 hole
samples on 8 hkl windows of 33³ (0.0025 Å⁻¹ voxels; 200 020 002 110 1-10 111 400 220), engine "auto" (the
exact separable engine on windows). The Gamma size weights are a 13-term sum and are not timed.

The same-run baseline is one `structure_factor` of the same crystal on the same windows (row "sf"); the
methods are reported in units of it ("× sf"), so the ratios compare between runs on noisy shared machines
while the seconds do not. The load of a shared machine drifts within a run too (2× within minutes), so
each method's unit is an sf timed around its own run: linear, the sf row and one sf call after it; exact,
one sf call before and one after.

What is measured and what is extrapolated (the tables say which):
  sf      every size, the whole problem.
  linear  every size, the whole problem (all H holes: the hole average only costs H displacement fields).
  accurate every size (--nodes quadrature nodes; 0 skips it): the accurate random-hole ΔI, beside linear.
  exact   on a few sizes (--exact-sizes) with h ≪ H holes (--exact-holes), extrapolated linearly in holes:
          t(H) = t_sf + (t(h) − t_sf) · H / h (the dark F0 is the fixed cost, each hole costs the same),
          marked *. Sizes not measured are estimated from their own sf time and the per-hole cost in sf
          units k of the largest measured size, t ≈ t_sf (1 + k H), marked **.
  batch   the exact path at one size (--batch-size-nm) with batch = 2, 8, 32 (the vmapped hole samples per
          scan step, which bound memory) on max(batch, exact-holes) holes: time per hole and peak memory.
  parts   at the same size, in 5 interleaved rounds (median): one sf, one forward-mode JVP of it (F0 and
          dF), the linear pumped_difference again, and one hole's three structure factors through one vmap
          (the exact path's kernel) and through lax.map (one after the other), to see where the time goes.

Timing: each function is lowered and compiled ahead of time (column "compile": trace + lower + XLA
compile), then called until ≥ 3 calls or ≥ 1 s have run (one call for slow ones), each ended with
`block_until_ready`; "s" is the median call. Memory: the peak host RSS above the RSS at the start of the
calls (the kernel's VmHWM, reset through /proc/self/clear_refs before each measurement, after glibc's
malloc_trim has handed freed heap back; where the reset is not allowed, the growth of getrusage's
ru_maxrss, which only sees new highs). XLA's CPU buffers live in the process heap, so RSS is the right
measure on CPU (tracemalloc does not see them); on a GPU the device's peak_bytes_in_use is reported as
well (a lifetime high-water mark: only growth shows). "XLA temp" is the compiled program's temporary
buffers from XLA's buffer assignment (`memory_analysis()`): deterministic and available on every backend,
but blind to what the runtime allocates outside it.

Usage:
  python benchmarks/bench_ensemble.py [--quick] [--x64] [--json FILE]
      [--sizes 3,5,8] [--holes 256] [--exact-sizes 3,5,8|all] [--exact-holes 8] [--batch-size-nm 5] [--batches 2,8,32]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HKLS = [(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, -1, 0), (1, 1, 1), (4, 0, 0), (2, 2, 0)]
MIN_CALLS = 3
MIN_SECONDS = 1.0  # keep calling (up to MIN_CALLS) until the calls add up to this
SLOW_CALL = 5.0  # a first call longer than this is the only call
DEFAULT_BATCH = 8  # pumped_difference's default
MB = 1 << 20
PART_ROUNDS = 5  # interleaved rounds of the "parts" calls


# ------------------------------------------------------------------------------------------ provenance
def provenance(jax) -> dict:
    """bench_structure_factor's provenance plus the git state of the package and the memory method."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_structure_factor import provenance as base

    prov = base(jax)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: no index refresh
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, env=env)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "jaxpolaron"], cwd=root, capture_output=True, text=True, env=env
        )
        prov["git_head"] = head.stdout.strip()
        prov["git_dirty_jaxpolaron"] = [line[3:] for line in dirty.stdout.splitlines()]
    except OSError:
        prov["git_head"] = "unknown"
    prov["memory_method"] = "VmHWM reset via clear_refs" if _can_reset_hwm() else "ru_maxrss growth"
    return prov


# ---------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim), so the RSS before a measurement is not inflated
    by what an earlier, larger configuration left in the allocator's free lists."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _device_peak(jax) -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend has memory stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


class PeakMemory:
    """Peak host RSS (bytes above the RSS at entry) and device peak growth of a block."""

    def __init__(self, jax):
        self.jax = jax
        self.host: int | None = None
        self.device: int | None = None

    def __enter__(self):
        _trim_heap()
        self._reset = _can_reset_hwm()
        self._rss0 = _status_kb("VmRSS")
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self._dev0 = _device_peak(self.jax)
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        if self._reset and hwm is not None and self._rss0 is not None:
            self.host = max(0, hwm - self._rss0) * 1024
        else:
            self.host = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0) * 1024
        dev = _device_peak(self.jax)
        if dev is not None and self._dev0 is not None:
            self.device = dev - self._dev0
        return False


# ---------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    compile_s: float  # trace + lower + compile
    median_s: float  # median call
    calls: list[float]
    peak_rss: int | None  # bytes above the RSS before the calls
    peak_device: int | None  # growth of the device's peak bytes in use (GPU)
    xla_temp: int | None  # XLA's buffer assignment: temporaries of the compiled program, bytes


def compile_aot(jitted, *args, **kwargs):
    """Lower and compile `jitted` for these arguments: (compiled, seconds, XLA temp bytes or None)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    try:
        xla_temp = int(compiled.compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # no memory analysis on this backend / jax version
        xla_temp = None
    return compiled, compile_s, xla_temp


def call_s(jax, compiled, *args, **kwargs) -> float:
    """Seconds of one call, ended with block_until_ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args, **kwargs))
    return time.perf_counter() - t0


def time_aot(jax, jitted, *args, min_calls: int = MIN_CALLS, **kwargs) -> Timing:
    """Compile `jitted` ahead of time for these arguments, then time calls of the compiled function."""
    compiled, compile_s, xla_temp = compile_aot(jitted, *args, **kwargs)
    calls: list[float] = []
    with PeakMemory(jax) as mem:
        while True:
            calls.append(call_s(jax, compiled, *args, **kwargs))
            if calls[0] > SLOW_CALL or (len(calls) >= min_calls and sum(calls) >= MIN_SECONDS) or len(calls) >= 10:
                break
    del compiled
    return Timing(compile_s, statistics.median(calls), calls, mem.host, mem.device, xla_temp)


# ------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class Row:
    """One timed (or extrapolated) configuration; seconds refer to the whole problem (H holes)."""

    kind: str  # "sf", "linear", "exact", "batch", "part:<name>"
    size_nm: float
    atoms: int
    q_points: int
    compile_s: float | None  # trace + lower + compile of what was run
    seconds: float  # whole problem (extrapolated when mark is "*", estimated when "**")
    sf_units: float  # seconds / the same size's sf seconds
    rate: float  # exact-equivalent atom·q/s: atoms · q · (1 + 3 H) / seconds (sf, parts: atoms · q / seconds)
    peak_rss_mb: float | None  # host peak RSS above the RSS before the calls
    peak_device_mb: float | None  # growth of the device's peak bytes in use (GPU)
    xla_temp_mb: float | None  # temporaries of the compiled program (XLA buffer assignment)
    calls: list[float]  # the timed calls of what was run, s
    holes: int = 0  # hole samples H of the whole problem (0: sf and parts)
    measured_holes: int | None = None  # hole samples actually run
    batch: int | None = None
    mark: str = ""  # "*" extrapolated in holes, "**" estimated from the sf time
    per_hole_s: float | None = None  # exact: seconds per hole sample
    per_hole_sf: float | None = None  # exact: sf per hole sample
    sf_ref_s: float | None = None  # the sf time that `sf_units` divides by (timed around this row's run)
    note: str = ""


def _mb(b: int | None) -> float | None:
    return None if b is None else b / MB


# ---------------------------------------------------------------------------------------------- output
def _fmt(x, spec=".3g", none="-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(head: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    return "\n".join(out + [fmt.format(*x) for x in lines])


def by_kind(rows: list[Row], kind: str, size: float) -> Row:
    return next(r for r in rows if r.kind == kind and r.size_nm == size)


def accurate_table(rows: list[Row]) -> str:
    """Per size: the accurate method's compile, seconds and × sf beside linear's; the total weights each × sf by
    the size's sf seconds (as size_tables does), so the ratio compares the two methods within this run."""
    lines, acc_total, lin_total = [], 0.0, 0.0
    for r in (r for r in rows if r.kind == "accurate"):
        sf, lin = by_kind(rows, "sf", r.size_nm), by_kind(rows, "linear", r.size_nm)
        acc_total += r.sf_units * sf.seconds
        lin_total += lin.sf_units * sf.seconds
        lines.append(
            [
                f"{r.size_nm:g}",
                str(r.atoms),
                _fmt(r.compile_s, ".2f"),
                _fmt(r.seconds),
                _fmt(r.sf_units, ".2f"),
                _fmt(lin.sf_units, ".2f"),
                _fmt(r.sf_units / lin.sf_units, ".2f"),
            ]
        )
    lines.append(["total", "", "", "", "", "", _fmt(acc_total / lin_total, ".2f") if lin_total else "-"])
    head = ["size nm", "atoms", "accurate compile", "accurate s", "accurate × sf", "linear × sf", "acc / lin"]
    return _table(head, lines)


def size_tables(rows: list[Row], holes: int) -> str:
    by = {(r.kind, r.size_nm): r for r in rows}
    sizes = sorted({r.size_nm for r in rows if r.kind == "sf"})
    time_lines, rate_lines = [], []
    # ln, en: the methods' times in units of sf, times the sf row's seconds (drift between runs cancels)
    tot = {"sfc": 0.0, "sf": 0.0, "lc": 0.0, "l": 0.0, "ln": 0.0, "ec": 0.0, "e": 0.0, "en": 0.0}
    any_star = any_est = False
    for s in sizes:
        sf, lin, ex = by[("sf", s)], by.get(("linear", s)), by.get(("exact", s))
        tot["sfc"] += sf.compile_s or 0.0
        tot["sf"] += sf.seconds
        if lin:
            tot["lc"] += lin.compile_s or 0.0
            tot["l"] += lin.seconds
            tot["ln"] += lin.sf_units * sf.seconds
        if ex:
            tot["ec"] += ex.compile_s or 0.0
            tot["e"] += ex.seconds
            tot["en"] += ex.sf_units * sf.seconds
            any_star |= ex.mark == "*"
            any_est |= ex.mark == "**"
        time_lines.append(
            [
                f"{s:g}",
                str(sf.atoms),
                _fmt(sf.compile_s, ".2f"),
                _fmt(sf.seconds),
                _fmt(lin.compile_s, ".2f") if lin else "-",
                _fmt(lin.seconds) if lin else "-",
                _fmt(lin.sf_units, ".2f") if lin else "-",
                (str(ex.measured_holes) if ex.measured_holes else "-") if ex else "-",
                _fmt(ex.compile_s, ".2f") if ex else "-",
                f"{_fmt(ex.seconds)}{ex.mark}" if ex else "-",
                f"{_fmt(ex.sf_units, '.0f')}{ex.mark}" if ex else "-",
                f"{_fmt(ex.sf_units / lin.sf_units, '.0f')}{ex.mark}" if ex and lin else "-",
            ]
        )
        rate_lines.append(
            [
                f"{s:g}",
                str(sf.atoms),
                _fmt(sf.rate),
                _fmt(lin.rate) if lin else "-",
                f"{_fmt(ex.rate)}{ex.mark}" if ex else "-",
                _fmt(sf.peak_rss_mb, ".0f"),
                _fmt(lin.peak_rss_mb, ".0f") if lin else "-",
                _fmt(ex.peak_rss_mb, ".0f") if ex else "-",
                _fmt(sf.xla_temp_mb, ".0f"),
                _fmt(lin.xla_temp_mb, ".0f") if lin else "-",
                _fmt(ex.xla_temp_mb, ".0f") if ex else "-",
            ]
            + (
                [
                    _fmt(sf.peak_device_mb, ".0f"),
                    _fmt(lin.peak_device_mb, ".0f") if lin else "-",
                    _fmt(ex.peak_device_mb, ".0f") if ex else "-",
                ]
                if any(r.peak_device_mb is not None for r in rows)
                else []
            )
        )
    emark = "**" if any_est else ("*" if any_star else "")
    time_lines.append(
        [
            "total",
            "",
            _fmt(tot["sfc"], ".1f"),
            _fmt(tot["sf"]),
            _fmt(tot["lc"], ".1f"),
            _fmt(tot["l"]),
            _fmt(tot["ln"] / tot["sf"], ".2f"),
            "",
            _fmt(tot["ec"], ".1f") + ("(part)" if any_est else ""),
            f"{_fmt(tot['e'])}{emark}",
            f"{_fmt(tot['en'] / tot['sf'], '.0f')}{emark}",
            f"{_fmt(tot['en'] / tot['ln'], '.0f')}{emark}" if tot["ln"] else "-",
        ]
    )
    t1 = _table(
        [
            "size nm",
            "atoms",
            "sf compile",
            "sf s",
            "linear compile",
            "linear s",
            "linear × sf",
            "exact holes run",
            "exact compile",
            f"exact s ({holes} holes)",
            "exact × sf",
            "exact / linear",
        ],
        time_lines,
    )
    rate_head = [
        "size nm",
        "atoms",
        "sf atom·q/s",
        "linear atom·q/s-eq",
        "exact atom·q/s-eq",
        "sf peak ΔRSS MB",
        "linear peak ΔRSS MB",
        "exact peak ΔRSS MB",
        "sf XLA temp MB",
        "linear XLA temp MB",
        "exact XLA temp MB",
    ]
    if any(r.peak_device_mb is not None for r in rows):
        rate_head += ["sf dev MB", "linear dev MB", "exact dev MB"]
    t2 = _table(rate_head, rate_lines)
    return t1 + "\n\n" + t2


def batch_table(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        lines.append(
            [
                f"{r.size_nm:g}",
                str(r.batch),
                str(r.measured_holes),
                _fmt(r.compile_s, ".2f"),
                _fmt(statistics.median(r.calls)),
                _fmt(r.per_hole_s),
                _fmt(r.per_hole_sf, ".2f"),
                f"{_fmt(r.seconds)}{r.mark}",
                _fmt(r.peak_rss_mb, ".0f"),
                _fmt(r.xla_temp_mb, ".0f"),
                _fmt(r.peak_device_mb, ".0f"),
            ]
        )
    return _table(
        [
            "size nm",
            "batch",
            "holes run",
            "compile s",
            "run s",
            "s / hole",
            "sf / hole",
            f"{rows[0].holes} holes s" if rows else "H holes s",
            "peak ΔRSS MB",
            "XLA temp MB",
            "dev MB",
        ],
        lines,
    )


# ------------------------------------------------------------------------------------------- benchmark
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3, 5, 8 nm; 16 holes; 2 windows")
    parser.add_argument("--x64", action="store_true", help="run everything in float64")
    parser.add_argument("--json", metavar="FILE", help="write provenance and rows as JSON")
    parser.add_argument("--sizes", help="comma-separated sizes, nm (default 3..15; --quick 3,5,8)")
    parser.add_argument("--holes", type=int, help="hole samples H of the whole problem (default 256; --quick 16)")
    parser.add_argument(
        "--exact-sizes", help="sizes on which the exact path is run (default 3,5,8; 'all' = every size)"
    )
    parser.add_argument("--exact-holes", type=int, help="holes run by the exact path (default 8; --quick = H)")
    parser.add_argument("--batch-size-nm", type=float, default=5.0, help="size of the batch study (default 5)")
    parser.add_argument("--batches", default="2,8,32", help="batch values of the batch study (default 2,8,32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nodes", type=int, default=4096, help="quadrature nodes of the accurate method (4096; 0: skip it)"
    )
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)

    import equinox as eqx
    import jax.numpy as jnp

    from jaxpolaron.crystal import cut_nanocrystal
    from jaxpolaron.deformation.base import displaced
    from jaxpolaron.deformation.charge_field import RandomHole
    from jaxpolaron.ensemble import pumped_difference
    from jaxpolaron.excitation import Occupancy
    from jaxpolaron.reciprocal import hkl_windows
    from jaxpolaron.scattering import scattering_factors
    from jaxpolaron.structure import read_cif
    from jaxpolaron.structure_factor import Engine, choose_engine, intensity, structure_factor

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    prov = provenance(jax)
    log(
        f"# jax {prov['jax']} (jaxlib {prov['jaxlib']}, numpy {prov['numpy']}) backend={prov['backend']} "
        f"cpus={prov['cpu_count']} (affinity {prov['cpu_affinity']}) "
        f"load={[round(x, 2) for x in prov['load_average_1_5_15']]} x64={prov['x64']} python {prov['python']} "
        f"{prov['date']}\n# git {prov.get('git_head', '')[:12]} "
        f"dirty jaxpolaron/: {prov.get('git_dirty_jaxpolaron') or 'none'}; memory: {prov['memory_method']}"
    )
    log(f"jax.devices(): {jax.devices()}")

    sizes = (
        [float(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([3.0, 5.0, 8.0] if args.quick else [float(s) for s in range(3, 16)])
    )
    holes = args.holes or (16 if args.quick else 256)
    if args.exact_sizes == "all" or (args.quick and not args.exact_sizes):
        exact_sizes = list(sizes)
    else:
        exact_sizes = [float(s) for s in (args.exact_sizes or "3,5,8").split(",")]
    exact_holes = args.exact_holes or (holes if args.quick else 8)
    batches = [int(b) for b in args.batches.split(",")]
    n_dev = len(jax.devices())
    for n in [holes, exact_holes, *[max(b, exact_holes) for b in batches]]:
        if n % n_dev:
            parser.error(f"hole counts must be multiples of the {n_dev} devices, got {n}")

    structure = read_cif()
    hkls = HKLS[:2] if args.quick else HKLS
    windows = hkl_windows(structure, hkls, shape=33, voxel=0.0025)
    n_q = len(hkls) * 33**3
    engine: Engine = "auto"
    resolved = choose_engine(windows, engine)
    occupancy = Occupancy()
    key0 = jax.random.key(args.seed)
    log(
        f"sizes {sizes} nm, H = {holes} holes, {len(hkls)} windows of 33³ ({n_q} q points), engine {engine} -> "
        f"{resolved}; exact on {exact_sizes} nm with {exact_holes} holes (batch {DEFAULT_BATCH}), batch study at "
        f"{args.batch_size_nm:g} nm with batch {batches}"
    )

    rows: list[Row] = []
    batch_rows: list[Row] = []
    part_rows: list[Row] = []
    sf_time: dict[float, float] = {}
    setups: dict[float, tuple] = {}

    def setup(size: float):
        if size not in setups:
            crystal = cut_nanocrystal(structure, size)
            sf = scattering_factors(
                crystal.species_names, charges=dict(zip(crystal.species_names, crystal.oxidation, strict=True))
            )
            model = RandomHole.for_crystal(crystal, hole_bias=0.1)
            setups[size] = (crystal, sf, model, int(crystal.positions.shape[0]))
        return setups[size]

    def make_row(kind: str, size: float, seconds: float, t: Timing | None = None, **fields) -> Row:
        """A row of `size`; `seconds` is the whole problem's. rate: atoms · q · (1 + 3H) / s (sf: atoms · q / s).

        `sf_units` divides by fields["sf_ref_s"] (an sf timed around the run), else by the size's sf row."""
        n_atoms = setup(size)[3]
        sf_ref = fields.setdefault("sf_ref_s", sf_time[size])
        n_sf = 1 if kind == "sf" or kind.startswith("part:") else 1 + 3 * fields.get("holes", holes)
        fields.setdefault("holes", 0 if n_sf == 1 else holes)
        return Row(
            kind=kind,
            size_nm=size,
            atoms=n_atoms,
            q_points=n_q,
            compile_s=None if t is None else t.compile_s,
            seconds=seconds,
            sf_units=seconds / sf_ref,
            rate=n_atoms * n_q * n_sf / seconds,
            peak_rss_mb=None if t is None else _mb(t.peak_rss),
            peak_device_mb=None if t is None else _mb(t.peak_device),
            xla_temp_mb=None if t is None else _mb(t.xla_temp),
            calls=[] if t is None else t.calls,
            **fields,
        )

    def exact_row(size: float, t: Timing, measured: int, batch: int, kind: str, t_sf: float) -> Row:
        """An exact-path row extrapolated from `measured` holes to H, linearly in holes (the dark F0, one sf
        timed around the run, is the fixed cost)."""
        per_hole = (t.median_s - t_sf) / measured
        return make_row(
            kind,
            size,
            t_sf + per_hole * holes,
            t,
            measured_holes=measured,
            batch=batch,
            mark="*" if measured != holes else "",
            per_hole_s=per_hole,
            per_hole_sf=per_hole / t_sf,
            sf_ref_s=t_sf,
        )

    def size_key(size: float):
        return jax.random.fold_in(key0, round(size * 10))

    def run_sf(size: float) -> Timing:
        crystal, sf, _, _ = setup(size)
        t = time_aot(jax, structure_factor, crystal, sf, windows, engine)
        sf_time[size] = t.median_s
        return t

    def sf_again(size: float) -> float:
        """One more sf call (cached executable): brackets a method's run, since the load drifts."""
        crystal, sf, _, _ = setup(size)
        return time_aot(jax, structure_factor, crystal, sf, windows, engine, min_calls=1).median_s

    def run_pumped(size: float, method: str, n: int, batch: int = DEFAULT_BATCH) -> Timing:
        crystal, sf, model, _ = setup(size)
        kwargs = {"key": size_key(size), "n_holes": n, "method": method, "engine": engine, "batch": batch}
        if method == "accurate":
            kwargs["nodes"] = args.nodes
        return time_aot(jax, pumped_difference, crystal, sf, windows, model, occupancy, **kwargs)

    def peak(r: Row) -> str:
        return f"peak ΔRSS {_fmt(r.peak_rss_mb, '.0f')} MB, XLA temp {_fmt(r.xla_temp_mb, '.0f')} MB" + (
            f", device +{r.peak_device_mb:.0f} MB" if r.peak_device_mb is not None else ""
        )

    # ---- sf and linear on every size, exact on the chosen ones (at the batch-study size: from the study)
    exact_timings: dict[float, tuple[Timing, int, float]] = {}
    for size in sizes:
        n_atoms = setup(size)[3]
        t = run_sf(size)
        r = make_row("sf", size, t.median_s, t)
        rows.append(r)
        log(
            f"{size:4g} nm {n_atoms:6d} atoms  sf      compile {t.compile_s:6.2f} s  run {t.median_s:8.3f} s "
            f"({len(t.calls)} calls)  {r.rate:.3g} atom·q/s  {peak(r)}"
        )
        t = run_pumped(size, "linear", holes)
        t_after = sf_again(size)
        kw = {"holes": holes, "measured_holes": holes, "batch": DEFAULT_BATCH}
        r = make_row("linear", size, t.median_s, t, sf_ref_s=0.5 * (sf_time[size] + t_after), **kw)
        rows.append(r)
        log(
            f"{size:4g} nm {n_atoms:6d} atoms  linear  compile {t.compile_s:6.2f} s  run {t.median_s:8.3f} s "
            f"= {r.sf_units:.2f} sf ({holes} holes)  {peak(r)}"
        )
        if args.nodes:
            t = run_pumped(size, "accurate", holes)
            t_sf = 0.5 * (t_after + sf_again(size))
            r = make_row("accurate", size, t.median_s, t, sf_ref_s=t_sf, holes=0, measured_holes=0)
            rows.append(r)
            log(
                f"{size:4g} nm {n_atoms:6d} atoms  accurate compile {t.compile_s:6.2f} s  run {t.median_s:8.3f} s "
                f"= {r.sf_units:.2f} sf ({args.nodes} nodes) = "
                f"{r.sf_units / by_kind(rows, 'linear', size).sf_units:.2f} × linear  {peak(r)}"
            )
        if size in exact_sizes and not (size == args.batch_size_nm and DEFAULT_BATCH in batches):
            t = run_pumped(size, "exact", exact_holes)
            t_sf = 0.5 * (t_after + sf_again(size))
            exact_timings[size] = (t, exact_holes, t_sf)
            r = exact_row(size, t, exact_holes, DEFAULT_BATCH, "exact", t_sf)
            rows.append(r)
            log(
                f"{size:4g} nm {n_atoms:6d} atoms  exact   compile {t.compile_s:6.2f} s  run {t.median_s:8.3f} s "
                f"({exact_holes} holes) -> {holes} holes {r.seconds:.3g} s{r.mark} = {r.sf_units:.0f} sf  {peak(r)}"
            )

    # ---- batch study (its default-batch run is also the exact measurement of that size)
    bsize = args.batch_size_nm
    if bsize not in sf_time:
        run_sf(bsize)
    for b in batches:
        n = max(b, exact_holes)
        n += (-n) % n_dev
        before = sf_again(bsize)
        t = run_pumped(bsize, "exact", n, b)
        t_sf = 0.5 * (before + sf_again(bsize))
        r = exact_row(bsize, t, n, b, "batch", t_sf)
        batch_rows.append(r)
        log(
            f"batch {b:3d} at {bsize:g} nm: compile {t.compile_s:6.2f} s  run {t.median_s:8.3f} s ({n} holes)  "
            f"{r.per_hole_sf:.2f} sf/hole  {peak(r)}"
        )
        if b == DEFAULT_BATCH and bsize in exact_sizes and bsize in sizes:
            exact_timings[bsize] = (t, n, t_sf)
            rows.append(dataclasses.replace(r, kind="exact"))

    # ---- estimates (**) for sizes without an exact run: per-hole cost in sf units of the largest measured size
    if exact_timings:
        ref = max(exact_timings)
        t_ref, n_ref, sf_ref = exact_timings[ref]
        k = (t_ref.median_s - sf_ref) / n_ref / sf_ref
        for size in sizes:
            if size not in exact_timings:
                whole = sf_time[size] * (1 + k * holes)
                note = f"estimated from {ref:g} nm"
                rows.append(make_row("exact", size, whole, batch=DEFAULT_BATCH, mark="**", per_hole_sf=k, note=note))

    # ---- parts: where the time goes, at the batch-study size
    crystal, sf, model, n_atoms = setup(bsize)
    u = model.displacement(crystal, key=jax.random.key(1)) * crystal.mask[:, None]

    @eqx.filter_jit
    def sf_jvp(c, s, q, v):
        f = lambda p: structure_factor(eqx.tree_at(lambda x: x.positions, c, p), s, q, engine)  # noqa: E731
        return jax.jvp(f, (c.positions,), (v,))

    @eqx.filter_jit
    def three_sf_vmap(c, s, q, v):  # the exact path's kernel for one hole
        scaled = jnp.stack([jnp.zeros_like(v), v, 2.0 * v])
        return jax.vmap(lambda w: intensity(displaced(c, w), s, q, engine))(scaled)

    @eqx.filter_jit
    def three_sf_map(c, s, q, v):  # the same, one structure factor after the other
        scaled = jnp.stack([jnp.zeros_like(v), v, 2.0 * v])
        return jax.lax.map(lambda w: intensity(displaced(c, w), s, q, engine), scaled)

    lin_kwargs = {"key": size_key(bsize), "n_holes": holes, "method": "linear", "engine": engine}
    parts: list[tuple[str, Callable, tuple, dict]] = [
        ("sf", structure_factor, (crystal, sf, windows, engine), {}),
        ("jvp: F0 and dF[u]", sf_jvp, (crystal, sf, windows, u), {}),
        (
            f"linear pumped_difference ({holes} holes)",
            pumped_difference,
            (crystal, sf, windows, model, occupancy),
            lin_kwargs,
        ),
        ("3 sf through vmap (one exact hole)", three_sf_vmap, (crystal, sf, windows, u), {}),
        ("3 sf through lax.map", three_sf_map, (crystal, sf, windows, u), {}),
    ]
    # compiled first, then called in PART_ROUNDS interleaved rounds (median), so that load drift hits all alike
    compiled_parts = [compile_aot(fn, *a, **kw) for _, fn, a, kw in parts]
    part_calls: list[list[float]] = [[] for _ in parts]
    part_mem: list[PeakMemory] = []
    for rnd in range(PART_ROUNDS):
        for i, ((_, _, a, kw), (compiled, _, _)) in enumerate(zip(parts, compiled_parts, strict=True)):
            if rnd == 0:  # the first round also measures memory
                with PeakMemory(jax) as mem:
                    part_calls[i].append(call_s(jax, compiled, *a, **kw))
                part_mem.append(mem)
            else:
                part_calls[i].append(call_s(jax, compiled, *a, **kw))
    for (name, *_), (_, compile_s, xla_temp), calls, mem in zip(
        parts, compiled_parts, part_calls, part_mem, strict=True
    ):
        t = Timing(compile_s, statistics.median(calls), calls, mem.host, mem.device, xla_temp)
        r = make_row(f"part:{name}", bsize, t.median_s, t)
        r.sf_units = t.median_s / part_rows[0].seconds if part_rows else 1.0  # relative to the parts' own sf
        part_rows.append(r)
        log(f"part {name:36s} compile {t.compile_s:6.2f} s  median {t.median_s:8.3f} s = {r.sf_units:.2f} sf")
    del compiled_parts

    # ---- output
    log("\n" + size_tables(rows, holes))
    if args.nodes:
        log(f"\naccurate method ({args.nodes} quadrature nodes) vs linear, same run:\n" + accurate_table(rows))
    log(
        f"* exact extrapolated linearly in holes from the 'exact holes run' h to {holes}: "
        f"t = t_sf + (t_run − t_sf)·{holes}/h. "
        "** estimated: this size's sf time × (1 + k·H), k = sf per hole of the largest measured size.\n"
        "× sf: seconds / one structure factor of the same crystal on the same windows, timed around the run "
        "(linear: the sf row and one call after; exact: one call before and after). exact / linear: the ratio of "
        "the two × sf columns, so load drift between the runs cancels; in the total row both are weighted by the "
        "sizes' sf seconds.\natom·q/s-eq: "
        f"atoms · q · (1 + 3·{holes}) / seconds, the work of the exact path (sf: atoms · q / seconds).\n"
        "peak ΔRSS: host peak RSS above the RSS before the calls (exact: of the run with the measured holes; "
        "memory scales with batch, not holes). XLA temp: the compiled program's temporaries (buffer assignment; "
        "deterministic, unlike RSS). compile: trace + lower + XLA compile."
    )
    if batch_rows:
        log("\nexact path vs batch (vmapped hole samples per scan step):\n" + batch_table(batch_rows))
    if part_rows:
        lines = [
            [
                r.kind[5:],
                f"{r.size_nm:g}",
                _fmt(r.compile_s, ".2f"),
                _fmt(r.seconds),
                _fmt(r.sf_units, ".2f"),
                _fmt(r.peak_rss_mb, ".0f"),
                _fmt(r.xla_temp_mb, ".0f"),
            ]
            for r in part_rows
        ]
        log(
            f"\nwhere the time goes (median of {PART_ROUNDS} interleaved rounds; × sf relative to this table's sf; "
            "compile ~0: the executable was cached from an identical earlier call):\n"
            + _table(["part", "size nm", "compile s", "s", "× sf", "peak ΔRSS MB", "XLA temp MB"], lines)
        )

    total = time.perf_counter() - t_all
    log(f"\nbenchmark wall time: {total:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "provenance": prov,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "config": {
                        "sizes_nm": sizes,
                        "holes": holes,
                        "hkls": hkls,
                        "window_shape": 33,
                        "voxel": 0.0025,
                        "engine": engine,
                        "resolved_engine": resolved,
                        "exact_sizes_nm": exact_sizes,
                        "exact_holes": exact_holes,
                        "batch_size_nm": bsize,
                        "batches": batches,
                        "accurate_nodes": args.nodes,
                    },
                    "wall_seconds": total,
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "batch_rows": [dataclasses.asdict(r) for r in batch_rows],
                    "part_rows": [dataclasses.asdict(r) for r in part_rows],
                },
                fh,
                indent=2,
            )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
