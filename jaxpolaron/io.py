"""Volume files: dark/pump/difference intensity volumes on q grids, as HDF5 laid out as NeXus.

The only module that opens volume files with h5py. Layout (silx and h5web display it as is):

    /                NXroot; default="entry", creator, file_format="jaxpolaron-volume",
                     file_format_version="1"
    /entry           NXentry; default=<first volume>; config, provenance, [statistics]: JSON strings
    /entry/<volume>  NXcollection; kind="grid" | "window", hkl=[h, k, l] (windows), default=<shown group>
        dark/ pump/ difference/   NXdata (each optional, at least one): signal="intensity",
            axes=["qx", "qy", "qz"]; intensity (nx, ny, nz) with its units, qx (nx,), qy (ny,), qz (nz,)
            in 1/angstrom (crystal frame, |q| = 1/d); optional weight (nx, ny, nz) for merged data.

Difference = pump − dark; the writer stores it when both are given and no difference is.
Files are written atomically (temporary file in the same directory, then `os.replace`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from jaxpolaron import __version__
from jaxpolaron.errors import InputError

logger = logging.getLogger(__name__)

FILE_FORMAT = "jaxpolaron-volume"
FILE_FORMAT_VERSION = "1"
GROUPS = ("dark", "pump", "difference")
AXIS_NAMES = ("qx", "qy", "qz")
COMPRESS_ABOVE = 100_000  # elements; larger arrays are chunked and gzip-compressed
_RESERVED = ("config", "provenance", "statistics")
_PACKAGES = (
    "jaxpolaron",
    "jax",
    "jaxlib",
    "jax_finufft",
    "numpy",
    "h5py",
    "xraydb",
    "gemmi",
    "equinox",
    "scipy",
)


@dataclasses.dataclass(frozen=True)
class Volume:
    """One q volume (a full grid or a window around one hkl) with its dark/pump/difference intensities.

    Attributes:
        name: group name in the file, e.g. "grid" or "hkl_200", "hkl_1-10".
        axes: (qx (nx,), qy (ny,), qz (nz,)) sample positions along the crystal-frame axes, Å⁻¹.
        dark, pump, difference: (nx, ny, nz) intensities in `units`, each optional (at least one given).
        weight: optional per-group (nx, ny, nz) weights (e.g. merge counts), keys among "dark", "pump".
        hkl: pseudo-cubic Miller indices of a window; None for a grid.
        units: intensity units, "electrons^2" (simulated) or "counts" (measured).
    """

    name: str
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    dark: np.ndarray | None = None
    pump: np.ndarray | None = None
    difference: np.ndarray | None = None
    weight: dict[str, np.ndarray] | None = None
    hkl: tuple[int, int, int] | None = None
    units: str = "electrons^2"

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name in _RESERVED:
            raise ValueError(f"volume name {self.name!r} is empty, contains '/' or is reserved.")
        if len(self.axes) != 3:
            raise ValueError(f"volume {self.name!r} needs three q axes, got {len(self.axes)}.")
        for label, a in zip(AXIS_NAMES, self.axes, strict=True):
            a = np.asarray(a)
            if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
                raise ValueError(f"volume {self.name!r}: {label} must be 1-D, non-empty and finite.")
        if not self.groups:
            raise ValueError(f"volume {self.name!r} has no dark, pump or difference data.")
        arrays = {g: getattr(self, g) for g in self.groups}
        for g, w in (self.weight or {}).items():
            if g not in ("dark", "pump") or getattr(self, g) is None:
                raise ValueError(f"volume {self.name!r} has a weight for {g!r} but no such data group.")
            arrays[f"{g} weight"] = w
        for label, arr in arrays.items():
            if np.shape(arr) != self.shape:
                raise ValueError(f"volume {self.name!r}: {label} has shape {np.shape(arr)}, axes give {self.shape}.")
        if self.hkl is not None and len(self.hkl) != 3:
            raise ValueError(f"volume {self.name!r}: hkl must be three integers, got {self.hkl}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(nx, ny, nz) from the axis lengths."""
        return (len(self.axes[0]), len(self.axes[1]), len(self.axes[2]))

    @property
    def kind(self) -> str:
        """'window' if the volume has an hkl, else 'grid'."""
        return "grid" if self.hkl is None else "window"

    @property
    def groups(self) -> tuple[str, ...]:
        """The data groups present, in the order dark, pump, difference."""
        return tuple(g for g in GROUPS if getattr(self, g) is not None)


