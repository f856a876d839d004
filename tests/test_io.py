"""Volume files: NeXus layout, exact round trip, one-line InputErrors for bad files, atomic writes."""

import json
import os

import h5py
import numpy as np
import pytest

from jaxpolaron import io
from jaxpolaron.errors import InputError


def _axes(shape, centre=(0.0, 0.0, 0.0), voxel=0.0025):
    return tuple(c + voxel * (np.arange(n) - n // 2) for c, n in zip(centre, shape, strict=True))


def _volumes():
    rng = np.random.default_rng(0)
    wshape = (9, 7, 5)
    window = io.Volume(
        name="hkl_200",
        axes=_axes(wshape, centre=(2 / 5.87, 0.0, 0.0)),
        dark=rng.random(wshape, dtype=np.float32),
        pump=rng.random(wshape, dtype=np.float32),
        weight={"dark": rng.random(wshape), "pump": rng.random(wshape)},
        hkl=(2, 0, 0),
        units="counts",
    )
    gshape = (50, 48, 52)  # > 1e5 voxels: chunked and compressed
    grid = io.Volume(name="grid", axes=_axes(gshape), dark=rng.random(gshape), pump=rng.random(gshape))
    diff_only = io.Volume(name="hkl_1-10", axes=_axes((3, 3, 3)), difference=-np.ones((3, 3, 3)), hkl=(1, -1, 0))
    return [window, grid, diff_only]


CONFIG = {"size_nm": 5.0, "hkls": [[2, 0, 0], [1, -1, 0]], "engine": "direct"}
STATS = {"hkl_200": {"shift": -1.5e-4, "d_integrated": 0.012}}


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "out.h5"
    io.write_volume_file(path, _volumes(), CONFIG, provenance={"who": "test"}, statistics=STATS)
    return path


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def test_round_trip(tmp_path):
    volumes = _volumes()
    prov = io.provenance({"cif": "CsPbBr3.cif (sha256 0)"})
    path = tmp_path / "out.h5"
    assert io.write_volume_file(path, volumes, CONFIG, provenance=prov, statistics=STATS) == path.resolve()
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]
    vf = io.read_volume_file(path)
    assert list(vf.volumes) == ["hkl_200", "grid", "hkl_1-10"]  # written order
    assert vf.config == CONFIG and vf.statistics == STATS and vf.provenance == json.loads(json.dumps(prov))
    for v in volumes:
        r = vf.volumes[v.name]
        assert r.hkl == v.hkl and r.units == v.units and r.kind == v.kind
        for a, b in zip(r.axes, v.axes, strict=True):
            np.testing.assert_array_equal(a, b)
        for g in ("dark", "pump"):
            if getattr(v, g) is not None:
                assert getattr(r, g).dtype == getattr(v, g).dtype
                np.testing.assert_array_equal(getattr(r, g), getattr(v, g))
        expected = v.difference if v.difference is not None else v.pump - v.dark
        np.testing.assert_array_equal(r.difference, expected)  # exactly pump - dark
    assert vf.volumes["hkl_1-10"].groups == ("difference",)
    assert vf.volumes["grid"].weight is None
    for g in ("dark", "pump"):
        np.testing.assert_array_equal(vf.volumes["hkl_200"].weight[g], volumes[0].weight[g])


def test_nexus_attributes(good_file):
    with h5py.File(good_file, "r") as f:
        assert _text(f.attrs["NX_class"]) == "NXroot" and _text(f.attrs["default"]) == "entry"
        assert _text(f.attrs["file_format"]) == "jaxpolaron-volume"
        assert _text(f.attrs["file_format_version"]) == "1"
        assert _text(f.attrs["creator"]).startswith("jaxpolaron ")
        entry = f["entry"]
        assert _text(entry.attrs["NX_class"]) == "NXentry" and _text(entry.attrs["default"]) == "hkl_200"
        window = entry["hkl_200"]
        assert _text(window.attrs["NX_class"]) == "NXcollection" and _text(window.attrs["kind"]) == "window"
        assert list(window.attrs["hkl"]) == [2, 0, 0] and _text(window.attrs["default"]) == "difference"
        assert _text(entry["grid"].attrs["kind"]) == "grid" and "hkl" not in entry["grid"].attrs
        assert _text(entry["hkl_1-10"].attrs["default"]) == "difference"
        for group in ("dark", "pump", "difference"):
            d = window[group]
            assert _text(d.attrs["NX_class"]) == "NXdata" and _text(d.attrs["signal"]) == "intensity"
            assert [_text(a) for a in d.attrs["axes"]] == ["qx", "qy", "qz"]
            assert _text(d["intensity"].attrs["units"]) == "counts"
            for a in ("qx", "qy", "qz"):
                assert _text(d[a].attrs["units"]) == "1/angstrom"
        assert "weight" in window["dark"] and "weight" not in window["difference"]
        big = entry["grid"]["dark"]["intensity"]
        assert big.compression == "gzip" and big.chunks is not None
        assert window["dark"]["intensity"].compression is None  # small arrays stay contiguous


def test_provenance():
    p = io.provenance({"cif": "x.cif (sha256 abc)"})
    for pkg in ("python", "jaxpolaron", "jax", "jaxlib", "jax_finufft", "numpy", "h5py", "xraydb", "gemmi"):
        assert p["versions"][pkg]
    assert p["versions"]["numpy"] == np.__version__ and p["versions"]["h5py"] == h5py.__version__
    assert p["timestamp"].endswith("+00:00") and p["timestamp"][:2] == "20"
    assert p["jax_backend"] and p["jax_devices"] and p["inputs"] == {"cif": "x.cif (sha256 abc)"}
    assert p["git_commit"] is None or len(p["git_commit"]) == 40
    json.dumps(p)  # serialisable as is


def test_describe_input(tmp_path):
    f = tmp_path / "a.cif"
    f.write_bytes(b"")
    assert io.describe_input(f).endswith("(sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855)")


def _read_error(path) -> str:
    with pytest.raises(InputError) as info:
        io.read_volume_file(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_read_truncated(good_file):
    size = good_file.stat().st_size
    with open(good_file, "r+b") as f:
        f.truncate(size // 2)
    assert "truncated or corrupt" in _read_error(good_file)


def test_read_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not an HDF5 file\n")
    assert "not an HDF5 file" in _read_error(path)


def test_read_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    assert "not a jaxpolaron volume file" in _read_error(path)


def test_read_missing_file(tmp_path):
    assert "does not exist" in _read_error(tmp_path / "missing.h5")


def test_read_directory(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    assert "directory" in _read_error(tmp_path / "dir.h5")


def test_read_shape_mismatch(good_file):
    with h5py.File(good_file, "r+") as f:
        d = f["entry/hkl_200/pump"]
        del d["intensity"]
        d["intensity"] = np.zeros((9, 7, 4))
    message = _read_error(good_file)
    assert "hkl_200" in message and "(9, 7, 4)" in message


def test_read_volume_without_data(good_file):
    with h5py.File(good_file, "r+") as f:
        del f["entry/hkl_1-10/difference"]
    assert "no dark, pump or difference" in _read_error(good_file)


def test_read_unsupported_version(good_file):
    with h5py.File(good_file, "r+") as f:
        f.attrs["file_format_version"] = "99"
    assert "version 99" in _read_error(good_file)


def test_read_bad_json(good_file):
    with h5py.File(good_file, "r+") as f:
        del f["entry/config"]
        f["entry"].create_dataset("config", data="{not json", dtype=h5py.string_dtype())
    assert "/entry/config is not valid JSON" in _read_error(good_file)


def test_require_group(good_file):
    vf = io.read_volume_file(good_file)
    assert [v.name for v in io.require_group(vf, "dark")] == ["hkl_200", "grid"]
    assert len(io.require_group(vf, "difference")) == 3
    only_diff = io.VolumeFile({"x": vf.volumes["hkl_1-10"]}, {}, {}, None)
    with pytest.raises(InputError, match="no volume in the file has pump data"):
        io.require_group(only_diff, "pump")


def test_check_writable_good_path(tmp_path):
    path = tmp_path / "out.h5"
    assert io.check_writable(path) == path.resolve()
    assert list(tmp_path.iterdir()) == []  # probed without leaving anything


def test_check_writable_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.check_writable(tmp_path / "no_such_dir" / "out.h5")
    with pytest.raises(InputError, match="is a directory"):
        io.check_writable(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is not a directory"):
        io.check_writable(tmp_path / "file" / "out.h5")
    # /proc refuses new files even for root (who ignores permission bits on a chmod 0o500 directory)
    with pytest.raises(InputError, match="cannot create files in /proc"):
        io.check_writable("/proc/jaxpolaron_test.h5")
    assert not os.path.exists("/proc/jaxpolaron_test.h5")


def test_write_is_atomic(tmp_path, good_file, monkeypatch):
    before = good_file.read_bytes()
    real, calls = io._write_nxdata, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("crash in the middle of writing")
        real(*args, **kwargs)

    monkeypatch.setattr(io, "_write_nxdata", failing)
    with pytest.raises(RuntimeError, match="crash"):
        io.write_volume_file(tmp_path / "new.h5", _volumes(), CONFIG, provenance={})
    calls.clear()
    with pytest.raises(RuntimeError, match="crash"):
        io.write_volume_file(good_file, _volumes(), {"other": 1}, provenance={})
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]  # no new.h5, no temporary files
    assert good_file.read_bytes() == before  # the old file survives a failed overwrite


def test_write_os_error_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot write") as info:
        io.write_volume_file(tmp_path / "missing_dir" / "out.h5", _volumes(), CONFIG, provenance={})
    assert "\n" not in str(info.value)


def test_volume_validation():
    axes = _axes((4, 5, 6))
    with pytest.raises(ValueError, match="shape"):
        io.Volume("grid", axes, dark=np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match="no dark, pump or difference"):
        io.Volume("grid", axes)
    with pytest.raises(ValueError, match="finite"):
        io.Volume("grid", (axes[0], axes[1], np.full(6, np.nan)), dark=np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="1-D"):
        io.Volume("grid", (axes[0], axes[1], np.zeros((6, 1))), dark=np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="weight"):
        io.Volume("grid", axes, dark=np.zeros((4, 5, 6)), weight={"pump": np.ones((4, 5, 6))})
    with pytest.raises(ValueError, match="reserved"):
        io.Volume("config", axes, dark=np.zeros((4, 5, 6)))
    v = io.Volume("grid", axes, dark=np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="unique"):
        io.write_volume_file("unused.h5", [v, v], CONFIG, provenance={})
