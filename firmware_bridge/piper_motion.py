"""Joint velocities and efforts of a Piper arm, from its high-speed driver feedback via piper_sdk.

Usage::

    qvel7, effort7 = read_motion("can_left")   # the arm's bus, already connected by PiperArm

The arm sends 0x251..0x256 (one frame per joint motor: int16 speed in 0.001 rad/s, int16 current in
0.001 A, int32 position; big-endian); piper_sdk parses them into ``GetArmHighSpdInfoMsgs`` and turns the
current into an effort in 0.001 N m with its fixed per-joint coefficients. The gripper's effort comes
from its 0x2A8 feedback (0.001 N m); the gripper reports no velocity. Values are NaN when those frames
never came or are older than ``max_age_s`` (the simulated arm does not send them).

piper_sdk keeps one interface object per bus name, so this reads the interface :class:`PiperArm`
connected; it never opens a port or sends anything.
"""

from __future__ import annotations

import time

import numpy as np
from piper_sdk import C_PiperInterface_V2


def read_motion(can_name: str, max_age_s: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(qvel7, effort7)``: J1..J6 velocity (rad/s) and effort (N m), gripper velocity (NaN) and effort."""
    sdk = C_PiperInterface_V2(can_name, judge_flag=False, can_auto_init=False)
    qvel, effort = np.full(7, np.nan), np.full(7, np.nan)
    now = time.time()
    hs = sdk.GetArmHighSpdInfoMsgs()
    if hs.time_stamp > 0 and now - hs.time_stamp <= max_age_s:
        motors = [hs.motor_1, hs.motor_2, hs.motor_3, hs.motor_4, hs.motor_5, hs.motor_6]
        qvel[:6] = [m.motor_speed / 1000.0 for m in motors]
        effort[:6] = [m.effort / 1000.0 for m in motors]
    g = sdk.GetArmGripperMsgs()
    if g.time_stamp > 0 and now - g.time_stamp <= max_age_s:
        effort[6] = g.gripper_state.grippers_effort / 1000.0
    return qvel, effort
