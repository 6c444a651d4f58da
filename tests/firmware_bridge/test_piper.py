"""The real piper_sdk drives the Piper simulator over a python-can virtual bus."""

from __future__ import annotations

import math
import struct
import time
import uuid

import can
import numpy as np
import pytest
from conftest import wait_until
from vla_edge.firmware_bridge.piper_arm import ArmFault, PiperArm, PiperArmConfig, m_to_um, rad_to_mdeg
from vla_edge.firmware_bridge.piper_bus import open_interface
from vla_edge.firmware_bridge.piper_sim import PiperSim, PiperSimConfig

Q0 = (0.0, 0.8, -1.0, 0.0, 0.2, 0.0)

@pytest.fixture
def channel():
    # piper_sdk caches one interface per bus name for the process: a fresh name per test.
    return f"piper-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sim(channel):
    s = PiperSim(PiperSimConfig(channel=channel, initial_q_rad=Q0)).start()
    yield s
    s.stop()


@pytest.fixture
def arm(sim, channel):
    a = PiperArm(PiperArmConfig(can_name=channel, bustype="virtual"))
    a.connect()
    yield a
    a.disconnect()


@pytest.fixture
def listener(channel):
    bus = can.Bus(interface="virtual", channel=channel)
    yield bus
    bus.shutdown()


def drain(bus, seconds=0.1):
    out, deadline = [], time.monotonic() + seconds
    while (m := bus.recv(timeout=max(0.0, deadline - time.monotonic()))) is not None:
        out.append(m)
    return out


def test_units_match_contract():
    assert rad_to_mdeg(math.radians(1.0)) == 1000
    assert rad_to_mdeg(-math.radians(90.0)) == -90000
    assert m_to_um(0.07) == 70000
    assert m_to_um(0.0123456) == 12346


def test_connect_enables_and_holds(arm, sim):
    s = arm.read_state()
    assert all(s.enabled) and sim.enabled.all()
    assert arm.firmware == "S-V1.6-3"
    np.testing.assert_allclose(s.q_rad, Q0, atol=1e-5)  # held where it rested: no jump on enable
    assert time.monotonic() - s.joint_stamp_s < 0.5
    assert arm.faults() == []


def test_move_and_read_back(arm, sim):
    target = np.array([0.3, 1.2, -1.5, 0.4, -0.3, 1.0])
    arm.send_targets(target, 0.035)
    def arrived():
        q = arm.read_state().qpos
        return np.allclose(q[:6], target, atol=1e-4) and abs(q[6] - 0.035) <= 1e-5

    assert wait_until(arrived)
    s = arm.read_state()
    assert s.gripper_m == pytest.approx(0.035, abs=1e-5)
    np.testing.assert_allclose(sim.joint_state(), np.append(target, 0.035), atol=1e-4)


def test_targets_clamped_to_limits(arm, sim):
    arm.send_targets([5.0, -1.0, 1.0, 0.0, 0.0, 0.0], 0.5)
    assert wait_until(lambda: abs(sim.joint_state()[0] - 2.6179) < 1e-4 and abs(sim.joint_state()[6] - 0.07) <= 1e-5,
                      timeout_s=5.0)
    assert sim.status == 0 and arm.faults() == []
    assert sim.joint_state()[6] == pytest.approx(0.07, abs=1e-5)


