"""Fitting: time per optimisation step (value + grad) of the ensemble objective, and steps to converge.

    loss(z) = χ²/2 = ½ Σ_v w_v (ΔI_meas,v − s · ΔI_sim,v(z))²        (fitting.objective)

The problem is the one of the deformation issue: the random-hole model with k_pb, k_br, hole_bias and
amplitude fitted (k_Cs = 1 the reference), a Gamma size ensemble (shape 2, mean 5.4 nm, "peak" size weights)
of 3, 4, …, 8 nm crystals with H = 256 hole samples per size, one pair per pumped crystal, on the
family-averaged 7³ windows (half 3) of 200, 110, 111 and 220 on the reduction's default grid (voxel 2/256
Å⁻¹). The "measured" windows are noise-free and simulated with the linear ΔI method from the truth
k_pb 1.0, k_br 0.5, hole_bias 0.3, amplitude 0.02 with another hole key than the fit's (the fit's minimum
is therefore close to, not at, the truth); weighting "uniform", scale "dark".

What is timed (each jitted function: its first call, "compile+first"; then --repeats rounds in which every
function is called once, interleaved so that the load drift of a shared machine hits all alike, each call
ended with `block_until_ready`; median; a function whose calls add up to 20 s sits out later rounds):
  dark    Σ_s w_s |F_s|² on the member windows: one structure factor per size ("sf"; the unit of
          benchmarks/bench_ensemble.py).
  value   the objective alone, `obj(z)` (the same-run baseline of the step).
  step    one optimisation step of `fitting.optimise.make_step(optax.adam(lr))`: value_and_grad of the
          objective plus the Adam update. "step / value" is the price of reverse mode.
  accurate value and step of the same objective with the accurate ΔI method (--nodes quadrature nodes;
          0 skips it), and their ratios to the main rows.
  exact   value and step of the same objective with the exact ΔI method (3 structure factors per hole
          sample), run with --exact-holes h ≪ H holes (default 4); "× linear step" compares the measured
          exact step with the linear step; the H-hole figures are extrapolated in proportion to the holes
          (t·H/h, marked *: the hole samples are almost the whole cost of the exact path, so this slightly
          overestimates).
Steps to converge: `fitting.optimise.minimise` from a fixed start (k_pb +40 %, k_br +40 %, hole_bias −33 %,
amplitude −40 %) with optax.adam(lr) and with optax.lbfgs() (zoom line search: a step may evaluate the
objective several times), the same StopRule. Before each run two chained warm-up steps compile the step
("compile s"; before commit 4c98f17 minimise's first step got uncommitted arrays and compiled a second
program, it now commits them); "wall s" is then run time only. Printed per
optimiser: steps run, what stopped it (the stop rule's patience, max steps, or a non-finite loss, at which
minimise stops and keeps the best z), wall time, s / step, the steps and seconds until the loss first came
within --reach (1e-3) of L*, the lowest loss of all runs, the best loss, and the relative error of each
parameter (best z) against the truth; then the wall-time ratios lbfgs / adam (whole runs, and to L*(1+reach)).

The machines are shared and noisy: compare the ratio columns between runs, not the seconds. Nothing here
asserts a timing. On a GPU the script runs unchanged (the device is printed); the hole counts must be
multiples of the number of devices (`pumped_difference` shards holes over the local devices).

Usage:
  python benchmarks/bench_fit.py [--quick] [--x64] [--json FILE] [--sizes 3,4,5,6,7,8] [--holes 256]
      [--method linear|exact|second] [--hkls 200,110,111,220] [--half 3] [--voxel 0.0078125]
      [--exact-holes 4] [--repeats 5] [--lr 0.05] [--max-steps 300] [--patience 30] [--rel-tol 1e-5]
      [--reach 1e-3] [--optimizers adam,lbfgs] [--no-converge] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_ensemble (provenance, tables)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fitting

from bench_ensemble import _fmt, _table, provenance

FIT = "k_pb,k_br,hole_bias,amplitude"
TRUTH = {"k_pb": 1.0, "k_br": 0.5, "hole_bias": 0.3, "amplitude": 0.02}
START = {"k_pb": 1.4, "k_br": 0.7, "hole_bias": 0.2, "amplitude": 0.012}  # +40 %, +40 %, −33 %, −40 %
PROGRESS_EVERY = 50  # log the loss of a minimisation every this many steps
MAX_TIMED_SECONDS = 20.0  # stop repeating a call once the timed calls add up to this (slow exact steps)


@dataclasses.dataclass
class Timed:
    """One jitted function: the first call (compile + run) and the timed calls after it."""

    name: str
    method: str
    holes: int
    first_s: float  # compile + first call
    median_s: float
    calls: list[float]
    scaled_s: float | None = None  # extrapolated to the whole problem's holes (exact rows)


@dataclasses.dataclass
class Convergence:
    """One minimisation from START; times are run time (the step was compiled before)."""

    optimizer: str
    steps: int  # steps run (finite losses)
    stop_reason: str  # "patience" (the stop rule fired), "max steps" or "non-finite loss" (minimise stops there)
    compile_s: float  # the warm-up steps (compile + first calls)
    wall_s: float  # the whole minimise call
    loss_start: float
    loss: float  # best loss (minimise keeps the best z)
    values: dict[str, float]  # physical values at the best z
    rel_err: dict[str, float]  # values / truth − 1
    losses: list[float]  # per step
    times: list[float]  # per step: seconds since minimise started, when the step's loss was known
    reach_steps: int | None = None  # steps until the loss first came within --reach of the run's lowest loss
    reach_s: float | None = None  # ... and the seconds until then


def _dirty(folder: str) -> list[str]:
    """Uncommitted files under `folder` of the repository (read-only git status), [] when git is not there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", folder], cwd=root, capture_output=True, text=True, env=env
        )
    except OSError:
        return []
    return [line[3:] for line in out.stdout.splitlines()]


