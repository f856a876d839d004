"""`jaxpolaron reduce RUN --out volumes.h5`: every reduction stage end to end (data_pipeline.reduce_run)."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxpolaron.cli import _positive_float, _positive_int
from jaxpolaron.errors import InputError

log = logging.getLogger("jaxpolaron")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reduce",
        help="peaks, indexing, background, scaling, rejection and 3D merging: dark, pumped and difference volumes",
        description="Reduce a run to dark, pumped and difference intensity volumes in the crystal frame "
        "(NeXus/HDF5), with the statistics table, central-slice, powder and scaling figures beside it. "
        "Checkpoints go to OUT_STEM.work/ (or --work); --resume continues an interrupted reduction.",
    )
    p.add_argument("run", help="run directory (EXDF files), or PROPOSAL:RUN at EuXFEL")
    p.add_argument("--out", required=True, help="volume file to write (.h5)")
    p.add_argument("--index-dir", help="an existing `jaxpolaron index` output folder (default: index into --work)")
    p.add_argument("--work", help="folder for the index results and checkpoints (default OUT_STEM.work)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted reduction")
    p.add_argument("--grid", type=_positive_int, default=257, help="merge grid samples per axis (257)")
    p.add_argument("--q-max", type=_positive_float, default=1.0, help="merge grid reach, Å⁻¹ (1.0)")
    p.add_argument("--mode", default="nearest", help="merge into the nearest voxel or trilinear (nearest)")
    p.add_argument("--min-similarity", type=float, default=0.3,
                   help="reject crystals whose cosine similarity to the reference is below this (0.3)")  # fmt: skip
    p.add_argument("--crystal-weighting", default="inverse-scale",
                   help="crystals' weight in the voxel means: inverse-scale (Poisson maximum likelihood: "
                        "faint, strongly scaled crystals count less) or uniform (the paper's plain mean) "
                        "(inverse-scale)")  # fmt: skip
    p.add_argument("--scaling", default="reference",
                   help="per-crystal scales: reference (from the reference's brightest pixels) or unit (all 1: only "
                        "for runs of constant fluence, e.g. synthetic bias studies) (reference)")  # fmt: skip
    p.add_argument("--mask-radius", type=_positive_float, default=4.0,
                   help="pixels excluded around peaks not indexed into a crystal and from backgrounds (4)")  # fmt: skip
    p.add_argument("--background-components", type=_positive_int, default=3, help="SVD components (3)")
    p.add_argument("--unit-frames", type=_positive_int, default=256, help="frames per work unit/checkpoint (256)")
    p.add_argument("--scheduler", help="local:N (Dask LocalCluster of N workers) or tcp://HOST:PORT (default: here)")
    p.add_argument("--cluster", metavar="slurm[:JOBS|:key=value,...]",
                   help="Dask workers as SLURM jobs (dask-jobqueue), e.g. slurm:4, slurm:queue=upex")  # fmt: skip
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.set_defaults(func=run)


def run(args) -> int:
    from data_pipeline.reduce_run import ReduceConfig, format_merge_table, reduce_run

    if args.scheduler and args.cluster:
        raise InputError("give either --scheduler or --cluster, not both.")
    config = ReduceConfig(grid_n=args.grid, q_max=args.q_max, mode=args.mode, min_similarity=args.min_similarity,
                          crystal_weighting=args.crystal_weighting, scaling=args.scaling,
                          mask_radius_px=args.mask_radius, background_components=args.background_components,
                          unit_frames=args.unit_frames)  # fmt: skip
    out = Path(args.out)
    stats = reduce_run(args.run, out, config=config, index_dir=args.index_dir, work_dir=args.work,
                       scheduler=args.scheduler, cluster=args.cluster, resume=args.resume,
                       progress=not args.quiet, figures=not args.no_figures)  # fmt: skip
    print(format_merge_table(stats))
    log.info("wrote %s", out)
    return 0
