"""``vla-edge record``: teleoperated demonstrations, no policy. The puppet arms follow the master arms;
vla-edge records what the masters command as ``action``.

Usage::

    vla-edge record --robot cobot_magic --instruction "stack the cups" --episodes 20 --out episodes/
    vla-edge record --robot sim --instruction "touch the red target" --episodes 3 --out episodes/

Per control tick (the profile's rate, 30 Hz): the puppets' measured joints (rad) and grippers (m) as
``observations/qpos``, the masters' commands (piper_sdk ``GetArmJointCtrl`` / ``GetArmGripperCtrl``:
their 0x155..0x157 and 0x159 control frames) as ``action``, the three cameras, and the base's measured
velocity ``[vx m/s, wz rad/s]`` as ``base_action``; one HDF5 file per episode
(:mod:`vla_edge.edge.episodes.recorder`, the Cobot Magic layout ``vla-edge convert`` reads). ``qvel``/``effort``: the
puppets' high-speed driver feedback (rad/s, N m; :mod:`vla_edge.firmware_bridge.piper_motion`), NaN where
an arm does not send it (the simulator does not). The base is held at zero velocity while recording.

Where the masters are: ``master_can`` under ``[arms.left]`` / ``[arms.right]`` of the robot profile. A
master silent for longer than the arms' ``feedback_timeout_s`` is a fault, like a silent puppet.

* ``master_can == can`` (the Cobot Magic's wiring): master and puppet share a bus and the puppet obeys
  the master's frames in firmware. vla-edge only listens; the e-stop is the Piper firmware e-stop
  (0x150: the puppet ignores the master and sinks slowly, damped), the only stop that works there.
* ``master_can != can``: vla-edge forwards each tick's master command to the puppet through the safety
  filter (joint limits, per-tick step limit; clamps recorded); the e-stop holds the arms.

Keys (terminal, evdev or pynput; the e-stop keys of ``run`` stay live): **n** or right arrow ends the
episode early and keeps it (during a reset period: start the next episode now), **b** discards the
episode being recorded and records it again, **q** or Esc keeps the episode and quits; **space**
e-stops, **r** then **y** resumes. Between episodes a reset period (``--reset-seconds``) lets the
operator put the scene back. Any fault (stale camera, silent puppet or master, base link) stops the
robot safely (exit 3); the episode so far is kept. ``--view`` / ``--view-save rec.rrd`` stream the ticks,
episode starts and e-stop events to Rerun as they are recorded (:class:`~vla_edge.edge.episodes.view.LiveView`,
the ``[view]`` extra), never holding up a tick.

``sim``: simulated master arms (:mod:`vla_edge.firmware_bridge.piper_master_sim`) send the same CAN
frames on the puppets' virtual buses, moved by the reach task's scripted expert
(:class:`~vla_edge.edge.sim.task.ExpertPolicy`); each episode places the target and the start pose of
seed ``--seed + i``, so the whole path runs through the real piper_sdk. The simulated operator ends each
episode as a person presses **n**: ``--hold-seconds`` (0.5 s) after it reached the target (``--episode-seconds``
the longest); ``--start-spread 0`` starts every episode at the ready pose.

Robot-side: no torch.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.episodes.recorder import EpisodeRecorder
from vla_edge.edge.loop import ControlLoop, LoopConfig, TickSource
from vla_edge.edge.profile import SIDES, load_profile, profile_path
from vla_edge.edge.robot import Robot
from vla_edge.edge.safety import SafetyFilter, SafetyLimits
from vla_edge.edge.session import Session
from vla_edge.edge.telemetry import RunStats
from vla_edge.firmware_bridge.piper_master import PiperMaster, PiperMasterConfig
from vla_edge.firmware_bridge.piper_master_sim import PiperMasterSim, PiperMasterSimConfig
from vla_edge.firmware_bridge.piper_motion import read_motion

log = logging.getLogger(__name__)

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
SIM_HOLD_S = 0.5
"""sim: how long the simulated operator holds the reached target before it ends the episode (``--hold-seconds``)."""
SIM_RESET_TIMEOUT_S = 5.0
"""sim: longest the puppets may take to follow the masters to an episode's start pose."""


