"""The simulated operator of ``vla-edge record --robot sim``: moves the simulated master arms
(:mod:`vla_edge.firmware_bridge.piper_master_sim`) with the reach task's scripted expert, one expert step
per control period (``rate_hz``), so the whole record path runs through the real piper_sdk.

Usage::

    teleop = SimTeleoperator(robot, masters, rate_hz=30.0, instruction="touch the red target").start()
    teleop.reset(seed)          # target and start pose of the seed's episode; masters hold it
    teleop.go()                 # the masters move
    teleop.stop()
"""

from __future__ import annotations

import threading
import time

import numpy as np
from vla_edge.edge.profile import SIDES
from vla_edge.edge.sim.task import ExpertPolicy, ReachTask


class SimTeleoperator:
    """Moves the simulated master arms like an operator would: the reach task's scripted expert."""

    def __init__(self, robot, masters: dict, rate_hz: float, instruction: str):
        self.robot, self.masters, self.dt = robot, masters, 1.0 / rate_hz
        self.task = ReachTask()
        self.expert = ExpertPolicy(self.task, robot.sim)
        self.instruction = instruction
        self.q14 = robot.read_state().qpos.copy()
        self._running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sim-teleoperator", daemon=True)
        self._set(self.q14)

    def _set(self, q14) -> None:
        for i, side in enumerate(SIDES):
            self.masters[side].set_pose(q14[7 * i : 7 * i + 6], q14[7 * i + 6])

    def start(self) -> SimTeleoperator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def reset(self, seed: int) -> None:
        """Target and start pose of ``seed``'s episode; the masters hold it until :meth:`go`."""
        self._running.clear()
        ep = self.task.sample(seed)
        self.robot.sim.scene.target_radius_m = self.task.target_radius_m
        self.robot.sim.set_target(*ep.target_xy_m)
        self.q14 = self.task.start_pose(seed)
        self._set(self.q14)
        self.expert.start_episode(self.instruction)

    def puppets_there(self) -> bool:
        return bool(np.max(np.abs(self.robot.read_state().qpos - self.q14)) < 2e-3)

    def go(self) -> None:
        """Start moving the masters (the expert's step per control period)."""
        self._running.set()

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            if self._running.is_set():
                self.q14 = self.expert.step(None, self.q14).joints[0]
                self._set(self.q14)
            next_t += self.dt
            if time.monotonic() - next_t > self.dt:  # the process stalled: no burst of steps after it
                next_t = time.monotonic()
