"""Charge-field deformations: ions displaced by the field of a photo-generated hole and electron.

The paper's random hole localisation model (Methods, Eqs. 3–5; SI S5). Each ion j of species s feels the
field of a localised point hole (+1) at r_h and of a delocalised electron (−1), and sits where the field
force balances a harmonic restoring force, k_s u_j = q_s E(r_j) (Eq. S4):

    u_j = A · (10 Å)² · (q_s / k_s) · (E_h(r_j) + ε E_e(r_j))          (Å)

- E_h(r) = (r − r_h) / (|r − r_h|² + a²)^{3/2}: the hole's Coulomb field with Plummer softening a (Å).
  Units: e/Å² with the 1/(4πε₀) and screening folded into A, so only the shape of the field matters.
- E_e(r) = −r / R³ for |r| ≤ R, −r / |r|³ outside: one electron spread uniformly over a sphere of radius
  R = s/2 about the crystal centre (Eq. 5, s = `crystal.size`), scaled by ε = `electron_strength`
  (1 = the paper's neutral exciton; 0 = a bare hole).
- A = `amplitude` (Å): the displacement of a unit charge with unit spring constant in the field of the
  bare (unsoftened) hole at the reference distance of 10 Å. q_s are formal charges (Cs +1, Pb +2, Br −1),
  k_s dimensionless relative spring constants; only the ratios q_s / k_s and A matter, so A carries the
  absolute scale and k the species balance (the paper's SI S5 scan).
- Cations move along E, anions against it. Padded atoms (mask 0) get u = 0.

Hole positions (Eqs. 3–4), reparameterised so the bias is a differentiable exponent:
r̃ ~ U(−1, 1)³ (fixed for a key), r̃ ← r̃ ‖r̃‖₅^(b − 1), r_h = r̃ s/2. b = 1 keeps r̃ uniform in the cube;
the paper's r̃ ‖r̃‖₅^0.1 / ‖r̃‖₅ is b = 0.1 and pushes holes towards the p = 5 superellipsoid surface
(‖r̃‖₅ → ‖r̃‖₅^b); about 13 % of them land slightly outside it (up to 3^(b/5) = 1.022 for b = 0.1), as in
the paper's algorithm.

Defaults and why:
- softening a = 1 Å: a fraction of the Pb–Br bond (2.95 Å), so nearest neighbours of the hole feel ≥ 85 %
  of the bare Coulomb field, while a hole on an atom site (the central hole sits on the centre Pb) exerts
  no force on that atom and all gradients stay bounded (∝ 1/a³). A hole in a lead-halide perovskite is a
  polaron spread over roughly one octahedron anyway, not a point.
- amplitude A = 0.02 Å (`DEFAULT_AMPLITUDE`): a Pb²⁺ 10 Å from the bare hole moves 0.04 Å, the scale of
  polaronic distortions. For a 5 nm crystal with unit k and formal charges, the root-mean-square phase
  2π G·u over atoms at the (200) reflection (|G| = 0.342 Å⁻¹) is then 0.023 rad for paper-biased random
  holes and 0.017 rad for the central hole (3 nm: 0.038 / 0.033 rad; 8 nm: 0.010 / 0.009 rad; 64 keyed
  holes), a small perturbation in the regime where the notes find the linearised difference accurate
  (notes/physics.md, "|q·u| ≈ 0.05 rad"). The median atom's phase is ~10× smaller; the RMS is carried by
  the few atoms near the hole, whose displacement is bounded by the softening: |E_h| ≤ 2 / (3√3 a²), so
  |u| ≤ 0.385 A (10 Å / a)² |q_s| / k_s (1.5 Å for a Pb within ~a of the hole at the defaults).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxpolaron.crystal import Nanocrystal
from jaxpolaron.deformation.base import Deformation, species_values
from jaxpolaron.errors import InputError

REFERENCE_DISTANCE = 10.0  # Å: `amplitude` is the displacement a unit charge/unit spring gets at this distance
DEFAULT_AMPLITUDE = 0.02  # Å; see the module docstring
DEFAULT_SOFTENING = 1.0  # Å; Plummer softening of the point hole
PAPER_HOLE_BIAS = 0.1  # the exponent of the paper's Eq. 4
SUPERELLIPSOID_EXPONENT = 5.0  # the l^p norm of Eq. 4 (the paper's crystal envelope)

__all__ = [
    "DEFAULT_AMPLITUDE",
    "DEFAULT_SOFTENING",
    "PAPER_HOLE_BIAS",
    "REFERENCE_DISTANCE",
    "CentralHole",
    "ChargeField",
    "RandomHole",
    "charge_displacement",
    "displacement_scale",
    "electron_field",
    "hole_field",
    "hole_position",
    "sample_holes",
]


def _float_array(x: ArrayLike) -> Array:
    """An array with a floating dtype (ints, e.g. formal charges, become the default float)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _concrete(x: Array) -> np.ndarray | None:
    """The value of `x` on the host, or None while it is being traced (checks then wait for concrete values)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


# -------------------------------------------------------------------------------------- hole sampling
def hole_position(
    r_tilde: Float[Array, "... 3"], hole_bias: Float[ArrayLike, ""], size: Float[ArrayLike, ""]
) -> Float[Array, "... 3"]:
    """Map unit-cube draws r̃ ∈ [−1, 1]³ to hole positions (Å, crystal frame, origin at the centre).

    r̃ ← r̃ ‖r̃‖₅^(b − 1), then r_h = r̃ · size / 2 (Eq. 4 with the paper's exponent 0.1 generalised to b).
    Differentiable in b and r̃; finite (value and gradients) at r̃ = 0, which stays at the centre.

    Args:
        r_tilde: (..., 3) draws from U(−1, 1)³.
        hole_bias: () exponent b >= 0: 1 = uniform in the cube, 0.1 = the paper's surface bias, 0 = all on
            the ‖r̃‖₅ = 1 surface.
        size: () crystal edge length s, Å.
    """
    r_tilde = jnp.asarray(r_tilde)
    p = SUPERELLIPSOID_EXPONENT
    s5 = jnp.sum(jnp.abs(r_tilde) ** 5, axis=-1, keepdims=True)  # ‖r̃‖₅⁵
    nonzero = s5 > 0
    safe = jnp.where(nonzero, s5, 1.0)
    # ‖r̃‖₅^(b−1) = (‖r̃‖₅⁵)^((b−1)/5); at r̃ = 0 both branches stay finite and r̃ · 1 = 0.
    factor = jnp.where(nonzero, safe ** ((jnp.asarray(hole_bias) - 1.0) / p), 1.0)
    return r_tilde * factor * (0.5 * jnp.asarray(size))


def sample_holes(
    key: Array, n: int, hole_bias: Float[ArrayLike, ""], size: Float[ArrayLike, ""]
) -> Float[Array, "n 3"]:
    """n hole positions (n, 3) in Å for a crystal of edge `size` Å (Eqs. 3–4, see `hole_position`).

    The unit-cube draws are `jax.random.uniform(key, (n, 3), minval=-1, maxval=1)`, so the positions are
    fixed for a key and smooth in `hole_bias` and `size`. `RandomHole.displacement(crystal, key=key)` puts
    its hole at `sample_holes(key, 1, hole_bias, crystal.size)[0]`.
    """
    dtype = jnp.result_type(hole_bias, size, float)
    r_tilde = jax.random.uniform(key, (n, 3), dtype, minval=-1.0, maxval=1.0)
    return hole_position(r_tilde, hole_bias, size)


# --------------------------------------------------------------------------------------------- fields
def hole_field(
    positions: Float[Array, "n 3"], hole: Float[ArrayLike, "3"], softening: Float[ArrayLike, ""]
) -> Float[Array, "n 3"]:
    """Field of a +1 point charge at `hole` with Plummer softening a: (r − r_h) / (|r − r_h|² + a²)^{3/2}.

    positions: (n, 3) Å; hole: (3,) Å; softening: () Å (> 0). Returns (n, 3) in e/Å². Zero (with finite
    gradients) at the hole itself.
    """
    d = positions - jnp.asarray(hole)
    r2 = jnp.sum(d * d, axis=-1, keepdims=True) + jnp.asarray(softening) ** 2
    return d * r2**-1.5


def electron_field(positions: Float[Array, "n 3"], size: Float[ArrayLike, ""]) -> Float[Array, "n 3"]:
    """Field of one electron (−1) spread uniformly over a sphere of radius R = size / 2 about the origin.

    −r / R³ inside (Eq. 5), −r / |r|³ outside (Gauss); continuous at |r| = R and finite everywhere.
    positions: (n, 3) Å; size: () crystal edge Å. Returns (n, 3) in e/Å².
    """
    radius2 = (0.5 * jnp.asarray(size)) ** 2
    r2 = jnp.sum(positions * positions, axis=-1, keepdims=True)
    outside = r2 > radius2
    # Inside, the "outside" branch would divide by |r|³ -> 0 at the centre: feed it R² there instead.
    return -positions * jnp.where(outside, r2, radius2) ** -1.5


def charge_displacement(
    crystal: Nanocrystal,
    hole: Float[ArrayLike, "3"],
    *,
    charges: Float[ArrayLike, " S"],
    k: Float[ArrayLike, " S"],
    amplitude: Float[ArrayLike, ""],
    softening: Float[ArrayLike, ""],
    electron_strength: Float[ArrayLike, ""],
) -> Float[Array, "n 3"]:
    """u_j = A (10 Å)² (q_s / k_s) (E_h(r_j) + ε E_e(r_j)) for a hole at `hole` (3,) Å; (n, 3) Å.

    The one implementation behind `RandomHole` and `CentralHole` (see the module docstring for the
    symbols). Padded atoms (mask 0) get exactly 0.
    """
    positions = crystal.positions
    field = hole_field(positions, hole, softening) + jnp.asarray(electron_strength) * electron_field(
        positions, crystal.size
    )
    return displacement_scale(crystal, charges=charges, k=k, amplitude=amplitude)[:, None] * field


def displacement_scale(
    crystal: Nanocrystal, *, charges: Float[ArrayLike, " S"], k: Float[ArrayLike, " S"], amplitude: Float[ArrayLike, ""]
) -> Float[Array, " n"]:
    """A (10 Å)² q_s / k_s per atom (n,), Å³/e (0 on padded atoms): the field-to-displacement factor."""
    per_species = jnp.asarray(charges) / jnp.asarray(k)
    return jnp.asarray(amplitude) * REFERENCE_DISTANCE**2 * species_values(crystal, per_species) * crystal.mask


# --------------------------------------------------------------------------------------------- models
class ChargeField(Deformation):
    """Abstract base of the hole + electron field models; subclasses choose where the hole is.

    Attributes:
        charges: (S,) formal charge per species, in the crystal's species order (Cs +1, Pb +2, Br −1).
        k: (S,) relative spring constant per species (> 0); u_s ∝ q_s / k_s.
        amplitude: () Å; displacement of a unit charge with k = 1 at 10 Å from the bare hole.
        softening: () Å (> 0); Plummer softening a of the point hole.
        electron_strength: () ε, charge of the delocalised electron sphere in units of −e (1 = neutral).
        species: species names the per-species arrays refer to (checked against the crystal), or None.
    """

    charges: Float[Array, " S"] = eqx.field(converter=_float_array)
    k: Float[Array, " S"] = eqx.field(converter=_float_array)
    amplitude: Float[Array, ""] = eqx.field(converter=_float_array, default=DEFAULT_AMPLITUDE)
    softening: Float[Array, ""] = eqx.field(converter=_float_array, default=DEFAULT_SOFTENING)
    electron_strength: Float[Array, ""] = eqx.field(converter=_float_array, default=1.0)
    species: tuple[str, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.charges.ndim != 1 or self.k.shape != self.charges.shape:
            raise InputError(
                f"charges and k must both be one value per species, got shapes {self.charges.shape} and {self.k.shape}."
            )
        if self.species is not None and len(self.species) != self.charges.shape[0]:
            raise InputError(f"{len(self.species)} species names {self.species} for {self.charges.shape[0]} charges.")
        for name in ("amplitude", "softening", "electron_strength"):
            if getattr(self, name).ndim != 0:
                raise InputError(f"{name} must be a scalar, got shape {getattr(self, name).shape}.")
        checks = {
            "k": (self.k, "positive spring constants"),
            "softening": (self.softening, "a positive softening length (Å)"),
        }
        for name, (value, what) in checks.items():
            v = _concrete(value)
            if v is not None and not (np.all(np.isfinite(v)) and np.all(v > 0)):
                raise InputError(f"{name} must be {what}, got {v}.")
        for name in ("charges", "amplitude", "electron_strength"):
            v = _concrete(getattr(self, name))
            if v is not None and not np.all(np.isfinite(v)):
                raise InputError(f"{name} must be finite, got {v}.")

    @classmethod
    def for_crystal(
        cls,
        crystal: Nanocrystal,
        *,
        k: Float[ArrayLike, " S"] | Sequence[float] | None = None,
        charges: Float[ArrayLike, " S"] | Sequence[float] | None = None,
        **params,
    ):
        """The model for `crystal`'s species: charges default to `crystal.oxidation`, k to all 1.

        Other keyword arguments (amplitude, softening, electron_strength, hole_bias) pass through.
        """
        n_species = len(crystal.species_names)
        q = _float_array(jnp.asarray(crystal.oxidation if charges is None else charges))
        springs = jnp.ones(n_species, jnp.result_type(float)) if k is None else _float_array(jnp.asarray(k))
        return cls(charges=q, k=springs, species=tuple(crystal.species_names), **params)

    def displacement_at(self, crystal: Nanocrystal, hole: Float[ArrayLike, "3"]) -> Float[Array, "n 3"]:
        """Displacements (n, 3) Å for a hole at an explicit position `hole` (3,) Å, crystal frame."""
        names = tuple(crystal.species_names)
        if self.charges.shape[0] != len(names):
            raise InputError(f"the model has {self.charges.shape[0]} species, the crystal {len(names)} {names}.")
        if self.species is not None and self.species != names:
            raise InputError(f"the model's species {self.species} do not match the crystal's {names}.")
        return charge_displacement(
            crystal,
            hole,
            charges=self.charges,
            k=self.k,
            amplitude=self.amplitude,
            softening=self.softening,
            electron_strength=self.electron_strength,
        )

    def scale(self, crystal: Nanocrystal) -> Float[Array, " n"]:
        """A (10 Å)² q_s / k_s per atom (n,), Å³/e; 0 on padded atoms."""
        return displacement_scale(crystal, charges=self.charges, k=self.k, amplitude=self.amplitude)

    def electron_displacement(self, crystal: Nanocrystal) -> Float[Array, "n 3"]:
        """The part of the displacement due to the electron sphere (n, 3) Å: the same for every hole."""
        field = self.electron_strength * electron_field(crystal.positions, crystal.size)
        return self.scale(crystal)[:, None] * field


class RandomHole(ChargeField):
    """The paper's random hole localisation model: one hole per crystal at a keyed random position.

    Attributes (besides `ChargeField`'s):
        hole_bias: () exponent b >= 0 of the hole sampling (`hole_position`); 0.1 is the paper's.

    Build with `RandomHole.for_crystal(crystal, **params)` (charges from the crystal's oxidation states).
    """

    hole_bias: Float[Array, ""] = eqx.field(converter=_float_array, default=PAPER_HOLE_BIAS)

    def __check_init__(self):
        if self.hole_bias.ndim != 0:
            raise InputError(f"hole_bias must be a scalar, got shape {self.hole_bias.shape}.")
        v = _concrete(self.hole_bias)
        if v is not None and not (np.isfinite(v) and v >= 0):
            raise InputError(f"hole_bias must be a finite exponent >= 0, got {v}.")

    @property
    def is_random(self) -> bool:
        return True

    def hole(self, crystal: Nanocrystal, *, key: Array) -> Float[Array, "3"]:
        """The hole position (3,) Å drawn from `key` (= `sample_holes(key, 1, hole_bias, crystal.size)[0]`)."""
        return sample_holes(key, 1, self.hole_bias, crystal.size)[0]

    def displacement(self, crystal: Nanocrystal, *, key: Array | None = None) -> Float[Array, "n 3"]:
        """Displacements (n, 3) Å with the hole drawn from `key` (required)."""
        if key is None:
            raise InputError("RandomHole draws its hole position from a PRNG key: pass key=...")
        return self.displacement_at(crystal, self.hole(crystal, key=key))


class CentralHole(ChargeField):
    """The hole fixed at the crystal centre (the origin: the centre Pb site of a Pb-centred cut); SI S5.

    With ε = 1 the net field of the +1 point and the −1 sphere is radial, E = r [(|r|² + a²)^{-3/2} − R⁻³]:
    outward for |r| < √(R² − a²) (cations move out, anions in) and ≈ 0 outside the sphere.
    """

    def displacement(self, crystal: Nanocrystal, *, key: Array | None = None) -> Float[Array, "n 3"]:
        """Displacements (n, 3) Å; `key` is ignored."""
        return self.displacement_at(crystal, jnp.zeros(3, crystal.positions.dtype))
