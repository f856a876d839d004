"""Figures: central slices of a full volume (like the paper's Fig. 2c), slices through peak windows, generic
slice panels (`SlicePanel`, `plot_slice`, `plot_slice_grid`; used by `jaxpolaron show`), the powder curves
(Fig. 2b) and per-crystal scaling diagnostics.

matplotlib is imported inside the functions (headless Agg backend), so importing jaxpolaron stays light.
All inputs are host arrays; q axes in Å⁻¹ (crystal frame).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_image(ax, image: np.ndarray, extent, title: str, fig, floor_decades: float = 6.0):
    from matplotlib.colors import LogNorm

    positive = image[image > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = vmax * 10.0 ** (-floor_decades)
    im = ax.imshow(np.clip(image, vmin, None).T, origin="lower", extent=extent, norm=LogNorm(vmin, vmax), cmap="magma")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="I (e²)")


def _diff_image(ax, image: np.ndarray, extent, title: str, fig, *, symlog: bool = False):
    from matplotlib.colors import SymLogNorm

    lim = float(np.abs(image).max()) or 1.0
    # ΔI over a whole slice spans decades (strong peaks vs weak ones): a signed log scale shows them all
    norm = SymLogNorm(linthresh=1e-3 * lim, vmin=-lim, vmax=lim) if symlog else None
    limits = {} if symlog else {"vmin": -lim, "vmax": lim}
    im = ax.imshow(image.T, origin="lower", extent=extent, cmap="RdBu_r", norm=norm, **limits)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="ΔI (e²)")


def plot_central_slices(
    axes: Sequence[np.ndarray],
    volume: np.ndarray,
    path: str | Path,
    *,
    title: str = "dark",
    difference: np.ndarray | None = None,
) -> Path:
    """Three central slices (normal to q_x, q_y, q_z) of a full-grid volume on a log scale (Fig. 2c);
    with a non-zero `difference`, a second row shows ΔI on a signed log scale (Fig. 3a)."""
    plt = _pyplot()
    qx, qy, qz = (np.asarray(a) for a in axes)
    ix, iy, iz = (int(np.argmin(np.abs(a))) for a in (qx, qy, qz))
    show_diff = difference is not None and bool(np.any(difference != 0))
    fig, axs = plt.subplots(2 if show_diff else 1, 3, figsize=(13, 8.4 if show_diff else 4.2), squeeze=False)
    fig.set_layout_engine("constrained")
    panels = [
        (volume[ix], (qy, qz), ("q_y", "q_z"), f"{title}: q_x = {qx[ix]:+.3f}"),
        (volume[:, iy], (qx, qz), ("q_x", "q_z"), f"{title}: q_y = {qy[iy]:+.3f}"),
        (volume[:, :, iz], (qx, qy), ("q_x", "q_y"), f"{title}: q_z = {qz[iz]:+.3f}"),
    ]
    for j, ((img, (a, b), (la, lb), ttl), cut) in enumerate(zip(panels, (ix, iy, iz), strict=True)):
        extent = [a[0], a[-1], b[0], b[-1]]
        _log_image(axs[0, j], np.asarray(img), extent, ttl + " Å⁻¹", fig)
        if show_diff and difference is not None:
            label = "ΔI" + ttl.removeprefix(title)
            diff_slice = np.take(np.asarray(difference), cut, axis=j)
            _diff_image(axs[1, j], diff_slice, extent, label + " Å⁻¹", fig, symlog=True)
        for row in axs[:, j]:
            row.set_xlabel(f"{la} (Å⁻¹)")
            row.set_ylabel(f"{lb} (Å⁻¹)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _in_plane_axis(g: np.ndarray) -> int:
    """Index of the axis to slice *normal* to so that G lies (as nearly as possible) in the slice plane."""
    return int(np.argmin(np.abs(g)))


def plot_windows(
    windows: Sequence[tuple[str, Sequence[np.ndarray], np.ndarray]],
    dark: Sequence[np.ndarray],
    difference: Sequence[np.ndarray] | None,
    path: str | Path,
) -> Path:
    """One column per peak: dark slice (log) and, when given and non-zero, ΔI slice through G.

    Args:
        windows: (label, (qx, qy, qz), G) per window; axes in Å⁻¹.
        dark: (nx, ny, nz) per window.
        difference: ΔI per window or None.
        path: PNG path.
    """
    plt = _pyplot()
    show_diff = difference is not None and any(np.any(d != 0) for d in difference)
    rows = 2 if show_diff else 1
    n = len(windows)
    fig, axs = plt.subplots(rows, n, figsize=(3.6 * n, 3.3 * rows), constrained_layout=True, squeeze=False)
    names = ("q_x", "q_y", "q_z")
    for j, (label, axes, g) in enumerate(windows):
        normal = _in_plane_axis(np.asarray(g))
        a, b = (i for i in range(3) if i != normal)
        centre = len(axes[normal]) // 2
        ext = [axes[a][0], axes[a][-1], axes[b][0], axes[b][-1]]

        title = f"({label}) {names[normal]} = {axes[normal][centre]:+.3f} Å⁻¹"
        _log_image(axs[0, j], np.take(np.asarray(dark[j]), centre, axis=normal), ext, "dark " + title, fig)
        if show_diff and difference is not None:
            _diff_image(axs[1, j], np.take(np.asarray(difference[j]), centre, axis=normal), ext, "ΔI " + title, fig)
            # arrow from G towards q = 0 marks "inward"
            ga, gb = float(g[a]), float(g[b])
            norm = np.hypot(ga, gb) or 1.0
            span = 0.3 * (ext[1] - ext[0])
            axs[1, j].annotate(
                "",
                xy=(ga - span * ga / norm, gb - span * gb / norm),
                xytext=(ga, gb),
                arrowprops={"arrowstyle": "->", "color": "k"},
            )
        for r in range(rows):
            axs[r, j].set_xlabel(f"{names[a]} (Å⁻¹)")
            axs[r, j].set_ylabel(f"{names[b]} (Å⁻¹)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_powder(q: np.ndarray, curves: dict[str, np.ndarray], path: str | Path, *, title: str = "") -> Path:
    """One panel per curve family vs |q| (Å⁻¹), dark and pumped overlaid (the paper's Fig. 2b: the virtual
    powder of integrated peak intensities and the azimuthal average of whole frames).

    curves: name -> (2, n) array (dark, pumped) on the bin centres q (n,); NaN where undefined."""
    plt = _pyplot()
    fig, axs = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    fig.set_layout_engine("constrained")
    for ax, (name, c) in zip(axs[0], curves.items(), strict=True):
        for row, label, colour in ((0, "dark", "tab:blue"), (1, "pumped", "tab:red")):
            ax.plot(q, np.asarray(c)[row], label=label, color=colour, lw=1.0, alpha=0.85)
        ax.set_xlabel("|q| = 1/d (Å⁻¹)")
        ax.set_ylabel("photons per hit" if "virtual" in name else "photons per pixel")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(scale: np.ndarray, similarity: np.ndarray, accepted: np.ndarray, path: str | Path, *,
                 threshold: float | None = None, truth: np.ndarray | None = None) -> Path:  # fmt: skip
    """Per-crystal diagnostics of scaling and rejection: the similarity histogram (accepted vs rejected, with
    the threshold) and the scale factors (vs a true per-crystal factor on log axes when `truth` is given)."""
    plt = _pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.8))
    fig.set_layout_engine("constrained")
    sim = np.asarray(similarity, float)
    acc = np.asarray(accepted, bool)
    bins = np.linspace(-1, 1, 81)
    axs[0].hist(sim[acc & np.isfinite(sim)], bins=bins, color="tab:blue", label=f"merged ({acc.sum()})")
    axs[0].hist(sim[~acc & np.isfinite(sim)], bins=bins, color="tab:red", label=f"rejected ({(~acc).sum()})")
    if threshold is not None:
        axs[0].axvline(threshold, color="k", ls="--", lw=1)
    axs[0].set_xlabel("similarity to the reference (cosine)")
    axs[0].set_ylabel("crystals")
    axs[0].legend(fontsize=8)
    s = np.asarray(scale, float)
    ok = acc & np.isfinite(s) & (s > 0)
    if truth is None:
        axs[1].hist(np.log10(s[ok]), bins=60, color="tab:blue")
        axs[1].set_xlabel("log10 scale factor")
        axs[1].set_ylabel("crystals")
    else:
        t = np.asarray(truth, float)
        ok &= np.isfinite(t) & (t > 0)
        r = np.corrcoef(np.log(s[ok]), np.log(t[ok]))[0, 1] if ok.sum() > 2 else np.nan
        axs[1].loglog(t[ok], s[ok], ".", ms=2)
        axs[1].set_xlabel("true factor")
        axs[1].set_ylabel("scale factor")
        axs[1].set_title(f"Pearson r (log) = {r:.3f}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ generic slices
_Q_LABELS = ("q_x", "q_y", "q_z")
_MASKED_GREY = "0.6"  # colour of voxels without data (zero merge weight, NaN)


def _units_label(units: str) -> str:
    return {"electrons^2": "e²", "counts": "counts"}.get(units, units)


@dataclasses.dataclass(frozen=True, eq=False)
class SlicePanel:
    """One 2D panel: the slice of a volume normal to q axis `axis` at sample `index`.

    Attributes:
        axes: (qx (nx,), qy (ny,), qz (nz,)) sample positions, Å⁻¹ (crystal frame).
        data: (nx, ny, nz) intensities (or ΔI when `diverging`), in `units`.
        axis: 0, 1 or 2: the slice is normal to q_x, q_y or q_z.
        index: sample along `axis`.
        title: panel title.
        diverging: ΔI style: 'RdBu_r' with symmetric limits ±vmax (red = more intensity after pumping).
        weight: optional (nx, ny, nz) merge weights; voxels with weight <= 0 (and NaN voxels) are drawn grey.
        log: intensities on a log scale floored `floor_decades` below the maximum; for `diverging`, a signed
            log scale (linear within 1e-3 of the limit) — ΔI over a whole slice spans decades.
        vmax: upper colour limit (diverging: ±vmax); default the largest value in the shown region.
        window: ((a_lo, a_hi), (b_lo, b_hi)) in-plane limits in Å⁻¹ to zoom on (the two remaining axes in
            order); colour limits are taken from that region only.
        units: intensity units for the colour-bar label ("electrons^2", "counts").
        floor_decades: decades below vmax where a log scale starts.
        arrow_from: optional in-plane point (a, b), Å⁻¹ (e.g. a Bragg peak): an arrow from it towards q = 0
            marks "inward".
    """

    axes: Sequence[np.ndarray]
    data: np.ndarray
    axis: int
    index: int
    title: str = ""
    diverging: bool = False
    weight: np.ndarray | None = None
    log: bool = True
    vmax: float | None = None
    window: tuple[tuple[float, float], tuple[float, float]] | None = None
    units: str = "electrons^2"
    floor_decades: float = 6.0
    arrow_from: tuple[float, float] | None = None

    def __post_init__(self):
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}.")
        shape = tuple(len(a) for a in self.axes)
        if np.shape(self.data) != shape or (self.weight is not None and np.shape(self.weight) != shape):
            raise ValueError(f"data/weight must have the axes' shape {shape}.")
        if not 0 <= self.index < shape[self.axis]:
            raise ValueError(f"index {self.index} outside 0..{shape[self.axis] - 1}.")


def _crop(q: np.ndarray, limits: tuple[float, float] | None) -> slice:
    """Index range of the samples of sorted-ascending `q` within `limits` (at least two samples)."""
    if limits is None:
        return slice(0, len(q))
    lo = int(np.searchsorted(q, min(limits), side="left"))
    hi = int(np.searchsorted(q, max(limits), side="right"))
    if hi - lo < 2:  # narrower than a voxel: the two samples nearest the centre
        centre = int(np.argmin(np.abs(q - 0.5 * (limits[0] + limits[1]))))
        lo = max(0, min(centre, len(q) - 2))
        hi = lo + 2
    return slice(lo, hi)


def _edges_extent(a: np.ndarray, b: np.ndarray) -> list[float]:
    """imshow extent whose pixels are centred on the samples."""

    def half(x):
        return 0.5 * (x[1] - x[0]) if len(x) > 1 else 0.5

    return [a[0] - half(a), a[-1] + half(a), b[0] - half(b), b[-1] + half(b)]


def draw_slice(ax, panel: SlicePanel, fig=None):
    """Draw `panel` into the matplotlib Axes `ax` (with a colour bar on `fig`, default ax's figure).
    Returns the image. Masked voxels (weight <= 0, NaN) are grey, never drawn as zeros."""
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize, SymLogNorm

    fig = ax.figure if fig is None else fig
    a_ax, b_ax = (i for i in range(3) if i != panel.axis)
    qa, qb = (np.asarray(panel.axes[i], float) for i in (a_ax, b_ax))
    img = np.take(np.asarray(panel.data, float), panel.index, axis=panel.axis)
    bad = ~np.isfinite(img)
    if panel.weight is not None:
        bad |= ~(np.take(np.asarray(panel.weight, float), panel.index, axis=panel.axis) > 0)
    sa = _crop(qa, panel.window[0] if panel.window else None)
    sb = _crop(qb, panel.window[1] if panel.window else None)
    qa, qb, img, bad = qa[sa], qb[sb], img[sa, sb], bad[sa, sb]
    good = img[~bad]
    if panel.diverging:
        lim = panel.vmax or (float(np.abs(good).max()) if good.size else 0.0) or 1.0
        norm = SymLogNorm(linthresh=1e-3 * lim, vmin=-lim, vmax=lim) if panel.log else Normalize(-lim, lim)
        cmap_name, label = "RdBu_r", "ΔI"
    elif panel.log:
        positive = good[good > 0]
        top = panel.vmax or (float(positive.max()) if positive.size else 1.0)
        bottom = top * 10.0 ** (-panel.floor_decades)
        img = np.clip(img, bottom, None)
        norm, cmap_name, label = LogNorm(bottom, top), "magma", "I"
    else:
        top = panel.vmax or (float(good.max()) if good.size else 1.0)
        bottom = min(0.0, float(good.min())) if good.size else 0.0
        norm, cmap_name, label = Normalize(bottom, top if top > bottom else bottom + 1.0), "magma", "I"
    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad=_MASKED_GREY)
    shown = np.ma.masked_array(np.where(bad, 0.0, img), mask=bad)
    im = ax.imshow(shown.T, origin="lower", extent=_edges_extent(qa, qb), norm=norm, cmap=cmap,
                   interpolation="nearest", aspect="equal")  # fmt: skip
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(f"{_Q_LABELS[a_ax]} (Å⁻¹)")
    ax.set_ylabel(f"{_Q_LABELS[b_ax]} (Å⁻¹)")
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"{label} ({_units_label(panel.units)})")
    if panel.arrow_from is not None:
        ga, gb = (float(x) for x in panel.arrow_from)
        length = np.hypot(ga, gb)
        if length > 0:
            span = min(0.3 * (qa[-1] - qa[0]), 0.5 * length)
            ax.annotate("", xy=(ga - span * ga / length, gb - span * gb / length), xytext=(ga, gb),
                        arrowprops={"arrowstyle": "->", "color": "k"})  # fmt: skip
    return im


def plot_slice_grid(panels: Sequence[Sequence[SlicePanel | None]], path: str | Path, *, title: str = "") -> Path:
    """A figure of rows × columns slice panels (None leaves a cell empty); writes the PNG `path`."""
    plt = _pyplot()
    rows = len(panels)
    cols = max((len(r) for r in panels), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("no panels to draw.")
    fig, axs = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows), squeeze=False)
    fig.set_layout_engine("constrained")
    try:
        for i, row in enumerate(panels):
            for j in range(cols):
                panel = row[j] if j < len(row) else None
                if panel is None:
                    axs[i, j].set_axis_off()
                else:
                    draw_slice(axs[i, j], panel, fig)
        if title:
            fig.suptitle(title, fontsize=10)
        path = Path(path)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_slice(
    axes: Sequence[np.ndarray],
    data: np.ndarray,
    axis: int,
    index: int,
    path: str | Path,
    *,
    title: str = "",
    diverging: bool = False,
    weight: np.ndarray | None = None,
    log: bool = True,
    vmax: float | None = None,
    window: tuple[tuple[float, float], tuple[float, float]] | None = None,
    units: str = "electrons^2",
) -> Path:
    """One slice of a (nx, ny, nz) volume on q axes `axes` (Å⁻¹), normal to q axis `axis` (0, 1, 2) at sample
    `index`, as a single-panel PNG. See `SlicePanel` for the keywords (grey = zero weight / no data)."""
    panel = SlicePanel(axes, data, axis, index, title=title, diverging=diverging, weight=weight, log=log,
                       vmax=vmax, window=window, units=units)  # fmt: skip
    return plot_slice_grid([[panel]], path)


# ------------------------------------------------------------------------------------------ fit diagnostics
def _save(plt, fig, path: str | Path) -> Path:
    """Write `fig` to `path` (parents created) at 110 dpi, close it whatever happens, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_loss_curve(records: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Loss vs optimiser step, one line per multi-start, the best start (lowest loss reached) highlighted;
    a second, smaller panel shows the gradient norm when the records have one.

    records: metric dicts as logged by `fitting.runlog.RunLog.log_step`: "loss" (required to be drawn),
        "step" (default: running index), "start" (multi-start index, default 0), optional "grad_norm".
    Log y axes where all values are positive (a fit's loss usually is), linear otherwise. Writes the PNG
    `path` (parents created) and returns it."""
    plt = _pyplot()
    starts: dict[int, dict[str, list[float]]] = {}
    for i, r in enumerate(records):
        if "loss" not in r:
            continue
        s = starts.setdefault(int(r.get("start", 0)), {"step": [], "loss": [], "grad_norm": []})
        s["step"].append(float(r.get("step", i)))
        s["loss"].append(float(r["loss"]))
        s["grad_norm"].append(float(r.get("grad_norm", np.nan)))
    if not starts:
        raise ValueError("no records with a 'loss' to plot.")

    def lowest(k: int) -> float:  # lowest finite loss a start reached (a diverged start has none)
        loss = np.asarray(starts[k]["loss"])
        return float(loss[np.isfinite(loss)].min(initial=np.inf))

    best = min(starts, key=lowest)
    keys = [k for k in ("loss", "grad_norm") if any(np.isfinite(v[k]).any() for v in starts.values())]
    fig, axs = plt.subplots(len(keys), 1, figsize=(6.4, 3.6 + 1.6 * (len(keys) - 1)), sharex=True, squeeze=False,
                            gridspec_kw={"height_ratios": [3, 1.3][: len(keys)]})  # fmt: skip
    fig.set_layout_engine("constrained")
    for ax, key in zip(axs[:, 0], keys, strict=True):
        others_labelled = False
        for k, s in sorted(starts.items()):
            if k == best:
                ax.plot(s["step"], s[key], color="tab:red", lw=1.8, zorder=3, label=f"start {k} (best)")
            else:  # the other starts as thin grey context, labelled once
                ax.plot(s["step"], s[key], color="0.55", lw=0.8, alpha=0.7,
                        label=None if others_labelled else "other starts")  # fmt: skip
                others_labelled = True
        values = np.concatenate([np.asarray(s[key]) for s in starts.values()])
        values = values[np.isfinite(values)]
        if values.size and (values > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel("loss" if key == "loss" else "|∇ loss|")
    axs[0, 0].legend(fontsize=8)
    axs[-1, 0].set_xlabel("step")
    if title:
        axs[0, 0].set_title(title, fontsize=10)
    return _save(plt, fig, path)


def plot_profile(
    name: str,
    values: np.ndarray,
    chi2: np.ndarray,
    unit: float,
    path: str | Path,
    *,
    intervals: dict[str, tuple[float, float]] | None = None,
    title: str = "",
) -> Path:
    """Δχ² along one parameter (a `fitting.uncertainty.Profile`): points and line, the 1σ and 2σ levels
    (Δχ² = unit and 4·unit) dashed, and the intervals shaded. Log x axis when the scan spans > 2 decades of a
    positive parameter. Writes the PNG `path` and returns it."""
    plt = _pyplot()
    values, delta = np.asarray(values, float), np.asarray(chi2, float) - np.min(chi2)
    fig, ax = plt.subplots(figsize=(5.6, 3.6), layout="constrained")
    ax.plot(values, delta, "o-", color="tab:blue", ms=3.5, lw=1.2)
    for n, colour in ((1, "tab:green"), (2, "tab:orange")):
        ax.axhline(n * n * unit, color=colour, ls="--", lw=0.9, label=f"{n}σ: Δχ² = {n * n * unit:.3g}")
    lo_x, hi_x = values.min(), values.max()
    for label, (lo, hi) in sorted((intervals or {}).items(), reverse=True):  # the wider 2σ first, 1σ over it
        lo, hi = (lo_x if not np.isfinite(lo) else lo), (hi_x if not np.isfinite(hi) else hi)
        ax.axvspan(lo, hi, color="0.85" if label.startswith("2") else "0.7", zorder=0, label=f"{label} interval")
    if (values > 0).all() and hi_x / lo_x > 100:
        ax.set_xscale("log")
    ax.set_ylim(0, max(6.0 * unit, float(delta[delta <= 8 * unit].max(initial=0.0)) * 1.1))
    ax.set_xlabel(name)
    ax.set_ylabel("Δχ² (others re-fitted)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def _slice_axes(g: np.ndarray) -> tuple[int, int, int]:
    """(main, perpendicular, normal) axis indices for a slice through a window at q = G: `main` is G's
    largest component, `perpendicular` the larger of the other two, `normal` the one sliced across — so G
    lies as nearly as possible in the plane, also for (111) where `_in_plane_axis` would cut across G's main axis."""
    g = np.abs(np.asarray(g, float))
    main = int(np.argmax(g))
    rest = [i for i in range(3) if i != main]
    normal = rest[int(np.argmin(g[rest]))]
    perpendicular = next(i for i in rest if i != normal)
    return main, perpendicular, normal


def plot_peak_comparison(
    hkls: Sequence[Sequence[int]],
    centres: np.ndarray,
    voxel: float,
    measured: np.ndarray,
    fitted: np.ndarray,
    path: str | Path,
    *,
    units: str = "counts",
    title: str = "",
) -> Path:
    """Measured vs fitted ΔI through up to four peak windows (like the paper's Fig. 3b vs Fig. 5c).

    A 2 × n grid: rows measured / fitted, one column per peak (the first four). Each panel is the central
    slice (index m // 2) of the window, in the plane of G's main axis (horizontal) and one perpendicular axis;
    axes are q − window centre in Å⁻¹. One diverging, zero-centred colour scale per column, shared by
    measured and fitted: ±(99.5th percentile of |ΔI| over both slices), so a few hot voxels do not wash out
    the pattern. NaN voxels (no data) are grey.

    Args:
        hkls: (n,) pseudo-cubic (h, k, l), for the column titles.
        centres: (n, 3) window-centre q, Å⁻¹ (crystal frame); sets G's direction.
        voxel: window voxel, Å⁻¹ (sample i sits at centre + voxel (i − m // 2)).
        measured, fitted: (n, m, m, m) ΔI in `units`.
        path: PNG path (parents created); returned.
    """
    import matplotlib

    plt = _pyplot()
    centres = np.asarray(centres, float).reshape(-1, 3)
    measured, fitted = np.asarray(measured, float), np.asarray(fitted, float)
    if measured.shape != fitted.shape or measured.ndim != 4 or not len(measured) == len(centres) == len(hkls):
        raise ValueError(f"need measured, fitted (n, m, m, m) and n centres/hkls; got {measured.shape}, "
                         f"{fitted.shape}, {centres.shape}, {len(hkls)} hkls.")  # fmt: skip
    n = min(len(hkls), 4)
    if n == 0:
        raise ValueError("no peaks to plot.")
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=_MASKED_GREY)
    fig, axs = plt.subplots(2, n, figsize=(3.6 * n + 0.8, 6.4), squeeze=False)
    fig.set_layout_engine("constrained")
    try:
        for j in range(n):
            main, perp, normal = _slice_axes(centres[j])
            images = []
            for volume in (measured[j], fitted[j]):
                m = volume.shape[normal]
                # (main, perp) slice through the centre sample; imshow wants rows = vertical axis, hence .T
                images.append(np.transpose(volume, (main, perp, normal))[:, :, m // 2])
            both = np.abs(np.concatenate([im.ravel() for im in images]))
            both = both[np.isfinite(both)]
            vmax = float(np.percentile(both, 99.5)) if both.size else 0.0
            vmax = vmax or 1.0
            qa, qb = ((np.arange(images[0].shape[i]) - images[0].shape[i] // 2) * voxel for i in (0, 1))
            extent = _edges_extent(qa, qb)
            for i, (image, row) in enumerate(zip(images, ("measured ΔI", "fitted ΔI"), strict=True)):
                ax = axs[i, j]
                im = ax.imshow(np.ma.masked_invalid(image).T, origin="lower", extent=extent, cmap=cmap,
                               vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="equal")  # fmt: skip
                ax.set_xlabel(f"Δ{_Q_LABELS[main]} (Å⁻¹)")
                ax.set_ylabel(f"{row}\nΔ{_Q_LABELS[perp]} (Å⁻¹)" if j == 0 else f"Δ{_Q_LABELS[perp]} (Å⁻¹)")
            h, k, l = (int(x) for x in hkls[j])
            axs[0, j].set_title(f"({h} {k} {l})", fontsize=10)
            fig.colorbar(im, ax=axs[:, j], shrink=0.8, label=f"ΔI ({_units_label(units)})")
        if title:
            fig.suptitle(title, fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
