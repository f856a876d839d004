"""The Fig. 2b powder curves (data_pipeline.powder): virtual powder of integrated peak intensities and the
azimuthal average of whole frames, per pump class, as sums that map-reduce."""

import json
import logging

import numpy as np
import pytest

from data_pipeline import background as bg
from data_pipeline import powder
from data_pipeline.geometry import AGIPD_PIXEL_M, DEFAULT_CLEN_M, pixel_q
from jaxpolaron.scattering import wavelength_a

ENERGY_KEV = 13.6


def _flat_detector(n_modules=2, n_ss=24, n_fs=16):
    """A flat detector at z = clen (m): module m's pixel (ss, fs) at x = (fs + 3) px, y = (ss − 12 + 30 m) px."""
    m, ss, fs = np.meshgrid(np.arange(n_modules), np.arange(n_ss), np.arange(n_fs), indexing="ij")
    pos = np.stack([(fs + 3.0) * AGIPD_PIXEL_M, (ss - 12.0 + 30.0 * m) * AGIPD_PIXEL_M,
                    np.full(m.shape, DEFAULT_CLEN_M)], axis=-1)  # fmt: skip
    return pos


def _q_of(x_m, y_m):
    """|q| = 2 sin θ / λ (Å⁻¹) of a detector point, θ half the scattering angle atan(r / clen)."""
    return 2.0 * np.sin(0.5 * np.arctan2(np.hypot(x_m, y_m), DEFAULT_CLEN_M)) / wavelength_a(ENERGY_KEV)


def test_peak_q_is_the_bragg_q_of_its_sub_pixel_position():
    pos = _flat_detector()
    panel = np.array([[0, 1, -1], [1, -1, -1]])  # a padded (frames, max_peaks) list
    ss = np.array([[5.25, 20.0, 0.0], [0.5, 0.0, 0.0]])
    fs = np.array([[2.0, 7.75, 0.0], [15.0, 0.0, 0.0]])
    got = powder.peak_q_abs(pos, panel, ss, fs, ENERGY_KEV)
    want = _q_of((fs + 3.0) * AGIPD_PIXEL_M, (ss - 12.0 + 30.0 * panel) * AGIPD_PIXEL_M)
    np.testing.assert_allclose(got[panel >= 0], want[panel >= 0], rtol=1e-12)
    assert np.isnan(got[panel < 0]).all()


