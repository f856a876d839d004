"""The deformation-model interface.

A deformation model maps a crystal (and, for random models, a PRNG key) to per-atom displacements
u (n_atoms, 3) in Å, crystal frame. The pumped crystal is the dark crystal with positions r + u.
Every fittable parameter is an array field so `jax.grad` reaches it; flags and sizes are static fields.
Padded atoms (mask 0) get u = 0.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpolaron.crystal import Nanocrystal


class Deformation(eqx.Module):
    """Abstract base: `displacement(crystal, key=...) -> (n, 3)` Å."""

    @abc.abstractmethod
    def displacement(self, crystal: Nanocrystal, *, key: Array | None = None) -> Float[Array, "n 3"]:
        """Per-atom displacements (n, 3) in Å; `key` is required by random models and ignored otherwise."""

    @property
    def is_random(self) -> bool:
        """True when `displacement` draws from `key` (an ensemble then averages over keys)."""
        return False


def displaced(crystal: Nanocrystal, u: Float[Array, "n 3"]) -> Nanocrystal:
    """The crystal with positions r + u (padded atoms stay where they are)."""
    return eqx.tree_at(lambda c: c.positions, crystal, crystal.positions + u * crystal.mask[:, None])


def species_values(crystal: Nanocrystal, per_species: Float[Array, " S"]) -> Float[Array, " n"]:
    """Gather a per-species array onto atoms: (S,) -> (n,)."""
    return jnp.asarray(per_species)[crystal.species]
