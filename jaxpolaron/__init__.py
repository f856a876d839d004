"""jaxpolaron: differentiable forward models of (differential) X-ray diffraction from nanocrystals.

Conventions used everywhere (see DESIGN.md): lengths in Å; reciprocal vectors q in Å⁻¹ with |q| = 1/d
(no 2π), so F(q) = Σ_j f_j(|q|) exp(2πi q·r_j); Miller indices are pseudo-cubic unless a name says
`ortho`; volumes live in the crystal frame (pseudo-cubic axes along x, y, z).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jaxpolaron")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
