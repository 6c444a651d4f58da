"""Episode recorder: stock Cobot Magic layout, vla-edge datasets, and a readable file after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from vla_edge.edge.engine import STAGES
from vla_edge.edge.errors import VlaEdgeError
from vla_edge.edge.recorder import EpisodeRecorder, per_tick_datasets, recover_episode

CAMS = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
SMALL = (48, 64, 3)


def tick_args(i: int, shape=SMALL):
    frames = {c: np.full(shape, (i + k) % 256, dtype=np.uint8) for k, c in enumerate(CAMS)}
    frame_ts = {c: i / 30 - 0.001 * k for k, c in enumerate(CAMS)}
    return dict(frames=frames, frame_ts=frame_ts, qpos=np.full(14, i * 0.01), action=np.full(14, i * 0.02),
                base_action=[0.1 * i, -0.01 * i], tick_t=i / 30, clamps=i % 3)


def test_layout_names_shapes_dtypes_and_attrs(tmp_path):
    rec = EpisodeRecorder(tmp_path, CAMS, max_tokens=8)  # default 480x640x3 images
    path = rec.start_episode({"instruction": "pick up the cup", "bundle": "b1", "robot": "cobot_magic",
                              "profile": {"hz": 30}})
    assert path.name == "episode_0.hdf5"
    for i in range(3):
        assert rec.record_tick(**tick_args(i, (480, 640, 3))) == i + 1
    rec.record_inference(0.5, {"vision": 12.5, "decode": 30.0}, [5, 6, 7])
    rec.record_event(0.7, "trip", "space key")
    rec.close()
    rec.close()

    with h5py.File(path, "r") as f:  # an ordinary file after close(): no swmr flag needed
        assert f.attrs["sim"] == False and f.attrs["compress"] == False  # noqa: E712 - numpy bools
        assert f.attrs["instruction"] == "pick up the cup" and f.attrs["bundle"] == "b1"
        assert f.attrs["robot"] == "cobot_magic" and json.loads(f.attrs["profile"]) == {"hz": 30}
        for cam in CAMS:
            img = f[f"observations/images/{cam}"]
            assert img.shape == (3, 480, 640, 3) and img.dtype == np.uint8 and img.compression is None
            assert f[f"vla_edge/frame_ts/{cam}"].shape == (3,) and f[f"vla_edge/frame_ts/{cam}"].dtype == np.float64
        assert f["observations/images/cam_left_wrist"][2, 0, 0, 0] == 3
        for name in ("observations/qpos", "observations/qvel", "observations/effort", "action"):
            assert f[name].shape == (3, 14) and f[name].dtype == np.float32
        np.testing.assert_allclose(f["observations/qpos"][2], 0.02, rtol=1e-6)
        np.testing.assert_allclose(f["action"][1], 0.02, rtol=1e-6)
        assert np.all(np.isnan(f["observations/qvel"][:]))  # not measured
        assert f["base_action"].shape == (3, 2) and f["base_action"].dtype == np.float32
        np.testing.assert_allclose(f["base_action"][2], [0.2, -0.02], rtol=1e-6)
        assert f["vla_edge/tick_t"].dtype == np.float64 and f["vla_edge/tick_t"][1] == pytest.approx(1 / 30)
        assert list(f["vla_edge/clamps"][:]) == [0, 1, 2] and f["vla_edge/clamps"].dtype == np.int32
        inf = f["vla_edge/inference"]
        assert json.loads(inf["stage_ms"].attrs["stage_names"]) == list(STAGES)
        assert inf["stage_ms"].shape == (1, len(STAGES)) and inf["stage_ms"].dtype == np.float32
        stage = dict(zip(STAGES, inf["stage_ms"][0], strict=True))
        assert stage["vision"] == 12.5 and stage["decode"] == 30.0 and np.isnan(stage["prefill"])
        assert list(inf["token_ids"][0]) == [5, 6, 7, -1, -1, -1, -1, -1] and inf["n_tokens"][0] == 3
        assert inf["t"][0] == 0.5
        ev = f["vla_edge/events"]
        assert (ev["t"][0], ev["kind"][0], ev["reason"][0]) == (0.7, b"trip", b"space key")
        assert {f[n].shape[0] for n in per_tick_datasets(f)} == {3}


def test_numbering_compression_and_bad_input(tmp_path):
    rec = EpisodeRecorder(tmp_path, CAMS, image_shape=SMALL, compress="lzf")
    assert rec.start_episode({}).name == "episode_0.hdf5"
    with pytest.raises(VlaEdgeError, match="already open"):
        rec.start_episode({})
    bad = tick_args(0)
    del bad["frames"]["cam_high"]
    with pytest.raises(VlaEdgeError, match="cam_high"):
        rec.record_tick(**bad)
    bad = tick_args(0)
    bad["frames"]["cam_high"] = bad["frames"]["cam_high"].astype(np.float32)
    with pytest.raises(VlaEdgeError, match="uint8"):
        rec.record_tick(**bad)
    with pytest.raises(VlaEdgeError, match="qpos"):
        rec.record_tick(**{**tick_args(0), "qpos": np.zeros(7)})
    with pytest.raises(VlaEdgeError, match="unknown stage"):
        rec.record_inference(0.0, {"tokenize": 1.0}, [])
    rec.record_tick(**tick_args(0))
    path = rec.close()
    with h5py.File(path, "r") as f:  # rejected calls left no partial rows
        assert {f[n].shape[0] for n in per_tick_datasets(f)} == {1}
        assert f["observations/images/cam_high"].compression == "lzf" and f.attrs["compress"] == True  # noqa: E712
    assert rec.start_episode({}).name == "episode_1.hdf5"
    rec.close()
    (tmp_path / "episode_7.hdf5").touch()
    with EpisodeRecorder(tmp_path, CAMS, image_shape=SMALL, compress=True) as rec2:
        assert rec2.start_episode({}).name == "episode_8.hdf5"
        rec2.record_tick(**tick_args(1))
        assert rec2._f["observations/images/cam_high"].compression == "gzip"
    with pytest.raises(VlaEdgeError):
        EpisodeRecorder(tmp_path, CAMS, compress="zstd")
    with pytest.raises(VlaEdgeError, match="no episode"):
        EpisodeRecorder(tmp_path, CAMS).record_event(0.0, "trip")


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from vla_edge.edge.recorder import EpisodeRecorder
    cams = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
    rec = EpisodeRecorder(sys.argv[1], cams, image_shape=(120, 160, 3))
    rec.start_episode({"instruction": "killed"})
    i = 0
    while True:
        frames = {c: np.full((120, 160, 3), i % 256, np.uint8) for c in cams}
        n = rec.record_tick(frames, {c: time.monotonic() for c in cams}, np.full(14, i), np.full(14, i),
                            [0.0, 0.0], time.monotonic(), 0)
        if i % 5 == 0:
            rec.record_inference(time.monotonic(), {"vision": 1.0}, [1, 2])
            rec.record_event(time.monotonic(), "tick", str(i))
        print(n, flush=True)
        i += 1
    """
)


