"""The e-stop latch: :class:`EStop` acts at once, independent of the control loop and of inference.

:meth:`EStop.trigger` runs the registered ``on_trip`` callbacks (base zero, arms hold) *in the caller's
thread, before it returns*; with a :class:`~vla_edge.edge.estop.keyboard.KeyboardListener` that thread is
the listener's own, so a stop never waits for a tick or a running inference. Callbacks run under the
latch's lock, one at a time, so actuator commands from two triggering threads never interleave (the
loop's own actuator sends still need their own lock: the Piper V2 SDK shares one tx message object). The
latch holds until an explicit, confirmed resume: :meth:`EStop.request_resume` then :meth:`EStop.resume`,
which runs ``on_resume`` callbacks (re-arm from the current pose, discard queued actions).

:class:`StopRequest` is how the run is told to end from outside (a signal, Ctrl+C, a lost terminal):
state plus an event the control loop waits on. :func:`prefer_this_thread` raises the priority of the
threads that detect a stop (the keyboard listener, :mod:`vla_edge.edge.estop.keyboard`; the signal
watcher, :mod:`vla_edge.edge.estop.signals`); :data:`PRIORITY_WORDS` says what was granted.

Units: times are ``time.monotonic()`` seconds (``t_detected``, :attr:`EStop.events`,
:attr:`StopRequest.t_s`); trip latencies (:attr:`EStop.last_trip_ms`, :attr:`EStop.trip_latencies_ms`)
are milliseconds from detection until every ``on_trip`` callback returned.

Usage::

    estop, stop = EStop(), StopRequest()
    estop.on_trip(lambda reason: robot.estop())   # runs in the triggering thread, under the latch's lock
    estop.on_resume(robot.resume)                 # runs on a confirmed resume, before the latch opens
    estop.trigger("space key")                    # latched, callbacks done; True the first time
    estop.request_resume() and estop.resume()     # r then y: unlatched unless a callback raised
    stop.request(signal.SIGTERM, "SIGTERM")       # stop.event set; stop.exit_code == 143 (128 + 15)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from vla_edge import VlaEdgeError

log = logging.getLogger(__name__)

POLL_S = 0.01
"""Longest a thread that detects a stop sleeps before checking whether it should end, seconds (the keyboard
listener; the signal watcher waits ten times this)."""

ESTOP_THREAD_RT_PRIORITY = 10
"""Real-time priority (SCHED_FIFO, 1-99) asked first for the threads that detect a stop (keyboard,
signals): such a thread runs the moment its key or signal arrives, ahead of every ordinary thread, however
loaded the machine. 10 stays below the kernel's threaded interrupt handlers (50). These threads sleep in
``select`` and do a few milliseconds of work per key, so they cannot starve the machine. A thread or
process started from one of them would inherit the real-time policy: ``on_trip``/``on_resume``/``on_key``
callbacks must start nothing. Needs root, CAP_SYS_NICE or an rtprio limit >= 10
(``/etc/security/limits.conf``: ``robot - rtprio 10``)."""

ESTOP_THREAD_NICE = -10
"""Niceness asked when real-time priority is not permitted (needs CAP_SYS_NICE too; else the default)."""


def prefer_this_thread(rt_priority: int = ESTOP_THREAD_RT_PRIORITY, nice: int = ESTOP_THREAD_NICE) -> str:
    """Raise the calling thread's scheduling priority as far as permitted (Linux: a thread is a task).

    Returns what was granted: ``"fifo"`` (SCHED_FIFO at ``rt_priority``), ``"nice"`` (niceness ``nice``)
    or ``"default"``. Measured with ``python -m vla_edge.tools.bench_estop`` beside six busy processes on 2
    cores, an inference in flight (README, Running): key -> seen by the keyboard thread p99 <= 2.1 ms with
    SCHED_FIFO (5 runs), 11-13 ms in 4 of 5 runs with niceness only.
    """
    tid, name = threading.get_native_id(), threading.current_thread().name
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(rt_priority))
        return "fifo"
    except (OSError, AttributeError) as e:  # AttributeError: a platform without sched_setscheduler
        log.debug("e-stop: no real-time priority for %s (%s); asking niceness %d", name, e, nice)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return "nice"
    except OSError as e:
        log.debug("e-stop: cannot raise the priority of %s: %s", name, e)
        return "default"


PRIORITY_WORDS = {
    "fifo": f"real-time priority (SCHED_FIFO {ESTOP_THREAD_RT_PRIORITY})",
    "nice": f"niceness {ESTOP_THREAD_NICE} (no real-time priority permitted)",
    "default": "default priority (no CAP_SYS_NICE or rtprio limit: a loaded CPU can delay a stop)",
}


class EStop:
    """Thread-safe e-stop latch.

    ``events`` is a list of ``(t_monotonic_s, kind, reason)`` for recording, kinds: ``trip``,
    ``retrip`` (triggered while already latched), ``resume_requested``, ``resume_cancelled``,
    ``resume``, ``callback_error``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.trip_latencies_ms: list[float] = []
        """One entry per trip that latched (re-triggers while latched add none): detection to callbacks done."""
        self._lock = threading.RLock()  # reentrant: a signal handler may trigger while main holds it
        self._latched = threading.Event()
        self._resume_pending = False
        self._on_trip: list[Callable[[str], None]] = []
        self._on_resume: list[Callable[[], None]] = []
        self.events: list[tuple[float, str, str]] = []
        self.reason = ""
        self.trip_t = None
        self.last_trip_ms: float | None = None
        """Milliseconds from the trip's detection (key read, signal) until all on_trip callbacks returned."""

    # -- registration -------------------------------------------------------------------------------
    def on_trip(self, fn: Callable[[str], None]) -> Callable[[str], None]:
        """Register ``fn(reason)``: called on every trigger, in the triggering thread. Keep it short."""
        with self._lock:
            self._on_trip.append(fn)
        return fn

    def on_resume(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Register ``fn()``: called on a confirmed resume, before the latch opens."""
        with self._lock:
            self._on_resume.append(fn)
        return fn

    # -- state --------------------------------------------------------------------------------------
    @property
    def is_latched(self) -> bool:
        return self._latched.is_set()

    @property
    def resume_pending(self) -> bool:
        return self._resume_pending

    def wait_latched(self, timeout: float | None = None) -> bool:
        """Block until latched (or ``timeout`` seconds); return whether it is latched."""
        return self._latched.wait(timeout)

    def _event(self, kind: str, reason: str, t: float | None = None) -> None:
        self.events.append((self._clock() if t is None else t, kind, reason))

    # -- transitions --------------------------------------------------------------------------------
    def trigger(self, reason: str, t_detected: float | None = None) -> bool:
        """Latch and run every ``on_trip`` callback now; return True if this call latched it.

        Callbacks run on every trigger (their commands are idempotent: base zero, arms hold); one
        that raises is logged and recorded and does not stop the others. ``t_detected`` (monotonic
        seconds, default now) is when the cause was seen, for :attr:`last_trip_ms`.
        """
        t0 = self._clock() if t_detected is None else t_detected
        with self._lock:
            newly = not self._latched.is_set()
            self._latched.set()
            self._resume_pending = False
            if newly:
                self.reason, self.trip_t = reason, t0
            self._event("trip" if newly else "retrip", reason, t0)
            for fn in list(self._on_trip):
                try:
                    fn(reason)
                except Exception as e:  # the other callbacks must still run
                    log.exception("e-stop: on_trip callback %r failed", fn)
                    self._event("callback_error", f"{getattr(fn, '__name__', fn)}: {e}")
            self.last_trip_ms = (self._clock() - t0) * 1e3
            if newly:
                self.trip_latencies_ms.append(self.last_trip_ms)
        if newly:
            log.warning("E-STOP latched: %s", reason)
        return newly

    def request_resume(self) -> bool:
        """First half of a resume: returns False (and does nothing) unless latched."""
        with self._lock:
            if not self._latched.is_set():
                return False
            self._resume_pending = True
            self._event("resume_requested", "")
            return True

    def cancel_resume(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._resume_pending:
                self._resume_pending = False
                self._event("resume_cancelled", reason)

    def resume(self) -> bool:
        """Confirm a requested resume: run ``on_resume`` callbacks, then unlatch.

        Returns False (still latched) without a pending :meth:`request_resume`, or if a callback
        raised (the robot could not be re-armed safely).
        """
        with self._lock:
            if not (self._latched.is_set() and self._resume_pending):
                return False
            self._resume_pending = False
            for fn in list(self._on_resume):
                try:
                    fn()
                except VlaEdgeError as e:  # an expected refusal (a device still stopped): one line
                    log.error("e-stop: cannot resume: %s; staying latched", e)
                    self._event("callback_error", f"{getattr(fn, '__name__', fn)}: {e}")
                    return False
                except Exception as e:
                    log.exception("e-stop: on_resume callback %r failed; staying latched", fn)
                    self._event("callback_error", f"{getattr(fn, '__name__', fn)}: {e}")
                    return False
            self._event("resume", self.reason)
            self._latched.clear()
            self.reason, self.trip_t = "", None
        log.warning("e-stop released: resuming from the current pose")
        return True


class StopRequest:
    """A request to end the run from outside the loop: which signal (or ``SIGHUP`` for a lost terminal),
    why, when, and how many arrived. Set from any thread; :attr:`event` is what the loop waits on."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.signum: int | None = None
        self.reason = ""
        self.t_s: float | None = None
        self.count = 0
        self._lock = threading.Lock()

    def request(self, signum: int, reason: str, t_s: float | None = None) -> bool:
        """Ask the run to end; returns True for the first request (later ones are only counted)."""
        with self._lock:
            self.count += 1
            first = self.signum is None
            if first:
                self.signum, self.reason = int(signum), reason
                self.t_s = time.monotonic() if t_s is None else t_s
        self.event.set()
        if not first:
            log.warning("stop requested again (%s) while stopping: ignored", reason)
        return first

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def exit_code(self) -> int:
        """128 + the signal number (the shell's convention): 130 SIGINT/Ctrl+C, 143 SIGTERM, 129 SIGHUP; 0 if none."""
        return 128 + self.signum if self.signum is not None else 0
