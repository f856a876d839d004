"""Integrated Bragg intensities of undistorted nanocrystals vs the bulk N_cells·|F_hkl|² from gemmi.

For a large crystal, the integral of |F(q)|² over one Bragg peak is N_cells |F_cell(G)|² / V_cell (q = 1/d,
no 2π). Here the integral is the window sum Σ |F|² · voxel³ of the separable engine over a cubic window of
half-width Q around G = structure.q_of_hkl(hkl) (pseudo-cubic hkl), and the bulk reference F_hkl is computed
independently by gemmi (IT92 f0 + the same Chantler f′, f″ as jaxpolaron) from the bundled CIF.

Reported per crystal (size, envelope exponent p, centre species) and window half-width Q:

- I/I_bulk = I_int · V_pc / (N_Pb · |F_o/4|²): the captured fraction of the bulk integrated intensity
  (N_Pb pseudo-cubic cells of volume V_pc = V_o/4; F_o the orthorhombic-cell structure factor of the
  corresponding ortho reflection, (200)pc = (202)o, (110)pc = (121)o, (111)pc = (022)o, (400)pc = (404)o).
- η: the same captured fraction for the bare Pb lattice (f = 1 on Pb, 0 elsewhere), i.e. the fraction of the
  crystal's shape-function peak inside the window. It does not depend on hkl (the Pb sites form an exact
  Bravais lattice), so I/(η·I_bulk) isolates what is *not* the shape-function tail: surface termination and
  f(|q|) variation across the window.
- ratios 110/200, 400/200, 111/200 of the integrated intensities vs the gemmi ratios |F_hkl|²/|F_200|².

Run:  .venv/bin/python experiments/bulk_convergence.py --out runs/bulk_convergence
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from importlib import resources
from pathlib import Path

HKLS = ((2, 0, 0), (1, 1, 0), (1, 1, 1), (4, 0, 0))
RATIO_HKLS = ((1, 1, 0), (4, 0, 0), (1, 1, 1))


def _parse_floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5,8,10,12,15", help="crystal edge lengths, nm (comma-separated)")
    p.add_argument("--windows", default="0.03,0.04,0.06", help="window half-widths Q, Å⁻¹ (comma-separated)")
    p.add_argument("--exponent", type=float, default=5.0, help="superellipsoid exponent of the main scan")
    p.add_argument("--cube-exponent", type=float, default=50.0, help="exponent of the near-cube variant")
    p.add_argument(
        "--variant-sizes",
        default="10,15",
        help="sizes (nm) also run as a near-cube (--cube-exponent, Pb-centred) and Cs-centred (--exponent)",
    )
    p.add_argument("--half-voxels", type=int, default=16, help="voxel = Q / half_voxels; window = 2n+1 voxels")
    p.add_argument("--energy", type=float, default=13.6, help="beam energy, keV (f′, f″ from xraydb Chantler)")
    p.add_argument("--x64", action="store_true", help="run in float64 and check the first case in float32")
    p.add_argument("--out", default="runs/bulk_convergence", help="output directory (table.md, table.csv)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # x64 must be set before any array is created.
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)

    import gemmi
    import jax.numpy as jnp
    import numpy as np

    from jaxpolaron.crystal import Nanocrystal, cut_nanocrystal
    from jaxpolaron.reciprocal import Grid, hkl_windows
    from jaxpolaron.scattering import ScatteringFactors, scattering_factors
    from jaxpolaron.structure import BUNDLED_CIF, read_cif
    from jaxpolaron.structure_factor import intensity

    t_start = time.perf_counter()
    structure = read_cif()
    scat = scattering_factors(structure.species, args.energy)
    f1 = dict(zip(structure.species, np.asarray(scat.f1, float).tolist(), strict=True))
    f2 = dict(zip(structure.species, np.asarray(scat.f2, float).tolist(), strict=True))
    v_pc = structure.volume / structure.z_formula

    # ------------------------------------------------------------------ independent bulk reference (gemmi)
    cif_path = str(resources.files("jaxpolaron") / "data" / BUNDLED_CIF)
    small = gemmi.read_small_structure(cif_path)
    # gemmi sums every site over all symmetry operations; sites on special positions (Cs 4c, Pb 4b, Br 4c
    # in Pnma) would be counted twice with the CIF's chemical occupancy 1: use crystallographic occupancies.
    small.change_occupancies_to_crystallographic()

    def gemmi_sf(hkl_o, addends: dict[str, float]) -> complex:
        calc = gemmi.StructureFactorCalculatorX(small.cell)
        for el, value in addends.items():
            calc.addends.set(gemmi.Element(el), value)
        return complex(calc.calculate_sf_from_small_structure(small, [round(h) for h in hkl_o]))

    def gemmi_f(hkl_o) -> tuple[complex, complex]:
        """Bulk F_o(hkl_o) = Σ (f0_IT92 + f′ + i f″) S_el from gemmi, and F without anomalous terms."""
        f_real = gemmi_sf(hkl_o, f1)  # Σ (f0_IT92 + f′) S_el: gemmi's addends are real
        # f″ enters through gemmi's own per-element geometric sums S_el = F(addend_el + 1) − F(addend_el).
        imag_part = 0j
        for el in structure.species:
            s_el = gemmi_sf(hkl_o, {**f1, el: f1[el] + 1.0}) - f_real
            imag_part += 1j * f2[el] * s_el
        return f_real + imag_part, gemmi_sf(hkl_o, {})

    to_crystal = structure.reciprocal @ structure.pseudo_cubic.rotation.T  # ortho hkl -> crystal-frame q
    gemmi_ref = {}
    for hkl in HKLS:
        hkl_o = structure.hkl_to_ortho(hkl)
        if not np.allclose(hkl_o, np.round(hkl_o)):
            raise SystemExit(f"pseudo-cubic {hkl} is not an integer ortho reflection ({hkl_o})")
        hkl_o = np.round(hkl_o)
        f_total, f_bare = gemmi_f(hkl_o)
        if abs(f_total - f_bare) < 1.0:
            raise SystemExit("gemmi addends did not change F: the anomalous terms are not applied")
        g = structure.q_of_hkl(hkl)
        q_abs = float(np.linalg.norm(g))
        it92 = [
            gemmi.IT92_get_exact(gemmi.Element(e), 0).calculate_sf(stol2=(q_abs / 2) ** 2) for e in structure.species
        ]
        wk = np.asarray(scat.f0(jnp.asarray(q_abs)), float)
        # Pnma superlattice reflections near G (ortho hkl that are not pseudo-cubic integer points).
        neighbours = []
        for d in itertools.product(range(-2, 3), repeat=3):
            if not any(d):
                continue
            h = hkl_o + np.array(d)
            offset = h @ to_crystal - g
            if np.max(np.abs(offset)) < 0.1:
                rel = abs(gemmi_f(h)[0]) ** 2 / abs(f_total) ** 2
                neighbours.append((float(np.max(np.abs(offset))), rel, tuple(int(x) for x in h), offset))
        neighbours.sort(key=lambda t: (round(t[0], 3), -t[1]))
        # Per-element partial structure factors F_el = (f0_IT92 + f′ + i f″) S_el, all from gemmi.
        partial = {
            el: (f0 + f1[el] + 1j * f2[el]) * (gemmi_sf(hkl_o, {el: 1.0}) - f_bare)
            for el, f0 in zip(structure.species, it92, strict=True)
        }
        gemmi_ref[hkl] = {
            "hkl_ortho": tuple(int(x) for x in hkl_o),
            "partial": partial,
            "q": q_abs,
            "F": f_total,
            "F2": abs(f_total) ** 2,
            "f0_it92": it92,
            "f0_wk": wk.tolist(),
            "neighbours": neighbours,
        }

    per_formula = {el: int(np.sum(structure.species_index == i)) for i, el in enumerate(structure.species)}
    per_formula = {el: n // per_formula["Pb"] for el, n in per_formula.items()}

    def composition_model(comp: dict[str, int], hkl) -> float:
        """Integrated intensity / (N_Pb-normalised bulk) if each element's sublattice shapes are nested.

        Element e fills a fraction c_e = N_e / (n_e·N_Pb) of the Pb crystal's cells; with nested shapes the
        pair count of elements (e, e') is min(c_e, c_e')·N_Pb, so
        I / I_bulk = Σ_{e,e'} Re(F_e F_e'*) min(c_e, c_e') / |F|².
        """
        part = gemmi_ref[hkl]["partial"]
        c = {el: comp[el] / (per_formula[el] * comp["Pb"]) for el in part}
        total = sum((part[a] * np.conj(part[b])).real * min(c[a], c[b]) for a in part for b in part)
        return float(total / abs(sum(part.values())) ** 2)

    # ------------------------------------------------------------------ crystals and windows
    sizes = _parse_floats(args.sizes)
    windows = _parse_floats(args.windows)
    variant_sizes = _parse_floats(args.variant_sizes)
    cases = [(s, args.exponent, "Pb") for s in sizes]
    for s in variant_sizes:
        cases.append((s, args.cube_exponent, "Pb"))
        cases.append((s, args.exponent, "Cs"))
    n_vox = 2 * args.half_voxels + 1
    pb = structure.species.index("Pb")
    n_species = len(structure.species)
    dtype = jnp.result_type(float)
    # f = 1 on Pb, 0 elsewhere, no |q| dependence: the Pb lattice's shape-function peak.
    unit_pb = ScatteringFactors(
        wk_scale=jnp.zeros((n_species, 5), dtype),
        wk_exponent=jnp.zeros((n_species, 5), dtype),
        wk_offset=jnp.asarray([1.0 if i == pb else 0.0 for i in range(n_species)], dtype),
        f1=jnp.zeros(n_species, dtype),
        f2=jnp.zeros(n_species, dtype),
        labels=scat.labels,
        energy_kev=scat.energy_kev,
    )

    def integrate(crystal, scattering, half_width):
        """Σ_window |F|² voxel³ (e²·Å⁻³) per reflection of HKLS, in the crystal's float dtype."""
        voxel = half_width / args.half_voxels
        grid = hkl_windows(structure, HKLS, shape=n_vox, voxel=voxel)
        fdt = crystal.positions.dtype
        grid = Grid(centre=grid.centre.astype(fdt), voxel=grid.voxel.astype(fdt), shape=grid.shape)
        inten = intensity(crystal, scattering, grid, engine="separable")
        if inten.dtype != fdt:
            raise SystemExit(f"intensity came out as {inten.dtype} for {fdt} inputs")
        return np.asarray(inten, np.float64).reshape(len(HKLS), -1).sum(axis=1) * voxel**3

    rows = []
    x64_check = None
    for size, expo, centre in cases:
        t0 = time.perf_counter()
        crystal = cut_nanocrystal(structure, size, exponent=expo, centre=centre)
        comp = crystal.composition()
        n_pb = comp["Pb"]
        lattice = crystal  # with unit_pb form factors: the bare Pb lattice
        for q_half in windows:
            i_int = integrate(crystal, scat, q_half)
            eta = float(integrate(lattice, unit_pb, q_half)[0] * v_pc / n_pb)
            if args.x64 and x64_check is None:
                c32 = Nanocrystal(
                    positions=crystal.positions.astype(jnp.float32),
                    species=crystal.species,
                    mask=crystal.mask.astype(jnp.float32),
                    ideal=crystal.ideal.astype(jnp.float32),
                    size=crystal.size.astype(jnp.float32),
                    species_names=crystal.species_names,
                    oxidation=crystal.oxidation,
                    blocks=crystal.blocks,
                )
                s32 = jax.tree.map(lambda x: x.astype(jnp.float32) if hasattr(x, "astype") else x, scat)
                i32 = integrate(c32, s32, q_half)
                x64_check = (size, expo, centre, q_half, float(np.max(np.abs(i32 / i_int - 1))))
            for k, hkl in enumerate(HKLS):
                ref = gemmi_ref[hkl]
                bulk = n_pb * ref["F2"] / 16.0 / v_pc  # N_Pb |F_o/4|² / V_pc = N_o |F_o|² / V_o
                ratio = i_int[k] / i_int[0]
                ratio_ref = ref["F2"] / gemmi_ref[HKLS[0]]["F2"]
                model = composition_model(comp, hkl)
                model_200 = composition_model(comp, HKLS[0])
                rows.append(
                    {
                        "size_nm": size,
                        "exponent": expo,
                        "centre": centre,
                        "n_Cs": comp["Cs"],
                        "n_Pb": n_pb,
                        "n_Br": comp["Br"],
                        "window_half_width": q_half,
                        "voxel": q_half / args.half_voxels,
                        "hkl": "".join(map(str, hkl)),
                        "hkl_ortho": "".join(map(str, ref["hkl_ortho"])),
                        "q_abs": ref["q"],
                        "I_int": float(i_int[k]),
                        "I_bulk": bulk,
                        "I_over_bulk": float(i_int[k] / bulk),
                        "eta_lattice": eta,
                        "I_over_eta_bulk": float(i_int[k] / bulk / eta),
                        "ratio_to_200": float(ratio),
                        "ratio_gemmi": ratio_ref,
                        "ratio_dev_percent": float(100 * (ratio / ratio_ref - 1)),
                        "composition_model": model,
                        "model_ratio_dev_percent": 100 * (model / model_200 - 1),
                    }
                )
        print(
            f"  {size:g} nm p={expo:g} {centre}-centred: {sum(comp.values())} atoms, {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ output
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = [
        f"# Bulk convergence of integrated intensities ({'float64' if args.x64 else 'float32'}, "
        f"{args.energy} keV, window {n_vox}³ voxels, voxel = Q/{args.half_voxels})",
        "",
        "Bulk reference (gemmi IT92 f0 + xraydb Chantler f′, f″; |F_o|² per orthorhombic cell, 4 pc cells):",
        "",
        "| hkl pc | hkl o | \\|q\\| Å⁻¹ | F_o (gemmi) | \\|F_o\\|² | ratio to 200 | f0 IT92/WK − 1 (Cs, Pb, Br) |",
        "|---|---|---|---|---|---|---|",
    ]
    for hkl in HKLS:
        ref = gemmi_ref[hkl]
        dev = ", ".join(f"{100 * (a / b - 1):+.2f} %" for a, b in zip(ref["f0_it92"], ref["f0_wk"], strict=True))
        lines.append(
            f"| {''.join(map(str, hkl))} | {''.join(map(str, ref['hkl_ortho']))} | {ref['q']:.4f} | "
            f"{ref['F'].real:.1f}{ref['F'].imag:+.1f}i | {ref['F2']:.4g} | "
            f"{ref['F2'] / gemmi_ref[HKLS[0]]['F2']:.5f} | {dev} |"
        )
    lines += [
        "",
        "Pnma superlattice reflections within 0.1 Å⁻¹ (per axis) of each G, from gemmi: count, nearest",
        "per-axis distance, and the strongest ones (ortho hkl, crystal-frame offset, |F|²/|F_G|²):",
        "",
        "| hkl pc | n | nearest Å⁻¹ | Σ \\|F\\|²/\\|F_G\\|² | strongest |",
        "|---|---|---|---|---|",
    ]
    for hkl in HKLS:
        nb = gemmi_ref[hkl]["neighbours"]
        strongest = sorted(nb, key=lambda t: -t[1])[:3]
        desc = "; ".join(
            f"({' '.join(map(str, h))}) at ({', '.join(f'{x:+.3f}' for x in off)}): {rel:.3f}"
            for _, rel, h, off in strongest
        )
        lines.append(
            f"| {''.join(map(str, hkl))} | {len(nb)} | {min(t[0] for t in nb):.3f} | "
            f"{sum(t[1] for t in nb):.2f} | {desc} |"
        )
    lines += [
        "",
        "I/I_bulk: captured fraction of N_Pb·|F_o/4|²/V_pc (200); η: same for the bare Pb lattice (shape-function",
        "peak only). Ratio columns: our integrated-intensity ratio (its deviation from gemmi's / the deviation",
        "predicted from the crystal's composition alone, nested-sublattice model: I/I_bulk = Σ Re(F_e F_e'*)",
        "min(c_e, c_e')/|F|², c_e = N_e/(n_e N_Pb), F_e gemmi's per-element partial structure factors).",
        "",
        "| size nm | p | centre | Cs:Pb:Br | ±Q Å⁻¹ | η | I/I_bulk 200 | I/(η I_bulk) 200 / model | "
        "I/(η I_bulk) 111 | 110/200 (dev / model) | 400/200 (dev / model) | 111/200 (dev / model) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["size_nm"], r["exponent"], r["centre"], r["window_half_width"]), {})[r["hkl"]] = r
    for (size, expo, centre, q_half), d in by_key.items():
        r200 = d["200"]
        cells = [
            f"{size:g}",
            f"{expo:g}",
            centre,
            f"{r200['n_Cs']}:{r200['n_Pb']}:{r200['n_Br']}",
            f"{q_half:g}",
            f"{r200['eta_lattice']:.4f}",
            f"{r200['I_over_bulk']:.4f}",
            f"{r200['I_over_eta_bulk']:.4f} / {r200['composition_model']:.4f}",
            f"{d['111']['I_over_eta_bulk']:.4f}",
        ]
        for hkl in RATIO_HKLS:
            r = d["".join(map(str, hkl))]
            cells.append(
                f"{r['ratio_to_200']:.5f} ({r['ratio_dev_percent']:+.2f} % / {r['model_ratio_dev_percent']:+.2f} %)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    if x64_check is not None:
        size, expo, centre, q_half, dev = x64_check
        lines += [
            "",
            f"float32 vs float64 ({size:g} nm, p={expo:g}, {centre}-centred, ±{q_half:g} Å⁻¹): "
            f"max |I32/I64 − 1| over the four reflections = {dev:.2e}",
        ]
    lines += ["", f"Run time {time.perf_counter() - t_start:.0f} s."]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    config = {k: v for k, v in vars(args).items()}
    config["gemmi_reference"] = {
        "".join(map(str, h)): {"F_real": v["F"].real, "F_imag": v["F"].imag, "F2": v["F2"]}
        for h, v in gemmi_ref.items()
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
