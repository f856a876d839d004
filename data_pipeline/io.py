"""File I/O of the reduction pipeline (the only data_pipeline module besides run_io.py that touches files).

Three CrystFEL interop formats:

1. Detector geometry as a CrystFEL .geom, through extra-geom (which applies CrystFEL's +0.5 px pixel-centre
   convention on both sides, so a round trip is exact). Two data layouts:
   ``"modules"`` (extra-geom's default, data frame × module × ss × fs: ``dim0 = %``, ``dim1 = <module>``,
   panel ``p{m}a{k}`` has ``min_ss = 64 k`` within its module) and ``"stacked"`` (frame × (16·512) × fs:
   ``dim0 = %, dim1 = ss, dim2 = fs``, panel ``p{m}a{k}`` has ``min_ss = 512 m + 64 k``, Cheetah's layout).

2. CXI peak lists (``CxiPeakWriter`` / ``read_cxi_peaks``) that indexamajig reads with ``--peaks=cxi``.
   CrystFEL (libcrystfel ``image_hdf5_read_peaks_cxi``, 0.10/0.11) reads, for event ``//i``, row i of
   ``<peak_list>/nPeaks`` (frames,) and of ``peakXPosRaw``, ``peakYPosRaw``, ``peakTotalIntensity``
   (frames, ≥ nPeaks) as float, adds 0.5 (unless ``--no-half-pixel-shift``) and assigns the panel from the
   *slab* coordinates (``data_template_slabby_file_to_panel_coords``: the panel whose min/max_fs/ss contain
   the point). With the ``"modules"`` layout every module shares the same ss range, so CrystFEL would find
   the peak ambiguous: CXI peak lists are therefore written in the stacked layout,
   ``peakXPosRaw = fs``, ``peakYPosRaw = 512·module + ss`` (pixel centres at integers, as peakfinder8), and
   go with a ``layout="stacked"`` geometry carrying ``peak_list = /entry_1/result_1`` (CrystFEL ≥ 0.10 takes
   the peak path from the geometry; ``--hdf5-peaks`` is no longer used). The module is recovered as
   ``floor((y + 0.5) / 512)``, exactly the panel CrystFEL assigns.

3. CrystFEL streams (``StreamWriter`` / ``read_stream``), format 2.3 as written by libcrystfel ``stream.c``.
   Stream peak and reflection positions are *file* coordinates of the embedded geometry in CrystFEL's corner
   convention (pixel centre at index + 0.5) plus the panel name; (1/d) in nm⁻¹; ``astar``/``bstar``/``cstar``
   in nm⁻¹ in CrystFEL's lab frame. That frame (+z along the beam, +y up, +x completing a right-handed set,
   i.e. +x to the left looking downstream) is the EuXFEL/extra-geom lab frame of ``data_pipeline.geometry``:
   extra-geom writes panel vectors and corners unchanged, and a pixel placed with CrystFEL's formula
   (corner + fs·fs_vec + ss·ss_vec) from our .geom lands on extra-geom's position (tests/test_formats.py).
   So A* (Å⁻¹, our frame) is written as 10·A* nm⁻¹ with no axis change. Both use q = k_out − k_in, |q| = 1/d.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import h5py
import numpy as np

from jaxpolaron import __version__
from jaxpolaron.errors import InputError

if TYPE_CHECKING:
    from data_pipeline.peakfinder import PeakList

MODULE_SS = 512  # AGIPD-1M module height (slow scan), pixels: the stride of the stacked layout
HC_EV_A = 12398.419843320026  # h c in eV·Å (as jaxpolaron.scattering.HC_KEV_A)
CXI_PEAK_PATH = "/entry_1/result_1"
CXI_FORMAT = "jaxpolaron-cxi-peaks"
CXI_FORMAT_VERSION = "1"

GeomLayout = Literal["modules", "stacked"]


# --- CrystFEL geometry ---------------------------------------------------------------------------------------


def write_crystfel_geom(
    geometry,
    path: str | Path,
    *,
    clen_m: float,
    energy_kev: float,
    adu_per_ev: float = 1.0,
    layout: GeomLayout = "modules",
    peak_list: str | None = None,
):
    """Write an AGIPD-1M geometry as a CrystFEL .geom.

    layout: "modules" (data frame × module × ss × fs, extra-geom's default) or "stacked" (frame × 8192 × fs,
        module m at ss rows [512 m, 512 m + 512)), the layout CXI peak lists need (see the module docstring).
    peak_list: HDF5 group of the peak list (e.g. ``CXI_PEAK_PATH``); adds ``peak_list`` and
        ``peak_list_type = cxi``, which indexamajig ``--peaks=cxi`` needs.
    Returns the path.
    """
    if layout not in ("modules", "stacked"):
        raise ValueError(f"layout must be 'modules' or 'stacked', got {layout!r}")
    path = Path(path)
    dims = ("frame", "modno", "ss", "fs") if layout == "modules" else ("frame", "ss", "fs")
    try:
        geometry.write_crystfel_geom(
            str(path), clen=clen_m, photon_energy=1000.0 * energy_kev, adu_per_ev=adu_per_ev, nquads=4, dims=dims
        )
        if peak_list is not None:
            text = path.read_text()
            extra = f"peak_list = {peak_list}\npeak_list_type = cxi\n"
            text = re.sub(r"^(data = .*\n)", lambda m: m.group(1) + extra, text, count=1, flags=re.M)
            path.write_text(text if extra in text else extra + text)
    except OSError as exc:
        raise InputError(f"cannot write geometry {path}: {exc.strerror or exc}.") from None
    return path


def read_crystfel_geom(path: str | Path):
    """Read an AGIPD-1M geometry from a CrystFEL .geom file (extra-geom; either layout)."""
    from extra_geom import AGIPD_1MGeometry

    path = Path(path)
    if not path.is_file():
        raise InputError(f"geometry file {path} does not exist.")
    try:
        return AGIPD_1MGeometry.from_crystfel_geom(str(path))
    except Exception as exc:  # extra-geom/cfelpyutils raise assorted errors on malformed files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read CrystFEL geometry {path}: {first}") from None


class _Panels(NamedTuple):
    """Panels of a CrystFEL geometry, (P,) arrays: module, ss range within the module [ss0, ss1] and fs range
    [fs0, fs1] (inclusive, data pixels), file-coordinate origin (min_ss, min_fs), corner (P, 3) m (z = clen +
    coffset), fs_vec and ss_vec (P, 3) m per pixel, names."""

    module: np.ndarray
    ss0: np.ndarray
    ss1: np.ndarray
    fs0: np.ndarray
    fs1: np.ndarray
    min_ss: np.ndarray
    min_fs: np.ndarray
    corner: np.ndarray
    fs_vec: np.ndarray
    ss_vec: np.ndarray
    names: tuple[str, ...]


def _parse_panels(geometry_text: str) -> _Panels:
    """Panels of a CrystFEL geometry text (parsed with cfel_fmt, extra-geom's CrystFEL parser)."""
    from cfel_fmt.geometry import load_crystfel_geometry

    try:
        panels = load_crystfel_geometry(io.StringIO(geometry_text)).detector["panels"]
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot parse the CrystFEL geometry: {first}") from None
    if not panels:
        raise InputError("the CrystFEL geometry defines no panels.")
    rows = []
    for name, p in panels.items():
        index_dims = [d for d in p["dim_structure"] if isinstance(d, int)]
        min_ss, min_fs = int(p["orig_min_ss"]), int(p["orig_min_fs"])
        module, ss0 = (index_dims[0], min_ss) if index_dims else divmod(min_ss, MODULE_SS)
        clen = p["clen"]  # a header path (clen from the data file) leaves positions unknown: NaN
        clen = float(clen) if isinstance(clen, int | float) and clen > 0 else math.nan
        res = float(p["res"])
        rows.append(
            (
                module,
                ss0,
                ss0 + int(p["orig_max_ss"]) - min_ss,
                min_fs,
                int(p["orig_max_fs"]),
                min_ss,
                min_fs,
                (p["cnx"] / res, p["cny"] / res, clen + p["coffset"]),
                (p["fsx"] / res, p["fsy"] / res, p["fsz"] / res),
                (p["ssx"] / res, p["ssy"] / res, p["ssz"] / res),
                name,
            )
        )
    cols = list(zip(*rows, strict=True))
    i64, f64 = (lambda k: np.array(cols[k], np.int64)), (lambda k: np.array(cols[k], np.float64))
    return _Panels(
        module=i64(0),
        ss0=i64(1),
        ss1=i64(2),
        fs0=i64(3),
        fs1=i64(4),
        min_ss=i64(5),
        min_fs=i64(6),
        corner=f64(7),
        fs_vec=f64(8),
        ss_vec=f64(9),
        names=tuple(str(n) for n in cols[10]),
    )


def _panel_of(panels: _Panels, module, ss, fs) -> np.ndarray:
    """Panel index (n,) of points given in our convention (module, ss, fs; pixel centres at integers).

    A point belongs to the panel whose pixel range contains its corner-convention coordinates (+0.5), as
    CrystFEL decides it. Raises ValueError for a point on no panel."""
    s, f = np.asarray(ss, np.float64)[:, None] + 0.5, np.asarray(fs, np.float64)[:, None] + 0.5
    hit = (
        (np.asarray(module)[:, None] == panels.module)
        & (s >= panels.ss0)
        & (s < panels.ss1 + 1)
        & (f >= panels.fs0)
        & (f < panels.fs1 + 1)
    )
    if not hit.any(axis=1).all():
        bad = int(np.flatnonzero(~hit.any(axis=1))[0])
        raise ValueError(f"point (module {module[bad]}, ss {ss[bad]}, fs {fs[bad]}) lies on no panel")
    return np.argmax(hit, axis=1)


def _to_file(panels: _Panels, module, ss, fs):
    """Our (module, ss, fs) -> (file fs, file ss in CrystFEL's corner convention, panel index, lab position m)."""
    module = np.asarray(module, np.int64)
    ss, fs = np.asarray(ss, np.float64), np.asarray(fs, np.float64)
    if np.isnan(panels.corner[:, 2]).any():
        raise InputError("the CrystFEL geometry has no numeric clen, so 1/d of peaks cannot be computed.")
    p = _panel_of(panels, module, ss, fs)
    fs_p = fs + 0.5 - panels.fs0[p]  # panel-relative, corner convention
    ss_p = ss + 0.5 - panels.ss0[p]
    pos = panels.corner[p] + fs_p[:, None] * panels.fs_vec[p] + ss_p[:, None] * panels.ss_vec[p]
    return fs_p + panels.min_fs[p], ss_p + panels.min_ss[p], p, pos


def _from_file(panels: _Panels, file_fs, file_ss, names: Sequence[str]):
    """File coordinates + panel names (stream) -> our (module, ss, fs)."""
    lookup = {n: i for i, n in enumerate(panels.names)}
    try:
        p = np.array([lookup[n] for n in names], np.int64)
    except KeyError as exc:
        raise InputError(f"stream names panel {exc.args[0]!r}, which its geometry does not define.") from None
    ss = np.asarray(file_ss, np.float64) - panels.min_ss[p] + panels.ss0[p] - 0.5
    fs = np.asarray(file_fs, np.float64) - panels.min_fs[p] + panels.fs0[p] - 0.5
    return panels.module[p], ss, fs


def _inv_d(pos_m: np.ndarray, photon_energy_ev: float) -> np.ndarray:
    """|q| = 1/d in Å⁻¹ of lab positions (n, 3) m, beam along +z (q = (p/|p| − ẑ)/λ)."""
    lam = HC_EV_A / photon_energy_ev
    direction = pos_m / np.linalg.norm(pos_m, axis=-1, keepdims=True)
    return np.linalg.norm(direction - np.array([0.0, 0.0, 1.0]), axis=-1) / lam


# --- CXI peak lists ------------------------------------------------------------------------------------------

# name -> (dtype, per-peak); per-peak datasets are (frames, max_peaks), the others (frames,)
_CXI_DATASETS: dict[str, tuple[type, bool]] = {
    "nPeaks": (np.int32, False),
    "peakXPosRaw": (np.float32, True),
    "peakYPosRaw": (np.float32, True),
    "peakTotalIntensity": (np.float32, True),
    "peakNPixels": (np.float32, True),
    "peakMaximumValue": (np.float32, True),
    "peakSNR": (np.float32, True),
    "peakLocalSigma": (np.float32, True),  # ours: peakfinder8's local background σ
    "nComponents": (np.int32, False),  # ours: connected components examined (PeakList.n_components)
    "trainId": (np.uint64, False),  # ours: provenance of each row
    "pulseId": (np.uint64, False),
    "pumped": (np.int8, False),  # 1 pumped, 0 dark, -1 unknown
    "frameIndex": (np.int64, False),  # index of the frame in the source run
}


class CxiPeaks(NamedTuple):
    """Contents of a CXI peak-list file, all numpy, N frames.

    peaks: PeakList with a leading frame axis: n_peaks, n_components (N,) int32; fs, ss (N, max_peaks)
        float32 in module pixels with centres at integers; panel (N, max_peaks) int32 module (-1 = padding);
        total_intensity, max_intensity, local_sigma, snr (N, max_peaks) float32; n_pixels int32.
    train_id, pulse_id: (N,) uint64. pumped: (N,) int8, 1/0/-1 (unknown). frame_index: (N,) int64.
    provenance, peakfinder_config: dicts from the file attributes ({} when absent).
    """

    peaks: PeakList
    train_id: np.ndarray
    pulse_id: np.ndarray
    pumped: np.ndarray
    frame_index: np.ndarray
    provenance: dict
    peakfinder_config: dict


def _config_json(config) -> str:
    if config is None:
        return "{}"
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.dumps(config, sort_keys=True)


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated file" in first:  # the OS lost data HDF5 had already accounted for (full disk, power cut)
            raise InputError(f"{path} is truncated ({first}); delete it, or try `h5clear --increment`.") from None
        raise InputError(f"cannot open {path} as HDF5 ({first}).") from None


def _check_cxi(f: h5py.File, path: Path) -> h5py.Group:
    """The peak group of one of our CXI files, after checking its format marker and datasets."""
    if f.attrs.get("file_format") != CXI_FORMAT:
        raise InputError(f"{path} is not a jaxpolaron CXI peak file (file_format attribute missing or different).")
    g = f.get(CXI_PEAK_PATH)
    if not isinstance(g, h5py.Group):
        raise InputError(f"{path} has no group {CXI_PEAK_PATH}.")
    missing = [n for n in _CXI_DATASETS if not isinstance(g.get(n), h5py.Dataset)]
    if missing:
        raise InputError(f"{path} lacks dataset(s) {', '.join(missing)} in {CXI_PEAK_PATH}.")
    return g


def _consistent_frames(g: h5py.Group) -> int:
    """Frames every dataset holds and the last append committed: min(commit mark, dataset lengths)."""
    lengths = [g[n].shape[0] for n in _CXI_DATASETS]
    return int(min([int(g.attrs.get("n_frames", min(lengths))), *lengths]))


class CxiPeakWriter:
    """Stream per-frame peak lists into a CXI file that CrystFEL's ``--peaks=cxi`` reads (stacked layout).

    Layout (all in ``/entry_1/result_1``, row i = CrystFEL event ``//i``):
      nPeaks (N,) int32; peakXPosRaw = fs, peakYPosRaw = 512·module + ss (pixel centres at integers; CrystFEL
      adds 0.5); peakTotalIntensity, peakNPixels, peakMaximumValue, peakSNR (N, max_peaks) float32 (detector
      units; SNR = total / local σ); ours: peakLocalSigma (N, max_peaks) float32, nComponents (N,) int32,
      trainId, pulseId (N,) uint64, pumped (N,) int8 (-1 unknown), frameIndex (N,) int64.
      Root attributes: file_format, file_format_version, creator, provenance (JSON), peakfinder_config (JSON);
      ``/cxi_version``. The group attribute ``n_frames`` is the committed frame count.

    Crash safety: every append resizes all datasets, writes them, then sets ``n_frames`` and flushes the file,
    so a crash loses at most the batch being written. ``resume=True`` reopens an existing file (or creates a
    new one), truncates every dataset to the last consistent count (``n_frames``) and appends after it.

    Use as a context manager: ``with CxiPeakWriter(path, 1024) as w: w.append(peaks, tids, pids, pumped)``.
    """

    def __init__(
        self,
        path: str | Path,
        max_peaks: int,
        *,
        resume: bool = False,
        provenance: Mapping | None = None,
        peakfinder_config=None,
        chunk_frames: int = 64,
    ):
        from jaxpolaron.io import check_writable

        if max_peaks < 1:
            raise ValueError(f"max_peaks must be >= 1, got {max_peaks}")
        self.path = check_writable(path)
        self.max_peaks = int(max_peaks)
        if resume and self.path.exists():
            self._f = _open_h5(self.path, "r+")
            try:
                g = _check_cxi(self._f, self.path)
                width = g["peakXPosRaw"].shape[1]
                if width != self.max_peaks:
                    raise InputError(f"{self.path} holds {width} peaks per frame, not {self.max_peaks}; cannot resume.")
                n = _consistent_frames(g)
                for name in _CXI_DATASETS:
                    g[name].resize(n, axis=0)
                g.attrs["n_frames"] = n
                self._f.flush()
            except BaseException:
                self._f.close()
                raise
        else:
            self._create(provenance, peakfinder_config, chunk_frames)
        self._g = self._f[CXI_PEAK_PATH]

    def _create(self, provenance, peakfinder_config, chunk_frames: int) -> None:
        if provenance is None:
            from jaxpolaron.io import provenance as make_provenance

            provenance = make_provenance()
        self._f = _open_h5(self.path, "w")
        f = self._f
        f.attrs.update(
            file_format=CXI_FORMAT,
            file_format_version=CXI_FORMAT_VERSION,
            creator=f"jaxpolaron {__version__}",
            provenance=json.dumps(dict(provenance), sort_keys=True, default=str),
            peakfinder_config=_config_json(peakfinder_config),
        )
        f["cxi_version"] = np.int32(150)
        g = f.require_group(CXI_PEAK_PATH)
        g.attrs.update(
            n_frames=0,
            layout="stacked",
            module_ss=MODULE_SS,
            coordinates="peakXPosRaw = fs, peakYPosRaw = 512*module + ss; pixel centres at integers",
        )
        for name, (dtype, per_peak) in _CXI_DATASETS.items():
            if per_peak:
                g.create_dataset(
                    name,
                    shape=(0, self.max_peaks),
                    maxshape=(None, self.max_peaks),
                    dtype=dtype,
                    chunks=(chunk_frames, self.max_peaks),
                    compression="gzip",
                    compression_opts=1,
                    shuffle=True,
                )
            else:
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(max(chunk_frames, 256),))
        f.flush()

    @property
    def n_frames(self) -> int:
        """Frames in the file (after a resume: those already written)."""
        return int(self._g.attrs["n_frames"])

    def truncate(self, n: int) -> None:
        """Keep the first n frames (resume to an earlier checkpoint than the file's last commit)."""
        if n < self.n_frames:
            for name in _CXI_DATASETS:
                self._g[name].resize(n, axis=0)
            self._g.attrs["n_frames"] = n
            self._f.flush()

    def append(self, peaks: PeakList, train_ids, pulse_ids, pumped=None, frame_index=None) -> int:
        """Append a batch of B frames; returns the new frame count.

        peaks: PeakList with a leading batch axis (``find_peaks_batch``), numpy or jax arrays, at most
            max_peaks per frame (narrower lists are zero-padded). train_ids, pulse_ids: (B,) ints.
        pumped: (B,) bool or int (1/0, -1 unknown); None = unknown. frame_index: (B,) index of each frame in
            the source run; None = the file row numbers.
        """
        n_peaks = np.asarray(peaks.n_peaks, np.int32).reshape(-1)
        b = n_peaks.shape[0]
        width = np.shape(peaks.fs)[-1]
        if np.shape(peaks.fs) != (b, width):
            raise ValueError(f"peaks must have a leading batch axis: fs has shape {np.shape(peaks.fs)}")
        if width > self.max_peaks:
            raise ValueError(f"peak lists hold {width} entries, more than this file's max_peaks={self.max_peaks}")
        n0 = self.n_frames
        module = np.asarray(peaks.panel, np.int64)
        valid = np.arange(width)[None, :] < n_peaks[:, None]
        per_peak = {
            "peakXPosRaw": np.asarray(peaks.fs, np.float64),
            "peakYPosRaw": np.asarray(peaks.ss, np.float64) + MODULE_SS * np.maximum(module, 0),
            "peakTotalIntensity": peaks.total_intensity,
            "peakNPixels": peaks.n_pixels,
            "peakMaximumValue": peaks.max_intensity,
            "peakSNR": peaks.snr,
            "peakLocalSigma": peaks.local_sigma,
        }
        per_frame = {
            "nPeaks": n_peaks,
            "nComponents": np.broadcast_to(np.asarray(peaks.n_components, np.int32), (b,)),
            "trainId": np.asarray(train_ids, np.uint64).reshape(b),
            "pulseId": np.asarray(pulse_ids, np.uint64).reshape(b),
            "pumped": np.full(b, -1, np.int8) if pumped is None else np.asarray(pumped).astype(np.int8).reshape(b),
            "frameIndex": (
                np.arange(n0, n0 + b, dtype=np.int64)
                if frame_index is None
                else np.asarray(frame_index, np.int64).reshape(b)
            ),
        }
        if np.any((n_peaks < 0) | (n_peaks > width)):
            raise ValueError(f"n_peaks must lie in [0, {width}]")
        if np.any(valid & (module < 0)):
            raise ValueError("a valid peak has a negative panel (module) index")
        if b == 0:
            return n0
        for name, values in per_peak.items():
            block = np.zeros((b, self.max_peaks), np.float32)
            block[:, :width] = np.where(valid, np.asarray(values, np.float64), 0.0)
            ds = self._g[name]
            ds.resize(n0 + b, axis=0)
            ds[n0:] = block
        for name, values in per_frame.items():
            ds = self._g[name]
            ds.resize(n0 + b, axis=0)
            ds[n0:] = values
        self._g.attrs["n_frames"] = n0 + b  # the commit mark, written last
        self._f.flush()
        return n0 + b

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> CxiPeakWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _open_cxi(path: str | Path):
    """(file, peak group, committed frames) of one of our CXI peak files, opened read-only; InputError for a
    missing file, a non-HDF5 file, or a file that is not ours or lacks datasets."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"CXI peak file {path} does not exist.")
    with _open_h5(path, "r") as f:
        g = _check_cxi(f, path)
        yield f, g, _consistent_frames(g)


def _split_stacked(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Module (int32) and in-module slow scan (float32) of stacked-layout CXI y positions."""
    module = np.floor((y.astype(np.float64) + 0.5) / MODULE_SS).astype(np.int32)
    return module, (y - MODULE_SS * module).astype(np.float32)


