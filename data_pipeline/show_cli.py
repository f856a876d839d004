"""`jaxpolaron show VOLUMES.h5`: a text summary and a figure of any volume file.

Works on simulated files (`jaxpolaron simulate --out`: windows "hkl_200", ... and/or a full "grid") and on
merged ones (`jaxpolaron reduce`: volume "grid" with dark, pump, difference, merge weights and a statistics
dict). Figures:

- default: the three central slices (normal to q_x, q_y, q_z through q = 0; the window centre for a window);
- `--slice AXIS=VALUE`: one slice normal to AXIS at the sample nearest VALUE, AXIS one of qx, qy, qz (Å⁻¹,
  |q| = 1/d) or h, k, l (pseudo-cubic index: `l = v` is the plane q_z = v · c*_z through the (0 0 v) point);
- `--hkl H,K,L`: a panel zoomed on that Bragg peak (the paper's Fig. 3b) in the slice normal to the axis along
  which G has its smallest component, through G — the plane holding the peak and q = 0 when an index is zero.

dark/pump are drawn on a log scale (floored `--decades` below the maximum), the difference with 'RdBu_r' and
symmetric limits (red = more intensity after pumping; signed log scale on full slices, linear on --hkl panels).
Voxels with zero merge weight are grey. Miller indices are converted with the reciprocal basis of the CIF named
in the file's config (else the bundled CsPbBr3, else a cubic cell of 5.87 Å).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from jaxpolaron.cli import _positive_float
from jaxpolaron.errors import InputError

GROUP_CHOICES = ("dark", "pump", "difference", "all")
AXIS_NAMES = ("qx", "qy", "qz")
MILLER_NAMES = ("h", "k", "l")
FALLBACK_A = 5.87  # Å, pseudo-cubic CsPbBr3, used only when no structure can be read
_SLICE = re.compile(r"^\s*(qx|qy|qz|h|k|l)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """A requested slice: `axis` 0/1/2 (x/y/z), `value` in Å⁻¹ (`miller`: False) or pseudo-cubic index units."""

    axis: int
    value: float
    miller: bool

    @property
    def label(self) -> str:
        return f"{(MILLER_NAMES if self.miller else AXIS_NAMES)[self.axis]} = {self.value:g}"


def parse_slice(text: str) -> SliceSpec:
    """'qz=0', 'l=1', 'qx=-0.17' -> SliceSpec. Raises InputError for anything else."""
    m = _SLICE.match(text)
    if m is None:
        raise InputError(
            f"cannot read --slice {text!r}: write AXIS=VALUE with AXIS one of qx, qy, qz (Å⁻¹) or h, k, l "
            "(pseudo-cubic index), e.g. qz=0 or l=1."
        )
    name, value = m.group(1).lower(), float(m.group(2))
    if name in AXIS_NAMES:
        return SliceSpec(AXIS_NAMES.index(name), value, miller=False)
    return SliceSpec(MILLER_NAMES.index(name), value, miller=True)


def parse_hkl_text(text: str) -> tuple[int, int, int]:
    """'2,0,0' (also '200', '1-10', '2 0 0' as for `simulate --hkl`) -> (h, k, l); InputError otherwise."""
    if "," in text:
        parts = [p.strip() for p in text.split(",")]
        try:
            h, k, l = (int(p) for p in parts)
        except ValueError:
            raise InputError(f"cannot read --hkl {text!r}: write three integers like 2,0,0.") from None
        if h == k == l == 0:
            raise InputError("hkl 0,0,0 is the direct beam, not a reflection.")
        return h, k, l
    from jaxpolaron.reciprocal import parse_hkl

    return parse_hkl(text)


def _arg(parse):
    def convert(text: str):
        try:
            return parse(text)
        except InputError as exc:  # argparse would replace the message with a generic one
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def parse_vmax(text: str) -> dict[str, float]:
    """'1e4' (every panel) or 'dark=1e4,difference=30' -> {group or '*': vmax}."""
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        key, _, value = item.rpartition("=")
        key = key.strip().lower() or "*"
        if key not in ("*", "dark", "pump", "difference"):
            raise InputError(f"--vmax: unknown group {key!r} (dark, pump or difference).")
        try:
            v = float(value)
        except ValueError:
            raise InputError(f"--vmax: {value!r} is not a number.") from None
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"--vmax must be positive, got {value}.")
        out[key] = v
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show",
        help="summary and figure of a volume file: central slices, one slice, or a zoom on a Bragg peak",
        description="Print a summary of a jaxpolaron volume file (simulated or merged) and draw slices: by "
        "default the three central slices; --slice AXIS=VALUE for one slice (qx|qy|qz in 1/Å, |q| = 1/d, or "
        "h|k|l pseudo-cubic); --hkl H,K,L for a zoom on one Bragg peak. dark/pump on a log scale, the "
        "difference (pump - dark) with a diverging colour map (red = more intensity after pumping); voxels "
        "with zero merge weight are grey.",
    )
    p.add_argument("volumes", metavar="VOLUMES.h5", help="volume file (jaxpolaron simulate --out, jaxpolaron reduce)")
    p.add_argument("--volume", help="volume to draw (default: with --hkl the window of that peak, else the first "
                   "full grid, else the first volume)")  # fmt: skip
    p.add_argument("--group", choices=GROUP_CHOICES, help="data to draw (default: dark and difference, those present)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--slice", type=_arg(parse_slice), metavar="AXIS=VALUE",
                       help="one slice, AXIS = qx|qy|qz (1/Å) or h|k|l (pseudo-cubic), e.g. qz=0 or l=1")  # fmt: skip
    where.add_argument(
        "--hkl",
        type=_arg(parse_hkl_text),
        metavar="H,K,L",
        help="zoom on this Bragg peak, e.g. 2,0,0 (write --hkl=-2,0,0 when the first index is negative)",
    )
    p.add_argument("--zoom", type=_positive_float, metavar="HALF_WIDTH",
                   help="half width of the --hkl panel, 1/Å (default max(0.15 |G|, 4 voxels))")  # fmt: skip
    p.add_argument("--png", help="figure to write (PNG); without it only the summary is printed")
    p.add_argument("--powder-png", help="also draw the powder curves (Fig. 2b) stored in a merged file's statistics")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--log", dest="scale", action="store_const", const="log",
                       help="log scale (default for dark/pump); signed log for the difference")  # fmt: skip
    scale.add_argument("--linear", dest="scale", action="store_const", const="linear", help="linear colour scales")
    p.add_argument("--vmax", type=_arg(parse_vmax), metavar="V|GROUP=V,...",
                   help="upper colour limit (difference: ±V), one for every panel or per group, "
                   "e.g. dark=1e4,difference=50")  # fmt: skip
    p.add_argument("--decades", type=_positive_float, default=6.0, help="log-scale range below the maximum (6)")
    p.add_argument("--cif", help="structure for h|k|l (default: the file's config, else the bundled CsPbBr3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no log messages")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------- lattice
def _find_cif(config) -> str | None:
    """The first string value under a key 'cif' anywhere in the (nested) config."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "cif" and isinstance(value, str) and value:
                return value
        for value in config.values():
            found = _find_cif(value)
            if found:
                return found
    return None


