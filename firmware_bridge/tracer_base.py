"""AgileX TRACER base over RS232 (pyserial), in serial control mode.

The base stops by itself when no command arrives for 500 ms, so :class:`TracerBase` streams the
current velocity command from its own thread at ``stream_hz`` (default 50 Hz), ramped toward the
target with the configured acceleration limits. A second thread reads and parses feedback.

A target that is not refreshed by :meth:`TracerBase.send_velocity` within ``command_timeout_s``
decays to zero: if the control loop hangs, the base stops even though the streaming thread lives.

Usage::

    base = TracerBase(TracerBaseConfig(port="/dev/ttyUSB0"))
    base.connect()                      # opens the port, waits for feedback
    base.send_velocity(0.2, 0.0)        # m/s, rad/s; call at the control rate
    base.stop_now()                     # e-stop: a zero frame on the wire now, not at the next 50 Hz slot
    base.release()                      # after the e-stop: targets accepted again
    state = base.read_state()           # measured vx_mps, wz_radps, fault bits, timestamps
    base.disconnect()                   # zero command, then close

Faults (link loss, port errors, base fault bits, sustained bad input, a base e-stop) are listed by
:meth:`faults`; they never raise from the threads.

Serial robustness: the reader resynchronises on the next ``5A A5`` whose 13 bytes carry a correct
checksum, and counts what it dropped (:class:`BaseState` ``bad_frames``, ``skipped_bytes``,
``bad_input_incidents``; an incident is a stretch of bad input between two good frames). A stray byte
or a corrupt frame costs at most that frame and is not a fault; *sustained* corruption is: more than
``max_bad_input_incidents`` (5) incidents within ``bad_input_window_s`` (1 s), i.e. about 5 % of the
base's 100 frames/s. Losing every frame is the ``feedback_timeout_s`` fault.

A stop gate (:meth:`TracerBase.attach_stop_gate`; vla-edge passes the keyboard's native
``vla_edge.kernels.StopWire``) writes the base's zero frame from a thread that needs no GIL the moment the
e-stop key arrives; every motion frame then goes through the gate, which passes only zero frames from the
trip until :meth:`TracerBase.release`.

A base-reported e-stop (system state frame, vehicle state 0x01) is latched by the reader thread the
moment its frame arrives, so a single such frame between two control ticks is never missed; it stays a
fault until :meth:`TracerBase.clear_estop` (refused while the base still reports it) or a reconnect.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import serial
from vla_edge import DeviceFault
from vla_edge.firmware_bridge import tracer_protocol as tp

log = logging.getLogger(__name__)


class BaseFault(DeviceFault):
    """The TRACER base cannot be reached or reported a fault."""


@dataclass
class TracerBaseConfig:
    """Serial port and limits. Speeds in m/s and rad/s, accelerations in m/s^2 and rad/s^2."""

    port: str = "/dev/ttyUSB0"
    baudrate: int = 115200
    max_linear_mps: float = 1.5
    max_angular_radps: float = 0.7853
    max_linear_accel_mps2: float = 1.0
    max_angular_accel_radps2: float = 2.0
    stream_hz: float = 50.0
    command_timeout_s: float = 0.5
    """A non-zero target older than this decays to zero (the control loop stopped calling)."""
    feedback_timeout_s: float = 0.3
    """No feedback for this long is a link-loss fault."""
    connect_timeout_s: float = 1.0
    bad_input_window_s: float = 1.0
    """Sliding window in which bad-input incidents are counted."""
    max_bad_input_incidents: int = 5
    """More incidents than this within the window is a fault (sustained corruption)."""


@dataclass(frozen=True)
class BaseState:
    """Latest feedback. ``*_stamp_s`` are ``time.monotonic()`` at reception (0.0: never received)."""

    vx_mps: float = 0.0
    wz_radps: float = 0.0
    motion_stamp_s: float = 0.0
    vehicle_state: int = 0
    control_mode: int = 0
    battery_v: float = 0.0
    fault_bits: int = 0
    system_stamp_s: float = 0.0
    command_vx_mps: float = 0.0
    command_wz_radps: float = 0.0
    frames_sent: int = 0
    bad_frames: int = 0
    skipped_bytes: int = 0
    bad_input_incidents: int = 0
    estop_latched: bool = False
    """The base reported an e-stop (vehicle state 0x01) since connect or :meth:`TracerBase.clear_estop`."""
    fault_names: list[str] = field(default_factory=list)


def _step_toward(current: float, target: float, max_step: float) -> float:
    return current + max(-max_step, min(max_step, target - current))


class TracerBase:
    """One TRACER base on one serial port. Thread-safe: any thread may call :meth:`send_velocity`."""

    def __init__(self, config: TracerBaseConfig | None = None) -> None:
        self.config = config or TracerBaseConfig()
        self._ser: serial.Serial | None = None
        self._lock = threading.Lock()
        self._tx_lock = threading.Lock()
        """Held from computing a command frame to the end of its write: a zero written by :meth:`stop_now`
        is never followed by a frame computed before it."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reader = tp.FrameReader()
        self._target = (0.0, 0.0)
        self._target_stamp_s = 0.0
        self._command = (0.0, 0.0)
        self._counter = 0
        self._frames_sent = 0
        self._motion = (0.0, 0.0, 0.0)  # vx, wz, stamp
        self._system = (0, 0, 0.0, 0, 0.0)  # state, mode, battery, bits, stamp
        self._link_error = ""
        # The newest incidents only: more than the maximum within the window is all that matters.
        self._incident_stamps_s = collections.deque(maxlen=self.config.max_bad_input_incidents + 1)
        self._estop_latched = False
        self._command_expired = False
        self._halted = False
        """Set by :meth:`stop_now`, cleared by :meth:`release`: velocity targets are ignored meanwhile."""
        self._gate = None
        """A stop gate (:meth:`attach_stop_gate`) every motion frame is written through, or None."""

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._ser is not None

    def connect(self) -> None:
        """Open the port, start the threads, and wait for the first feedback frame."""
        cfg = self.config
        try:
            self._ser = serial.Serial(cfg.port, cfg.baudrate, timeout=0.02, write_timeout=0.1)
            self._ser.reset_input_buffer()
        except (serial.SerialException, OSError) as e:
            self._ser = None
            if "No such file" in str(e) or "could not open" in str(e):
                raise BaseFault(f"serial port {cfg.port} not found (TRACER base)") from e
            raise BaseFault(f"cannot open TRACER serial port {cfg.port}: {e}") from e
        self._stop.clear()
        self._link_error = ""
        self._estop_latched = False
        self._threads = [
            threading.Thread(target=self._tx_loop, name=f"tracer-tx {cfg.port}", daemon=True),
            threading.Thread(target=self._rx_loop, name=f"tracer-rx {cfg.port}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + cfg.connect_timeout_s
        while time.monotonic() < deadline:
            if self._motion[2] or self._system[4]:
                return
            time.sleep(0.005)
        self.disconnect()
        raise BaseFault(f"no feedback from the TRACER base on {cfg.port} within {cfg.connect_timeout_s:.1f} s")

    def attach_stop_gate(self, gate) -> None:
        """Write every motion frame through ``gate`` and arm it with this port's zero frame.

        ``gate`` (a ``vla_edge.kernels.StopWire``) writes that frame itself, from a native thread, the
        moment its trip key arrives, and from then on ``gate.write(fd, frame, stop)`` passes zero frames
        only (-1 for the others) until :meth:`release` rearms it. Call after :meth:`connect`; the
        port is disarmed on :meth:`disconnect`, before it is closed.
        """
        if self._ser is None:
            raise BaseFault(f"TRACER {self.config.port}: attach_stop_gate before connect")
        with self._tx_lock:
            gate.arm(self._ser.fileno(), tp.motion_command(0.0, 0.0, 0))
            self._gate = gate

    def disconnect(self) -> None:
        """Stop streaming, send a zero command (twice), close the port. Safe to call twice."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=1.0)
        self._threads = []
        ser, self._ser = self._ser, None
        if ser is None:
            return
        with self._tx_lock:  # the descriptor's number is free again once closed: never write a stop there
            if self._gate is not None:
                self._gate.disarm(ser.fileno())
                self._gate = None
        try:
            with self._tx_lock:  # a stop_now() from another thread may be writing
                for _ in range(2):
                    ser.write(tp.motion_command(0.0, 0.0, self._next_counter()))
                ser.flush()
        except (serial.SerialException, OSError) as e:
            log.warning("TRACER %s: zero command on close failed: %s", self.config.port, e)
        finally:
            ser.close()
        with self._lock:
            self._target = self._command = (0.0, 0.0)

    # -- commands --------------------------------------------------------------------------------
    def send_velocity(self, vx_mps: float, wz_radps: float) -> None:
        """Set the target velocity (clamped to the configured limits); streamed by the tx thread."""
        cfg = self.config
        vx = max(-cfg.max_linear_mps, min(cfg.max_linear_mps, float(vx_mps)))
        wz = max(-cfg.max_angular_radps, min(cfg.max_angular_radps, float(wz_radps)))
        with self._lock:
            if self._halted:
                return
            self._target = (vx, wz)
            self._target_stamp_s = time.monotonic()
            self._command_expired = False

    def stop(self) -> None:
        """Target zero (ramped down at the deceleration limits)."""
        self.send_velocity(0.0, 0.0)

    def stop_now(self) -> None:
        """E-stop: target and command zero, skipping the ramp, and a zero frame written to the port in
        this thread at once (the stream keeps sending zeros). Targets are ignored until :meth:`release`,
        so no other thread's :meth:`send_velocity` can undo it. Never raises: a write error is a link fault."""
        with self._tx_lock:
            with self._lock:
                self._halted = True
                self._target = self._command = (0.0, 0.0)
            self._write_command(0.0, 0.0)

    def release(self) -> None:
        """Accept velocity targets again after :meth:`stop_now` (the base starts from rest); rearm the gate."""
        with self._lock:
            self._halted = False
        gate = self._gate
        if gate is not None:
            gate.rearm()

    # -- state -----------------------------------------------------------------------------------
    def read_state(self) -> BaseState:
        with self._lock:
            vx, wz, ms = self._motion
            state, mode, battery, bits, ss = self._system
            cvx, cwz = self._command
            sent = self._frames_sent
        return BaseState(
            vx_mps=vx,
            wz_radps=wz,
            motion_stamp_s=ms,
            vehicle_state=state,
            control_mode=mode,
            battery_v=battery,
            fault_bits=bits,
            system_stamp_s=ss,
            command_vx_mps=cvx,
            command_wz_radps=cwz,
            frames_sent=sent,
            bad_frames=self._reader.bad_frames,
            skipped_bytes=self._reader.skipped_bytes,
            bad_input_incidents=self._reader.incidents,
            estop_latched=self._estop_latched,
            fault_names=tp.fault_names(bits),
        )

    def faults(self, include_estop: bool = True) -> list[str]:
        """Active faults, one short line each (empty when healthy). ``include_estop=False`` leaves out a
        base-reported e-stop, for a caller that treats the base's button as an operator stop
        (:attr:`BaseState.estop_latched` tells it)."""
        cfg = self.config
        out: list[str] = []
        port = cfg.port
        if self._ser is None:
            return [f"base {port}: not connected"]
        if self._link_error:
            out.append(f"base {port}: link lost ({self._link_error})")
        now = time.monotonic()
        last = max(self._motion[2], self._system[4])
        if now - last > cfg.feedback_timeout_s:
            out.append(f"base {port}: no feedback for {(now - last) * 1000:.0f} ms")
        recent = self._recent_incidents(now)
        if recent > cfg.max_bad_input_incidents:
            r = self._reader
            out.append(f"base {port}: sustained bad input ({recent} incidents in {cfg.bad_input_window_s:g} s: "
                       f"{r.last_error}; {r.bad_frames} bad frames, {r.skipped_bytes} bytes skipped in all)")
        state, _, _, bits, _ = self._system
        if self._estop_latched and include_estop:
            out.append(f"base {port}: e-stop reported by the base (latched)")
        if state and state != tp.VEHICLE_ESTOP:
            out.append(f"base {port}: vehicle state {tp.VEHICLE_STATES.get(state, hex(state))}")
        out += [f"base {port}: {name}" for name in tp.fault_names(bits)]
        if self._command_expired:
            out.append(f"base {port}: no velocity command for {cfg.command_timeout_s:.1f} s, stopping")
        return out

    @property
    def estop_latched(self) -> bool:
        """A base-reported e-stop since connect or :meth:`clear_estop` (cheap: for every control tick)."""
        return self._estop_latched

    def clear_estop(self) -> bool:
        """Clear a latched base e-stop; refused (False) while the newest system frame still reports it."""
        with self._lock:
            if self._system[0] == tp.VEHICLE_ESTOP:
                return False
            self._estop_latched = False
            return True

    def _recent_incidents(self, now: float) -> int:
        """Bad-input incidents within the last ``bad_input_window_s`` (at most the maximum + 1)."""
        return sum(1 for t in list(self._incident_stamps_s) if now - t <= self.config.bad_input_window_s)

    # -- threads ---------------------------------------------------------------------------------
    def _next_counter(self) -> int:
        c = self._counter
        self._counter = (c + 1) & 0xFF
        return c

    def _write_command(self, vx_mps: float, wz_radps: float) -> None:
        """Write one motion command frame; the caller holds ``_tx_lock``. Errors become ``_link_error``.

        A plain non-blocking ``write(2)`` on the port (pyserial opens it ``O_NONBLOCK``): it never
        waits, and a full output buffer is reported at once. (pyserial's own ``write`` with a
        ``write_timeout`` raises a timeout after a complete write when the thread was descheduled
        for longer than the timeout: a false link fault on a loaded machine.)
        """
        ser = self._ser
        if ser is None:
            return
        frame = tp.motion_command(vx_mps, wz_radps, self._next_counter())
        gate = self._gate
        try:
            if gate is None:
                n = os.write(ser.fileno(), frame)
            elif (n := gate.write(ser.fileno(), frame, vx_mps == 0.0 and wz_radps == 0.0)) < 0:
                return  # the gate tripped: its zero frame is out, moving frames wait for release()
            if n != len(frame):
                raise BlockingIOError("partial frame written")
            with self._lock:
                self._frames_sent += 1
            if self._link_error.startswith("serial write timeout"):
                self._link_error = ""
        except BlockingIOError as e:  # the device is not draining: report, keep trying
            self._link_error = f"serial write timeout: output buffer full ({e})"
            log.warning("TRACER %s: %s", self.config.port, self._link_error)
        except (serial.SerialException, OSError, TypeError, AttributeError, ValueError) as e:
            # TypeError/AttributeError: pyserial's port object after close from another thread.
            self._link_error = f"serial write: {e}"
            log.error("TRACER %s: %s", self.config.port, self._link_error)

    def _tx_loop(self) -> None:
        cfg = self.config
        period = 1.0 / cfg.stream_hz
        next_t = time.monotonic()
        while not self._stop.is_set():
            if self._ser is None:
                return
            with self._tx_lock:
                now = time.monotonic()
                with self._lock:
                    target = self._target
                    if target != (0.0, 0.0) and now - self._target_stamp_s > cfg.command_timeout_s:
                        target = self._target = (0.0, 0.0)
                        self._command_expired = True
                    vx = _step_toward(self._command[0], target[0], cfg.max_linear_accel_mps2 * period)
                    wz = _step_toward(self._command[1], target[1], cfg.max_angular_accel_radps2 * period)
                    self._command = (vx, wz)
                self._write_command(vx, wz)
            if self._link_error.startswith("serial write:"):
                return
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))
            if time.monotonic() - next_t > 5 * period:  # we fell far behind: do not burst
                next_t = time.monotonic()

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            ser = self._ser
            if ser is None:
                return
            try:
                chunk = ser.read(max(1, ser.in_waiting))
            except (serial.SerialException, OSError, TypeError, AttributeError) as e:
                if not self._stop.is_set():
                    self._link_error = f"serial read: {e}"
                    log.error("TRACER %s: %s", self.config.port, self._link_error)
                return
            if not chunk:
                continue
            reader = self._reader
            incidents_before = reader.incidents
            frames = reader.feed(chunk)
            now = time.monotonic()
            synced = self._motion[2] or self._system[4]  # bytes before the first good frame: sync-up
            if synced and reader.incidents != incidents_before:
                self._incident_stamps_s.extend([now] * (reader.incidents - incidents_before))
                sustained = self._recent_incidents(now) > self.config.max_bad_input_incidents  # then a fault says it
                log.log(logging.DEBUG if sustained else logging.WARNING,
                        "TRACER %s: bad input, resynchronised (%s; %d bad frames, %d bytes skipped in all)",
                        self.config.port, reader.last_error, reader.bad_frames, reader.skipped_bytes)
            for f in frames:
                self._on_frame(f, now)

    def _on_frame(self, f: tp.Frame, now: float) -> None:
        if f.type != tp.TYPE_FEEDBACK:
            return
        with self._lock:
            if f.id == tp.FB_MOTION:
                self._motion = (*tp.decode_motion_feedback(f), now)
            elif f.id == tp.FB_SYSTEM:
                self._system = (*tp.decode_system_feedback(f), now)
                if self._system[0] == tp.VEHICLE_ESTOP and not self._estop_latched:
                    self._estop_latched = True
                    log.error("TRACER %s: the base reports an e-stop (latched)", self.config.port)
