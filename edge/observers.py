"""Tick observers: what watches a run without steering it (the episode recorder, the live view).

The control loop hands each observer every tick, every chunk boundary and every event (an e-stop, a resume,
a fault) in the spirit of openpi's ``Subscriber``; an observer never holds a tick up (the recorder queues
for its writer thread, the live view drops what it is behind on). Run statistics stay with the loop: they
time the tick itself.

Usage::

    class Printer:
        def on_tick(self, tick: Tick) -> None: print(tick.index, tick.qpos[:7])
        def on_chunk(self, index: int, t_s: float, chunk, note: str) -> None: ...
        def on_event(self, index: int, t_s: float, kind: str, reason: str) -> None: ...

    ControlLoop(robot, policy, instruction, cfg, safety, estop, stats, observers=[recorder, Printer()])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Tick:
    """One control tick as observed. ``index``: the tick's deadline index; ``t_s``: its start
    (``time.monotonic()``). ``frames``: camera -> RGB uint8 (H, W, 3), only the cameras that had a frame;
    ``stamps_s``: their capture times (s). ``qpos`` (14,) measured, ``action`` (14,) the command in force
    (rad, grippers m); ``base`` ``(vx m/s, wz rad/s)``; ``clamps``: safety-filter clamps this tick;
    ``qvel`` (rad/s) / ``effort`` (N m) (14,) where the arms report them, else None."""

    index: int
    t_s: float
    frames: dict
    stamps_s: dict
    qpos: np.ndarray
    action: np.ndarray
    base: tuple[float, float]
    clamps: int = 0
    qvel: np.ndarray | None = None
    effort: np.ndarray | None = None


class TickObserver(Protocol):
    def on_tick(self, tick: Tick) -> None:
        """Every tick, on the control thread: queue or drop, never block."""

    def on_chunk(self, index: int, t_s: float, chunk, note: str) -> None:
        """A policy chunk took effect at tick ``index`` (its :class:`~vla_edge.edge.policy.ActionChunk`)."""

    def on_event(self, index: int, t_s: float, kind: str, reason: str) -> None:
        """``estop``, ``resume``, ``fault``, ``episode``, from whichever thread saw it."""
