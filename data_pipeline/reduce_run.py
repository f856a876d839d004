"""`jaxpolaron reduce`: a run -> dark, pumped and difference volumes (the paper's "3D intensity generation").

Stages (each a map over units of frames -> an ordered reduce, `data_pipeline.scaleout`, checkpointed):
  0. index   find peaks, index and refine (`data_pipeline.index_run.process_run`) unless given an index folder.
  1. profiles  every hit frame: azimuthal average (all good pixels, Fig. 2b orange) per pump class, and the
               radial background profile (pixels near found peaks excluded). The profiles of indexed frames go
               through an SVD (`data_pipeline.background`); the first three components reconstruct each
               frame's background, which later stages subtract.
  2. reference every indexed crystal's whole frame (background subtracted, corrected for solid angle and
               polarisation, pixels near peaks not indexed into this crystal excluded) merged without scaling.
  3. final     per crystal: scale = mean of the reference's 10 brightest pixels on its Ewald cut / its own mean
               there; similarity (cosine near predicted Bragg peaks) below `min_similarity` -> rejected; the
               accepted crystals merged with their scales, weighted by 1/scale (`crystal_weighting`), into
               dark and pumped volumes.
The virtual powder (integrated peak intensities vs |q|, Fig. 2b purple) comes from the peak lists alone.

Units are groups of whole trains (`unit_frames` frames of interest each), read with extra-data; a train that
cannot be read is skipped and reported, the rest is merged. Sums are float64 and folded in unit order, so the
result does not depend on the scheduler (in-process or Dask) or on an interruption (`--resume`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)

CLASSES = ("dark", "pumped")
CRYSTAL_WEIGHTINGS = ("uniform", "inverse-scale")
SCALINGS = ("reference", "unit")


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Everything that determines the volumes (saved in the output; resume refuses a different one).

    grid_n, q_max: merge grid (n samples per axis over ±q_max Å⁻¹). mode: "nearest" | "trilinear".
    mask_radius_px: pixels within this distance of a found peak are excluded from a crystal's merge when the
        peak is not indexed into its lattice, and from every background profile.
    background_bin_width: Å⁻¹ of the radial profiles; background_components: SVD components kept (paper: 3).
    near_peak_px: the similarity uses pixels within this many pixels (at the detector centre) of a predicted
        pseudo-cubic Bragg peak (paper: 4). n_brightest: pixels of the scaling (paper: 10).
    min_similarity: crystals whose similarity is below are rejected.
    crystal_weighting: how the accepted crystals weigh in the final voxel means. "inverse-scale" (default):
        weight 1/s, i.e. Σ I / Σ (1/s), the maximum-likelihood mean of Poisson counts (var(s·I) ∝ s, so a faint
        crystal scaled 100× does not bring 100× its counting noise); it estimates the intensity-weighted
        ensemble mean, which is what the sample scatters and what the ensemble models compute; the volume's
        weights W are then Σ 1/s over the visits, and I / W is a voxel's Poisson variance (what the fit's
        "poisson" weighting assumes). "uniform": the paper's plain mean of scaled intensities, Σ s·I / N. On a
        10,000-frame synthetic run the merged dark volume's Pearson r against the ensemble is 0.979 with
        inverse-scale, 0.908 uniform (experiments/results/merge_pearson).
    batch_frames: frames per kernel call; unit_frames: frames of interest per map unit (and checkpoint).
    polarisation: correct for horizontal polarisation (EuXFEL).
    scaling: "reference" (default): each crystal's scale from the reference's brightest pixels, as above;
        "unit": every crystal keeps scale 1 (its similarity still decides acceptance). "unit" is right only where
        every frame had the same fluence and no crystal-dependent attenuation: synthetic runs, bias studies.
    """

    grid_n: int = 257
    q_max: float = 1.0
    mode: str = "nearest"
    mask_radius_px: float = 4.0
    background_bin_width: float = 0.005
    background_components: int = 3
    near_peak_px: float = 4.0
    n_brightest: int = 10
    min_similarity: float = 0.3
    crystal_weighting: str = "inverse-scale"
    batch_frames: int = 16
    unit_frames: int = 256
    polarisation: bool = True
    scaling: str = "reference"

    def __post_init__(self):
        from data_pipeline.merge import MODES

        if self.mode not in MODES:
            raise InputError(f"merge mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.grid_n < 3 or not self.q_max > 0:
            raise InputError(f"the grid needs at least 3 samples and q_max > 0, got {self.grid_n}, {self.q_max}.")
        if self.crystal_weighting not in CRYSTAL_WEIGHTINGS:
            raise InputError(f"crystal weighting must be one of {', '.join(CRYSTAL_WEIGHTINGS)}, "
                             f"got {self.crystal_weighting!r}.")  # fmt: skip
        if self.scaling not in SCALINGS:
            raise InputError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}.")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise InputError(f"min_similarity is a cosine in [-1, 1], got {self.min_similarity}.")
        if self.background_components < 1 or self.n_brightest < 1 or self.batch_frames < 1 or self.unit_frames < 1:
            raise InputError("background components, n_brightest, batch and unit sizes must be at least 1.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Context(NamedTuple):
    """What a worker needs besides its unit (hashable: the worker-side set-up is cached on it)."""

    run_path: str
    geometry_file: str
    config: ReduceConfig
    energy_kev: float
    clen_m: float
    match_tol: float
    min_relative_intensity: float


class Unit(NamedTuple):
    """Frames of interest in a group of whole trains.

    index: position in the stage's unit list. trains: (t,) train ids to read. rows: (k,) CXI rows of the frames,
    train_id/pulse_id: (k,) their ids, klass: (k,) 0 dark / 1 pumped. peaks: per frame (module, ss, fs) arrays.
    crystals: per frame a (c, 3, 3) array of refined rotations (may be empty) and crystal_ids: per frame (c,)
    rows of crystals.h5. background: (k, n_bins) background profiles, or None before the SVD.
    """

    index: int
    trains: tuple[int, ...]
    rows: np.ndarray
    train_id: np.ndarray
    pulse_id: np.ndarray
    klass: np.ndarray
    peaks: tuple
    crystals: tuple
    crystal_ids: tuple
    background: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ worker side
class _Setup(NamedTuple):
    run: object
    positions: np.ndarray
    det: object  # merge.DetectorPixels
    q_lab_t: object  # device array
    correction: np.ndarray
    bins: object  # background.RadialBins
    bin_index: np.ndarray
    n_bins: int
    lattice: object  # indexing.ReferenceLattice, to tell which peaks a crystal indexes
    a_pc: float


@functools.lru_cache(maxsize=2)
def _setup(ctx: Context) -> _Setup:
    """Per-process set-up (geometry, pixel q, radial bins, lattice), cached: Dask workers build it once."""
    import jax.numpy as jnp

    from data_pipeline import background, run_io
    from data_pipeline.geometry import pixel_positions
    from data_pipeline.indexing import structure_lattice
    from data_pipeline.merge import detector_pixels
    from jaxpolaron.structure import read_cif

    geometry = run_io.load_geometry(ctx.geometry_file)
    positions = pixel_positions(geometry, ctx.clen_m)
    det = detector_pixels(positions, ctx.energy_kev, polarisation=ctx.config.polarisation)
    bins, bin_index = background.make_radial_bins(det.q_abs, ctx.config.background_bin_width)
    structure = read_cif()
    lattice = structure_lattice(structure, float(det.q_abs.max()) + 0.05, energy_kev=ctx.energy_kev,
                                min_relative_intensity=ctx.min_relative_intensity)  # fmt: skip
    from data_pipeline.index_run import run_spec

    run = run_io.open_run(*run_spec(Path(ctx.run_path)))
    return _Setup(run, positions, det, jnp.asarray(det.q_lab_t), det.correction, bins, bin_index, bins.n_bins,
                  lattice, float(structure.pseudo_cubic.a_pc))  # fmt: skip


def _frames_of(unit: Unit, setup: _Setup, batch: int, report) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches (positions in the unit (b,), corrected frames (b, P) float32, pixel weights (b, P) float32) of the
    unit's frames; frames in trains that cannot be read are missing (and reported)."""
    from extra_data import by_id

    from data_pipeline import run_io

    want = {(int(t), int(p)): i for i, (t, p) in enumerate(zip(unit.train_id, unit.pulse_id, strict=True))}
    sel = setup.run.select_trains(by_id[list(unit.trains)])
    pos, frames, good = [], [], []
    for ch in run_io.iter_frames(sel, chunk=64, report=report):
        for j, pid in enumerate(ch.pulse_ids):
            i = want.get((ch.train_id, int(pid)))
            if i is None:
                continue
            pos.append(i)
            frames.append(ch.frames[j].reshape(-1) * setup.correction)
            good.append(ch.good[j].reshape(-1).astype(np.float32))
            if len(pos) == batch:
                yield np.array(pos), np.stack(frames), np.stack(good)
                pos, frames, good = [], [], []
    if pos:
        yield np.array(pos), np.stack(frames), np.stack(good)


def _peak_pixels(unit: Unit, i: int, keep: np.ndarray | None, radius: float) -> np.ndarray:
    from data_pipeline.background import peak_pixels

    module, ss, fs = unit.peaks[i]
    if keep is not None:
        module, ss, fs = module[keep], ss[keep], fs[keep]
    return peak_pixels(module, ss, fs, radius)


def profiles_stage(unit: Unit, ctx: Context) -> dict:
    """Stage 1 map: azimuthal sums per class and background profiles of the unit's frames."""
    import jax.numpy as jnp

    from data_pipeline.background import fill_empty, radial_profiles
    from data_pipeline.run_io import SkipReport

    setup, cfg, report = _setup(ctx), ctx.config, SkipReport()
    nb = setup.n_bins
    bin_index = jnp.asarray(setup.bin_index)
    az_sum, az_count = np.zeros((2, nb)), np.zeros((2, nb))
    rows, profiles = [], []
    for pos, frames, good in _frames_of(unit, setup, cfg.batch_frames, report):
        mean, count = (np.asarray(x, np.float64) for x in radial_profiles(frames, good, bin_index, nb))
        for k in (0, 1):
            m = unit.klass[pos] == k
            az_sum[k] += (mean[m] * count[m]).sum(0)
            az_count[k] += count[m].sum(0)
        masked = good.copy()
        for b, i in enumerate(pos):
            masked[b, _peak_pixels(unit, i, None, cfg.mask_radius_px)] = 0.0
        bg, bg_count = radial_profiles(frames, masked, bin_index, nb)
        rows.append(unit.rows[pos])
        profiles.append(fill_empty(np.asarray(bg, np.float64), np.asarray(bg_count), setup.bins.live))
    return {
        "azimuthal_sum": az_sum,
        "azimuthal_count": az_count,
        "rows": np.concatenate(rows) if rows else np.zeros(0, np.int64),
        "profiles": np.concatenate(profiles) if profiles else np.zeros((0, nb)),
        "report": dict(report.counts),
        "skipped": [f"{where}: {reason}" for where, reason in report.entries],
    }


class _Crystals(NamedTuple):
    """The crystals of a batch of frames (one entry each): batch slot, rotation (3, 3), accumulator class,
    excluded flat pixel indices, crystals.h5 row."""

    slot: list
    rotation: list
    klass: list
    excluded: list
    ids: np.ndarray

    def subset(self, keep: np.ndarray) -> _Crystals:
        sel = np.flatnonzero(keep)
        return _Crystals(*([col[j] for j in sel] for col in self[:4]), self.ids[sel])


def _crystals_of(unit: Unit, pos: np.ndarray, setup: _Setup, ctx: Context, *, klass_of_frame=True) -> _Crystals:
    """The crystals in frames `pos` (batch slots), each with the pixels near its frame's peaks that are not
    indexed into its lattice excluded (the peak assignment is done here once per batch)."""
    from data_pipeline.geometry import peak_positions, pixel_q
    from data_pipeline.indexing import assign

    out = _Crystals([], [], [], [], np.zeros(0, np.int64))
    ids = []
    for b, i in enumerate(pos):
        rotations = unit.crystals[i]
        if not len(rotations):
            continue
        module, ss, fs = unit.peaks[i]
        q = pixel_q(peak_positions(setup.positions, module, ss, fs), ctx.energy_kev)
        _, dist = assign(np.asarray(rotations, np.float64), q, setup.lattice)
        for c in range(len(rotations)):
            out.slot.append(b)
            out.rotation.append(rotations[c])
            out.klass.append(int(unit.klass[i]) if klass_of_frame else 0)
            out.excluded.append(_peak_pixels(unit, i, dist[c] > ctx.match_tol, ctx.config.mask_radius_px))
            ids.append(unit.crystal_ids[i][c])
    return out._replace(ids=np.array(ids, np.int64))


def _padded(crystals: _Crystals, unit: Unit, setup: _Setup, ctx: Context, scale=None, weight=None):
    """The fixed-shape CrystalBatch of `crystals` (scale and weight (c,), default 1)."""
    from data_pipeline.merge import pad_crystals

    scale = np.ones(len(crystals.ids)) if scale is None else scale
    capacity = ctx.config.batch_frames * _max_crystals(unit)
    width = max([len(e) for e in crystals.excluded] + [1])
    width = int(2 ** np.ceil(np.log2(width)))  # a few shapes only: few compilations
    return pad_crystals(crystals.slot, np.reshape(crystals.rotation, (-1, 3, 3)), scale, crystals.klass,
                        crystals.excluded, capacity=capacity, n_pixels=setup.det.q_abs.size, width=width,
                        weight=weight)  # fmt: skip


def _max_crystals(unit: Unit) -> int:
    n = max((len(c) for c in unit.crystals), default=1)
    return int(2 ** np.ceil(np.log2(max(n, 1))))


def _subtracted(frames: np.ndarray, unit: Unit, pos: np.ndarray, setup: _Setup) -> np.ndarray:
    from data_pipeline.background import background_image

    return frames - background_image(unit.background[pos], setup.bins, setup.det.q_abs)


def reference_stage(unit: Unit, ctx: Context) -> dict:
    """Stage 2 map: unscaled merge of every crystal of the unit (one class)."""
    import jax.numpy as jnp

    from data_pipeline.merge import MergeGrid, add_into, empty_accumulator, merge_batch
    from data_pipeline.run_io import SkipReport

    setup, cfg, report = _setup(ctx), ctx.config, SkipReport()
    grid = MergeGrid(cfg.grid_n, cfg.q_max)
    acc = empty_accumulator(grid, 1)
    n = 0
    for pos, frames, good in _frames_of(unit, setup, cfg.batch_frames, report):
        crystals = _crystals_of(unit, pos, setup, ctx, klass_of_frame=False)
        acc = merge_batch(acc, jnp.asarray(_subtracted(frames, unit, pos, setup)), jnp.asarray(good), setup.q_lab_t,
                          _padded(crystals, unit, setup, ctx), grid=grid, mode=cfg.mode)  # fmt: skip
        n += len(crystals.ids)
    out = add_into(None, acc, grid, 1)
    return {**out, "crystals": n, "report": dict(report.counts)}


def final_stage(unit: Unit, ctx: Context, reference) -> dict:
    """Stage 3 map: per-crystal scale and similarity against the reference; accepted crystals merged, scaled,
    into dark and pumped. `reference`: (flat reference (n³+1,) float32, reference mean)."""
    import jax.numpy as jnp

    from data_pipeline.merge import MergeGrid, add_into, crystal_statistics, empty_accumulator, merge_batch
    from data_pipeline.run_io import SkipReport

    setup, cfg, report = _setup(ctx), ctx.config, SkipReport()
    flat_ref, ref_mean = reference
    flat_ref = jnp.asarray(flat_ref)
    grid = MergeGrid(cfg.grid_n, cfg.q_max)
    acc = empty_accumulator(grid, 2)
    cols: dict[str, list] = {"crystal": [], "scale": [], "similarity": [], "n_selected": [], "accepted": []}
    for pos, frames, good in _frames_of(unit, setup, cfg.batch_frames, report):
        intensities, good_j = jnp.asarray(_subtracted(frames, unit, pos, setup)), jnp.asarray(good)
        crystals = _crystals_of(unit, pos, setup, ctx)
        ids = crystals.ids
        constants = (jnp.float32(ref_mean), jnp.float32(setup.a_pc), jnp.float32(cfg.near_peak_px * setup.det.dq_pixel))
        stats = crystal_statistics(flat_ref, intensities, good_j, setup.q_lab_t, _padded(crystals, unit, setup, ctx),
                                   *constants, grid=grid, n_brightest=cfg.n_brightest)  # fmt: skip
        n = len(ids)
        scale, sim, n_sel = (np.asarray(x)[:n] for x in stats)
        if cfg.scaling == "unit":
            scale = np.where(np.isfinite(scale) & (scale > 0), 1.0, scale)
        accepted = np.isfinite(scale) & (scale > 0) & np.isfinite(sim) & (sim >= cfg.min_similarity)
        s_acc = scale[accepted]
        weight = 1.0 / s_acc if cfg.crystal_weighting == "inverse-scale" else None
        batch = _padded(crystals.subset(accepted), unit, setup, ctx, scale=s_acc, weight=weight)
        acc = merge_batch(acc, intensities, good_j, setup.q_lab_t, batch, grid=grid, mode=cfg.mode)
        for key, v in zip(cols, (ids, scale, sim, n_sel, accepted), strict=True):
            cols[key].append(v)
    out = add_into(None, acc, grid, 2)
    per_crystal = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return {**out, **per_crystal, "report": dict(report.counts)}


# ------------------------------------------------------------------------------------------------ combine
def _add_report(a: dict, b: dict) -> dict:
    return dict(Counter(a) + Counter(b))


def combine_sums(state: dict | None, part: dict) -> dict:
    """Ordered reduce: arrays that are sums add, per-frame/per-crystal arrays concatenate, reports add."""
    if state is None:
        return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in part.items()}
    out = {}
    for k, v in part.items():
        if k == "report":
            out[k] = _add_report(state[k], v)
        elif k == "skipped":
            out[k] = state[k] + v
        elif k in ("rows", "profiles", "crystal", "scale", "similarity", "n_selected", "accepted"):
            out[k] = np.concatenate([state[k], v])
        else:
            out[k] = state[k] + v
    return out


