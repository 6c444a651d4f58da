"""A reach task for the simulated Cobot Magic, its scripted expert and its success test.

The task (what ``vla-edge eval`` measures and what ``vla-edge train-tiny`` learns)::

    A red disc appears on the table at one of 4 spots (2 in front of each arm, 16 cm apart across,
    each jittered by up to ``jitter_m``). The arm on the disc's side reaches over it; the other arm
    stays in its ready pose. Success: the reaching arm's fingertip is within ``tolerance_m`` of the
    disc centre (horizontally) and below ``max_tip_height_m``, for ``hold_ticks`` control ticks in a row.

Geometry has one source of truth: :func:`vla_edge.firmware_bridge.camera_sim.arm_points`, the planar arm model the
synthetic cameras draw. The expert's reach pose is that model's inverse (:func:`reach_pose`), and the
success test evaluates that same model on the simulator's measured joints.

The expert (:class:`ExpertPolicy`) implements the policy interface of the control loop
(``start_episode(instruction, navigation)``, ``step(frames, state) -> ActionChunk``). It reads the
target from the simulator (``robot.sim``), not from the images, and moves each joint of the reaching
arm toward the reach pose at ``step_rad`` per tick until it gets there. It is Markov: its chunk depends only on the measured state, so any recorded
tick with the next five actions is a valid training sample.

Runtime-safe: numpy only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import PIPER_JOINT_HI, PIPER_JOINT_LO
from vla_edge.edge.policy import ActionChunk
from vla_edge.firmware_bridge.camera_sim import LINKS_M, Scene, arm_points

INSTRUCTION = "touch the red target"
"""The instruction of every reach episode (recorded with the data, used by training and eval)."""

READY_Q7 = (0.0, 1.0, -1.2, 0.0, 0.3, 0.0, 0.0)
"""Ready pose of each arm (J1..J6 rad, gripper m): the sim profile's ``initial_qpos``."""

SHOULDER_HEIGHT_M = 0.15
"""Height of the shoulder joint above the table in :func:`arm_points`."""


class TaskError(VlaEdgeError):
    """A target the arm cannot reach, or a task used on a robot that is not simulated."""


@dataclass(frozen=True)
class Episode:
    """One seeded episode: where the target is, which arm reaches, the pose that touches it."""

    seed: int
    target_xy_m: tuple[float, float]
    side: str  # "left" or "right"
    reach_q14: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class ReachTask:
    """Target layout, tolerances and expert speed. All lengths in metres, table frame of :class:`Scene`.

    ``spots_dx_m`` are offsets across from each arm's base, ``spots_y_m`` distances in front of the
    robot: 2 x 1 spots per arm (an earlier layout had 3 x 2; 4 well-separated spots keep the target
    readable by a tiny vision trunk trained in minutes on a CPU). ``hover_m``: the expert's fingertip
    height over the target. ``start_spread_rad``: training episodes start from the ready pose plus a
    uniform offset of up to this much on J1, J2, J3 and J5 of both arms (:meth:`start_pose`), so the
    state alone does not say where to go and the policy must read the target from the image.
    """

    arm_base_x_m: tuple[float, float] = Scene.arm_base_x_m
    spots_dx_m: tuple[float, ...] = (-0.08, 0.08)
    spots_y_m: tuple[float, ...] = (0.43,)
    jitter_m: float = 0.01
    target_radius_m: float = 0.05
    tolerance_m: float = 0.04
    max_tip_height_m: float = 0.12
    hover_m: float = 0.05
    hold_ticks: int = 5
    step_rad: float = 0.04
    start_spread_rad: float = 0.3
    ready_q7: tuple[float, ...] = READY_Q7

    @property
    def ready_q14(self) -> np.ndarray:
        return np.array(self.ready_q7 * 2, dtype=np.float64)

    @property
    def n_spots(self) -> int:
        return 2 * len(self.spots_dx_m) * len(self.spots_y_m)

    def start_pose(self, seed: int, spread_rad: float | None = None) -> np.ndarray:
        """A randomised start (14,) for ``seed``: the ready pose plus U(-spread, spread) rad on J1, J2, J3, J5
        of both arms, within the Piper's limits (``spread_rad`` defaults to ``start_spread_rad``)."""
        spread = self.start_spread_rad if spread_rad is None else spread_rad
        rng = np.random.default_rng([seed, 7])  # independent of the target draw of sample(seed)
        q = self.ready_q14
        for arm in (0, 7):
            q[[arm + 0, arm + 1, arm + 2, arm + 4]] += rng.uniform(-spread, spread, 4)
        return np.clip(q, np.array(PIPER_JOINT_LO * 2), np.array(PIPER_JOINT_HI * 2))

    def sample(self, seed: int) -> Episode:
        """The episode of ``seed``: a spot (uniform over the spots) plus uniform jitter."""
        rng = np.random.default_rng(seed)
        spot = int(rng.integers(self.n_spots))
        per_arm = len(self.spots_dx_m) * len(self.spots_y_m)
        side_i, rest = divmod(spot, per_arm)
        ix, iy = divmod(rest, len(self.spots_y_m))
        jx, jy = rng.uniform(-self.jitter_m, self.jitter_m, 2)
        x = self.arm_base_x_m[side_i] + self.spots_dx_m[ix] + float(jx)
        y = self.spots_y_m[iy] + float(jy)
        return self.episode_for(seed, (x, y))

    def episode_for(self, seed: int, target_xy_m: tuple[float, float]) -> Episode:
        """The episode for a given target: the nearer arm reaches (ties go left)."""
        x, y = float(target_xy_m[0]), float(target_xy_m[1])
        side_i = 0 if abs(x - self.arm_base_x_m[0]) <= abs(x - self.arm_base_x_m[1]) else 1
        q = self.ready_q14
        q[7 * side_i : 7 * side_i + 7] = reach_pose(x - self.arm_base_x_m[side_i], y, self.hover_m, self.ready_q7[6])
        return Episode(seed=seed, target_xy_m=(x, y), side=("left", "right")[side_i], reach_q14=q)

    # -- success ---------------------------------------------------------------------------------
    def tip_error(self, q14, target_xy_m) -> tuple[float, float]:
        """``(horizontal distance m, height m)`` of the fingertip nearer the target, from measured joints."""
        q = np.asarray(q14, dtype=np.float64).reshape(14)
        best = (math.inf, math.inf)
        for side_i in (0, 1):
            tip = arm_points(q[7 * side_i : 7 * side_i + 7], self.arm_base_x_m[side_i])[-1]
            d = math.hypot(tip[0] - target_xy_m[0], tip[1] - target_xy_m[1])
            if d < best[0]:
                best = (d, float(tip[2]))
        return best

    def at_target(self, q14, target_xy_m) -> bool:
        """The geometric test of one tick (success needs it for ``hold_ticks`` ticks in a row)."""
        d, h = self.tip_error(q14, target_xy_m)
        return d <= self.tolerance_m and h <= self.max_tip_height_m


