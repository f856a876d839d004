"""`jaxpolaron fit VOLUMES.h5 --model random-hole --fit k_br,hole_bias,amplitude --out runs/`."""

from __future__ import annotations

import logging

from jaxpolaron.cli import _positive_float, _positive_int
from jaxpolaron.errors import InputError
from jaxpolaron.reciprocal import parse_hkl

log = logging.getLogger("jaxpolaron")


def parse_values(text: str | None) -> dict[str, float]:
    """'k_br=0.4,hole_bias=0.1' → {"k_br": 0.4, "hole_bias": 0.1}; one-line InputError otherwise."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"cannot read {item.strip()!r}: write NAME=VALUE, e.g. k_br=0.4.") from None
    return out


def parse_hkls(text: str) -> tuple[tuple[int, int, int], ...]:
    """'200,110,1-11' → ((2, 0, 0), (1, 1, 0), (1, -1, 1))."""
    return tuple(parse_hkl(h) for h in text.split(",") if h.strip())


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="fit a deformation model to the difference volume of a volume file (optax gradient descent)",
        description="Fit deformation-model parameters to the family-averaged peak windows of a merged (or "
        "simulated full-grid) difference volume; writes a run folder (config, metrics per step, parameters with "
        "Laplace uncertainties, loss curve, measured-vs-fitted peak figure) under --out and a line to its index.",
    )
    p.add_argument("volumes", help="volume file (jaxpolaron reduce, or jaxpolaron simulate --grid)")
    p.add_argument("--model", default="random-hole", help="random-hole, central-hole, tilt or phonon (random-hole)")
    p.add_argument("--fit", default="k_br,hole_bias,amplitude", help="parameters to fit, comma-separated")
    p.add_argument("--init", help="starting/fixed values, e.g. k_br=0.5,hole_bias=0.2 (model defaults)")
    p.add_argument("--out", required=True, help="output root; each fit gets a run folder inside it")
    p.add_argument("--hkl", default="200,110,111,220", help="reflections of the fit windows (200,110,111,220)")
    p.add_argument("--half", type=_positive_int, default=3, help="window half width, voxels (3: 7³ windows)")
    p.add_argument("--sizes-nm", default="3,4,5,6,7,8", help="simulated crystal sizes, nm (3,4,5,6,7,8)")
    p.add_argument("--gamma-shape", type=_positive_float, default=2.0, help="Gamma size shape (2.0)")
    p.add_argument("--mean-nm", type=_positive_float, default=5.4, help="Gamma mean size, nm (5.4)")
    p.add_argument(
        "--size-weighting",
        default="peak",
        help="peak (as per-crystal scaling), number, or dark (a size mixture per family fitted to the dark) (peak)",
    )
    p.add_argument("--occupancy", default="paper", help="paper (P = 0.37, 0.50, 0.13) or one-pair (paper)")
    p.add_argument("--method", default="linear", help="accurate, linear, second or exact ΔI (linear)")
    p.add_argument("--holes", type=_positive_int, default=256, help="hole samples per size (256)")
    p.add_argument("--nodes", type=_positive_int, default=4096, help="quadrature nodes of --method accurate (4096)")
    p.add_argument("--weighting", default="poisson", help="poisson, relative, lsq (merge counts) or uniform (poisson)")
    p.add_argument(
        "--scale",
        default="dark",
        help="dark (fixed from the dark volume), pumped (+ a pumped-class scale, like per-crystal scaling) or free",
    )
    p.add_argument("--optimizer", default="adam", help="adam, adabelief, sgd or lbfgs (adam)")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate (0.05)")
    p.add_argument("--steps", type=_positive_int, default=300, help="maximum steps per start (300)")
    p.add_argument("--patience", type=_positive_int, default=25, help="early stop after this many flat steps (25)")
    p.add_argument("--starts", type=_positive_int, default=4, help="Latin-hypercube starts (4)")
    p.add_argument("--profile", help="also profile χ² along this fitted parameter")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of holes and starts (0)")
    p.add_argument("--neutral", action="store_true", help="neutral-atom f0 (default: ionic, as synthetic runs)")
    p.add_argument("--voxel-points", type=int, default=0,
                   help="Gauss–Legendre nodes per voxel axis of the model's voxel average (1–4; 0: 2 for merged "
                        "volumes, whose voxels are means over the voxel, 1 for simulated grids) (0)")  # fmt: skip
    p.add_argument("--x64", action="store_true", help="compute in float64 (default float32; recorded in the run)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.x64:  # before anything is built: arrays made earlier would stay float32
        import jax

        jax.config.update("jax_enable_x64", True)
    from fitting.parameters import model_parameters, select
    from fitting.run_fit import FitConfig, fit, format_result, load_windows
    from jaxpolaron.ensemble import validate_sizes
    from jaxpolaron.structure import read_cif

    try:
        sizes = validate_sizes(float(s) for s in args.sizes_nm.split(",") if s.strip())
    except ValueError:
        raise InputError(f"cannot read --sizes-nm {args.sizes_nm!r}: give sizes in nm, e.g. 3,4,5.") from None
    config = FitConfig(
        model=args.model,
        fit=tuple(s.strip() for s in args.fit.split(",") if s.strip()),
        init=parse_values(args.init),
        hkls=parse_hkls(args.hkl),
        half=args.half,
        sizes_nm=sizes,
        gamma_shape=args.gamma_shape,
        mean_nm=args.mean_nm,
        size_weighting=args.size_weighting,
        ions=not args.neutral,
        occupancy=args.occupancy,
        method=args.method,
        n_holes=args.holes,
        nodes=args.nodes,
        seed=args.seed,
        weighting=args.weighting,
        scale=args.scale,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        max_steps=args.steps,
        patience=args.patience,
        starts=args.starts,
        profile=args.profile,
        x64=args.x64,
        voxel_points=args.voxel_points,
    )
    config.validate()
    structure = read_cif()
    # parameter names and degeneracies are checked before any file is read or anything compiled
    select(config.model, config.fit, structure.species, free_scale=config.scale == "free")
    unknown = [n for n in config.init if n not in model_parameters(config.model, structure.species)]
    if unknown:
        raise InputError(f"--init names {', '.join(unknown)}, which model {config.model} does not have.")
    windows = load_windows(args.volumes, config, structure)
    outcome = fit(config, windows, structure=structure, out_root=args.out, inputs={"volumes": str(args.volumes)},
                  progress=not args.quiet)  # fmt: skip
    print(format_result(outcome))
    print(f"run folder: {outcome.run_dir}")
    return 0
