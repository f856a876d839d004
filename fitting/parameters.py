"""Fittable parameters of the deformation models, their constraints and their unconstrained coordinates.

A fit moves an unconstrained vector z (n_fit,); each physical value is a fixed map of one z:
    positive (spring constants, amplitudes of charge models, widths, softening):  x = exp(z)
    unit interval (hole bias b ∈ (0, 1], tilt t0 ∈ (0, 1)):                       x = sigmoid(z)
    free (phonon amplitude, electron strength):                                   x = z
so constraints hold at every step without clipping (DESIGN: reparameterise, never clip).

What is identifiable (charge models): u_s ∝ amplitude · q_s / k_s for species s, so only the three ratios
amplitude / k_s enter. k_Cs is therefore the fixed reference (k_Cs = 1): `k_pb` and `k_br` are the ratios
k_Pb/k_Cs and k_Br/k_Cs, and `amplitude` is the amplitude for k_Cs = 1. To first order in u (the linear
method) ΔI is proportional to the amplitude, so amplitude and a free overall intensity scale are one
degree of freedom: fitting both is refused (fix the scale from the dark volume instead, `scale="dark"`).
The amplitude is further degenerate with the mean number of pairs per dot (P1 + 2 P2), which the fit takes
as given (`occupancy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.base import Deformation
from jaxpolaron.errors import InputError
from jaxpolaron.simulate import SimulateConfig, build_model
from jaxpolaron.structure import CrystalStructure

Transform = Literal["positive", "unit", "free"]
FIT_MODELS = ("random-hole", "central-hole", "tilt", "phonon")


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One fittable scalar: how to read it from / write it into a model, and its constraint."""

    name: str
    transform: Transform
    get: Callable[[Deformation], jax.Array]
    set: Callable[[Deformation, jax.Array], Deformation]
    meaning: str


def _field(name: str) -> tuple[Callable, Callable]:
    def get(m):
        return getattr(m, name)

    def set_(m, v):
        return eqx.tree_at(lambda x: getattr(x, name), m, jnp.asarray(v, getattr(m, name).dtype))

    return get, set_


def _spring(index: int) -> tuple[Callable, Callable]:
    def get(m):
        return m.k[index]

    def set_(m, v):
        return eqx.tree_at(lambda x: x.k, m, m.k.at[index].set(v))

    return get, set_


def model_parameters(model: str, species: Sequence[str]) -> dict[str, Parameter]:
    """The fittable parameters of `model` (one of FIT_MODELS) for a crystal with `species` (e.g. Cs, Pb, Br)."""
    if model not in FIT_MODELS:
        raise InputError(f"unknown model {model!r}; fit one of {', '.join(FIT_MODELS)}.")
    params: list[Parameter] = []
    if model in ("random-hole", "central-hole"):
        params.append(Parameter("amplitude", "positive", *_field("amplitude"), "field amplitude for k_Cs = 1, Å"))
        for name in species[1:]:  # the first species (Cs) is the reference spring
            i = list(species).index(name)
            params.append(
                Parameter(f"k_{name.lower()}", "positive", *_spring(i), f"spring constant k_{name}/k_{species[0]}")
            )
        params.append(Parameter("softening", "positive", *_field("softening"), "hole softening length, Å"))
        params.append(Parameter("electron_strength", "free", *_field("electron_strength"), "electron sphere charge"))
        if model == "random-hole":
            params.append(Parameter("hole_bias", "unit", *_field("hole_bias"), "hole bias exponent in (0, 1)"))
    elif model == "tilt":
        params.append(Parameter("t0", "unit", *_field("t0"), "tilt parameter at the centre, in (0, 1)"))
        params.append(Parameter("width_fraction", "positive", *_field("width_fraction"), "relaxed radius / (L/2)"))
    else:
        params.append(Parameter("amplitude", "free", *_field("amplitude"), "axial Br displacement, Å"))
        params.append(Parameter("width_fraction", "positive", *_field("width_fraction"), "envelope σ / (L/2)"))
    return {p.name: p for p in params}


def parse_names(text: str | Sequence[str], available: dict[str, Parameter], model: str) -> tuple[str, ...]:
    """Fitted parameter names from 'a,b,c' (or a sequence); one-line InputError for unknown or repeated ones."""
    names = tuple(s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip())
    if not names:
        raise InputError("name at least one parameter to fit.")
    unknown = [n for n in names if n not in available]
    if unknown:
        hint = " (k_cs is the fixed reference: fit the ratios k_pb, k_br)" if "k_cs" in unknown else ""
        raise InputError(f"model {model} has no parameter {', '.join(unknown)}{hint}; it has {', '.join(available)}.")
    if len(set(names)) != len(names):
        raise InputError(f"a parameter is named twice in {','.join(names)}.")
    return names