def reciprocal_basis(config: dict | None = None, cif: str | None = None) -> tuple[np.ndarray, str]:
    """Pseudo-cubic reciprocal basis (3, 3), rows a*, b*, c* in the crystal frame (Å⁻¹): q = hkl @ basis.

    From `cif` if given (InputError if unreadable), else the CIF named in `config` (if it still exists), else
    the bundled CsPbBr3, else a cubic cell of 5.87 Å. Returns (basis, a sentence saying where it came from).
    """
    from jaxpolaron.structure import read_cif

    if cif is not None:
        s = read_cif(cif)
        return s.q_of_hkl(np.eye(3)), f"{s.source}, a_pc = {s.pseudo_cubic.a_pc:.4f} Å"
    note = ""
    path = _find_cif(config or {})
    if path is not None:
        if Path(path).is_file():
            try:
                s = read_cif(path)
                return s.q_of_hkl(np.eye(3)), f"{s.source} (from the file's config), a_pc = {s.pseudo_cubic.a_pc:.4f} Å"
            except InputError as exc:
                note = f" (config's CIF unusable: {exc})"
        else:
            note = f" (config's CIF {path} not found)"
    try:
        s = read_cif()
        return s.q_of_hkl(np.eye(3)), f"bundled {s.source}, a_pc = {s.pseudo_cubic.a_pc:.4f} Å{note}"
    except InputError:  # pragma: no cover - the bundled CIF always parses
        return np.eye(3) / FALLBACK_A, f"cubic a = {FALLBACK_A} Å{note}"


def miller_to_q(axis: int, value: float, basis: np.ndarray) -> float:
    """q along crystal-frame axis `axis` (Å⁻¹) of the plane `h|k|l = value` through the reciprocal-lattice
    point value · (a*|b*|c*): value · basis[axis, axis] (= value / a for a cubic cell)."""
    return float(value * np.asarray(basis)[axis, axis])


