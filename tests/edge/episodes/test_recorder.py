"""Episode recorder: stock Cobot Magic layout, vla-edge datasets, written off the tick, and a readable file
with equal row counts after close, SIGKILL, a writer that falls behind and a file that cannot grow."""

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
from vla_edge import VlaEdgeError
from vla_edge.edge.engine import STAGES
from vla_edge.edge.episodes.format import per_tick_datasets
from vla_edge.edge.episodes.recorder import BATCH_ROWS, RESERVE_BYTES, EpisodeRecorder, RecorderFault
from vla_edge.edge.episodes.repair import recover_episode

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
        # compress=False is the stock attribute's meaning for ALOHA-style loaders (rows are not JPEG bytes);
        # the deflate filter is transparent to every HDF5 reader.
        assert f.attrs["sim"] == False and f.attrs["compress"] == False  # noqa: E712 - numpy bools
        assert f.attrs["image_filter"] == "gzip-1"
        assert f.attrs["instruction"] == "pick up the cup" and f.attrs["bundle"] == "b1"
        assert f.attrs["robot"] == "cobot_magic" and json.loads(f.attrs["profile"]) == {"hz": 30}
        for cam in CAMS:
            img = f[f"observations/images/{cam}"]
            assert img.shape == (3, 480, 640, 3) and img.dtype == np.uint8 and img.compression == "gzip"
            assert img.chunks == (1, 480, 640, 3)
            assert f[f"vla_edge/frame_ts/{cam}"].shape == (3,) and f[f"vla_edge/frame_ts/{cam}"].dtype == np.float64
        assert f["observations/images/cam_left_wrist"][2, 0, 0, 0] == 3
        np.testing.assert_array_equal(f["observations/images/cam_high"][1], tick_args(1, (480, 640, 3))["frames"]["cam_high"])
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
        assert f["observations/images/cam_high"].compression == "lzf" and f.attrs["image_filter"] == "lzf"
    assert rec.start_episode({}).name == "episode_1.hdf5"
    rec.close()
    (tmp_path / "episode_7.hdf5").touch()
    with EpisodeRecorder(tmp_path, CAMS, image_shape=SMALL, compress=False) as rec2:
        assert rec2.start_episode({}).name == "episode_8.hdf5"
        rec2.record_tick(**tick_args(1))
    with h5py.File(rec2.path, "r") as f:
        assert f["observations/images/cam_high"].compression is None and f.attrs["image_filter"] == "none"
        assert f["observations/images/cam_high"][0, 0, 0, 0] == 1
    with pytest.raises(VlaEdgeError):
        EpisodeRecorder(tmp_path, CAMS, compress="zstd")
    with pytest.raises(VlaEdgeError, match="no episode"):
        EpisodeRecorder(tmp_path, CAMS).record_event(0.0, "trip")


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from vla_edge.edge.episodes.recorder import EpisodeRecorder
    cams = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
    rec = EpisodeRecorder(sys.argv[1], cams, image_shape=(120, 160, 3))
    rec.start_episode({"instruction": "killed"})
    i = 0
    while True:
        frames = {c: np.full((120, 160, 3), i % 256, np.uint8) for c in cams}
        rec.record_tick(frames, {c: time.monotonic() for c in cams}, np.full(14, i), np.full(14, i),
                            [0.0, 0.0], time.monotonic(), 0)
        if i % 5 == 0:
            rec.record_inference(time.monotonic(), {"vision": 1.0}, [1, 2])
            rec.record_event(time.monotonic(), "tick", str(i))
        print(rec.rows_written, flush=True)  # rows the writer has completed and flushed
        i += 1
        time.sleep(0.005)
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
        assert max(lengths.values()) - min(lengths.values()) <= 1, lengths  # at most the row being written
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


def test_ticks_never_wait_for_a_stuck_writer_and_close_keeps_every_accepted_row(tmp_path):
    """Holding h5py's global lock stands in for a disk that does not answer: the writer blocks on its first
    HDF5 call, the tick must not. A full queue is one clear fault; rows already accepted are still written."""
    from h5py._objects import phil

    rec = EpisodeRecorder(tmp_path, CAMS, image_shape=SMALL, queue_ticks=5)
    rec.start_episode({})
    accepted, slowest_s = 0, 0.0
    with phil:
        with pytest.raises(RecorderFault, match="cannot keep up"):
            for i in range(50):
                t0 = time.monotonic()
                try:
                    accepted = rec.record_tick(**tick_args(i))
                finally:
                    slowest_s = max(slowest_s, time.monotonic() - t0)
        assert 5 <= accepted <= 5 + BATCH_ROWS  # the queue, plus the batch the writer may hold
        assert slowest_s < 0.5  # returns at once; 0.5 s only so that a loaded machine cannot fail it
        with pytest.raises(RecorderFault, match="cannot keep up"):  # and stays faulted
            rec.record_tick(**tick_args(99))
        rec.record_event(1.0, "fault", "no raise from an e-stop callback")
    path = rec.close()
    with h5py.File(path, "r") as f:
        assert {f[n].shape[0] for n in per_tick_datasets(f)} == {accepted}
        np.testing.assert_allclose(f["observations/qpos"][:, 0], np.arange(accepted) * 0.01, rtol=1e-6)


