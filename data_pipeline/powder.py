"""The two powder curves of the paper's Fig. 2b, per pump class (0 dark, 1 pumped).

virtual powder Ī(q) (purple in Fig. 2b): the integrated intensities (CXI peakTotalIntensity) of the Bragg peaks
    found in the hits, histogrammed by each peak's |q| and divided by the number of hits of the class: the mean
    integrated peak intensity per hit in each |q| bin. Only peaks enter, so the diffuse background and the ring
    near 0.2 Å⁻¹ are almost absent.
azimuthal average ⟨Ī(q)⟩ (orange): the mean of all good pixels of the frames per |q| bin (what a conventional
    powder measurement gives, diffuse ring and all). The caller chooses the frames (the paper: all snapshots;
    `jaxpolaron reduce`: the hits) and their correction (solid angle, polarisation).

Both are kept as sums that add over frames (map-reduce in any split): `virtual_powder_sums` and
`azimuthal_sums` return the partial sums of one batch, `PowderCurves.from_sums` finishes them, and
`PowderCurves.to_dict`/`from_dict` give a JSON-safe form for the statistics of a volume file.

Pump classes: the accumulators take klass 0 (dark) or 1 (pumped) only; `pump_class` maps the CXI `pumped`
flags 1/0/-1 to them, folding unknown (-1) into dark with a warning, as `reduce_run.plan` does for merging.
|q| is in Å⁻¹ with |q| = 1/d = 2 sin θ / λ throughout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from data_pipeline.background import radial_profiles

log = logging.getLogger(__name__)

CLASSES = ("dark", "pumped")


def pump_class(pumped: np.ndarray) -> np.ndarray:
    """Class of each frame from the CXI `pumped` flags (N,) 1/0/-1: (N,) int8, 1 = pumped, 0 = dark or
    unknown (unknown frames are counted as dark, with a warning, as for merging)."""
    pumped = np.asarray(pumped)
    unknown = int(np.sum(pumped < 0))
    if unknown:
        log.warning("%d frames have no pump state; counted as dark", unknown)
    return (pumped == 1).astype(np.int8)


def _check_klass(klass: np.ndarray, n: int) -> np.ndarray:
    klass = np.asarray(klass).reshape(-1)
    if klass.size != n:
        raise ValueError(f"need one class per frame ({n}), got {klass.size}.")
    if klass.size and not np.isin(klass, (0, 1)).all():
        raise ValueError("classes must be 0 (dark) or 1 (pumped); map CXI pump flags with pump_class first.")
    return klass.astype(np.int64)


def peak_q_abs(positions_m: np.ndarray, panel, ss, fs, energy_kev: float) -> np.ndarray:
    """|q| in Å⁻¹ of peaks at sub-pixel detector coordinates, any shape (e.g. a padded (N, max_peaks) list).

    positions_m: (16, 512, 128, 3) pixel centres in m (`geometry.pixel_positions`); panel: module, negative for
    padding; ss, fs: sub-pixel coordinates with pixel centres at integers. Padding gives NaN (counted nowhere by
    `virtual_powder_sums`)."""
    from data_pipeline.geometry import peak_positions, pixel_q

    panel = np.asarray(panel, np.int64)
    ss, fs = np.broadcast_to(ss, panel.shape), np.broadcast_to(fs, panel.shape)
    out = np.full(panel.shape, np.nan)
    use = panel >= 0
    if use.any():
        q = pixel_q(peak_positions(positions_m, panel[use], ss[use], fs[use]), energy_kev)
        out[use] = np.linalg.norm(q, axis=-1)
    return out


def virtual_powder_sums(
    peak_q: Sequence[np.ndarray] | np.ndarray,
    peak_intensity: Sequence[np.ndarray] | np.ndarray,
    klass: np.ndarray,
    edges: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of hits' contribution to the virtual powder.

    peak_q, peak_intensity: per hit frame its peaks' |q| in Å⁻¹ and integrated intensities (detector units),
    either ragged (a sequence of (n_peaks_f,) arrays) or padded (N, max_peaks) with NaN |q| for padding (as
    `peak_q_abs` gives); klass: (N,) 0 dark / 1 pumped; edges: (n_bins + 1,) Å⁻¹, increasing. Every frame
    given counts as a hit (select hits first). Peaks outside the edges are not counted.

    Returns (sums (2, n_bins) float64 of integrated intensity per class and bin, hits (2,) float64 frames per
    class); the sums of any split of the frames add up to the whole.
    """
    edges = np.asarray(edges, np.float64)
    n_bins = edges.size - 1
    if isinstance(peak_q, np.ndarray) and peak_q.ndim == 2:  # padded: rows are frames
        q2 = np.asarray(peak_q, np.float64)
        inten2 = np.asarray(peak_intensity, np.float64)
        if inten2.shape != q2.shape:
            raise ValueError(f"padded |q| {q2.shape} and intensities {inten2.shape} differ in shape.")
        n_frames = q2.shape[0]
        frame_of = np.repeat(np.arange(n_frames), q2.shape[1])
        q, inten = q2.reshape(-1), inten2.reshape(-1)
    else:
        if len(peak_q) != len(peak_intensity):
            raise ValueError(f"{len(peak_q)} frames of |q| but {len(peak_intensity)} of intensities.")
        n_frames = len(peak_q)
        lengths = [np.size(x) for x in peak_q]
        if lengths != [np.size(x) for x in peak_intensity]:
            raise ValueError("each frame needs as many intensities as peaks.")
        frame_of = np.repeat(np.arange(n_frames), lengths)
        q = np.concatenate([np.ravel(x) for x in peak_q]).astype(np.float64) if n_frames else np.zeros(0)
        inten = np.concatenate([np.ravel(x) for x in peak_intensity]).astype(np.float64) if n_frames else q
    klass = _check_klass(klass, n_frames)
    hits = np.bincount(klass, minlength=2).astype(np.float64)
    # One 2D histogram (class × |q|) for all peaks of the batch; NaN |q| (padding) falls outside every bin.
    with np.errstate(invalid="ignore"):
        b = np.searchsorted(edges, q, side="right") - 1
        b = np.where(q == edges[-1], n_bins - 1, b)  # the last bin is closed, as np.histogram
        ok = np.isfinite(q) & (b >= 0) & (b < n_bins)
    sums = np.bincount(klass[frame_of[ok]] * n_bins + b[ok], weights=inten[ok], minlength=2 * n_bins)
    return sums.reshape(2, n_bins), hits