def read_cxi_peaks(path: str | Path) -> CxiPeaks:
    """Read a CXI peak-list file written by ``CxiPeakWriter`` (its consistent frames only; read-only).

    Raises InputError for a missing file, a non-HDF5 file, or a file that is not ours or lacks datasets.
    """
    from data_pipeline.peakfinder import PeakList

    with _open_cxi(path) as (f, g, n):
        d = {name: g[name][:n] for name in _CXI_DATASETS}
        prov = json.loads(f.attrs.get("provenance", "{}"))
        config = json.loads(f.attrs.get("peakfinder_config", "{}"))
    y = d["peakYPosRaw"]
    width = y.shape[1]
    valid = np.arange(width)[None, :] < d["nPeaks"][:, None]
    module, ss = _split_stacked(y)

    def pad(x, fill=0):
        return np.where(valid, x, fill).astype(x.dtype)

    peaks = PeakList(
        n_peaks=d["nPeaks"],
        n_components=d["nComponents"],
        fs=pad(d["peakXPosRaw"]),
        ss=pad(ss),
        panel=pad(module, -1),
        total_intensity=pad(d["peakTotalIntensity"]),
        n_pixels=pad(np.rint(d["peakNPixels"]).astype(np.int32)),
        max_intensity=pad(d["peakMaximumValue"]),
        local_sigma=pad(d["peakLocalSigma"]),
        snr=pad(d["peakSNR"]),
    )
    return CxiPeaks(peaks, d["trainId"], d["pulseId"], d["pumped"], d["frameIndex"], prov, config)


