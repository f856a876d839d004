"""`jaxpolaron show` and the generic plotting helpers: figures are written, the requested slice is the one
drawn, zero-weight voxels are masked, and user mistakes give one-line errors (exit 2)."""

import numpy as np
import pytest

from data_pipeline import show_cli
from jaxpolaron import io, plotting
from jaxpolaron.cli import main

N, Q_MAX = 33, 0.4  # voxel 0.025 1/Å, samples at multiples of 0.025


@pytest.fixture(scope="module")
def g200(structure):
    return structure.q_of_hkl([2, 0, 0])


def _axes():
    q = np.linspace(-Q_MAX, Q_MAX, N)
    return (q, q.copy(), q.copy())


def _gaussian(axes, centre, sigma=0.03):
    qx, qy, qz = np.meshgrid(*axes, indexing="ij")
    r2 = (qx - centre[0]) ** 2 + (qy - centre[1]) ** 2 + (qz - centre[2]) ** 2
    return np.exp(-0.5 * r2 / sigma**2)


@pytest.fixture(scope="module")
def merged_file(tmp_path_factory, g200):
    """A merged-style file: grid with dark/pump (peaks at ±G200, pumped one shifted inward), weights with an
    empty octant, and reduce-like statistics including powder curves."""
    axes = _axes()
    dark = 1e3 * (_gaussian(axes, g200) + _gaussian(axes, -g200)) + 1e-2
    shift = 0.01 * g200 / np.linalg.norm(g200)
    pump = 1e3 * (_gaussian(axes, g200 - shift) + _gaussian(axes, -g200 + shift)) + 1e-2
    weight = np.ones(dark.shape)
    weight[: N // 2 + 1, : N // 2 + 1, : N // 2 + 1] = 0.0  # no data in one octant (with q = 0)
    volume = io.Volume("grid", axes, dark=dark * weight, pump=pump * weight, weight={"dark": weight, "pump": weight},
                       units="counts")  # fmt: skip
    q = np.linspace(0.05, 0.5, 20)
    stats = {
        "table_s1": {"dark": {"frames": 100, "hits": 40}, "pumped": {"frames": 100, "hits": 38}},
        "merge": {
            "dark": {"crystals_merged": 30, "scale_median": 1.02},
            "pumped": {"crystals_merged": 29, "scale_median": 0.98},
        },
        "powder": {
            "q": q.tolist(),
            "virtual_dark": np.exp(-q).tolist(),
            "virtual_pumped": np.exp(-q).tolist(),
            "azimuthal_dark": [None, *np.exp(-2 * q[1:]).tolist()],
            "azimuthal_pumped": [None, *np.exp(-2 * q[1:]).tolist()],
        },
    }
    path = tmp_path_factory.mktemp("show") / "merged.h5"
    io.write_volume_file(path, [volume], {"reduce": {"grid_n": N}}, provenance={"test": True}, statistics=stats)
    return path


@pytest.fixture(scope="module")
def window_file(tmp_path_factory, g200):
    """A simulate-style file: a 200 window (no weights) and a second, empty-difference window."""
    half = 16 * 0.0025
    qx, qy, qz = (np.linspace(c - half, c + half, N) for c in g200)
    axes = (qx, qy, qz)
    dark = _gaussian(axes, g200, 0.01)
    pump = _gaussian(axes, g200 * 0.995, 0.01)
    other = io.Volume("hkl_020", _axes(), dark=np.ones((N, N, N)), hkl=(0, 2, 0))
    path = tmp_path_factory.mktemp("show") / "windows.h5"
    volumes = [io.Volume("hkl_200", axes, dark=dark, pump=pump, hkl=(2, 0, 0)), other]
    io.write_volume_file(path, volumes, {"simulate": {"cif": None}}, provenance={}, statistics={"peaks": {}})
    return path


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--slice", "qz=0"],
        ["--slice", "l=0"],
        ["--hkl", "2,0,0"],
        ["--group", "difference"],
        ["--group", "all", "--linear", "--vmax", "dark=500,difference=20"],
        ["--hkl=-2,0,0", "--log", "--zoom", "0.1"],
    ],
)
def test_show_writes_png(merged_file, tmp_path, capsys, extra):
    png = tmp_path / "out.png"
    assert main(["show", str(merged_file), *extra, "--png", str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "grid: full grid, shape 33×33×33, units counts" in out
    assert "merge weights: dark, pump" in out and "13.7% of voxels without data" in out
    assert "crystals_merged" in out and "powder:" in out  # statistics tables


def test_show_window_file_and_powder(window_file, merged_file, tmp_path, capsys):
    png = tmp_path / "w.png"
    assert main(["show", str(window_file), "--hkl", "200", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert "window around hkl 2,0,0" in out and "wrote" in out and "(hkl_200: dark, difference)" in out
    assert "bundled" in out  # lattice from the bundled CIF (the config names none)
    powder = tmp_path / "p.png"
    assert main(["show", str(merged_file), "--powder-png", str(powder)]) == 0
    assert powder.stat().st_size > 10_000


def test_hkl_slice_holds_the_peak_and_the_origin(merged_file, g200, tmp_path, capsys):
    # G200 = (0.342, 0, 0.007): the plane normal to q_y through q_y = 0 holds both G and q = 0
    assert abs(g200[1]) < 1e-12
    assert main(["show", str(merged_file), "--hkl", "2,0,0", "--png", str(tmp_path / "h.png")]) == 0
    assert "slice normal to qy at sample 16, qy = +0.0000 1/Å" in capsys.readouterr().out


def test_slice_l1_is_nearest_sample_to_one_over_a(structure, tmp_path, capsys, merged_file):
    axes = _axes()
    basis, note = show_cli.reciprocal_basis({"simulate": {"cif": None}})
    assert "bundled" in note
    np.testing.assert_allclose(basis, structure.q_of_hkl(np.eye(3)))
    q = show_cli.miller_to_q(2, 1.0, basis)
    assert q == pytest.approx(structure.q_of_hkl([0, 0, 1])[2], rel=1e-12)  # the plane holds the (001) point
    assert q == pytest.approx(1.0 / structure.pseudo_cubic.a_pc, rel=0.01)  # ≈ 1/a
    i = show_cli.slice_index(axes, 2, q)
    assert i == int(np.argmin(np.abs(axes[2] - 1.0 / structure.pseudo_cubic.a_pc)))
    assert axes[2][i] == pytest.approx(0.175)
    assert main(["show", str(merged_file), "--slice", "l=1", "--png", str(tmp_path / "l.png")]) == 0
    assert f"sample {i}, qz = +0.1750 1/Å" in capsys.readouterr().out
    with pytest.raises(io.InputError, match="outside the grid"):
        show_cli.slice_index(axes, 0, 0.42)
    assert show_cli.slice_index(axes, 0, 0.41) == N - 1  # within half a voxel of the edge


def test_parse_slice_and_vmax():
    assert show_cli.parse_slice(" QZ = -1e-2 ") == show_cli.SliceSpec(2, -0.01, miller=False)
    assert show_cli.parse_slice("k=2") == show_cli.SliceSpec(1, 2.0, miller=True)
    assert show_cli.parse_vmax("3") == {"*": 3.0}
    assert show_cli.parse_vmax("dark=1e4,difference=30") == {"dark": 1e4, "difference": 30.0}
    assert show_cli.parse_hkl_text("1,-1,0") == (1, -1, 0)


def test_zero_weight_voxels_are_masked(g200):
    import matplotlib.pyplot as plt

    axes = _axes()
    data = _gaussian(axes, g200)
    weight = np.ones_like(data)
    weight[:, :, :5] = 0.0
    iy = N // 2
    for diverging in (False, True):
        fig, ax = plt.subplots()
        try:
            panel = plotting.SlicePanel(axes, data - 0.5, 1, iy, diverging=diverging, weight=weight)
            shown = plotting.draw_slice(ax, panel).get_array()
        finally:
            plt.close(fig)
        # imshow holds the transposed (q_z, q_x) slice: rows q_z < index 5 are masked, the rest are not
        assert shown.shape == (N, N)
        assert np.all(shown.mask[:5]) and not np.any(shown.mask[5:])


def test_zoom_window_crops_the_panel(g200):
    import matplotlib.pyplot as plt

    axes = _axes()
    fig, ax = plt.subplots()
    try:
        window = ((g200[0] - 0.05, g200[0] + 0.05), (g200[2] - 0.05, g200[2] + 0.05))
        im = plotting.draw_slice(ax, plotting.SlicePanel(axes, _gaussian(axes, g200), 1, N // 2, window=window))
    finally:
        plt.close(fig)
    assert im.get_array().shape == (4, 4)  # samples within ±0.05 of (0.342, 0.007): 4 per axis
    assert im.norm.vmax == pytest.approx(_gaussian(axes, g200)[:, N // 2].max())


def test_plot_slice_writes(tmp_path, g200):
    axes = _axes()
    out = plotting.plot_slice(axes, _gaussian(axes, g200), 2, N // 2, tmp_path / "s.png", title="t", log=False)
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{notvolume}"], "not an HDF5 file"),
        (["{file}", "--volume", "nope"], "no volume 'nope'"),
        (["{file}", "--group", "pump", "--volume", "hkl_020"], "has no pump group"),
        (["{file}", "--group", "bogus"], "invalid choice"),
        (["{file}", "--slice", "qz=0.5"], "outside the grid"),
        (["{file}", "--slice", "l=3"], "outside the grid"),
        (["{file}", "--slice", "z=0"], "cannot read --slice"),
        (["{file}", "--slice", "qz"], "cannot read --slice"),
        (["{file}", "--hkl", "3,0,0", "--volume", "hkl_200"], "outside volume"),
        (["{file}", "--hkl", "3,0,0"], "no window for hkl 3,0,0 and no full grid"),
        (["{file}", "--hkl", "2,0"], "three integers"),
        (["{file}", "--hkl", "0,0,0"], "direct beam"),
        (["{file}", "--vmax", "-1"], "positive"),
        (["{file}", "--zoom", "0.1"], "--zoom needs --hkl"),
        (["{file}", "--powder-png", "{tmp}/p.png", "--volume", "hkl_200"], "no powder curves"),
        (["{file}", "--png", "/nonexistent/dir/x.png"], "does not exist"),
    ],
)
def test_errors_are_one_line(window_file, tmp_path, capsys, args, message):
    not_volume = tmp_path / "x.h5"
    not_volume.write_text("hello")
    subs = {"missing": tmp_path / "missing.h5", "notvolume": not_volume, "file": window_file, "tmp": tmp_path}
    assert main(["show", *(a.format(**subs) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpolaron: error:"), err
    assert message in err[0], err[0]


def test_plot_powder_and_scaling(tmp_path):
    q = np.linspace(0.05, 0.6, 50)
    curves = {"virtual powder": np.stack([np.exp(-q), 1.01 * np.exp(-q)]),
              "azimuthal average": np.stack([1 / q, np.full_like(q, np.nan)])}  # fmt: skip
    p = plotting.plot_powder(q, curves, tmp_path / "powder.png", title="run 1")
    assert p.stat().st_size > 10_000
    rng = np.random.default_rng(0)
    truth = np.exp(rng.normal(0, 0.5, 200))
    scale = truth * np.exp(rng.normal(0, 0.05, 200))
    similarity = np.clip(rng.normal(0.8, 0.1, 200), -1, 1)
    accepted = similarity > 0.6
    s = plotting.plot_scaling(scale, similarity, accepted, tmp_path / "scaling.png", threshold=0.6, truth=truth)
    assert s.stat().st_size > 10_000
    s2 = plotting.plot_scaling(scale, similarity, accepted, tmp_path / "scaling2.png")
    assert s2.stat().st_size > 10_000
