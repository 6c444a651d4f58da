"""One AgileX Piper arm on CAN, driven through ``piper_sdk.C_PiperInterface_V2``.

Units at this interface are SI: joints in radians, gripper stroke in metres, effort in N m.
On the bus (CONTRACT section 2) joints are int32 0.001 degree and the gripper int32 0.001 mm,
big-endian; :func:`rad_to_mdeg` and :func:`m_to_um` are the only conversions.

Usage::

    arm = PiperArm(PiperArmConfig(can_name="can_left"))
    arm.connect()                   # open the bus, enable all motors, hold the measured pose
    s = arm.read_state()            # q_rad (6,), gripper_m, monotonic timestamps, status
    arm.send_targets(q_rad, 0.04)   # clamped to the configured limits; ArmFault at once if a frame is not sent
    arm.hold()                      # re-send the last commanded target (never a measured pose)
    arm.faults()                    # [] when healthy; "no feedback for 80 ms" on a silent bus, a failed send
    arm.estop(); arm.resume()       # firmware e-stop (0x150 0x01); reset (0x150 0x02) + enable >= 2 times
    arm.disconnect()                # hold the last commanded target; never disables (a disabled arm drops)

Threads: the SDK shares one transmit message object per interface, so every command goes through
one lock here; in practice one control thread sends for one arm. The SDK's own thread reads, from
the same python-can bus we send on (:func:`~vla_edge.firmware_bridge.piper_bus.send_on_the_receive_bus`:
an unread second bus grows).

A failed send (bus down, transmit buffer full) is a fault at once: the first one raises :class:`ArmFault`
with the interface and the fix (piper_sdk only logs it; :class:`~vla_edge.firmware_bridge.piper_bus.SendWatch`
sees it), and :meth:`PiperArm.faults` reports it until the next :meth:`PiperArm.connect`. Later failures
are counted and logged at debug level: a hold on a dead bus does not raise again (the arm keeps its last
target by itself).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from vla_edge import DeviceFault
from vla_edge.firmware_bridge.piper_bus import SendWatch, open_interface, send_on_the_receive_bus

log = logging.getLogger(__name__)

# Published Piper limits (CONTRACT section 2), J1..J6 (rad) then the gripper (m): the defaults of
# PiperArmConfig; the runtime's safety filter and policy defaults take them from here.
PIPER_JOINT_LO = [-2.6179, 0.0, -2.967, -1.745, -1.22, -2.0944, 0.0]
PIPER_JOINT_HI = [2.6179, 3.14, 0.0, 1.745, 1.22, 2.0944, 0.07]

MDEG_PER_RAD = 180_000.0 / math.pi
UM_PER_M = 1_000_000.0

ARM_STATUS = {
    0x00: "normal",
    0x01: "e-stop",
    0x02: "no IK solution",
    0x03: "singularity",
    0x04: "target beyond joint limit",
    0x05: "joint communication error",
    0x06: "joint brake not released",
    0x07: "collision",
    0x08: "overspeed while teaching",
    0x09: "joint state error",
    0x0A: "other error",
}
"""Byte 1 of the 0x2A1 status frame (piper_sdk documentation)."""


class ArmFault(DeviceFault):
    """A Piper arm cannot be reached, enabled or commanded."""


def rad_to_mdeg(q_rad: float) -> int:
    """Radians to the bus unit 0.001 degree, rounded to nearest."""
    return round(q_rad * MDEG_PER_RAD)


def mdeg_to_rad(q_mdeg: int) -> float:
    return q_mdeg / MDEG_PER_RAD


def m_to_um(x_m: float) -> int:
    """Metres to the bus unit 0.001 mm (micrometres), rounded to nearest."""
    return round(x_m * UM_PER_M)


def um_to_m(x_um: int) -> float:
    return x_um / UM_PER_M


def can_interface_problem(name: str) -> str | None:
    """Why SocketCAN interface ``name`` cannot be used, or None when it exists and is up."""
    try:
        with open(f"/sys/class/net/{name}/operstate") as f:
            state = f.read().strip()
    except OSError:
        return f"CAN interface {name} not found"
    if state not in ("up", "unknown"):
        return f"CAN interface {name} is {state} (ip link set {name} up type can bitrate 1000000)"
    return None


@dataclass
class PiperArmConfig:
    """One arm. Limits per joint J1..J6 then gripper (rad, rad, ..., m)."""

    can_name: str = "can_left"
    bustype: str = "socketcan"
    """``socketcan`` on the robot; ``virtual`` to talk to :class:`PiperSim` in this process."""
    joint_lo: list[float] = field(default_factory=lambda: list(PIPER_JOINT_LO))
    joint_hi: list[float] = field(default_factory=lambda: list(PIPER_JOINT_HI))
    speed_pct: int = 100
    """Firmware speed rate for joint moves (0x151 byte 2)."""
    gripper_effort_nm: float = 1.0
    connect_timeout_s: float = 1.0
    enable_timeout_s: float = 3.0
    feedback_timeout_s: float = 0.05
    """No feedback frame for this long is a silent-bus fault (the arm sends at 200 Hz)."""


@dataclass(frozen=True)
class ArmState:
    """Measured arm state. ``*_stamp_s`` are ``time.monotonic()`` seconds of the newest frame."""

    q_rad: np.ndarray
    gripper_m: float
    joint_stamp_s: float
    gripper_stamp_s: float
    enabled: tuple[bool, ...]
    status: int
    err_code: int
    ctrl_mode: int

    @property
    def qpos(self) -> np.ndarray:
        """``(7,)`` float64: j1..j6 rad, gripper m (one half of the robot's 14-vector)."""
        return np.append(self.q_rad, self.gripper_m)


def _wall_to_monotonic(wall_s: float) -> float:
    """SDK stamps are CAN receive times on the wall clock; express them on ``time.monotonic()``."""
    if wall_s <= 0:
        return 0.0
    return time.monotonic() - (time.time() - wall_s)


class PiperArm:
    """One Piper arm. See the module docstring for the life cycle."""

    def __init__(self, config: PiperArmConfig | None = None) -> None:
        self.config = config or PiperArmConfig()
        self._sdk = None
        self._lock = threading.RLock()
        self._connect_wall_s = 0.0
        self._firmware: str | None = None
        self._last_target: np.ndarray | None = None
        """(7,) j1..j6 rad, gripper m: the last target sent, as it went on the bus (None: none yet)."""
        self._firmware_estopped = False
        """Between :meth:`estop` and the end of :meth:`resume`: the arm's e-stop status is ours, not a fault."""
        self._sends: SendWatch | None = None
        self._send_fault_raised = False
        self._lo = np.asarray(self.config.joint_lo, dtype=np.float64)
        self._hi = np.asarray(self.config.joint_hi, dtype=np.float64)
        # Limits in bus units, rounded inward: a clamped target never rounds past a limit.
        self._lo_mdeg = [math.ceil(v * MDEG_PER_RAD) for v in self._lo[:6]]
        self._hi_mdeg = [math.floor(v * MDEG_PER_RAD) for v in self._hi[:6]]

    @property
    def name(self) -> str:
        return self.config.can_name

    @property
    def is_connected(self) -> bool:
        return self._sdk is not None

    @property
    def firmware(self) -> str | None:
        """Firmware version string reported on connect (e.g. ``S-V1.6-3``), None if not reported."""
        return self._firmware

    # -- lifecycle -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the bus, wait for feedback, enable all motors, then hold the measured pose.

        Raises :class:`ArmFault` when the interface is missing, the arm is silent, or the motors do
        not all report enabled within ``enable_timeout_s``.
        """
        cfg = self.config
        if cfg.bustype == "socketcan" and (problem := can_interface_problem(cfg.can_name)):
            raise ArmFault(problem)
        try:  # piper_sdk keeps one interface object per bus name for the life of the process
            sdk = open_interface(cfg.can_name, cfg.bustype)
        except ConnectionError as e:
            raise ArmFault(f"cannot open CAN interface {cfg.can_name}: {e}") from e
        send_on_the_receive_bus(sdk)
        self._sends = SendWatch(sdk, cfg.can_name)
        self._send_fault_raised = False
        self._connect_wall_s = time.time()
        sdk.ConnectPort()  # starts the SDK's reader thread, asks for limits and firmware
        self._sdk = sdk
        try:
            self._wait(lambda: self._feedback_wall_s() > self._connect_wall_s, cfg.connect_timeout_s,
                       f"no feedback from the Piper arm on {cfg.can_name} (powered? right bus?)")
            self._enable()
            self._wait(lambda: isinstance(sdk.GetPiperFirmwareVersion(), str), 0.3, None)
            fw = sdk.GetPiperFirmwareVersion()
            self._firmware = fw if isinstance(fw, str) else None
        except ArmFault:
            self._close_port()
            raise

    def disconnect(self) -> None:
        """Hold the last commanded target and close the port. Motors stay enabled: the arm never drops."""
        if self._sdk is None:
            return
        try:
            self.hold()
        finally:
            self._close_port()

    def _close_port(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is not None:
            with self._lock:
                sdk.DisconnectPort()

    # -- commands --------------------------------------------------------------------------------
    def send_targets(self, q_rad, gripper_m: float) -> None:
        """Joint targets ``q_rad`` (6,) in rad and gripper stroke in m, clamped to the limits."""
        sdk = self._require()
        q = np.asarray(q_rad, dtype=np.float64).reshape(6)
        mdeg = [min(max(rad_to_mdeg(v), lo), hi) for v, lo, hi in zip(q, self._lo_mdeg, self._hi_mdeg, strict=True)]
        g = float(np.clip(gripper_m, self._lo[6], self._hi[6]))
        effort = max(0, min(5000, round(self.config.gripper_effort_nm * 1000)))
        with self._lock:
            failed = self._sends.failures
            sdk.ModeCtrl(0x01, 0x01, self.config.speed_pct, 0x00)  # CAN control, MOVE J, pos-vel
            sdk.JointCtrl(*mdeg)
            sdk.GripperCtrl(m_to_um(g), effort, 0x01, 0x00)
            if self._sends.failures == failed:  # on the bus: what the arm now holds
                self._last_target = np.append(np.asarray(mdeg, np.float64) / MDEG_PER_RAD, g)
            self._check_sends()

    @property
    def last_target(self) -> np.ndarray | None:
        """(7,) the last target commanded (j1..j6 rad, gripper m), or None before the first."""
        t = self._last_target
        return None if t is None else t.copy()

    def hold(self) -> None:
        """Stay put: re-send the last commanded target (the arm has no watchdog and keeps it anyway).

        Never a measured pose, which may be stale (lost feedback) or lag the arm. Before any command
        (just enabled), the measured pose is the arm's own current target: that is sent instead.
        """
        with self._lock:
            t = self._last_target
            if t is None:
                s = self.read_state()
                t = np.append(s.q_rad, s.gripper_m)
            self.send_targets(t[:6], t[6])

    def estop(self) -> None:
        """Firmware e-stop (0x150 byte0 0x01): targets are ignored, the damped arm sinks slowly.

        Until :meth:`resume` returns, the arm's own e-stop status (0x2A1 byte1 = 1) is expected, not a fault.
        """
        sdk = self._require()
        with self._lock:
            self._firmware_estopped = True
            sdk.EmergencyStop(0x01)
            self._check_sends()

    def resume(self) -> None:
        """Leave a firmware e-stop: reset (0x150 byte0 0x02), enable (at least twice, CONTRACT
        section 2) until every motor reports enabled, then hold the pose the arm woke up in.

        The reset cuts motor power for a moment (the arm drops until the enable frames land). The
        last commanded target is forgotten: the arm sank while e-stopped, and going back to it would
        be a jump. Raises :class:`ArmFault` if the motors do not come back (the e-stop stays ours).
        """
        sdk = self._require()
        with self._lock:
            self._firmware_estopped = True
            sdk.EmergencyStop(0x02)
            self._last_target = None
            self._enable(min_frames=2)
            self._firmware_estopped = False

    def _enable(self, min_frames: int = 1) -> None:
        """Send enable (0x471, all motors) every 30 ms, at least ``min_frames`` times, until every
        motor reports enabled in fresh driver state; then CAN joint mode and :meth:`hold`."""
        sdk = self._require()
        cfg = self.config
        start_wall = time.time()
        deadline = time.monotonic() + cfg.enable_timeout_s
        with self._lock:
            sent = 0
            while True:
                sdk.EnableArm(7, 0x02)
                self._check_sends()
                sent += 1
                time.sleep(0.03)
                low = sdk.GetArmLowSpdInfoMsgs()
                if sent >= min_frames and low.time_stamp > start_wall and all(sdk.GetArmEnableStatus()):
                    break
                if time.monotonic() > deadline:
                    off = [f"J{i + 1}" for i, e in enumerate(sdk.GetArmEnableStatus()) if not e]
                    raise ArmFault(f"Piper arm on {cfg.can_name}: motors not enabled after "
                                   f"{cfg.enable_timeout_s:.1f} s ({', '.join(off) or 'no driver state'})")
            sdk.ModeCtrl(0x01, 0x01, cfg.speed_pct, 0x00)
            self.hold()

    # -- state -----------------------------------------------------------------------------------
    def read_state(self) -> ArmState:
        """Newest feedback: joints, gripper, enable bits, status (0x2A1 byte 1), error bits."""
        sdk = self._require()
        j = sdk.GetArmJointMsgs()
        g = sdk.GetArmGripperMsgs()
        st = sdk.GetArmStatus().arm_status
        js = j.joint_state
        q = np.array([js.joint_1, js.joint_2, js.joint_3, js.joint_4, js.joint_5, js.joint_6], dtype=np.float64)
        return ArmState(
            q_rad=q / MDEG_PER_RAD,
            gripper_m=um_to_m(g.gripper_state.grippers_angle),
            joint_stamp_s=_wall_to_monotonic(j.time_stamp),
            gripper_stamp_s=_wall_to_monotonic(g.time_stamp),
            enabled=tuple(bool(e) for e in sdk.GetArmEnableStatus()),
            status=int(st.arm_status),
            err_code=int(st.err_code),
            ctrl_mode=int(st.ctrl_mode),
        )

    def faults(self) -> list[str]:
        """Active faults, one short line each (empty when healthy)."""
        name = f"arm {self.config.can_name}"
        if self._sdk is None:
            return [f"{name}: not connected"]
        if self._sends is not None and self._sends.failure is not None:  # the cause: no need for its symptoms
            return [self._sends.failure]
        age = self._feedback_age_s()
        if age > self.config.feedback_timeout_s:
            return [f"{name}: no feedback for {age * 1000:.0f} ms (silent bus)"]
        s = self.read_state()
        if self._firmware_estopped:  # our own e-stop (status 1, sinking, or being reset): expected
            if s.status in (0x00, 0x01):
                return []
        out = []
        if s.status:
            detail = ARM_STATUS.get(s.status, "unknown")
            limits = [f"J{i + 1}" for i in range(6) if s.err_code >> (8 + i) & 1]
            if limits:
                detail += f" ({', '.join(limits)})"
            out.append(f"{name}: status {s.status:#04x} {detail}")
        comm = [f"J{i + 1}" for i in range(6) if s.err_code >> i & 1]
        if comm:
            out.append(f"{name}: joint communication error ({', '.join(comm)})")
        if not all(s.enabled) and s.status != 0x01:
            out.append(f"{name}: motors not enabled ({', '.join(f'J{i + 1}' for i, e in enumerate(s.enabled) if not e)})")
        return out

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self):
        if self._sdk is None:
            raise ArmFault(f"Piper arm on {self.config.can_name} is not connected")
        return self._sdk

    def _check_sends(self) -> None:
        """The first failed send since :meth:`connect` as an :class:`ArmFault`, raised once; later ones are
        only counted (:meth:`faults` keeps reporting it)."""
        w = self._sends
        if w is not None and w.failure is not None and not self._send_fault_raised:
            self._send_fault_raised = True
            raise ArmFault(w.failure)

    def _feedback_wall_s(self) -> float:
        sdk = self._require()
        return max(sdk.GetArmJointMsgs().time_stamp, sdk.GetArmStatus().time_stamp)

    def _feedback_age_s(self) -> float:
        return time.time() - self._feedback_wall_s()

    @staticmethod
    def _wait(cond, timeout_s: float, error: str | None) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                if error:
                    raise ArmFault(error)
                return
            time.sleep(0.005)