class PeakRows(NamedTuple):
    """Selected frames of a CXI peak-list file, trimmed to their peaks (for reductions of long runs).

    rows: (k,) frame rows, ascending. module, ss, fs, total_intensity: per row (n_peaks,) arrays (module pixels,
    centres at integers; the stacked CXI slow-scan coordinate split into module and ss).
    """

    rows: np.ndarray
    module: list[np.ndarray]
    ss: list[np.ndarray]
    fs: list[np.ndarray]
    total_intensity: list[np.ndarray]


def read_cxi_frames(path: str | Path) -> dict[str, np.ndarray]:
    """The per-frame columns of a CXI peak file (nPeaks, trainId, pulseId, pumped, frameIndex), (N,) each,
    without the (N, max_peaks) peak arrays."""
    with _open_cxi(path) as (_, g, n):
        return {name: g[name][:n] for name in ("nPeaks", "trainId", "pulseId", "pumped", "frameIndex")}


def read_cxi_peak_rows(path: str | Path, rows: np.ndarray, block: int = 4096) -> PeakRows:
    """The peaks of frames `rows` (ascending), read `block` frames at a time: memory ~ the peaks kept, not the
    (N, max_peaks) datasets."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be strictly ascending.")
    out: dict[str, list[np.ndarray]] = {"module": [], "ss": [], "fs": [], "total_intensity": []}
    with _open_cxi(path) as (_, g, n_frames):
        if len(rows) and rows[-1] >= n_frames:
            raise InputError(f"{path} holds {n_frames} frames; row {rows[-1]} was asked for.")
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            n_peaks = g["nPeaks"][lo:hi][chunk - lo]
            width = int(n_peaks.max(initial=0))
            y = g["peakYPosRaw"][lo:hi, :width][chunk - lo]
            x = g["peakXPosRaw"][lo:hi, :width][chunk - lo]
            inten = g["peakTotalIntensity"][lo:hi, :width][chunk - lo]
            module, ss = _split_stacked(y)
            for i, k in enumerate(n_peaks):
                out["module"].append(module[i, :k])
                out["ss"].append(ss[i, :k])
                out["fs"].append(x[i, :k])
                out["total_intensity"].append(inten[i, :k])
    return PeakRows(rows, **out)


def write_crystfel_event_list(path: str | Path, cxi_path: str | Path, n_frames: int) -> Path:
    """indexamajig input list for a CXI peak file: one ``<cxi_path> //<row>`` line per frame.

    With explicit events indexamajig does not expand frames from the image data, so with ``--peaks=cxi
    --no-image-data`` and a ``layout="stacked"`` geometry carrying ``peak_list``, the peak file alone suffices.
    """
    from jaxpolaron.io import check_writable

    path = check_writable(path)
    name = str(Path(cxi_path))
    if " " in name:
        raise InputError(f"CrystFEL list files cannot hold a file name with spaces and an event: {name}.")
    path.write_text("".join(f"{name} {event_id(i)}\n" for i in range(n_frames)))
    return path


# --- CrystFEL streams ----------------------------------------------------------------------------------------

STREAM_FORMAT_LINE = "CrystFEL stream format 2.3"
_GEOM_BEGIN, _GEOM_END = "----- Begin geometry file -----", "----- End geometry file -----"
_CELL_BEGIN, _CELL_END = "----- Begin unit cell -----", "----- End unit cell -----"
_CHUNK_BEGIN, _CHUNK_END = "----- Begin chunk -----", "----- End chunk -----"
_PEAKS_BEGIN, _PEAKS_END = "Peaks from peak search", "End of peak list"
_CRYSTAL_BEGIN, _CRYSTAL_END = "--- Begin crystal", "--- End crystal"
_REFL_BEGIN, _REFL_END = "Reflections measured after indexing", "End of reflections"
_NO_REFL = "No integrated reflections."
LATTICE_TYPES = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "rhombohedral", "hexagonal", "cubic")
_CENTERINGS = "PABCIFRH"
_MAX_LINE = 1000  # CrystFEL reads stream lines with fgets(…, 1023): longer lines would be split
_MAX_AUDIT = 4000  # and keeps at most ~4090 characters of header before the geometry


def event_id(row: int) -> str:
    """CrystFEL event ID of row `row` of a frame × … array with ``dim0 = %``: ``"//<row>"``."""
    return f"//{int(row)}"


class StreamPeaks(NamedTuple):
    """Peaks of one frame in our convention: fs, ss (n,) module pixels with centres at integers, module (n,)
    int, intensity (n,) detector units."""

    fs: np.ndarray
    ss: np.ndarray
    module: np.ndarray
    intensity: np.ndarray

    @classmethod
    def empty(cls) -> StreamPeaks:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros(0))

    @classmethod
    def from_peaklist(cls, peaks: PeakList) -> StreamPeaks:
        """The n_peaks valid entries of one frame's PeakList (no batch axis), intensity = total_intensity."""
        n = int(np.asarray(peaks.n_peaks))
        return cls(
            np.asarray(peaks.fs, np.float64)[:n],
            np.asarray(peaks.ss, np.float64)[:n],
            np.asarray(peaks.panel, np.int64)[:n],
            np.asarray(peaks.total_intensity, np.float64)[:n],
        )


