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
from dataclasses import dataclass

import numpy as np
from vla_edge.edge.errors import VlaEdgeError

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


class ActionSchedule:
    """Planned joint targets by absolute tick index; several chunks may plan the same tick."""

    def __init__(self, ensemble_k: float | None = None):
        self.ensemble_k = ensemble_k
        self._plan: dict[int, list[np.ndarray]] = {}

    def add_chunk(self, first_tick: int, steps: np.ndarray) -> None:
        for i, q in enumerate(steps):
            self._plan.setdefault(first_tick + i, []).append(np.asarray(q, np.float64))

    def filled(self, tick: int) -> bool:
        return tick in self._plan

    def remaining(self, tick: int) -> int:
        """Planned ticks from ``tick`` on."""
        return sum(1 for t in self._plan if t >= tick)

    def pop(self, tick: int) -> np.ndarray | None:
        """The target for ``tick`` (None if nothing is planned); drops anything older."""
        for t in [t for t in self._plan if t < tick]:
            del self._plan[t]
        qs = self._plan.pop(tick, None)
        if not qs:
            return None
        if self.ensemble_k is None or len(qs) == 1:
            return qs[-1]
        w = np.exp(-self.ensemble_k * np.arange(len(qs)))
        return (w[:, None] * np.stack(qs)).sum(0) / w.sum()

    def clear(self) -> None:
        self._plan.clear()


class BaseProfile:
    """Per-tick ``(vx_mps, wz_radps)`` of a trapezoidal velocity profile, computed on demand.

    Behaves like the list of its ticks (``len``, indexing, iteration, truthiness) and is consumed with
    ``pop(0)``, each in O(1): a long move costs nothing up front. Its last tick is ``(0.0, 0.0)``.
    """

    def __init__(self, dist: float, vmax: float, amax: float, dt_s: float, sign: float, linear: bool):
        t_acc = vmax / amax
        if amax * t_acc**2 >= dist:  # triangular: never reaches vmax
            t_acc = math.sqrt(dist / amax)
            vmax = amax * t_acc
            t_flat = 0.0
        else:
            t_flat = (dist - amax * t_acc**2) / vmax
        self._t_acc, self._t_flat, self._vmax, self._amax = t_acc, t_flat, vmax, amax
        self._total = 2 * t_acc + t_flat
        self._dt, self._sign, self._linear = dt_s, sign, linear
        self._n = int(math.ceil(self._total / dt_s)) + 1  # moving ticks, then one zero
        self._next = 0

    def __len__(self) -> int:
        return self._n - self._next

    def __getitem__(self, i: int) -> tuple[float, float]:
        if not isinstance(i, int):
            raise TypeError("BaseProfile indices are integers")
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self._next + i
        if k == self._n - 1:
            return (0.0, 0.0)
        t = (k + 0.5) * self._dt
        a, t_acc, t_flat = self._amax, self._t_acc, self._t_flat
        v = a * t if t < t_acc else self._vmax if t < t_acc + t_flat else max(0.0, a * (self._total - t))
        return (self._sign * v, 0.0) if self._linear else (0.0, self._sign * v)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def pop(self, i: int = 0) -> tuple[float, float]:
        if i != 0:
            raise IndexError("a BaseProfile is consumed from the front")
        out = self[0]
        self._next += 1
        return out


def base_profile(direction: str, value: float, dt_s: float, max_v: float, max_a: float, max_w: float,
                 max_alpha: float) -> BaseProfile | list:
    """Per-tick ``(vx_mps, wz_radps)`` moving ``value`` metres forward or turning ``value`` degrees.

    A trapezoidal (or triangular) velocity profile within the speed and acceleration limits, ending
    at zero velocity (a :class:`BaseProfile`; ``[]`` for ``stop`` or a zero move). Clip ``value`` to
    the policy's full scale first (the loop does).
    """
    if direction == "forward":
        dist, vmax, amax, sign, linear = abs(value), max_v, max_a, 1.0, True
    elif direction in ("turn_left", "turn_right"):
        dist, vmax, amax, linear = math.radians(abs(value)), max_w, max_alpha, False
        sign = 1.0 if direction == "turn_left" else -1.0
    else:
        return []
    if dist <= 0:
        return []
    return BaseProfile(dist, vmax, amax, dt_s, sign, linear)