def test_frames_on_the_bus_equal_contract_bytes(arm, listener):
    drain(listener, 0.02)
    q = [0.1, 0.5, -0.25, 1.0, -1.0, 2.0]
    arm.send_targets(q, 0.05)
    frames = drain(listener, 0.1)
    sent = {m.arbitration_id: bytes(m.data) for m in frames if m.arbitration_id < 0x200}
    mdeg = [round(v * 180_000 / math.pi) for v in q]
    assert sent[0x151] == bytes([0x01, 0x01, 100, 0x00, 0, 0, 0, 0])
    assert sent[0x155] == struct.pack(">ii", mdeg[0], mdeg[1])
    assert sent[0x156] == struct.pack(">ii", mdeg[2], mdeg[3])
    assert sent[0x157] == struct.pack(">ii", mdeg[4], mdeg[5])
    assert sent[0x159] == struct.pack(">iHBB", 50_000, 1000, 0x01, 0x00)
    arm.estop()
    frames = drain(listener, 0.05)
    assert bytes([0x01, 0, 0, 0, 0, 0, 0, 0]) in [bytes(m.data) for m in frames if m.arbitration_id == 0x150]
    # Feedback from the simulator: joints big-endian int32 0.001 deg, driver state enable bit 6.
    fb = {m.arbitration_id: bytes(m.data) for m in drain(listener, 0.05)}
    j1, j2 = struct.unpack(">ii", fb[0x2A5])
    assert abs(j1 - mdeg[0]) < 5000 and abs(j2 - mdeg[1]) < 5000
    assert fb[0x2A1][1] == 0x01  # e-stop
    assert fb[0x261][5] & 0x40


def test_estop_and_resume(arm, sim, listener):
    arm.estop()
    assert wait_until(lambda: arm.read_state().status == 0x01)  # the arm reports its e-stop
    assert arm.faults() == []  # ours: expected, not a fault (issue 12 item 4)
    before = sim.joint_state()
    arm.send_targets([1.0, 1.5, -0.5, 0.0, 0.0, 0.0], 0.05)  # ignored while e-stopped
    time.sleep(0.2)
    moved = sim.joint_state() - before
    assert np.all(np.abs(moved[:6]) < 0.05)  # only the slow damped sink
    drain(listener, 0.01)
    arm.resume()
    frames = drain(listener, 0.05)
    ids = [(m.arbitration_id, bytes(m.data)[:2]) for m in frames]
    assert (0x150, b"\x02\x00") in ids
    assert sum(1 for i, d in ids if i == 0x471 and d == b"\x07\x02") >= 2  # reset needs two enables
    assert all(arm.read_state().enabled)
    assert wait_until(lambda: arm.faults() == [])
    arm.send_targets([0.2, 1.0, -1.0, 0.0, 0.0, 0.0], 0.01)
    assert wait_until(lambda: abs(arm.read_state().q_rad[0] - 0.2) < 1e-3)


def test_silent_bus_detected_within_100ms(arm, sim):
    assert arm.faults() == []
    sim.set_silent(True)
    t0 = time.monotonic()
    assert wait_until(lambda: any("silent bus" in f for f in arm.faults()), timeout_s=1.0, every_s=0.002)
    assert time.monotonic() - t0 < 0.1
    sim.set_silent(False)
    assert wait_until(lambda: arm.faults() == [])


def test_late_answers_and_error_codes(arm, sim):
    sim.set_latency(0.3)
    assert wait_until(lambda: any("silent bus" in f for f in arm.faults()), timeout_s=1.0)
    assert wait_until(lambda: arm.faults() == [], timeout_s=2.0)  # late but flowing again
    sim.set_latency(0.0)
    sim.set_error(0x05, err_code=0b10)
    assert wait_until(lambda: any("joint communication error (J2)" in f for f in arm.faults()))
    sim.set_error(None)
    assert wait_until(lambda: arm.faults() == [])


def test_sim_refuses_targets_beyond_limits_with_status_4(sim, channel):
    sdk = open_interface(channel, "virtual")
    sdk.ConnectPort()
    try:
        assert wait_until(lambda: sdk.GetArmJointMsgs().time_stamp > 0)
        assert wait_until(lambda: (sdk.EnableArm(7), all(sdk.GetArmEnableStatus()))[1])
        sdk.ModeCtrl(0x01, 0x01, 50, 0x00)
        q0_mdeg = [rad_to_mdeg(v) for v in Q0]
        sdk.JointCtrl(q0_mdeg[0], 200_000, *q0_mdeg[2:])  # J2 = 200 deg > 180 deg
        assert wait_until(lambda: sdk.GetArmStatus().arm_status.arm_status == 0x04)
        assert sdk.GetArmStatus().arm_status.err_status.joint_2_angle_limit
        np.testing.assert_allclose(sim.joint_state()[:6], Q0, atol=1e-4)  # refused, not moved
        sdk.JointCtrl(*q0_mdeg)
        assert wait_until(lambda: sdk.GetArmStatus().arm_status.arm_status == 0x00)
    finally:
        sdk.DisconnectPort()