# ------------------------------------------------------------------------------------------------ planning
def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts and arrays (config, the units' frames), for checkpoints."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def make_units(rows, train_id, pulse_id, klass, peaks, crystals, crystal_ids, unit_frames: int) -> list[Unit]:
    """Cut frames (in run order) into units of about `unit_frames` frames that never split a train."""
    units: list[Unit] = []
    start = 0
    n = len(rows)
    while start < n:
        stop = min(start + unit_frames, n)
        while stop < n and train_id[stop] == train_id[stop - 1]:
            stop += 1
        s = slice(start, stop)
        trains = tuple(int(t) for t in np.unique(train_id[s]))
        units.append(Unit(len(units), trains, rows[s], train_id[s], pulse_id[s], klass[s], tuple(peaks[s]),
                          tuple(crystals[s]), tuple(crystal_ids[s])))  # fmt: skip
        start = stop
    return units


# ------------------------------------------------------------------------------------------------ driver
def _index(run_path: Path, index_dir: Path, *, resume: bool, progress: bool, cores=None) -> dict:
    """Stage 0: peaks, indexing and refinement into index_dir (resumed when already started)."""
    from data_pipeline.index_run import process_run

    state = index_dir / "progress.json"
    if state.is_file() and json.loads(state.read_text()).get("finished"):
        log.info("index results in %s are complete; reusing them", index_dir)
        return json.loads((index_dir / "stats.json").read_text())
    return process_run(run_path, index_dir, resume=resume or state.is_file(), progress=progress)


def plan(index_dir: Path, hit_min_peaks: int) -> dict:
    """Frames and crystals of an index folder: the per-frame table of the hits, their peaks, and per frame the
    refined crystals. Frames of unknown pump state are merged as dark (with a warning)."""
    from data_pipeline.crystal_table import read_crystal_table
    from data_pipeline.io import read_cxi_frames, read_cxi_peak_rows

    frames = read_cxi_frames(index_dir / "peaks.cxi")
    table = read_crystal_table(index_dir / "crystals.h5")
    hits = np.flatnonzero(frames["nPeaks"] >= hit_min_peaks)
    peaks = read_cxi_peak_rows(index_dir / "peaks.cxi", hits)
    pumped = frames["pumped"][hits]
    if np.any(pumped < 0):
        log.warning("%d hit frames have no pump state; they are merged as dark", int(np.sum(pumped < 0)))
    by_frame: dict[int, list[int]] = {}
    for i, f in enumerate(table["frame"]):
        by_frame.setdefault(int(f), []).append(i)
    crystals = [np.asarray(table["rotation"][by_frame.get(int(r), [])], np.float64).reshape(-1, 3, 3) for r in hits]
    crystal_ids = [np.asarray(by_frame.get(int(r), []), np.int64) for r in hits]
    return {
        "rows": hits,
        "train_id": frames["trainId"][hits].astype(np.int64),
        "pulse_id": frames["pulseId"][hits].astype(np.int64),
        "klass": (pumped == 1).astype(np.int8),
        "peaks": list(zip(peaks.module, peaks.ss, peaks.fs, strict=True)),
        "peak_intensity": peaks.total_intensity,
        "crystals": crystals,
        "crystal_ids": crystal_ids,
        "n_crystals": len(table["frame"]),
        "pumped_of_crystal": table["pumped"],
    }


def _select(p: dict, keep: np.ndarray) -> tuple:
    idx = np.flatnonzero(keep)
    return (p["rows"][idx], p["train_id"][idx], p["pulse_id"][idx], p["klass"][idx],
            np.array(p["peaks"], dtype=object)[idx] if len(idx) else np.zeros(0, object),
            np.array(p["crystals"] + [None], dtype=object)[:-1][idx], np.array(p["crystal_ids"] + [None],
            dtype=object)[:-1][idx])  # fmt: skip


def reduce_run(
    run_path: str | Path,
    out_path: str | Path,
    *,
    config: ReduceConfig | None = None,
    index_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    scheduler: str | None = None,
    cluster: str | None = None,
    resume: bool = False,
    progress: bool = True,
    figures: bool = True,
    checkpoint_seconds: float = 60.0,
) -> dict:
    """Run every stage; write the volume file `out_path` (dark, pump, difference, weights, statistics) and,
    with `figures`, PNGs beside it. Returns the statistics dict. Checkpoints live in `work_dir` (default
    OUT_STEM.work/ beside the output), saved every `checkpoint_seconds` and after each stage."""
    from data_pipeline import background, scaleout
    from data_pipeline.index_run import IndexRunConfig
    from data_pipeline.merge import MergeGrid, flat_reference, merged_mean
    from jaxpolaron.io import Volume, check_writable, provenance, write_volume_file

    config = ReduceConfig() if config is None else config
    try:  # like the work folder beside it, the output's folder is created (a fresh --out runs/x/vol.h5)
        Path(out_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder of {out_path} ({e.strerror}).") from None
    run_path, out_path = Path(run_path), check_writable(out_path)
    work = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.stem + ".work")
    spec = scaleout.parse_scheduler(scheduler, cluster)  # a bad --scheduler fails before any work
    if work.exists() and any(work.iterdir()) and not resume:
        raise InputError(f"{work} holds an earlier reduction; pass --resume to continue it or remove it.")
    work.mkdir(parents=True, exist_ok=True)
    index_dir = Path(index_dir) if index_dir is not None else work / "index"
    index_stats = _index(run_path, index_dir, resume=resume, progress=progress)
    from data_pipeline.index_run import run_spec
    from data_pipeline.run_io import SkipReport, open_run

    files_report = SkipReport()  # files extra-data cannot open (every stage leaves them out)
    open_run(*run_spec(run_path), report=files_report)
    index_cfg = json.loads((index_dir / "config.json").read_text())["config"]
    icfg = IndexRunConfig()
    ctx = Context(
        run_path=str(run_path),
        geometry_file=str(index_dir / "geometry.geom"),
        config=config,
        energy_kev=float(index_cfg.get("energy_kev", icfg.energy_kev)),
        clen_m=float(index_cfg.get("clen_m", icfg.clen_m)),
        match_tol=float(index_cfg.get("indexing", {}).get("match_tol", icfg.indexing.match_tol)),
        min_relative_intensity=float(index_cfg.get("min_relative_intensity", icfg.min_relative_intensity)),
    )
    p = plan(index_dir, int(index_cfg.get("hit_min_peaks", icfg.hit_min_peaks)))
    indexed = np.array([len(c) > 0 for c in p["crystals"]], bool)
    if not indexed.any():
        raise InputError(f"no indexed crystal in {index_dir}: nothing to merge.")
    hit_units = make_units(*_select(p, np.ones(len(indexed), bool)), config.unit_frames)
    base = fingerprint(config.to_dict(), index_cfg, p["rows"], p["n_crystals"])

    def stage(name, fn, units, fn_args=()):
        ckpt = scaleout.Checkpoint(work / f"stage_{name}.h5", fingerprint(base, name), checkpoint_seconds)
        return scaleout.run_stage(name, fn, units, combine=combine_sums, initial=None, executor=executor,
                                  checkpoint=ckpt, resume=resume, progress=progress, fn_args=fn_args)  # fmt: skip

    with scaleout.open_executor(spec) as executor:
        # 1: azimuthal averages and background profiles of every hit
        prof = stage("profiles", profiles_stage, hit_units, (ctx,))
        row_of = {int(r): i for i, r in enumerate(prof["rows"])}
        have = np.array([int(r) in row_of for r in p["rows"]])
        use = indexed & have
        ix = np.array([row_of[int(r)] for r in p["rows"][use]], np.int64)
        gram = background.gram_update(prof["profiles"][ix])
        comps = background.background_components(gram, config.background_components)
        bg = background.reconstruct(prof["profiles"][ix], comps)
        units = make_units(*_select(p, use), config.unit_frames)
        offset = 0
        for k, u in enumerate(units):  # attach each frame's background profile
            units[k] = u._replace(background=bg[offset : offset + len(u.rows)])
            offset += len(u.rows)
        # 2: reference merge; 3: scaled, filtered final merge
        ref = stage("reference", reference_stage, units, (ctx,))
        ref_mean = merged_mean(ref)[0]
        with_data = ref["weight"][0] > 0
        reference = (np.asarray(flat_reference(ref_mean)), float(ref_mean[with_data].mean()))
        fin = stage("final", final_stage, units, (ctx, executor.broadcast(reference)))

    grid = MergeGrid(config.grid_n, config.q_max)
    mean = merged_mean(fin)
    n_classes_seen = [int(np.sum(fin["accepted"] & (p["pumped_of_crystal"][fin["crystal"]] == k))) for k in (0, 1)]
    pump = mean[1] if n_classes_seen[1] else None
    volume = Volume("grid", (grid.axis,) * 3, dark=mean[0], pump=pump,
                    weight={"dark": fin["weight"][0], **({"pump": fin["weight"][1]} if pump is not None else {})},
                    units="counts")  # fmt: skip
    curves = powder_curves(p, prof, ctx)
    stats = statistics(p, prof, fin, index_stats, comps, gram, curves)
    stats["read_report"] = {"files": files_report.to_dict(), "frames": {"counts": prof["report"],
                            "skipped": prof["skipped"]}}  # fmt: skip
    write_volume_file(out_path, [volume], config={"reduce": config.to_dict(), "index": index_cfg,
                      "run": str(run_path), "scheduler": scheduler or cluster or "in-process"},
                      provenance=provenance({"run": str(run_path)}), statistics=stats)  # fmt: skip
    write_crystal_scales(work / "crystal_scales.h5", fin, config)
    if figures:
        write_figures(out_path, volume, curves, fin, config)
    return stats


def statistics(p: dict, prof: dict, fin: dict, index_stats: dict, comps, gram, curves) -> dict:
    """The statistics table of the volume file (JSON-able): Table S1 of indexing, and per pump class the
    crystals indexed, merged, rejected (dissimilar / no scale), the frames merged and the scale quantiles."""
    pumped = p["pumped_of_crystal"]
    merge = {}
    for k, name in enumerate(CLASSES):
        of_class = (pumped[fin["crystal"]] == 1) == (k == 1)
        acc = fin["accepted"].astype(bool) & of_class
        scale = fin["scale"][acc]
        no_scale = of_class & ~(np.isfinite(fin["scale"]) & (fin["scale"] > 0))
        merge[name] = {
            "crystals_indexed": int(np.sum((pumped == 1) == (k == 1))),
            "crystals_seen": int(of_class.sum()),
            "crystals_merged": int(acc.sum()),
            "rejected_dissimilar": int(np.sum(of_class & ~no_scale & ~fin["accepted"].astype(bool))),
            "rejected_no_scale": int(no_scale.sum()),
            "scale_median": float(np.median(scale)) if len(scale) else float("nan"),
            "scale_p10_p90": [float(np.percentile(scale, q)) for q in (10, 90)] if len(scale) else [],
            "similarity_median": float(np.nanmedian(fin["similarity"][of_class])) if of_class.any() else float("nan"),
        }
    eig = np.sort(np.linalg.eigvalsh(gram))[::-1]
    return {
        "table_s1": index_stats.get("table_s1"),
        "index_validation": index_stats.get("validation"),
        "merge": merge,
        "background": {
            "components": len(comps),
            "frames": len(prof["rows"]),
            "singular_values": [float(np.sqrt(max(e, 0.0))) for e in eig[:6]],
            "explained_fraction": float(eig[: len(comps)].sum() / eig.sum()) if eig.sum() > 0 else float("nan"),
        },
        "powder": curves.to_dict(),
    }


def format_merge_table(stats: dict) -> str:
    """The per-class merge table as aligned text (printed at the end of `jaxpolaron reduce`)."""
    rows = ["crystals_indexed", "crystals_seen", "crystals_merged", "rejected_dissimilar", "rejected_no_scale",
            "scale_median", "similarity_median"]  # fmt: skip
    lines = [f"{'':24s}{'dark':>12s}{'pumped':>12s}"]
    for r in rows:
        vals = [stats["merge"][c][r] for c in CLASSES]
        lines.append(f"{r:24s}" + "".join(f"{v:>12.4g}" if isinstance(v, float) else f"{v:>12d}" for v in vals))
    return "\n".join(lines)


def write_crystal_scales(path: Path, fin: dict, config: ReduceConfig) -> None:
    """Per crystal of the final stage (rows of crystals.h5): scale, similarity, pixels compared, accepted."""
    from data_pipeline.crystal_table import write_columns
    from jaxpolaron.io import provenance

    cols = {k: fin[k] for k in ("crystal", "scale", "similarity", "n_selected")}
    cols["accepted"] = fin["accepted"].astype(bool)
    write_columns(path, "scaling", cols, {"config": config.to_dict(), "provenance": provenance()})


def powder_curves(p: dict, prof: dict, ctx: Context):
    """Fig. 2b curves: the virtual powder from the hits' peak lists, the azimuthal average from stage 1."""
    from data_pipeline.geometry import peak_positions, pixel_q
    from data_pipeline.powder import PowderCurves, virtual_powder_sums

    setup = _setup(ctx)
    peak_q = [np.linalg.norm(pixel_q(peak_positions(setup.positions, *pk), ctx.energy_kev), axis=-1)
              for pk in p["peaks"]]  # fmt: skip
    vsum, hits = virtual_powder_sums(peak_q, p["peak_intensity"], p["klass"], setup.bins.edges)
    return PowderCurves.from_sums(setup.bins.centres, vsum, hits, prof["azimuthal_sum"], prof["azimuthal_count"])


def write_figures(out_path: Path, volume, curves, fin: dict, config: ReduceConfig) -> list[Path]:
    """PNGs beside the volume file: central slices (dark, and ΔI when pumped data exist), the powder curves
    and the per-crystal scaling/rejection diagnostics."""
    from jaxpolaron import plotting

    stem = out_path.with_suffix("")
    paths = [Path(f"{stem}_slices.png"), Path(f"{stem}_powder.png"), Path(f"{stem}_scaling.png")]
    dark = np.where(volume.weight["dark"] > 0, volume.dark, np.nan)
    plotting.plot_central_slices(volume.axes, dark, paths[0], title="merged dark", difference=volume.difference)
    plotting.plot_powder(curves.q, {"virtual powder": curves.virtual, "azimuthal average": curves.azimuthal},
                         paths[1])  # fmt: skip
    plotting.plot_scaling(fin["scale"], fin["similarity"], fin["accepted"].astype(bool), paths[2],
                          threshold=config.min_similarity)  # fmt: skip
    return paths
