"""Command-line interface: `jaxpolaron simulate ...`.

User mistakes (`InputError`, bad flags) print one line `jaxpolaron: error: ...` and exit 2; anything else
is a bug and keeps its traceback. Logging and progress bars go to stderr so `--json` output on stdout
stays machine-readable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence

from jaxpolaron.errors import InputError

log = logging.getLogger("jaxpolaron")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a single line (no usage dump)."""

    def error(self, message: str):
        raise InputError(f"{message} (see `{self.prog} --help`)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_deformation_arguments(group) -> None:
    """The deformation-model parameter flags shared by `simulate` and `synth-run`."""
    m = group
    m.add_argument("--k-cs", type=_positive_float, default=1.0, help="Cs spring constant (relative; 1)")
    m.add_argument("--k-pb", type=_positive_float, default=1.0, help="Pb spring constant (relative; 1)")
    m.add_argument("--k-br", type=_positive_float, default=1.0, help="Br spring constant (relative; 1)")
    m.add_argument("--hole-bias", type=_positive_float, default=0.1, help="hole bias exponent (1 uniform; 0.1)")
    m.add_argument("--electron-strength", type=float, default=1.0, help="electron sphere charge factor (1)")
    m.add_argument("--softening-a", type=_positive_float, default=1.0, help="hole field softening, Å (1.0)")
    m.add_argument("--amplitude", type=float, help="model amplitude, Å (model default)")
    m.add_argument("--t0", type=float, default=0.8, help="tilt parameter at the centre (0.8; >1 = more tilt)")
    m.add_argument("--width-fraction", type=_positive_float, help="tilt/phonon profile width / (size/2)")
    m.add_argument("--tilt-profile", default="quadratic", help="tilt profile: quadratic (paper) or gaussian")


def _hkl_list(text: str) -> tuple[tuple[int, int, int], ...]:
    from jaxpolaron.reciprocal import parse_hkl

    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(parse_hkl(t) for t in text.split(",") if t.strip())
    except InputError as exc:  # argparse would replace a ValueError's message with a generic one
        raise argparse.ArgumentTypeError(str(exc)) from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate dark/pump/difference volumes of a nanocrystal or a size ensemble",
        description="Simulate 3D diffraction volumes (crystal frame, |q| = 1/d in Å⁻¹) of CsPbBr3 "
        "nanocrystals: windows around pseudo-cubic hkl and/or a full grid.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size-nm", type=float, help="edge length of a single crystal, nm")
    size.add_argument(
        "--ensemble", action="store_true", help="Gamma size ensemble (default when --size-nm is not given)"
    )
    p.add_argument("--sizes-nm", type=_float_list, help="ensemble sizes, nm (default 3,4,...,15)")
    p.add_argument("--gamma-shape", type=_positive_float, default=2.0, help="Gamma shape (default 2.0)")
    p.add_argument("--mean-nm", type=_positive_float, default=5.4, help="ensemble mean size, nm (default 5.4)")
    p.add_argument("--exponent", type=float, default=5.0, help="superellipsoid exponent (default 5.0)")
    p.add_argument("--centre", default="Pb", help="species whose site is the crystal centre (default Pb)")
    p.add_argument(
        "--model",
        default="none",
        help="deformation model: none, central-hole, random-hole, tilt, phonon or external (default none)",
    )
    method = p.add_mutually_exclusive_group()
    method.add_argument(
        "--exact", dest="method", action="store_const", const="exact", help="ΔI from |F|² of each sample"
    )
    method.add_argument(
        "--linear", dest="method", action="store_const", const="linear", help="first order (default, not random-hole)"
    )
    method.add_argument("--second-order", dest="method", action="store_const", const="second", help="+ 2nd order")
    method.add_argument(
        "--accurate",
        dest="method",
        action="store_const",
        const="accurate",
        help="random hole (its default): quadrature hole average, exact near pairs (within 1-2 %% of --exact, no seed)",
    )
    m = p.add_argument_group("model parameters")
    m.add_argument("--holes", type=int, default=64, help="hole samples per crystal size (random-hole; 64)")
    m.add_argument("--nodes", type=int, default=4096, help="quadrature nodes of --accurate (a power of two; 4096)")
    m.add_argument("--seed", type=int, default=0, help="PRNG seed for hole sampling (0)")
    add_deformation_arguments(m)
    m.add_argument("--ground-xyz", help="external model: ground-state geometry (.xyz, Å, crystal frame)")
    m.add_argument("--excited-xyz", help="external model: excited-state geometry (.xyz, same atom order)")
    m.add_argument("--gamma0-t", type=float, default=1.0, help="occupancy γ0·t (SI S2; 1.0)")
    m.add_argument("--gamma-ratio", type=float, default=0.4, help="occupancy γ1/γ0 (SI S2; 0.4)")
    p.add_argument(
        "--hkl",
        type=_hkl_list,
        help="windows around pseudo-cubic hkl (default 200,110,111,400; 'none' for no windows)",
    )
    p.add_argument("--window", type=int, default=33, help="window size in voxels per axis (default 33)")
    p.add_argument("--voxel", type=_positive_float, default=0.0025, help="window voxel, Å⁻¹ (default 0.0025)")
    p.add_argument("--grid", type=int, help="also simulate a full N³ grid around q = 0")
    p.add_argument("--grid-q-max", type=_positive_float, default=0.75, help="full-grid reach, Å⁻¹ (0.75)")
    p.add_argument("--energy-kev", type=_positive_float, default=13.6, help="beam energy, keV (13.6)")
    p.add_argument("--ions", action="store_true", help="ionic f0 (formal charges from the CIF)")
    p.add_argument("--cif", help="structure CIF (default: bundled Pnma CsPbBr3, mp-567629)")
    p.add_argument("--engine", default="auto", help="auto, direct, separable or nufft")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    p.add_argument("--out", help="volume file to write (HDF5, NeXus)")
    p.add_argument("--png", help="figure to write (slices)")
    p.add_argument("--json", action="store_true", help="print the per-peak table as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")


