"""The paper's model analyses on the Gamma size ensemble, with every peak-shift metric reported with its window.

Cases (all on windows around the pseudo-cubic (200), (110), (111), (400); default 3, 4, ..., 15 nm, Gamma
shape 2.0, mean 5.4 nm; model amplitudes at the package defaults):

a. central hole (SI S5, Fig. S11): scan of the spring constants (k_Cs, k_Pb, k_Br) at fixed
   k_Cs² + k_Pb² + k_Br² = 3 over directions in the positive octant (a simplex grid (i, j, l)/n, all > 0).
b. random holes (Methods Eqs. 3–5): uniform (hole_bias 1) and surface-biased (0.1), each with strong Br
   k ∝ (1, 1, 3) and weak Br k ∝ (1, 1, 0.3) (normalised to Σk² = 3).
c. tilt relaxation (Eq. 2, Fig. 3c): t0 = 0.8 (relaxed tilt at the centre) and 1.2 (increased tilt).
d. 18 meV LO phonon mode (Cannelli et al. ratios, package default amplitude).

Method (default "accurate"): the random-hole cases take the accurate ΔI (jaxpolaron.accurate_difference, a fixed
quadrature rule, no seed), each also on twice the nodes so that every metric carries its quadrature error, and their
k scan runs directly (--random-scan-n, bias 0.1 and 1); the deterministic models keep the linear method below.

With the linear method ΔI = 2 Re(F0* F1[⟨u⟩]) is linear in ⟨u⟩, and ⟨u⟩ of the charge models is
linear in 1/k_s per species (u_s ∝ q_s / k_s, the same hole draws for every k). Every metric used here
(m1 over a fixed region, the least-squares shift) is linear in ΔI with a dark-only normalisation, so
m(k) = Σ_s m_s / k_s exactly, with m_s the metric of species s displaced alone (k_s = 1, the others frozen
with k = 1e6). The scan is evaluated from these per-species bases: it covers the whole octant (outward is
reachable for some k iff some m_s > 0), and selected k are also run directly as a check. With
--method exact|second the scan runs every direction directly (slow).

Engine: the NUFFT (jax-finufft, eps 1e-6 in float32) on CPU: ~200x faster than the separable product for
a 15 nm crystal on 33³ windows, relative difference to it 2e-5 (F0) and 1e-5 (F1) measured at 15 nm.

Run:  .venv/bin/python experiments/paper_models.py --out runs/paper_models
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

HKLS = ((2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0))
PEAKS = ("200", "110", "111", "400")
SPECIES = ("Cs", "Pb", "Br")
K_NORM2 = 3.0  # Σ k² of every k (k = (1, 1, 1) lies on the sphere)
FROZEN_K = 1e6  # spring constant of the species frozen in a per-species basis run
M1_RADII = (0.015, 0.02, 0.025, 0.03, 0.035, 0.04)  # Å⁻¹, spheres about G for the m1 radius profile
METRICS = ("m1_lobe", "m1_window", "shift_ls")
SIGN_FLOOR = 1e-10  # Å⁻¹: |metric| below this is reported as sign 0 (float32 noise is ~1e-11 here)
# Measured signs (Fig. 3b and main text): 200 inward, 110 outward; 111 outward (DFT section: "a measured
# outward shift" for 110 and 111); 400 inward (SI S5: the biased-hole weak-Br model's inward 200 "is also
# true for the (400) peak" and reproduces Fig. 5c).
MEASURED = {"200": "in", "110": "out", "111": "out", "400": "in"}
STRONG_BR = (1.0, 1.0, 3.0)
WEAK_BR = (1.0, 1.0, 0.3)


def _normalised(k) -> tuple[float, float, float]:
    k = np.asarray(k, float)
    k = k * math.sqrt(K_NORM2) / np.linalg.norm(k)
    return tuple(float(x) for x in k)  # type: ignore[return-value]


def scan_directions(n: int) -> list[tuple[float, float, float]]:
    """Directions (i, j, l)/n with i + j + l = n and all >= 1, on the sphere Σk² = 3."""
    return [_normalised((i, j, n - i - j)) for i in range(1, n - 1) for j in range(1, n - i)]


def _sign(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    if abs(v) < SIGN_FLOOR:
        return "0"
    return "out" if v > 0 else "in"


def _fmt_k(k) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in k) + ")"


@dataclasses.dataclass
class Case:
    """One analysed case: a model with its parameters and, once computed, the ensemble ΔI per window."""

    group: str  # a-scan, a-central, a-basis, b, b-basis, b-scan, c, d
    model: str
    name: str
    params: dict
    source: str = "direct"  # direct (a simulate run) or basis (combined per-species runs)
    diff: np.ndarray | None = None  # (4, n, n, n) ΔI, e²
    peaks: dict | None = None
    seconds: float = 0.0
    method: str = ""  # the ΔI method this case ran with
    quadrature: dict | None = None  # accurate: per peak and metric |m(N nodes) − m(2N nodes)|, Å⁻¹


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run folder (default runs/paper_models_<timestamp>)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: one 4 nm crystal, 8 holes, 17³ windows, 3 k directions"
    )
    p.add_argument("--sizes-nm", help="ensemble sizes, nm, comma-separated (default 3,4,...,15; quick 4)")
    p.add_argument("--holes", type=int, help="hole samples per size for random holes (default 256; quick 8)")
    p.add_argument(
        "--method",
        choices=("accurate", "linear", "exact", "second"),
        default="accurate",
        help="ΔI method (accurate: the random holes by quadrature, the deterministic models linear)",
    )
    p.add_argument("--nodes", type=int, help="quadrature nodes of the accurate method (4096; quick 256)")
    p.add_argument(
        "--random-scan-n", type=int, help="accurate: k-scan divisions of the random-hole scan at bias 0.1 and 1 (5)"
    )
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the hole draws (jax.random.key(seed))")
    p.add_argument("--scan-n", type=int, help="k-scan simplex divisions n: (n-1)(n-2)/2 directions (9; quick 4)")
    p.add_argument("--window", type=int, help="window voxels per axis (33; quick 17)")
    p.add_argument("--voxel", type=float, help="window voxel, Å⁻¹ (0.0025; quick 0.005)")
    p.add_argument("--engine", help="structure-factor engine (default nufft on CPU, separable otherwise)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- metrics
def m1_profile(axes, centre: np.ndarray, dark: np.ndarray, diff: np.ndarray) -> dict[float, float]:
    """m1 over spheres |q − G| <= R for each R in M1_RADII: Σ ΔI ρ / Σ I0 (Å⁻¹), as metrics.m1_lobe."""
    g_hat = centre / np.linalg.norm(centre)
    mesh = np.stack(np.meshgrid(*[np.asarray(a, float) for a in axes], indexing="ij"), -1) - centre
    rho = mesh @ g_hat
    dist = np.linalg.norm(mesh, axis=-1)
    out = {}
    for r in M1_RADII:
        sel = dist <= r + 1e-12
        out[r] = float(np.sum(diff[sel] * rho[sel]) / np.sum(dark[sel]))
    return out


def case_rows(case: Case, axes_list, centres, dark, window_desc: str) -> list[dict]:
    rows = []
    assert case.peaks is not None and case.diff is not None
    for i, label in enumerate(PEAKS):
        pk = case.peaks[label]
        prof = m1_profile(axes_list[i], centres[i], dark[i], case.diff[i])
        row = {
            "group": case.group,
            "model": case.model,
            "case": case.name,
            "source": case.source,
            "params": json.dumps(case.params, sort_keys=True),
            "hkl": label,
            "q_abs": pk["q_abs"],
        }
        for m in METRICS:
            row[f"{m}_sign"] = _sign(pk[m])
            row[m] = pk[m]
        row["strain_equiv_ls"] = None if pk["shift_ls"] is None else -pk["shift_ls"] / pk["q_abs"]
        row["intensity_ls"] = pk["intensity_ls"]
        row["odd_fraction"] = pk["odd_fraction"]
        row["delta_integrated"] = pk["delta_integrated"]
        row["m1_profile_signs"] = " ".join(_sign(prof[r]) for r in M1_RADII)
        for r in M1_RADII:
            row[f"m1_r{r:g}"] = prof[r]
        row["lobe_radius"] = pk["lobe_radius"]
        row["window"] = window_desc
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxpolaron import io
    from jaxpolaron.ensemble import DEFAULT_SIZES_NM
    from jaxpolaron.metrics import LOBE_RADIUS, peak_table
    from jaxpolaron.reciprocal import hkl_windows
    from jaxpolaron.simulate import SimulateConfig, simulate
    from jaxpolaron.structure import read_cif

    quick = args.quick
    sizes = (
        tuple(float(s) for s in args.sizes_nm.split(",") if s.strip())
        if args.sizes_nm
        else ((4.0,) if quick else DEFAULT_SIZES_NM)
    )
    holes = args.holes or (8 if quick else 256)
    scan_n = args.scan_n or (4 if quick else 9)
    window = args.window or (17 if quick else 33)
    voxel = args.voxel or (0.005 if quick else 0.0025)
    engine = args.engine or ("nufft" if jax.default_backend() == "cpu" else "separable")
    accurate = args.method == "accurate"
    # accurate: the random holes take the accurate ΔI; the deterministic models (no hole average) stay linear,
    # so their per-species bases and scans are as in a linear run
    linear = args.method in ("linear", "accurate")
    random_scan_n = args.random_scan_n or (3 if quick else 5)
    nodes = args.nodes or (256 if quick else 4096)
    half_width = voxel * (window // 2)
    window_desc = f"cube ±{half_width:.4g} Å⁻¹ ({window}³ × {voxel:g}); lobe |q−G| ≤ {LOBE_RADIUS:g}"

    out = Path(args.out or f"runs/paper_models_{datetime.now().strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    io.check_writable(out / "table.csv")

    structure = read_cif()
    base = SimulateConfig(
        sizes_nm=sizes,
        hkls=HKLS,
        window_shape=window,
        window_voxel=voxel,
        engine=engine,
        method="linear" if accurate else args.method,
        holes=holes,
        nodes=nodes,
        seed=args.seed,
    )
    base.validate()

    # ------------------------------------------------------------------ the cases
    directions = scan_directions(scan_n)
    strong, weak, unit = _normalised(STRONG_BR), _normalised(WEAK_BR), _normalised((1, 1, 1))
    kdict = lambda k: {"k_cs": k[0], "k_pb": k[1], "k_br": k[2]}  # noqa: E731
    direct: list[Case] = []
    for label, k in (("equal k", unit), ("strong Br", strong), ("weak Br", weak)):
        direct.append(Case("a-central", "central-hole", f"central hole, {label} k={_fmt_k(k)}", kdict(k)))
    for bias, bias_label in ((1.0, "uniform"), (0.1, "surface-biased")):
        for label, k in (("strong Br", strong), ("weak Br", weak)):
            direct.append(
                Case(
                    "b",
                    "random-hole",
                    f"random holes {bias_label} (bias {bias:g}), {label} k={_fmt_k(k)}",
                    {"hole_bias": bias, **kdict(k)},
                )
            )
    for t0 in (0.8, 1.2):
        direct.append(Case("c", "tilt", f"tilt t0={t0:g}", {"t0": t0}))
    direct.append(Case("d", "phonon", "phonon (default ratios)", {}))

    basis: dict[str, list[Case]] = {}  # per charge-model configuration: one case per species
    if linear:
        for key, model, extra in (
            ("central", "central-hole", {}),
            *(
                []
                if accurate  # the accurate random-hole ΔI is not linear in 1/k: its scan runs directly
                else [("bias 1", "random-hole", {"hole_bias": 1.0}), ("bias 0.1", "random-hole", {"hole_bias": 0.1})]
            ),
        ):
            basis[key] = []
            for j, sp in enumerate(SPECIES):
                k = tuple(1.0 if i == j else FROZEN_K for i in range(3))
                group = "a-basis" if model == "central-hole" else "b-basis"
                basis[key].append(Case(group, model, f"{key} basis: {sp} only (k_{sp}=1)", {**extra, **kdict(k)}))
    scan_cases: list[Case] = []
    if not linear:
        for k in directions:
            scan_cases.append(Case("a-scan", "central-hole", f"central hole scan {_fmt_k(k)}", kdict(k)))
    scan_random: list[Case] = []
    if accurate:
        for bias in (0.1, 1.0):
            for k in scan_directions(random_scan_n):
                name = f"random holes (bias {bias:g}) scan {_fmt_k(k)}"
                scan_random.append(Case("b-scan", "random-hole", name, {"hole_bias": bias, **kdict(k)}))
    runs = direct + [c for cs in basis.values() for c in cs] + scan_cases + scan_random

    # ------------------------------------------------------------------ simulate
    def inner(items):
        return tqdm(items, desc="  sizes", unit="size", leave=False, disable=args.quiet, file=sys.stderr)

    dark = axes_list = None
    bar = tqdm(runs, desc="cases", unit="case", disable=args.quiet, file=sys.stderr)
    sizes_out = weights = n_atoms = None
    for case in bar:
        bar.set_postfix_str(case.name[:48])
        t0 = time.perf_counter()
        method = "accurate" if accurate and case.model == "random-hole" else base.method
        cfg = dataclasses.replace(base, model=case.model, method=method, **case.params)
        result = simulate(structure, cfg, progress=inner)
        case.method = method
        if method == "accurate" and case.group == "b":
            # the quadrature error of each metric: the same case on twice the nodes (a finer rule)
            finer = simulate(structure, dataclasses.replace(cfg, nodes=2 * cfg.nodes), progress=inner)
            case.quadrature = {p: {m: abs(result.peaks[p][m] - finer.peaks[p][m]) for m in METRICS} for p in PEAKS}
        case.seconds = time.perf_counter() - t0
        vols = [v for v in result.volumes if v.hkl is not None]
        if dark is None:
            dark = np.stack([v.dark for v in vols]).astype(np.float64)
            axes_list = [v.axes for v in vols]
            sizes_out, weights, n_atoms = result.sizes_nm, result.weights, result.n_atoms
        case.diff = np.stack([v.pump - v.dark for v in vols]).astype(np.float64)
        case.peaks = result.peaks
    bar.close()
    assert dark is not None and axes_list is not None

    windows = hkl_windows(structure, HKLS, shape=window, voxel=voxel)
    centres = np.asarray(windows.centre, float)
    dark_j = jnp.asarray(dark, jnp.float32)

    def from_diff(diff: np.ndarray) -> dict:
        return peak_table(windows, HKLS, dark_j, dark_j + jnp.asarray(diff, jnp.float32))

    def combine(key: str, k) -> np.ndarray:
        return sum(c.diff / k[j] for j, c in enumerate(basis[key]))  # type: ignore[misc,operator]

    # per-species metric coefficients m_s (metric of species s alone with k_s = 1)
    coefficients: dict[str, dict[str, dict[str, list[float]]]] = {}
    for key, cases in basis.items():
        coefficients[key] = {
            label: {m: [c.peaks[label][m] for c in cases] for m in METRICS}  # type: ignore[index]
            for label in PEAKS
        }

    # linear: the scan and basis-vs-direct checks from the per-species bases
    checks = []
    if linear:
        for k in directions:
            c = Case("a-scan", "central-hole", f"central hole scan {_fmt_k(k)}", kdict(k), source="basis")
            c.diff = combine("central", k)
            c.peaks = from_diff(c.diff)
            scan_cases.append(c)
        for k in directions if not accurate else ():
            c = Case("b-scan", "random-hole", f"biased holes scan {_fmt_k(k)}", {"hole_bias": 0.1, **kdict(k)}, "basis")
            c.diff = combine("bias 0.1", k)
            c.peaks = from_diff(c.diff)
            scan_random.append(c)
        for case in direct:
            if case.model not in ("central-hole", "random-hole") or (accurate and case.model == "random-hole"):
                continue
            key = "central" if case.model == "central-hole" else f"bias {case.params['hole_bias']:g}"
            k = (case.params["k_cs"], case.params["k_pb"], case.params["k_br"])
            recon = combine(key, k)
            assert case.diff is not None
            rel_l2 = float(np.linalg.norm(recon - case.diff) / np.linalg.norm(case.diff))
            rec_peaks = from_diff(recon)
            worst = max(
                abs(rec_peaks[p][m] - case.peaks[p][m]) / max(abs(case.peaks[p][m]), 1e-30)  # type: ignore[index]
                for p in PEAKS
                for m in METRICS
            )
            checks.append({"case": case.name, "rel_l2_dI": rel_l2, "max_rel_metric_dev": worst})

    # ------------------------------------------------------------------ tables
    all_cases = direct + scan_cases + scan_random + [c for cs in basis.values() for c in cs]
    rows = [r for c in all_cases for r in case_rows(c, axes_list, centres, dark, window_desc)]
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    md = _table_md(rows, sizes_out, weights, window_desc, args.method, holes)
    (out / "table.md").write_text(md)

    # ------------------------------------------------------------------ figures
    figures = []
    if not args.no_figures:
        from jaxpolaron import plotting

        key_cases = direct if not quick else direct[:1] + direct[-3:-2]
        for case in tqdm(key_cases, desc="figures", unit="fig", disable=args.quiet, file=sys.stderr):
            slug = _slug(case.name)
            path = out / f"dI_{slug}.png"
            assert case.diff is not None
            plotting.plot_windows(
                [(p, axes_list[i], centres[i]) for i, p in enumerate(PEAKS)],
                list(dark),
                list(case.diff),
                path,
            )
            figures.append(path.name)
        figures.append(_scan_figure(out / "kscan_central_hole.png", scan_cases, basis.get("central"), "central hole"))
        if scan_random and not accurate:
            figures.append(
                _scan_figure(
                    out / "kscan_random_biased.png", scan_random, basis.get("bias 0.1"), "random holes, bias 0.1"
                )
            )

    # ------------------------------------------------------------------ summary and config
    elapsed = time.perf_counter() - t_start
    summary = _summary(
        direct,
        scan_cases,
        scan_random,
        coefficients,
        checks,
        args,
        sizes_out,
        holes,
        window_desc,
        engine,
        elapsed,
        rows,
        nodes,
    )
    (out / "summary.md").write_text(summary)
    config = {
        "script": "experiments/paper_models.py",
        "args": vars(args),
        "resolved": {
            "sizes_nm": list(sizes),
            "size_weights": list(weights or ()),
            "n_atoms": list(n_atoms or ()),
            "holes": holes,
            "scan_n": scan_n,
            "scan_directions": [list(k) for k in directions],
            "window": window,
            "voxel": voxel,
            "engine": engine,
            "method": args.method,
            "nodes": nodes,
            "random_scan_n": random_scan_n if accurate else None,
            "k_norm2": K_NORM2,
            "frozen_k": FROZEN_K,
            "m1_radii": list(M1_RADII),
            "measured_signs_reference": MEASURED,
        },
        "base_config": dataclasses.asdict(base),
        "cases": [
            {
                "group": c.group,
                "model": c.model,
                "name": c.name,
                "params": c.params,
                "source": c.source,
                "method": c.method or base.method,  # cases combined from per-species bases: the bases' method
                "quadrature_error": c.quadrature,
                "seconds": round(c.seconds, 2),
            }
            for c in all_cases
        ],
        "basis_checks": checks,
        "figures": figures,
        "runtime_s": round(elapsed, 1),
        "provenance": io.provenance({"cif": structure.source}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    print(md)
    print(f"wrote {out} in {elapsed:.0f} s", file=sys.stderr)
    return 0


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")[:80]


def _num(v) -> str:
    return "—" if v is None else f"{v:+.3e}"


def _table_md(rows, sizes, weights, window_desc, method, holes) -> str:
    lines = [
        "# Paper model analyses: per-peak metrics",
        "",
        f"Ensemble sizes {', '.join(f'{s:g}' for s in sizes)} nm (Gamma shape 2, mean 5.4 nm; weights "
        f"{', '.join(f'{w:.3f}' for w in weights)}); method {method}; {holes} hole draws per size (random holes).",
        f"Window: {window_desc} Å⁻¹. Signs: out = away from q = 0 (m1 > 0, s > 0), in = towards q = 0.",
        "m1 profile: sign of m1 over spheres |q−G| ≤ " + ", ".join(f"{r:g}" for r in M1_RADII) + " Å⁻¹.",
        "",
    ]
    head = (
        "| case | hkl | m1_lobe | m1_window | shift_ls | odd frac | ΔI_int/I | m1 profile | src |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    groups = [
        ("a-central", "a. Central hole (direct runs)"),
        ("b", "b. Random holes"),
        ("c", "c. Tilt relaxation"),
        ("d", "d. Phonon mode"),
        ("a-basis", "a. Central hole: per-species bases (species alone, k_s = 1; others frozen)"),
        ("b-basis", "b. Random holes: per-species bases"),
    ]
    for g, title in groups:
        sel = [r for r in rows if r["group"] == g]
        if not sel:
            continue
        lines += [f"## {title}", "", head]
        for r in sel:
            lines.append(
                f"| {r['case']} | {r['hkl']} | {r['m1_lobe_sign']} {_num(r['m1_lobe'])} | "
                f"{r['m1_window_sign']} {_num(r['m1_window'])} | {r['shift_ls_sign']} {_num(r['shift_ls'])} | "
                f"{r['odd_fraction']:.2f} | {_num(r['delta_integrated'])} | {r['m1_profile_signs']} | {r['source']} |"
            )
        lines.append("")
    for g, title in (("a-scan", "a. Central-hole k scan"), ("b-scan", "Biased random-hole k scan (bias 0.1)")):
        sel = [r for r in rows if r["group"] == g and r["hkl"] in ("200", "110")]
        if not sel:
            continue
        lines += [
            f"## {title} (Σk² = {K_NORM2:g}; (200) and (110); all peaks in table.csv)",
            "",
            "| k (Cs, Pb, Br) | hkl | m1_lobe | m1_window | shift_ls | odd frac | src |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            k = json.loads(r["params"])
            lines.append(
                f"| {_fmt_k((k['k_cs'], k['k_pb'], k['k_br']))} | {r['hkl']} | {r['m1_lobe_sign']} "
                f"{_num(r['m1_lobe'])} | {r['m1_window_sign']} {_num(r['m1_window'])} | {r['shift_ls_sign']} "
                f"{_num(r['shift_ls'])} | {r['odd_fraction']:.2f} | {r['source']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _ternary(k) -> tuple[float, float]:
    """2D point of a k direction: barycentric weights k_s / Σk, corners Cs (0,0), Pb (1,0), Br (½, √3/2)."""
    w = np.asarray(k, float)
    w = w / w.sum()
    return float(w[1] + 0.5 * w[2]), float(math.sqrt(3) / 2 * w[2])


def _scan_figure(path: Path, scan: list[Case], basis_cases: list[Case] | None, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(len(METRICS), 2, figsize=(9, 11), squeeze=False)
    fig.set_layout_engine("constrained")
    dense = scan_directions(60) if basis_cases else []
    for row, metric in enumerate(METRICS):
        for col, peak in enumerate(("200", "110")):
            ax = axs[row, col]
            if basis_cases:
                coef = np.array([c.peaks[peak][metric] for c in basis_cases])  # type: ignore[index]
                pts = np.array([_ternary(k) for k in dense])
                vals = np.array([np.sum(coef / np.asarray(k)) for k in dense])
                ax.scatter(pts[:, 0], pts[:, 1], c=np.where(vals > 0, "#f4a6a6", "#a6c4f4"), s=3, lw=0)
            vals = np.array([c.peaks[peak][metric] for c in scan])  # type: ignore[index]
            pts = np.array([_ternary((c.params["k_cs"], c.params["k_pb"], c.params["k_br"])) for c in scan])
            scale = np.max(np.abs(vals)) or 1.0
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                c=np.where(vals > 0, "red", "blue"),
                s=15 + 120 * np.abs(vals) / scale,
                edgecolors="k",
                linewidths=0.4,
            )
            ax.plot([0, 1, 0.5, 0], [0, 0, math.sqrt(3) / 2, 0], "k-", lw=0.8)
            for (x, y), lab, ha in (((0, 0), "stiff Cs", "right"), ((1, 0), "stiff Pb", "left")):
                ax.text(x, y - 0.04, lab, ha=ha, va="top", fontsize=8)
            ax.text(0.5, math.sqrt(3) / 2 + 0.02, "stiff Br", ha="center", va="bottom", fontsize=8)
            ax.text(0.5, -0.04, "soft Br (k_Br → 0)", ha="center", va="top", fontsize=7)
            n_out = int(np.sum(vals > 0))
            ax.set_title(f"({peak}) {metric}: {n_out}/{len(vals)} outward", fontsize=9)
            ax.set_aspect("equal")
            ax.set_xlim(-0.15, 1.15)
            ax.set_ylim(-0.12, 0.97)
            ax.axis("off")
    fig.suptitle(
        f"{title}: shift sign vs spring constants, ternary (k_Cs, k_Pb, k_Br)/Σk at Σk² = {K_NORM2:g}\n"
        "red outward, blue inward, marker area ∝ |value|; pale dots: dense evaluation from the per-species bases",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------- summary
def _sig(case: Case, metric: str) -> dict[str, str]:
    return {p: _sign(case.peaks[p][metric]) for p in PEAKS}  # type: ignore[index]


def _vals(case: Case, metric: str, peaks=PEAKS) -> str:
    return ", ".join(f"{p} {_sign(case.peaks[p][metric])} ({case.peaks[p][metric]:+.2e})" for p in peaks)  # type: ignore[index]


def _br_threshold(coef) -> str:
    """For k_Cs = k_Pb: m ∝ c_Cs + c_Pb + c_Br / ρ with ρ = k_Br / k_Cs; where the sign changes with ρ."""
    cation, br = coef[0] + coef[1], coef[2]
    if cation == 0 or br == 0 or np.sign(cation) == np.sign(br):
        return f"with k_Cs = k_Pb the sign is {_sign(cation + br)} for every k_Br"
    rho = -br / cation
    return f"with k_Cs = k_Pb the sign is {_sign(br)} iff k_Br/k_Cs < {rho:.3g} (else {_sign(cation)})"


def _margin(case: Case, peak: str, metric: str) -> float:
    """|m| / q: the metric in units of its quadrature error (inf when the two rules agree exactly)."""
    q = case.quadrature[peak][metric] if case.quadrature else 0.0
    v = abs(case.peaks[peak][metric])  # type: ignore[index]
    return v / q if q > 0 else math.inf


def _margins(case: Case, metric: str) -> str:
    if not case.quadrature:
        return ""
    return "; margins " + ", ".join(f"{p} {_margin(case, p, metric):.0f} q" for p in PEAKS)


def _verdict(flags: list[bool]) -> str:
    if all(flags):
        return "**reproduced** (all three metrics)"
    if not any(flags):
        return "**not reproduced** (no metric)"
    return "**metric-dependent**: " + ", ".join(
        f"{m} {'yes' if f else 'no'}" for m, f in zip(METRICS, flags, strict=True)
    )


def _summary(
    direct, scan, scan_random, coefficients, checks, args, sizes, holes, window_desc, engine, elapsed, rows, nodes
) -> str:
    central = [c for c in direct if c.group == "a-central"]
    rand = [c for c in direct if c.group == "b"]
    tilt = [c for c in direct if c.group == "c"]
    phonon = [c for c in direct if c.group == "d"]
    L = [
        "# Paper statements vs our models",
        "",
        f"Run: sizes {', '.join(f'{s:g}' for s in sizes)} nm (Gamma shape 2, mean 5.4 nm), method {args.method}, "
        f"{holes} hole draws per size, seed {args.seed}, engine {engine}, windows {window_desc} Å⁻¹; "
        f"model amplitudes at the package defaults (charge models 0.02 Å, softening 1 Å, electron sphere "
        f"s/2 with strength 1; tilt quadratic profile; phonon 0.02 Å axial Br). Runtime {elapsed:.0f} s.",
        "",
        "Metrics (jaxpolaron.metrics): m1_lobe = Σ ΔI ρ / Σ I0 over |q−G| ≤ 0.025 Å⁻¹; m1_window = the same over "
        "the whole cube window; shift_ls = least-squares s in ΔI ≈ α I0 − s Ĝ·∇I0 over the lobe. Positive = "
        "outward (away from q = 0). Nothing was tuned: every case uses the parameters stated in the brief.",
        "",
    ]
    if args.method == "accurate":
        L += [
            f"Accurate method for the random holes: the hole average by a fixed {nodes}-node quadrature rule "
            "with the ions near each hole placed exactly (docs/accurate_difference.md: within 0.1–1.8 % of the "
            "exact ΔI at 0.005–0.05 Å); no PRNG key. Each random-hole case also ran on twice the nodes; the "
            "difference of a metric between the two rules is its quadrature error q, and every random-hole sign "
            "below carries its margin |m| / q. The deterministic models (central hole, tilt, phonon) have no hole "
            "average and keep the linear method, with its per-species bases m(k) = Σ_s m_s / k_s; "
            "reconstruction vs direct runs: "
            + "; ".join(
                f"{c['case']}: rel. L2 {c['rel_l2_dI']:.1e}, metrics {c['max_rel_metric_dev']:.1e}" for c in checks
            )
            + ".",
            "",
        ]
    if args.method == "linear":
        L += [
            "Linear method: ΔI is first order in the hole-averaged field ⟨u⟩ (notes: relative L2 error "
            "2e-4…6e-2 vs exact at |q·u| ≈ 0.05 rad); as a consequence t0 = 1.2 is exactly the negative of "
            "t0 = 0.8, and every metric of a charge model is m(k) = Σ_s m_s / k_s with per-species coefficients "
            "m_s. Per-species reconstruction vs direct runs: "
            + "; ".join(
                f"{c['case']}: rel. L2 {c['rel_l2_dI']:.1e}, metrics {c['max_rel_metric_dev']:.1e}" for c in checks
            )
            + ".",
            "",
        ]
    # (1)
    L += ["## (1) Measured: (200) inward, (110) outward", ""]
    L += [
        "Not tested here: no measured data enter this script; the measured signs (Fig. 3b; 111 outward per "
        "the DFT section, 400 inward per SI S5) are the target. Cases that give (200) in + (110) out:",
        "",
    ]
    for m in METRICS:
        hits = [c.name for c in direct if _sig(c, m)["200"] == "in" and _sig(c, m)["110"] == "out"]
        full = [c.name for c in direct if _sig(c, m) == MEASURED]
        L.append(f"- {m}: {', '.join(hits) if hits else 'none'}; all four measured signs: {', '.join(full) or 'none'}.")
    L.append("")
    # (2)
    L += ["## (2) Central hole never gives an outward (110), whatever k", ""]
    flags = []
    for m in METRICS:
        n_out = sum(_sign(c.peaks["110"][m]) == "out" for c in scan)  # type: ignore[index]
        extra = ""
        if "central" in coefficients:
            coef = coefficients["central"]["110"][m]
            reach = any(v > 0 for v in coef)
            extra = (
                f"; per-species coefficients (Cs, Pb, Br) {', '.join(f'{v:+.2e}' for v in coef)} → outward "
                f"{'reachable (as that species’ k → 0)' if reach else 'impossible for any k > 0'}"
            )
            flags.append(not reach and n_out == 0)
        else:
            flags.append(n_out == 0)
        L.append(f"- {m}: {n_out}/{len(scan)} scan directions outward{extra}.")
    L += ["", "Verdict: " + _verdict(flags), ""]
    # (3)
    L += ["## (3) Central hole: weak Br needed for an outward (200)", ""]
    flags = []
    for m in METRICS:
        outs = [c for c in scan if _sign(c.peaks["200"][m]) == "out"]  # type: ignore[index]
        weak_br = [c for c in outs if c.params["k_br"] < min(c.params["k_cs"], c.params["k_pb"])]
        ratio = [c.params["k_br"] / min(c.params["k_cs"], c.params["k_pb"]) for c in outs]
        desc = f"{len(outs)}/{len(scan)} directions outward"
        if outs:
            desc += (
                f", {len(weak_br)} of them with Br the weakest spring; k_Br/min(k_Cs, k_Pb) over the outward ones "
                f"{min(ratio):.2f}…{max(ratio):.2f}"
            )
        if "central" in coefficients:
            coef = coefficients["central"]["200"][m]
            desc += f"; coefficients (Cs, Pb, Br) {', '.join(f'{v:+.2e}' for v in coef)}; {_br_threshold(coef)}"
            only_br = coef[2] > 0 and coef[0] <= 0 and coef[1] <= 0
            flags.append(bool(outs) and only_br)
        else:
            flags.append(bool(outs) and len(weak_br) == len(outs))
        L.append(f"- {m}: {desc}.")
    L += [
        "",
        "Criterion: reproduced when outward (200) occurs and only the Br coefficient is outward (so an outward "
        "(200) requires a soft Br relative to Cs and Pb). Precisely, with c_s the coefficients, the (200) is "
        "outward iff c_Br / k_Br > |c_Cs| / k_Cs + |c_Pb| / k_Pb: Br need not be the softest spring when Pb (the "
        "largest |c|) is stiff enough, which is the one outward scan point without Br the weakest.",
        "",
        "Verdict: " + _verdict(flags),
        "",
        "Direct central-hole runs: " + "; ".join(f"{c.name}: {_vals(c, 'm1_lobe', ('200', '110'))}" for c in central),
        "",
    ]
    # (4)
    L += ["## (4) Surface-biased random holes + weak Br: (200) in, (110) out (Fig. 5c); also (400) and (111)", ""]
    key = next(c for c in rand if "bias 0.1" in c.name and "weak Br" in c.name)
    flags, flags_all = [], []
    for m in METRICS:
        s = _sig(key, m)
        flags.append(s["200"] == "in" and s["110"] == "out")
        flags_all.append(s == MEASURED)
        L.append(f"- {m}: {_vals(key, m)}{_margins(key, m)}.")
    if key.quadrature:
        L += [
            "",
            "Margins (|m| / q, q the quadrature error of that metric; the weaker of the two peaks decides): "
            "200 in + 110 out "
            + ", ".join(f"{m} {min(_margin(key, '200', m), _margin(key, '110', m)):.0f} q" for m in METRICS)
            + "; the two signs the case misses, 111 and 400: "
            + ", ".join(f"{m} {_margin(key, '111', m):.0f} q / {_margin(key, '400', m):.0f} q" for m in METRICS)
            + ".",
        ]
    L += [
        "",
        f"Target (measured): {', '.join(f'{p} {v}' for p, v in MEASURED.items())}.",
        "",
        "Verdict (200 in + 110 out): " + _verdict(flags),
        "",
        "Verdict (all four measured signs): " + _verdict(flags_all),
        "",
        "How robust is the (200) sign of this case? |200| / |110| = "
        + ", ".join(
            f"{m} {abs(key.peaks['200'][m]) / max(abs(key.peaks['110'][m]), 1e-30):.2f}"  # type: ignore[index]
            for m in METRICS
        )
        + (
            "; weak Br here is k_Br/k_Cs = "
            + f"{key.params['k_br'] / key.params['k_cs']:.3g}"
            + ", against the sign-change ratio "
            + ", ".join(f"{m}: {_br_threshold(coefficients['bias 0.1']['200'][m])}" for m in METRICS)
            if "bias 0.1" in coefficients
            else ""
        )
        + ".",
        "",
        "Other random-hole cases (m1_lobe / m1_window / shift_ls signs for 200, 110, 111, 400):",
        "",
    ]
    for c in rand:
        L.append(
            f"- {c.name}: "
            + " / ".join(" ".join(_sig(c, m).values()) for m in METRICS)
            + ("; (200) margin " + " / ".join(f"{_margin(c, '200', m):.0f} q" for m in METRICS) if c.quadrature else "")
        )
    uni = next(c for c in rand if "bias 1)" in c.name and "weak Br" in c.name)
    uni_ok = [_sig(uni, m)["200"] == "in" and _sig(uni, m)["110"] == "out" for m in METRICS]
    L += [
        "",
        "Is the surface bias what produces it? Uniform holes with the same weak Br give 200 in + 110 out: "
        + ", ".join(f"{m} {'yes' if f else 'no'}" for m, f in zip(METRICS, uni_ok, strict=True))
        + ". Main text: random holes 'consistently yielded inward shifts of the 200': (200) signs over the four "
        "random-hole cases (m1_lobe) " + ", ".join(_sig(c, "m1_lobe")["200"] for c in rand) + ".",
    ]
    if scan_random and args.method == "accurate":
        L += ["", "Random-hole k scan (accurate, run directly at every direction; bias 0.1 and 1):", ""]
        for bias in (0.1, 1.0):
            cases = [c for c in scan_random if c.params["hole_bias"] == bias]
            for m in METRICS:
                sig = [_sig(c, m) for c in cases]
                both = sum(x["200"] == "in" and x["110"] == "out" for x in sig)
                full = sum(x == MEASURED for x in sig)
                out111 = [c.name.split(" scan ")[1] for c, x in zip(cases, sig, strict=True) if x["111"] == "out"]
                in400 = [c.name.split(" scan ")[1] for c, x in zip(cases, sig, strict=True) if x["400"] == "in"]
                L.append(
                    f"- bias {bias:g}, {m}: {both}/{len(cases)} directions give 200 in + 110 out, {full} all four "
                    f"measured signs; 111 out at {', '.join(out111) or 'none'}; 400 in at {', '.join(in400) or 'none'}."
                )
        L += [
            "",
            "(111) out and (400) in: reachable by a k and hole bias of the scan only where listed above (the scan "
            "covers the octant coarsely; both biases of the paper).",
        ]
    elif scan_random:
        L += ["", "Biased-hole k scan (from the per-species bases, same directions as (a)):", ""]
        for m in METRICS:
            n_ok = sum(_sign(c.peaks["200"][m]) == "in" and _sign(c.peaks["110"][m]) == "out" for c in scan_random)  # type: ignore[index]
            coef = coefficients["bias 0.1"]
            L.append(
                f"- {m}: {n_ok}/{len(scan_random)} directions give 200 in + 110 out; coefficients (Cs, Pb, Br) "
                f"200: {', '.join(f'{v:+.2e}' for v in coef['200'][m])}; 110: "
                f"{', '.join(f'{v:+.2e}' for v in coef['110'][m])}. "
                + "; ".join(f"{p}: {_br_threshold(coef[p][m])}" for p in PEAKS)
                + "."
            )
    L += [
        "",
        "SI S5 also says the central-hole trend reverses for biased holes (weak Br → inward 200, also for 400): "
        + "; ".join(
            f"{c.name}: 200 {' / '.join(_sig(c, m)['200'] for m in METRICS)}, "
            f"400 {' / '.join(_sig(c, m)['400'] for m in METRICS)}"
            for c in rand
            if "bias 0.1" in c.name
        )
        + " (m1_lobe / m1_window / shift_ls).",
        "",
    ]
    # (5)
    L += ["## (5) Tilt model: mostly intensity changes, no shifts (Fig. 3c); opposite sign for increased tilt", ""]
    hole_odd = [c.peaks[p]["odd_fraction"] for c in central + rand for p in PEAKS]  # type: ignore[index]
    for c in tilt:
        L.append(
            f"- {c.name}: odd fraction "
            + ", ".join(f"{p} {c.peaks[p]['odd_fraction']:.1e}" for p in PEAKS)  # type: ignore[index]
            + "; ΔI_int/I "
            + ", ".join(f"{p} {c.peaks[p]['delta_integrated']:+.2e}" for p in PEAKS)  # type: ignore[index]
            + "; m1_lobe "
            + ", ".join(f"{p} {c.peaks[p]['m1_lobe']:+.2e}" for p in PEAKS)  # type: ignore[index]
            + "; shift_ls "
            + ", ".join(f"{p} {c.peaks[p]['shift_ls']:+.2e}" for p in PEAKS)  # type: ignore[index]
        )
    hole_m1 = [abs(c.peaks[p]["m1_lobe"]) for c in central + rand for p in PEAKS]  # type: ignore[index]
    hole_int = [abs(c.peaks[p]["delta_integrated"]) for c in central + rand for p in PEAKS]  # type: ignore[index]
    tilt_m1 = [abs(c.peaks[p]["m1_lobe"]) for c in tilt for p in PEAKS]  # type: ignore[index]
    tilt_int = [abs(c.peaks[p]["delta_integrated"]) for c in tilt for p in PEAKS]  # type: ignore[index]
    L.append(
        f"- hole models (a, b) for comparison: odd fraction {min(hole_odd):.2f}…{max(hole_odd):.2f}, "
        f"|m1_lobe| {min(hole_m1):.1e}…{max(hole_m1):.1e} Å⁻¹, |ΔI_int/I| {min(hole_int):.1e}…{max(hole_int):.1e}; "
        f"tilt: |m1_lobe| {min(tilt_m1):.1e}…{max(tilt_m1):.1e} Å⁻¹, |ΔI_int/I| {min(tilt_int):.1e}…"
        f"{max(tilt_int):.1e}."
    )
    L.append(
        "- So the tilt ΔI is almost purely even about G (an intensity change), but its radial moments are not "
        "zero: with the model amplitudes as given, the tilt m1/shift_ls are of the same order as the hole "
        "models' while its integrated-intensity change is 2–3 decades larger; a shift metric alone, without "
        "the odd fraction or ΔI_int/I, would not tell the two apart."
    )
    mostly_even = all(c.peaks[p]["odd_fraction"] < 0.5 for c in tilt for p in PEAKS)  # type: ignore[index]
    flip = len(tilt) == 2 and all(
        np.sign(tilt[0].peaks[p]["delta_integrated"]) == -np.sign(tilt[1].peaks[p]["delta_integrated"])  # type: ignore[index]
        for p in PEAKS
    )
    L += [
        "",
        f"Mostly intensity-like (odd fraction < 0.5 for every peak): {'yes' if mostly_even else 'no'}. "
        f"Integrated-intensity change flips sign between t0 = 0.8 and 1.2 for every peak: {'yes' if flip else 'no'}"
        + (" (exact by construction at first order: u ∝ t0 − 1)." if args.method == "linear" else "."),
        "",
        "Verdict: "
        + (
            "**reproduced**"
            if mostly_even and flip
            else "**partly reproduced**"
            if (mostly_even or flip)
            else "**not reproduced**"
        )
        + " (metric: odd fraction and ΔI_int/I; the shift metrics above are not zero but are to be read against "
        "the odd fraction).",
        "",
    ]
    # (d)
    L += ["## Phonon model (no paper statement; reported for completeness)", ""]
    for c in phonon:
        for m in METRICS:
            L.append(f"- {c.name}, {m}: {_vals(c, m)}")
        L.append(
            "- odd fraction "
            + ", ".join(f"{p} {c.peaks[p]['odd_fraction']:.2f}" for p in PEAKS)  # type: ignore[index]
            + "; ΔI_int/I "
            + ", ".join(f"{p} {c.peaks[p]['delta_integrated']:+.2e}" for p in PEAKS)  # type: ignore[index]
        )
    L += ["", "## Metric dependence", ""]
    disagree = []
    for c in direct:
        for p in PEAKS:
            signs = {_sign(c.peaks[p][m]) for m in METRICS}  # type: ignore[index]
            if len(signs) > 1:
                disagree.append(f"{c.name} ({p}: " + "/".join(_sign(c.peaks[p][m]) for m in METRICS) + ")")  # type: ignore[index]
    L.append(
        "Cases where m1_lobe / m1_window / shift_ls disagree in sign: " + ("; ".join(disagree) if disagree else "none")
    )
    L.append("")
    mixed = [r for r in rows if len(set(r["m1_profile_signs"].split())) > 1]
    L.append(
        "m1 over spheres of radius "
        + ", ".join(f"{r:g}" for r in M1_RADII)
        + " Å⁻¹ (table.md, column 'm1 profile'): rows whose sign changes with the radius: "
        + ("; ".join(f"{r['case']} ({r['hkl']}: {r['m1_profile_signs']})" for r in mixed) if mixed else "none")
        + "."
    )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
