"""Deformation models: each maps a crystal (and a key, if random) to per-atom displacements in Å."""

from jaxpolaron.deformation.base import Deformation, displaced, species_values
from jaxpolaron.deformation.charge_field import CentralHole, RandomHole, sample_holes
from jaxpolaron.deformation.external import ExternalDisplacement, external_pair
from jaxpolaron.deformation.phonon import PhononMode
from jaxpolaron.deformation.tilt import TiltRelaxation

__all__ = [
    "CentralHole",
    "Deformation",
    "ExternalDisplacement",
    "PhononMode",
    "RandomHole",
    "TiltRelaxation",
    "displaced",
    "external_pair",
    "sample_holes",
    "species_values",
]
