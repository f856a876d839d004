"""`jaxpolaron find-peaks RUN --out DIR` and `jaxpolaron index RUN --out DIR` (see data_pipeline.index_run)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from jaxpolaron.cli import _positive_float, _positive_int
from jaxpolaron.errors import InputError

log = logging.getLogger("jaxpolaron")


def _common(p) -> None:
    p.add_argument("run", help="run directory (EXDF files), or PROPOSAL:RUN at EuXFEL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--geometry", help="CrystFEL .geom (default: the run folder's agipd.geom, else the default)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--energy-kev", type=_positive_float, default=13.6, help="photon energy, keV (13.6)")
    p.add_argument("--clen-mm", type=_positive_float, default=122.4, help="detector distance, mm (122.4)")
    p.add_argument("--chunk", type=_positive_int, default=32, help="frames per batch and checkpoint (32)")
    p.add_argument("--min-snr", type=_positive_float, default=5.0, help="peakfinder8 minimum SNR (5)")
    p.add_argument("--adc-threshold", type=float, default=2.0, help="peakfinder8 ADC threshold, detector units (2)")
    p.add_argument("--min-pixels", type=_positive_int, default=2, help="peakfinder8 minimum pixels per peak (2)")
    p.add_argument("--max-frames", type=_positive_int, help="stop after this many frames (resumable)")
    p.add_argument(
        "--cores",
        type=_positive_int,
        help="CPU cores the peak finder spreads each batch over (default: all this process may use)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")


def add_parser(sub) -> None:
    p = sub.add_parser("find-peaks", help="peakfinder8 on every frame: CXI peak lists and hit statistics")
    _common(p)
    p.set_defaults(func=run_find_peaks)
    p = sub.add_parser("index", help="find peaks, index (SPIND), refine (Eq. 1): CrystFEL stream, crystal table")
    _common(p)
    p.add_argument("--min-peaks", type=_positive_int, default=4, help="reflections to accept a crystal (4)")
    p.add_argument("--min-peaks-second-round", type=_positive_int, default=3, help="second round (3)")
    p.add_argument("--max-crystals", type=_positive_int, default=4, help="crystals searched per frame (4)")
    p.add_argument("--match-tol", type=_positive_float, default=0.02, help="indexing tolerance, 1/Å (0.02)")
    p.add_argument(
        "--max-orientation-sigma",
        type=_positive_float,
        default=0.6,
        help="reject crystals whose orientation is less sure than this, degrees (0.6; inf = keep all)",
    )
    p.add_argument("--refine-steps", type=int, default=150, help="Eq. 1 optimiser steps (150; 0 = none)")
    p.set_defaults(func=run_index)


def _config(args, index: bool):
    from data_pipeline.index_run import IndexRunConfig, default_peakfinder_config
    from data_pipeline.indexing import IndexingConfig
    from data_pipeline.refinement import RefinementConfig

    pf = dataclasses.replace(
        default_peakfinder_config(),
        minimum_snr=args.min_snr,
        adc_threshold=args.adc_threshold,
        min_pixel_count=args.min_pixels,
    )
    extra = {}
    if index:
        if args.min_peaks_second_round > args.min_peaks or args.min_peaks_second_round < 2:
            raise InputError("--min-peaks-second-round must lie in [2, --min-peaks].")
        if args.refine_steps < 0:
            raise InputError(f"--refine-steps must be >= 0, got {args.refine_steps}.")
        extra = dict(
            indexing=IndexingConfig(
                min_peaks=args.min_peaks,
                min_peaks_second_round=args.min_peaks_second_round,
                max_crystals=args.max_crystals,
                match_tol=args.match_tol,
                max_orientation_sigma_deg=args.max_orientation_sigma,
            ),
            refinement=RefinementConfig(
                ewald=True, excitation_width_voxels=15.0, steps=args.refine_steps, energy_kev=args.energy_kev
            ),
        )
    return IndexRunConfig(
        peakfinder=pf, energy_kev=args.energy_kev, clen_m=args.clen_mm * 1e-3, chunk=args.chunk, index=index, **extra
    )


def _run(args, index: bool) -> int:
    from data_pipeline.host import keep_freed_memory, use_cpu_cores
    from data_pipeline.index_run import format_table, process_run, run_spec

    use_cpu_cores(args.cores)  # before any JAX computation; results do not depend on either
    keep_freed_memory()

    run_path = Path(args.run)
    if run_spec(run_path)[1] is None and not run_path.is_dir():
        raise InputError(f"run directory {run_path} does not exist.")
    if args.geometry and not Path(args.geometry).is_file():
        raise InputError(f"geometry file {args.geometry} does not exist.")
    stats = process_run(
        run_path,
        args.out,
        geometry_path=args.geometry,
        config=_config(args, index),
        resume=args.resume,
        max_frames=args.max_frames,
        progress=not args.quiet,
    )
    print(format_table(stats["table_s1"]))
    if "validation" in stats:
        print(json.dumps(stats["validation"], indent=1))
    if stats["read_report"]["entries"]:
        print(f"skipped: {len(stats['read_report']['entries'])} entries (see {Path(args.out) / 'stats.json'})",
              file=sys.stderr)  # fmt: skip
    if not stats["finished"]:
        print(f"stopped after {stats['frames_done']} frames; continue with --resume", file=sys.stderr)
    return 0


def run_find_peaks(args) -> int:
    return _run(args, index=False)


def run_index(args) -> int:
    return _run(args, index=True)
