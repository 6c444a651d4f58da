"""Robot profiles: a TOML file per robot (``edge/robots/<name>.toml``) says where each device is and its limits.

Usage::

    profile = load_profile("cobot_magic")     # or "sim", or a path to a .toml
    profile.arms["left"].can_name             # "can_left"; joint limits in rad (grippers m)
    profile.base.max_linear_mps               # the TRACER's limits, m/s and rad/s
    profile.sim                               # the [sim] table (None on a real robot)

A ``[sim]`` table makes the robot simulated: :class:`~vla_edge.edge.robot.Robot` then starts the simulators
(Piper on virtual CAN, TRACER on a pseudo-terminal, synthetic cameras) before connecting to them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import PIPER_JOINT_HI, PIPER_JOINT_LO
from vla_edge.firmware_bridge.piper_arm import PiperArmConfig
from vla_edge.firmware_bridge.tracer_base import TracerBaseConfig

PROFILE_DIR = Path(__file__).parent / "robots"
SIDES = ("left", "right")


@dataclass
class CameraSettings:
    """``source``: opencv (``devices`` are V4L2 paths or indices), synthetic, or replay
    (``replay`` is an HDF5 episode or a video file per camera)."""

    source: str = "opencv"
    devices: dict[str, str | int] = field(default_factory=dict)
    replay: dict[str, str] = field(default_factory=dict)
    width: int = 640
    height: int = 480
    fps: float = 30.0
    fourcc: str = "MJPG"
    max_skew_s: float = 0.017
    stale_after_s: float = 0.067


@dataclass
class SimSettings:
    """Simulator knobs: the ``[sim]`` table of a profile (its presence makes the robot simulated)."""

    feedback_hz: float = 200.0
    joint_speed_radps: float = 3.0
    camera_jitter_s: float = 0.002
    target_xy_m: tuple[float, float] = (0.0, 0.35)
    initial_qpos: tuple[float, ...] = (0.0,) * 7
    camera_names: tuple[str, ...] = ("cam_high", "cam_left_wrist", "cam_right_wrist")


@dataclass
class RobotConfig:
    name: str
    control_rate_hz: float
    arms: dict[str, PiperArmConfig]
    base: TracerBaseConfig
    cameras: CameraSettings
    sim: SimSettings | None = None


def profile_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in str(name_or_path):
        if not p.exists():
            raise VlaEdgeError(f"robot profile {p} not found")
        return p
    p = PROFILE_DIR / f"{name_or_path}.toml"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.toml")))
        raise VlaEdgeError(f"unknown robot profile {name_or_path!r} (known: {known}; or give a .toml path)")
    return p


def load_profile(name_or_path: str | Path) -> RobotConfig:
    """Read a profile by name (``sim``, ``cobot_magic``) or path; raises VlaEdgeError if invalid."""
    path = profile_path(name_or_path)
    try:
        d = tomllib.loads(path.read_text())
        arms_d = dict(d["arms"])
        lo = [float(v) for v in arms_d.pop("joint_lo", PIPER_JOINT_LO)]
        hi = [float(v) for v in arms_d.pop("joint_hi", PIPER_JOINT_HI)]
        if len(lo) != 7 or len(hi) != 7:
            raise ValueError("arms.joint_lo/joint_hi need 7 values (J1..J6 rad, gripper m)")
        for i in range(7):
            if not PIPER_JOINT_LO[i] - 1e-9 <= lo[i] < hi[i] <= PIPER_JOINT_HI[i] + 1e-9:
                raise ValueError(f"joint {i + 1} limits [{lo[i]}, {hi[i]}] outside the Piper's published limits")
        common = {k: v for k, v in arms_d.items() if k not in SIDES}
        arms = {
            side: PiperArmConfig(can_name=arms_d[side]["can"], joint_lo=lo, joint_hi=hi, **common) for side in SIDES
        }
        base = TracerBaseConfig(**d["base"])
        cam_d = dict(d["cameras"])
        cameras = CameraSettings(**cam_d)
        sim = None
        if "sim" in d:  # a [sim] table: the devices are simulators started by Robot.connect()
            sim = SimSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["sim"].items()})
        return RobotConfig(
            name=d.get("name", path.stem),
            control_rate_hz=float(d.get("control_rate_hz", 30.0)),
            arms=arms,
            base=base,
            cameras=cameras,
            sim=sim,
        )
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise VlaEdgeError(f"robot profile {path}: {type(e).__name__}: {e}") from e
