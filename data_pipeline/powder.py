"""The two powder curves of the paper's Fig. 2b, per pump class (0 dark, 1 pumped).

virtual powder Ī(q): the integrated intensities of the Bragg peaks found in each hit, histogrammed by the
    peak's |q| and averaged over hits (only peaks: no diffuse background, sharper than the detector's peak
    width);
azimuthal average ⟨Ī(q)⟩: the mean of all good pixels of the hits per |q| bin (what a powder measurement gives,
    diffuse ring and all).
Both are sums that add over frames (map-reduce); `PowderCurves` holds the finished curves, JSON-safe.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def virtual_powder_sums(peak_q: list[np.ndarray], peak_intensity: list[np.ndarray], klass: np.ndarray,
                        edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per class (2, n_bins) sums of integrated peak intensity by |q| bin, and (2,) hit counts.

    peak_q, peak_intensity: per hit frame (n_peaks,) |q| in Å⁻¹ and integrated intensities; klass: (frames,)
    0 dark / 1 pumped; edges: (n_bins + 1,) Å⁻¹. Peaks outside the edges are not counted."""
    n_bins = len(edges) - 1
    sums = np.zeros((2, n_bins))
    hits = np.zeros(2)
    for q, inten, k in zip(peak_q, peak_intensity, klass, strict=True):
        hits[k] += 1
        if len(q):
            sums[k] += np.histogram(q, bins=edges, weights=np.asarray(inten, np.float64))[0]
    return sums, hits


@dataclasses.dataclass(frozen=True)
class PowderCurves:
    """q: (n,) bin centres, Å⁻¹. virtual: (2, n) mean integrated peak intensity per hit and bin (dark, pumped);
    azimuthal: (2, n) mean pixel intensity per bin (NaN where no pixel); hits: (2,) hit frames per class."""

    q: np.ndarray
    virtual: np.ndarray
    azimuthal: np.ndarray
    hits: np.ndarray

    @classmethod
    def from_sums(cls, q, virtual_sum, hits, azimuthal_sum, azimuthal_count) -> PowderCurves:
        hits = np.asarray(hits, np.float64)
        virtual = np.divide(virtual_sum, hits[:, None], out=np.zeros_like(virtual_sum, dtype=float),
                            where=hits[:, None] > 0)  # fmt: skip
        azimuthal = np.divide(azimuthal_sum, azimuthal_count, out=np.full(np.shape(azimuthal_sum), np.nan),
                              where=np.asarray(azimuthal_count) > 0)  # fmt: skip
        return cls(np.asarray(q, float), virtual, azimuthal, hits)

    def to_dict(self) -> dict:
        """JSON-safe (NaN as None)."""

        def clean(a):
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        return {"q": clean(self.q), "virtual_dark": clean(self.virtual[0]), "virtual_pumped": clean(self.virtual[1]),
                "azimuthal_dark": clean(self.azimuthal[0]), "azimuthal_pumped": clean(self.azimuthal[1]),
                "hits": [int(h) for h in self.hits]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> PowderCurves:
        def arr(x):
            return np.array([np.nan if v is None else v for v in x], float)

        virtual = np.stack([arr(d["virtual_dark"]), arr(d["virtual_pumped"])])
        azimuthal = np.stack([arr(d["azimuthal_dark"]), arr(d["azimuthal_pumped"])])
        return cls(arr(d["q"]), virtual, azimuthal, np.array(d["hits"], float))