# ------------------------------------------------------------------------------------------- slices
def slice_index(axes, axis: int, value: float) -> int:
    """Index of the sample of q axis `axis` (0, 1, 2) nearest `value` (Å⁻¹). InputError if `value` lies more
    than half a voxel outside the axis."""
    q = np.asarray(axes[axis], float)
    half = 0.5 * float(np.min(np.abs(np.diff(q)))) if len(q) > 1 else 0.0
    lo, hi = float(q.min()), float(q.max())
    if not lo - half <= value <= hi + half:
        raise InputError(f"{AXIS_NAMES[axis]} = {value:+.4f} 1/Å is outside the grid ({lo:+.4f} … {hi:+.4f} 1/Å).")
    return int(np.argmin(np.abs(q - value)))


def central_index(q: np.ndarray) -> int:
    """The sample nearest q = 0 if 0 lies on the axis, else the middle sample (windows around a peak)."""
    q = np.asarray(q, float)
    if q.min() <= 0.0 <= q.max():
        return int(np.argmin(np.abs(q)))
    return len(q) // 2


def _in_range(axes, g: np.ndarray) -> bool:
    for a, x in zip(axes, g, strict=True):
        a = np.asarray(a, float)
        half = 0.5 * float(np.min(np.abs(np.diff(a)))) if len(a) > 1 else 0.0
        if not a.min() - half <= x <= a.max() + half:
            return False
    return True


def _voxel(a) -> float:
    a = np.asarray(a, float)
    return float(np.median(np.abs(np.diff(a)))) if len(a) > 1 else 0.0


def _fmt_hkl(hkl) -> str:
    return ",".join(str(int(i)) for i in hkl)


# ------------------------------------------------------------------------------------------- selection
def choose_volume(vf, name: str | None, hkl: tuple[int, int, int] | None):
    """The volume to draw (see the --volume help)."""
    volumes = vf.volumes
    if name is not None:
        if name not in volumes:
            raise InputError(f"no volume {name!r} in the file; it has: {', '.join(volumes)}.")
        return volumes[name]
    if hkl is not None:
        for v in volumes.values():
            if v.hkl is not None and tuple(v.hkl) == tuple(hkl):
                return v
    grids = [v for v in volumes.values() if v.hkl is None]
    if hkl is not None and not grids:
        raise InputError(
            f"no window for hkl {_fmt_hkl(hkl)} and no full grid in the file; it has: {', '.join(volumes)}."
        )
    return grids[0] if grids else next(iter(volumes.values()))


def choose_groups(volume, group: str | None) -> list[str]:
    present = list(volume.groups)
    if group == "all":
        return present
    if group is not None:
        if group not in present:
            raise InputError(f"volume {volume.name!r} has no {group} group (it has: {', '.join(present)}).")
        return [group]
    shown = [g for g in ("dark", "difference") if g in present]
    return shown or present


def group_weight(volume, group: str) -> np.ndarray | None:
    """Merge weight of `group`; for the difference, the smaller of the dark and pump weights."""
    w = volume.weight or {}
    if group in w:
        return w[group]
    if group == "difference" and w:
        ws = [np.asarray(w[g]) for g in ("dark", "pump") if g in w]
        return np.minimum(*ws) if len(ws) == 2 else ws[0]
    return None


