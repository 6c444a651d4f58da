"""Synthetic cameras: a drawn table, a target disc and the two arms, for the simulated robot.

Usage::

    scene = Scene(joint_state=lambda: q14, target_xy_m=(0.0, 0.35))
    src = SyntheticSource("cam_high", scene, fps=30.0, jitter_s=0.002)
    rig = CameraRig([Camera("cam_high", src)])      # vla_edge.firmware_bridge.cameras
    src.stall(); src.stall(False); src.fail()       # fault injection
    src.reformat(320, 240); src.reformat(grey=True)  # ... the camera renegotiates: another size or format
    img = SceneRenderer("cam_high", scene, 640, 480).render()   # one frame, no clock

Units: lengths in metres in the table frame of :class:`Scene` (x right, y away from the robot,
height up), joint angles in radians, gripper stroke in metres, times in seconds
(``time.monotonic()``). Frames are RGB ``uint8`` ``(height, width, 3)``.

:class:`SyntheticSource` is a :class:`~vla_edge.firmware_bridge.cameras.FrameSource` for one of the
views ``cam_high`` (looking down at the table), ``cam_left_wrist`` or ``cam_right_wrist`` (looking
down from the fingertip), paced at ``fps`` with Gaussian timing jitter. :func:`arm_points` is the
planar arm model it draws, and :data:`LINKS_M` its link lengths (``edge.sim.task`` inverts it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from vla_edge.firmware_bridge.cameras import CAMERA_NAMES, FramePacer


@dataclass
class Scene:
    """What the synthetic cameras see. Table coordinates: x right, y away from the robot, metres.

    ``joint_state`` returns the robot's 14-vector ``[L j1..j6 rad, L gripper m, R ...]``.
    """

    joint_state: Callable[[], np.ndarray] = field(default=lambda: np.zeros(14))
    target_xy_m: tuple[float, float] = (0.0, 0.35)
    target_radius_m: float = 0.03
    target_rgb: tuple[int, int, int] = (220, 40, 40)
    arm_base_x_m: tuple[float, float] = (-0.3, 0.3)
    """x of the left and right arm bases (both at y = 0)."""


LINKS_M = (0.28, 0.25, 0.09)
"""Link lengths of :func:`arm_points` in metres: upper arm, forearm, wrist-to-fingertip."""
_TABLE_RGB = (150, 120, 90)
_FLOOR_RGB = (60, 60, 70)


def arm_points(q7, base_x_m: float) -> np.ndarray:
    """Shoulder, elbow, wrist and fingertip as ``(4, 3)`` [x, y, height] metres: a simple planar model.

    j1 yaws the arm about the vertical axis, j2 tilts the upper arm from vertical, j3 folds the
    forearm (horizontal at j3 = 0), j5 pitches the wrist. Good enough to draw, not kinematics.
    """
    j1, j2, j3, _j4, j5 = (float(v) for v in q7[:5])
    pitch = [j2, j2 + math.pi / 2 + j3, j2 + math.pi / 2 + j3 + j5]
    r, h = 0.0, 0.15
    pts = [(0.0, h)]
    for length, a in zip(LINKS_M, pitch, strict=True):
        r, h = r + length * math.sin(a), h + length * math.cos(a)
        pts.append((r, h))
    return np.array([[base_x_m + r * math.sin(j1), r * math.cos(j1), hh] for r, hh in pts])


class SceneRenderer:
    """Draws one view. ``cam_high`` looks down at the table; wrist views look from the fingertip."""

    def __init__(self, view: str, scene: Scene, width: int, height: int) -> None:
        if view not in CAMERA_NAMES:
            raise ValueError(f"unknown view {view!r}; expected one of {CAMERA_NAMES}")
        self.view, self.scene, self.w, self.h = view, scene, width, height
        self._bg = np.empty((height, width, 3), np.uint8)
        self._bg[:] = _FLOOR_RGB
        if view == "cam_high":
            p0, p1 = self._top(-0.6, 0.8), self._top(0.6, -0.05)
            cv2.rectangle(self._bg, p0, p1, _TABLE_RGB, -1)
        else:
            self._bg[:] = _TABLE_RGB

    def _top(self, x_m: float, y_m: float) -> tuple[int, int]:
        s = self.w / 1.4
        return int(self.w / 2 + x_m * s), int(self.h - 20 - y_m * s)

    def render(self) -> np.ndarray:
        sc = self.scene
        img = self._bg.copy()
        q = np.asarray(sc.joint_state(), dtype=np.float64).reshape(14)
        arms = [arm_points(q[0:7], sc.arm_base_x_m[0]), arm_points(q[7:14], sc.arm_base_x_m[1])]
        tx, ty = sc.target_xy_m
        if self.view == "cam_high":
            s = self.w / 1.4
            cv2.circle(img, self._top(tx, ty), max(2, int(sc.target_radius_m * s)), sc.target_rgb, -1)
            for pts, grip in zip(arms, (q[6], q[13]), strict=True):
                px = [self._top(p[0], p[1]) for p in pts]
                for a, b in zip(px, px[1:], strict=False):
                    cv2.line(img, a, b, (230, 230, 230), 6)
                for p, pt in zip(px, pts, strict=True):
                    cv2.circle(img, p, 6 + int(20 * max(pt[2], 0.0)), (40, 40, 40), -1)
                cv2.circle(img, px[-1], 4 + int(grip * 150), (250, 200, 0), 2)
        else:
            side = 0 if self.view == "cam_left_wrist" else 1
            tip = arms[side][-1]
            yaw = float(q[7 * side])
            height_m = max(float(tip[2]), 0.05)
            f = self.w * 0.25 / height_m  # pixels per metre on the table at this height
            dx, dy = tx - tip[0], ty - tip[1]
            rx = dx * math.cos(yaw) - dy * math.sin(yaw)
            ry = dx * math.sin(yaw) + dy * math.cos(yaw)
            centre = (int(self.w / 2 + rx * f), int(self.h / 2 - ry * f))
            if abs(centre[0]) < 4 * self.w and abs(centre[1]) < 4 * self.h:
                cv2.circle(img, centre, max(2, int(sc.target_radius_m * f)), sc.target_rgb, -1)
            gap = int(40 + q[7 * side + 6] * 3000)
            for sign in (-1, 1):
                x = self.w // 2 + sign * gap // 2
                cv2.rectangle(img, (x - 12, self.h - 120), (x + 12, self.h), (90, 90, 90), -1)
        return img


class SyntheticSource:
    """Synthetic frames of one view at ``fps`` with ``jitter_s`` timing noise (RGB uint8).

    It has no thread of its own: the :class:`~vla_edge.firmware_bridge.cameras.Camera` reading it
    does, and :meth:`close` ends a blocked :meth:`read` through the pacer.
    """

    def __init__(self, view: str, scene: Scene | None = None, fps: float = 30.0, jitter_s: float = 0.002,
                 width: int = 640, height: int = 480, seed: int = 0) -> None:
        self.view = view
        self.scene = scene or Scene()
        self._grey = False
        self.fps, self.jitter_s, self.seed = fps, jitter_s, seed
        self._renderer = SceneRenderer(view, self.scene, width, height)
        self._pacer: FramePacer | None = None
        self._stalled = threading.Event()
        self._failed = False

    def open(self) -> None:
        self._failed = False
        self._pacer = FramePacer(self.fps, self.jitter_s, self.seed)

    def read(self) -> tuple[np.ndarray, float] | None:
        pacer = self._pacer
        if pacer is None or not pacer.wait():
            return None
        while self._stalled.is_set():  # a stalled camera: no frames, no error
            if pacer.closed.wait(0.005):
                return None
        if self._failed:
            return None
        stamp = time.monotonic()
        img = self._renderer.render()
        return (cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if self._grey else img), stamp

    def close(self) -> None:
        if self._pacer is not None:
            self._pacer.closed.set()

    # fault injection
    def stall(self, stalled: bool = True) -> None:
        """Stop (or restart) delivering frames without reporting an error."""
        if stalled:
            self._stalled.set()
        else:
            self._stalled.clear()

    def reformat(self, width: int | None = None, height: int | None = None, grey: bool = False) -> None:
        """From the next frame on, deliver ``width`` x ``height`` pixels (default: as now), single-channel
        when ``grey``: a USB camera that renegotiated, or another device on the same path."""
        r = self._renderer
        self._renderer = SceneRenderer(self.view, self.scene, width or r.w, height or r.h)
        self._grey = grey

    def fail(self) -> None:
        """The device disappears: the next read returns None (the camera is gone)."""
        self._failed = True
