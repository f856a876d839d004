"""Synthetic EuXFEL runs on disk: write an EXDF run directory that `extra_data.RunDirectory` opens, read it
back frame-chunk by frame-chunk. The only data_pipeline module (with `io.py`) that touches files.

Layout (written with extra-data's own mock writer `extra_data.tests.mockdata.write_file`, then filled with
h5py; one sequence file per `trains_per_file` trains):
  CORR-R{run}-AGIPD{m:02}-S{seq:05}.h5   source SPB_DET_AGIPD1M-1/CORR/{m}CH0:output, image.data (frames, 512,
                                         128) float32 [photons], image.mask uint32, image.gain uint8,
                                         image.cellId, image.pulseId (= bunch-pattern slot), image.trainId
  CORR-R{run}-DA01-S{seq:05}.h5          SPB_RR_SYS/TSYS/TIMESERVER:outputBunchPattern data.bunchPatternTable
  agipd.geom                             CrystFEL geometry (data_pipeline.io.write_crystfel_geom)
  truth.hdf5                             per frame: trainId, pulseId, pumped, n_crystals, rotations, sizes_nm
  config.json                            synthetic config, run layout, provenance (jaxpolaron.io.provenance)
Frames are buffered `chunk` at a time, so memory stays constant in the run length.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from data_pipeline.bunch_pattern import pumped as decode_pumped
from data_pipeline.io import write_crystfel_geom

AGIPD_SOURCE = "SPB_DET_AGIPD1M-1/CORR/{m}CH0:output"
TIMESERVER = "SPB_RR_SYS/TSYS/TIMESERVER"
BUNCH_PATTERN_SOURCE = TIMESERVER + ":outputBunchPattern"
BUNCH_PATTERN_KEY = "data.bunchPatternTable"
N_MODULES = 16


def _timeserver_device():
    from extra_data.tests.mockdata.base import DeviceBase

    class TimeServer(DeviceBase):
        output_channels = ("outputBunchPattern/data",)  # EXDF: source "<device>:<channel>", index group "data"
        instrument_keys = [("bunchPatternTable", "u4", (2700,))]  # noqa: RUF012 (mock DeviceBase API)

    return TimeServer(TIMESERVER)


def _create_sequence(out: Path, run: int, seq: int, first_train: int, n_trains: int, n_pulses: int, table):
    """Empty EXDF files (mock writer) for one sequence; returns the 16 module file paths."""
    from extra_data.tests.mockdata import write_file
    from extra_data.tests.mockdata.detectors import AGIPDModule

    paths = []
    for m in range(N_MODULES):
        path = out / f"CORR-R{run:04d}-AGIPD{m:02d}-S{seq:05d}.h5"
        dev = AGIPDModule(
            AGIPD_SOURCE.format(m=m).split(":")[0], channel_name="output", raw=False, frames_per_train=n_pulses
        )
        write_file(str(path), [dev], ntrains=n_trains, firsttrain=first_train, chunksize=n_trains, format_version="1.2")
        paths.append(path)
    ts = out / f"CORR-R{run:04d}-DA01-S{seq:05d}.h5"
    write_file(
        str(ts),
        [_timeserver_device()],
        ntrains=n_trains,
        firsttrain=first_train,
        chunksize=n_trains,
        format_version="1.2",
    )
    with h5py.File(ts, "r+") as f:
        f[f"INSTRUMENT/{BUNCH_PATTERN_SOURCE}/data/bunchPatternTable"][:] = table
    return paths


def write_run(
    out_dir: str | Path,
    frames: Iterable[tuple[np.ndarray, object]],
    *,
    layout,
    geometry,
    mask: np.ndarray,
    config: dict | None = None,
    run_number: int = 1,
    trains_per_file: int = 250,
    chunk: int = 32,
    progress: bool = True,
) -> Path:
    """Write a synthetic run.

    Args:
        out_dir: new or empty directory.
        frames: iterator of (photons (16, 512, 128), truth) in train/pulse order; truth has fields n,
            rotations, sizes_nm, pumped (`data_pipeline.synthetic.Crystals`); exactly layout.n_frames of them.
        layout: `data_pipeline.synthetic.RunLayout` (trains, pulses, bunch pattern).
        geometry: extra-geom AGIPD-1M geometry (written as CrystFEL .geom).
        mask: (16, 512, 128) uint32 bad-pixel mask, written with every frame.
        config: extra JSON-serialisable settings (e.g. SyntheticConfig.to_dict()), clen_m/energy_kev used for .geom.
    """
    from jaxpolaron.io import provenance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    config = dict(config or {})
    write_crystfel_geom(
        geometry, out / "agipd.geom", clen_m=config.get("clen_m", 0.1224), energy_kev=config.get("energy_kev", 13.6)
    )
    (out / "config.json").write_text(
        json.dumps(
            {"synthetic": config, "layout": layout.to_dict(), "units": "photons", "provenance": provenance()},
            indent=2,
            default=str,
        )
    )
    mask = np.asarray(mask, np.uint32)
    table = layout.table()
    pulse_ids = layout.pulse_ids()
    n_p = layout.n_pulses
    it = iter(frames)
    bar = tqdm(total=layout.n_frames, unit="frame", disable=not progress)
    with h5py.File(out / "truth.hdf5", "w") as truth:
        t_ds: dict[str, h5py.Dataset] = {}
        for seq, t0 in enumerate(range(0, layout.n_trains, trains_per_file)):
            nt = min(trains_per_file, layout.n_trains - t0)
            first_train = int(layout.first_train) + t0
            paths = _create_sequence(out, run_number, seq, first_train, nt, n_p, table[t0 : t0 + nt])
            files = [h5py.File(p, "r+") for p in paths]
            try:
                groups = [f[f"INSTRUMENT/{AGIPD_SOURCE.format(m=m)}/image"] for m, f in enumerate(files)]
                for g in groups:
                    g["pulseId"][:] = np.tile(pulse_ids, nt)
                    g["cellId"][:] = np.tile(np.arange(n_p, dtype=np.uint16), nt)
                n_seq = nt * n_p
                for a in range(0, n_seq, chunk):
                    k = min(chunk, n_seq - a)
                    buf = np.empty((k, N_MODULES, 512, 128), np.float32)
                    rows = []
                    for j in range(k):
                        try:
                            data, crystals = next(it)
                        except StopIteration:
                            raise ValueError(f"frames ended before the {layout.n_frames} the layout needs") from None
                        buf[j] = data
                        rows.append(crystals)
                    for m, g in enumerate(groups):
                        g["data"][a : a + k] = buf[:, m]
                        g["mask"][a : a + k] = np.broadcast_to(mask[m], (k, 512, 128))
                    _append_truth(truth, t_ds, rows, first_train, a, n_p, pulse_ids)
                    bar.update(k)
            finally:
                for f in files:
                    f.close()
    bar.close()
    if next(it, None) is not None:
        raise ValueError(f"more frames than the {layout.n_frames} the layout holds")
    return out


def _append_truth(f: h5py.File, ds: dict, rows, first_train: int, a: int, n_p: int, pulse_ids) -> None:
    idx = a + np.arange(len(rows))
    cols = {
        "trainId": (first_train + idx // n_p).astype(np.uint64),
        "pulseId": pulse_ids[idx % n_p].astype(np.uint64),
        "pumped": np.array([bool(r.pumped) for r in rows]),
        "n_crystals": np.array([int(r.n) for r in rows], np.int32),
        "rotations": np.stack([np.asarray(r.rotations, np.float32) for r in rows]),
        "sizes_nm": np.stack([np.asarray(r.sizes_nm, np.float32) for r in rows]),
    }
    for name, v in cols.items():
        if name not in ds:
            ds[name] = f.create_dataset(
                name, (0, *v.shape[1:]), v.dtype, maxshape=(None, *v.shape[1:]), chunks=(256, *v.shape[1:])
            )
        d = ds[name]
        d.resize(d.shape[0] + len(v), axis=0)
        d[-len(v) :] = v
    f.attrs["note"] = "q_lab = R q_crystal; entries beyond n_crystals are unused"


def read_truth(run_dir: str | Path) -> dict[str, np.ndarray]:
    with h5py.File(Path(run_dir) / "truth.hdf5", "r") as f:
        return {k: f[k][()] for k in f}


def read_frames(
    run_dir: str | Path, chunk: int = 32
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a run: yields (train_id, pulse_ids (n,), frames (n, 16, 512, 128), mask (n, 16, 512, 128),
    pumped (n,) bool) with n <= chunk frames of one train, via extra-data (one train selected at a time)."""
    from extra_data import RunDirectory, by_id, by_index
    from extra_data.components import AGIPD1M

    run = RunDirectory(str(run_dir))
    det = AGIPD1M(run)
    table_key = run[BUNCH_PATTERN_SOURCE, BUNCH_PATTERN_KEY]
    for tid in det.train_ids:
        one = det.select_trains(by_id[[tid]])
        # frames in this train (module 0; the writer gives every module the same frames)
        n = int(run[AGIPD_SOURCE.format(m=0), "image.data"].select_trains(by_id[[tid]]).data_counts(labelled=False)[0])
        table = table_key.select_trains(by_id[[tid]]).ndarray()
        for a in range(0, n, chunk):
            sel = by_index[a : min(a + chunk, n)]
            data = one.get_array("image.data", pulses=sel)
            mask = one.get_array("image.mask", pulses=sel)
            pids = np.asarray(data.coords["pulse"].values, np.int64)
            frames = np.moveaxis(np.asarray(data.values[:, 0]), 0, 1)
            masks = np.moveaxis(np.asarray(mask.values[:, 0]), 0, 1)
            yield int(tid), pids, frames, masks, decode_pumped(table, pids[None])[0]
