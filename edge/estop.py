"""Keyboard e-stop: a latch that acts at once, independent of the control loop and of inference.

:class:`EStop` is the latch. :meth:`EStop.trigger` runs the registered ``on_trip`` callbacks (base
zero, arms hold) *in the caller's thread, before it returns*; with a :class:`KeyboardListener` that
thread is the listener's own, so a stop never waits for a tick or a running inference. Callbacks run
under the latch's lock, one at a time, so actuator commands from two triggering threads never
interleave (the loop's own actuator sends still need their own lock: the Piper V2 SDK shares one tx
message object). The latch holds until an explicit, confirmed resume: :meth:`EStop.request_resume`
then :meth:`EStop.resume`, which runs ``on_resume`` callbacks (re-arm from the current pose, discard
queued actions).

:class:`KeyboardListener` turns keys into those calls: space trips, ``r`` asks "resume? press y",
``y`` confirms (any other key cancels), Ctrl+C trips and then calls ``on_interrupt`` (the run ends), a
lost terminal or keyboard trips and then calls ``on_lost``. Sources:

* ``tty``: the terminal (stdin by default, works over SSH) in raw-input mode; output processing is
  kept so the rest of the program's prints still look right. Restored on :meth:`~KeyboardListener.stop`,
  at exit, and when the listener thread dies. The terminal is read by a native thread
  (:class:`vla_edge.kernels.StopWire`, no GIL): space, Ctrl+C or a lost terminal make it write the stop
  frames armed on it (the base's zero frame: :attr:`KeyboardListener.wire`) at once, and it relays every
  byte to the listener thread, which then does everything below;
* ``evdev``: a physical keyboard on the robot (Linux input devices; needs read access);
* ``pynput``: a keyboard on a display (X11/Wayland session);
* ``none``: no keyboard (the e-stop is then only reachable by signals or code);
* ``auto``: the first of tty, evdev, pynput that works, else none.

:class:`StopRequest` is how the run is told to end from outside (a signal, Ctrl+C, a lost terminal):
state plus an event the control loop waits on. :func:`install_signal_handlers` makes SIGINT, SIGTERM
and SIGHUP latch the e-stop and set that request. The handlers raise nothing: the C-level handler
writes the signal number to a wakeup pipe and a watcher thread (started before the signal) latches
the e-stop and sets the request, so a signal landing in a weakref callback, a ``__del__``, a lock or
a C call can neither be swallowed nor deadlock. A second signal during shutdown is counted and
otherwise ignored.

Usage::

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)   # main thread; SIGINT/SIGTERM/SIGHUP
    with KeyboardListener(estop, on_interrupt=lambda: stop.request(signal.SIGINT, "ctrl+c"),
                          on_lost=lambda why: stop.request(signal.SIGHUP, why)):
        loop.run()                                    # ends when stop.event is set
    restore()
    sys.exit(stop.exit_code)                          # 128 + signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
"""

from __future__ import annotations

import _thread
import atexit
import logging
import os
import select
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vla_edge.edge.errors import VlaEdgeError

log = logging.getLogger(__name__)

POLL_S = 0.01
"""Longest a listener thread sleeps before checking whether it should stop."""

TRIP_KEY = " "
RESUME_KEY = "r"
CONFIRM_KEY = "y"
CTRL_C = "\x03"


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


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_signal_handlers(estop: EStop, stop: StopRequest, signums=SIGNALS) -> Callable[[], None]:
    """SIGINT/SIGTERM/SIGHUP latch ``estop`` and set ``stop``; nothing is raised in the main thread.

    Python's C-level handler writes each signal's number to a wakeup pipe the moment it arrives; a
    daemon thread started here reads it, trips the e-stop (detection time: when the byte was read)
    and then sets ``stop``. The Python-level handlers do nothing, so wherever the main thread was
    (a weakref callback, a ``__del__``, inside a lock) it just carries on. Must be called from the
    main thread. Returns a function that restores the previous handlers and wakeup fd.
    """
    if threading.current_thread() is not threading.main_thread():
        raise VlaEdgeError("e-stop: signal handlers can only be installed from the main thread")
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)  # the C handler must never block
    done = threading.Event()

    def watch() -> None:
        prefer_this_thread()
        while not done.is_set():
            if not select.select([rfd], [], [], POLL_S * 10)[0]:
                continue
            t = time.monotonic()
            try:
                data = os.read(rfd, 64)
            except OSError:
                return
            for signum in data:
                name = signal.Signals(signum).name
                if stop.signum is not None:  # a second signal during shutdown: counted, nothing else
                    stop.request(signum, name, t)
                    continue
                try:
                    estop.trigger(name, t)
                finally:
                    stop.request(signum, name, t)

    watcher = threading.Thread(target=watch, name="estop-signals", daemon=True)
    watcher.start()
    previous_fd = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    previous = {s: signal.signal(s, _ignore_in_python) for s in signums}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(previous_fd)
        done.set()
        watcher.join(1.0)
        for fd in (rfd, wfd):
            os.close(fd)

    return restore