@dataclass
class RecordConfig:
    """One ``vla-edge record`` session. Durations in seconds; ``rate_hz`` defaults to the profile's."""

    robot: str
    instruction: str
    episodes: int
    out: Path
    episode_s: float = 30.0
    reset_s: float = 5.0
    rate_hz: float | None = None
    keyboard: str = "auto"
    keyboard_tty: object = None
    seed: int = 0
    start_spread_rad: float | None = None
    """sim: the start pose's spread (:meth:`~vla_edge.edge.sim.task.ReachTask.start_pose`; None: the task's)."""
    hold_s: float | None = None
    """sim: the simulated operator ends each episode once it held the reached target this long (None: 0.5 s)."""
    view: bool = False
    view_save: Path | None = None
    """Stream every recorded tick to a Rerun viewer (``view``) or into a .rrd file (``view_save``)."""

    def check(self) -> None:
        if not self.instruction.strip():
            raise VlaEdgeError("--instruction must not be empty")
        if self.episodes < 1 or self.episode_s <= 0 or self.reset_s < 0:
            raise VlaEdgeError(f"need --episodes >= 1, --episode-seconds > 0, --reset-seconds >= 0; got "
                               f"{self.episodes}, {self.episode_s}, {self.reset_s}")
        if self.start_spread_rad is not None and not 0.0 <= self.start_spread_rad <= 1.0:
            raise VlaEdgeError(f"need 0 <= --start-spread <= 1 rad; got {self.start_spread_rad}")
        if self.hold_s is not None and self.hold_s < 0:
            raise VlaEdgeError(f"need --hold-seconds >= 0; got {self.hold_s}")
        if self.out.exists() and not self.out.is_dir():
            raise VlaEdgeError(f"--out {self.out} exists and is not a directory")


def master_cans(robot: str) -> dict[str, str]:
    """The CAN interface of each master arm: ``master_can`` of ``[arms.left]`` / ``[arms.right]``."""
    path = profile_path(robot)
    arms = tomllib.loads(path.read_text()).get("arms", {})
    out = {}
    for side in SIDES:
        name = arms.get(side, {}).get("master_can")
        if not isinstance(name, str) or not name:
            raise VlaEdgeError(f"robot profile {path}: no arms.{side}.master_can (the CAN interface that "
                               f"carries the {side} master arm's commands)")
        out[side] = name
    return out


class EpisodeKeys:
    """Episode control from the keyboard listener's thread: n/right, b, q/Esc."""

    def __init__(self) -> None:
        self.end = threading.Event()
        self.rerecord = False
        self.quit = False

    def on_key(self, key: str) -> None:
        if key in ("n", "right"):
            self.end.set()
        elif key == "b":
            self.rerecord = True
            self.end.set()
        elif key in ("q", "esc"):
            self.quit = True
            self.end.set()

    def clear(self) -> None:
        self.end.clear()
        self.rerecord = False


