"""Robot profiles, the Robot facade on the simulated Cobot Magic, and ``vla-edge check``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import wait_until
from vla_edge import VlaEdgeError
from vla_edge.edge.profile import load_profile
from vla_edge.edge.robot import Robot

pytestmark = pytest.mark.filterwarnings("ignore:The 'bustype' argument is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def robot():
    r = Robot(load_profile("sim"))
    r.connect()
    yield r
    r.disconnect()


def test_profiles_load():
    hw = load_profile("cobot_magic")
    assert hw.sim is None
    assert (hw.arms["left"].can_name, hw.arms["right"].can_name) == ("can_left", "can_right")
    assert hw.base.port == "/dev/ttyUSB0" and hw.cameras.devices["cam_high"] == "/dev/video0"
    sim = load_profile("sim")
    assert sim.sim is not None and sim.arms["left"].bustype == "virtual"


def test_bad_profiles_are_clear_errors(tmp_path):
    with pytest.raises(VlaEdgeError, match="unknown robot profile 'nosuch'"):
        load_profile("nosuch")
    text = (load_profile.__globals__["PROFILE_DIR"] / "cobot_magic.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("joint_hi = [2.6179,", "joint_hi = [3.5,"))
    with pytest.raises(VlaEdgeError, match="outside the Piper's published limits"):
        load_profile(bad)


def test_state_and_frames(robot):
    s = robot.read_state()
    assert s.qpos.shape == (14,) and s.qpos.dtype == np.float64
    np.testing.assert_allclose(s.qpos, robot.sim.joint_state(), atol=1e-3)
    assert s.enabled and not s.estopped
    assert all(time.monotonic() - t < 0.5 for t in s.stamps_s)
    fs = robot.read_frames()
    assert list(fs.images) == robot.camera_names == ["cam_high", "cam_left_wrist", "cam_right_wrist"]
    assert fs["cam_high"].shape == (480, 640, 3) and fs.skew_s >= 0.0
    assert robot.faults() == []


def test_joint_targets_and_base_velocity(robot):
    q = robot.read_state().qpos.copy()
    q[0], q[7], q[6] = 0.4, -0.4, 0.05
    robot.send_joint_targets(q)
    assert wait_until(lambda: np.allclose(robot.read_state().qpos, q, atol=1e-3))
    x0 = robot.base_pose()[0]
    for _ in range(15):
        robot.send_base_velocity(0.2, 0.0)
        time.sleep(0.04)
    assert robot.base_pose()[0] > x0 + 0.02
    robot.hold()
    assert wait_until(lambda: robot.sim.base.velocity() == (0.0, 0.0))
    with pytest.raises(VlaEdgeError):
        robot.send_joint_targets(np.full(14, np.nan))


def test_software_estop_ignores_commands_until_resume(robot):
    before = robot.read_state().qpos.copy()
    robot.estop()
    assert robot.estopped
    target = before.copy()
    target[0] += 0.3
    robot.send_joint_targets(target)
    robot.send_base_velocity(0.3, 0.0)
    time.sleep(0.15)
    np.testing.assert_allclose(robot.read_state().qpos, before, atol=1e-3)
    assert robot.sim.base.velocity() == (0.0, 0.0)
    robot.resume()
    robot.send_joint_targets(target)
    assert wait_until(lambda: abs(robot.read_state().qpos[0] - target[0]) < 1e-3)


def test_firmware_estop_and_resume(robot):
    robot.estop(firmware=True)
    assert wait_until(lambda: all(a.read_state().status == 0x01 for a in robot.arms.values()))
    assert robot.faults() == []  # our own e-stop: expected while latched, not a fault (issue 12 item 4)
    robot.resume()
    assert wait_until(lambda: robot.faults() == [])
    assert robot.read_state().enabled


def test_faults_from_every_device(robot):
    robot.sim.cameras["cam_right_wrist"].stall()
    robot.sim.arms["left"].set_silent()
    assert wait_until(lambda: len(robot.faults()) >= 2)
    text = " | ".join(robot.faults())
    assert "cam_right_wrist stale" in text and "silent bus" in text
    robot.sim.cameras["cam_right_wrist"].stall(False)
    robot.sim.arms["left"].set_silent(False)
    assert wait_until(lambda: robot.faults() == [])


def test_disconnect_is_safe():
    r = Robot(load_profile("sim"))
    r.connect()
    sims = r.sim
    for _ in range(10):
        r.send_base_velocity(0.3, 0.0)
        time.sleep(0.03)
    r.disconnect()
    assert all(s.enabled.all() for s in sims.arms.values())  # arms held, never dropped
    assert sims.base.last_command_frame[7:9] == b"\x00\x00"  # the driver's last word: zero


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vla_edge.edge.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_check_sim():
    r = _cli("check", "--robot", "sim", "--seconds", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    for word in ("S-V1.6-3", "TRACER", "cam_high", "fps", "all 6 devices found"):
        assert word in r.stdout
    assert r.stdout.count("found") == 7  # six rows and the verdict
    # what the e-stop threads get here, said as the run says it (a thread asks in the same way)
    from vla_edge.edge.estop.latch import PRIORITY_WORDS

    [line] = [x for x in r.stdout.splitlines() if x.startswith("e-stop threads:")]
    granted = [k for k, words in PRIORITY_WORDS.items() if words in line]
    assert len(granted) == 1 and ("rtprio" in line) == (granted[0] != "fifo"), line


@pytest.mark.parametrize("columns", [80, 250])
def test_check_cobot_magic_without_hardware_reports_every_device(columns):
    """One row per device, and one line per fix below the table: at 80 columns too, every fix command is whole
    on its own line (issue 23: they wrapped mid-word inside a table column)."""
    r = subprocess.run([sys.executable, "-m", "vla_edge.edge.cli", "check", "--robot", "cobot_magic"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    rows = [line for line in r.stdout.splitlines() if "missing" in line]
    fixes = r.stdout.split("how to fix:\n", 1)[1].splitlines()
    for device, fix in (("arm left", "sudo ip link set can_left up type can bitrate 1000000"),
                        ("arm right", "sudo ip link set can_right up type can bitrate 1000000"),
                        ("TRACER base", "plug in the USB-RS232 cable (ls /dev/ttyUSB*)"),
                        ("camera cam_high", "(v4l2-ctl --list-devices)"),
                        ("camera cam_left_wrist", "sudo usermod -aG video $USER"),
                        ("camera cam_right_wrist", "sudo usermod -aG video $USER")):
        assert any(device in line for line in rows), (device, r.stdout)
        assert any(line.startswith(f"  {device}: ") and fix in line for line in fixes), (device, r.stdout)
    assert "6 of 6 devices missing" in r.stdout