def test_close_drains_the_queue_and_rows_are_equal(tmp_path):
    rec = EpisodeRecorder(tmp_path, CAMS, image_shape=SMALL, queue_ticks=200)
    rec.start_episode({})
    for i in range(120):  # as fast as possible: the writer is behind when close() starts
        rec.record_tick(**tick_args(i))
        if i % 10 == 0:
            rec.record_inference(i / 30, {"vision": 1.0}, [i])
            rec.record_event(i / 30, "tick", str(i))
    path = rec.close()
    assert rec.rows_written == 120 and rec.fault is None
    with h5py.File(path, "r") as f:
        assert {f[n].shape[0] for n in per_tick_datasets(f)} == {120}
        assert f["vla_edge/inference/t"].shape == (12,) and f["vla_edge/events/kind"].shape == (12,)
        assert list(f["vla_edge/inference/token_ids"][:, 0]) == list(range(0, 120, 10))
        assert f["observations/images/cam_right_wrist"][119, 0, 0, 0] == (119 + 2) % 256


FULL_DISK_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, time
    import numpy as np
    from vla_edge.edge.episodes.recorder import EpisodeRecorder, RecorderFault
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then refuses the write (EFBIG)
    cams = ["cam_high", "cam_left_wrist", "cam_right_wrist"]
    rec = EpisodeRecorder(sys.argv[1], cams, image_shape=(120, 160, 3), compress=False)
    rec.start_episode({"instruction": "full disk"})
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    i = 0
    try:
        while i < 10_000:
            frames = {c: np.full((120, 160, 3), i % 256, np.uint8) for c in cams}
            rec.record_tick(frames, {c: float(i) for c in cams}, np.full(14, i), np.full(14, i), [0.0, 0.0], float(i))
            i += 1
            time.sleep(0.002)
    except RecorderFault as e:
        print("FAULT", e, flush=True)
    rec.close()
    print("CLOSED", rec.rows_written, flush=True)
    """
)


def test_a_file_that_cannot_grow_is_one_fault_and_a_readable_file(tmp_path):
    """A real kernel limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails with ENOSPC)
    on a real file. HDF5 crashes after a failed write, so the recorder must stop before it, with a line."""
    limit = RESERVE_BYTES + 2_000_000  # ~11 rows of 3 raw 120x160 frames
    out = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path), str(limit)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("FAULT recording stopped after") and "file size limit" in lines[0], out.stdout
    n = int(lines[1].split()[1])
    assert n >= 5
    with h5py.File(tmp_path / "episode_0.hdf5", "r") as f:  # an ordinary, closed file
        assert {f[name].shape[0] for name in per_tick_datasets(f)} == {n}
        np.testing.assert_array_equal(f["observations/qpos"][:, 0], np.arange(n))
        assert f["observations/images/cam_high"][n - 1, 7, 7, 0] == (n - 1) % 256
    assert "Traceback" not in out.stderr


def _limit_file_size(limit_bytes: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_run_stops_safely_with_one_line_when_the_recording_cannot_grow(int8_bundle, tmp_path):
    """The real command, its recording limited by the kernel (ulimit -f): a safe stop, exit 3, one line,
    and an ordinary file whose datasets all hold the same rows."""
    out = subprocess.run(
        [sys.executable, "-m", "vla_edge.edge.cli", "run", "--robot", "sim", "--bundle", str(int8_bundle),
         "--record", str(tmp_path), "--seconds", "30", "--keyboard", "none"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(RESERVE_BYTES + 1_000_000),
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("vla-edge run: stopped safely:")]
    assert "recording stopped after" in line and "file size limit" in line, line
    assert "Traceback" not in out.stderr
    [path] = tmp_path.glob("episode_*.hdf5")
    with h5py.File(path, "r") as f:
        lengths = {f[name].shape[0] for name in per_tick_datasets(f)}
        assert len(lengths) == 1 and lengths.pop() >= 5, lengths