class StreamReflections(NamedTuple):
    """Integrated reflections of one crystal: hkl (n, 3) int; intensity, sigma, peak, background (n,) detector
    units; fs, ss (n,) predicted position in module pixels (centres at integers); module (n,) int."""

    hkl: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    peak: np.ndarray
    background: np.ndarray
    fs: np.ndarray
    ss: np.ndarray
    module: np.ndarray


def cell_parameters(astar: np.ndarray) -> tuple[float, ...]:
    """(a, b, c in Å; α, β, γ in degrees) of the lattice whose reciprocal basis has rows a*, b*, c* (3, 3) Å⁻¹."""
    direct = np.linalg.inv(astar).T  # rows a, b, c: A · A*ᵀ = I
    a, b, c = np.linalg.norm(direct, axis=1)

    def angle(u, v):
        return math.degrees(math.acos(float(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))

    return (float(a), float(b), float(c), angle(direct[1], direct[2]), angle(direct[0], direct[2]), angle(*direct[:2]))


_cell_from_astar = cell_parameters  # old private name, used by data_pipeline.index_run


@dataclasses.dataclass(frozen=True, eq=False)
class StreamCrystal:
    """One indexed crystal of a frame.

    astar: (3, 3) Å⁻¹, rows a*, b*, c* in our lab frame (beam +z, EuXFEL x/y), so a reflection lies at
        q = (h, k, l) @ astar; for an orientation R (q_lab = R q_crystal) and crystal-frame reciprocal basis
        B (rows a*, b*, c*): astar = B @ Rᵀ. Written as nm⁻¹ (× 10) in CrystFEL's identical lab frame.
    lattice_type: one of LATTICE_TYPES; centering: P, A, B, C, I, F, R or H; unique_axis: a, b, c or *.
    profile_radius: Å⁻¹. resolution_limit: 1/d Å⁻¹ (None: the largest |q| of the reflections).
    residuals: (initial, final) predict_refine residuals, or None. det_shift_mm: (x, y) detector shift.
    reflections: integrated reflections, or None ("No integrated reflections.").
    num_saturated, num_implausible: reflection counts CrystFEL reports.
    """

    astar: np.ndarray
    lattice_type: str = "triclinic"
    centering: str = "P"
    unique_axis: str = "*"
    profile_radius: float = 0.0
    resolution_limit: float | None = None
    residuals: tuple[float, float] | None = None
    det_shift_mm: tuple[float, float] = (0.0, 0.0)
    reflections: StreamReflections | None = None
    num_saturated: int = 0
    num_implausible: int = 0

    def __post_init__(self):
        astar = np.asarray(self.astar, np.float64)
        if astar.shape != (3, 3) or not np.all(np.isfinite(astar)) or abs(np.linalg.det(astar)) < 1e-12:
            raise ValueError(f"astar must be a finite, non-singular (3, 3) matrix, got shape {astar.shape}")
        object.__setattr__(self, "astar", astar)
        if self.lattice_type not in LATTICE_TYPES:
            raise ValueError(f"lattice_type must be one of {LATTICE_TYPES}, got {self.lattice_type!r}")
        if len(self.centering) != 1 or self.centering not in _CENTERINGS:
            raise ValueError(f"centering must be one of {_CENTERINGS}, got {self.centering!r}")
        if self.unique_axis not in ("a", "b", "c", "*", "?"):
            raise ValueError(f"unique_axis must be a, b, c or *, got {self.unique_axis!r}")

    @property
    def cell(self) -> tuple[float, ...]:
        """(a, b, c in Å, α, β, γ in degrees) from astar."""
        return cell_parameters(self.astar)


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkRecord:
    """One frame of a stream.

    filename: the image (or CXI peak) file; event: CrystFEL event ID (``event_id(row)``); serial: image serial.
    photon_energy_ev: eV. peaks: StreamPeaks (our convention). crystals: indexed crystals.
    hit: None = has peaks. indexed_by: None = the writer's indexer if there are crystals, else "none".
    headers: extra per-frame values written as ``header/int|float|str/<name> = value`` (e.g. trainId,
        pulseId, pumped); names must not contain spaces.
    beam_divergence: rad; beam_bandwidth: fraction (FWHM); n_indexing_tries: written when indexed.
    """

    filename: str
    event: str
    serial: int
    photon_energy_ev: float
    peaks: StreamPeaks = dataclasses.field(default_factory=StreamPeaks.empty)
    crystals: tuple[StreamCrystal, ...] = ()
    hit: bool | None = None
    indexed_by: str | None = None
    headers: Mapping[str, int | float | str] = dataclasses.field(default_factory=dict)
    beam_divergence: float = 0.0
    beam_bandwidth: float = 0.0
    n_indexing_tries: int = 1

    def __post_init__(self):
        if not self.photon_energy_ev > 0:
            raise ValueError(f"photon energy must be positive, got {self.photon_energy_ev} eV")
        for name in self.headers:
            if not name or " " in name or "=" in name:
                raise ValueError(f"header name {name!r} must be non-empty without spaces or '='")
        if " " in self.event or "\n" in self.filename:
            raise ValueError("event must not contain spaces and filename no newline")


@dataclasses.dataclass(frozen=True)
class TargetCell:
    """The target unit cell of a stream header: a, b, c in Å, alpha, beta, gamma in degrees."""

    a: float
    b: float
    c: float
    alpha: float = 90.0
    beta: float = 90.0
    gamma: float = 90.0
    lattice_type: str = "cubic"
    centering: str = "P"
    unique_axis: str = "*"


class StreamContents(NamedTuple):
    """A parsed stream: audit lines before the geometry, the geometry text, the target cell (or None) and the
    complete chunks (a partly written last chunk is ignored)."""

    audit: list[str]
    geometry_text: str
    target_cell: TargetCell | None
    chunks: list[ChunkRecord]


def peak_resolution(inv_d: np.ndarray) -> float:
    """CrystFEL's per-frame peak resolution: the largest 1/d after dropping the top n//50 peaks (when >= 2)."""
    r = np.sort(np.asarray(inv_d, np.float64))
    if r.size == 0:
        return 0.0
    cut = r.size // 50
    return float(r[r.size - 1 - (cut if cut >= 2 else 0)])


def _res_text(inv_d_nm: float, fmt: str = "f") -> str:
    """CrystFEL's "<1/d> nm^-1 or <d> A" (d = inf for 1/d = 0, as printf prints 1e10/0)."""
    d_a = 10.0 / inv_d_nm if inv_d_nm > 0 else math.inf
    return f"{inv_d_nm:{fmt}} nm^-1 or {d_a:{fmt}} A"


class StreamWriter:
    """Write a CrystFEL stream (format 2.3), one chunk per frame.

    geometry_text: the .geom text embedded in the header; peak/reflection positions are converted to its file
        coordinates and panel names (either layout), and 1/d and the camera length come from it.
    target_cell: optional unit-cell block. indexer: ``indexed_by`` of chunks with crystals (CrystFEL only
        knows its own indexers: reading "spind" it reports "Bad list of indexing methods" but keeps the
        crystals; "file" is a name it accepts). command_line: optional audit line.
    resume: reopen an existing stream written with the same geometry, drop a partly written last chunk and
        append (``n_chunks`` tells how many complete chunks it holds); a missing file is created.

    Each chunk is formatted in memory and written with one write() and a flush, so a crash leaves at most a
    partial last chunk, which readers (ours, CrystFEL's) skip and ``resume`` removes.
    """

    def __init__(
        self,
        path: str | Path,
        geometry_text: str,
        *,
        target_cell: TargetCell | None = None,
        indexer: str = "spind",
        command_line: str | None = None,
        resume: bool = False,
    ):
        from jaxpolaron.io import check_writable

        self.path = check_writable(path)
        if not geometry_text.endswith("\n"):
            geometry_text += "\n"
        if any(len(line) > _MAX_LINE for line in geometry_text.splitlines()):
            raise InputError(f"the geometry has lines longer than {_MAX_LINE} characters, which CrystFEL cannot read.")
        self.geometry_text = geometry_text
        self._panels = _parse_panels(geometry_text)
        self.indexer = indexer
        self.n_chunks = 0
        header = self._header(target_cell, indexer, command_line)
        try:
            if resume and self.path.exists():
                self._fh = self._reopen()
            else:
                self._fh = open(self.path, "w", encoding="utf-8")
                self._fh.write(header)
                self._fh.flush()
        except OSError as exc:
            raise InputError(f"cannot write stream {self.path}: {exc.strerror or exc}.") from None

    def _header(self, cell: TargetCell | None, indexer: str, command_line: str | None) -> str:
        audit = [STREAM_FORMAT_LINE, f"Generated by jaxpolaron {__version__} (data_pipeline.io.StreamWriter)"]
        if command_line:
            audit.append(command_line.replace("\n", " "))
        audit.append(f"Indexing methods selected: {indexer}")
        if sum(len(a) + 1 for a in audit) > _MAX_AUDIT or any(len(a) > _MAX_LINE for a in audit):
            raise InputError("the stream's command line is too long for CrystFEL's header (4 kB, 1000 per line).")
        lines = [*audit, _GEOM_BEGIN, self.geometry_text.rstrip("\n"), _GEOM_END]
        if cell is not None:
            lines += [_CELL_BEGIN, "CrystFEL unit cell file version 1.0", "", f"lattice_type = {cell.lattice_type}"]
            if cell.lattice_type in ("monoclinic", "tetragonal", "hexagonal"):
                lines.append(f"unique_axis = {cell.unique_axis}")
            lines.append(f"centering = {cell.centering}")
            lines += [f"{k} = {v:.2f} A" for k, v in zip("abc", (cell.a, cell.b, cell.c), strict=True)]
            lines += [
                f"{k} = {v:.2f} deg"
                for k, v in zip(("al", "be", "ga"), (cell.alpha, cell.beta, cell.gamma), strict=True)
            ]
            lines += ["; Please note: this is the target unit cell.", _CELL_END]
        return "\n".join(lines) + "\n"

    def _reopen(self):
        data = self.path.read_bytes()
        if not data.startswith(STREAM_FORMAT_LINE.encode()):
            raise InputError(f"{self.path} is not a CrystFEL stream (first line is not {STREAM_FORMAT_LINE!r}).")
        lines = data.decode("utf-8", errors="replace").splitlines()
        geom = _between(lines, _GEOM_BEGIN, _GEOM_END)
        if geom is None or geom != self.geometry_text.rstrip("\n"):
            raise InputError(f"{self.path} was written with a different geometry; cannot resume it.")
        end_marker = f"\n{_CHUNK_END}\n".encode()
        end = data.rfind(end_marker)
        if end >= 0:  # keep everything up to the last complete chunk
            keep = end + len(end_marker)
        else:  # no complete chunk: keep the header (geometry and unit cell blocks)
            keep = max(data.find(f"{m}\n".encode()) + len(m) + 1 for m in (_GEOM_END, _CELL_END))
        self.n_chunks = data[:keep].count(end_marker)
        fh = open(self.path, "r+", encoding="utf-8")
        fh.seek(keep)
        fh.truncate()
        fh.flush()
        return fh

    def _peak_lines(self, peaks: StreamPeaks, energy_ev: float) -> tuple[list[str], np.ndarray]:
        lines = [_PEAKS_BEGIN, "  fs/px   ss/px (1/d)/nm^-1   Intensity  Panel"]
        if len(peaks.fs) == 0:
            return [*lines, _PEAKS_END], np.zeros(0)
        ffs, fss, p, pos = _to_file(self._panels, peaks.module, peaks.ss, peaks.fs)
        inv_d = _inv_d(pos, energy_ev)
        for x, y, q, i, pi in zip(ffs, fss, 10.0 * inv_d, np.asarray(peaks.intensity, float), p, strict=True):
            lines.append(f"{x:7.2f} {y:7.2f} {q:10.2f}  {i:10.2f}   {self._panels.names[pi]}")
        return [*lines, _PEAKS_END], inv_d

    def _crystal_lines(self, cr: StreamCrystal) -> list[str]:
        a, b, c, al, be, ga = cr.cell
        s = 10.0 * cr.astar  # Å⁻¹ -> nm⁻¹; CrystFEL's lab frame is ours
        lines = [
            _CRYSTAL_BEGIN,
            f"Cell parameters {a / 10:7.5f} {b / 10:7.5f} {c / 10:7.5f} nm, {al:7.5f} {be:7.5f} {ga:7.5f} deg",
            *(f"{n}star = {v[0]:+9.7f} {v[1]:+9.7f} {v[2]:+9.7f} nm^-1" for n, v in zip("abc", s, strict=True)),
            f"lattice_type = {cr.lattice_type}",
            f"centering = {cr.centering}",
            f"unique_axis = {cr.unique_axis}",
            f"profile_radius = {10.0 * cr.profile_radius:.5f} nm^-1",
        ]
        if cr.residuals is not None:
            lines += [
                f"predict_refine/initial_residual = {cr.residuals[0]:f}",
                f"predict_refine/final_residual = {cr.residuals[1]:f}",
            ]
        lines.append(f"predict_refine/det_shift x = {cr.det_shift_mm[0]:.3f} y = {cr.det_shift_mm[1]:.3f} mm")
        r = cr.reflections
        if r is None:
            return [*lines, _NO_REFL, _CRYSTAL_END]
        hkl = np.asarray(r.hkl, np.int64).reshape(-1, 3)
        limit = cr.resolution_limit
        if limit is None:
            limit = float(np.linalg.norm(hkl @ cr.astar, axis=1).max()) if len(hkl) else 0.0
        lines += [
            f"diffraction_resolution_limit = {_res_text(10.0 * limit, '.2f')}",
            f"num_reflections = {len(hkl)}",
            f"num_saturated_reflections = {cr.num_saturated}",
            f"num_implausible_reflections = {cr.num_implausible}",
            _REFL_BEGIN,
            "   h    k    l          I   sigma(I)       peak background  fs/px  ss/px panel",
        ]
        if len(hkl):
            ffs, fss, p, _ = _to_file(self._panels, r.module, r.ss, r.fs)
            cols = (r.intensity, r.sigma, r.peak, r.background)
            i_, s_, pk, bg = (np.asarray(x, float).reshape(-1) for x in cols)
            for j in range(len(hkl)):
                h, k, l = hkl[j]
                lines.append(
                    f"{h:4d} {k:4d} {l:4d} {i_[j]:10.2f} {s_[j]:10.2f} {pk[j]:10.2f} {bg[j]:10.2f} "
                    f"{ffs[j]:6.1f} {fss[j]:6.1f} {self._panels.names[p[j]]}"
                )
        return [*lines, _REFL_END, _CRYSTAL_END]

    def format_chunk(self, chunk: ChunkRecord) -> str:
        """The text of one chunk (what write_chunk writes)."""
        indexed_by = chunk.indexed_by or (self.indexer if chunk.crystals else "none")
        peak_lines, inv_d = self._peak_lines(chunk.peaks, chunk.photon_energy_ev)
        hit = (len(chunk.peaks.fs) > 0) if chunk.hit is None else chunk.hit
        lines = [
            _CHUNK_BEGIN,
            f"Image filename: {chunk.filename}",
            f"Event: {chunk.event}",
            f"Image serial number: {chunk.serial}",
            f"hit = {int(hit)}",
            f"indexed_by = {indexed_by}",
        ]
        if indexed_by != "none":
            lines.append(f"n_indexing_tries = {chunk.n_indexing_tries}")
        lines += [
            f"photon_energy_eV = {chunk.photon_energy_ev:f}",
            f"beam_divergence = {chunk.beam_divergence:.2e} rad",
            f"beam_bandwidth = {chunk.beam_bandwidth:.2e} (fraction)",
        ]
        for name, value in chunk.headers.items():
            if isinstance(value, bool | int | np.integer | np.bool_):
                lines.append(f"header/int/{name} = {int(value)}")
            elif isinstance(value, float | np.floating):
                lines.append(f"header/float/{name} = {float(value):f}")
            else:
                lines.append(f"header/str/{name} = {value}")
        lines += [
            f"average_camera_length = {float(self._panels.corner[:, 2].mean()):f} m",
            f"num_peaks = {len(chunk.peaks.fs)}",
            f"peak_resolution = {_res_text(10.0 * peak_resolution(inv_d))}",
            *peak_lines,
        ]
        for cr in chunk.crystals:
            lines += self._crystal_lines(cr)
        lines.append(_CHUNK_END)
        return "\n".join(lines) + "\n"

    def write_chunk(self, chunk: ChunkRecord) -> None:
        """Append one chunk (a single write() and a flush)."""
        text = self.format_chunk(chunk)
        self._fh.write(text)
        self._fh.flush()
        self.n_chunks += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _between(lines: list[str], begin: str, end: str) -> str | None:
    try:
        i = lines.index(begin)
        j = lines.index(end, i + 1)
    except ValueError:
        return None
    return "\n".join(lines[i + 1 : j])


_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)"