def azimuthal_sums(
    frames: np.ndarray, good: np.ndarray, bin_index: np.ndarray, n_bins: int, klass: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of frames' contribution to the azimuthal average.

    frames: (B, P) float32 corrected pixel values; good: (B, P) good-pixel weights (1 good, 0 bad; Bragg peaks
    are *not* excluded: this is the whole-frame average); bin_index: (P,) int32 from
    `background.make_radial_bins`; klass: (B,) 0/1. One `background.radial_profiles` call for the batch.

    Returns (sums (2, n_bins) float64 of pixel values, counts (2, n_bins) float64 of pixels used), per class;
    they add over any split of the frames.
    """
    klass = _check_klass(klass, np.shape(frames)[0])
    mean, count = (np.asarray(x, np.float64) for x in radial_profiles(frames, good, bin_index, n_bins))
    onehot = np.stack([klass == 0, klass == 1]).astype(np.float64)  # (2, B)
    return onehot @ (mean * count), onehot @ count


def _ratio(num, den, fill):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.broadcast_shapes(num.shape, den.shape), fill), where=den > 0)


@dataclasses.dataclass(frozen=True, eq=False)
class PowderCurves:
    """The finished Fig. 2b curves on one |q| grid; row 0 dark, row 1 pumped.

    q: (n,) bin centres, Å⁻¹. virtual: (2, n) mean integrated peak intensity per hit and bin (0 where no peak;
    0 for a class without hits). azimuthal: (2, n) mean pixel value per bin (NaN where no pixel). hits: (2,)
    hit frames per class. pixels: (2, n) pixels averaged per bin (the azimuthal counts).
    """

    q: np.ndarray
    virtual: np.ndarray
    azimuthal: np.ndarray
    hits: np.ndarray
    pixels: np.ndarray

    def __post_init__(self):
        q = np.asarray(self.q, np.float64).reshape(-1)
        n = q.size
        object.__setattr__(self, "q", q)
        for name, shape in (("virtual", (2, n)), ("azimuthal", (2, n)), ("hits", (2,)), ("pixels", (2, n))):
            a = np.asarray(getattr(self, name), np.float64)
            if a.shape != shape:
                raise ValueError(f"PowderCurves.{name} must have shape {shape}, got {a.shape}.")
            object.__setattr__(self, name, a)

    @classmethod
    def from_sums(cls, q, virtual_sum, hits, azimuthal_sum, azimuthal_count) -> PowderCurves:
        """Finish the summed accumulators: q (n,) bin centres Å⁻¹; virtual_sum (2, n) and hits (2,) from
        `virtual_powder_sums`; azimuthal_sum, azimuthal_count (2, n) from `azimuthal_sums`."""
        hits = np.asarray(hits, np.float64)
        virtual = _ratio(virtual_sum, hits[:, None], 0.0)
        azimuthal = _ratio(azimuthal_sum, azimuthal_count, np.nan)
        return cls(q, virtual, azimuthal, hits, np.asarray(azimuthal_count, np.float64))

    def to_dict(self) -> dict:
        """JSON-safe plain lists (NaN and inf as None); keys q, virtual_dark, virtual_pumped, azimuthal_dark,
        azimuthal_pumped, hits, pixels_dark, pixels_pumped."""

        def clean(a):
            return [float(v) if np.isfinite(v) else None for v in np.ravel(a)]

        out = {"q": clean(self.q)}
        for k, name in enumerate(CLASSES):
            out[f"virtual_{name}"] = clean(self.virtual[k])
            out[f"azimuthal_{name}"] = clean(self.azimuthal[k])
            out[f"pixels_{name}"] = clean(self.pixels[k])
        out["hits"] = [int(h) for h in self.hits]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PowderCurves:
        """Inverse of `to_dict` (None -> NaN). Pixel counts missing from older files read as NaN."""

        def arr(x):
            return np.array([np.nan if v is None else v for v in x], np.float64)

        q = arr(d["q"])
        missing = [None] * q.size
        virtual = np.stack([arr(d[f"virtual_{c}"]) for c in CLASSES])
        azimuthal = np.stack([arr(d[f"azimuthal_{c}"]) for c in CLASSES])
        pixels = np.stack([arr(d.get(f"pixels_{c}", missing)) for c in CLASSES])
        return cls(q, virtual, azimuthal, np.array(d["hits"], np.float64), pixels)
