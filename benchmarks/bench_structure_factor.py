"""Throughput of the structure-factor engines against a plain numpy direct sum measured in the same run.

    F(q) = Σ_j f_j(|q|) exp(2πi q·r_j)        q in Å⁻¹ (|q| = 1/d), r in Å

Every engine of `jaxpolaron.structure_factor.structure_factor` ("direct", "separable", "nufft") is timed in
atom·q per second (atoms × q points / seconds) and reported as a ratio to a plain numpy direct sum run in
the same process, on the same machine, minutes apart: shared machines are noisy, so only the ratios mean
much from one run to the next. Accuracy is max |F − F_ref| / max |F_ref| over a random subset of q
points, F_ref a float64 numpy direct sum.

Cases:
  A  5 nm crystal on 8 hkl windows of 33³ (0.0025 Å⁻¹ voxels)     --quick: 4 windows
  B  15 nm crystal on a full 256³ grid reaching ±0.75 Å⁻¹          --quick: 5 nm on 128³

What is measured on the whole problem and what is extrapolated (the table says which):
  numpy      a random q subset, chunked (≤ 2^22 atom·q per chunk), ≥ 1 s; extrapolated linearly in q.
  direct     the same q subset as a q list; extrapolated linearly in q.
  separable  the whole problem when it is small (≤ 1.5e10 atom·q); otherwise the whole grid with two
             evenly spread atom subsets (~1/k of each species, and 64 per species), extrapolated to all
             atoms along the line through the two times (the f(|q|) combination on the grid is a fixed
             cost, the sum is linear in atoms). A 256×256×16 slab is shown too (same subsets, scaled by
             its share of the grid): its throughput is NOT representative, because the engine's atom
             chunk shrinks with nx·ny.
  nufft      the whole problem.

Jitted engines: one warm-up call (compile + first run, reported separately), then the median of ≥ 3 timed
calls, each ended with `.block_until_ready()`.

Usage:
  python benchmarks/bench_structure_factor.py [--quick] [--x64] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np

HKLS = [(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, -1, 0), (1, 1, 1), (4, 0, 0), (2, 2, 0)]
NUMPY_MIN_SECONDS = 1.0  # the numpy baseline runs at least this long
NUMPY_MIN_POINTS = 256  # ... and on at least this many q points (they also serve the accuracy check)
NUMPY_CHUNK_ELEMENTS = 1 << 22  # atom·q per numpy chunk: bounds memory (32 MB of complex64)
SEPARABLE_MAX_WORK = 1.5e10  # atom·q above which the separable engine runs on an atom subset
JAX_MIN_CALLS = 3
JAX_MIN_SECONDS = 1.0  # keep timing (up to JAX_MAX_CALLS) until the timed calls add up to this
JAX_MAX_CALLS = 10


@dataclasses.dataclass
class Row:
    """One line of the results table (seconds and rates refer to the whole problem of the case)."""

    engine: str
    case: str
    atoms: int
    q_points: int
    seconds: float  # median time of the whole problem (extrapolated when `extrapolated`)
    rate: float  # atom·q / s
    ratio: float  # rate / numpy rate of this case in this run
    max_rel_err: float | None  # max |F - F_ref| / max |F_ref| on the checked q subset
    rms_rel_err: float | None  # rms |F - F_ref| / rms |F_ref|
    first_call: float | None  # compile + first call, s (jitted engines), of what was measured
    calls: list[float]  # the timed calls, s, of what was measured
    measured_on: str  # what was actually timed
    extrapolated: bool
    error: str | None = None


# ----------------------------------------------------------------------------------------- provenance
def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def provenance(jax) -> dict:
    """Versions, backend, devices, CPUs and load: enough to judge a number later."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 0
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": _pkg_version("jaxlib"),
        "jax_finufft": _pkg_version("jax-finufft"),
        "numpy": np.__version__,
        "jaxpolaron": _pkg_version("jaxpolaron"),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_average_1_5_15": load,
        "x64": bool(jax.config.jax_enable_x64),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
    }