def _kv(line: str) -> tuple[str, str] | None:
    key, sep, value = line.partition(" = ")
    return (key.strip(), value.strip()) if sep else None


def _parse_table(lines: list[str], n_cols: int, what: str) -> list[list[str]]:
    rows = []
    for line in lines[1:]:  # first line: column titles
        parts = line.split()
        if len(parts) != n_cols:
            raise InputError(f"malformed {what} line in stream: {line!r}")
        rows.append(parts)
    return rows


def _parse_crystal(lines: list[str], panels: _Panels) -> StreamCrystal:
    kv: dict[str, str] = {}
    astar = np.zeros((3, 3))
    reflections = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == _REFL_BEGIN:
            j = lines.index(_REFL_END, i)
            rows = _parse_table(lines[i + 1 : j], 10, "reflection")
            hkl = np.array([[int(x) for x in r[:3]] for r in rows], np.int64).reshape(-1, 3)
            num = np.array([[float(x) for x in r[3:9]] for r in rows], np.float64).reshape(-1, 6)
            module, ss, fs = _from_file(panels, num[:, 4], num[:, 5], [r[9] for r in rows])
            reflections = StreamReflections(hkl, num[:, 0], num[:, 1], num[:, 2], num[:, 3], fs, ss, module)
            i = j + 1
            continue
        m = re.fullmatch(rf"([abc])star = ({_FLOAT}) ({_FLOAT}) ({_FLOAT}) nm\^-1", line)
        if m:
            astar["abc".index(m.group(1))] = [float(x) / 10.0 for x in m.groups()[1:]]
        elif (pair := _kv(line)) is not None:
            kv[pair[0]] = pair[1]
        i += 1
    shift = re.fullmatch(rf"x = ({_FLOAT}) y = ({_FLOAT}) mm", kv.get("predict_refine/det_shift", "x = 0 y = 0 mm"))
    residuals = None
    if "predict_refine/final_residual" in kv:
        residuals = (
            float(kv.get("predict_refine/initial_residual", "nan")),
            float(kv["predict_refine/final_residual"]),
        )
    limit = kv.get("diffraction_resolution_limit")
    return StreamCrystal(
        astar=astar,
        lattice_type=kv.get("lattice_type", "triclinic"),
        centering=kv.get("centering", "P"),
        unique_axis=kv.get("unique_axis", "*"),
        profile_radius=float(kv.get("profile_radius", "0 nm^-1").split()[0]) / 10.0,
        resolution_limit=float(limit.split()[0]) / 10.0 if limit else None,
        residuals=residuals,
        det_shift_mm=(float(shift.group(1)), float(shift.group(2))) if shift else (0.0, 0.0),
        reflections=reflections,
        num_saturated=int(kv.get("num_saturated_reflections", "0")),
        num_implausible=int(kv.get("num_implausible_reflections", "0")),
    )


