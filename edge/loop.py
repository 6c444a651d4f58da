"""The realtime control loop: one process, the control tick on absolute deadlines.

Threads::

    main        control tick at ``rate_hz``: read arm state, next action -> safety filter -> arms,
                base command -> base; watchdogs; recording; telemetry; hands the tick to the live
                view (``view``: a :class:`~vla_edge.edge.episodes.view.LiveView`, which drops what it is behind on)
    inference   one policy step at a time on the newest synchronised frames (ONNX Runtime releases
                the GIL), so ticks keep coming while the model thinks
    keyboard    e-stop listener: commands the actuators itself, never waits for the loop
    devices     camera readers, CAN feedback, base serial streaming (owned by ``Robot``)

Chunks execute one step per tick. ``sync`` mode: infer, execute the chunk, infer again (the robot
holds while the model thinks). ``async`` mode: the next inference starts on the newest observation
while the current chunk runs; its chunk is spliced in at the step matching the ticks elapsed since
its observation (latency compensation), optionally blended with the steps already planned for the
same ticks (temporal ensembling, weight ``exp(-k i)``, ``i = 0`` the oldest). Planned steps are
kept per tick, so an unfilled tick is *absent*, never a zero.

Any fault (stale camera, lost arm feedback, base link, an unsafe or late inference) puts the robot
in the safe state (arms hold their last commanded target, base zero velocity) and ends the run with a
message. A stop request (``stop_requested``: a signal, Ctrl+C, a lost terminal; the e-stop has
latched already) ends the run at once without a fault: the tick's sleep wakes on it.

Navigation values are clipped to the bundle's full scale (``nav_max_m``, ``nav_max_deg``) and the
base's velocity plan is computed per tick in O(1) (:class:`BaseProfile`), so no value stalls a tick.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.chunks import ActionSchedule, BaseProfile, InferenceWorker, base_profile
from vla_edge.edge.observers import Tick, TickObserver
from vla_edge.edge.policy import Policy
from vla_edge.edge.robot import RobotIO

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """``seconds``/``max_ticks``: stop after this much (0: until e-stop quit, Ctrl+C or SIGTERM).

    ``ensemble_k``: async temporal-ensembling weight ``exp(-k i)``; ``None`` lets the newest chunk win.
    ``inference_deadline_s``: an inference step taking longer is a fault.
    """

    rate_hz: float = 30.0
    mode: str = "sync"
    seconds: float = 0.0
    max_ticks: int = 0
    ensemble_k: float | None = None
    inference_deadline_s: float = 10.0
    navigation: bool = False
    status_every_s: float = 0.5
    nav_max_m: float = 1.0
    """Forward distance full scale (the bundle's ``d_max_m``): larger values are clipped to it."""
    nav_max_deg: float = 90.0
    """Turn angle full scale (the bundle's ``theta_max_deg``)."""


class TickSource:
    """An action source that answers every tick, on the control thread: the master arms of ``vla-edge record``.

    A chunk policy (the :class:`~vla_edge.edge.engine.Engine`, the scripted expert, the PyTorch model:
    ``start_episode(instruction, navigation)`` and ``step(frames, state) -> ActionChunk``) runs on the
    inference thread instead. ``forward``: send :meth:`command` to the arms through the safety filter
    (False: the arms follow the source by themselves and the loop only records).
    """

    forward = True
    estop_faults_expected = False
    """True where the safe stop is the Piper firmware e-stop, which the arms then report (status 0x01)."""

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        """Nothing to prepare by default."""

    def faults(self) -> list[str]:
        """The source's own device faults (a silent master arm), each one line."""
        return []

    def command(self) -> np.ndarray:
        """(14,) this tick's joint targets (rad, grippers m): what is recorded as ``action``."""
        raise NotImplementedError

    def motion(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(14,) joint velocities (rad/s) and efforts (N m) to record with the tick, or None."""
        return None, None


class ControlLoop:
    """Drives ``robot`` with ``policy`` (a chunk policy or a :class:`TickSource`) until a limit, a fault,
    ``until()`` or a stop request. ``safe_stop()``: what a fault does to the robot (default: arms hold,
    base zero)."""

    def __init__(self, robot: RobotIO, policy: Policy | TickSource, instruction: str, cfg: LoopConfig, safety,
                 estop, stats, observers: Sequence[TickObserver] = (), cameras: list[str] | None = None,
                 stop_requested: threading.Event | None = None, until=None, safe_stop=None):
        self.robot = robot
        self.policy = policy
        self.per_tick = isinstance(policy, TickSource)
        self.until = until
        """``until() -> bool``, asked after every tick: True ends the run (no fault)."""
        self._safe_action = safe_stop or robot.hold
        self.tick_base = 0
        """Added to the tick index handed to the live view (several loops in one recording session)."""
        self.instruction = instruction
        self.cfg = cfg
        self.safety = safety
        self.estop = estop
        self.stats = stats
        self.observers = list(observers)
        """Tick observers (:mod:`vla_edge.edge.observers`): the recorder, the live view; none blocks a tick."""
        self.cameras = cameras or list(robot.camera_names)
        self.schedule = ActionSchedule(cfg.ensemble_k if cfg.mode == "async" else None)
        self.worker = InferenceWorker(policy, robot, self.cameras)
        self.base_plan: BaseProfile | list[tuple[float, float]] = []
        self.stop_requested = stop_requested or threading.Event()
        """Set from any thread to end the run after the current tick (no fault)."""
        self.on_status = None  # called with the one-line status every ``status_every_s``
        self.fault: str | None = None
        self.ticks = 0
        """Ticks run so far (``max_ticks`` counts these)."""
        self.tick = 0
        """Index of the current tick's deadline (``t0 + tick / rate_hz``); plans are keyed by it, so
        it jumps past deadlines an overrun missed."""
        self._target: np.ndarray | None = None
        self._base_cmd = (0.0, 0.0)
        self._was_latched = False

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> str | None:
        """Run the loop; returns the fault message that ended it, or None."""
        cfg = self.cfg
        dt = 1.0 / cfg.rate_hz
        self.policy.start_episode(self.instruction, navigation=cfg.navigation)
        self._target = self._commanded()
        t0 = time.monotonic()
        next_status = t0
        k = 0
        try:
            while not self.stop_requested.is_set():
                deadline = t0 + k * dt
                now = time.monotonic()
                if now < deadline and self.stop_requested.wait(deadline - now):
                    break
                start = time.monotonic()
                self.tick = k
                self._tick(k, start)
                end = time.monotonic()
                self.stats.tick(start, deadline, end)
                self.ticks += 1
                k += 1
                if end >= t0 + k * dt:  # overrun: skip the deadlines we missed, counted by stats
                    k = max(k, int((end - t0) / dt) + 1)
                if cfg.max_ticks and self.ticks >= cfg.max_ticks:
                    break
                if cfg.seconds and k * dt >= cfg.seconds - 1e-9:  # the next deadline is past the end
                    break
                if self.until is not None and self.until():
                    break
                if end >= next_status and self.on_status is not None:
                    next_status = end + cfg.status_every_s
                    self.stats.estop(self.estop.is_latched, self.estop.reason)
                    try:
                        self.on_status(self.stats.status_line())
                    except OSError as e:  # the terminal is gone: no more status lines, the loop goes on
                        log.warning("status line off: %s", e)
                        self.on_status = None
        except VlaEdgeError as e:
            self._safe_stop(str(e))
        except BaseException as e:  # a bug, or a KeyboardInterrupt raised by other code: still safe
            self.estop.trigger(f"{type(e).__name__}: {e}")
            if isinstance(e, KeyboardInterrupt):
                self._hold()
            else:
                self._safe_stop(f"{type(e).__name__}: {e}")
            raise
        finally:
            if not self.stop_requested.is_set():  # a stop request must not wait for a long inference
                self.finish(self.cfg.inference_deadline_s)
        return self.fault

    def finish(self, timeout_s: float) -> None:
        """Wait for a running inference step (ONNX Runtime must not be torn down mid-run); a step past its
        deadline was given up on and is not waited for (:func:`~vla_edge.edge.chunks.abandoned_step_running`)."""
        self.worker.join(timeout_s)

    def _safe_stop(self, message: str) -> None:
        """Arms hold their last commanded target, base zero velocity; remember why."""
        if self.fault is None:
            self.fault = message
            log.debug("safe stop: %s", message)  # the caller prints it, once (vla-edge run: stopped safely: ...)
        self._hold()

    def _hold(self) -> None:
        try:
            self._safe_action()
        except Exception as e:
            log.error("safe stop: hold failed: %s", e)

    def _commanded(self) -> np.ndarray:
        """What the arms were last told (the step limit's reference); the measured pose before any command."""
        q = self.robot.commanded_qpos()
        return q.copy() if q is not None else self.robot.read_state().qpos.copy()

    # -- one tick ------------------------------------------------------------------------------------
    def _tick(self, k: int, now: float) -> None:
        robot, cfg = self.robot, self.cfg
        if not self.estop.is_latched and robot.base_estop_reported():  # the button on the base
            self.estop.trigger("e-stop button on the base")
        faults = robot.faults()
        if self.per_tick:
            faults += self.policy.faults()
            if self.estop.is_latched and self.policy.estop_faults_expected:  # the firmware e-stop we sent
                faults = [f for f in faults if "e-stop" not in f]
        if faults:
            raise VlaEdgeError("; ".join(faults))
        state = robot.read_state()
        if self.per_tick:
            self._source_tick(now, state)
            return
        latched = self.estop.is_latched
        if latched:
            self._was_latched = True
            self._record(k, now, state, self._commanded(), (0.0, 0.0), 0)
            return
        if self._was_latched:  # resumed: re-arm from what the arms hold now, forget queued actions
            self._was_latched = False
            self.schedule.clear()
            self.base_plan = []
            self._target = self._commanded()
            self.safety.reset(self._target)
            self._base_cmd = (0.0, 0.0)
            # Chunks of observations made before the stop are out of date, whether their inference
            # is still running or finished while latched: requests up to now observed ticks <= k.
            self._stale_obs_tick = k
        self._collect_inference(k)
        if self.worker.busy and self.worker.running_for_s > cfg.inference_deadline_s:
            self.worker.abandon()  # the run ends now, through the safe stop, without waiting for the hung step
            raise VlaEdgeError(
                f"inference step past its deadline ({self.worker.running_for_s:.2f} s > {cfg.inference_deadline_s:g} s); "
                "abandoned, not waited for: is the policy hung, or this machine too slow for it? (vla-edge bench)")
        # next joint target
        q = self.schedule.pop(k)
        clamped: list[str] = []
        if q is not None:
            safe, clamped = self.safety.filter_joints(q, self._target)
            self._target = safe
            robot.send_joint_targets(safe)
        # base
        vx, wz = self.base_plan.pop(0) if self.base_plan else (0.0, 0.0)
        vx, wz, bclamped = self.safety.filter_base(vx, wz, 1.0 / cfg.rate_hz)
        clamped = clamped + bclamped
        clamps = len(clamped)
        robot.send_base_velocity(vx, wz)
        self._base_cmd = (vx, wz)
        self.stats.clamps(clamps, clamped)
        # ask for the next chunk
        if not self.worker.busy and not self.base_plan:
            if cfg.mode == "sync":
                if self.schedule.remaining(k + 1) == 0:
                    self.worker.request(k + 1)
            elif self.schedule.remaining(k + 1) <= self._async_margin():
                self.worker.request(k + 1)
        self._record(k, now, state, self._commanded(), (vx, wz), clamps)

    def _async_margin(self) -> int:
        """Request the next chunk when fewer planned steps remain than the inference takes, in ticks.

        Plus one tick: the worker first waits up to a frame period for a synchronised frame set,
        which the policy's own timings do not include.
        """
        p50_ms = self.stats.inference_p50_ms()
        return max(1, int(math.ceil(p50_ms / 1e3 * self.cfg.rate_hz))) + 1 if math.isfinite(p50_ms) else 2

    _stale_obs_tick = -1

    def _collect_inference(self, k: int) -> None:
        r = self.worker.poll()
        if r is None:
            return
        kind, payload, obs_tick, frames = r
        if kind == "error":
            raise VlaEdgeError(f"inference failed: {payload}") if not isinstance(payload, VlaEdgeError) else payload
        if obs_tick <= self._stale_obs_tick:  # observed before an e-stop: out of date
            log.info("discarding a chunk observed before the e-stop (tick %d)", obs_tick)
            return
        chunk = payload
        self.stats.inference(chunk.timings_ms.get("total", 0.0), chunk.timings_ms)
        if frames is not None:
            self.stats.frames(list(frames.ages_s.values()), frames.skew_s)
        if self.observers:  # the chunk boundary: this tick's plan is the new chunk's
            what = f"{chunk.base[0]} {chunk.base[1]:.2f}" if chunk.base is not None and chunk.base[0] != "stop" \
                else f"{len(chunk.joints) if chunk.joints is not None else 0} steps"
            t = time.monotonic()
            for o in self.observers:
                o.on_chunk(k, t, chunk, f"chunk: {what}, observed at tick {obs_tick}")
        if chunk.base is not None and chunk.base[0] != "stop":
            direction, value = chunk.base
            if not math.isfinite(value):
                raise VlaEdgeError(f"policy returned a non-finite navigation step {chunk.base!r}")
            full_scale = self.cfg.nav_max_m if direction == "forward" else self.cfg.nav_max_deg
            if not 0.0 <= value <= full_scale:
                log.warning("navigation: %s %g outside [0, %g]: clipped", direction, value, full_scale)
                value = min(max(value, 0.0), full_scale)
            lim = self.safety.limits
            self.base_plan = base_profile(direction, value, 1.0 / self.cfg.rate_hz, lim.max_vx_mps,
                                          lim.max_ax_mps2, lim.max_wz_radps, lim.max_aw_radps2)
            log.info("navigation: %s %.2f -> %d ticks of base motion", direction, value, len(self.base_plan))
            return
        joints = chunk.joints
        if joints is None or not np.isfinite(joints).all():
            raise VlaEdgeError("policy returned a non-finite action chunk (NaN/inf): refusing to execute it")
        # Latency compensation: the chunk's first step belongs to the observation's tick.
        if self.cfg.mode == "sync":
            self.schedule.add_chunk(k, joints)
        else:
            self.schedule.add_chunk(obs_tick, joints)

    def _source_tick(self, now: float, state) -> None:
        """A :class:`TickSource`'s tick: its command (forwarded through the safety filter unless the e-stop
        is latched) recorded as ``action`` with the measured base velocity, once every camera has a frame."""
        action = self.policy.command()
        clamped: list[str] = []
        if self.policy.forward and not self.estop.is_latched:
            safe, clamped = self.safety.filter_joints(action, state.qpos)
            self.robot.send_joint_targets(safe)
        clamps = len(clamped)
        self.stats.clamps(clamps, clamped)
        if not self.observers:
            return
        frames, stamps = self._frames()
        if len(frames) != len(self.cameras):
            return  # no frame yet from a camera: nothing to record this tick
        qvel, effort = self.policy.motion()
        self._emit(Tick(self.tick_base + self.ticks, now, frames, stamps, state.qpos, action,
                        (state.base_vx_mps, state.base_wz_radps), clamps, qvel, effort))

    def _record(self, k, now, state, target, base, clamps) -> None:
        """``action``: the command in force this tick, as sent (a hold included), not the policy's wish."""
        if self.observers:
            frames, stamps = self._frames()
            self._emit(Tick(k, now, frames, stamps, state.qpos, target, base, clamps))

    def _frames(self) -> tuple[dict, dict]:
        """The newest frame (RGB uint8) and its capture time (s) of each camera that has one."""
        return self.robot.latest_frames(self.cameras)

    def _emit(self, tick: Tick) -> None:
        for o in self.observers:
            o.on_tick(tick)