class Recorder:
    """The session: robot, masters, e-stop, keys, recorder. :meth:`run` returns the exit code."""

    def __init__(self, cfg: RecordConfig, sim_teleoperator=None):
        """``sim_teleoperator(robot, masters, rate_hz, instruction)``: what moves the simulated masters on a
        sim robot (:class:`vla_edge.edge.sim.teleoperator.SimTeleoperator`)."""
        cfg.check()
        if cfg.view or cfg.view_save:
            # the live view: loaded only with --view, as below
            from vla_edge.edge.episodes.view import import_rerun

            import_rerun()  # not installed: say so before touching the robot
        self.cfg = cfg
        self.sim_teleoperator = sim_teleoperator
        self.profile = load_profile(cfg.robot)
        if self.profile.sim is None and (cfg.start_spread_rad is not None or cfg.hold_s is not None):
            raise VlaEdgeError(f"--start-spread and --hold-seconds move the simulated operator; robot "
                               f"{self.profile.name} is teleoperated by a person")
        self.master_cans = master_cans(cfg.robot)
        self.forward = any(self.master_cans[s] != self.profile.arms[s].can_name for s in SIDES)
        self.rate_hz = cfg.rate_hz or self.profile.control_rate_hz
        self.keys = EpisodeKeys()
        self.robot = self.readers = self.master_sims = self.teleop = None
        self.saved: list[Path] = []
        self.episode_open = False
        self.live = None
        self.ticks = 0
        self.stop = None  # StopRequest: a signal or a lost terminal ends the session

    # -- devices --------------------------------------------------------------------------------
    def _connect(self) -> None:
        self.robot = Robot(self.profile)
        self.robot.connect()
        missing = [c for c in CAMERAS if c not in self.robot.camera_names]
        if missing:
            raise VlaEdgeError(f"robot {self.profile.name} has no camera {missing[0]}")
        channels = dict(self.master_cans)
        bustype = self.profile.arms["left"].bustype
        if self.robot.sim is not None:
            channels, bustype = self._start_master_sims(), "virtual"
        self.readers = {}
        for side in SIDES:
            # a master sends as often as a puppet answers: the profile's feedback watchdog fits both
            reader = PiperMaster(PiperMasterConfig(can_name=channels[side], bustype=bustype,
                                                   command_timeout_s=self.profile.arms[side].feedback_timeout_s))
            reader.connect()
            self.readers[side] = reader

    def _start_master_sims(self) -> dict[str, str]:
        """Simulated masters on the puppets' virtual buses (or on buses of their own), holding the
        puppets' current pose; returns their channels."""
        channels, self.master_sims = {}, {}
        for side in SIDES:
            puppet = self.robot.arms[side].config.can_name
            shared = self.master_cans[side] == self.profile.arms[side].can_name
            channels[side] = puppet if shared else f"{self.master_cans[side]}-{uuid.uuid4().hex[:8]}"
            self.master_sims[side] = PiperMasterSim(PiperMasterSimConfig(channel=channels[side])).start()
        if self.sim_teleoperator is None:
            raise VlaEdgeError(f"robot {self.profile.name} is simulated: record needs a simulated teleoperator")
        hold_s = SIM_HOLD_S if self.cfg.hold_s is None else self.cfg.hold_s
        self.teleop = self.sim_teleoperator(self.robot, self.master_sims, self.rate_hz, self.cfg.instruction,
                                            start_spread_rad=self.cfg.start_spread_rad,
                                            linger_ticks=round(hold_s * self.rate_hz)).start()
        return channels

    def _disconnect(self) -> None:
        if self.teleop is not None:
            self.teleop.stop()
        for reader in (self.readers or {}).values():
            reader.disconnect()
        if self.robot is not None:
            self.robot.disconnect()
        for sim in (self.master_sims or {}).values():
            sim.stop()

    def _safe_stop(self) -> None:
        """Forwarding: the arms hold. Shared bus: the masters still command the puppets, so only the
        Piper firmware e-stop stops them (they then sink slowly, damped). The base is zeroed either way."""
        try:
            self.robot.estop(firmware=not self.forward)
        except VlaEdgeError as e:
            log.error("safe stop: %s", e)

    # -- the session ------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        session = Session(cfg.keyboard, cfg.keyboard_tty, on_key=self.keys.on_key)
        writer = EpisodeRecorder(cfg.out, cameras=list(CAMERAS), compress="lzf")
        fault = None
        with session:
            self.stop = stop = session.stop
            try:
                self._connect()
                safety = SafetyFilter(SafetyLimits.for_robot(self.profile))
                if cfg.view or cfg.view_save:
                    from vla_edge.edge.episodes.view import LiveView  # Rerun: imported only when asked

                    self.live = LiveView(cfg.view_save)
                session.arm(self.robot, firmware_estop=not self.forward,
                            notify=lambda kind, reason: self._event(writer, kind, reason))
                listener = session.open_keyboard()
                wiring = "forwarding through the safety filter" if self.forward else "puppets follow the masters"
                print(f"vla-edge record: robot={self.profile.name} ({wiring}), {cfg.episodes} episodes of up to "
                      f"{cfg.episode_s:g} s into {cfg.out}; keyboard {listener.source}: n/right = next, "
                      "b = re-record, q/esc = quit, space = e-stop, r then y = resume", file=sys.stderr)
                with session.keys(self.robot):
                    fault = self._episodes(writer, safety, session.estop)
            finally:
                try:
                    if self.episode_open:
                        if fault:
                            writer.record_event(time.monotonic(), "fault", fault)
                        self.episode_open = False
                        self._keep(writer.close())
                finally:
                    self._disconnect()
                    if self.live is not None:
                        self.live.close()
        print(f"vla-edge record: {len(self.saved)} episodes saved in {cfg.out}", file=sys.stderr)
        if stop.requested and not fault:
            print(f"vla-edge record: stopped by {stop.reason}", file=sys.stderr)
            return stop.exit_code
        if fault:
            print(f"vla-edge record: stopped safely: {fault}", file=sys.stderr)
            return 3
        return 0

    def _event(self, writer, kind: str, reason: str) -> None:
        t = time.monotonic()
        if self.episode_open:
            writer.record_event(t, kind, reason)
        if self.live is not None:
            self.live.on_event(self.ticks, t, kind, reason)

    def _keep(self, path: Path | None) -> None:
        if path is not None and path not in self.saved:
            self.saved.append(path)
            print(f"  saved {path}", file=sys.stderr)

    def _episodes(self, writer, safety, estop) -> str | None:
        cfg, i, first = self.cfg, 0, True
        while len(self.saved) < cfg.episodes and not self.keys.quit and not self.stop.requested:
            self.keys.clear()
            if fault := self._reset_period(safety, estop, i, first):
                return fault
            if self.keys.quit or self.stop.requested:
                break
            self.keys.clear()
            meta = {"instruction": cfg.instruction, "robot": self.profile.name, "sim": self.robot.sim is not None,
                    "teleop": True, "policy": "teleop", "forwarding": self.forward}
            if self.teleop is not None:
                meta.update(seed=cfg.seed + i, target_xy_m=list(self.robot.sim.scene.target_xy_m),
                            start_spread_rad=self.teleop.start_spread_rad)
            path = writer.start_episode(meta)
            self.episode_open, first = True, False
            if self.live is not None:
                self.live.on_event(self.ticks, time.monotonic(), "episode", path.name)
            print(f"recording episode {len(self.saved) + 1}/{cfg.episodes}: {path.name}", file=sys.stderr)
            safety.reset(self.robot.read_state().qpos)
            if self.teleop is not None:
                self.teleop.go()
            fault = self._loop(writer, safety, estop, self.cfg.episode_s, self._episode_done)
            if fault:
                writer.record_event(time.monotonic(), "fault", fault)
            self.episode_open = False
            writer.close()
            if self.keys.rerecord and not fault and not self.stop.requested:
                path.unlink(missing_ok=True)
                print(f"  discarded {path.name}: recording it again", file=sys.stderr)
                continue
            self._keep(path)
            i += 1
            if fault:
                return fault
        return None

    def _episode_done(self) -> bool:
        """**n** was pressed, or (sim) the simulated operator finished its demonstration."""
        return self.keys.end.is_set() or (self.teleop is not None and self.teleop.done())

    def _reset_period(self, safety, estop, i: int, first: bool) -> str | None:
        """Between episodes the puppets keep following (forwarding) but nothing is recorded. sim: the
        masters go to seed ``i``'s start pose and the period ends when the puppets are there."""
        if self.teleop is not None:
            self.teleop.reset(self.cfg.seed + i)
            safety.reset(self.robot.read_state().qpos)
            fault = self._loop(None, safety, estop, SIM_RESET_TIMEOUT_S, self.teleop.puppets_there)
            if fault or not self.teleop.puppets_there():
                return fault or "sim reset: the puppet arms did not follow the masters to the start pose"
            time.sleep(0.1)  # let the cameras draw the new scene
            return None
        if first:
            return None
        print(f"reset the scene: {self.cfg.reset_s:g} s (n: start now)", file=sys.stderr)
        return self._loop(None, safety, estop, self.cfg.reset_s, self.keys.end.is_set)

    def _loop(self, writer, safety, estop, seconds: float, done) -> str | None:
        """The control loop with the master arms as the action source, for ``seconds`` or until ``done()``;
        records into ``writer`` unless it is None. Returns the fault that stopped the robot, or None."""
        if done() or self.stop.requested:
            return None
        cfg = LoopConfig(rate_hz=self.rate_hz, seconds=seconds)
        observers = [o for o in (writer, self.live) if o is not None] if writer is not None else []
        loop = ControlLoop(self.robot, MasterArms(self), self.cfg.instruction, cfg, safety, estop,
                           RunStats(period_s=1.0 / self.rate_hz), observers, cameras=list(CAMERAS),
                           stop_requested=self.stop.event, until=done, safe_stop=self._safe_stop)
        loop.tick_base = self.ticks
        fault = loop.run()
        if writer is not None:
            self.ticks += loop.ticks
        return fault


class MasterArms(TickSource):
    """The master arms as the control loop's action source: their commands (piper_sdk ``GetArmJointCtrl`` /
    ``GetArmGripperCtrl``, rad and m) each tick, forwarded to the puppets when the wiring needs it."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.forward = recorder.forward
        self.estop_faults_expected = not recorder.forward  # the firmware e-stop shows as arm status 0x01

    def faults(self) -> list[str]:
        return [f for r in self.recorder.readers.values() for f in r.faults()]

    def command(self) -> np.ndarray:
        return np.concatenate([self.recorder.readers[s].read_command()[0] for s in SIDES])

    def motion(self) -> tuple[np.ndarray, np.ndarray]:
        """The puppets' joint velocities (rad/s) and efforts (N m), NaN where the arm does not report them."""
        rec = self.recorder
        sides = [read_motion(rec.robot.arms[s].config.can_name, rec.profile.arms[s].feedback_timeout_s)
                 for s in SIDES]
        return np.concatenate([m[0] for m in sides]), np.concatenate([m[1] for m in sides])