def _run_simulate(args: argparse.Namespace) -> int:
    import os

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    # Each crystal size compiles its own programs (~2 s each); keep them across runs.
    cache = os.environ.get("JAXPOLARON_CACHE", os.path.expanduser("~/.cache/jaxpolaron/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    from tqdm import tqdm

    from jaxpolaron import io, plotting
    from jaxpolaron.simulate import DEFAULT_HKLS, SimulateConfig, simulate
    from jaxpolaron.structure import read_cif

    # Fail on unwritable outputs before any long computation.
    out = io.check_writable(args.out) if args.out else None
    png = io.check_writable(args.png) if args.png else None
    hkls = args.hkl if args.hkl is not None else DEFAULT_HKLS
    config = SimulateConfig(
        cif=args.cif,
        model=args.model,
        size_nm=args.size_nm,
        **({"sizes_nm": args.sizes_nm} if args.sizes_nm else {}),
        gamma_shape=args.gamma_shape,
        mean_nm=args.mean_nm,
        exponent=args.exponent,
        centre=args.centre,
        hkls=hkls,
        window_shape=args.window,
        window_voxel=args.voxel,
        grid=args.grid,
        grid_q_max=args.grid_q_max,
        energy_kev=args.energy_kev,
        ions=args.ions,
        engine=args.engine,
        x64=args.x64,
        # the random hole defaults to the accurate ΔI: the linear one is 23–59 % off at its physical amplitudes
        method=args.method or ("accurate" if args.model == "random-hole" else "linear"),
        holes=args.holes,
        nodes=args.nodes,
        seed=args.seed,
        gamma0_t=args.gamma0_t,
        gamma_ratio=args.gamma_ratio,
        k_cs=args.k_cs,
        k_pb=args.k_pb,
        k_br=args.k_br,
        hole_bias=args.hole_bias,
        electron_strength=args.electron_strength,
        softening_a=args.softening_a,
        amplitude=args.amplitude,
        t0=args.t0,
        width_fraction=args.width_fraction,
        tilt_profile=args.tilt_profile,
        ground_xyz=args.ground_xyz,
        excited_xyz=args.excited_xyz,
    )
    config.validate()
    structure = read_cif(args.cif)
    t0 = time.perf_counter()

    def progress(items):
        return tqdm(items, desc="crystal sizes", unit="size", disable=args.quiet or len(items) < 2, file=sys.stderr)

    result = simulate(structure, config, progress=progress)
    log.info("simulated %d volume(s) in %.1f s", len(result.volumes), time.perf_counter() - t0)

    if out is not None:
        volumes = [io.Volume(name=v.name, axes=v.axes, dark=v.dark, pump=v.pump, hkl=v.hkl) for v in result.volumes]
        inputs = {"cif": structure.source}
        for name in ("ground_xyz", "excited_xyz"):
            if getattr(args, name):
                inputs[name] = io.describe_input(getattr(args, name))
        prov = io.provenance(inputs)
        stats = {
            "peaks": result.peaks,
            "sizes_nm": list(result.sizes_nm),
            "size_weights": list(result.weights),
            "n_atoms": list(result.n_atoms),
        }
        io.write_volume_file(out, volumes, {"simulate": dataclasses.asdict(config)}, provenance=prov, statistics=stats)
        log.info("wrote %s", out)
    if png is not None:
        _figures(result, png, plotting)
    if args.json:
        json.dump({"peaks": result.peaks}, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    return 0


def _figures(result, png, plotting) -> None:
    windows = [v for v in result.volumes if v.hkl is not None]
    grids = [v for v in result.volumes if v.hkl is None]
    peak_png = png
    if grids:
        g = grids[0]
        plotting.plot_central_slices(g.axes, g.dark, png, title="dark", difference=g.pump - g.dark)
        log.info("wrote %s", png)
        peak_png = png.with_name(png.stem + "_peaks" + png.suffix)
    if windows:
        import numpy as np

        plotting.plot_windows(
            [(v.name.removeprefix("hkl_"), v.axes, np.array([a[len(a) // 2] for a in v.axes])) for v in windows],
            [v.dark for v in windows],
            [v.pump - v.dark for v in windows],
            peak_png,
        )
        log.info("wrote %s", peak_png)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="jaxpolaron", description="Differential X-ray diffraction of nanocrystals.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_OneLineParser)
    _add_simulate(sub)
    # Reduction commands live with the pipeline; each module's add_parser(sub, common) registers a
    # subcommand whose parser carries `func` (args -> exit code).
    from data_pipeline import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.version:
            from jaxpolaron import __version__

            print(__version__)
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        logging.basicConfig(
            level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" probe noise
        if args.command == "simulate":
            return _run_simulate(args)
        return args.func(args)
    except InputError as exc:
        print(f"jaxpolaron: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxpolaron: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