@dataclasses.dataclass(frozen=True)
class VolumeFile:
    """Everything in a volume file: volumes by name (file order), config, provenance, optional statistics."""

    volumes: dict[str, Volume]
    config: dict
    provenance: dict
    statistics: dict | None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe_input(path: str | Path) -> str:
    """'<resolved path> (sha256 <hex>)' for the `inputs` of `provenance`."""
    path = Path(path).resolve()
    with open(path, "rb") as f:
        return f"{path} (sha256 {hashlib.file_digest(f, 'sha256').hexdigest()})"


def provenance(inputs: dict[str, str] | None = None) -> dict:
    """Where and how an output was made: package versions, platform, host, UTC time, command line,
    git commit of the jaxpolaron source tree (None if not a git checkout), jax backend and devices,
    and `inputs` (name -> description, e.g. from `describe_input`). JSON-serialisable."""
    import jax  # deferred: the rest of this module does not need it

    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}},
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command_line": list(sys.argv),
        "git_commit": _git_commit(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "inputs": dict(inputs or {}),
    }


def check_writable(path: str | Path) -> Path:
    """Check, before a long computation, that `path` can be created; return it resolved.

    Raises InputError if `path` is a directory or its parent is missing, not a directory or not
    writable. Probes with a temporary file that is removed; leaves nothing behind.
    """
    resolved = Path(path).expanduser().resolve()
    parent = resolved.parent
    if resolved.is_dir():
        raise InputError(f"output path {path} is a directory; give a file name.")
    if not parent.exists():
        raise InputError(f"cannot write {path}: directory {parent} does not exist.")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".jaxpolaron-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write {path}: cannot create files in {parent} ({e.strerror}).") from e
    return resolved


def _json_default(obj):
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dataset(group: h5py.Group, name: str, data) -> h5py.Dataset:
    data = np.asarray(data)
    if data.size > COMPRESS_ABOVE:
        return group.create_dataset(name, data=data, chunks=True, compression="gzip", shuffle=True)
    return group.create_dataset(name, data=data)


def _write_nxdata(parent: h5py.Group, group: str, data, axes, units: str, weight=None) -> None:
    g = parent.create_group(group)
    g.attrs["NX_class"] = "NXdata"
    g.attrs["signal"] = "intensity"
    g.attrs.create("axes", list(AXIS_NAMES), dtype=h5py.string_dtype())
    _dataset(g, "intensity", data).attrs["units"] = units
    for i, (label, a) in enumerate(zip(AXIS_NAMES, axes, strict=True)):
        g.attrs[f"{label}_indices"] = i
        g.create_dataset(label, data=np.asarray(a)).attrs["units"] = "1/angstrom"
    if weight is not None:
        _dataset(g, "weight", weight)


