"""Camera threads, the synchronised read and its faults, with simulated and replayed sources."""

from __future__ import annotations

import time

import cv2
import h5py
import numpy as np
import pytest
from vla_edge import DeviceFault, VlaEdgeError
from vla_edge.firmware_bridge.camera_replay import ReplaySource
from vla_edge.firmware_bridge.camera_sim import Scene, SyntheticSource
from vla_edge.firmware_bridge.cameras import (
    CAMERA_NAMES,
    Camera,
    CameraFault,
    CameraRig,
    OpenCVSource,
)

PERIOD_S = 1 / 30


@pytest.fixture
def synthetic():
    scene = Scene()
    sources = {n: SyntheticSource(n, scene, seed=i) for i, n in enumerate(CAMERA_NAMES)}
    rig = CameraRig([Camera(n, s) for n, s in sources.items()])
    rig.start()
    yield rig, sources, scene
    rig.stop()


def test_synchronised_read_reports_ages_and_skew(synthetic):
    rig, _, _ = synthetic
    for _ in range(10):
        fs = rig.read()
        assert set(fs.images) == set(CAMERA_NAMES)
        for name, img in fs.images.items():
            assert img.shape == (480, 640, 3) and img.dtype == np.uint8
            assert 0.0 <= fs.ages_s[name] <= rig.stale_after_s
        assert fs.skew_s == pytest.approx(max(fs.stamps_s.values()) - min(fs.stamps_s.values()))
        assert fs.synced == (fs.skew_s <= rig.max_skew_s)
        time.sleep(0.01)
    time.sleep(0.5)
    for cam in rig.cameras.values():
        assert 20.0 < cam.fps_measured < 40.0
    assert rig.faults() == []


def test_stalled_camera_is_a_fault_within_two_frame_periods(synthetic):
    rig, sources, _ = synthetic
    rig.read()
    sources["cam_left_wrist"].stall()
    t0 = time.monotonic()
    with pytest.raises(CameraFault, match="cam_left_wrist stale"):
        while time.monotonic() - t0 < 1.0:
            rig.read()
    # stale_after_s is two periods; allow scheduling slack on a loaded machine.
    assert time.monotonic() - t0 < 2 * PERIOD_S + 0.05
    assert any("cam_left_wrist" in f for f in rig.faults())
    sources["cam_left_wrist"].stall(False)
    time.sleep(0.15)
    rig.read()


def test_gone_camera_is_a_fault_until_reconnected(synthetic):
    rig, sources, _ = synthetic
    sources["cam_high"].fail()
    time.sleep(0.1)
    with pytest.raises(CameraFault, match="cam_high gone"):
        rig.read()
    rig.reconnect("cam_high")
    time.sleep(0.1)
    assert rig.read().ages_s["cam_high"] < rig.stale_after_s


def test_a_gone_camera_is_a_device_fault(synthetic):
    """The device branch of the error tree: what a simulated camera raises when it disappears."""
    rig, sources, _ = synthetic
    sources["cam_right_wrist"].fail()
    time.sleep(0.1)
    with pytest.raises(DeviceFault, match="cam_right_wrist gone") as e:
        rig.read()
    assert type(e.value) is CameraFault and isinstance(e.value, VlaEdgeError)
    from vla_edge.firmware_bridge.piper_arm import ArmFault
    from vla_edge.firmware_bridge.tracer_base import BaseFault

    assert issubclass(ArmFault, DeviceFault) and issubclass(BaseFault, DeviceFault)