def test_disconnect_never_disables(sim, channel, listener):
    a = PiperArm(PiperArmConfig(can_name=channel, bustype="virtual"))
    a.connect()
    drain(listener, 0.01)
    a.disconnect()
    frames = drain(listener, 0.05)
    assert not [m for m in frames if m.arbitration_id == 0x471 and m.data[1] == 0x01]
    time.sleep(0.1)
    assert sim.enabled.all()
    np.testing.assert_allclose(sim.joint_state()[:6], Q0, atol=1e-4)


def test_missing_interface_is_one_clear_fault():
    with pytest.raises(ArmFault, match="CAN interface can_nosuch not found"):
        PiperArm(PiperArmConfig(can_name="can_nosuch")).connect()


def test_silent_arm_fails_connect(channel):
    with pytest.raises(ArmFault, match="no feedback"):
        PiperArm(PiperArmConfig(can_name=channel, bustype="virtual", connect_timeout_s=0.2)).connect()


def test_no_bus_on_the_channel_piles_up_unread_frames(arm, sim, channel):
    """piper_sdk opens a send-only bus on Linux that receives every frame and is never read (issue 12:
    memory grew 41 MB/min). Every queue on the virtual channel must stay short over a moving run."""
    from can.interfaces import virtual

    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # ~300 feedback ticks of ~10 frames each
        arm.send_targets(np.asarray(Q0) + 0.05 * math.sin(time.monotonic()), 0.03)
        time.sleep(0.02)
    with virtual.channels_lock:
        backlog = [q.qsize() for q in virtual.channels[channel]]
    assert max(backlog) < 200, backlog  # was ~2000 after 1.5 s: one queue nobody read
    assert len(backlog) == 2  # the simulator and the SDK's one bus, nothing else
    assert arm.faults() == []


def test_a_failed_send_is_a_fault_at_once_with_the_interface_and_the_fix(arm, channel, sim, capfd):
    """The bus goes down under piper_sdk (its python-can bus is shut): the very next command raises one
    ArmFault naming the interface and the fix; piper_sdk's own "[ERROR] ... send failed" lines never
    reach the terminal; the arm keeps the last target it did receive; holds on the dead bus raise no more."""
    arm.send_targets(Q0, 0.01)
    held = arm.last_target
    arm._sdk.GetCanBus().send_bus.shutdown()
    with pytest.raises(ArmFault) as e:
        arm.send_targets(np.array(Q0) + 0.01, 0.01)
    line = str(e.value)
    assert line.startswith(f"arm {channel}: CAN send failed (frame 0x151: Cannot operate on a closed bus)"), line
    assert f"sudo ip link set {channel} up type can bitrate 1000000" in line
    np.testing.assert_allclose(arm.last_target, held)  # not sent: not what the arm holds
    assert arm.faults() == [line]
    arm.hold()  # the arm keeps its last target by itself: counted, not raised again
    assert arm.faults() == [line]
    np.testing.assert_allclose(sim.target_rad, held[:6], atol=1e-5)
    out, err = capfd.readouterr()
    assert "send failed" not in out + err and "PIPER" not in out + err, out + err


def test_a_full_transmit_queue_says_what_to_check():
    from vla_edge.firmware_bridge.piper_bus import send_fault

    line = send_fault("can_left", 0x155, "Failed to transmit: [Errno 105] No buffer space available")
    assert line.startswith("arm can_left: CAN send failed (frame 0x155: ") and "is the arm powered" in line
    assert "ip -details -statistics link show can_left" in line


def test_connecting_shows_no_third_party_warning(sim, channel):
    """piper_sdk passes python-can's deprecated ``bustype``: silenced where the bus is made, nowhere else."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = PiperArm(PiperArmConfig(can_name=channel, bustype="virtual"))
        a.connect()
        a.disconnect()
    assert [str(w.message) for w in seen] == []