def write_volume_file(
    path: str | Path,
    volumes: Sequence[Volume],
    config: dict,
    *,
    provenance: dict,
    statistics: dict | None = None,
) -> Path:
    """Write `volumes` with the run `config`, `provenance` and optional `statistics` (JSON-able dicts).

    Atomic: a crash never leaves a partial file under `path`. Raises ValueError for bad arguments
    (no volumes, duplicate names) and InputError if the file system refuses. Returns the resolved path.
    """
    names = [v.name for v in volumes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need at least one volume with unique names, got {names}.")
    if not all(isinstance(v, Volume) for v in volumes):
        raise ValueError("volumes must be jaxpolaron.io.Volume instances.")
    texts = {
        k: json.dumps(v, default=_json_default)
        for k, v in (("config", config), ("provenance", provenance), ("statistics", statistics))
        if v is not None
    }
    final = Path(path).expanduser().resolve()
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        with h5py.File(tmp, "x") as f:
            f.attrs.update(
                NX_class="NXroot",
                default="entry",
                creator=f"jaxpolaron {__version__}",
                file_format=FILE_FORMAT,
                file_format_version=FILE_FORMAT_VERSION,
            )
            entry = f.create_group("entry", track_order=True)  # volumes read back in written order
            entry.attrs.update(NX_class="NXentry", default=names[0])
            for key, text in texts.items():
                entry.create_dataset(key, data=text, dtype=h5py.string_dtype())
            for v in volumes:
                _write_volume(entry, v)
        os.replace(tmp, final)
    except OSError as e:
        raise InputError(f"cannot write {path}: {str(e).splitlines()[0]}.") from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %d volume(s) to %s", len(names), final)
    return final


def _write_volume(entry: h5py.Group, v: Volume) -> None:
    data = {g: getattr(v, g) for g in v.groups}
    if "difference" not in data and "dark" in data and "pump" in data:
        data["difference"] = np.asarray(v.pump) - np.asarray(v.dark)
    g = entry.create_group(v.name)
    g.attrs.update(NX_class="NXcollection", kind=v.kind, default=next(k for k in reversed(GROUPS) if k in data))
    if v.hkl is not None:
        g.attrs["hkl"] = np.asarray(v.hkl, dtype=np.int64)
    for group in GROUPS:
        if group in data:
            _write_nxdata(g, group, data[group], v.axes, v.units, (v.weight or {}).get(group))


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _read_json(entry: h5py.Group, key: str, path: Path) -> dict:
    if key not in entry:
        raise InputError(f"{path} has no /entry/{key}.")
    try:
        value = json.loads(_text(entry[key][()]) or "")
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: /entry/{key} is not valid JSON ({e.msg}).") from e
    if not isinstance(value, dict):
        raise InputError(f"{path}: /entry/{key} is not a JSON object.")
    return value


def _read_volume(g: h5py.Group, path: Path) -> Volume:
    name = g.name.rsplit("/", 1)[-1]
    where = f"{path}: volume {name!r}"
    present = [k for k in GROUPS if k in g]
    if not present:
        raise InputError(f"{where} has no dark, pump or difference group.")
    data, weight, axes, units = {}, {}, None, "electrons^2"
    for k in present:
        d = g[k]
        if not isinstance(d, h5py.Group) or "intensity" not in d or not all(a in d for a in AXIS_NAMES):
            raise InputError(f"{where}: {k} lacks intensity or one of the q axes qx, qy, qz.")
        ax = tuple(np.asarray(d[a][()]) for a in AXIS_NAMES)
        if any(a.ndim != 1 for a in ax):
            raise InputError(f"{where}: {k} has q axes that are not 1-D.")
        if axes is None:
            axes = ax
        elif not all(np.array_equal(a, b) for a, b in zip(axes, ax, strict=True)):
            raise InputError(f"{where}: {k} has different q axes from {present[0]}.")
        shape = tuple(len(a) for a in ax)
        for label in ("intensity", "weight") if "weight" in d else ("intensity",):
            if d[label].shape != shape:
                raise InputError(f"{where}: {k}/{label} has shape {d[label].shape}, q axes give {shape}.")
        data[k] = np.asarray(d["intensity"][()])
        units = _text(d["intensity"].attrs.get("units")) or units
        if "weight" in d:
            weight[k] = np.asarray(d["weight"][()])
    hkl = tuple(int(i) for i in g.attrs["hkl"]) if "hkl" in g.attrs else None
    if _text(g.attrs.get("kind")) == "window" and hkl is None:
        raise InputError(f"{where} is a window without an hkl attribute.")
    try:
        return Volume(name, axes, **data, weight=weight or None, hkl=hkl, units=units)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(f"{path}: {e}") from e


def read_volume_file(path: str | Path) -> VolumeFile:
    """Read and validate a volume file. Raises InputError (one line naming the file) for a missing,
    non-HDF5, truncated or foreign file, an unsupported version, bad JSON or an inconsistent volume."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a volume file.")
    try:
        if not h5py.is_hdf5(path):
            raise InputError(f"{path} is not an HDF5 file.")
        with h5py.File(path, "r") as f:
            if _text(f.attrs.get("file_format")) != FILE_FORMAT or not isinstance(f.get("entry"), h5py.Group):
                raise InputError(f"{path} is HDF5 but not a jaxpolaron volume file.")
            version = _text(f.attrs.get("file_format_version"))
            if version != FILE_FORMAT_VERSION:
                raise InputError(
                    f"{path} has volume file format version {version}; "
                    f"this jaxpolaron reads version {FILE_FORMAT_VERSION}."
                )
            entry = f["entry"]
            config, prov = _read_json(entry, "config", path), _read_json(entry, "provenance", path)
            stats = _read_json(entry, "statistics", path) if "statistics" in entry else None
            volumes = {v.name: v for v in (_read_volume(g, path) for g in entry.values() if isinstance(g, h5py.Group))}
    except OSError as e:
        raise InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?).") from e
    if not volumes:
        raise InputError(f"{path} holds no volumes.")
    return VolumeFile(volumes=volumes, config=config, provenance=prov, statistics=stats)


def require_group(vf: VolumeFile, group: str) -> list[Volume]:
    """The volumes that have `group` ("dark", "pump" or "difference"); InputError if none has it."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}.")
    found = [v for v in vf.volumes.values() if getattr(v, group) is not None]
    if not found:
        raise InputError(f"no volume in the file has {group} data; this step needs it.")
    return found
