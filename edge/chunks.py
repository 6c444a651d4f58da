"""Executing action chunks: the per-tick plan of joint targets, the base's velocity profile, and the thread
that runs one policy step at a time. :class:`~vla_edge.edge.loop.ControlLoop` uses them for a chunk policy.

Usage::

    schedule = ActionSchedule(ensemble_k=None)
    schedule.add_chunk(first_tick=12, steps=chunk.joints)   # (5, 14) rad / m, one row per tick
    q = schedule.pop(12)                                     # the target for tick 12, or None
    plan = base_profile("forward", 0.5, dt_s=1 / 30, max_v=0.5, max_a=1.0, max_w=0.6, max_alpha=2.0)
    vx_mps, wz_radps = plan.pop(0)                           # one tick of the trapezoidal profile
"""

from __future__ import annotations

import math
import threading
import time
import weakref

import numpy as np

_abandoned: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""The threads of policy steps given up on (:meth:`InferenceWorker.abandon`)."""


def abandoned_step_running() -> bool:
    """True while a policy step given up on (past its deadline) still runs in this process.

    Its daemon thread may sit in ONNX Runtime (or torch) for ever, and an interpreter torn down under such a
    thread aborts ("terminate called without an active exception"): a command that sees this after the robot
    is safe and the summary is out ends with ``os._exit`` instead of waiting for it.
    """
    return any(t.is_alive() for t in list(_abandoned))


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
        self._thread: threading.Thread | None = None
        self.abandoned = False
        """The running step was given up on (:meth:`abandon`): nothing waits for it, its result is dropped."""

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
        """Wait for a running step to finish (ONNX Runtime must not be torn down mid-run); not for one given up on."""
        if self._thread is not None and not self.abandoned:
            self._thread.join(timeout_s)

    def abandon(self) -> None:
        """Give up on the running step (it missed its deadline): :meth:`join` returns at once from now on, no
        new step starts, and the step's result, should it ever come, is dropped. Its daemon thread is left
        to run (:func:`abandoned_step_running`)."""
        if self._busy and self._thread is not None:
            self.abandoned = True
            _abandoned.add(self._thread)

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
            if not self.abandoned:
                self._result = out
                self._busy = False

    def poll(self):
        with self._lock:
            r, self._result = self._result, None
        return r
