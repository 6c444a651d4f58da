"""A simulated Piper *master* (teaching) arm: a peer on a python-can ``virtual`` bus that sends the
control frames a real master arm sends to its puppet.

Usage::

    master = PiperMasterSim(PiperMasterSimConfig(channel="sim_left")).start()
    master.set_pose([0.0, 1.0, -1.2, 0.0, 0.3, 0.0], 0.02)   # J1..J6 rad, gripper m (the operator's hand)
    ...
    master.stop()
    master.sent                                             # every frame sent, oldest first

On a Cobot Magic the master arm shares the CAN bus with its puppet: every ``1 / send_hz`` s it sends
0x151 mode ``[0x01 CAN, 0x01 MOVE J, speed %, 0x00 pos-vel, 0...]``, the joint targets
0x155/0x156/0x157 (int32 pairs J1|J2, J3|J4, J5|J6 in 0.001 degree) and the gripper 0x159 (int32
stroke in 0.001 mm, uint16 effort in 0.001 N m, code 0x01 enable, 0), big-endian (CONTRACT section 2).
The puppet (here :class:`~vla_edge.firmware_bridge.piper_sim.PiperSim` on the same channel) obeys
them, and piper_sdk on that bus reads them with ``GetArmJointCtrl`` / ``GetArmGripperCtrl``.

Pure python-can; imports nothing from ``vla_edge.edge``.
"""

from __future__ import annotations

import collections
import math
import struct
import threading
import time
from dataclasses import dataclass

import can
from vla_edge.firmware_bridge.piper_arm import MDEG_PER_RAD, UM_PER_M
from vla_edge.firmware_bridge.piper_sim import VirtualCanNode


@dataclass
class PiperMasterSimConfig:
    """One simulated master arm on virtual CAN channel ``channel``."""

    channel: str = "piper_sim"
    send_hz: float = 200.0
    speed_pct: int = 100
    gripper_effort_nm: float = 1.0
    keep_sent: int = 100_000
    """Frames kept in :attr:`PiperMasterSim.sent` (oldest dropped first)."""


def control_frames(q_rad, gripper_m: float, speed_pct: int = 100, effort_nm: float = 1.0) -> list[can.Message]:
    """The frames a master arm sends for pose ``q_rad`` (6,) rad and gripper stroke ``gripper_m``."""

    def frame(aid: int, data: bytes) -> can.Message:
        return can.Message(arbitration_id=aid, data=data, is_extended_id=False)

    mdeg = [round(v * MDEG_PER_RAD) for v in q_rad]
    return [
        frame(0x151, bytes([0x01, 0x01, speed_pct, 0x00, 0, 0, 0, 0])),
        frame(0x155, struct.pack(">ii", mdeg[0], mdeg[1])),
        frame(0x156, struct.pack(">ii", mdeg[2], mdeg[3])),
        frame(0x157, struct.pack(">ii", mdeg[4], mdeg[5])),
        frame(0x159, struct.pack(">iHBB", round(gripper_m * UM_PER_M), round(effort_nm * 1000), 0x01, 0)),
    ]


class PiperMasterSim(VirtualCanNode):
    """Sends the current pose as control frames at ``send_hz`` once a pose is set. Thread-backed."""

    thread_name = "piper-master-sim"

    def __init__(self, config: PiperMasterSimConfig | None = None) -> None:
        super().__init__()
        self.config = config or PiperMasterSimConfig()
        self._lock = threading.Lock()
        self._pose: tuple[tuple[float, ...], float] | None = None
        self.sent: collections.deque[tuple[float, int, bytes]] = collections.deque(maxlen=self.config.keep_sent)
        """``(time.monotonic(), arbitration id, data)`` of every frame sent."""

    def set_pose(self, q_rad, gripper_m: float) -> None:
        """Where the operator holds the master: J1..J6 (rad) and the gripper stroke (m)."""
        q = tuple(float(v) for v in q_rad)
        if len(q) != 6 or not all(math.isfinite(v) for v in (*q, gripper_m)):
            raise ValueError(f"master pose needs 6 finite joint angles and a finite gripper stroke, got {q_rad!r}")
        with self._lock:
            self._pose = (q, float(gripper_m))

    def pose(self) -> tuple[tuple[float, ...], float] | None:
        with self._lock:
            return self._pose

    def _loop(self) -> None:
        bus = self._bus
        assert bus is not None
        dt = 1.0 / self.config.send_hz
        next_t = time.monotonic()
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            pose = self.pose()
            if pose is not None:
                for msg in control_frames(*pose, self.config.speed_pct, self.config.gripper_effort_nm):
                    try:
                        bus.send(msg)
                    except can.CanError:
                        continue
                    self.sent.append((time.monotonic(), msg.arbitration_id, bytes(msg.data)))
            next_t += dt
            if time.monotonic() - next_t > 0.1:  # fell far behind (loaded machine): do not burst
                next_t = time.monotonic() + dt
