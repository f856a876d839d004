"""`jaxpolaron synth-run OUT_DIR`: a synthetic EuXFEL run (EXDF layout, AGIPD-1M, bunch pattern, geometry, truth).

Pipeline: |F|² tables per crystal size, dark and pumped with the chosen deformation model
(`data_pipeline.synthetic.crystal_volumes`; the models and flags of `jaxpolaron simulate`), then frames streamed
to disk one sequence file at a time (`data_pipeline.run_io.write_run`; constant memory, progress bar on stderr).
OUT_DIR gets the run files, agipd.geom, truth.hdf5, config.json (with provenance) and volumes.hdf5 (the tables:
`--resume` reloads them, because the multithreaded NUFFT is not bitwise reproducible between processes, so
a resumed run is identical to one written in one go).

Measured on 2 CPU cores (grid 257, sizes 3–8 nm, random-hole with 4 variants, hit fraction 0.3, 32 pulses
per train): 30 tables in ~116 s (incl. writing volumes.hdf5, 2 GB); frames 0.052 s each for a 1,024-frame run
and 0.066 s for 5,024 frames (generation, gzip, HDF5), 8 min 18 s in all; peak RSS 4.7 GB for both (the
tables), ~40 kB of run files per frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from jaxpolaron.errors import InputError

log = logging.getLogger(__name__)

VOLUMES_FILE = "volumes.hdf5"  # not *.h5: extra-data would try to open it as a run file
# what a run killed before its first sequence was complete holds besides the tables (`--resume` rewrites them)
RESUMABLE_LEFTOVERS = ("config.json", "agipd.geom", "truth.hdf5", "karabo_data_map.json")
MODEL_FLAGS = (
    "k_cs",
    "k_pb",
    "k_br",
    "hole_bias",
    "electron_strength",
    "softening_a",
    "amplitude",
    "t0",
    "width_fraction",
    "tilt_profile",
    "exponent",
    "centre",
)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value

    return parse


def add_parser(sub) -> None:
    from jaxpolaron.cli import _float_list, _positive_float, add_deformation_arguments

    p = sub.add_parser(
        "synth-run",
        help="write a synthetic EuXFEL run (AGIPD-1M, EXDF layout) of CsPbBr3 nanocrystals",
        description="Write a synthetic European XFEL run directory that extra_data.RunDirectory opens: 16 AGIPD "
        "module sources, the timeserver bunch pattern (pump laser on every other X-ray pulse), a CrystFEL .geom, "
        "and truth.hdf5 with every crystal's orientation, size, pump state and hole variant.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="run directory to create (must be empty or absent)")
    p.add_argument("--trains", type=_int_at_least(1), default=10, help="trains (10)")
    p.add_argument("--pulses", type=_int_at_least(1), default=32, help="X-ray pulses (frames) per train (32)")
    p.add_argument("--hit-fraction", type=float, default=0.3, help="fraction of frames with crystals (0.3)")
    p.add_argument("--mean-crystals", type=float, default=1.6, help="mean crystals per hit, >= 1 (1.6)")
    p.add_argument("--max-crystals", type=_int_at_least(1), default=6, help="cap on crystals per hit (6)")
    p.add_argument("--fluence", type=float, default=5e13, help="incident photons per µm² per pulse (5e13)")
    p.add_argument("--sizes-nm", "--sizes", type=_float_list, help="crystal sizes tabulated, nm (3,4,5,6,7,8)")
    p.add_argument("--gamma-shape", type=_positive_float, default=2.0, help="Gamma size shape (2.0)")
    p.add_argument("--mean-nm", type=_positive_float, default=5.4, help="Gamma mean size, nm (5.4)")
    p.add_argument("--grid", type=_int_at_least(3), default=257, help="table samples per axis (257; odd)")
    p.add_argument("--q-max", type=_positive_float, default=1.0, help="table reach, Å⁻¹ (1.0: covers AGIPD)")
    p.add_argument("--ring-photons", type=float, default=0.05, help="diffuse-ring photons per pixel at peak (0.05)")
    p.add_argument("--bad-pixel-fraction", type=float, default=1e-3, help="random bad pixels (1e-3)")
    p.add_argument("--energy-kev", type=_positive_float, default=13.6, help="photon energy, keV (13.6)")
    p.add_argument("--clen-mm", type=_positive_float, default=122.4, help="detector distance, mm (122.4)")
    p.add_argument(
        "--interpolation",
        default="cubic",
        choices=("cubic", "linear"),
        help="of the |F|² tables at each pixel: cubic (Catmull-Rom) or linear (smooths peaks) (cubic)",
    )
    p.add_argument(
        "--paired-classes",
        action="store_true",
        help="each pump group of frames holds the same crystals (bias studies; off in real-like runs)",
    )
    p.add_argument("--no-noise", action="store_true", help="write λ itself, no Poisson noise (bias studies)")
    p.add_argument("--geom", help="CrystFEL .geom of the detector (default: standard SPB quadrant positions)")
    m = p.add_argument_group("pumped crystals: deformation model (as `jaxpolaron simulate`)")
    m.add_argument("--model", default="none", help="none, central-hole, random-hole, tilt or phonon (none)")
    m.add_argument("--variants", type=_int_at_least(1), default=4, help="hole realisations per size (random; 4)")
    add_deformation_arguments(m)
    m.add_argument("--exponent", type=float, default=5.0, help="superellipsoid exponent of the crystals (5.0)")
    m.add_argument("--centre", default="Pb", help="species at the crystal centre (Pb)")
    r = p.add_argument_group("run layout and output")
    r.add_argument("--seed", type=int, default=0, help="PRNG seed of everything random (0)")
    r.add_argument("--run-number", type=_int_at_least(1), default=1, help="run number in file names (1)")
    r.add_argument("--first-train", type=_int_at_least(1), default=10000, help="first train id (10000)")
    r.add_argument("--pump-every", type=_int_at_least(1), default=2, help="pump laser on every Nth pulse (2)")
    r.add_argument("--trains-per-file", type=_int_at_least(1), default=250, help="trains per sequence file (250)")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
    p.set_defaults(func=run)


def configs(args: argparse.Namespace):
    """(SyntheticConfig, RunLayout, SimulateConfig model) from parsed flags; InputError for bad values."""
    from data_pipeline.synthetic import RunLayout, SyntheticConfig, model_config

    for name in ("hit_fraction", "mean_crystals", "fluence", "ring_photons", "bad_pixel_fraction"):
        if not np.isfinite(getattr(args, name)):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}.")
    if args.grid % 2 == 0:
        raise InputError(f"--grid must be odd (q = 0 on a sample), got {args.grid}.")
    model = model_config(args.model, seed=args.seed, **{k: getattr(args, k) for k in MODEL_FLAGS})
    kw = {"sizes_nm": tuple(args.sizes_nm)} if args.sizes_nm else {}
    synth = SyntheticConfig(
        energy_kev=args.energy_kev,
        clen_m=args.clen_mm * 1e-3,
        gamma_shape=args.gamma_shape,
        mean_size_nm=args.mean_nm,
        mean_crystals=args.mean_crystals,
        max_crystals=args.max_crystals,
        hit_fraction=args.hit_fraction,
        fluence_ph_per_um2=args.fluence,
        ring_photons=args.ring_photons,
        bad_pixel_fraction=args.bad_pixel_fraction,
        grid_n=args.grid,
        q_max=args.q_max,
        n_variants=args.variants,
        interpolation=args.interpolation,
        paired=args.paired_classes,
        noise=not args.no_noise,
        **kw,
    )
    layout = RunLayout(
        n_trains=args.trains, n_pulses=args.pulses, first_train=args.first_train, pump_every=args.pump_every
    )
    return synth, layout, model


def _model_dict(model) -> dict:
    keep = ("model", "seed", *MODEL_FLAGS)
    return {k: v for k, v in dataclasses.asdict(model).items() if k in keep}


def _check_out_dir(out: Path, args) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT_DIR {out} exists and is not a directory.")
    if args.resume:
        if not out.is_dir():
            raise InputError(f"nothing to resume: {out} does not exist.")
        return
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise InputError(f"OUT_DIR {out} is not empty; pass --overwrite to replace it or --resume to continue.")
        if not (out / "config.json").is_file() or not (out / "truth.hdf5").is_file():
            raise InputError(f"--overwrite only replaces a previous synthetic run; {out} does not look like one.")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out}: {exc.strerror or exc}.") from None


def _save_volumes(path: Path, vol) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("tables", data=np.asarray(vol.tables), chunks=(1, *vol.tables.shape[1:3], 1))
        for name in ("dark_index", "pumped_index", "sizes_nm", "holes"):
            f[name] = np.asarray(getattr(vol, name))
        f.attrs["voxel"], f.attrs["origin_index"] = vol.voxel, vol.origin_index
        f.attrs["note"] = "|F|² in electrons² on the crystal-frame grid; q = (index - origin_index) * voxel, Å⁻¹"


def _load_volumes(path: Path):
    import h5py
    import jax.numpy as jnp

    from data_pipeline.synthetic import Volumes

    try:
        with h5py.File(path, "r") as f:
            return Volumes(
                tables=jnp.asarray(f["tables"][()]),
                dark_index=jnp.asarray(f["dark_index"][()]),
                pumped_index=jnp.asarray(f["pumped_index"][()]),
                sizes_nm=jnp.asarray(f["sizes_nm"][()]),
                holes=jnp.asarray(f["holes"][()]),
                voxel=float(f.attrs["voxel"]),
                origin_index=int(f.attrs["origin_index"]),
            )
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot resume: {path} is unreadable ({exc}); start again with --overwrite.") from None


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from data_pipeline import run_io, synthetic
    from jaxpolaron.structure import read_cif

    synth, layout, model = configs(args)
    out = Path(args.out_dir)
    geometry = run_io.load_geometry(args.geom) if args.geom else None
    if geometry is None:
        from data_pipeline.geometry import default_agipd_geometry

        geometry = default_agipd_geometry()
    settings = {"synthetic": synth.to_dict(), "model": _model_dict(model), "seed": args.seed}
    _check_out_dir(out, args)
    start = 0
    if args.resume:
        try:
            saved = json.loads((out / run_io.CONFIG_FILE).read_text())
        except (OSError, ValueError):
            raise InputError(f"cannot resume: {out / run_io.CONFIG_FILE} is missing or unreadable.") from None
        now = {**json.loads(json.dumps(settings)), "layout": layout.to_dict(), "trains_per_file": args.trains_per_file}
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            raise InputError(f"cannot resume {out}: settings differ from the interrupted run ({', '.join(diff)}).")
        start = run_io.complete_sequences(out, layout, trains_per_file=args.trains_per_file, run_number=args.run_number)
        n_seq = -(-layout.n_trains // args.trains_per_file)
        if start == n_seq:
            log.info("%s is already complete (%d sequence files)", out, n_seq)
            return 0
        log.info("resuming %s at sequence %d of %d", out, start, n_seq)

    key = jax.random.key(args.seed)
    k_det, k_frames, k_holes = jax.random.split(key, 3)
    det = synthetic.detector(geometry, synth, key=k_det)
    t0 = time.perf_counter()
    if args.resume and (out / VOLUMES_FILE).is_file():
        vol = _load_volumes(out / VOLUMES_FILE)
    else:

        def progress(items):
            return tqdm(items, desc="crystal tables", unit="size", disable=args.quiet, file=sys.stderr)

        vol = synthetic.crystal_volumes(read_cif(), synth, model=model, key=k_holes, progress=progress)
        _save_volumes(out / VOLUMES_FILE, vol)
        log.info("%d |F|² tables of %d³ in %.1f s", vol.tables.shape[0], synth.grid_n, time.perf_counter() - t0)
    per_seq = args.trains_per_file * layout.n_pulses
    frames = synthetic.frames(k_frames, det, vol, synth, layout, start=min(start * per_seq, layout.n_frames))
    t1 = time.perf_counter()
    run_io.write_run(
        out,
        frames,
        layout=layout,
        geometry=geometry,
        mask=synthetic.bad_pixel_mask(det),
        config=settings,
        truth_attrs={
            "sizes_nm": np.asarray(vol.sizes_nm),
            "hole_positions_A": np.asarray(vol.holes),
            "dark_index": np.asarray(vol.dark_index),
            "pumped_index": np.asarray(vol.pumped_index),
        },
        run_number=args.run_number,
        trains_per_file=args.trains_per_file,
        progress=not args.quiet,
        start_sequence=start,
        # killed during the first sequence: its config, geometry and truth files are there and are rewritten (and
        # extra-data may have left its file-map cache if the partial run was opened)
        allow=(VOLUMES_FILE, *(RESUMABLE_LEFTOVERS if args.resume else ())),
    )
    n_new = layout.n_frames - min(start * per_seq, layout.n_frames)
    log.info("wrote %d frames to %s in %.1f s (%.3f s/frame)", n_new, out, time.perf_counter() - t1,
             (time.perf_counter() - t1) / max(n_new, 1))  # fmt: skip
    return 0
