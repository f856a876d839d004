"""CrystFEL interop formats (data_pipeline.io): CXI peak lists, streams, and their pixel conventions.

The stream is checked against cfel_fmt (EuXFEL's CrystFEL-format parser, installed with extra-geom) plus
pandas for the tables (what cfelpyutils does; cfel_fmt's own table reader uses a keyword pandas 3 removed).
Positions are checked by placing peaks with CrystFEL's own rules (slab panel lookup for CXI, panel name +
file coordinates for streams, corner + fs·fs_vec + ss·ss_vec with +0.5 at pixel centres) on the .geom we write.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pandas
import pytest
from cfel_fmt.crystfel_stream import iter_chunks, parse_chunk
from cfel_fmt.geometry import load_crystfel_geometry

from data_pipeline import io as dio
from data_pipeline.geometry import DEFAULT_CLEN_M, default_agipd_geometry, pixel_positions, pixel_q
from data_pipeline.peakfinder import Peakfinder8Config, PeakList
from jaxpolaron.errors import InputError

ENERGY_KEV = 13.6
PROV = {"who": "test", "versions": {"jaxpolaron": "0"}}


@pytest.fixture(scope="module")
def geometry():
    return default_agipd_geometry()


@pytest.fixture(scope="module")
def positions(geometry):
    return pixel_positions(geometry, DEFAULT_CLEN_M)


@pytest.fixture(scope="module", params=["modules", "stacked"])
def geom_text(request, geometry, tmp_path_factory):
    path = tmp_path_factory.mktemp("geom") / f"{request.param}.geom"
    dio.write_crystfel_geom(
        geometry, path, clen_m=DEFAULT_CLEN_M, energy_kev=ENERGY_KEV, layout=request.param, peak_list=dio.CXI_PEAK_PATH
    )
    return path.read_text()


def _random_peaks(rng, b: int, width: int, integer: bool = False) -> PeakList:
    """A numpy PeakList batch (b, width) laid out as peakfinder8's (valid entries first, padding 0 / panel -1)."""
    n = rng.integers(0, width + 1, b).astype(np.int32)
    n[0] = width  # a full frame
    valid = np.arange(width)[None] < n[:, None]
    ss = rng.integers(0, 512, (b, width)) if integer else rng.uniform(0, 511, (b, width))
    fs = rng.integers(0, 128, (b, width)) if integer else rng.uniform(0, 127, (b, width))

    def pad(x, fill=0):
        return np.where(valid, x, fill)

    return PeakList(
        n_peaks=n,
        n_components=(n + rng.integers(0, 5, b)).astype(np.int32),
        fs=pad(fs).astype(np.float32),
        ss=pad(ss).astype(np.float32),
        panel=pad(rng.integers(0, 16, (b, width)), -1).astype(np.int32),
        total_intensity=pad(rng.uniform(10, 1e4, (b, width))).astype(np.float32),
        n_pixels=pad(rng.integers(2, 30, (b, width))).astype(np.int32),
        max_intensity=pad(rng.uniform(1, 1e3, (b, width))).astype(np.float32),
        local_sigma=pad(rng.uniform(0.1, 5, (b, width))).astype(np.float32),
        snr=pad(rng.uniform(6, 100, (b, width))).astype(np.float32),
    )


def _concat_padded(batches: list[PeakList], width: int) -> PeakList:
    def widen(x, fill):
        x = np.asarray(x)
        out = np.full((x.shape[0], width), fill, x.dtype)
        out[:, : x.shape[1]] = x
        return out

    fields = {}
    for name in PeakList._fields:
        parts = [getattr(p, name) for p in batches]
        fields[name] = np.concatenate(
            parts if parts[0].ndim == 1 else [widen(x, -1 if name == "panel" else 0) for x in parts]
        )
    return PeakList(**fields)


def _assert_peaks_equal(got: PeakList, want: PeakList):
    for name in PeakList._fields:
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=2e-3, err_msg=name)


# --- CXI ------------------------------------------------------------------------------------------------------