class InferenceWorker:
    """Runs one policy step at a time on its own thread; the loop polls for the result."""

    def __init__(self, policy, robot, cameras: list[str]):
        self.policy = policy
        self.robot = robot
        self.cameras = cameras
        self._lock = threading.Lock()
        self._busy = False
        self._result = None
        self._started_s = 0.0
        self._obs_tick = 0

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def running_for_s(self) -> float:
        return time.monotonic() - self._started_s if self._busy else 0.0

    def request(self, tick: int) -> None:
        if self._busy:
            return
        self._busy = True
        self._obs_tick = tick
        self._started_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait for a running step to finish (ONNX Runtime must not be torn down mid-run)."""
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join(timeout_s)

    def _run(self) -> None:
        try:
            fs = self.robot.read_frames()
            state = self.robot.read_state()
            frames = [fs.images[c] for c in self.cameras]
            chunk = self.policy.step(frames, state.qpos)
            out = ("ok", chunk, self._obs_tick, fs)
        except Exception as e:  # reported to the control thread, which makes the robot safe
            out = ("error", e, self._obs_tick, None)
        with self._lock:
            self._result = out
            self._busy = False

    def poll(self):
        with self._lock:
            r, self._result = self._result, None
        return r


class ControlLoop:
    """Drives ``robot`` with ``policy`` until a limit, a fault or a stop request."""

    def __init__(self, robot, policy, instruction: str, cfg: LoopConfig, safety, estop, stats, recorder=None,
                 cameras: list[str] | None = None, stop_requested: threading.Event | None = None, view=None):
        self.robot = robot
        self.policy = policy
        self.instruction = instruction
        self.cfg = cfg
        self.safety = safety
        self.estop = estop
        self.stats = stats
        self.recorder = recorder
        self.view = view
        """A live view (``run --view``): ``tick(...)``, ``inference(...)``; never blocks."""
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
        """Wait for a running inference step (ONNX Runtime must not be torn down mid-run)."""
        self.worker.join(timeout_s)

    def _safe_stop(self, message: str) -> None:
        """Arms hold their last commanded target, base zero velocity; remember why."""
        if self.fault is None:
            self.fault = message
            log.error("safe stop: %s", message)
        self._hold()

    def _hold(self) -> None:
        try:
            self.robot.hold()
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
        if faults:
            raise VlaEdgeError("; ".join(faults))
        state = robot.read_state()
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
            raise VlaEdgeError(
                f"inference step past its deadline ({self.worker.running_for_s:.1f} s > {cfg.inference_deadline_s:.1f} s)"
            )
        # next joint target
        q = self.schedule.pop(k)
        clamps = 0
        if q is not None:
            safe, clamped = self.safety.filter_joints(q, self._target)
            clamps += len(clamped)
            self._target = safe
            robot.send_joint_targets(safe)
        # base
        vx, wz = self.base_plan.pop(0) if self.base_plan else (0.0, 0.0)
        vx, wz, bclamped = self.safety.filter_base(vx, wz, 1.0 / cfg.rate_hz)
        clamps += len(bclamped)
        robot.send_base_velocity(vx, wz)
        self._base_cmd = (vx, wz)
        self.stats.clamps(clamps)
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
        if self.recorder is not None:
            self.recorder.record_inference(time.monotonic(), chunk.timings_ms, chunk.token_ids)
        if self.view is not None:  # the chunk boundary: this tick's plan is the new chunk's
            what = f"{chunk.base[0]} {chunk.base[1]:.2f}" if chunk.base is not None and chunk.base[0] != "stop" \
                else f"{len(chunk.joints) if chunk.joints is not None else 0} steps"
            self.view.inference(k, time.monotonic(), chunk.timings_ms, f"chunk: {what}, observed at tick {obs_tick}")
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

    def _record(self, k, now, state, target, base, clamps) -> None:
        if self.recorder is None and self.view is None:
            return
        frames, stamps = {}, {}
        for name in self.cameras:
            f = self.robot.cameras.cameras[name].latest()
            if f is not None:
                frames[name], stamps[name] = f.image, f.stamp_s
        if self.view is not None:
            self.view.tick(k, now, frames, state.qpos, target, base)
        if self.recorder is None or len(frames) != len(self.cameras):
            return
        # ``action``: the command in force this tick, as sent (a hold included), not the policy's wish.
        self.recorder.record_tick(frames, stamps, state.qpos, target, np.asarray(base, np.float64), now, clamps)