# ------------------------------------------------------------------------------------------- summary
def _scalar(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        if len(v) <= 4 and all(isinstance(x, int | float | None) for x in v):
            return "[" + ", ".join(_scalar(x) for x in v) + "]"
        return f"[{len(v)} values]"
    if isinstance(v, dict):
        return f"{{{len(v)} entries}}"
    return str(v)


def _short(v) -> bool:
    return not isinstance(v, dict | list) or (isinstance(v, list) and len(v) <= 4)


def _table(d: dict[str, dict], indent: str) -> list[str]:
    outer = list(d)
    inner: list[str] = []
    for sub in d.values():
        inner += [k for k in sub if k not in inner]
    if len(outer) <= 6:  # outer keys as columns
        header, rows = ["", *outer], [[k, *[_scalar(d[o].get(k)) for o in outer]] for k in inner]
    else:
        header, rows = ["", *inner], [[o, *[_scalar(d[o].get(k)) for k in inner]] for o in outer]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return indent + "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return [line(r) for r in [header, *rows]]


def format_statistics(stats: dict, indent: str = "  ", depth: int = 0) -> list[str]:
    """The statistics dict of a volume file as text: scalars inline, dicts of flat dicts as aligned tables
    (e.g. Table S1, the per-class merge table, the per-peak table), long lists as their length."""
    lines: list[str] = []
    for key, v in stats.items():
        if (
            isinstance(v, dict)
            and v
            and all(isinstance(s, dict) and all(_short(x) for x in s.values()) for s in v.values())
        ):
            lines.append(f"{indent}{key}:")
            lines += _table(v, indent + "  ")
        elif isinstance(v, dict) and v and all(isinstance(x, list) and not _short(x) for x in v.values()):
            sizes = sorted({len(x) for x in v.values()})
            lengths = f"{sizes[0]} values" if len(sizes) == 1 else f"{sizes[0]}…{sizes[-1]} values"
            lines.append(f"{indent}{key}: {len(v)} curves of {lengths} ({', '.join(v)})")
        elif isinstance(v, dict) and v and depth < 2:
            lines.append(f"{indent}{key}:")
            lines += format_statistics(v, indent + "  ", depth + 1)
        else:
            lines.append(f"{indent}{key}: {_scalar(v)}")
    return lines


def summary(path: Path, vf) -> str:
    """Volumes, groups, shapes, q ranges, voxel sizes and the statistics table of a read volume file."""
    lines = [f"{path}: {len(vf.volumes)} volume(s)"]
    for v in vf.volumes.values():
        kind = f"window around hkl {_fmt_hkl(v.hkl)}" if v.hkl is not None else "full grid"
        lines.append(f"  {v.name}: {kind}, shape {'×'.join(map(str, v.shape))}, units {v.units}")
        lines.append(
            f"    groups: {', '.join(v.groups)}" + (f"; merge weights: {', '.join(v.weight)}" if v.weight else "")
        )
        for label, a in zip(AXIS_NAMES, v.axes, strict=True):
            a = np.asarray(a, float)
            lines.append(f"    {label}: {a.min():+.4f} … {a.max():+.4f} 1/Å, voxel {_voxel(a):.4g} 1/Å")
        for g in v.groups:
            data = np.asarray(getattr(v, g), float)
            w = group_weight(v, g)
            ok = np.isfinite(data) & (True if w is None else np.asarray(w) > 0)
            vals = data[ok]
            text = f"min {vals.min():.4g}, max {vals.max():.4g}, sum {vals.sum():.4g}" if vals.size else "no data"
            if w is not None:
                text += f"; {1.0 - ok.mean():.1%} of voxels without data"
            lines.append(f"    {g}: {text}")
    if vf.statistics:
        lines.append("statistics:")
        lines += format_statistics(vf.statistics, "  ")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- figure
def build_panels(volume, groups, args, basis) -> tuple[list[list], list[str]]:
    """Panels (rows of `plotting.SlicePanel`) for the figure, and lines saying which slices were chosen."""
    from jaxpolaron.plotting import SlicePanel

    vmax = args.vmax or {}
    notes: list[str] = []

    def style(group: str, zoomed: bool) -> dict:
        diverging = group == "difference"
        if args.scale == "linear":
            log = False
        elif args.scale == "log":
            log = True
        else:
            log = not (diverging and zoomed)
        return dict(diverging=diverging, log=log, vmax=vmax.get(group, vmax.get("*")), units=volume.units,
                    weight=group_weight(volume, group), floor_decades=args.decades)  # fmt: skip

    axes = volume.axes
    names = ("q_x", "q_y", "q_z")
    if args.hkl is not None:
        g = np.asarray(args.hkl, float) @ basis
        if not _in_range(axes, g):
            raise InputError(
                f"hkl {_fmt_hkl(args.hkl)} (q = {g[0]:+.4f}, {g[1]:+.4f}, {g[2]:+.4f} 1/Å) is outside volume "
                f"{volume.name!r}."
            )
        normal = int(np.argmin(np.abs(g)))
        index = slice_index(axes, normal, float(g[normal]))
        a, b = (i for i in range(3) if i != normal)
        half = args.zoom or max(0.15 * float(np.linalg.norm(g)), 4 * max(_voxel(axes[a]), _voxel(axes[b])))
        window = ((g[a] - half, g[a] + half), (g[b] - half, g[b] + half))
        q_used = float(axes[normal][index])
        where = f"({_fmt_hkl(args.hkl)}), {names[normal]} = {q_used:+.4f} Å⁻¹"
        notes.append(
            f"hkl {_fmt_hkl(args.hkl)}: G = ({g[0]:+.4f}, {g[1]:+.4f}, {g[2]:+.4f}) 1/Å; slice normal to "
            f"{AXIS_NAMES[normal]} at sample {index}, {AXIS_NAMES[normal]} = {q_used:+.4f} 1/Å "
            f"(G has {g[normal]:+.4f}); zoom ±{half:.4f} 1/Å"
        )
        row = [
            SlicePanel(axes, getattr(volume, grp), normal, index, title=f"{_title(grp)} {where}", window=window,
                       arrow_from=(g[a], g[b]) if grp == "difference" else None, **style(grp, zoomed=True))
            for grp in groups
        ]  # fmt: skip
        return [row], notes
    if args.slice is not None:
        spec = args.slice
        q = miller_to_q(spec.axis, spec.value, basis) if spec.miller else spec.value
        index = slice_index(axes, spec.axis, q)
        q_used = float(axes[spec.axis][index])
        requested = f" ({AXIS_NAMES[spec.axis]} = {q:+.4f} 1/Å)" if spec.miller else ""
        notes.append(f"slice {spec.label}{requested}: sample {index}, {AXIS_NAMES[spec.axis]} = {q_used:+.4f} 1/Å")
        label = f"{spec.label}: " if spec.miller else ""
        where = f"{label}{names[spec.axis]} = {q_used:+.4f} Å⁻¹"
        row = [SlicePanel(axes, getattr(volume, grp), spec.axis, index, title=f"{_title(grp)} {where}",
                          **style(grp, zoomed=False)) for grp in groups]  # fmt: skip
        return [row], notes
    indices = [central_index(a) for a in axes]
    notes.append(
        "central slices: "
        + ", ".join(f"{AXIS_NAMES[j]} = {float(axes[j][i]):+.4f} 1/Å (sample {i})" for j, i in enumerate(indices))
    )
    rows = [
        [SlicePanel(axes, getattr(volume, grp), j, indices[j], title=f"{_title(grp)}: {names[j]} = "
                    f"{float(axes[j][indices[j]]):+.4f} Å⁻¹", **style(grp, zoomed=False)) for j in range(3)]
        for grp in groups
    ]  # fmt: skip
    return rows, notes


def _title(group: str) -> str:
    return {"difference": "ΔI = pump − dark", "pump": "pumped"}.get(group, group)


def powder_from_statistics(stats: dict | None):
    """(q (n,), {name: (2, n) dark/pumped}) from a merged file's statistics['powder'], or None."""
    powder = (stats or {}).get("powder")
    keys = ("q", "virtual_dark", "virtual_pumped", "azimuthal_dark", "azimuthal_pumped")
    if not isinstance(powder, dict) or not all(isinstance(powder.get(k), list) for k in keys):
        return None

    def arr(k):
        return np.array([np.nan if x is None else x for x in powder[k]], float)

    q = arr("q")
    curves = {
        "virtual powder": np.stack([arr("virtual_dark"), arr("virtual_pumped")]),
        "azimuthal average": np.stack([arr("azimuthal_dark"), arr("azimuthal_pumped")]),
    }
    return q, curves


def run(args) -> int:
    from jaxpolaron import io, plotting

    path = Path(args.volumes)
    png = io.check_writable(args.png) if args.png else None
    powder_png = io.check_writable(args.powder_png) if args.powder_png else None
    if args.zoom is not None and args.hkl is None:
        raise InputError("--zoom needs --hkl.")
    vf = io.read_volume_file(path)
    volume = choose_volume(vf, args.volume, args.hkl)
    groups = choose_groups(volume, args.group)
    needs_lattice = args.hkl is not None or (args.slice is not None and args.slice.miller)
    basis, lattice_note = reciprocal_basis(vf.config, args.cif) if needs_lattice else (None, "")
    rows, notes = build_panels(volume, groups, args, basis)
    powder = powder_from_statistics(vf.statistics) if powder_png is not None else None
    if powder_png is not None and powder is None:
        raise InputError(f"{path} has no powder curves in its statistics (only `jaxpolaron reduce` files do).")

    print(summary(path, vf))
    if lattice_note:
        print(f"lattice: {lattice_note}")
    if png is not None:
        title = f"{path.name}: {volume.name}"
        plotting.plot_slice_grid(rows, png, title=title)
        for note in notes:
            print(note)
        print(f"wrote {png} ({volume.name}: {', '.join(groups)})")
    if powder is not None and powder_png is not None:
        plotting.plot_powder(powder[0], powder[1], powder_png, title=path.name)
        print(f"wrote {powder_png} (powder curves)")
    return 0
