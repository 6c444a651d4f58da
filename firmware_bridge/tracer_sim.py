"""A simulated TRACER base on a real pseudo-terminal.

The simulator owns the master side of ``os.openpty()``; the driver opens :attr:`TracerSim.port`
(``/dev/pts/N``) with pyserial exactly as it would open ``/dev/ttyUSB0``. A thread at
``rate_hz`` reads command frames, applies the base's own 500 ms command watchdog and acceleration
limits, integrates a planar pose (x_m, y_m, yaw_rad) and writes feedback: 0x01 system state and
0x02 motion.

Fault injection: :meth:`inject_garbage`, :meth:`corrupt_next_frames` (bad checksums),
:meth:`set_silent` (no feedback), :meth:`close_port` (the device disappears),
:meth:`set_fault_bits`, :meth:`pulse_vehicle_state` (e.g. one system frame reporting an e-stop).
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
import tty
from dataclasses import dataclass

from vla_edge.firmware_bridge import tracer_protocol as tp
from vla_edge.firmware_bridge.sim_thread import SimThread


@dataclass
class TracerSimConfig:
    """Simulated base. Watchdog per the manual (500 ms); the base's own accelerations."""

    rate_hz: float = 50.0
    watchdog_s: float = 0.5
    accel_linear_mps2: float = 2.0
    accel_angular_radps2: float = 4.0
    battery_v: float = 26.4
    keep_commands: int = 6000
    """Commands kept in :attr:`TracerSim.commands` (2 min at 50 Hz); past it the oldest half is dropped,
    so a long simulated run does not grow (they took ~0.5 MB/min before)."""