def _ignore_in_python(signum, frame) -> None:
    """The Python half of a signal: nothing (the wakeup pipe's watcher acts; see install_signal_handlers)."""


def _tty_keys(data: bytes) -> list[str]:
    """Bytes read from a raw terminal -> keys: characters lower-cased, Ctrl+C, ``"right"`` for the
    right-arrow sequence ESC [ C, ``"esc"`` for a lone Escape; other escape sequences are dropped."""
    keys, i = [], 0
    while i < len(data):
        if data[i] == 0x1B:
            if data[i + 1 : i + 2] == b"[" and i + 2 < len(data):
                keys += ["right"] if data[i + 2 : i + 3] == b"C" else []
                i += 3
                continue
            keys.append("esc")
        else:
            keys.append(CTRL_C if data[i] == 3 else chr(data[i]).lower())
        i += 1
    return keys


class KeyboardListener:
    """Reads e-stop keys on its own daemon thread and drives an :class:`EStop`.

    ``tty_fd``: for ``source="tty"``, a terminal file descriptor or a device path (default: stdin if it
    is a terminal). ``on_interrupt``: what Ctrl+C does after tripping (default: raise
    ``KeyboardInterrupt`` in the main thread). ``on_lost(why)``: what a lost terminal or keyboard does
    after tripping (default: nothing more; the e-stop stays latched). ``confirm_timeout_s``: an unanswered
    "resume?" expires. ``self.source`` is the source actually in use once constructed. ``on_key(key)`` gets
    every other key (lower-case letters, ``"right"``, ``"esc"``; e.g. ``vla-edge record``'s episode keys),
    never the e-stop keys.
    """

    SOURCES = ("auto", "tty", "evdev", "pynput", "none")

    def __init__(
        self,
        estop: EStop,
        source: str = "auto",
        tty_fd: int | str | Path | None = None,
        on_interrupt: Callable[[], None] | None = None,
        confirm_timeout_s: float = 10.0,
        on_key: Callable[[str], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        if source not in self.SOURCES:
            raise VlaEdgeError(f"e-stop: unknown keyboard source {source!r} (one of {', '.join(self.SOURCES)})")
        self.estop = estop
        self.on_interrupt = on_interrupt or (lambda: _thread.interrupt_main(signal.SIGINT))
        self.on_lost = on_lost or (lambda why: None)
        self.confirm_timeout_s = confirm_timeout_s
        self.on_key = on_key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.priority: str | None = None
        """What :func:`prefer_this_thread` granted the listener thread (``fifo``, ``nice``, ``default``)."""
        self._confirm_deadline: float | None = None
        self._fd: int | None = None
        self._own_fd = False
        self._saved_attrs = None
        self._restore_lock = threading.Lock()
        self._evdev_devices: list = []
        self._pynput_listener = None
        self.wire = None
        """``tty`` only, while started: the native :class:`vla_edge.kernels.StopWire` reading the terminal.
        Arm it with a device's stop frame (``TracerBase.attach_stop_gate``) to have that frame written
        without waiting for any Python thread."""
        self._relay: int | None = None
        self.source = self._resolve(source, tty_fd)
        if self.source != "none":
            log.info("e-stop keyboard: %s (space = stop, r then y = resume)", self.source)

    # -- source selection ---------------------------------------------------------------------------
    def _resolve(self, source: str, tty_fd) -> str:
        order = ["tty", "evdev", "pynput"] if source == "auto" else [source]
        for s in order:
            if s == "none":
                return s
            try:
                if getattr(self, f"_open_{s}")(tty_fd):
                    return s
            except VlaEdgeError:
                if source != "auto":
                    raise
        if source != "auto":
            raise VlaEdgeError(f"e-stop: keyboard source {source!r} is not available here")
        log.warning("e-stop: no keyboard available (no terminal, evdev keyboard or display): keys disabled")
        return "none"

    def _open_tty(self, tty_fd) -> bool:
        if tty_fd is None:
            if not sys.stdin or not sys.stdin.isatty():
                return False
            self._fd = sys.stdin.fileno()
        elif isinstance(tty_fd, int):
            self._fd = tty_fd
        else:
            try:
                self._fd = os.open(tty_fd, os.O_RDWR | os.O_NOCTTY)
            except OSError as e:
                raise VlaEdgeError(f"e-stop: cannot open terminal {tty_fd}: {e}") from e
            self._own_fd = True
        if not os.isatty(self._fd):
            raise VlaEdgeError(f"e-stop: file descriptor {self._fd} is not a terminal")
        return True

    def _open_evdev(self, _tty_fd) -> bool:
        try:
            import evdev
        except Exception:  # missing module or broken install: not available
            return False
        keyboards = []
        for path in evdev.list_devices():
            try:
                dev = evdev.InputDevice(path)
            except OSError:
                continue
            if evdev.ecodes.KEY_SPACE in dev.capabilities().get(evdev.ecodes.EV_KEY, []):
                keyboards.append(dev)
            else:
                dev.close()
        self._evdev_devices = keyboards
        return bool(keyboards)

    def _open_pynput(self, _tty_fd) -> bool:
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return False
        try:
            from pynput import keyboard  # noqa: F401 - raises ImportError without a usable display
        except Exception:
            return False
        return True

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> KeyboardListener:
        if self.source == "tty":
            from vla_edge.kernels import StopWire

            self._enter_raw_input()
            self._relay, relay_w = os.pipe()
            try:
                self.wire = StopWire(self._fd, TRIP_KEY + CTRL_C, relay_w, ESTOP_THREAD_RT_PRIORITY, ESTOP_THREAD_NICE)
            finally:
                os.close(relay_w)  # the wire holds its own copy
            self.estop.on_resume(self.wire.rearm)  # however the latch is resumed (devices rearm in release() too)
        if self.source == "pynput":
            self._start_pynput()
        elif self.source in ("tty", "evdev"):
            target = self._run_tty if self.source == "tty" else self._run_evdev
            self._thread = threading.Thread(target=target, name=f"estop-{self.source}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and restore the terminal. Safe to call twice."""
        self._stop.set()
        if self.wire is not None:
            self.wire.close()  # its relay ends: the listener thread returns
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if self._relay is not None and (self._thread is None or not self._thread.is_alive()):
            os.close(self._relay)
            self._relay = None
        if self._pynput_listener is not None:
            self._pynput_listener.stop()
            self._pynput_listener = None
        self._restore_terminal()
        for dev in self._evdev_devices:
            dev.close()
        self._evdev_devices = []
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
            self._fd, self._own_fd = None, False

    def __enter__(self) -> KeyboardListener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- terminal -----------------------------------------------------------------------------------
    def _enter_raw_input(self) -> None:
        """Raw input (no line buffering, echo, signals or flow control); output processing unchanged."""
        fd = self._fd
        self._saved_attrs = termios.tcgetattr(fd)
        attrs = termios.tcgetattr(fd)
        attrs[0] &= ~(termios.IXON | termios.ICRNL | termios.INLCR | termios.IGNCR | termios.ISTRIP)
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        attrs[6][termios.VMIN] = 1
        attrs[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        atexit.register(self._restore_terminal)

    def _restore_terminal(self) -> None:
        with self._restore_lock:
            if self._saved_attrs is None:
                return
            saved, self._saved_attrs = self._saved_attrs, None
        try:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError) as e:  # the terminal may be gone (SSH hang-up)
            log.debug("e-stop: could not restore terminal: %s", e)
        atexit.unregister(self._restore_terminal)

    def _say(self, text: str) -> None:
        """A line for the operator: on the terminal in tty mode, else in the log."""
        if self.source == "tty" and self._fd is not None:
            try:
                os.write(self._fd, f"\r\n{text}\r\n".encode())
                return
            except OSError:
                pass
        log.warning("e-stop: %s", text)

    # -- keys (shared by every source) --------------------------------------------------------------
    def _key(self, key: str, t_detected: float) -> None:
        """Act on one key: ``" "``, ``"r"``, ``"y"``, ``"\\x03"`` or anything else."""
        if key == TRIP_KEY:
            self._confirm_deadline = None
            self.estop.trigger("space key", t_detected)
            self._say("E-STOP latched (r then y to resume)")
        elif key == CTRL_C:
            self._confirm_deadline = None
            self.estop.trigger("ctrl+c", t_detected)
            self.on_interrupt()
        elif self._confirm_deadline is not None:
            expired = time.monotonic() > self._confirm_deadline
            self._confirm_deadline = None
            if key == CONFIRM_KEY and not expired and self.estop.resume():
                self._say("resumed")
            else:
                self.estop.cancel_resume("expired" if expired else f"key {key!r}")
                self._say("resume cancelled: still latched")
        elif key == RESUME_KEY:
            if self.estop.request_resume():
                self._confirm_deadline = time.monotonic() + self.confirm_timeout_s
                self._say(f"resume? press {CONFIRM_KEY}")
        elif self.on_key is not None:
            self.on_key(key)

    def _prefer(self) -> None:
        """Raise this listener thread's priority; say once what was granted."""
        self.priority = prefer_this_thread()
        native = f"; the terminal is read by a native thread at {PRIORITY_WORDS[self.wire.priority]}" if self.wire else ""
        log.info("e-stop: keyboard (%s) thread at %s%s", self.source, PRIORITY_WORDS[self.priority], native)

    def _run_tty(self) -> None:
        fd, wire = self._relay, self.wire  # what the native thread read from the terminal, byte for byte
        self._prefer()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], POLL_S)
                if not ready:
                    continue
                t = time.monotonic()
                data = os.read(fd, 64)
                if not data:  # the wire's thread ended
                    if self._stop.is_set():
                        return
                    # the operator can no longer stop the robot: that is a stop (the wire's frames are out)
                    why = wire.trip_reason.removeprefix("keyboard lost (").removesuffix(")")
                    self.estop.trigger(f"keyboard lost ({why})", min(t, wire.trip_time_s or t))
                    self.on_lost(f"terminal lost ({why})")
                    return
                for key in _tty_keys(data):
                    # a trip key's detection: when the wire read it (it wrote the stop frames then)
                    tripped = key in (TRIP_KEY, CTRL_C) and wire.tripped
                    self._key(key, min(t, wire.trip_time_s) if tripped else t)
        except BaseException:
            log.exception("e-stop: keyboard thread failed")
            self.estop.trigger("keyboard thread failed")
            raise
        finally:
            self._restore_terminal()

    def _run_evdev(self) -> None:
        import evdev

        names = {evdev.ecodes.KEY_SPACE: TRIP_KEY, evdev.ecodes.KEY_R: RESUME_KEY, evdev.ecodes.KEY_Y: CONFIRM_KEY,
                 evdev.ecodes.KEY_N: "n", evdev.ecodes.KEY_B: "b", evdev.ecodes.KEY_Q: "q",
                 evdev.ecodes.KEY_RIGHT: "right", evdev.ecodes.KEY_ESC: "esc"}
        devices = {dev.fd: dev for dev in self._evdev_devices}
        self._prefer()
        try:
            while not self._stop.is_set() and devices:
                ready, _, _ = select.select(list(devices), [], [], POLL_S)
                t = time.monotonic()
                for fd in ready:
                    try:
                        events = list(devices[fd].read())
                    except OSError as e:  # keyboard unplugged
                        self.estop.trigger(f"keyboard lost ({e})", t)
                        del devices[fd]
                        if not devices:
                            self.on_lost(f"keyboard lost ({e})")
                        continue
                    for ev in events:
                        if ev.type == evdev.ecodes.EV_KEY and ev.value == 1:  # key down
                            self._key(names.get(ev.code, "other"), t)
        except BaseException:
            log.exception("e-stop: evdev thread failed")
            self.estop.trigger("keyboard thread failed")
            raise

    def _start_pynput(self) -> None:
        from pynput import keyboard

        def on_press(key):
            t = time.monotonic()
            if key == keyboard.Key.space:
                self._key(TRIP_KEY, t)
            elif key in (keyboard.Key.right, keyboard.Key.esc):
                self._key(key.name, t)
            else:
                self._key((getattr(key, "char", None) or "other").lower(), t)

        self._pynput_listener = keyboard.Listener(on_press=on_press, daemon=True)
        self._pynput_listener.start()