def to_physical(transform: Transform, z):
    """Unconstrained z → physical value (elementwise)."""
    if transform == "positive":
        return jnp.exp(z)
    if transform == "unit":
        return jax.nn.sigmoid(z)
    return z


def to_unconstrained(transform: Transform, x: float) -> float:
    """Physical value → z; InputError when x violates the constraint."""
    x = float(x)
    if transform == "positive":
        if not x > 0:
            raise InputError(f"value {x} must be > 0.")
        return float(np.log(x))
    if transform == "unit":
        if not 0 < x < 1:
            raise InputError(f"value {x} must lie in (0, 1).")
        return float(np.log(x) - np.log1p(-x))
    return x


def physical_jacobian(transform: Transform, z):
    """dx/dz of `to_physical` (elementwise)."""
    if transform == "positive":
        return jnp.exp(z)
    if transform == "unit":
        s = jax.nn.sigmoid(z)
        return s * (1.0 - s)
    return jnp.ones_like(z)


@dataclasses.dataclass(frozen=True)
class ParameterSet:
    """The fitted subset of a model's parameters, in order, and the model they are written into."""

    model_name: str
    names: tuple[str, ...]
    parameters: tuple[Parameter, ...]

    @property
    def transforms(self) -> tuple[Transform, ...]:
        return tuple(p.transform for p in self.parameters)

    def physical(self, z: jax.Array) -> jax.Array:
        """(n_fit,) z → (n_fit,) physical values."""
        return jnp.stack([to_physical(t, z[i]) for i, t in enumerate(self.transforms)])

    def jacobian(self, z: jax.Array) -> jax.Array:
        """(n_fit,) diagonal of dx/dz."""
        return jnp.stack([physical_jacobian(t, z[i]) for i, t in enumerate(self.transforms)])

    def unconstrained(self, values: dict[str, float]) -> np.ndarray:
        """Physical values by name → z (n_fit,)."""
        out = []
        for p in self.parameters:
            try:
                out.append(to_unconstrained(p.transform, values[p.name]))
            except InputError as e:
                raise InputError(f"{p.name}: {e}") from None
        return np.asarray(out)

    def apply(self, template: Deformation, z: jax.Array) -> Deformation:
        """The template model with the fitted parameters set from z."""
        x = self.physical(z)
        model = template
        for i, p in enumerate(self.parameters):
            model = p.set(model, x[i])
        return model

    def values(self, model: Deformation) -> dict[str, float]:
        """Current physical values of the fitted parameters in `model`."""
        return {p.name: float(p.get(model)) for p in self.parameters}


def select(model_name: str, names: str | Sequence[str], species: Sequence[str], *, free_scale: bool) -> ParameterSet:
    """The ParameterSet for `names` of `model_name`; refuses combinations that are degenerate (module docstring)."""
    available = model_parameters(model_name, species)
    chosen = parse_names(names, available, model_name)
    if free_scale and model_name in ("random-hole", "central-hole") and "amplitude" in chosen:
        raise InputError(
            "amplitude is degenerate with a free overall scale (ΔI ∝ amplitude to first order): "
            "fix the scale from the dark volume (--scale dark) or do not fit the amplitude."
        )
    return ParameterSet(model_name, chosen, tuple(available[n] for n in chosen))


def template_model(
    model_name: str, structure: CrystalStructure, crystal: Nanocrystal, values: dict[str, float] | None = None
) -> Deformation:
    """The model with package defaults overridden by `values` (physical, by parameter name)."""
    values = dict(values or {})
    known = model_parameters(model_name, crystal.species_names)
    unknown = [n for n in values if n not in known]
    if unknown:
        raise InputError(f"model {model_name} has no parameter {', '.join(unknown)}; it has {', '.join(known)}.")
    model = build_model(SimulateConfig(model=model_name), structure, crystal)
    assert model is not None  # every FIT_MODELS entry builds a model
    for name, value in values.items():
        p = known[name]
        try:
            to_unconstrained(p.transform, value)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
        model = p.set(model, jnp.asarray(value, float))
    return model