def test_sigkill_mid_episode_leaves_every_completed_tick(tmp_path):
    n_wanted = 40
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    reported = 0
    try:
        deadline = time.monotonic() + 60
        while reported < n_wanted and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"recorder child exited early (rc={proc.poll()})"
            reported = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert reported >= n_wanted and proc.returncode == -signal.SIGKILL
    path = tmp_path / "episode_0.hdf5"

    with h5py.File(path, "r", swmr=True) as f:
        lengths = {name: f[name].shape[0] for name in per_tick_datasets(f)}
        assert min(lengths.values()) >= reported, lengths
        assert max(lengths.values()) - min(lengths.values()) <= 1, lengths  # at most the tick being written
        n = min(lengths.values())
        qpos = f["observations/qpos"][:n, 0]
        np.testing.assert_array_equal(qpos, np.arange(n))  # every completed row holds its data
        assert f["observations/images/cam_right_wrist"][n - 1, 5, 5, 0] == (n - 1) % 256
        assert f.attrs["instruction"] == "killed"
        assert f["vla_edge/inference/t"].shape[0] >= reported // 5

    n_recovered = recover_episode(path)
    assert n_recovered >= reported
    with h5py.File(path, "r") as f:  # now an ordinary file
        assert {f[name].shape[0] for name in per_tick_datasets(f)} == {n_recovered}
        np.testing.assert_array_equal(f["observations/qpos"][:, 3], np.arange(n_recovered))
        assert f.attrs["instruction"] == "killed" and json.loads(f["vla_edge/inference/stage_ms"].attrs["stage_names"])
    assert not list(tmp_path.glob("*.recovering.*"))
    assert os.path.getsize(path) > 0