def _header_value(kind: str, value: str) -> int | float | str:
    return int(value) if kind == "int" else float(value) if kind == "float" else value


def _parse_chunk(lines: list[str], panels: _Panels) -> ChunkRecord:
    kv: dict[str, str] = {}
    headers: dict[str, int | float | str] = {}
    peaks = StreamPeaks.empty()
    crystals = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == _PEAKS_BEGIN:
            j = lines.index(_PEAKS_END, i)
            rows = _parse_table(lines[i + 1 : j], 5, "peak")
            num = np.array([[float(x) for x in r[:4]] for r in rows], np.float64).reshape(-1, 4)
            module, ss, fs = _from_file(panels, num[:, 0], num[:, 1], [r[4] for r in rows])
            peaks = StreamPeaks(fs, ss, module, num[:, 3])
            i = j + 1
            continue
        if line == _CRYSTAL_BEGIN:
            j = lines.index(_CRYSTAL_END, i)
            crystals.append(_parse_crystal(lines[i + 1 : j], panels))
            i = j + 1
            continue
        key, sep, value = line.partition(": ")
        if sep and key in ("Image filename", "Event", "Image serial number"):
            kv[key] = value
        elif (pair := _kv(line)) is not None:
            m = re.fullmatch(r"header/(int|float|str)/(\S+)", pair[0])
            if m:
                headers[m.group(2)] = _header_value(m.group(1), pair[1])
            else:
                kv[pair[0]] = pair[1]
        i += 1
    try:
        return ChunkRecord(
            filename=kv["Image filename"],
            event=kv.get("Event", ""),
            serial=int(kv.get("Image serial number", "0")),
            photon_energy_ev=float(kv["photon_energy_eV"]),
            peaks=peaks,
            crystals=tuple(crystals),
            hit=bool(int(kv.get("hit", "0"))),
            indexed_by=kv.get("indexed_by", "none"),
            headers=headers,
            beam_divergence=float(kv.get("beam_divergence", "0 rad").split()[0]),
            beam_bandwidth=float(kv.get("beam_bandwidth", "0 (fraction)").split()[0]),
            n_indexing_tries=int(kv.get("n_indexing_tries", "0")),
        )
    except (KeyError, ValueError) as exc:
        raise InputError(f"malformed stream chunk ({type(exc).__name__}: {exc}).") from None


