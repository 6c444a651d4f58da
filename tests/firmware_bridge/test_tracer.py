"""The TRACER driver (pyserial) against the simulator on a real pseudo-terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import serial
from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from vla_edge.firmware_bridge import tracer_protocol as tp
from vla_edge.firmware_bridge.tracer_base import BaseFault, TracerBase, TracerBaseConfig
from vla_edge.firmware_bridge.tracer_sim import TracerSim

MANUAL_EXAMPLE = bytes.fromhex("5A A5 0A 55 01 02 00 0A 00 00 00 00 6B")


@pytest.fixture
def sim():
    s = TracerSim().start()
    yield s
    s.stop()


@pytest.fixture
def base(sim):
    b = TracerBase(TracerBaseConfig(port=sim.port, max_linear_accel_mps2=2.0))
    b.connect()
    yield b
    b.disconnect()


def test_manual_example_frame():
    assert tp.motion_command(0.15, 0.0, counter=0) == MANUAL_EXAMPLE
    f = tp.parse_frame(MANUAL_EXAMPLE)
    assert (f.type, f.id, f.counter) == (0x55, 0x01, 0)
    vx, wz, mode, fault_clear = tp.decode_motion_command(f)
    assert (vx, wz, mode, fault_clear) == (pytest.approx(0.15), 0.0, 0x02, 0)


def test_bad_frames_are_rejected():
    with pytest.raises(tp.FrameError, match="checksum"):
        tp.parse_frame(MANUAL_EXAMPLE[:12] + b"\x00")
    with pytest.raises(tp.FrameError, match="12 bytes"):
        tp.parse_frame(MANUAL_EXAMPLE[:12])
    r = tp.FrameReader()
    frames = r.feed(b"\x01\x02" + MANUAL_EXAMPLE[:12] + b"\x00" + MANUAL_EXAMPLE)
    assert [f.id for f in frames] == [1] and r.bad_frames == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=20), st.just(MANUAL_EXAMPLE)), max_size=12), st.integers(1, 13))
def test_reader_survives_any_stream(chunks, split):
    stream = b"".join(chunks)
    r = tp.FrameReader()
    frames = []
    for i in range(0, len(stream), split):
        frames += r.feed(stream[i : i + split])
    assert all(f.counter == 0 and f.id == 1 for f in frames if f.type == 0x55)
    assert len(frames) >= sum(c == MANUAL_EXAMPLE for c in chunks) - r.bad_frames


def test_manual_example_reaches_the_simulated_base(sim):
    with serial.Serial(sim.port, 115200, timeout=0.1) as port:
        for _ in range(20):  # the base needs a stream, not one frame
            port.write(MANUAL_EXAMPLE)
            time.sleep(0.02)
        assert sim.last_command_frame == MANUAL_EXAMPLE
        assert sim.velocity()[0] == pytest.approx(0.15, abs=1e-6)


def test_driver_streams_at_least_20hz_and_moves_the_base(base, sim):
    n0, t0 = len(sim.command_stamps), time.monotonic()
    for _ in range(20):
        base.send_velocity(0.15, 0.0)
        time.sleep(0.05)
    stamps = sim.command_stamps[n0:]
    assert len(stamps) / (time.monotonic() - t0) >= 20.0
    assert max(b - a for a, b in zip(stamps, stamps[1:], strict=False)) < 0.5
    frame = sim.last_command_frame
    assert frame[:11] == MANUAL_EXAMPLE[:11]  # same bytes as the manual, only the counter differs
    assert frame[12] == tp.checksum(frame[:12])
    s = base.read_state()
    assert s.vx_mps == pytest.approx(0.15, abs=0.01) and time.monotonic() - s.motion_stamp_s < 0.2
    assert sim.pose()[0] > 0.05
    assert base.faults() == []


def test_velocity_is_clamped_and_ramped(sim):
    b = TracerBase(TracerBaseConfig(port=sim.port, max_linear_mps=0.5, max_linear_accel_mps2=0.5))
    b.connect()
    try:
        b.send_velocity(5.0, -9.0)
        time.sleep(0.1)
        s = b.read_state()
        assert 0.0 < s.command_vx_mps < 0.2  # still ramping at 0.5 m/s^2
        assert -0.7853 <= s.command_wz_radps < 0.0
        assert wait_until(lambda: (b.send_velocity(5.0, 0.0), b.read_state().command_vx_mps)[1] == 0.5)
    finally:
        b.disconnect()
    # The last frames before the port closed command zero.
    assert wait_until(lambda: tp.decode_motion_command(tp.parse_frame(sim.last_command_frame))[:2] == (0.0, 0.0))


def test_stale_command_decays_to_zero(base, sim):
    base.send_velocity(0.3, 0.0)
    assert wait_until(lambda: any("no velocity command" in f for f in base.faults()), timeout_s=2.0)
    assert wait_until(lambda: sim.velocity() == (0.0, 0.0), timeout_s=2.0)
    assert sim.watchdog_trips == 0  # the driver stopped it, not the base's watchdog


def test_killed_driver_makes_the_base_stop_within_500ms(sim):
    code = textwrap.dedent(f"""
        import time
        from vla_edge.firmware_bridge.tracer_base import TracerBase, TracerBaseConfig
        b = TracerBase(TracerBaseConfig(port={sim.port!r}, max_linear_accel_mps2=5.0))
        b.connect()
        print("connected", flush=True)
        while True:
            b.send_velocity(0.3, 0.0)
            time.sleep(0.02)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        assert wait_until(lambda: sim.velocity()[0] > 0.25, timeout_s=5.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        assert wait_until(lambda: sim.velocity() == (0.0, 0.0), timeout_s=3.0)
        last_command = sim.command_stamps[-1]
        assert sim.watchdog_trips == 1
        # The simulated base ticks at 50 Hz: it stops at most one tick after 500 ms of silence.
        assert 0.5 <= sim.watchdog_stop_s - last_command <= 0.5 + 0.02 + 0.05
    finally:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.parametrize(
    "inject, expected",
    [
        (lambda s: s.corrupt_next_frames(100), "sustained bad input"),
        (lambda s: [s.inject_garbage(b"\x00") or time.sleep(0.03) for _ in range(20)], "sustained bad input"),
        (lambda s: s.set_silent(True), "no feedback"),
        (lambda s: s.set_fault_bits(0b1), "battery under-voltage fault"),
        (lambda s: s.close_port(), "link lost"),
    ],
    ids=["bad-checksums", "stray-bytes-every-30ms", "silence", "fault-bits", "closed-port"],
)
def test_every_injected_fault_is_reported(base, sim, inject, expected):
    assert wait_until(lambda: base.faults() == [])
    inject(sim)
    assert wait_until(lambda: any(expected in f for f in base.faults()), timeout_s=2.0), base.faults()
    base.read_state()  # still answers, nothing raised from the threads
    base.send_velocity(0.1, 0.0)


def test_missing_port_is_one_clear_fault():
    with pytest.raises(BaseFault, match="serial port /dev/nonexistent-tty not found"):
        TracerBase(TracerBaseConfig(port="/dev/nonexistent-tty")).connect()


def test_silent_base_fails_connect(sim):
    sim.set_silent(True)
    with pytest.raises(BaseFault, match="no feedback"):
        TracerBase(TracerBaseConfig(port=sim.port, connect_timeout_s=0.3)).connect()


def test_reader_counts_one_incident_per_stretch_of_bad_input():
    good = tp.motion_feedback(0.1, 0.0, counter=1)
    r = tp.FrameReader()
    corrupt = good[:12] + bytes([good[12] ^ 0xFF])
    frames = r.feed(good + b"\x00" + good + b"\x5a" + good + corrupt + good + b"garbage\x5a\xa5" + good)
    assert len(frames) == 5  # every intact frame survives its neighbours
    assert r.incidents == 4 and r.bad_frames == 1 + 1  # the corrupt frame, and "5A A5" + 11 bytes of a good one
    assert r.skipped_bytes > 0


@pytest.mark.parametrize(
    "inject",
    [lambda s: s.inject_garbage(b"\x00"), lambda s: s.inject_garbage(b"\x5a"), lambda s: s.inject_garbage(),
     lambda s: s.corrupt_next_frames(1), lambda s: s.corrupt_next_frames(3)],
    ids=["one-stray-byte", "half-a-header", "garbage-burst", "one-corrupt-frame", "three-corrupt-frames"],
)
def test_isolated_bad_input_is_counted_and_the_link_stays_healthy(base, sim, inject):
    """Issue 12: one stray byte on the serial line ended the run. Now: resync, count, no fault."""
    assert wait_until(lambda: base.faults() == [])
    before = base.read_state().bad_input_incidents
    inject(sim)
    assert wait_until(lambda: base.read_state().bad_input_incidents > before, timeout_s=2.0)
    deadline = time.monotonic() + base.config.bad_input_window_s + 0.3
    while time.monotonic() < deadline:  # through a whole counting window
        assert base.faults() == []
        time.sleep(0.01)
    s = base.read_state()
    assert s.bad_frames + s.skipped_bytes > 0 and time.monotonic() - s.motion_stamp_s < 0.2  # still hearing it


def test_sustained_corruption_faults_and_clears_after_the_window(base, sim):
    sim.corrupt_next_frames(40)  # 0.8 s of corrupt motion frames among good system frames
    assert wait_until(lambda: any("sustained bad input" in f for f in base.faults()), timeout_s=2.0), base.faults()
    assert wait_until(lambda: base.faults() == [], timeout_s=3.0), base.faults()  # a window, not a latch


def test_one_frame_base_estop_is_latched_until_cleared(base, sim):
    """A single system frame with vehicle state e-stop lands between two 30 Hz ticks: it must not be missed."""
    assert wait_until(lambda: base.faults() == [])
    sim.pulse_vehicle_state(tp.VEHICLE_ESTOP, frames=1)
    assert wait_until(lambda: base.read_state().estop_latched, timeout_s=2.0)
    time.sleep(0.2)  # ten more system frames say "normal"
    s = base.read_state()
    assert s.vehicle_state == 0 and s.estop_latched
    assert any("e-stop reported by the base (latched)" in f for f in base.faults()), base.faults()
    assert base.clear_estop() and base.faults() == []

    sim.pulse_vehicle_state(tp.VEHICLE_ESTOP, frames=10_000)  # held: clearing is refused
    assert wait_until(lambda: base.read_state().vehicle_state == tp.VEHICLE_ESTOP, timeout_s=2.0)
    assert not base.clear_estop() and any("e-stop" in f for f in base.faults())
    sim.pulse_vehicle_state(0, 0)
    assert wait_until(lambda: base.read_state().vehicle_state == 0, timeout_s=2.0)
    assert base.clear_estop() and wait_until(lambda: base.faults() == [])


def test_simulator_keeps_a_bounded_command_history():
    """A long simulated run must not grow: the simulator keeps only its newest commands."""
    from vla_edge.firmware_bridge.tracer_sim import TracerSimConfig

    with TracerSim(TracerSimConfig(keep_commands=20)) as sim, serial.Serial(sim.port, 115200, timeout=0.1) as port:
        for i in range(60):
            port.write(tp.motion_command(0.15, 0.0, counter=i))
            time.sleep(0.005)
        assert wait_until(lambda: sim.last_command_frame == tp.motion_command(0.15, 0.0, counter=59))
        assert 10 <= len(sim.commands) <= 20 and len(sim.command_stamps) == len(sim.commands)
        assert sim.commands[-1][1] == pytest.approx(0.15)