# -------------------------------------------------------------------------------------- numpy baseline
def numpy_f(sf, q_abs: np.ndarray, dtype) -> np.ndarray:
    """f_s(|q|) per species, (S, n) complex, re-implemented in numpy from the Waasmaier–Kirfel coefficients."""
    a = np.asarray(sf.wk_scale, dtype)
    b = np.asarray(sf.wk_exponent, dtype)
    c = np.asarray(sf.wk_offset, dtype)
    s2 = (np.asarray(q_abs, dtype) / 2.0) ** 2
    f0 = c[:, None] + np.einsum("si,sin->sn", a, np.exp(-b[:, :, None] * s2[None, None, :]))
    return f0 + np.asarray(sf.f1, dtype)[:, None] + 1j * np.asarray(sf.f2, dtype)[:, None]


def numpy_direct_chunks(
    positions: np.ndarray,
    blocks,
    sf,
    q: np.ndarray,
    dtype,
    min_seconds: float = 0.0,
    min_points: int = 0,
):
    """Plain numpy direct sum F(q) = Σ_s f_s(|q|) Σ_{j∈s} exp(2πi q·r_j), chunked over q.

    Args:
        positions: (N, 3) Å.  blocks: (start, stop) per species.  q: (n, 3) Å⁻¹.
        dtype: float32 (complex64 arithmetic) or float64 (complex128).
        min_seconds, min_points: stop after the first chunk boundary where both are reached (0: do all).

    Returns:
        (F for the processed prefix of q, number of q points processed, seconds).
    """
    pos = np.asarray(positions, dtype) * dtype(2.0 * math.pi)
    n_atoms = pos.shape[0]
    chunk = max(1, NUMPY_CHUNK_ELEMENTS // max(n_atoms, 1))
    out = []
    done = 0
    t0 = time.perf_counter()
    while done < q.shape[0]:
        qc = np.asarray(q[done : done + chunk], dtype)
        e = np.exp(1j * (pos @ qc.T))  # (N, c) complex64 / complex128
        partial = np.stack([e[a:b].sum(axis=0) for a, b in blocks])  # (S, c)
        f = numpy_f(sf, np.linalg.norm(qc, axis=1), dtype)
        out.append(np.sum(f * partial, axis=0))
        done += qc.shape[0]
        elapsed = time.perf_counter() - t0
        if min_seconds and elapsed >= min_seconds and done >= min_points:
            break
    return np.concatenate(out), done, time.perf_counter() - t0


def reference(positions, blocks, sf, q: np.ndarray) -> np.ndarray:
    """Float64 numpy direct sum on (n, 3) q points (the accuracy reference; not timed)."""
    f, _, _ = numpy_direct_chunks(np.asarray(positions, np.float64), blocks, sf, q, np.float64)
    return f


def rel_errors(f: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |f - ref| / max |ref|, rms |f - ref| / rms |ref|)."""
    d = np.abs(np.asarray(f, np.complex128) - ref)
    return float(d.max() / np.abs(ref).max()), float(np.sqrt(np.mean(d**2) / np.mean(np.abs(ref) ** 2)))


# ------------------------------------------------------------------------------------------ jax timing
def time_jax(fn: Callable[[], object]) -> tuple[float, list[float], object]:
    """One warm-up call (compile + first run), then ≥ JAX_MIN_CALLS timed calls; returns (first, calls, out)."""
    t0 = time.perf_counter()
    out = fn()
    out.block_until_ready()  # type: ignore[attr-defined]
    first = time.perf_counter() - t0
    calls: list[float] = []
    while len(calls) < JAX_MIN_CALLS or (sum(calls) < JAX_MIN_SECONDS and len(calls) < JAX_MAX_CALLS):
        t0 = time.perf_counter()
        fn().block_until_ready()  # type: ignore[attr-defined]
        calls.append(time.perf_counter() - t0)
    return first, calls, out


def atom_subset(crystal, stride: int, multiple: int = 64):
    """About every `stride`-th atom of each species block (evenly spread), as a new Nanocrystal.

    Each block keeps a multiple of `multiple` atoms (or all of them) so that the separable engine's atom
    chunks (64 atoms on a 256×256 plane) are not padded: the rate then extrapolates linearly to all atoms.
    """
    import jax.numpy as jnp

    from jaxpolaron.crystal import Nanocrystal

    idx, blocks, start = [], [], 0
    for a, b in crystal.blocks:
        count = min(b - a, multiple * math.ceil((b - a) / stride / multiple))
        take = np.unique(np.linspace(a, b - 1, count).round().astype(int))
        idx.append(take)
        blocks.append((start, start + len(take)))
        start += len(take)
    sel = jnp.asarray(np.concatenate(idx))
    return Nanocrystal(
        positions=crystal.positions[sel],
        species=crystal.species[sel],
        mask=crystal.mask[sel],
        ideal=crystal.ideal[sel],
        size=crystal.size,
        species_names=crystal.species_names,
        oxidation=crystal.oxidation,
        blocks=tuple(blocks),
    )


# ------------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Case:
    name: str  # e.g. "A: 5 nm, 8 windows 33³"
    size_nm: float
    grid: object  # jaxpolaron Grid (stacked windows or one grid)
    label: str


def run_case(case: Case, structure, rng: np.random.Generator, dtype, log) -> list[Row]:
    import jax.numpy as jnp

    from jaxpolaron.crystal import cut_nanocrystal
    from jaxpolaron.reciprocal import Grid
    from jaxpolaron.scattering import scattering_factors
    from jaxpolaron.structure_factor import structure_factor

    t_case = time.perf_counter()
    crystal = cut_nanocrystal(structure, case.size_nm)
    sf = scattering_factors(
        crystal.species_names, charges=dict(zip(crystal.species_names, crystal.oxidation, strict=True))
    )
    grid = case.grid
    n_atoms = int(crystal.positions.shape[0])
    n_q = int(np.prod(np.asarray(grid.centre).shape[:-1], dtype=int) * math.prod(grid.shape))
    work = float(n_atoms) * n_q
    positions = np.asarray(crystal.positions)
    all_q = np.asarray(grid.points()).reshape(-1, 3)
    log(f"\n== case {case.name}: {n_atoms} atoms {crystal.composition()}, {n_q} q points, {work:.3g} atom·q")

    # numpy baseline on a random q subset (also the accuracy subset)
    order = rng.permutation(n_q)
    f_np, n_sub, t_np = numpy_direct_chunks(
        positions, crystal.blocks, sf, all_q[order], dtype, NUMPY_MIN_SECONDS, NUMPY_MIN_POINTS
    )
    sub = order[:n_sub]
    q_sub = all_q[sub]
    np_rate = n_atoms * n_sub / t_np
    # the float64 reference (in --x64 mode the timed baseline already is one)
    ref = f_np if dtype == np.float64 else reference(positions, crystal.blocks, sf, q_sub)
    max_err, rms_err = rel_errors(f_np, ref)
    common = {"case": case.label, "atoms": n_atoms, "q_points": n_q}
    rows = [
        Row(
            engine="numpy",
            **common,
            seconds=work / np_rate,
            rate=np_rate,
            ratio=1.0,
            max_rel_err=max_err,
            rms_rel_err=rms_err,
            first_call=None,
            calls=[t_np],
            measured_on=f"{n_sub} random q of {n_q}",
            extrapolated=n_sub < n_q,
        )
    ]
    log(f"numpy {np.dtype(dtype).name}: {n_sub} q in {t_np:.2f} s -> {np_rate:.3g} atom·q/s")

    def add(engine, fn, measured_on, check, whole_seconds=None, extrapolated=False):
        """Time `fn` and append a row; `whole_seconds(median)` extrapolates to the whole problem."""
        try:
            first, calls, out = time_jax(fn)
            med = statistics.median(calls)
            seconds = med if whole_seconds is None else whole_seconds(med)
            max_err, rms_err = check(np.asarray(out))
        except Exception as exc:  # e.g. an engine the backend lacks: report, do not abort the run
            log(f"{engine}: FAILED {type(exc).__name__}: {exc}")
            nan = math.nan
            rows.append(
                Row(
                    engine=engine,
                    **common,
                    seconds=nan,
                    rate=nan,
                    ratio=nan,
                    max_rel_err=None,
                    rms_rel_err=None,
                    first_call=None,
                    calls=[],
                    measured_on=measured_on,
                    extrapolated=False,
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
            return
        rate = work / seconds
        rows.append(
            Row(
                engine=engine,
                **common,
                seconds=seconds,
                rate=rate,
                ratio=rate / np_rate,
                max_rel_err=max_err,
                rms_rel_err=rms_err,
                first_call=first,
                calls=calls,
                measured_on=measured_on,
                extrapolated=extrapolated,
            )
        )
        log(
            f"{engine:16s} first {first:7.2f} s, median {med:7.3f} s of {len(calls)} "
            f"({measured_on}) -> whole problem {seconds:.3g} s, {rate:.3g} atom·q/s"
        )

    # direct: the numpy subset as a q list; cost is linear in q
    q_sub_j = jnp.asarray(q_sub, dtype)
    add(
        "direct",
        lambda: structure_factor(crystal, sf, q_sub_j, "direct"),
        f"q list of the {n_sub} numpy q",
        lambda out: rel_errors(out, ref),
        lambda med: med * n_q / n_sub,
        n_sub < n_q,
    )

    # separable: the whole problem, or the whole grid with two atom subsets (a line through both times
    # extrapolates to all atoms: the f(|q|) combination on the grid is a fixed cost, the sum is linear)
    stride = max(1, math.ceil(work / SEPARABLE_MAX_WORK))
    if stride == 1:
        add(
            "separable",
            lambda: structure_factor(crystal, sf, grid, "separable"),
            "whole problem",
            lambda out: rel_errors(out.reshape(-1)[sub], ref),
        )
    else:
        small = atom_subset(crystal, stride)
        tiny = atom_subset(crystal, n_atoms)  # 64 atoms per species
        n_small, n_tiny = int(small.positions.shape[0]), int(tiny.positions.shape[0])
        small_pos = np.asarray(small.positions)
        ref_small = reference(small_pos, small.blocks, sf, q_sub)

        def line_through(g):
            _, calls_tiny, _ = time_jax(lambda: structure_factor(tiny, sf, g, "separable"))
            t_tiny = statistics.median(calls_tiny)
            scale = n_q / math.prod(g.shape)
            return lambda med: scale * (med + (n_atoms - n_small) * (med - t_tiny) / (n_small - n_tiny))

        add(
            "separable",
            lambda: structure_factor(small, sf, grid, "separable"),
            f"whole grid, {n_small} and {n_tiny} atoms",
            lambda out: rel_errors(out.reshape(-1)[sub], ref_small),
            line_through(grid),
            True,
        )
        if grid.centre.ndim == 1 and grid.shape[2] > 16:
            slab = Grid(centre=grid.centre, voxel=grid.voxel, shape=(grid.shape[0], grid.shape[1], 16))
            slab_q = np.asarray(slab.points()).reshape(-1, 3)
            slab_sub = rng.choice(slab_q.shape[0], size=min(256, slab_q.shape[0]), replace=False)
            ref_slab = reference(small_pos, small.blocks, sf, slab_q[slab_sub])
            add(
                "separable[slab]",
                lambda: structure_factor(small, sf, slab, "separable"),
                f"{'x'.join(map(str, slab.shape))} slab, {n_small} and {n_tiny} atoms",
                lambda out: rel_errors(out.reshape(-1)[slab_sub], ref_slab),
                line_through(slab),
                True,
            )

    # nufft: whole problem
    add(
        "nufft",
        lambda: structure_factor(crystal, sf, grid, "nufft"),
        "whole problem",
        lambda out: rel_errors(out.reshape(-1)[sub], ref),
    )
    log(f"case {case.name} benchmark wall time: {time.perf_counter() - t_case:.1f} s")
    return rows


# ---------------------------------------------------------------------------------------------- output
def format_table(rows: list[Row]) -> str:
    head = [
        "engine",
        "case",
        "atoms",
        "q points",
        "seconds",
        "atom·q/s",
        "ratio vs numpy",
        "max rel err",
        "compile+first",
        "measured on",
    ]
    lines = []
    for r in rows:
        if r.error:
            lines.append([r.engine, r.case, str(r.atoms), str(r.q_points), "failed", "", "", "", "", r.error[:60]])
            continue
        lines.append(
            [
                r.engine,
                r.case,
                str(r.atoms),
                str(r.q_points),
                f"{r.seconds:.3g}{'*' if r.extrapolated else ''}",
                f"{r.rate:.3g}",
                f"{r.ratio:.3g}",
                "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}",
                "-" if r.first_call is None else f"{r.first_call:.2f} s",
                r.measured_on,
            ]
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*x) for x in lines]
    out.append(
        "* extrapolated from what `measured on` says: linearly in q (numpy, direct), along the line "
        "through the times of two atom subsets (separable), for the slab also by its share of the grid.\n"
        "seconds: median of the timed calls, for the whole problem of the case. max rel err: "
        "max|F - F_ref| / max|F_ref| on the numpy q subset, F_ref a float64 numpy direct sum\n"
        "(numpy's own row: its rounding in the run's precision; separable: on its larger atom subset)."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 nm only, 4 windows, 128³ grid")
    parser.add_argument("--x64", action="store_true", help="run jax and the numpy baseline in float64")
    parser.add_argument("--json", metavar="FILE", help="write provenance and rows as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q subsets")
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)

    from jaxpolaron.reciprocal import full_grid, hkl_windows
    from jaxpolaron.structure import read_cif

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    prov = provenance(jax)
    log(
        f"# jax {prov['jax']} (jaxlib {prov['jaxlib']}, jax-finufft {prov['jax_finufft']}, numpy {prov['numpy']}) "
        f"backend={prov['backend']} devices={prov['devices']} cpus={prov['cpu_count']} "
        f"(affinity {prov['cpu_affinity']}) load={[round(x, 2) for x in prov['load_average_1_5_15']]} "
        f"x64={prov['x64']} python {prov['python']} {prov['date']}"
    )
    log(f"jax.devices(): {jax.devices()}")

    dtype = np.float64 if args.x64 else np.float32
    structure = read_cif()
    hkls = HKLS[:4] if args.quick else HKLS
    windows = hkl_windows(structure, hkls, shape=33, voxel=0.0025)
    n_grid, size_b = (128, 5.0) if args.quick else (256, 15.0)
    hkl_names = ",".join("".join(str(i) for i in h) for h in hkls)
    cases = [
        Case(f"A: 5 nm on {len(hkls)} windows of 33³ ({hkl_names})", 5.0, windows, f"A 5nm {len(hkls)}x33³"),
        Case(
            f"B: {size_b:g} nm on {n_grid}³ (±0.75 Å⁻¹)",
            size_b,
            full_grid(n_grid, 0.75),
            f"B {size_b:g}nm {n_grid}³",
        ),
    ]
    rng = np.random.default_rng(args.seed)
    rows: list[Row] = []
    for case in cases:
        rows += run_case(case, structure, rng, dtype, log)

    log("\n" + format_table(rows))
    log("\nwhole-problem times (median; * = extrapolated):")
    for r in rows:
        if not r.error:
            log(f"  {r.case}: {r.engine} {r.seconds:.3g} s{' *' if r.extrapolated else ''}")
    total = time.perf_counter() - t_all
    log(f"\nbenchmark wall time: {total:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "provenance": prov,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "wall_seconds": total,
                    "rows": [dataclasses.asdict(r) for r in rows],
                },
                fh,
                indent=2,
            )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
