"""Deformation models: each maps a crystal (and a key, if random) to per-atom displacements in Å."""

from jaxpolaron.deformation.base import Deformation, displaced, species_values

__all__ = ["Deformation", "displaced", "species_values"]
