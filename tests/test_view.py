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
from vla_edge.edge.recorder import EpisodeRecorder
from vla_edge.edge.spec import COBOT_MAGIC_LAYOUT

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


def test_view_without_rerun_says_how_to_install(episode, tmp_path):
    path, _, _ = episode
    code = ("import sys; sys.modules['rerun'] = None\n"
            "from vla_edge.edge.cli import main\n"
            f"sys.exit(main(['view', {str(path)!r}, '--save', {str(tmp_path / 'x.rrd')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
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
