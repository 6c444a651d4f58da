"""A simulated AgileX Piper arm: a peer on a python-can ``virtual`` bus.

It answers the frames of CONTRACT section 2 the way the arm's firmware does, so the real
``piper_sdk`` can drive it::

    sim = PiperSim(PiperSimConfig(channel="sim_left")).start()
    piper = C_PiperInterface_V2("sim_left", can_auto_init=False)
    piper.CreateCanBus("sim_left", bustype="virtual", judge_flag=False)
    piper.ConnectPort()

Received: 0x471 enable/disable (per motor, 7 = all), 0x151 mode, 0x155..0x157 joint targets
(0.001 deg), 0x159 gripper (0.001 mm), 0x150 e-stop (0x01) / reset (0x02), 0x4AF firmware query.
Sent every ``1 / feedback_hz`` s: 0x2A1 status, 0x2A5..0x2A7 joints, 0x2A8 gripper; 0x261..0x266
driver state (byte 5 bit 6 = enabled) every ``driver_state_every`` ticks. All big-endian.

Behaviour: enabled joints follow targets at ``joint_speed_radps * speed% / 100`` (a plain rate
limit); targets outside the published limits are refused with status 0x04 and the limit bits;
e-stop (0x150 0x01) ignores targets and lets the arm sink slowly; reset (0x150 0x02) cuts power
(the arm drops toward its rest pose) and needs two enable frames before it obeys again; disabled
motors also fall toward rest (at power-on they rest on their brakes). Rest pose: all joints 0 (inside every limit).

Faults: :meth:`set_silent` (stop answering), :meth:`set_latency` (answer late),
:meth:`set_error` (report an arm status code and error bits).
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from dataclasses import dataclass

import can
import numpy as np
from vla_edge.firmware_bridge.piper_arm import MDEG_PER_RAD, PIPER_JOINT_HI, PIPER_JOINT_LO, UM_PER_M
from vla_edge.firmware_bridge.sim_thread import SimThread

STATUS_OK = 0x00
STATUS_ESTOP = 0x01
STATUS_LIMIT = 0x04
ENABLE_BIT = 1 << 6


@dataclass
class PiperSimConfig:
    """One simulated arm on virtual CAN channel ``channel``."""

    channel: str = "piper_sim"
    feedback_hz: float = 200.0
    driver_state_every: int = 4
    """Send the six 0x261..0x266 driver-state frames every N feedback ticks (4: 50 Hz)."""
    joint_speed_radps: float = 3.0
    gripper_speed_mps: float = 0.1
    sink_speed_radps: float = 0.05
    """E-stop: the damped arm sinks toward rest this fast."""
    drop_speed_radps: float = 1.5
    """Unpowered (disabled or reset) joints fall toward rest this fast."""
    firmware: str = "S-V1.6-3"
    initial_q_rad: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _move(current: np.ndarray, target: np.ndarray, max_step: float) -> np.ndarray:
    return current + np.clip(target - current, -max_step, max_step)


class VirtualCanNode(SimThread):
    """A simulated CAN device: one python-can virtual bus on ``config.channel``, opened by :meth:`start`
    and shut down by :meth:`stop`, and the :class:`SimThread` running ``self._loop()`` on it.
    Subclasses set ``config`` and call ``super().__init__()``."""

    thread_name = "can-sim"

    def __init__(self) -> None:
        super().__init__()
        self._bus: can.BusABC | None = None

    def _thread_label(self) -> str:
        return f"{self.thread_name} {self.config.channel}"

    def _open(self) -> None:
        self._bus = can.Bus(interface="virtual", channel=self.config.channel, receive_own_messages=False)

    def _release(self, ran: bool) -> None:
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None


class PiperSim(VirtualCanNode):
    """The simulated arm. Thread-backed; use as a context manager or :meth:`start`/:meth:`stop`."""

    thread_name = "piper-sim"

    def __init__(self, config: PiperSimConfig | None = None) -> None:
        super().__init__()
        self.config = config or PiperSimConfig()
        self._lo = np.asarray(PIPER_JOINT_LO[:6])
        self._hi = np.asarray(PIPER_JOINT_HI[:6])
        self._lock = threading.Lock()
        # arm state
        self.q_rad = np.asarray(self.config.initial_q_rad, dtype=np.float64)
        self.target_rad = self.q_rad.copy()
        self.gripper_m = 0.0
        self.gripper_target_m = 0.0
        self.gripper_enabled = False
        self.enabled = np.zeros(6, dtype=bool)
        self.limp = np.zeros(6, dtype=bool)
        """Joints whose power was cut by a disable or reset frame: they fall toward rest."""
        self.ctrl_mode = 0x00
        self.move_mode = 0x00
        self.speed_pct = 0
        self.mit_mode = 0x00
        self.estop = False
        self.status = STATUS_OK
        self.err_code = 0
        self._enables_needed = 1
        # faults
        self._silent = False
        self._latency_s = 0.0
        self._forced_error: tuple[int, int] | None = None
        self._outbox: collections.deque[tuple[float, can.Message]] = collections.deque()
        self._pending_firmware = False
        self.frames_received: collections.Counter[int] = collections.Counter()

    # -- observation -----------------------------------------------------------------------------
    def joint_state(self) -> np.ndarray:
        """``(7,)`` float64: j1..j6 in rad, gripper in m (the simulated truth, not the feedback)."""
        with self._lock:
            return np.append(self.q_rad, self.gripper_m)

    # -- fault injection -------------------------------------------------------------------------
    def set_silent(self, silent: bool = True) -> None:
        """Stop answering: no feedback frames at all (commands are still obeyed)."""
        self._silent = silent

    def set_latency(self, latency_s: float) -> None:
        """Deliver every feedback frame ``latency_s`` late."""
        self._latency_s = max(0.0, latency_s)

    def set_error(self, status: int | None, err_code: int = 0) -> None:
        """Report ``status`` (e.g. 0x05 joint communication error) and ``err_code`` bits; None clears."""
        with self._lock:
            self._forced_error = None if status is None else (status, err_code)

    # -- frame handling --------------------------------------------------------------------------
    def _handle(self, msg: can.Message) -> None:
        aid, d = msg.arbitration_id, bytes(msg.data)
        self.frames_received[aid] += 1
        if aid == 0x471:  # enable / disable
            motor, flag = d[0], d[1]
            idx = list(range(6)) if motor in (7, 0xFF) else [motor - 1] if 1 <= motor <= 6 else []
            if flag == 0x02:
                self._enables_needed = max(0, self._enables_needed - 1)
                if self._enables_needed == 0 and not self.estop:
                    for i in idx:
                        if not self.enabled[i]:
                            self.target_rad[i] = self.q_rad[i]  # a motor that wakes up holds where it is
                        self.enabled[i] = True
                        self.limp[i] = False
                    if motor in (7, 0xFF):
                        self.gripper_enabled = True
                        self.gripper_target_m = self.gripper_m
            elif flag == 0x01:
                self.enabled[idx] = False
                self.limp[idx] = True
                if motor in (7, 0xFF):
                    self.gripper_enabled = False
        elif aid == 0x151:
            self.ctrl_mode, self.move_mode, self.speed_pct, self.mit_mode = d[0], d[1], min(d[2], 100), d[3]
        elif aid == 0x150:
            if d[0] == 0x01:
                self.estop = True
                self.status = STATUS_ESTOP
            elif d[0] == 0x02:  # reset: power cut, errors cleared, enable needed twice
                self.estop = False
                self.status = STATUS_OK
                self.err_code = 0
                self.enabled[:] = False
                self.limp[:] = True
                self.gripper_enabled = False
                self.ctrl_mode = 0x00
                self._enables_needed = 2
        elif aid in (0x155, 0x156, 0x157):
            if self.estop or self.ctrl_mode != 0x01 or self.move_mode != 0x01 or self.mit_mode != 0x00:
                return
            i = 2 * (aid - 0x155)
            a, b = struct.unpack(">ii", d)
            pair = np.array([a, b]) / MDEG_PER_RAD
            lo, hi = self._lo[i : i + 2], self._hi[i : i + 2]
            bad = (pair < lo - 1e-6) | (pair > hi + 1e-6)
            if bad.any():
                self.status = STATUS_LIMIT
                for k in np.flatnonzero(bad):
                    self.err_code |= 1 << (8 + i + int(k))
                return
            if self.status == STATUS_LIMIT:
                self.err_code &= ~(0b11 << (8 + i))
                if not self.err_code & 0x3F00:
                    self.status = STATUS_OK
            self.target_rad[i : i + 2] = pair
        elif aid == 0x159:
            stroke, _effort, code, _zero = struct.unpack(">iHBB", d)
            if code in (0x01, 0x03):
                if not self.gripper_enabled:
                    self.gripper_target_m = self.gripper_m
                self.gripper_enabled = True
                if not self.estop:
                    self.gripper_target_m = min(max(stroke / UM_PER_M, 0.0), PIPER_JOINT_HI[6])
            else:
                self.gripper_enabled = False
        elif aid == 0x4AF:
            self._pending_firmware = True

    def _step(self, dt: float) -> None:
        cfg = self.config
        rest = np.zeros(6)
        speed = cfg.joint_speed_radps * max(self.speed_pct, 1) / 100.0
        if self.estop:
            self.q_rad = _move(self.q_rad, rest, cfg.sink_speed_radps * dt)
        else:
            q_go = _move(self.q_rad, self.target_rad, speed * dt)
            q_drop = _move(self.q_rad, rest, cfg.drop_speed_radps * dt)
            self.q_rad = np.where(self.enabled, q_go, np.where(self.limp, q_drop, self.q_rad))
        if self.gripper_enabled and not self.estop:
            step = cfg.gripper_speed_mps * dt
            self.gripper_m += max(-step, min(step, self.gripper_target_m - self.gripper_m))

    def _feedback(self, tick: int) -> list[can.Message]:
        def frame(aid: int, data: bytes) -> can.Message:
            return can.Message(arbitration_id=aid, data=data, is_extended_id=False)

        status, err = (self.status, self.err_code) if self._forced_error is None else self._forced_error
        mdeg = [round(v * MDEG_PER_RAD) for v in self.q_rad]
        g_status = ENABLE_BIT if self.gripper_enabled else 0
        out = [
            frame(0x2A1, struct.pack(">BBBBBBH", self.ctrl_mode, status, self.move_mode, 0, 0, 0, err)),
            frame(0x2A5, struct.pack(">ii", mdeg[0], mdeg[1])),
            frame(0x2A6, struct.pack(">ii", mdeg[2], mdeg[3])),
            frame(0x2A7, struct.pack(">ii", mdeg[4], mdeg[5])),
            frame(0x2A8, struct.pack(">iHBB", round(self.gripper_m * UM_PER_M), 1000, g_status, 0)),
        ]
        if tick % self.config.driver_state_every == 0:
            for i in range(6):
                foc = ENABLE_BIT if self.enabled[i] else 0
                # voltage 0.1 V, driver temp C, motor temp C, status bits, bus current 0.001 A
                out.append(frame(0x261 + i, struct.pack(">HhbBH", 240, 35, 30, foc, 100)))
        if self._pending_firmware:
            self._pending_firmware = False
            out.append(frame(0x4AF, self.config.firmware.encode()[:8].ljust(8, b"\x00")))
        return out

    def _loop(self) -> None:
        bus = self._bus
        assert bus is not None
        dt = 1.0 / self.config.feedback_hz
        next_t = last = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            # Read commands until the next tick is due.
            while (msg := bus.recv(timeout=max(0.0, next_t - time.monotonic()))) is not None:
                with self._lock:
                    self._handle(msg)
            now = time.monotonic()
            with self._lock:
                self._step(now - last)
                frames = self._feedback(tick)
            last = now
            tick += 1
            if not self._silent:
                due = now + self._latency_s
                self._outbox.extend((due, f) for f in frames)
            while self._outbox and self._outbox[0][0] <= now:
                try:
                    bus.send(self._outbox.popleft()[1])
                except can.CanError:
                    pass
            next_t += dt
            if now - next_t > 0.1:  # fell far behind (loaded machine): do not burst
                next_t = now + dt
