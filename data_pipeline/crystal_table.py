"""The per-crystal table of an indexing run (`crystals.h5`): the hand-off from indexing to merging.

One row per indexed crystal (HDF5 group `/crystals`, resizable datasets, committed row count in the group
attribute `n_rows`):
  frame (int64, row of the CXI peak file / stream event), trainId, pulseId (uint64), pumped (int8, -1 unknown),
  rotation (3, 3) float64 refined orientation (q_lab = R q_crystal, crystal frame of jaxpolaron.structure),
  rotation_indexed (3, 3) before refinement, n_peaks, n_reflections, round (int32), score_before,
  score_after (Eq. 1, float64), residual_rms (Å⁻¹), orientation_sigma_deg (indexing.orientation_sigma_deg).
Root attributes: provenance and the run configuration (JSON). Appends are flushed; `resume` truncates to the
committed count, so a crash loses at most the rows of the block being written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from jaxpolaron.errors import InputError

GROUP = "crystals"
COLUMNS: dict[str, tuple[tuple[int, ...], str]] = {
    "frame": ((), "i8"),
    "trainId": ((), "u8"),
    "pulseId": ((), "u8"),
    "pumped": ((), "i1"),
    "rotation": ((3, 3), "f8"),
    "rotation_indexed": ((3, 3), "f8"),
    "n_peaks": ((), "i4"),
    "n_reflections": ((), "i4"),
    "round": ((), "i4"),
    "score_before": ((), "f8"),
    "score_after": ((), "f8"),
    "residual_rms": ((), "f8"),
    "orientation_sigma_deg": ((), "f8"),
}


class CrystalTableWriter:
    """Append rows (dicts of equal-length arrays, one key per COLUMNS entry) to `crystals.h5`."""

    def __init__(self, path: str | Path, *, resume: bool = False, attrs: Mapping[str, object] | None = None):
        from jaxpolaron.io import check_writable

        self.path = check_writable(path)
        try:
            if resume and self.path.exists():
                self._f = h5py.File(self.path, "r+")
                if GROUP not in self._f:
                    raise InputError(f"{self.path} is not a crystal table (no /{GROUP}); cannot resume.")
                missing = [name for name in COLUMNS if name not in self._f[GROUP]]
                if missing:
                    raise InputError(f"{self.path} was written by an older version (no {', '.join(missing)}); "
                                     "rerun without --resume.")  # fmt: skip
                self._truncate(int(self._f[GROUP].attrs["n_rows"]))
            else:
                self._f = h5py.File(self.path, "w")
                g = self._f.create_group(GROUP)
                for name, (shape, dtype) in COLUMNS.items():
                    g.create_dataset(name, (0, *shape), dtype, maxshape=(None, *shape), chunks=(256, *shape))
                g.attrs["n_rows"] = 0
                for k, v in (attrs or {}).items():
                    self._f.attrs[k] = v if isinstance(v, str) else json.dumps(v, default=str)
                self._f.flush()
        except OSError as exc:
            raise InputError(f"cannot write crystal table {self.path}: {exc}") from None
        self._g = self._f[GROUP]

    def _truncate(self, n: int) -> None:
        g = self._f[GROUP]
        for name in COLUMNS:
            g[name].resize(n, axis=0)
        g.attrs["n_rows"] = n
        self._f.flush()

    @property
    def n_rows(self) -> int:
        return int(self._g.attrs["n_rows"])

    def truncate(self, n: int) -> None:
        """Keep the first n rows (resume to an earlier checkpoint)."""
        if n < self.n_rows:
            self._truncate(n)

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        k = len(rows["frame"])
        if k == 0:
            return
        n = self.n_rows
        for name, (shape, dtype) in COLUMNS.items():
            v = np.asarray(rows[name], dtype).reshape(k, *shape)
            self._g[name].resize(n + k, axis=0)
            self._g[name][n:] = v
        self._g.attrs["n_rows"] = n + k
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CrystalTableWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_crystal_table(path: str | Path) -> dict[str, np.ndarray]:
    """All committed rows as numpy arrays (column name -> (n_rows, ...))."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"crystal table {path} does not exist.")
    try:
        with h5py.File(path, "r") as f:
            if GROUP not in f:
                raise InputError(f"{path} is not a crystal table (no /{GROUP}).")
            g = f[GROUP]
            n = int(g.attrs["n_rows"])
            # columns added later read as NaN (floats) or -1 (integers) in tables written before them
            return {
                name: g[name][:n] if name in g else np.full((n, *shape), np.nan if dtype[0] == "f" else -1, dtype)
                for name, (shape, dtype) in COLUMNS.items()
            }
    except OSError as exc:
        raise InputError(f"cannot read crystal table {path}: {exc}") from None


def write_columns(path: str | Path, group: str, columns: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> Path:
    """Write equal-length columns into `group` of a new HDF5 file (atomically: temporary file, then rename);
    attrs are stored as JSON strings. For per-crystal results of later stages (e.g. merge scales)."""
    import os

    from jaxpolaron.io import check_writable

    path = check_writable(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        g = f.create_group(group)
        for name, values in columns.items():
            g.create_dataset(name, data=np.asarray(values))
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value, default=str)
    os.replace(tmp, path)
    return path
