"""``vla-edge view``: an episode replayed into a .rrd file, read back with Rerun's own RRD reader.

Skips when the optional ``[view]`` extra (rerun-sdk) is not installed; the "not installed" error
itself is tested either way.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT
from vla_edge.edge.episodes.recorder import EpisodeRecorder

CAMS = COBOT_MAGIC_LAYOUT.cameras


@pytest.fixture
def episode(tmp_path):
    """A 6-tick episode written by the recorder: distinct frames, joints, an e-stop and a resume."""
    rng = np.random.default_rng(0)
    rec = EpisodeRecorder(tmp_path, cameras=CAMS, image_shape=(48, 64, 3), compress="lzf")
    path = rec.start_episode({"instruction": "x"})
    q = rng.uniform(-1, 1, (6, 14))
    a = rng.uniform(-1, 1, (6, 14))
    for k in range(6):
        frames = {c: np.full((48, 64, 3), 40 * k + 10 * i, np.uint8) for i, c in enumerate(CAMS)}
        rec.record_tick(frames, dict.fromkeys(CAMS, 100.0 + k / 30), q[k], a[k], (0.1 * k, -0.05 * k), 100.0 + k / 30)
        if k == 2:
            rec.record_event(100.0 + k / 30 + 0.001, "estop", "space key")
        if k == 4:
            rec.record_event(100.0 + k / 30 + 0.001, "resume", "")
    rec.close()
    return path, q, a


def _chunks(path):
    from rerun.chunk import RrdReader

    out: dict[str, list] = {}
    for chunk in RrdReader(path).stream().to_chunks():
        out.setdefault(str(chunk.entity_path), []).append(chunk.to_record_batch())
    return out


def _column(batches, name) -> list:
    return [v for b in batches for v in b.column(name).to_pylist()]


def test_view_saves_what_the_episode_holds(episode, tmp_path):
    pytest.importorskip("rerun")
    path, q, a = episode
    rrd = tmp_path / "ep.rrd"
    r = run_cli("view", str(path), "--save", str(rrd))
    assert r.returncode == 0, r.stderr
    chunks = _chunks(rrd)
    for cam in CAMS:
        assert len(_column(chunks[f"/cameras/{cam}"], "EncodedImage:blob")) == 6
    assert len(_column(chunks["/model/image"], "Image:buffer")) == 6
    fmt = _column(chunks["/model/image"], "Image:format")[0][0]
    assert (fmt["width"], fmt["height"]) == (384, 384)
    measured = [v[0] for v in _column(chunks["/joints/R_j3/measured"], "Scalars:scalars")]
    planned = [v[0] for v in _column(chunks["/joints/L_gripper/planned"], "Scalars:scalars")]
    assert np.allclose(measured, q[:, 9].astype(np.float32)) and np.allclose(planned, a[:, 6].astype(np.float32))
    ticks = _column(chunks["/joints/R_j3/measured"], "tick")
    assert ticks == list(range(6))
    vx = [v[0] for v in _column(chunks["/base/vx_mps"], "Scalars:scalars")]
    assert np.allclose(vx, 0.1 * np.arange(6))
    texts = _column(chunks["/events"], "TextLog:text")
    assert [t[0] if isinstance(t, list) else t for t in texts] == ["estop: space key", "resume"]
    assert _column(chunks["/events"], "tick") == [2, 4]


def refused_without_rerun(*argv: str) -> subprocess.CompletedProcess:
    """``vla-edge ARGV`` in a Python where ``import rerun`` fails."""
    code = ("import sys; sys.modules['rerun'] = None\n"
            "from vla_edge.edge.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_view_without_rerun_says_how_to_install(episode, tmp_path):
    path, _, _ = episode
    r = refused_without_rerun("view", str(path), "--save", str(tmp_path / "x.rrd"))
    assert r.returncode == 2
    assert r.stderr.strip() == "vla-edge view: error: Rerun is not installed: pip install 'vla-edge[view]'"
    assert not (tmp_path / "x.rrd").exists()


def test_view_refuses_a_missing_episode(tmp_path):
    pytest.importorskip("rerun")
    r = run_cli("view", str(tmp_path / "nope.hdf5"), "--save", str(tmp_path / "x.rrd"))
    assert r.returncode == 2 and "no such episode file" in r.stderr


def test_record_view_save_streams_the_recorded_ticks(tmp_path):
    pytest.importorskip("rerun")
    import h5py

    rrd, out = tmp_path / "live.rrd", tmp_path / "ep"
    r = run_cli("record", "--robot", "sim", "--instruction", "x", "--episodes", "1", "--out", str(out),
                "--episode-seconds", "1.0", "--keyboard", "none", "--view-save", str(rrd), timeout=120)
    assert r.returncode == 0, r.stderr
    with h5py.File(out / "episode_0.hdf5", "r") as f:
        action = f["action"][()]
    chunks = _chunks(rrd)
    planned = np.array([v[0] for v in _column(chunks["/joints/R_j3/planned"], "Scalars:scalars")])
    ticks = _column(chunks["/joints/R_j3/planned"], "tick")
    # ticks may be dropped when the viewer's logger is behind, never invented or reordered
    assert len(ticks) >= len(action) // 3 and ticks == sorted(ticks) and max(ticks) < len(action)
    assert np.allclose(planned, action[ticks, 9], rtol=0, atol=1e-6)  # float64 logged, float32 stored
    assert len(_column(chunks["/cameras/cam_high"], "EncodedImage:blob")) == len(ticks)
    assert [t[0] if isinstance(t, list) else t for t in _column(chunks["/events"], "TextLog:text")] == \
        ["episode: episode_0.hdf5"]


def _values(batches, name) -> list:
    return [v[0] if isinstance(v, list) else v for v in _column(batches, name)]


def test_run_view_save_streams_the_run_as_recorded(int8_bundle, tmp_path):
    """``run --view-save``: every logged tick is one the run recorded (same time, commanded target and
    measured pose), every inference's latencies and chunk boundary are there, and the frames and
    the composed model image go with the ticks."""
    pytest.importorskip("rerun")
    import h5py

    rrd, out = tmp_path / "run.rrd", tmp_path / "ep"
    r = run_cli("run", "--robot", "sim", "--bundle", str(int8_bundle), "--seconds", "2", "--keyboard", "none",
                "--record", str(out), "--view-save", str(rrd), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    [path] = out.glob("episode_*.hdf5")
    with h5py.File(path, "r") as f:
        tick_t, action, qpos = f["vla_edge/tick_t"][()], f["action"][()], f["observations/qpos"][()]
        total_ms = f["vla_edge/inference/stage_ms"][:, -1]
    chunks = _chunks(rrd)
    ticks = _column(chunks["/joints/R_j3/planned"], "tick")
    # dropped when the logger is behind, never invented or reordered
    assert len(ticks) >= len(action) // 3 and ticks == sorted(set(ticks))
    time_s = np.array([v for b in chunks["/joints/R_j3/planned"] for v in b.column("time").cast("int64").to_pylist()],
                      float) / 1e9  # the "time" timeline: nanoseconds since the first tick
    rows = np.searchsorted(tick_t, tick_t[0] + time_s - 1e-6)  # the recorded tick at the same time
    assert np.allclose(tick_t[rows] - tick_t[0], time_s, atol=1e-5)
    planned = np.array(_values(chunks["/joints/R_j3/planned"], "Scalars:scalars"))
    measured = np.array(_values(chunks["/joints/L_j2/measured"], "Scalars:scalars"))
    assert np.allclose(planned, action[rows, 9], atol=1e-6) and np.allclose(measured, qpos[rows, 1], atol=1e-6)
    assert len(set(planned.round(4))) > 1  # the policy moved the arm: not a constant
    for cam in CAMS:
        assert len(_column(chunks[f"/cameras/{cam}"], "EncodedImage:blob")) == len(ticks)
    fmt = _column(chunks["/model/image"], "Image:format")[0][0]
    assert (fmt["width"], fmt["height"]) == (384, 384)
    assert len(_column(chunks["/base/vx_mps"], "Scalars:scalars")) == len(ticks)
    # latencies and chunk boundaries are never dropped: one per inference the run recorded
    assert np.allclose(_values(chunks["/latency/total_ms"], "Scalars:scalars"), total_ms, rtol=1e-6)
    for stage in ("compose", "vision", "prompt", "prefill", "decode", "detokenize"):
        assert len(_column(chunks[f"/latency/{stage}_ms"], "Scalars:scalars")) == len(total_ms)
    texts = _values(chunks["/chunks"], "TextLog:text")
    assert len(texts) == len(total_ms) >= 2 and all(t.startswith("chunk: 5 steps, observed at tick") for t in texts)
    boundaries = _column(chunks["/chunks"], "tick")
    assert boundaries == sorted(boundaries) and boundaries[0] >= 1


def test_run_view_save_logs_the_estop_of_a_signal(int8_bundle, tmp_path):
    pytest.importorskip("rerun")
    import signal
    import time

    rrd = tmp_path / "run.rrd"
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "run", "--robot", "sim", "--bundle",
                             str(int8_bundle), "--keyboard", "none", "--view-save", str(rrd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not rrd.exists() or rrd.stat().st_size < 300_000) and time.monotonic() < deadline:
            time.sleep(0.1)  # the run is streaming ticks
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    chunks = _chunks(rrd)
    assert _values(chunks["/events"], "TextLog:text") == ["estop: SIGTERM"]
    [estop_tick] = _column(chunks["/events"], "tick")
    assert 0 < estop_tick <= max(_column(chunks["/joints/R_j3/planned"], "tick")) + 1


@pytest.mark.parametrize("command", [["run", "--robot", "sim"], ["demo", "--workdir", "{tmp}/w"]], ids=["run", "demo"])
def test_run_and_demo_view_without_rerun_are_refused_before_anything_starts(tmp_path, command):
    argv = [a.format(tmp=tmp_path) for a in command]
    r = refused_without_rerun(*argv, "--view-save", str(tmp_path / "x.rrd"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"vla-edge {argv[0]}: error: Rerun is not installed: pip install 'vla-edge[view]'"
    assert not (tmp_path / "x.rrd").exists() and not (tmp_path / "w").exists()  # nothing ran, nothing exported


def test_demo_view_save_streams_the_demo(tmp_path):
    """``demo --view-save``: the demo's run goes into the .rrd like ``run --view-save`` (cameras, model image,
    planned and measured joints, one latency row per inference), and the verdict is still printed."""
    pytest.importorskip("rerun")
    rrd = tmp_path / "demo.rrd"
    r = run_cli("demo", "--seconds", "2", "--seed", "2000", "--workdir", str(tmp_path / "w"), "--view-save", str(rrd),
                timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo: target at" in r.stdout  # the verdict, after the run summary
    chunks = _chunks(rrd)
    ticks = _column(chunks["/joints/R_j3/planned"], "tick")
    assert len(ticks) >= 10 and ticks == sorted(set(ticks))
    for cam in CAMS:
        assert len(_column(chunks[f"/cameras/{cam}"], "EncodedImage:blob")) == len(ticks)
    assert len(_column(chunks["/joints/L_j2/measured"], "Scalars:scalars")) == len(ticks)
    assert len(_values(chunks["/latency/total_ms"], "Scalars:scalars")) >= 2
