"""One logged fit, end to end: volume → family-averaged windows → objective → multi-start descent →
Laplace uncertainties (+ an optional profile) → information criteria → run folder.

Used by `jaxpolaron fit`, `jaxpolaron demo` and the scripts in experiments/.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fitting.forward import build_forward, calibrate_to_dark, one_pair
from fitting.objective import SCALE_MODES, WEIGHTINGS, Objective, make_objective
from fitting.optimise import StopRule, latin_hypercube, multistart
from fitting.parameters import FIT_MODELS, select, template_model
from fitting.uncertainty import (
    Laplace,
    Profile,
    information_criteria,
    laplace,
    model_shift,
    profile,
    scan_step,
    with_model_error,
)
from fitting.windows import MeasuredWindows, extract_windows, make_layout
from jaxpolaron.accurate_difference import outside_validated_range
from jaxpolaron.deformation.charge_field import RandomHole
from jaxpolaron.ensemble import METHODS
from jaxpolaron.errors import InputError
from jaxpolaron.excitation import Occupancy
from jaxpolaron.hole_quadrature import DEFAULT_NODES, valid_node_count
from jaxpolaron.reciprocal import hkl_label
from jaxpolaron.structure import CrystalStructure, read_cif

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adabelief": optax.adabelief,
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9),
    # quasi-Newton with a zoom line search: its own step lengths (the learning rate is not used); on the
    # few-parameter fits here it converges in tens of steps where Adam needs hundreds
    "lbfgs": lambda lr: optax.lbfgs(),
}
OCCUPANCIES = ("paper", "one-pair")
SIZE_WEIGHTINGS = ("number", "peak", "dark")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything that defines a fit (saved as config.json in the run folder).

    model/fit/init: model name, fitted parameter names, starting (and fixed) physical values by name.
    hkls/half: canonical reflections and window half width (voxels) of the family-averaged windows.
    sizes_nm/gamma_shape/mean_nm/size_weighting: the simulated size ensemble ("peak": each size normalised to
        its peak, as the reduction's per-crystal scaling does; "number": plain Gamma weights; "dark": one
        mixture of the sizes per reflection family fitted to the measured dark, `forward.calibrate_to_dark`).
    ions/exponent/centre: scattering factors and crystal cut. occupancy: "paper" (γ0t = 1, γ1/γ0 = 0.4) or
        "one-pair". method/n_holes/seed: ΔI method, hole samples per size and their PRNG seed; nodes: the
        quadrature nodes of method "accurate" (no seed).
    weighting/scale: see fitting.objective. optimizer/learning_rate/max_steps/patience/rel_tol/starts/
        start_width: the descent (starts drawn in z ± start_width). profile: a parameter to profile, or None.
    x64: the fit computes in float64. JAX must be switched to float64 before anything is built (`jaxpolaron fit
        --x64` does `jax.config.update("jax_enable_x64", True)` first; in Python, that or a `jax.enable_x64(True)`
        block around building the windows and calling `fit`); `fit` refuses x64 when JAX is in float32. False:
        the precision JAX is in. result.json records the one used as "precision".
    voxel_points: Gauss–Legendre nodes per voxel axis of the model's voxel average (`fitting.forward`); 0: 2 for
        merged volumes (their voxels are means over the voxel), 1 for simulated grids (centre values).
    """

    model: str = "random-hole"
    fit: tuple[str, ...] = ("k_br", "hole_bias", "amplitude")
    init: dict = dataclasses.field(default_factory=dict)
    hkls: tuple[tuple[int, int, int], ...] = ((2, 0, 0), (1, 1, 0), (1, 1, 1), (2, 2, 0))
    half: int = 3
    sizes_nm: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    gamma_shape: float = 2.0
    mean_nm: float = 5.4
    size_weighting: str = "number"
    ions: bool = True
    exponent: float = 5.0
    centre: str = "Pb"
    occupancy: str = "paper"
    method: str = "linear"
    n_holes: int = 256
    nodes: int = DEFAULT_NODES
    seed: int = 0
    weighting: str = "poisson"
    scale: str = "dark"
    optimizer: str = "adam"
    learning_rate: float = 0.05
    max_steps: int = 300
    patience: int = 25
    rel_tol: float = 1e-5
    starts: int = 4
    start_width: float = 1.0
    profile: str | None = None
    x64: bool = False
    voxel_points: int = 0

    def validate(self) -> None:
        checks = [
            (self.model in FIT_MODELS, f"unknown model {self.model!r}; choose from {', '.join(FIT_MODELS)}"),
            (self.weighting in WEIGHTINGS, f"unknown weighting {self.weighting!r}; choose from {WEIGHTINGS}"),
            (self.scale in SCALE_MODES, f"unknown scale {self.scale!r}; choose from {SCALE_MODES}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {tuple(OPTIMIZERS)}"),
            (self.occupancy in OCCUPANCIES, f"unknown occupancy {self.occupancy!r}; choose from {OCCUPANCIES}"),
            (self.method in METHODS, f"unknown method {self.method!r}; choose from {METHODS}"),
            (self.size_weighting in SIZE_WEIGHTINGS, f"size weighting must be one of {', '.join(SIZE_WEIGHTINGS)}"),
            (self.half >= 1 and self.starts >= 1 and self.max_steps >= 1, "half, starts and steps must be >= 1"),
            (self.learning_rate > 0 and self.n_holes >= 1, "learning rate and hole samples must be positive"),
            (valid_node_count(self.nodes), f"--nodes must be a power of two >= 32, got {self.nodes}"),
            (0 <= self.voxel_points <= 4, f"--voxel-points must be 0 (automatic) to 4, got {self.voxel_points}"),
            (self.profile is None or self.profile in self.fit, f"--profile {self.profile} is not a fitted parameter"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message + ".")


@dataclasses.dataclass(frozen=True)
class FitOutcome:
    """What a fit returns: the objective, best z, uncertainties, criteria, the fitted ΔI and the run folder."""

    objective: Objective
    z: np.ndarray
    laplace: Laplace
    criteria: dict
    fitted: np.ndarray
    scale: float
    steps: int
    seconds: float
    run_dir: Path | None
    profile: Profile | None = None

    def parameters(self) -> dict[str, dict[str, float]]:
        return self.laplace.table()


def load_windows(volume_path: str | Path, config: FitConfig, structure: CrystalStructure) -> MeasuredWindows:
    """Family-averaged windows of the full grid in a volume file (one-line errors for unusable files)."""
    from jaxpolaron.io import read_volume_file

    vf = read_volume_file(volume_path)
    grids = [v for v in vf.volumes.values() if v.hkl is None]
    if not grids:
        raise InputError(f"{volume_path} holds no full grid volume (only peak windows); fitting needs a grid.")
    volume = grids[0]
    if volume.pump is None and volume.difference is None:
        raise InputError(f"{volume_path} has no difference (or pumped) group; nothing to fit.")
    windows = extract_windows(volume, lambda voxel: make_layout(structure.q_of_hkl, config.hkls, voxel, config.half))
    # a reduction merges every pixel of a voxel into it (voxel means); `simulate --grid` samples voxel centres
    return dataclasses.replace(windows, voxel_mean="reduce" in (vf.config or {}))


def build_objective(config: FitConfig, windows: MeasuredWindows, structure: CrystalStructure) -> Objective:
    """The objective of `config` on measured windows."""
    config.validate()
    grid = windows.layout.member_grid()
    occupancy = one_pair() if config.occupancy == "one-pair" else Occupancy()
    forward = build_forward(
        structure,
        grid,
        sizes_nm=config.sizes_nm,
        gamma_shape=config.gamma_shape,
        mean_nm=config.mean_nm,
        size_weighting="number" if config.size_weighting == "dark" else config.size_weighting,  # type: ignore[arg-type]
        ions=config.ions,
        exponent=config.exponent,
        centre=config.centre,
        occupancy=occupancy,
        n_holes=device_multiple(config.n_holes),
        method=config.method,  # type: ignore[arg-type]
        key=jax.random.key(config.seed),
        nodes=config.nodes,
        voxel_points=voxel_points(config, windows),
    )
    if config.size_weighting == "dark":
        forward = calibrate_to_dark(forward, windows)
    species = forward.crystals[0].species_names
    parameters = select(config.model, config.fit, species, free_scale=config.scale == "free")
    template = template_model(config.model, structure, forward.crystals[0], config.init)
    return make_objective(
        forward,
        template,
        parameters,
        windows,
        weighting=config.weighting,  # type: ignore[arg-type]
        scale_mode=config.scale,  # type: ignore[arg-type]
    )


def voxel_points(config: FitConfig, windows: MeasuredWindows) -> int:
    """Gauss–Legendre nodes per axis of the model's voxel average: `config.voxel_points`, or where it is 0,
    2 for merged windows (voxel means: exact for cubic variation per axis; fitted to 4³-node voxel means of the
    demo's windows it recovers the amplitude within 0.5 %, docs/closed_loop.md) and 1 (voxel centres) for simulated
    ones."""
    if config.voxel_points:
        return config.voxel_points
    return 2 if windows.voxel_mean else 1


def device_multiple(n: int) -> int:
    """n rounded up to a multiple of the local devices (hole samples are sharded over them)."""
    d = len(jax.devices())
    return -(-n // d) * d


LINEAR_AMPLITUDE_LIMIT = 0.002  # Å: above it the linear random-hole ΔI is ≳ 10 % off the exact one


def linear_method_warning(config: FitConfig, model) -> str | None:
    """A warning when a random hole is fitted with the linear ΔI at an amplitude where that is inaccurate.

    The hole-averaged field of a random hole is much smaller than each sample's, so the per-sample second-order
    terms compete with the first-order one: the linear ΔI is 23 % off the exact one at 0.005 Å and 59 % at
    0.02 Å (second order: 1.7 % and 27 %; experiments/parameter_recovery.py)."""
    amplitude = float(getattr(model, "amplitude", 0.0))
    if config.model != "random-hole" or config.method != "linear" or amplitude <= LINEAR_AMPLITUDE_LIMIT:
        return None
    return (f"the linear random-hole ΔI is inaccurate at amplitude {amplitude:.3g} Å (23 % off the exact ΔI at "
            "0.005 Å, 59 % at 0.02 Å): refit with --method accurate before quoting these values.")  # fmt: skip


def fit(
    config: FitConfig,
    windows: MeasuredWindows,
    *,
    structure: CrystalStructure | None = None,
    out_root: str | Path | None = None,
    label: str | None = None,
    inputs: dict | None = None,
    progress: bool = False,
) -> FitOutcome:
    """Run the fit of `config` on `windows`; with `out_root`, log it to a run folder (fitting.runlog).

    `config.x64` needs JAX in float64 already (FitConfig): `fit` does not switch precision itself, because
    programs traced in one precision and reused in the other (the `jax.enable_x64` context is thread-local and
    some of JAX's tracing caches are not) fail or silently mix dtypes."""
    if config.x64 and precision() != "float64":
        raise InputError(
            "the fit is configured for float64 (x64) but JAX computes in float32: call jax.config.update("
            '"jax_enable_x64", True) before building anything (jaxpolaron fit --x64).'
        )
    from fitting.runlog import PeakComparison, RunLog

    structure = read_cif() if structure is None else structure
    t0 = time.perf_counter()
    objective = build_objective(config, windows, structure)
    params = objective.parameters
    z0 = params.unconstrained(params.values(objective.template))
    starts = latin_hypercube(z0, config.starts, key=jax.random.key(config.seed + 1), half_width=config.start_width)
    runlog = None
    if out_root is not None:
        record = {"fit": dataclasses.asdict(config), "inputs": inputs or {}}
        runlog = RunLog(out_root, label or config.model, record)
    bar = _progress_bar(config, progress)

    def on_step(record: dict) -> None:
        x = np.asarray(params.physical(jnp.asarray(record["z"])))
        record = {**record, "params": dict(zip(params.names, x.tolist(), strict=True))}
        if runlog is not None:
            runlog.log_step(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(start=record["start"], loss=f"{record['loss']:.4g}")

    optimizer = OPTIMIZERS[config.optimizer](config.learning_rate)
    stop = StopRule(config.max_steps, config.patience, config.rel_tol)
    best, runs = multistart(objective, starts, optimizer, stop=stop, callback=on_step)
    if bar is not None:
        bar.close()
    unc = laplace(objective, best.z)
    if config.method == "accurate" and unc.positive_definite and unc.hessian is not None:
        # the quadrature of the hole average is a model error the data cannot reveal: the fit's values on a
        # rule of twice the nodes (one Newton step) tell how far it moves them, added in quadrature to σ
        forward = objective.forward
        finer = dataclasses.replace(objective, forward=dataclasses.replace(forward, nodes=2 * forward.nodes))
        unc = with_model_error(unc, model_shift(objective, finer, best.z, unc.hessian))
    criteria = information_criteria(unc.chi2, objective.n_free, objective.n_data)
    fitted, scale = objective.predict(jnp.asarray(best.z))
    fitted_model = params.apply(objective.template, jnp.asarray(best.z))
    warning = linear_method_warning(config, fitted_model)
    if config.method == "accurate" and isinstance(fitted_model, RandomHole):
        warning = outside_validated_range(fitted_model)
    if warning:
        log.warning(warning)
    if unc.sigma_note is not None and not best.converged:  # the note is printed by format_result
        advice = "raise --steps" + (" or try --optimizer lbfgs" if config.optimizer != "lbfgs" else "")
        stopped = f" The best start (#{best.start}) stopped at the step limit ({config.max_steps}): {advice}."
        unc = dataclasses.replace(unc, sigma_note=unc.sigma_note + stopped)
    result = {
        "warnings": [warning] if warning else [],
        "precision": precision(),
        "voxel_points": objective.forward.voxel_points,
        "parameters": unc.table(),
        "sigma_unavailable": unc.sigma_note,
        "sigma_unscaled": dict(zip(unc.names, unc.sigma_unscaled.tolist(), strict=True)),
        # accurate: σ = √(statistical² + quadrature²), the parts apart (the quadrature one from twice the nodes)
        "sigma_statistical": None
        if unc.sigma_statistical is None
        else dict(zip(unc.names, unc.sigma_statistical.tolist(), strict=True)),
        "sigma_quadrature": None
        if unc.sigma_model is None
        else dict(zip(unc.names, unc.sigma_model.tolist(), strict=True)),
        "correlation": unc.correlation.tolist(),
        "condition": unc.condition,
        "positive_definite": unc.positive_definite,
        "chi2": unc.chi2,
        "chi2_reduced": unc.chi2_reduced,
        "n_data": unc.n_data,
        "n_free": unc.n_free,
        **criteria,
        "scale": float(scale),
        "scale_mode": config.scale,
        "starts": [{"start": r.start, "loss": r.loss, "steps": r.steps, "converged": r.converged} for r in runs],
        "best_start": best.start,
    }
    prof = None
    if config.profile is not None:
        i = params.names.index(config.profile)
        dz = scan_step(unc, params, best.z, i)
        prof = profile(objective, best.z, i, n_sigma=2.0, dz=dz, chi2_reduced=unc.chi2_reduced)
        result["profile"] = {
            "name": prof.name,
            "values": prof.values.tolist(),
            "chi2": prof.chi2.tolist(),
            "interval_1sigma": list(prof.interval(1.0)),
            "interval_2sigma": list(prof.interval(2.0)),
        }
    seconds = time.perf_counter() - t0
    result["seconds"] = seconds
    run_dir = None
    if runlog is not None:
        layout = windows.layout
        comparison = PeakComparison(
            hkls=list(layout.hkls),
            centres=layout.centres(),
            voxel=layout.voxel,
            measured=np.asarray(objective.measured),
            fitted=np.asarray(fitted),
            units=windows.units,
        )
        summary = {
            "model": config.model,
            "chi2": round(unc.chi2, 6),
            "bic": round(criteria["bic"], 3),
            **{n: float(f"{v:.5g}") for n, v in zip(unc.names, unc.values, strict=True)},
        }
        run_dir = runlog.finish(result, summary=summary, comparison=comparison)
        if prof is not None:
            from jaxpolaron.plotting import plot_profile

            intervals = {"2σ": prof.interval(2.0), "1σ": prof.interval(1.0)}
            plot_profile(prof.name, prof.values, prof.chi2, prof.unit, run_dir / "profile.png", intervals=intervals,
                         title=run_dir.name)  # fmt: skip
    return FitOutcome(
        objective=objective,
        z=np.asarray(best.z),
        laplace=unc,
        criteria=criteria,
        fitted=np.asarray(fitted),
        scale=float(scale),
        steps=int(sum(r.steps for r in runs)),
        seconds=seconds,
        run_dir=run_dir,
        profile=prof,
    )


def precision() -> str:
    """The float dtype JAX computes in here: "float32", or "float64" where x64 is on (globally or in a context)."""
    return str(jnp.result_type(float))


def _progress_bar(config: FitConfig, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.starts * config.max_steps, desc=f"fit {config.model}", unit="step", leave=False)


def format_result(outcome: FitOutcome, truth: dict | None = None) -> str:
    """A plain-text table of the fitted parameters (± 1σ), with the truth when known; where σ is unavailable
    the column says "n/a" and a line below the table says why (`Laplace.sigma_note`)."""
    lines = [f"{'parameter':<18}{'value':>12}{'± 1σ':>12}" + (f"{'truth':>12}{'dev/σ':>8}" if truth else "")]
    lp = outcome.laplace
    for name, v, s in zip(lp.names, lp.values, lp.sigma, strict=True):
        ok = bool(np.isfinite(s))
        row = f"{name:<18}{v:>12.5g}" + (f"{s:>12.3g}" if ok else f"{'n/a':>12}")
        if truth and name in truth:
            dev = f"{(v - truth[name]) / s:>8.2f}" if ok and s > 0 else f"{'n/a':>8}"
            row += f"{truth[name]:>12.5g}{dev}"
        lines.append(row)
    if not np.all(np.isfinite(lp.sigma)):
        lines.append(lp.sigma_note or "σ unavailable (n/a): the Laplace approximation gave no finite σ.")
    if lp.sigma_model is not None:
        lines.append(
            "σ includes the quadrature error of the hole average (the fit's shift on twice the nodes): "
            + ", ".join(f"{n} {q:.3g}" for n, q in zip(lp.names, lp.sigma_model, strict=True))
        )
    lines.append(
        f"χ² {lp.chi2:.6g} over {lp.n_data} voxels (χ²_red {lp.chi2_reduced:.3g}); "
        f"AIC {outcome.criteria['aic']:.6g}, BIC {outcome.criteria['bic']:.6g}; {outcome.steps} steps, "
        f"{outcome.seconds:.0f} s"
    )
    if outcome.profile is not None:
        (a, b), (c, d) = outcome.profile.interval(1.0), outcome.profile.interval(2.0)
        lines.append(f"profile of {outcome.profile.name}: 1σ [{a:.4g}, {b:.4g}], 2σ [{c:.4g}, {d:.4g}] "
                     f"(Δχ² = 1 and 4 × {outcome.profile.unit:.3g}; NaN: not reached)")  # fmt: skip
    lines.append("windows: " + ", ".join(f"({hkl_label(h)})" for h in outcome.objective.layout.hkls))
    return "\n".join(lines)
