"""The whole robot behind one small interface: two Piper arms, a TRACER base, three cameras.

A robot profile (TOML, ``edge/robots/<name>.toml``) says where each device is and its limits;
:func:`~vla_edge.edge.profile.load_profile` reads it into a :class:`~vla_edge.edge.profile.RobotConfig`. :class:`Robot` is what the control
loop uses::

    robot = Robot(load_profile("sim"))       # or "cobot_magic", or a path to a .toml
    robot.connect()                           # sim: starts the simulators first
    state = robot.read_state()                # qpos (14,) [L j1..j6 rad, L gripper m, R ...]
    frames = robot.read_frames()              # FrameSet: RGB uint8 per camera, ages_s, skew_s
    robot.send_joint_targets(q14)             # clamped to the profile's joint limits
    robot.send_base_velocity(0.1, 0.0)        # m/s, rad/s; clamped, ramped, streamed at 50 Hz
    robot.faults()                            # [] when healthy
    robot.commanded_qpos()                    # (14,) what the arms were last told (holds included)
    robot.hold()                              # base ramps to zero, arms re-sent their last target
    robot.estop(); robot.resume()             # base zero frame at once; arms hold or firmware e-stop
    robot.disconnect()                        # base zero, arms hold their last target (never disabled)

Holds never move: an arm holds its last *commanded* target (re-sent), never a measured pose, so no
hold differs from the last command by more than the safety filter's step (by nothing at all).

Thread model: one control thread calls ``send_*``/``read_*``; :meth:`Robot.estop` may come from
another thread (a keyboard), each arm's commands are serialised by the arm's lock.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.profile import SIDES, RobotConfig, SimSettings
from vla_edge.firmware_bridge.camera_replay import ReplaySource
from vla_edge.firmware_bridge.camera_sim import Scene, SyntheticSource
from vla_edge.firmware_bridge.cameras import (
    Camera,
    CameraRig,
    OpenCVSource,
)
from vla_edge.firmware_bridge.piper_arm import PiperArm, PiperArmConfig
from vla_edge.firmware_bridge.piper_sim import PiperSim, PiperSimConfig
from vla_edge.firmware_bridge.tracer_base import TracerBase, TracerBaseConfig
from vla_edge.firmware_bridge.tracer_sim import TracerSim

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RobotState:
    """``qpos`` (14,) float64 ``[L j1..j6 rad, L gripper m, R j1..j6 rad, R gripper m]``.

    ``stamps_s``: ``time.monotonic()`` of the newest joint feedback of each arm (left, right).
    Base: measured ``base_vx_mps``, ``base_wz_radps`` at ``base_stamp_s``.
    """

    qpos: np.ndarray
    stamps_s: tuple[float, float]
    base_vx_mps: float
    base_wz_radps: float
    base_stamp_s: float
    enabled: bool
    estopped: bool


@dataclass
class SimHandle:
    """Reach into the simulators (tests, evaluation). Present only for profiles with a ``[sim]`` table."""

    arms: dict
    base: object
    scene: Scene
    cameras: dict[str, SyntheticSource]

    def set_target(self, x_m: float, y_m: float) -> None:
        """Move the target object on the table (metres, table frame)."""
        self.scene.target_xy_m = (x_m, y_m)

    def joint_state(self) -> np.ndarray:
        """Simulated truth of the 14-vector."""
        return np.concatenate([self.arms[s].joint_state() for s in SIDES])

    def base_pose(self) -> tuple[float, float, float]:
        return self.base.pose()


class RobotIO(Protocol):
    """The robot as the control loop and the session see it (units as in :class:`Robot`). :class:`Robot` is
    the Cobot Magic's (and its simulator's); another robot implements these and runs the same loop."""

    camera_names: list[str]

    def read_state(self) -> RobotState: ...
    def read_frames(self): ...
    def latest_frames(self, names: list[str]) -> tuple[dict, dict]: ...
    def faults(self) -> list[str]: ...
    def base_estop_reported(self) -> bool: ...
    def commanded_qpos(self) -> np.ndarray | None: ...
    def send_joint_targets(self, q14) -> None: ...
    def send_base_velocity(self, vx_mps: float, wz_radps: float) -> None: ...
    def hold(self) -> None: ...
    def estop(self, firmware: bool = False) -> None: ...
    def resume(self) -> None: ...
    def attach_stop_wire(self, wire) -> None: ...


class Robot:
    """Two :class:`PiperArm`, one :class:`TracerBase`, a :class:`CameraRig` (and simulators for sim): a
    :class:`RobotIO`."""

    def __init__(self, config: RobotConfig) -> None:
        self.config = config
        self.arms: dict[str, PiperArm] = {}
        self.base: TracerBase | None = None
        self.cameras: CameraRig | None = None
        self.sim: SimHandle | None = None
        self._estopped = False
        self._firmware_estop = False
        # Held by send_* from the check of the e-stop flag to the end of the send, and by estop():
        # a send that passed the check before a stop finishes before the stop's zero/hold commands,
        # never after them. Reentrant: a signal handler may stop the robot in the middle of a send.
        self._command_lock = threading.RLock()
        self._lo = np.asarray(config.arms["left"].joint_lo * 2)
        self._hi = np.asarray(config.arms["left"].joint_hi * 2)

    # -- lifecycle -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Start the simulators (sim profiles), then connect arms, base and cameras.

        Raises a :class:`VlaEdgeError` naming the first device that failed (everything already
        connected is disconnected again).
        """
        cfg = self.config
        try:
            arm_cfgs, base_cfg, rig = dict(cfg.arms), cfg.base, None
            if cfg.sim is not None:
                arm_cfgs, base_cfg, rig = self._start_sim()
            for side in SIDES:
                arm = PiperArm(arm_cfgs[side])
                arm.connect()
                self.arms[side] = arm
            self.base = TracerBase(base_cfg)
            self.base.connect()
            self.cameras = rig or self._make_rig()
            self.cameras.start()
        except BaseException as e:
            self.disconnect()
            if isinstance(e, VlaEdgeError | KeyboardInterrupt):
                raise
            raise VlaEdgeError(f"robot {cfg.name}: connect failed: {type(e).__name__}: {e}") from e

    def disconnect(self) -> None:
        """Safe stop: base zero, arms hold their last commanded target (never disabled), cameras closed."""
        steps = []
        if self.base is not None:
            steps.append(self.base.disconnect)
        steps += [a.disconnect for a in self.arms.values()]
        if self.cameras is not None:
            steps.append(self.cameras.stop)
        if self.sim is not None:
            steps += [s.stop for s in self.sim.arms.values()] + ([self.sim.base.stop] if self.sim.base else [])
        for step in steps:
            try:
                step()
            except Exception as e:  # keep going: the other devices must still be made safe
                log.error("disconnect: %s", e)
        self.arms, self.base, self.cameras, self.sim = {}, None, None, None

    def __enter__(self) -> Robot:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    # -- state -----------------------------------------------------------------------------------
    @property
    def camera_names(self) -> list[str]:
        return self.cameras.names if self.cameras else list(self._camera_names())

    @property
    def estopped(self) -> bool:
        """True between :meth:`estop` and :meth:`resume`: commands are ignored."""
        return self._estopped

    def read_state(self) -> RobotState:
        left, right = (self._arm(s).read_state() for s in SIDES)
        b = self._base().read_state()
        return RobotState(
            qpos=np.concatenate([left.qpos, right.qpos]),
            stamps_s=(left.joint_stamp_s, right.joint_stamp_s),
            base_vx_mps=b.vx_mps,
            base_wz_radps=b.wz_radps,
            base_stamp_s=b.motion_stamp_s,
            enabled=all(left.enabled) and all(right.enabled),
            estopped=self._estopped,
        )

    def read_frames(self):
        """One RGB frame per camera (:class:`~vla_edge.firmware_bridge.cameras.FrameSet`); CameraFault if stale/gone."""
        if self.cameras is None:
            raise VlaEdgeError("robot is not connected")
        return self.cameras.read()

    def latest_frames(self, names: list[str]) -> tuple[dict, dict]:
        """The newest frame (RGB uint8 (H, W, 3)) and its capture time (s) of each named camera that has one,
        without waiting: what a tick records. ``({}, {})`` before the cameras are connected."""
        frames, stamps = {}, {}
        if self.cameras is not None:
            for name in names:
                f = self.cameras.cameras[name].latest()
                if f is not None:
                    frames[name], stamps[name] = f.image, f.stamp_s
        return frames, stamps

    def faults(self) -> list[str]:
        """Active faults of every device (silent bus, base link loss, camera stale, ...)."""
        out = [f for a in self.arms.values() for f in a.faults()]
        if self.base is not None:  # the base's e-stop button is an operator stop: base_estop_reported()
            out += self.base.faults(include_estop=False)
        if self.cameras is not None:
            out += self.cameras.faults()
        return out

    def base_estop_reported(self) -> bool:
        """The base reported its e-stop (the button on the TRACER) since it was last cleared: the control
        loop latches vla-edge's e-stop for it, and :meth:`resume` clears it once the base no longer reports it."""
        return self.base is not None and self.base.estop_latched

    def base_pose(self) -> tuple[float, float, float]:
        """Simulated base pose ``(x_m, y_m, yaw_rad)``; only known in simulation."""
        if self.sim is None:
            raise VlaEdgeError("base_pose() is only available with a simulated robot")
        return self.sim.base_pose()

    # -- commands --------------------------------------------------------------------------------
    def send_joint_targets(self, q14) -> None:
        """Absolute targets ``[L j1..j6 rad, L gripper m, R ...]``, clamped to the profile's limits.

        Ignored while e-stopped. Raises VlaEdgeError for a wrong shape or a non-finite value.
        """
        q = np.asarray(q14, dtype=np.float64)
        if q.shape != (14,) or not np.isfinite(q).all():
            raise VlaEdgeError(f"joint targets must be 14 finite values, got shape {q.shape}")
        q = np.clip(q, self._lo, self._hi)
        with self._command_lock:
            if self._estopped:
                return
            self._arm("left").send_targets(q[0:6], q[6])
            self._arm("right").send_targets(q[7:13], q[13])

    def send_base_velocity(self, vx_mps: float, wz_radps: float) -> None:
        """Base velocity target (clamped and ramped by the driver). Ignored while e-stopped."""
        if not (math.isfinite(vx_mps) and math.isfinite(wz_radps)):
            raise VlaEdgeError("base velocity must be finite")
        with self._command_lock:
            if self._estopped:
                return
            self._base().send_velocity(vx_mps, wz_radps)

    def commanded_qpos(self) -> np.ndarray | None:
        """(14,) the targets the arms were last sent (holds included), None before both had one."""
        targets = [self._arm(side).last_target for side in SIDES]
        return None if any(t is None for t in targets) else np.concatenate(targets)

    def hold(self) -> None:
        """Safe state after a fault: base target zero (ramped), arms re-sent their last commanded target."""
        errors = []
        for step in [self._base().stop, *(self._arm(side).hold for side in SIDES)]:
            try:
                step()
            except VlaEdgeError as e:  # the other devices must still be made safe
                errors.append(str(e))
        if errors:
            raise VlaEdgeError("; ".join(errors))

    def attach_stop_wire(self, wire) -> None:
        """Arm the keyboard's native stop path (``KeyboardListener.wire``; None: nothing to do) with the
        base's zero frame: it is written the moment the key arrives, before any Python thread runs, and
        the base passes only zero frames until :meth:`resume`. The arms need no such path: they hold
        their last target by themselves."""
        if wire is not None and self.base is not None:
            self.base.attach_stop_gate(wire)

    def estop(self, firmware: bool = False) -> None:
        """Latch an e-stop: a zero-velocity frame written to the base at once (not at the next stream
        slot), then the arms hold their last commanded target (software) or get the Piper firmware
        e-stop 0x150 (``firmware=True``: the damped arms sink slowly). Commands are ignored until
        :meth:`resume`."""
        base = self.base
        if base is not None:  # first, and outside the command lock: a send in progress cannot delay it
            base.stop_now()
        with self._command_lock:
            self._estopped = True
            self._firmware_estop = self._firmware_estop or firmware
            for arm in self.arms.values():
                try:
                    if firmware:
                        arm.estop()
                    else:
                        arm.hold()
                except VlaEdgeError as e:
                    log.error("estop: %s", e)

    def resume(self) -> None:
        """Clear the e-stop. After a firmware e-stop this resets and re-enables the arms (the Piper
        cuts motor power briefly on reset; enable is sent at least twice), which then hold the pose
        they woke up in; after a software e-stop the arms keep holding their last commanded target.
        Refused (VlaEdgeError, nothing touched) while the base still reports its e-stop button."""
        if self.base is not None and not self.base.clear_estop():
            raise VlaEdgeError("the base still reports its e-stop: release the e-stop button on the base, "
                               "then r and y again")
        with self._command_lock:
            for arm in self.arms.values():
                if self._firmware_estop:
                    arm.resume()
                else:
                    arm.hold()
            if self.base is not None:
                self.base.release()
            self._firmware_estop = False
            self._estopped = False

    # -- helpers ---------------------------------------------------------------------------------
    def _arm(self, side: str) -> PiperArm:
        if side not in self.arms:
            raise VlaEdgeError("robot is not connected")
        return self.arms[side]

    def _base(self) -> TracerBase:
        if self.base is None:
            raise VlaEdgeError("robot is not connected")
        return self.base

    def _camera_names(self) -> list[str]:
        c = self.config.cameras
        if self.config.sim is not None and c.source == "synthetic":
            return list(self.config.sim.camera_names)
        return list(c.devices or c.replay)

    def _make_rig(self, scene: Scene | None = None) -> CameraRig:
        c = self.config.cameras
        cams = []
        for name in self._camera_names():
            if c.source == "opencv":
                src = OpenCVSource(c.devices[name], c.width, c.height, c.fps, c.fourcc)
            elif c.source == "replay":
                src = ReplaySource(c.replay[name], camera=name, fps=c.fps)
            elif c.source == "synthetic":
                sim = self.config.sim or SimSettings()
                src = SyntheticSource(name, scene or Scene(), c.fps, sim.camera_jitter_s, c.width, c.height,
                                      seed=len(cams))
            else:
                raise VlaEdgeError(f"unknown camera source {c.source!r} (opencv, synthetic, replay)")
            cams.append(Camera(name, src, c.fps, size=(c.width, c.height)))
        return CameraRig(cams, c.fps, c.max_skew_s, c.stale_after_s)

    def _start_sim(self):
        cfg, s = self.config, self.config.sim
        assert s is not None
        # piper_sdk keeps one interface per bus name for the whole process: a fresh name per robot.
        tag = uuid.uuid4().hex[:8]
        arm_cfgs, sims = {}, {}
        for side in SIDES:
            a = cfg.arms[side]
            channel = f"{a.can_name}-{tag}"
            arm_cfgs[side] = PiperArmConfig(**{**a.__dict__, "can_name": channel, "bustype": "virtual"})
            q0 = tuple(s.initial_qpos[:6])
            sims[side] = PiperSim(PiperSimConfig(channel=channel, feedback_hz=s.feedback_hz,
                                                 joint_speed_radps=s.joint_speed_radps, initial_q_rad=q0)).start()
        base_cfg, base_sim = cfg.base, None
        if cfg.base.port == "sim":  # else a real serial device (or another process's pty) on that path
            base_sim = TracerSim().start()
            base_cfg = TracerBaseConfig(**{**cfg.base.__dict__, "port": base_sim.port})
        scene = Scene(target_xy_m=tuple(s.target_xy_m))
        self.sim = SimHandle(arms=sims, base=base_sim, scene=scene, cameras={})
        scene.joint_state = self.sim.joint_state
        rig = self._make_rig(scene) if cfg.cameras.source == "synthetic" else None
        if rig is not None:
            self.sim.cameras = {n: c.source for n, c in rig.cameras.items()}
        # Sim grippers start at the profile's initial opening.
        for side in SIDES:
            sims[side].gripper_m = sims[side].gripper_target_m = float(s.initial_qpos[6])
        return arm_cfgs, base_cfg, rig