def test_cxi_round_trip_and_crystfel_layout(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "peaks.cxi"
    config = Peakfinder8Config(max_num_peaks=16)
    a, b = _random_peaks(rng, 5, 16), _random_peaks(rng, 3, 7)  # the second batch narrower: zero-padded
    with dio.CxiPeakWriter(path, 16, provenance=PROV, peakfinder_config=config) as w:
        assert w.append(a, [100] * 5, np.arange(5), pumped=[1, 0, 1, 0, 1]) == 5
        assert w.append(b, [101] * 3, np.arange(3), pumped=None, frame_index=[40, 41, 42]) == 8
        assert w.n_frames == 8
    got = dio.read_cxi_peaks(path)
    _assert_peaks_equal(got.peaks, _concat_padded([a, b], 16))
    np.testing.assert_array_equal(got.train_id, [100] * 5 + [101] * 3)
    np.testing.assert_array_equal(got.pulse_id, [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(got.pumped, [1, 0, 1, 0, 1, -1, -1, -1])
    np.testing.assert_array_equal(got.frame_index, [0, 1, 2, 3, 4, 40, 41, 42])
    assert got.provenance == PROV and got.peakfinder_config["max_num_peaks"] == 16

    # What CrystFEL's image_hdf5_read_peaks_cxi reads: 1-D nPeaks, 2-D float rows ≥ nPeaks wide, stacked y.
    with h5py.File(path, "r") as f:
        g = f[dio.CXI_PEAK_PATH]
        assert g["nPeaks"].shape == (8,) and g["nPeaks"].dtype == np.int32
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakNPixels", "peakMaximumValue", "peakSNR"):
            assert g[name].shape == (8, 16) and g[name].dtype == np.float32, name
        assert g["pumped"].dtype == np.int8 and g["trainId"].dtype == np.uint64
        np.testing.assert_allclose(g["peakYPosRaw"][0, :16], a.ss[0] + 512 * a.panel[0], atol=1e-3)
        assert json.loads(f.attrs["peakfinder_config"])["minimum_snr"] == config.minimum_snr
        assert int(f["cxi_version"][()]) == 150


def test_cxi_resume_after_interrupted_append(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "peaks.cxi"
    a = _random_peaks(rng, 4, 8)
    with dio.CxiPeakWriter(path, 8, provenance=PROV) as w:
        w.append(a, np.arange(4), np.zeros(4), pumped=np.ones(4, bool))
    # A crash in the middle of the next append: some datasets already grown (unequal lengths), commit mark not.
    with h5py.File(path, "r+") as f:
        g = f[dio.CXI_PEAK_PATH]
        for name in ("nPeaks", "peakXPosRaw", "trainId"):
            g[name].resize(7, axis=0)
        g["peakYPosRaw"].resize(6, axis=0)
    assert dio.read_cxi_peaks(path).train_id.shape == (4,)  # readers see the consistent frames only
    b = _random_peaks(rng, 2, 8)
    with dio.CxiPeakWriter(path, 8, resume=True) as w:
        assert w.n_frames == 4
    with h5py.File(path, "r") as f:
        assert {d.shape[0] for d in f[dio.CXI_PEAK_PATH].values()} == {4}  # truncated back to consistent
    with dio.CxiPeakWriter(path, 8, resume=True) as w:
        w.append(b, [7, 8], [0, 0])
    got = dio.read_cxi_peaks(path)
    _assert_peaks_equal(got.peaks, _concat_padded([a, b], 8))
    np.testing.assert_array_equal(got.train_id, [0, 1, 2, 3, 7, 8])
    np.testing.assert_array_equal(got.pumped, [1, 1, 1, 1, -1, -1])
    assert got.provenance == PROV  # kept from the first session

    # A commit mark lost (older file versions, manual edits): the shortest dataset decides.
    with h5py.File(path, "r+") as f:
        del f[dio.CXI_PEAK_PATH].attrs["n_frames"]
        f[dio.CXI_PEAK_PATH]["peakSNR"].resize(5, axis=0)
    with dio.CxiPeakWriter(path, 8, resume=True) as w:
        assert w.n_frames == 5


def test_cxi_survives_a_killed_writer(tmp_path):
    """A process killed right after an append (no close) leaves a readable file with the appended frames."""
    path = tmp_path / "peaks.cxi"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from collections import namedtuple
        from data_pipeline.io import CxiPeakWriter
        P = namedtuple("P", "n_peaks n_components fs ss panel total_intensity n_pixels max_intensity local_sigma snr")
        z = np.ones((3, 4), np.float32)
        p = P(np.full(3, 4), np.full(3, 4), z, z, np.zeros((3, 4), int), z, z, z, z, z)
        w = CxiPeakWriter({str(path)!r}, 4, provenance={{}})
        w.append(p, [1, 2, 3], [0, 0, 0])
        w.append(p, [4, 5, 6], [0, 0, 0])
        os._exit(1)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    np.testing.assert_array_equal(dio.read_cxi_peaks(path).train_id, [1, 2, 3, 4, 5, 6])
    with dio.CxiPeakWriter(path, 4, resume=True) as w:
        assert w.n_frames == 6


def test_cxi_bad_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        dio.CxiPeakWriter(tmp_path / "missing" / "p.cxi", 8, provenance=PROV)
    with pytest.raises(InputError, match="does not exist"):
        dio.read_cxi_peaks(tmp_path / "none.cxi")
    text = tmp_path / "text.cxi"
    text.write_text("not hdf5\n")
    with pytest.raises(InputError, match="cannot open"):
        dio.read_cxi_peaks(text)
    foreign = tmp_path / "cheetah.cxi"
    with h5py.File(foreign, "w") as f:
        f["entry_1/result_1/nPeaks"] = np.zeros(3, np.int32)
    for call in (lambda: dio.read_cxi_peaks(foreign), lambda: dio.CxiPeakWriter(foreign, 8, resume=True)):
        with pytest.raises(InputError, match="not a jaxpolaron CXI"):
            call()
    ours = tmp_path / "ours.cxi"
    dio.CxiPeakWriter(ours, 8, provenance=PROV).close()
    with pytest.raises(InputError, match="holds 8 peaks per frame"):
        dio.CxiPeakWriter(ours, 16, resume=True)
    with h5py.File(ours, "r+") as f:
        del f[dio.CXI_PEAK_PATH]["peakSNR"]
    with pytest.raises(InputError, match=r"lacks dataset.*peakSNR") as err:
        dio.read_cxi_peaks(ours)
    assert "\n" not in str(err.value)  # one-line messages
    # Bytes lost at the end (full disk): HDF5 refuses the file; we say so in one line.
    dio.CxiPeakWriter(ours, 8, provenance=PROV).close()
    with open(ours, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    for call in (lambda: dio.read_cxi_peaks(ours), lambda: dio.CxiPeakWriter(ours, 8, resume=True)):
        with pytest.raises(InputError, match="is truncated") as err:
            call()
        assert "\n" not in str(err.value)


# --- streams --------------------------------------------------------------------------------------------------


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _crystal(rng, n_refl: int, with_refl: bool = True) -> dio.StreamCrystal:
    b = np.linalg.inv(np.diag([5.87, 5.91, 5.84]) + 0.02 * rng.normal(size=(3, 3))).T  # rows a*, b*, c*
    astar = b @ _rotation(rng).T
    refl = None
    if with_refl:
        refl = dio.StreamReflections(
            hkl=rng.integers(-6, 7, (n_refl, 3)),
            intensity=rng.uniform(-50, 5e4, n_refl),
            sigma=rng.uniform(1, 100, n_refl),
            peak=rng.uniform(0, 1e3, n_refl),
            background=rng.uniform(0, 10, n_refl),
            fs=np.round(rng.uniform(0, 127, n_refl), 1),
            ss=np.round(rng.uniform(0, 511, n_refl), 1),
            module=rng.integers(0, 16, n_refl),
        )
    return dio.StreamCrystal(
        astar,
        lattice_type="orthorhombic",
        profile_radius=0.0012,
        residuals=(0.3, 0.12),
        reflections=refl,
        num_saturated=1,
    )


def _chunks(rng, n: int, with_refl: bool = True) -> list[dio.ChunkRecord]:
    out = []
    for i in range(n):
        k = int(rng.integers(0, 40))
        peaks = dio.StreamPeaks(
            np.round(rng.uniform(0, 127, k), 2),
            np.round(rng.uniform(0, 511, k), 2),
            rng.integers(0, 16, k),
            np.round(rng.uniform(0, 1e4, k), 2),
        )
        crystals = tuple(_crystal(rng, int(rng.integers(0, 30)), with_refl) for _ in range(i % 3))
        headers = {"trainId": 1000 + i // 4, "pulseId": 8 * (i % 4), "pumped": i % 2, "frame": i}
        out.append(dio.ChunkRecord("run7.cxi", dio.event_id(i), i + 1, 13600.0, peaks, crystals, headers=headers))
    return out


def _assert_chunks_equal(got: list[dio.ChunkRecord], want: list[dio.ChunkRecord], indexer: str = "spind"):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.filename, g.event, g.serial, g.photon_energy_ev) == (w.filename, w.event, w.serial, 13600.0)
        assert dict(g.headers) == dict(w.headers)
        assert g.indexed_by == (indexer if w.crystals else "none")
        assert g.hit == (len(w.peaks.fs) > 0)
        for name in ("fs", "ss", "intensity"):
            np.testing.assert_allclose(getattr(g.peaks, name), getattr(w.peaks, name), atol=5e-3, err_msg=name)
        np.testing.assert_array_equal(g.peaks.module, w.peaks.module)
        assert len(g.crystals) == len(w.crystals)
        for gc, wc in zip(g.crystals, w.crystals, strict=True):
            np.testing.assert_allclose(gc.astar, wc.astar, rtol=0, atol=1e-6)
            np.testing.assert_allclose(gc.cell[:3], wc.cell[:3], atol=1e-4)
            np.testing.assert_allclose(gc.cell[3:], wc.cell[3:], atol=1e-5)
            assert (gc.lattice_type, gc.centering, gc.unique_axis) == (wc.lattice_type, wc.centering, wc.unique_axis)
            assert gc.profile_radius == pytest.approx(wc.profile_radius, abs=1e-6)
            assert gc.residuals == pytest.approx(wc.residuals, abs=1e-6)
            assert gc.num_saturated == wc.num_saturated
            if wc.reflections is None:
                assert gc.reflections is None
                continue
            gr, wr = gc.reflections, wc.reflections
            np.testing.assert_array_equal(gr.hkl, wr.hkl)
            np.testing.assert_array_equal(gr.module, wr.module)
            for name in ("intensity", "sigma", "peak", "background"):
                np.testing.assert_allclose(getattr(gr, name), getattr(wr, name), atol=5e-3, err_msg=name)
            for name in ("fs", "ss"):
                np.testing.assert_allclose(getattr(gr, name), getattr(wr, name), atol=1e-6, err_msg=name)
            if len(wr.hkl):
                limit = np.linalg.norm(wr.hkl @ wc.astar, axis=1).max()
                assert gc.resolution_limit == pytest.approx(limit, abs=1e-3)


def test_stream_round_trip(tmp_path, geom_text):
    rng = np.random.default_rng(2)
    chunks = _chunks(rng, 9)
    chunks.append(dio.ChunkRecord("run7.cxi", dio.event_id(9), 10, 13600.0))  # no peaks, no crystal
    path = tmp_path / "out.stream"
    cell = dio.TargetCell(5.87, 5.91, 5.84, lattice_type="orthorhombic")
    with dio.StreamWriter(path, geom_text, target_cell=cell, command_line="jaxpolaron reduce run7") as w:
        for c in chunks:
            w.write_chunk(c)
    back = dio.read_stream(path)
    assert back.audit[0] == "CrystFEL stream format 2.3" and back.audit[1].startswith("Generated by jaxpolaron")
    assert back.geometry_text == geom_text
    assert back.target_cell == cell
    _assert_chunks_equal(back.chunks, chunks)


def test_stream_resume_drops_partial_chunk(tmp_path, geom_text):
    rng = np.random.default_rng(3)
    chunks = _chunks(rng, 5)
    path = tmp_path / "out.stream"
    with dio.StreamWriter(path, geom_text) as w:
        for c in chunks[:3]:
            w.write_chunk(c)
        partial = w.format_chunk(chunks[3])
    with open(path, "a") as f:  # a crash half-way through the 4th chunk
        f.write(partial[: len(partial) // 2])
    assert len(dio.read_stream(path).chunks) == 3
    with dio.StreamWriter(path, geom_text, resume=True) as w:
        assert w.n_chunks == 3
        for c in chunks[3:]:
            w.write_chunk(c)
    text = path.read_text()
    assert text.count("----- Begin chunk -----") == text.count("----- End chunk -----") == 5
    _assert_chunks_equal(dio.read_stream(path).chunks, chunks)
    # A stream holding its header only, and a missing one, resume with 0 chunks.
    with dio.StreamWriter(tmp_path / "empty.stream", geom_text, target_cell=dio.TargetCell(5.87, 5.87, 5.87)):
        pass
    with dio.StreamWriter(tmp_path / "empty.stream", geom_text, resume=True) as w:
        assert w.n_chunks == 0
        w.write_chunk(chunks[0])
    assert dio.read_stream(tmp_path / "empty.stream").target_cell.a == 5.87
    with dio.StreamWriter(tmp_path / "new.stream", geom_text, resume=True) as w:
        assert w.n_chunks == 0


def _cfel_chunks(path) -> list[dict]:
    """Chunks parsed by cfel_fmt (key/values, cell, astar) with the tables read by pandas as cfelpyutils does."""
    out = []
    with open(path) as f:
        for buf in iter_chunks(f):
            text = buf.getvalue()
            d = parse_chunk(io.StringIO(text), peak_tbl=False, refl_tbl=False)
            peaks = text.split("Peaks from peak search\n")[1].split("End of peak list\n")[0]
            d["peaks"] = pandas.read_csv(io.StringIO(peaks), sep=r"\s+")
            blocks = text.split("Reflections measured after indexing\n")[1:]
            for cr, block in zip(d["crystals"], blocks, strict=True):
                cr["reflections"] = pandas.read_csv(io.StringIO(block.split("End of reflections\n")[0]), sep=r"\s+")
            out.append(d)
    return out


def test_stream_against_cfel_fmt(tmp_path, geom_text):
    rng = np.random.default_rng(4)
    chunks = _chunks(rng, 6)
    path = tmp_path / "out.stream"
    with dio.StreamWriter(path, geom_text) as w:
        for c in chunks:
            w.write_chunk(c)
    parsed = _cfel_chunks(path)
    panels = load_crystfel_geometry(io.StringIO(geom_text)).detector["panels"]
    assert len(parsed) == len(chunks)
    for d, c in zip(parsed, chunks, strict=True):
        assert d["Image filename"] == c.filename and d["Event"] == c.event
        assert int(d["Image serial number"]) == c.serial and float(d["photon_energy_eV"]) == 13600.0
        assert int(d["header/int/trainId"]) == c.headers["trainId"]
        assert int(d["num_peaks"]) == len(c.peaks.fs) == len(d["peaks"])
        assert list(d["peaks"].columns) == ["fs/px", "ss/px", "(1/d)/nm^-1", "Intensity", "Panel"]
        assert set(d["peaks"]["Panel"]) <= set(panels)
        assert len(d["crystals"]) == len(c.crystals)
        for dc, cc in zip(d["crystals"], c.crystals, strict=True):
            astar = np.stack([dc["astar"], dc["bstar"], dc["cstar"]])
            np.testing.assert_allclose(astar, 10 * cc.astar, atol=1e-6)  # nm⁻¹, same lab frame
            np.testing.assert_allclose(dc["Cell parameters/lengths"], np.array(cc.cell[:3]) / 10, atol=1e-5)
            np.testing.assert_allclose(dc["Cell parameters/angles"], cc.cell[3:], atol=1e-5)
            assert dc["lattice_type"] == "orthorhombic" and dc["centering"] == "P"
            assert int(dc["num_reflections"]) == len(dc["reflections"]) == len(cc.reflections.hkl)
            cols = ["h", "k", "l", "I", "sigma(I)", "peak", "background", "fs/px", "ss/px", "panel"]
            assert list(dc["reflections"].columns) == cols
            np.testing.assert_array_equal(dc["reflections"][["h", "k", "l"]].to_numpy(), cc.reflections.hkl)


def _crystfel_position(panel: dict, file_fs, file_ss) -> np.ndarray:
    """CrystFEL's position (m) of file coordinates on a panel (corner convention): corner + fs·fs_vec + ss·ss_vec."""
    fs, ss = file_fs - panel["orig_min_fs"], file_ss - panel["orig_min_ss"]
    res = panel["res"]
    return np.array(
        [
            (panel["cnx"] + fs * panel["fsx"] + ss * panel["ssx"]) / res,
            (panel["cny"] + fs * panel["fsy"] + ss * panel["ssy"]) / res,
            panel["clen"] + panel["coffset"] + (fs * panel["fsz"] + ss * panel["ssz"]) / res,
        ]
    )


def test_cxi_peaks_land_on_our_pixels(tmp_path, geometry, positions):
    """CXI peak at pixel (m, ss, fs) -> CrystFEL's slab lookup (+0.5) on our stacked .geom -> our lab position."""
    rng = np.random.default_rng(5)
    geom = dio.write_crystfel_geom(
        geometry, tmp_path / "s.geom", clen_m=DEFAULT_CLEN_M, energy_kev=ENERGY_KEV, layout="stacked"
    )
    panels = load_crystfel_geometry(io.StringIO(geom.read_text())).detector["panels"]
    pk = _random_peaks(rng, 4, 32, integer=True)
    with dio.CxiPeakWriter(tmp_path / "p.cxi", 32, provenance=PROV) as w:
        w.append(pk, np.arange(4), np.arange(4))
    with h5py.File(tmp_path / "p.cxi", "r") as f:
        g = f[dio.CXI_PEAK_PATH]
        n, xs, ys = g["nPeaks"][:], g["peakXPosRaw"][:], g["peakYPosRaw"][:]
    for i in range(4):
        for j in range(n[i]):
            x, y = xs[i, j] + 0.5, ys[i, j] + 0.5  # CrystFEL's default half-pixel shift
            hits = [
                p
                for p in panels.values()
                if p["orig_min_fs"] <= x < p["orig_max_fs"] + 1 and p["orig_min_ss"] <= y < p["orig_max_ss"] + 1
            ]
            assert len(hits) == 1  # slabby: unambiguous
            m, ss, fs = pk.panel[i, j], int(pk.ss[i, j]), int(pk.fs[i, j])
            np.testing.assert_allclose(_crystfel_position(hits[0], x, y), positions[m, ss, fs], atol=1e-9)
    # Why not the "modules" layout: every module's panels share the same ss range, so CrystFEL's slab lookup
    # (data_template_slabby_file_to_panel_coords) finds 16 panels and rejects the peak as ambiguous.
    modules = dio.write_crystfel_geom(geometry, tmp_path / "m.geom", clen_m=DEFAULT_CLEN_M, energy_kev=ENERGY_KEV)
    m_panels = load_crystfel_geometry(io.StringIO(modules.read_text())).detector["panels"].values()
    assert sum(p["orig_min_ss"] <= 100.5 <= p["orig_max_ss"] + 1 and p["orig_min_fs"] <= 10.5 for p in m_panels) == 16
    # extra-geom reads the stacked geometry back to the same pixel positions
    back = dio.read_crystfel_geom(geom)
    np.testing.assert_allclose(pixel_positions(back, DEFAULT_CLEN_M), positions, atol=1e-12)


def test_stream_peaks_land_on_our_pixels(tmp_path, geom_text, positions):
    """Stream peak (file fs/ss + panel name, as CrystFEL reads it) -> our pixel's lab position and 1/d."""
    rng = np.random.default_rng(6)
    k = 200
    m, ss, fs = rng.integers(0, 16, k), rng.integers(0, 512, k), rng.integers(0, 128, k)
    peaks = dio.StreamPeaks(fs.astype(float), ss.astype(float), m, np.ones(k))
    path = tmp_path / "p.stream"
    with dio.StreamWriter(path, geom_text) as w:
        w.write_chunk(dio.ChunkRecord("x.cxi", "//0", 1, 1000 * ENERGY_KEV, peaks))
    table = _cfel_chunks(path)[0]["peaks"]
    panels = load_crystfel_geometry(io.StringIO(geom_text)).detector["panels"]
    rows = zip(table["fs/px"], table["ss/px"], table["Panel"], strict=True)
    got = np.stack([_crystfel_position(panels[p], x, y) for x, y, p in rows])
    np.testing.assert_allclose(got, positions[m, ss, fs], atol=1e-9)
    inv_d_nm = 10 * np.linalg.norm(pixel_q(positions[m, ss, fs], ENERGY_KEV), axis=-1)
    np.testing.assert_allclose(table["(1/d)/nm^-1"], inv_d_nm, atol=5e-3)


def test_stream_bad_input(tmp_path, geom_text):
    with pytest.raises(InputError, match="does not exist"):
        dio.StreamWriter(tmp_path / "missing" / "x.stream", geom_text)
    with pytest.raises(InputError, match=r"defines no panels|cannot parse"):
        dio.StreamWriter(tmp_path / "x.stream", "clen = 0.1\n")
    other = tmp_path / "other.stream"
    other.write_text("hello\n")
    with pytest.raises(InputError, match="not a CrystFEL stream"):
        dio.StreamWriter(other, geom_text, resume=True)
    with pytest.raises(InputError, match="not a CrystFEL stream"):
        dio.read_stream(other)
    with pytest.raises(InputError, match="does not exist"):
        dio.read_stream(tmp_path / "none.stream")
    path = tmp_path / "a.stream"
    dio.StreamWriter(path, geom_text).close()
    with pytest.raises(InputError, match="different geometry"):
        dio.StreamWriter(path, geom_text.replace("clen = 0.1224", "clen = 0.2"), resume=True)
    with dio.StreamWriter(path, geom_text) as w, pytest.raises(ValueError, match="lies on no panel"):
        w.write_chunk(
            dio.ChunkRecord(
                "x", "//0", 0, 9000.0, dio.StreamPeaks(np.zeros(1), np.zeros(1), np.array([16]), np.ones(1))
            )
        )
    with pytest.raises(ValueError, match="lattice_type"):
        dio.StreamCrystal(np.eye(3), lattice_type="cubicish")
    with pytest.raises(ValueError, match="non-singular"):
        dio.StreamCrystal(np.zeros((3, 3)))


def test_event_list(tmp_path):
    path = dio.write_crystfel_event_list(tmp_path / "files.lst", "/data/run7.cxi", 3)
    assert path.read_text() == "/data/run7.cxi //0\n/data/run7.cxi //1\n/data/run7.cxi //2\n"


def test_cell_parameters_of_a_triclinic_lattice():
    a, b, c, al, be, ga = 5.0, 6.0, 7.0, 80.0, 100.0, 110.0
    ca, cb, cg = np.cos(np.radians([al, be, ga]))
    sg = np.sin(np.radians(ga))
    direct = np.array(
        [
            [a, 0, 0],
            [b * cg, b * sg, 0],
            [c * cb, c * (ca - cb * cg) / sg, c * np.sqrt(1 - cb**2 - ((ca - cb * cg) / sg) ** 2)],
        ]
    )
    astar = np.linalg.inv(direct).T  # rows a*, b*, c*: a·a* = 1, a·b* = 0
    np.testing.assert_allclose(
        dio.cell_parameters(astar @ _rotation(np.random.default_rng(7)).T), (a, b, c, al, be, ga)
    )


def test_crystal_table_from_an_older_version(tmp_path):
    """A table written before a column existed reads with a fill value, and refuses a mixed-version resume."""
    from data_pipeline.crystal_table import COLUMNS, CrystalTableWriter, read_crystal_table
    from jaxpolaron.errors import InputError

    rows = {name: np.zeros((2, *shape), dtype) for name, (shape, dtype) in COLUMNS.items()}
    with CrystalTableWriter(tmp_path / "c.h5") as w:
        w.append(rows)
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        del f["crystals/orientation_sigma_deg"]
    table = read_crystal_table(tmp_path / "c.h5")
    assert len(table["frame"]) == 2 and np.isnan(table["orientation_sigma_deg"]).all()
    with pytest.raises(InputError, match="older version"):
        CrystalTableWriter(tmp_path / "c.h5", resume=True)
