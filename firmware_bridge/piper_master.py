"""What a Piper *master* (teaching) arm commands, read from its control frames on CAN via piper_sdk.

Usage::

    master = PiperMaster(PiperMasterConfig(can_name="can_left"))
    master.connect()                # waits for the master's first control frames; sends nothing
    q7, stamp_s = master.read_command()   # J1..J6 rad, gripper m; time.monotonic() of the newest frame
    master.faults()                 # [] while frames keep coming
    master.disconnect()

A master arm sends 0x151 mode, 0x155..0x157 joint targets (0.001 degree) and 0x159 gripper (0.001 mm)
for its puppet; piper_sdk parses them into ``GetArmJointCtrl`` / ``GetArmGripperCtrl``. On the Cobot
Magic the master shares its puppet's bus (``can_name`` is the puppet's interface): piper_sdk keeps one
interface object per bus name, so this reader then uses the puppet's already-connected interface and
never opens or closes the port itself. A master on a bus of its own gets its port opened here, without
piper_sdk's arm initialisation (nothing is ever sent to a master).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from vla_edge.firmware_bridge.piper_arm import (
    MDEG_PER_RAD,
    ArmFault,
    _wall_to_monotonic,
    can_interface_problem,
    um_to_m,
)
from vla_edge.firmware_bridge.piper_bus import open_interface


@dataclass
class PiperMasterConfig:
    can_name: str = "can_left"
    bustype: str = "socketcan"
    connect_timeout_s: float = 2.0
    command_timeout_s: float = 0.1
    """No control frame for this long is a fault (a master sends at ~200 Hz)."""


class PiperMaster:
    """Reads one master arm's commands. See the module docstring."""

    def __init__(self, config: PiperMasterConfig | None = None) -> None:
        self.config = config or PiperMasterConfig()
        self._sdk = None
        self._own_port = False

    def connect(self) -> None:
        """Attach to the bus and wait for the master's joint and gripper control frames."""
        cfg = self.config
        if cfg.bustype == "socketcan" and (problem := can_interface_problem(cfg.can_name)):
            raise ArmFault(problem)
        try:  # the puppet's interface when it shares the bus (already connected), else a bus of its own
            sdk = open_interface(cfg.can_name, cfg.bustype)
        except ConnectionError as e:
            raise ArmFault(f"cannot open CAN interface {cfg.can_name}: {e}") from e
        if not sdk.get_connect_status():  # a bus of its own: open it, but send nothing
            sdk.ConnectPort(piper_init=False)
            self._own_port = True
        self._sdk = sdk
        start_wall = time.time()
        deadline = time.monotonic() + cfg.connect_timeout_s
        while min(sdk.GetArmJointCtrl().time_stamp, sdk.GetArmGripperCtrl().time_stamp) <= start_wall:
            if time.monotonic() > deadline:
                self.disconnect()
                raise ArmFault(f"no master arm commands on {cfg.can_name} within {cfg.connect_timeout_s:.1f} s "
                               "(master powered and in teaching mode? right bus in the profile's master_can?)")
            time.sleep(0.005)

    def disconnect(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is not None and self._own_port:
            sdk.DisconnectPort()
        self._own_port = False

    def read_command(self) -> tuple[np.ndarray, float]:
        """``(q7, stamp_s)``: J1..J6 (rad) and gripper stroke (m) the master commands, and the
        ``time.monotonic()`` of the older of its newest joint and gripper frames."""
        if self._sdk is None:
            raise ArmFault(f"master arm on {self.config.can_name} is not connected")
        j, g = self._sdk.GetArmJointCtrl(), self._sdk.GetArmGripperCtrl()
        jc = j.joint_ctrl
        q = np.array([jc.joint_1, jc.joint_2, jc.joint_3, jc.joint_4, jc.joint_5, jc.joint_6], np.float64)
        q7 = np.append(q / MDEG_PER_RAD, um_to_m(g.gripper_ctrl.grippers_angle))
        return q7, _wall_to_monotonic(min(j.time_stamp, g.time_stamp))

    def faults(self) -> list[str]:
        if self._sdk is None:
            return [f"master arm {self.config.can_name}: not connected"]
        age_s = time.monotonic() - self.read_command()[1]
        if age_s > self.config.command_timeout_s:
            return [f"master arm {self.config.can_name}: no commands for {age_s * 1000:.0f} ms"]
        return []