@pytest.mark.parametrize(("size", "reformat", "seen"), [
    ((640, 480), {"width": 320, "height": 240}, "frame is 320x240x3 uint8, expected 640x480x3 RGB uint8"),
    ((640, 480), {"width": 1280, "height": 720}, "frame is 1280x720x3 uint8, expected 640x480x3 RGB uint8"),
    ((640, 480), {"grey": True}, "frame is 640x480 grey (one channel) uint8, expected 640x480x3 RGB uint8"),
    (None, {"width": 320, "height": 240}, "frame is 320x240x3 uint8, expected 640x480x3 RGB uint8"),
], ids=["smaller", "larger", "grey", "size-of-the-first-frame"])
def test_a_frame_of_another_size_or_format_is_a_fault_at_the_camera(size, reformat, seen):
    """Checked where the frame arrives: the fault names the camera, what it saw and what it expects; the wrong
    frame is never handed out (the newest frame stays the last good one), with or without a recorder."""
    sources = {n: SyntheticSource(n, Scene(), seed=i) for i, n in enumerate(CAMERA_NAMES)}
    rig = CameraRig([Camera(n, s, size=size) for n, s in sources.items()], stale_after_s=1.0)  # a loaded box
    rig.start()
    try:
        rig.read()
        sources["cam_left_wrist"].reformat(**reformat)
        deadline = time.monotonic() + 5.0
        with pytest.raises(CameraFault) as e:
            while time.monotonic() < deadline:
                assert rig.read()["cam_left_wrist"].shape == (480, 640, 3)
        line = str(e.value)
        assert line.startswith(f"camera cam_left_wrist: {seen} (a camera that renegotiated"), line
        assert "[cameras] in the robot profile" in line
        assert rig.faults() == [line]
        assert rig.cameras["cam_left_wrist"].latest().image.shape == (480, 640, 3)
    finally:
        rig.stop()


def test_a_v4l2_camera_says_which_device_to_check():
    cam = Camera("cam_high", OpenCVSource("/dev/video4"), size=(640, 480))
    frames = iter([(np.zeros((240, 320, 3), np.uint8), time.monotonic())])  # one frame, then the device is gone
    cam.source.read = lambda: next(frames, None)
    cam._running = True
    cam._loop()
    assert "check v4l2-ctl -d /dev/video4 --get-fmt-video" in (cam.wrong_frame or "")


def test_synthetic_scene_shows_target_and_arms():
    scene = Scene(target_xy_m=(0.0, 0.35))
    src = SyntheticSource("cam_high", scene)
    src.open()
    a, _ = src.read()
    scene.target_xy_m = (0.3, 0.6)
    b, _ = src.read()
    q = np.zeros(14)
    q[0] = 1.0
    scene.joint_state = lambda: q
    c, _ = src.read()
    src.close()
    red = lambda img: (img[..., 0] > 200) & (img[..., 1] < 80)  # noqa: E731 - RGB: red is channel 0
    assert red(a).sum() > 100 and red(b).sum() > 100
    assert not np.array_equal(red(a), red(b))
    assert not np.array_equal(b, c)  # the arm moved


def _episode(path, n=4):
    rng = np.random.default_rng(0)
    data = {cam: rng.integers(0, 255, (n, 480, 640, 3), dtype=np.uint8) for cam in CAMERA_NAMES}
    with h5py.File(path, "w") as f:
        f.attrs["sim"] = True
        f.attrs["compress"] = False
        for cam, frames in data.items():
            f.create_dataset(f"observations/images/{cam}", data=frames)
        f.create_dataset("observations/qpos", data=np.zeros((n, 14)))
    return data


def test_replay_hdf5_episode(tmp_path):
    data = _episode(tmp_path / "episode_0.hdf5")
    rig = CameraRig([Camera(c, ReplaySource(tmp_path / "episode_0.hdf5", c)) for c in CAMERA_NAMES])
    rig.start()
    try:
        fs = rig.read()
        for cam in CAMERA_NAMES:
            assert any(np.array_equal(fs[cam], frame) for frame in data[cam])  # RGB as stored
    finally:
        rig.stop()


def test_replay_video_file_is_rgb(tmp_path):
    path = tmp_path / "cam.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
    bgr = np.zeros((480, 640, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR
    for _ in range(5):
        w.write(bgr)
    w.release()
    src = ReplaySource(path)
    src.open()
    try:
        img, _ = src.read()
    finally:
        src.close()
    assert img.shape == (480, 640, 3)
    assert img[..., 0].mean() > 200 and img[..., 2].mean() < 50


def test_missing_device_is_one_clear_fault():
    with pytest.raises(CameraFault, match="camera cam_high: camera device /dev/video99 not found"):
        CameraRig([Camera("cam_high", OpenCVSource("/dev/video99"))]).start()
