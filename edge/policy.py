"""The policy seam: what the control loop runs on its inference thread, whatever computes it.

A :class:`Policy` is the ONNX :class:`~vla_edge.edge.engine.Engine` on a bundle, the reach task's scripted
expert (:class:`~vla_edge.edge.sim.task.ExpertPolicy`), the checkpoint's PyTorch model
(:class:`vla_edge.export.torch_policy.TorchPolicy`), or a policy served elsewhere. Each step answers one
observation with an :class:`ActionChunk`. (The master arms of ``vla-edge record`` answer every tick on the
control thread instead: :class:`~vla_edge.edge.loop.TickSource`.)

Usage::

    policy.start_episode("pick up the red cube", navigation=False)
    chunk = policy.step(frames, state)   # frames: RGB uint8 (H, W, 3) per camera; state (14,) rad / m
    chunk.joints                         # (5, 14) absolute targets, rad (grippers m), or None
    chunk.base                           # ("forward", 0.4) m / ("turn_left", 30.0) deg / None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class ActionChunk:
    """One policy output.

    ``joints``: (chunk_size, action_dim) absolute joint targets, radians for joints and metres for
    grippers, in the robot's 14-vector order. ``None`` for a navigation step that moves the base.
    ``base``: ``(direction, value)`` for navigation outputs: metres for ``forward``, degrees for
    turns, ``("stop", 0.0)`` when the model chose to manipulate; ``None`` in manipulation mode.
    """

    joints: np.ndarray | None
    base: tuple[str, float] | None = None
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    timings_ms: dict[str, float] = field(default_factory=dict)
    decode_calls: int = 0


class Policy(Protocol):
    """Answers observations with action chunks; one step at a time, from one thread."""

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        """A new episode: the instruction (and whether to drive the base) of every step that follows."""

    def step(self, frames: list[np.ndarray], state: np.ndarray) -> ActionChunk:
        """One observation (the layout's cameras in order; the 14-value state) -> one chunk."""