def reach_pose(dx_m: float, dy_m: float, hover_m: float, gripper_m: float = 0.0) -> np.ndarray:
    """Joints (7,) that put the fingertip of an arm ``hover_m`` above the table point (dx, dy) from its base.

    The inverse of :func:`arm_points`: J1 yaws toward the point, J2/J3 solve the two-link reach
    (elbow up) for the wrist, J5 points the last link down, tilted as little as the joint limits
    allow (tilts tried: 0, +-0.1, ... +-0.6 rad from vertical). Raises :class:`TaskError` if no
    tilt gives a pose within the Piper's limits.
    """
    for k in range(13):
        tilt_rad = 0.1 * ((k + 1) // 2) * (1 if k % 2 else -1)
        q = _reach_pose_tilted(dx_m, dy_m, hover_m, tilt_rad, gripper_m)
        if q is not None:
            return q
    raise TaskError(f"no reach pose within the joint limits for ({dx_m:.3f}, {dy_m:.3f}) m from the arm base")


def _reach_pose_tilted(dx_m, dy_m, hover_m, tilt_rad, gripper_m) -> np.ndarray | None:
    upper, fore, hand = LINKS_M
    j1 = math.atan2(dx_m, dy_m)
    a3 = math.pi + tilt_rad  # last-link pitch from vertical (pi: straight down; > pi: tilted back)
    r = math.hypot(dx_m, dy_m) - hand * math.sin(a3)  # wrist, horizontally from the base
    wz = hover_m - hand * math.cos(a3) - SHOULDER_HEIGHT_M  # wrist height relative to the shoulder
    dist = math.hypot(r, wz)
    cos_alpha = (upper**2 + dist**2 - fore**2) / (2 * upper * dist)
    if not -1.0 <= cos_alpha <= 1.0:
        return None  # out of reach
    a1 = math.atan2(r, wz) - math.acos(cos_alpha)  # upper-arm pitch from vertical (elbow up)
    ex, ez = upper * math.sin(a1), upper * math.cos(a1)
    a2 = math.atan2(r - ex, wz - ez)  # forearm pitch from vertical
    q = np.array([j1, a1, a2 - a1 - math.pi / 2, 0.0, a3 - a2, 0.0, gripper_m])
    if np.any(q < np.asarray(PIPER_JOINT_LO)) or np.any(q > np.asarray(PIPER_JOINT_HI)):
        return None
    return q


def expert_chunk(q14, goal_q14, step_rad: float, chunk_size: int = 5) -> np.ndarray:
    """(chunk_size, 14) targets from ``q14`` toward ``goal_q14``: each joint moves ``step_rad`` per step
    toward its goal (less on the last step) and then stays there.

    Far from the goal a chunk is the state shifted by a fixed amount per step, so a small model learns it
    as "copy the proprio token, shift it"; the image only has to tell which way and where to stop.
    """
    q = np.asarray(q14, dtype=np.float64)
    delta = np.asarray(goal_q14, dtype=np.float64) - q
    reach = np.arange(1, chunk_size + 1, dtype=np.float64)[:, None] * step_rad
    return q[None, :] + np.clip(delta[None, :], -reach, reach)


class ExpertPolicy:
    """The scripted expert as a control-loop policy: reads the target from the simulator's scene."""

    provider = "expert"

    def __init__(self, task: ReachTask, sim, chunk_size: int = 5):
        if sim is None:
            raise TaskError("the scripted expert needs a simulated robot (robot.sim)")
        self.task, self.sim, self.chunk_size = task, sim, chunk_size
        self.episode: Episode | None = None

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        if navigation:
            raise TaskError("the reach expert does not navigate")
        self.episode = self.task.episode_for(-1, self.sim.scene.target_xy_m)

    def step(self, frames, state) -> ActionChunk:
        if self.episode is None:
            raise TaskError("call start_episode() before step()")
        joints = expert_chunk(state, self.episode.reach_q14, self.task.step_rad, self.chunk_size)
        return ActionChunk(joints=joints, timings_ms={"total": 0.0})