def test_virtual_powder_bins_peaks_by_q_and_averages_over_hits():
    edges = np.linspace(0.0, 1.0, 11)
    # dark hits: peaks at 0.05 (I=1), 0.25 (2), 0.27 (3), and a hit with no peak in range; pumped: 0.25 (10)
    q = np.array([[0.05, 0.25, 0.27], [1.5, np.nan, np.nan], [0.25, np.nan, np.nan]])
    inten = np.array([[1.0, 2.0, 3.0], [99.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    klass = np.array([0, 0, 1])
    sums, hits = powder.virtual_powder_sums(q, inten, klass, edges)  # padded form
    assert hits.tolist() == [2, 1]
    want = np.zeros((2, 10))
    want[0, 0], want[0, 2], want[1, 2] = 1.0, 5.0, 10.0  # 1.5 is beyond the edges: dropped
    np.testing.assert_array_equal(sums, want)
    ragged = powder.virtual_powder_sums([r[np.isfinite(r)] for r in q], [inten[0], inten[1, :1], inten[2, :1]],
                                        klass, edges)  # fmt: skip
    np.testing.assert_array_equal(ragged[0], sums)
    curves = powder.PowderCurves.from_sums(0.5 * (edges[1:] + edges[:-1]), sums, hits, np.zeros((2, 10)),
                                           np.zeros((2, 10)))  # fmt: skip
    assert curves.virtual[0, 2] == 2.5 and curves.virtual[0, 0] == 0.5 and curves.virtual[1, 2] == 10.0
    assert np.isnan(curves.azimuthal).all()  # no pixel: undefined, not 0
    edge = powder.virtual_powder_sums([np.array([0.0, 1.0])], [np.array([1.0, 2.0])], [1], edges)[0]
    assert edge[1, 0] == 1.0 and edge[1, -1] == 2.0  # both end edges count, as np.histogram
    with pytest.raises(ValueError, match="pump_class"):
        powder.virtual_powder_sums(q, inten, np.array([0, -1, 1]), edges)


def test_virtual_powder_of_peaks_on_a_detector():
    """Peaks at known pixels: each lands in the bin of its analytic |q|, the mean per hit is right."""
    pos = _flat_detector()
    rng = np.random.default_rng(0)
    panel, ss, fs = rng.integers(0, 2, (50, 4)), rng.uniform(0, 23, (50, 4)), rng.uniform(0, 15, (50, 4))
    inten = rng.uniform(10, 100, (50, 4))
    klass = rng.integers(0, 2, 50)
    q = powder.peak_q_abs(pos, panel, ss, fs, ENERGY_KEV)
    edges = np.linspace(0.0, 0.1, 26)
    sums, hits = powder.virtual_powder_sums(q, inten, klass, edges)
    q_true = _q_of((fs + 3.0) * AGIPD_PIXEL_M, (ss - 12.0 + 30.0 * panel) * AGIPD_PIXEL_M)
    assert q_true.max() < edges[-1]
    for k in (0, 1):
        rows = klass == k
        want = np.histogram(q_true[rows], edges, weights=inten[rows])[0] / rows.sum()
        np.testing.assert_allclose(sums[k] / hits[k], want, rtol=1e-12)


def test_azimuthal_average_returns_the_radial_function():
    """Frames whose value is a known function of |q| (dark 3 + 50 q², pumped twice that) with hot bad pixels:
    the per-class average is that function's mean over each bin's pixels, ≈ its value at the bin centre."""
    pos = _flat_detector(4, 64, 64)
    q = _q_of(pos[..., 0], pos[..., 1]).reshape(-1)
    bins, index = bg.make_radial_bins(q, 0.002)
    f = 3.0 + 50.0 * q**2
    klass = np.array([0, 1, 0, 1, 1])
    rng = np.random.default_rng(1)
    good = (rng.random((5, q.size)) > 0.1).astype(np.float32)
    frames = np.where(good > 0, f * (1.0 + klass[:, None]), 1e6).astype(np.float32)  # bad pixels are hot
    s, c = powder.azimuthal_sums(frames, good, index, bins.n_bins, klass)
    curves = powder.PowderCurves.from_sums(bins.centres, np.zeros((2, bins.n_bins)), [2, 3], s, c)
    for k in (0, 1):
        n_good = good[klass == k].sum(0)  # (P,) frames of class k in which each pixel is good
        np.testing.assert_allclose(c[k], np.bincount(index, n_good, bins.n_bins))
        mean = np.bincount(index, n_good * f, bins.n_bins) / c[k]  # the hot bad pixels never enter
        np.testing.assert_allclose(curves.azimuthal[k], (1 + k) * mean, rtol=1e-6)
        # a bin mean lies within max|f'|·h/2 of f(centre), however unevenly the pixels fill the bin
        bound = (1 + k) * 100.0 * bins.edges[1:] * 0.5 * 0.002
        assert np.all(np.abs(curves.azimuthal[k] - (1 + k) * (3.0 + 50.0 * bins.centres**2)) <= bound)
    assert curves.pixels.sum() == good.sum()


def test_accumulators_add_up_and_curves_round_trip_json():
    pos = _flat_detector()
    rng = np.random.default_rng(2)
    n = 12
    panel, ss, fs = rng.integers(0, 2, (n, 3)), rng.uniform(0, 23, (n, 3)), rng.uniform(0, 15, (n, 3))
    panel[3, 1:] = -1  # padding
    inten = rng.uniform(1, 5, (n, 3))
    klass = powder.pump_class(rng.integers(0, 2, n))
    q_pix = np.linalg.norm(pixel_q(pos, ENERGY_KEV), axis=-1).reshape(-1)
    bins, index = bg.make_radial_bins(q_pix, 0.002)
    frames = rng.poisson(2.0, (n, q_pix.size)).astype(np.float32)
    good = np.ones_like(frames)
    q = powder.peak_q_abs(pos, panel, ss, fs, ENERGY_KEV)

    def sums(rows):
        v, h = powder.virtual_powder_sums(q[rows], inten[rows], klass[rows], bins.edges)
        a, c = powder.azimuthal_sums(frames[rows], good[rows], index, bins.n_bins, klass[rows])
        return v, h, a, c

    whole = sums(slice(None))
    parts = [sums(slice(0, 5)), sums(slice(5, 9)), sums(slice(9, n))]
    for w, *p in zip(whole, *parts, strict=True):
        np.testing.assert_allclose(sum(p), w, rtol=1e-6)  # float32 bin means × counts: sums agree to ~1e-7
    assert whole[1].sum() == n and whole[3].sum() == frames.size
    curves = powder.PowderCurves.from_sums(bins.centres, whole[0], whole[1], whole[2], whole[3])
    text = json.dumps(curves.to_dict(), allow_nan=False)  # strictly JSON: no NaN
    again = powder.PowderCurves.from_dict(json.loads(text))
    for name in ("q", "virtual", "azimuthal", "hits", "pixels"):
        np.testing.assert_array_equal(getattr(again, name), getattr(curves, name))
    old = {k: v for k, v in curves.to_dict().items() if not k.startswith("pixels")}  # files without counts
    assert np.isnan(powder.PowderCurves.from_dict(old).pixels).all()


def test_pump_class_folds_unknown_into_dark(caplog):
    with caplog.at_level(logging.WARNING, logger="data_pipeline.powder"):
        assert powder.pump_class(np.array([1, 0, -1, 1], np.int8)).tolist() == [1, 0, 0, 1]
    assert "1 frames have no pump state" in caplog.text
