"""File I/O of the reduction pipeline (the only data_pipeline module that touches files).

So far: detector geometry as a CrystFEL .geom file, through extra-geom (which applies CrystFEL's +0.5 px
pixel-centre convention and axis orientation on both sides, so a round trip is exact).
"""

from __future__ import annotations

from pathlib import Path

from jaxpolaron.errors import InputError


def write_crystfel_geom(geometry, path: str | Path, *, clen_m: float, energy_kev: float, adu_per_ev: float = 1.0):
    """Write an AGIPD-1M geometry as a CrystFEL .geom (data laid out as frame × module × ss × fs)."""
    path = Path(path)
    try:
        geometry.write_crystfel_geom(
            str(path), clen=clen_m, photon_energy=1000.0 * energy_kev, adu_per_ev=adu_per_ev, nquads=4
        )
    except OSError as exc:
        raise InputError(f"cannot write geometry {path}: {exc.strerror or exc}.") from None
    return path


def read_crystfel_geom(path: str | Path):
    """Read an AGIPD-1M geometry from a CrystFEL .geom file (extra-geom)."""
    from extra_geom import AGIPD_1MGeometry

    path = Path(path)
    if not path.is_file():
        raise InputError(f"geometry file {path} does not exist.")
    try:
        return AGIPD_1MGeometry.from_crystfel_geom(str(path))
    except Exception as exc:  # extra-geom/cfelpyutils raise assorted errors on malformed files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read CrystFEL geometry {path}: {first}") from None