def call_s(jax, fn, *args) -> float:
    """Seconds of one call, ended with block_until_ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def time_interleaved(jax, rows: list[Timed], fns: list[tuple], repeats: int) -> None:
    """Call the (already compiled) fns in `repeats` interleaved rounds, so that the load drift of a shared
    machine hits all alike; a function whose calls add up to MAX_TIMED_SECONDS sits out the later rounds."""
    for _ in range(max(1, repeats)):
        for row, (fn, args) in zip(rows, fns, strict=True):
            if not row.calls or sum(row.calls) < MAX_TIMED_SECONDS:
                row.calls.append(call_s(jax, fn, *args))
    for row in rows:
        row.median_s = statistics.median(row.calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: sizes 3,4; 64 holes; 3 repeats; at most 50 steps"
    )
    parser.add_argument("--x64", action="store_true", help="run everything in float64")
    parser.add_argument("--json", metavar="FILE", help="write provenance, configuration and results as JSON")
    parser.add_argument("--sizes", help="comma-separated sizes, nm (default 3,4,5,6,7,8; --quick 3,4)")
    parser.add_argument("--holes", type=int, help="hole samples per size H (default 256; --quick 64)")
    parser.add_argument(
        "--method", default="linear", choices=("linear", "exact", "second", "accurate"), help="ΔI method of the fit"
    )
    parser.add_argument("--hkls", default="200,110,111,220", help="canonical reflections of the fit windows")
    parser.add_argument("--half", type=int, default=3, help="window half width, voxels (default 3: 7³ windows)")
    parser.add_argument("--voxel", type=float, default=2 / 256, help="grid spacing, Å⁻¹ (default 2/256)")
    parser.add_argument(
        "--exact-holes", type=int, default=4, help="holes of the exact rows (default 4; 0: no exact rows)"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds (median; default 5; --quick 3)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    parser.add_argument("--max-steps", type=int, help="stop rule: at most this many steps (default 300; --quick 50)")
    parser.add_argument("--patience", type=int, default=30, help="stop rule: steps without improvement")
    parser.add_argument("--rel-tol", type=float, default=1e-5, help="stop rule: relative improvement")
    parser.add_argument(
        "--reach", type=float, default=1e-3, help="'converged': loss within this of the runs' lowest (default 1e-3)"
    )
    parser.add_argument("--optimizers", default="adam,lbfgs", help="minimisations run (default adam,lbfgs)")
    parser.add_argument("--no-converge", action="store_true", help="time the steps only, no minimisation")
    parser.add_argument("--seed", type=int, default=0, help="hole key of the fit (the truth uses seed + 1)")
    parser.add_argument(
        "--nodes", type=int, default=4096, help="quadrature nodes of the accurate rows (4096; 0: no accurate rows)"
    )
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)

    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fitting.fit_cli import parse_hkls
    from fitting.forward import build_forward, one_pair
    from fitting.objective import make_objective
    from fitting.optimise import StopRule, make_step, minimise
    from fitting.parameters import select, template_model
    from fitting.synthetic import simulated_windows
    from fitting.windows import make_layout
    from jaxpolaron.reciprocal import hkl_label
    from jaxpolaron.structure import read_cif

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    prov = provenance(jax)
    prov["git_dirty_fitting"] = _dirty("fitting")
    log(
        f"# jax {prov['jax']} (jaxlib {prov['jaxlib']}, numpy {prov['numpy']}, equinox {eqx.__version__}, "
        f"optax {optax.__version__}) backend={prov['backend']} cpus={prov['cpu_count']} "
        f"(affinity {prov['cpu_affinity']}) load={[round(x, 2) for x in prov['load_average_1_5_15']]} "
        f"x64={prov['x64']} python {prov['python']} {prov['date']}\n# git {prov.get('git_head', '')[:12]} dirty "
        f"jaxpolaron/: {prov.get('git_dirty_jaxpolaron') or 'none'}; fitting/: {prov['git_dirty_fitting'] or 'none'}"
    )
    log(f"jax.devices(): {jax.devices()}")

    default_sizes = "3,4" if args.quick else "3,4,5,6,7,8"
    sizes = [float(s) for s in (args.sizes or default_sizes).split(",")]
    holes = args.holes or (64 if args.quick else 256)
    exact_holes = args.exact_holes
    repeats = args.repeats or (3 if args.quick else 5)
    max_steps = args.max_steps or (50 if args.quick else 300)
    if args.method == "exact":
        exact_holes = 0  # the main rows are the exact path already
    n_dev = len(jax.devices())
    for n in [holes] + ([exact_holes] if exact_holes else []):
        if n % n_dev:
            parser.error(f"hole counts must be multiples of the {n_dev} devices, got {n}")
    hkls = parse_hkls(args.hkls)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if any(o not in ("adam", "lbfgs") for o in optimizers):
        parser.error("--optimizers takes adam and/or lbfgs")

    # ---- the problem: truth windows from one forward, the fit's forward with another hole key
    t0 = time.perf_counter()
    structure = read_cif()
    layout = make_layout(structure.q_of_hkl, hkls, args.voxel, args.half)
    grid = layout.member_grid()
    truth_forward = build_forward(
        structure,
        grid,
        sizes_nm=sizes,
        gamma_shape=2.0,
        mean_nm=5.4,
        size_weighting="peak",
        occupancy=one_pair(),
        n_holes=holes,
        method="linear",
        key=jax.random.key(args.seed + 1),
    )
    # the same crystals, weights and scattering factors; other holes (and the fit's method)
    forward = dataclasses.replace(truth_forward, key=jax.random.key(args.seed), method=args.method)
    crystal = forward.crystals[0]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    windows = simulated_windows(truth_forward, template_model("random-hole", structure, crystal, TRUTH), layout)
    t_truth = time.perf_counter() - t0
    params = select("random-hole", FIT, crystal.species_names, free_scale=False)
    t0 = time.perf_counter()
    objective = make_objective(
        forward,
        template_model("random-hole", structure, crystal),
        params,
        windows,
        weighting="uniform",
        scale_mode="dark",
    )
    t_objective = time.perf_counter() - t0
    atoms = [int(c.positions.shape[0]) for c in forward.crystals]
    n_q = len(layout.members) * layout.side**3
    log(
        f"ensemble: sizes {sizes} nm ({atoms} atoms), Gamma(2, 5.4 nm) 'peak' weights, one pair, H = {holes} holes, "
        f"method {args.method}; windows {', '.join(hkl_label(h) for h in hkls)} half {args.half} "
        f"({layout.side}³, voxel {args.voxel:.5g} Å⁻¹): {len(layout.members)} member windows, {n_q} q points; "
        f"fit {FIT}, truth {TRUTH} (linear, hole key {args.seed + 1}; fit key {args.seed}); "
        f"exact rows with {exact_holes or '-'} holes; {n_dev} device(s)"
    )
    log(f"setup: forward {t_build:.1f} s, truth windows {t_truth:.1f} s, objective (dark scale) {t_objective:.1f} s")

    # ---- per-step timing
    @eqx.filter_jit
    def dark(fw):
        return fw.dark()

    @eqx.filter_jit
    def value(obj, z):
        return obj(z)

    z_start = jnp.asarray(params.unconstrained(START))
    adam = optax.adam(args.lr)
    adam_step = make_step(adam)
    adam_state = adam.init(z_start)
    rows: list[Timed] = []

    fns: list[tuple] = []

    def compile_first(name: str, method: str, n_holes: int, fn, *fn_args) -> Timed:
        row = Timed(name, method, n_holes, call_s(jax, fn, *fn_args), float("nan"), [])
        rows.append(row)
        fns.append((fn, fn_args))
        log(f"{row.name:6s} {row.method:7s} {row.holes:4d} holes  compile+first {row.first_s:7.2f} s")
        return row

    sf = compile_first("dark", "-", 0, dark, forward)
    val = compile_first("value", args.method, holes, value, objective, z_start)
    stp = compile_first("step", args.method, holes, adam_step, objective, z_start, adam_state)
    ex_val = ex_stp = None
    if exact_holes:
        exact_forward = dataclasses.replace(forward, method="exact", n_holes=exact_holes)
        exact_objective = eqx.tree_at(lambda o: o.forward, objective, exact_forward)
        ex_val = compile_first("value", "exact", exact_holes, value, exact_objective, z_start)
        ex_stp = compile_first("step", "exact", exact_holes, adam_step, exact_objective, z_start, adam_state)
    acc_val = acc_stp = None
    if args.nodes and args.method != "accurate":
        acc_forward = dataclasses.replace(forward, method="accurate", nodes=args.nodes)
        acc_objective = eqx.tree_at(lambda o: o.forward, objective, acc_forward)
        acc_val = compile_first("value", "accurate", args.nodes, value, acc_objective, z_start)
        acc_stp = compile_first("step", "accurate", args.nodes, adam_step, acc_objective, z_start, adam_state)
    time_interleaved(jax, rows, fns, repeats)
    for row in rows:
        log(
            f"{row.name:6s} {row.method:7s} {row.holes:4d} holes  median {row.median_s:8.4f} s ({len(row.calls)} calls)"
        )
    for row in (ex_val, ex_stp):
        if row is not None:
            row.scaled_s = row.median_s * holes / exact_holes
    if acc_val is not None and acc_stp is not None:
        log(
            f"accurate ({args.nodes} nodes) / {args.method}, same run: value {acc_val.median_s / val.median_s:.2f}×, "
            f"step {acc_stp.median_s / stp.median_s:.2f}×"
        )

    # ---- steps to converge
    runs: list[Convergence] = []
    loss_truth = None
    if not args.no_converge:
        stop = StopRule(max_steps, args.patience, args.rel_tol)
        z_truth = jnp.asarray(params.unconstrained(TRUTH))
        loss_truth = float(value(objective, z_truth))

        def recorder(name: str, losses: list[float], times: list[float], t_start: list[float]):
            def callback(record: dict) -> None:
                times.append(time.perf_counter() - t_start[0])
                losses.append(record["loss"])
                if (record["step"] + 1) % PROGRESS_EVERY == 0:
                    x = np.asarray(params.physical(jnp.asarray(record["z"])))
                    log(f"  {name} step {record['step'] + 1}: loss {record['loss']:.4g}  {np.round(x, 4).tolist()}")

            return callback

        for name in optimizers:
            opt = adam if name == "adam" else optax.lbfgs()
            step = adam_step if name == "adam" else make_step(opt)
            # two chained warm-up steps: the state after a step can differ in type from opt.init's (lbfgs),
            # which compiles the step a second time
            t0 = time.perf_counter()
            z1, s1, _, _ = step(objective, z_start, opt.init(z_start))
            jax.block_until_ready(step(objective, z1, s1))
            warm = time.perf_counter() - t0
            losses: list[float] = []
            times: list[float] = []
            t_start = [time.perf_counter()]
            traj = minimise(
                objective, z_start, opt, stop=stop, step=step, callback=recorder(name, losses, times, t_start)
            )
            wall = time.perf_counter() - t_start[0]
            got = dict(zip(params.names, np.asarray(params.physical(jnp.asarray(traj.z))).tolist(), strict=True))
            if traj.converged:
                reason = "patience"
            else:
                reason = "max steps" if traj.steps >= max_steps else "non-finite loss"
            run = Convergence(
                optimizer=name,
                steps=traj.steps,
                stop_reason=reason,
                compile_s=warm,
                wall_s=wall,
                loss_start=losses[0] if losses else float("nan"),
                loss=traj.loss,
                values=got,
                rel_err={k: got[k] / TRUTH[k] - 1.0 for k in params.names},
                losses=losses,
                times=times,
            )
            runs.append(run)
            log(
                f"{name:6s} {run.steps:4d} steps (stopped by: {run.stop_reason}) {wall:7.1f} s  loss {run.loss:.4g}  "
                + "  ".join(f"{k} {v:.4g} ({run.rel_err[k]:+.1%})" for k, v in got.items())
            )
        lowest = min(r.loss for r in runs)
        for r in runs:
            hit = [i for i, x in enumerate(r.losses) if x <= lowest * (1.0 + args.reach)]
            if hit:
                r.reach_steps, r.reach_s = hit[0] + 1, r.times[hit[0]]

    # ---- output
    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}"

    lines = []
    for r in rows:
        ref_val = val if r.method == args.method else ex_val
        lines.append(
            [
                r.name,
                r.method,
                str(r.holes) if r.holes else "-",
                _fmt(r.first_s, ".2f"),
                _fmt(r.median_s),
                str(len(r.calls)),
                ratio(r.median_s, sf.median_s),
                ratio(r.median_s, ref_val.median_s) if r.name == "step" and ref_val else "-",
                ratio(r.median_s, stp.median_s) if r is ex_stp else "-",
                f"{_fmt(r.scaled_s)}*" if r.scaled_s is not None else "-",
                ratio(r.scaled_s, stp.median_s) + "*" if r is ex_stp else "-",
            ]
        )
    head = ["what", "method", "holes", "compile+first s", "median s", "calls", "× sf", "step / value"]
    head += ["× linear step", f"s at {holes} holes", f"× linear step at {holes} holes"]
    log("\n" + _table(head, lines))
    log(
        "dark: Σ_s w_s |F_s|², one structure factor per size on the member windows (× sf divides by it). "
        "value: obj(z) jitted. step: make_step(optax.adam) = value_and_grad + update. "
        f"* exact rows run with {exact_holes} holes, extrapolated to {holes} in proportion to the holes."
        if exact_holes
        else "dark: Σ_s w_s |F_s|², one structure factor per size on the member windows (× sf divides by it). "
        "value: obj(z) jitted. step: make_step(optax.adam) = value_and_grad + update."
    )
    if runs:
        names = list(params.names)
        conv_lines = [
            [
                r.optimizer,
                str(r.steps),
                r.stop_reason,
                _fmt(r.compile_s, ".2f"),
                _fmt(r.wall_s),
                _fmt(r.wall_s / max(r.steps, 1)),
                str(r.reach_steps) if r.reach_steps else f"> {r.steps}",
                _fmt(r.reach_s) if r.reach_s is not None else f"> {_fmt(r.wall_s)}",
                _fmt(r.loss_start, ".4g"),
                _fmt(r.loss, ".4g"),
                _fmt(r.loss / lowest, ".4f"),
            ]
            + [f"{r.rel_err[k]:+.2%}" for k in names]
            for r in runs
        ]
        reach = f"{args.reach:.0e}".replace("e-0", "e-")
        conv_head = ["optimizer", "steps run", "stopped by", "compile s", "wall s", "s / step"]
        conv_head += [f"steps to L*(1+{reach})", f"s to L*(1+{reach})", "loss start", "best loss", "best / L*"]
        conv_head += [f"err {k}" for k in names]
        log(
            f"\nsteps to converge from {START} (truth {TRUTH}); stop rule: max {max_steps} steps, patience "
            f"{args.patience}, rel_tol {args.rel_tol:g}; adam lr {args.lr:g}, lbfgs optax defaults (zoom line "
            "search)\n" + _table(conv_head, conv_lines)
        )
        log(
            f"L* = {lowest:.6g}: the lowest loss of these runs; loss at the truth (the fit's hole samples) "
            f"{loss_truth:.4g}. compile: two warm-up steps before the run. err: best-z value / truth − 1."
        )
        by = {r.optimizer: r for r in runs}
        if "adam" in by and "lbfgs" in by:
            ad, lb = by["adam"], by["lbfgs"]
            if lb.reach_s is not None and ad.reach_s is not None:
                to_reach = f"{lb.reach_s / ad.reach_s:.2f}"
            elif lb.reach_s is not None:  # adam never came within reach: its whole run is a lower bound
                to_reach = f"< {lb.reach_s / ad.wall_s:.2f} (adam not within {reach} of L* in {ad.steps} steps)"
            else:
                to_reach = "-"
            log(
                f"wall lbfgs / adam: whole runs {lb.wall_s / ad.wall_s:.2f} (steps {lb.steps} / {ad.steps}; "
                f"s per step {ratio(lb.wall_s / max(lb.steps, 1), ad.wall_s / max(ad.steps, 1))}); "
                f"to L*(1+{reach}): {to_reach}"
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
                        "atoms": atoms,
                        "holes": holes,
                        "method": args.method,
                        "hkls": hkls,
                        "half": args.half,
                        "voxel": args.voxel,
                        "member_windows": len(layout.members),
                        "q_points": n_q,
                        "exact_holes": exact_holes,
                        "fit": FIT,
                        "truth": TRUTH,
                        "start": START,
                        "lr": args.lr,
                        "stop": [max_steps, args.patience, args.rel_tol],
                        "seed": args.seed,
                    },
                    "setup_s": {"forward": t_build, "truth_windows": t_truth, "objective": t_objective},
                    "wall_seconds": total,
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "loss_at_truth": loss_truth,
                    "convergence": [dataclasses.asdict(r) for r in runs],
                },
                fh,
                indent=2,
            )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
