"""Keyboard e-stop: :class:`KeyboardListener` turns keys into calls on an :class:`~vla_edge.edge.estop.latch.EStop`.

Space trips, ``r`` asks "resume? press y", ``y`` confirms (any other key cancels), Ctrl+C trips and then
calls ``on_interrupt`` (the run ends), a lost terminal or keyboard trips and then calls ``on_lost``. The
listener's thread trips the latch itself, so a stop never waits for a tick or a running inference.
Sources:

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

Units: a key's detection time is the ``time.monotonic()`` second it was read (for a trip key on ``tty``,
when the native thread read it); ``confirm_timeout_s`` is seconds; the listener thread checks every
``POLL_S`` seconds (10 ms) whether it should stop.

Usage (with :func:`~vla_edge.edge.estop.signals.install_signal_handlers` for SIGINT/SIGTERM/SIGHUP)::

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)
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

from vla_edge import VlaEdgeError
from vla_edge.edge.estop.latch import (
    ESTOP_THREAD_NICE,
    ESTOP_THREAD_RT_PRIORITY,
    POLL_S,
    PRIORITY_WORDS,
    EStop,
    prefer_this_thread,
)
from vla_edge.kernels import StopWire

log = logging.getLogger(__name__)

TRIP_KEY = " "
RESUME_KEY = "r"
CONFIRM_KEY = "y"
CTRL_C = "\x03"


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
            import evdev  # evdev: the [keyboard] extra
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
        import evdev  # evdev: the [keyboard] extra

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
        from pynput import keyboard  # pynput: the [keyboard] extra

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