def _parse_target_cell(text: str | None) -> TargetCell | None:
    if text is None:
        return None
    kv = dict(p for line in text.splitlines() if (p := _kv(line)) is not None)
    num = {k: float(kv[k].split()[0]) for k in ("a", "b", "c", "al", "be", "ga") if k in kv}
    return TargetCell(
        num.get("a", math.nan),
        num.get("b", math.nan),
        num.get("c", math.nan),
        num.get("al", 90.0),
        num.get("be", 90.0),
        num.get("ga", 90.0),
        kv.get("lattice_type", "triclinic"),
        kv.get("centering", "P"),
        kv.get("unique_axis", "*"),
    )


def read_stream(path: str | Path) -> StreamContents:
    """Parse a CrystFEL stream (ours or CrystFEL's, format 2.3) into chunks in our conventions.

    Peak and reflection positions come back as (module, ss, fs) with pixel centres at integers (through the
    embedded geometry); astar in Å⁻¹. Precision is that of the text: peaks 0.005 px, reflections 0.05 px,
    intensities 0.005, astar 1e-8 Å⁻¹. A partly written last chunk is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"stream {path} does not exist.")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read stream {path}: {exc.strerror or exc}.") from None
    if not lines or not lines[0].startswith(STREAM_FORMAT_LINE):
        raise InputError(f"{path} is not a CrystFEL stream (first line is not {STREAM_FORMAT_LINE!r}).")
    geometry = _between(lines, _GEOM_BEGIN, _GEOM_END)
    if geometry is None:
        raise InputError(f"stream {path} has no embedded geometry.")
    panels = _parse_panels(geometry + "\n")
    audit = lines[: lines.index(_GEOM_BEGIN)]
    head_end = lines.index(_GEOM_END)
    first_chunk = lines.index(_CHUNK_BEGIN) if _CHUNK_BEGIN in lines else len(lines)
    cell = _parse_target_cell(_between(lines[head_end:first_chunk], _CELL_BEGIN, _CELL_END))
    chunks = []
    i = first_chunk
    while i < len(lines):
        if lines[i] != _CHUNK_BEGIN:
            i += 1
            continue
        try:
            j = lines.index(_CHUNK_END, i + 1)
        except ValueError:
            break  # a partly written last chunk
        chunks.append(_parse_chunk(lines[i + 1 : j], panels))
        i = j + 1
    return StreamContents(audit, geometry + "\n", cell, chunks)