class TracerSim(SimThread):
    """Thread-backed simulated base; use as a context manager or call :meth:`start`/:meth:`stop`."""

    thread_name = "tracer-sim"

    def __init__(self, config: TracerSimConfig | None = None) -> None:
        super().__init__()
        self.config = config or TracerSimConfig()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes in, bytes out
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        self._lock = threading.Lock()
        self._reader = tp.FrameReader()
        self._counter = 0
        # state
        self._target = (0.0, 0.0)
        self._velocity = (0.0, 0.0)
        self._pose = (0.0, 0.0, 0.0)
        self._last_command_s = -1e9
        self._watchdog_tripped = False
        self.watchdog_trips = 0
        self.watchdog_stop_s: float | None = None
        """Sim time (monotonic) at which the watchdog last stopped the base."""
        self.command_stamps: list[float] = []
        """Monotonic reception time of the good command frames (for rate checks; the newest
        ``keep_commands / 2`` at least)."""
        self.commands: list[tuple[float, float, float]] = []
        """``(reception time, vx_mps, wz_radps)`` of the good motion commands, oldest first (as above)."""
        self.last_command_frame: bytes | None = None
        self.bad_frames_seen = 0
        # faults
        self._silent = False
        self._corrupt = 0
        self._fault_bits = 0
        self._state_pulse = (0, 0)  # (vehicle state, system frames left)
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------
    def _release(self, ran: bool) -> None:
        """After the thread (:meth:`stop`): take in the driver's last commands, close both pty ends."""
        if ran:
            self._read_commands(time.monotonic())  # what the driver sent last (e.g. its final zero)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self._closed = True

    # -- observation -----------------------------------------------------------------------------
    def pose(self) -> tuple[float, float, float]:
        """``(x_m, y_m, yaw_rad)`` integrated since start."""
        with self._lock:
            return self._pose

    def velocity(self) -> tuple[float, float]:
        """Actual ``(vx_mps, wz_radps)``."""
        with self._lock:
            return self._velocity

    def set_pose(self, x_m: float, y_m: float, yaw_rad: float) -> None:
        with self._lock:
            self._pose = (x_m, y_m, yaw_rad)

    # -- fault injection -------------------------------------------------------------------------
    def inject_garbage(self, data: bytes = b"\x00\x13\x37\xff\x5a\x42garbage") -> None:
        """Write raw bytes between feedback frames."""
        self._write(data)

    def corrupt_next_frames(self, n: int = 3) -> None:
        """The next ``n`` feedback frames carry a wrong checksum."""
        with self._lock:
            self._corrupt += n

    def set_silent(self, silent: bool = True) -> None:
        """Stop (or resume) sending feedback; commands are still obeyed."""
        self._silent = silent

    def set_fault_bits(self, bits: int) -> None:
        """Fault bits reported in the system state frame (see ``tracer_protocol.FAULT_BITS``)."""
        self._fault_bits = bits

    def pulse_vehicle_state(self, state: int = tp.VEHICLE_ESTOP, frames: int = 1) -> None:
        """The next ``frames`` system state frames report ``state`` (then normal again)."""
        with self._lock:
            self._state_pulse = (state, frames)

    def close_port(self) -> None:
        """The device goes away: both pty ends close, the driver's reads and writes fail."""
        self.stop()

    # -- internals -------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            os.write(self._master, data)
        except (BlockingIOError, OSError):
            pass  # nobody reads the port: the pty buffer is full, drop like a UART would

    def _next_counter(self) -> int:
        c = self._counter
        self._counter = (c + 1) & 0xFF
        return c

    def _read_commands(self, now: float) -> None:
        try:
            while select.select([self._master], [], [], 0)[0]:
                chunk = os.read(self._master, 4096)
                if not chunk:
                    break
                bad = self._reader.bad_frames
                for f in self._reader.feed(chunk):
                    if f.type == tp.TYPE_COMMAND and f.id == tp.CMD_MOTION:
                        vx, wz, mode, _ = tp.decode_motion_command(f)
                        if mode == tp.CONTROL_MODE_SERIAL:
                            with self._lock:
                                self._target = (vx, wz)
                                self._last_command_s = now
                                self._watchdog_tripped = False
                                self.command_stamps.append(now)
                                self.commands.append((now, vx, wz))
                                if len(self.commands) > self.config.keep_commands:
                                    half = len(self.commands) // 2
                                    del self.commands[:half], self.command_stamps[:half]
                                self.last_command_frame = tp.build_frame(f.type, f.id, f.data, f.counter)
                self.bad_frames_seen += self._reader.bad_frames - bad
        except OSError:
            pass  # EIO: no process has the slave open right now

    def _loop(self) -> None:
        cfg = self.config
        dt = 1.0 / cfg.rate_hz
        next_t = time.monotonic()
        last = next_t
        while not self._stop.is_set():
            now = time.monotonic()
            self._read_commands(now)
            step = now - last
            last = now
            with self._lock:
                if now - self._last_command_s > cfg.watchdog_s and not self._watchdog_tripped:
                    self._watchdog_tripped = True
                    if self._target != (0.0, 0.0) or self._velocity != (0.0, 0.0):
                        self.watchdog_trips += 1
                        self.watchdog_stop_s = now
                        self._velocity = (0.0, 0.0)  # the base brakes at once on comm loss
                    self._target = (0.0, 0.0)
                tvx, twz = self._target
                vx, wz = self._velocity
                vx += max(-cfg.accel_linear_mps2 * step, min(cfg.accel_linear_mps2 * step, tvx - vx))
                wz += max(-cfg.accel_angular_radps2 * step, min(cfg.accel_angular_radps2 * step, twz - wz))
                self._velocity = (vx, wz)
                x, y, yaw = self._pose
                self._pose = (
                    x + vx * math.cos(yaw) * step,
                    y + vx * math.sin(yaw) * step,
                    math.remainder(yaw + wz * step, math.tau),
                )
                corrupt = self._corrupt > 0
                if corrupt:
                    self._corrupt -= 1
                state, left = self._state_pulse
                vehicle_state = state if left > 0 else 0
                if left > 0 and not self._silent:
                    self._state_pulse = (state, left - 1)
            if not self._silent:
                bits = self._fault_bits | (0x08 if self._watchdog_tripped and self._last_command_s > 0 else 0)
                frames = tp.motion_feedback(vx, wz, self._next_counter()) + tp.system_feedback(
                    vehicle_state, tp.CONTROL_MODE_SERIAL, cfg.battery_v, bits, self._next_counter()
                )
                if corrupt:
                    frames = frames[:12] + bytes([frames[12] ^ 0xFF]) + frames[13:]
                self._write(frames)
            next_t += dt
            self._stop.wait(max(0.0, next_t - time.monotonic()))
