"""Peak finding and indexing of a whole run, streamed, checkpointed and resumable (`jaxpolaron find-peaks`,
`jaxpolaron index`).

Stages per chunk of frames (`run_io.iter_frames`, a chunk never spans two trains):
  peakfinder8 (jitted, batched) -> peaks.cxi  ->  peak q (geometry) -> sparse indexing (indexing.index_frame,
  per frame) -> Eq. 1 refinement (refinement.refine_orientations, one padded batch per chunk)
  -> crystals.stream (hits only, like indexamajig --no-non-hits-in-stream) and crystals.h5 (one row per crystal)
and the Table S1 counters. After each chunk the outputs are flushed and `progress.json` is replaced atomically
with the committed state (frames done, where in the run, stream size, crystal rows, counters). `resume`
truncates every output back to that state and continues from the next chunk; chunks are cut at the same
frames in both cases and every stage is deterministic, so a resumed run gives the same outputs as an
uninterrupted one.

Outputs in OUT_DIR: peaks.cxi, crystals.stream (index), crystals.h5 (index), stats.json, stats.md,
config.json (configuration + provenance), progress.json (checkpoint), validation in stats.json when the run
folder holds a synthetic truth.hdf5.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.indexing import IndexingConfig
from data_pipeline.peakfinder import Peakfinder8Config
from data_pipeline.refinement import RefinementConfig
from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)

CLASSES = ("dark", "pumped", "unknown")
PROGRESS = "progress.json"


def default_peakfinder_config() -> Peakfinder8Config:
    """peakfinder8 settings for photon-unit AGIPD data (synthetic runs, calibrated 'proc' data in photons)."""
    return Peakfinder8Config(
        adc_threshold=2.0, minimum_snr=5.0, min_pixel_count=2, max_pixel_count=400, local_bg_radius=3, max_num_peaks=256
    )


@dataclasses.dataclass(frozen=True)
class IndexRunConfig:
    """Everything that determines the outputs (saved in config.json; resume refuses a different one)."""

    peakfinder: Peakfinder8Config = dataclasses.field(default_factory=default_peakfinder_config)
    indexing: IndexingConfig = dataclasses.field(default_factory=IndexingConfig)
    refinement: RefinementConfig = dataclasses.field(
        default_factory=lambda: RefinementConfig(ewald=True, excitation_width_voxels=15.0)
    )
    energy_kev: float = 13.6
    clen_m: float = 0.1224
    chunk: int = 32  # frames per peak-finding batch and per checkpoint
    hit_min_peaks: int = 2  # the paper: a hit has at least two peaks
    refine_batch: int = 32  # crystals per padded refinement batch (fixed shapes: one compilation)
    refine_max_peaks: int = 64
    index: bool = True
    min_relative_intensity: float = 1e-2  # reference reflections kept: |F|² >= this × the strongest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ counters
def empty_counts() -> dict[str, Counter]:
    return {c: Counter() for c in CLASSES}


def pump_class(p: int) -> str:
    return "pumped" if p == 1 else "dark" if p == 0 else "unknown"


STAT_ROWS = (
    ("frames", "Total frames"),
    ("frames_with_peaks", "Frames with peaks"),
    ("hits", "Hit frames (>= 2 peaks)"),
    ("hit_rate", "Hit rate"),
    ("indexed_frames", "Indexed frames"),
    ("multi_crystal_frames", "Frames with >= 2 crystals"),
    ("crystals", "Indexed crystals"),
    ("rejected_crystals", "Rejected (orientation unsure)"),
    ("indexing_rate", "Indexing rate (crystals / hits)"),
    ("indexed_peaks", "Indexed peaks"),
)


def table_s1(counts: dict[str, Counter]) -> dict[str, dict[str, float]]:
    """Table S1 columns (dark, pumped, unknown when present, total) from the per-class counters."""
    cols = {c: counts[c] for c in CLASSES if c != "unknown" or counts[c]["frames"]}
    cols["total"] = sum((counts[c] for c in CLASSES), Counter())
    out = {}
    for name, c in cols.items():
        row = {k: int(c[k]) for k, _ in STAT_ROWS if not k.endswith("rate")}
        row["hit_rate"] = c["hits"] / c["frames"] if c["frames"] else 0.0
        row["indexing_rate"] = c["crystals"] / c["hits"] if c["hits"] else 0.0
        out[name] = row
    return out


def format_table(table: dict[str, dict[str, float]], *, markdown: bool = False) -> str:
    names = list(table)
    header = ["Metric", *[n.capitalize() for n in names]]
    rows = []
    for key, label in STAT_ROWS:
        if key not in table[names[0]]:
            continue
        vals = [table[n][key] for n in names]
        rows.append([label, *[f"{v:.1%}" if key.endswith("rate") else f"{int(v):,}" for v in vals]])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one chunk
def index_chunk(peaks, positions_m, lattice, config: IndexRunConfig):
    """Index every hit of a chunk and refine all its crystals in fixed-size batches.

    peaks: numpy PeakList with a leading frame axis (n_frames). positions_m: (16, 512, 128, 3) pixel centres.
    Returns (per frame a list of dicts (crystal: rotation, rotation_indexed, peaks, hkl, scores, residual,
    orientation_sigma_deg), per frame the number of crystals rejected for an unsure orientation).
    """
    from data_pipeline.geometry import peak_positions, pixel_q
    from data_pipeline.indexing import index_frame, n_reflections

    per_frame: list[list[dict]] = []
    rejected_per_frame: list[int] = []
    items = []
    for i in range(len(peaks.n_peaks)):
        n = int(peaks.n_peaks[i])
        found: list[dict] = []
        rejected: list = []
        if n >= config.hit_min_peaks:
            pos = peak_positions(positions_m, peaks.panel[i, :n], peaks.ss[i, :n], peaks.fs[i, :n])
            q = pixel_q(pos, config.energy_kev)
            inten = np.asarray(peaks.total_intensity[i, :n], float)
            for c in index_frame(q, inten, lattice, config.indexing, rejected=rejected):
                found.append(dict(
                    rotation_indexed=c.rotation, peaks=c.peaks, hkl=c.hkl, round=c.round,
                    orientation_sigma_deg=c.sigma_deg,
                    n_reflections=int(n_reflections(c.hkl, np.ones(len(c.peaks), bool))),
                    residual_rms=float(np.sqrt(np.mean(c.residual**2))),
                ))  # fmt: skip
                k = config.refine_max_peaks
                items.append((c.rotation, q[c.peaks][:k], (c.hkl @ lattice.basis)[:k], inten[c.peaks][:k]))
        per_frame.append(found)
        rejected_per_frame.append(len(rejected))
    refined, before, after = refine_crystals(items, config)
    j = 0
    for found in per_frame:
        for c in found:
            c["rotation"], c["score_before"], c["score_after"] = refined[j], before[j], after[j]
            j += 1
    return per_frame, rejected_per_frame


def refine_crystals(items, config: IndexRunConfig):
    """Eq. 1 refinement of crystals (rotation, q, g, s) in padded batches of config.refine_batch (one compiled
    shape). Returns lists (refined rotations, scores before, scores after), float64, one entry per item."""
    from data_pipeline.refinement import pad_crystals, refine_orientations

    refined, before, after = [], [], []
    for a in range(0, len(items), config.refine_batch):
        batch = items[a : a + config.refine_batch]
        rot, q, g, s = pad_crystals(batch, n_max=config.refine_max_peaks, batch=config.refine_batch)
        r, s0, s1 = refine_orientations(rot, q, g, s, config.refinement)
        refined += list(np.asarray(r, np.float64)[: len(batch)])
        before += list(np.asarray(s0, np.float64)[: len(batch)])
        after += list(np.asarray(s1, np.float64)[: len(batch)])
    return refined, before, after


# ------------------------------------------------------------------------------------------------ the run
def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _config_for_json(config: IndexRunConfig, run_path: str, geometry_source: str) -> dict:
    return {"run": run_path, "geometry": geometry_source, **config.to_dict()}


def process_run(
    run_path: str | Path,
    out_dir: str | Path,
    *,
    geometry=None,
    geometry_path: str | Path | None = None,
    config: IndexRunConfig | None = None,
    resume: bool = False,
    max_frames: int | None = None,
    progress: bool = True,
) -> dict:
    """Find peaks (and index, when config.index) in every frame of a run; returns the stats dict written to
    stats.json. `max_frames` stops after the chunk that reaches that many frames (the outputs are then a
    valid checkpoint: `resume=True` continues)."""
    import jax
    from extra_data import by_id, by_index
    from tqdm import tqdm

    from data_pipeline import io as dio
    from data_pipeline import run_io
    from data_pipeline.crystal_table import CrystalTableWriter
    from data_pipeline.geometry import pixel_positions, pixel_q, pixel_radius
    from data_pipeline.host import aligned_empty
    from data_pipeline.indexing import structure_lattice
    from data_pipeline.peakfinder import find_peaks_batch, make_binning
    from jaxpolaron.io import provenance
    from jaxpolaron.structure import read_cif

    config = IndexRunConfig() if config is None else config
    run_path, out = Path(run_path), Path(out_dir)
    if run_spec(run_path)[1] is not None:
        run_path = Path(str(run_path))  # PROPOSAL:RUN at EuXFEL (no run folder: geometry from --geometry)
    out.mkdir(parents=True, exist_ok=True)
    if geometry is None:
        geometry = run_io.load_geometry(geometry_path, run_path)
        in_run = run_path / run_io.GEOM_FILE
        geometry_path = geometry_path or (in_run if in_run.is_file() else None)
    geom_file = out / "geometry.geom"
    dio.write_crystfel_geom(geometry, geom_file, clen_m=config.clen_m, energy_kev=config.energy_kev)
    # indexamajig reads CXI peak lists as one stacked image: `indexamajig --peaks=cxi -g peaks.geom`
    dio.write_crystfel_geom(geometry, out / "peaks.geom", clen_m=config.clen_m, energy_kev=config.energy_kev,
                            layout="stacked", peak_list="/entry_1/result_1")  # fmt: skip
    cfg_json = _config_for_json(config, str(run_path), str(geometry_path or "default AGIPD-1M quadrant positions"))
    progress_path = out / PROGRESS
    state = None
    if resume and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state["config"] != json.loads(json.dumps(cfg_json, default=str)):
            raise InputError(f"{out} was written with a different configuration; rerun without --resume.")
    elif not resume and progress_path.is_file():
        raise InputError(f"{out} already holds a run (progress.json); use --resume to continue or another --out.")
    if state is None:
        state = {"config": json.loads(json.dumps(cfg_json, default=str)), "frames_done": 0, "train": None,
                 "train_frames_done": 0, "stream_bytes": None, "crystal_rows": 0,
                 "counts": {c: {} for c in CLASSES}, "report": {}, "finished": False}  # fmt: skip
    _write_json_atomic(out / "config.json", {"config": cfg_json, "provenance": provenance()})

    report = run_io.SkipReport()
    run = run_io.open_run(*run_spec(run_path), report=report)
    first = next(run_io.iter_frames(run.select_trains(by_index[:1]), chunk=1), None)
    if first is None:
        raise InputError(f"no readable frame in {run_path}.")
    static_good = first.good[0]  # the peak finder's mask; other bad pixels of a frame are zeroed
    positions = pixel_positions(geometry, config.clen_m)
    radius = pixel_radius(positions).astype(np.float32)
    pcfg = config.peakfinder
    binning = make_binning(radius, static_good, pcfg)
    q_max = float(np.linalg.norm(pixel_q(positions, config.energy_kev), axis=-1).max()) + 0.05
    lattice = None
    if config.index:
        lattice = structure_lattice(
            read_cif(), q_max, energy_kev=config.energy_kev, min_relative_intensity=config.min_relative_intensity
        )

    cxi = dio.CxiPeakWriter(out / "peaks.cxi", pcfg.max_num_peaks, resume=state["frames_done"] > 0,
                            provenance=provenance(), peakfinder_config=pcfg)  # fmt: skip
    cxi.truncate(state["frames_done"])
    stream = table = None
    if config.index:
        stream_path = out / "crystals.stream"
        if state["stream_bytes"] is not None and stream_path.is_file():
            os.truncate(stream_path, state["stream_bytes"])
        cell = _target_cell(lattice)
        stream = dio.StreamWriter(stream_path, geom_file.read_text(), target_cell=cell, indexer="spind",
                                  resume=state["stream_bytes"] is not None)  # fmt: skip
        table = CrystalTableWriter(out / "crystals.h5", resume=state["crystal_rows"] > 0 or state["frames_done"] > 0,
                                   attrs={"provenance": provenance(), "config": cfg_json})  # fmt: skip
        table.truncate(state["crystal_rows"])
        if state["stream_bytes"] is None:
            state["stream_bytes"] = stream_path.stat().st_size
    counts = {c: Counter(state["counts"].get(c, {})) for c in CLASSES}
    report.counts.update(state["report"])

    sel = run
    if state["train"] is not None:
        sel = run.select_trains(by_id[[t for t in run.train_ids if t >= state["train"]]])
    total = _n_frames(run)
    bar = tqdm(total=total, initial=state["frames_done"], unit="frame", disable=not progress,
               desc="index" if config.index else "find-peaks")  # fmt: skip
    skip = state["train_frames_done"]
    try:
        for ch in run_io.iter_frames(sel, chunk=config.chunk, report=report):
            if state["train"] is not None and ch.train_id == state["train"] and skip > 0:
                skip -= len(ch.pulse_ids)  # already committed before the interruption
                continue
            frames = aligned_empty(ch.frames.shape, np.float32)  # reaches the peak finder without a copy
            np.copyto(frames, ch.frames)
            np.copyto(frames, np.float32(0.0), where=~ch.good)
            pk = jax.tree.map(np.asarray, find_peaks_batch(frames, static_good, radius, pcfg, binning))
            row0 = cxi.n_frames
            cxi.append(pk, np.full(len(ch.pulse_ids), ch.train_id, np.uint64), ch.pulse_ids, ch.pumped)
            if config.index:
                per_frame, rejected = index_chunk(pk, positions, lattice, config)
            else:
                per_frame, rejected = [[]] * len(ch.pulse_ids), [0] * len(ch.pulse_ids)
            rows = []
            for i, found in enumerate(per_frame):
                cls = counts[pump_class(int(ch.pumped[i]))]
                n = int(pk.n_peaks[i])
                cls["frames"] += 1
                cls["frames_with_peaks"] += n > 0
                cls["hits"] += n >= config.hit_min_peaks
                cls["indexed_frames"] += bool(found)
                cls["multi_crystal_frames"] += len(found) >= 2
                cls["crystals"] += len(found)
                cls["rejected_crystals"] += rejected[i]
                cls["indexed_peaks"] += sum(len(c["peaks"]) for c in found)
                if config.index and n >= config.hit_min_peaks:
                    stream.write_chunk(_chunk_record(row0 + i, ch, i, pk, found, lattice, config))
                for c in found:
                    rows.append(dict(frame=row0 + i, trainId=ch.train_id, pulseId=ch.pulse_ids[i],
                                     pumped=ch.pumped[i], n_peaks=len(c["peaks"]), **{k: c[k] for k in (
                                         "rotation", "rotation_indexed", "n_reflections", "round", "score_before",
                                         "score_after", "residual_rms", "orientation_sigma_deg")}))  # fmt: skip
            if table is not None and rows:
                table.append({k: np.array([r[k] for r in rows]) for k in rows[0]})
            # commit: every output is flushed; record where we are
            if state["train"] != ch.train_id:
                state["train"], state["train_frames_done"] = ch.train_id, 0
            state["train_frames_done"] += len(ch.pulse_ids)
            state["frames_done"] = cxi.n_frames
            if config.index:
                state["stream_bytes"] = (out / "crystals.stream").stat().st_size
                state["crystal_rows"] = table.n_rows
            state["counts"] = {c: dict(v) for c, v in counts.items()}
            state["report"] = dict(report.counts)
            _write_json_atomic(progress_path, state)
            bar.update(len(ch.pulse_ids))
            if max_frames is not None and state["frames_done"] >= max_frames:
                break
        else:
            state["finished"] = True
            _write_json_atomic(progress_path, state)
    finally:
        bar.close()
        cxi.close()
        if stream is not None:
            stream.close()
        if table is not None:
            table.close()

    stats = {"table_s1": table_s1(counts), "read_report": report.to_dict(), "finished": state["finished"],
             "frames_done": state["frames_done"]}  # fmt: skip
    truth = run_path / "truth.hdf5"
    if config.index and truth.is_file():
        from data_pipeline.validation import validate_against_truth

        stats["validation"] = validate_against_truth(run_path, out / "crystals.h5", lattice)
    _write_json_atomic(out / "stats.json", stats)
    (out / "stats.md").write_text(_stats_markdown(stats))
    return stats


def run_spec(run_path: Path) -> tuple:
    """(path,) for a run folder; (proposal, run) for 'PROPOSAL:RUN' (opened through extra-data's open_run)."""
    text = str(run_path)
    if not Path(text).exists() and text.count(":") == 1 and all(t.isdigit() for t in text.split(":")):
        proposal, run = text.split(":")
        return int(proposal), int(run)
    return text, None


def _n_frames(run) -> int:
    from data_pipeline.run_io import AGIPD_SOURCE

    try:
        return int(run[AGIPD_SOURCE.format(m=0), "image.data"].data_counts(labelled=False).sum())
    except Exception:  # module 0 missing: the progress bar has no total
        return 0


def _target_cell(lattice):
    from data_pipeline.io import TargetCell, cell_parameters

    a, b, c, al, be, ga = cell_parameters(lattice.basis)
    return TargetCell(a, b, c, al, be, ga, lattice_type="orthorhombic", centering="P")


def _chunk_record(row: int, ch, i: int, pk, found, lattice, config: IndexRunConfig):
    from data_pipeline import io as dio

    n = int(pk.n_peaks[i])
    peaks = dio.StreamPeaks(pk.fs[i, :n].astype(float), pk.ss[i, :n].astype(float), pk.panel[i, :n].astype(np.int64),
                            pk.total_intensity[i, :n].astype(float))  # fmt: skip
    crystals = []
    for c in found:
        p = c["peaks"]
        refl = dio.StreamReflections(
            hkl=c["hkl"], intensity=peaks.intensity[p], sigma=np.sqrt(np.abs(peaks.intensity[p])),
            peak=pk.max_intensity[i, p].astype(float), background=np.zeros(len(p)),
            fs=peaks.fs[p], ss=peaks.ss[p], module=peaks.module[p],
        )  # fmt: skip
        crystals.append(dio.StreamCrystal(astar=lattice.basis @ c["rotation"].T, lattice_type="orthorhombic",
                                          centering="P", reflections=refl))  # fmt: skip
    return dio.ChunkRecord(
        filename="peaks.cxi", event=dio.event_id(row), serial=row + 1, photon_energy_ev=1000.0 * config.energy_kev,
        peaks=peaks, crystals=tuple(crystals), hit=True,
        headers={"trainId": int(ch.train_id), "pulseId": int(ch.pulse_ids[i]), "pumped": int(ch.pumped[i])},
    )  # fmt: skip


def _stats_markdown(stats: dict) -> str:
    parts = ["# Run statistics (cf. the paper's Table S1)", "", format_table(stats["table_s1"], markdown=True), ""]
    v = stats.get("validation")
    if v:
        parts += ["## Against the synthetic truth", "", "```", json.dumps(v, indent=1), "```", ""]
    return "\n".join(parts)
