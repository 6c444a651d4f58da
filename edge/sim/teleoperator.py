"""The simulated operator of ``vla-edge record --robot sim``: moves the simulated master arms
(:mod:`vla_edge.firmware_bridge.piper_master_sim`) with the reach task's scripted expert, one expert step
per control period (``rate_hz``), so the whole record path runs through the real piper_sdk.

Usage::

    teleop = SimTeleoperator(robot, masters, rate_hz=30.0, instruction="touch the red target").start()
    teleop.reset(seed)          # target and start pose of the seed's episode; masters hold it
    teleop.go()                 # the masters move
    teleop.done()               # True once it held the reach pose for linger_ticks: the operator's "n"
    teleop.stop()

Like a person pressing **n** once the target is touched, the operator ends each episode ``linger_ticks``
control periods (default 15: ``record --hold-seconds 0.5`` at 30 Hz) after its masters reach the reach pose: the puppets catch up
(a tick or two) and hold it for the task's 5-tick success test and 10 ticks more, as
:func:`~vla_edge.edge.sim.evaluate.record_expert_episodes` lingers after success. A reach episode is then
about 1.3 s (38 ticks) instead of whatever ``--episode-seconds`` says, most of a fixed 2 s one being the
arm holding still over the target.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from vla_edge.edge.profile import SIDES
from vla_edge.edge.sim.task import ExpertPolicy, ReachTask


class SimTeleoperator:
    """Moves the simulated master arms like an operator would: the reach task's scripted expert."""

    def __init__(self, robot, masters: dict, rate_hz: float, instruction: str, linger_ticks: int = 15,
                 start_spread_rad: float | None = None):
        self.robot, self.masters, self.dt = robot, masters, 1.0 / rate_hz
        self.linger_ticks = linger_ticks
        self._at_goal_ticks = 0
        self.task = ReachTask()
        self.start_spread_rad = self.task.start_spread_rad if start_spread_rad is None else start_spread_rad
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
        self.q14 = self.task.start_pose(seed, self.start_spread_rad)
        self._set(self.q14)
        self.expert.start_episode(self.instruction)
        self._at_goal_ticks = 0

    def puppets_there(self) -> bool:
        return bool(np.max(np.abs(self.robot.read_state().qpos - self.q14)) < 2e-3)

    def done(self) -> bool:
        """The episode's demonstration is over: the masters held the reach pose for ``linger_ticks``."""
        return self._at_goal_ticks >= self.linger_ticks

    def go(self) -> None:
        """Start moving the masters (the expert's step per control period)."""
        self._running.set()

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            if self._running.is_set():
                q14 = self.expert.step(None, self.q14).joints[0]
                at_goal = bool(np.allclose(q14, self.q14, rtol=0.0, atol=1e-9))  # no step left: it is there
                self.q14 = q14
                self._set(self.q14)
                self._at_goal_ticks = self._at_goal_ticks + 1 if at_goal else 0
            next_t += self.dt
            if time.monotonic() - next_t > self.dt:  # the process stalled: no burst of steps after it
                next_t = time.monotonic()
