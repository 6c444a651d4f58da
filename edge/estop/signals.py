"""Signals latch the e-stop: SIGINT, SIGTERM and SIGHUP trip an :class:`~vla_edge.edge.estop.latch.EStop`
and set a :class:`~vla_edge.edge.estop.latch.StopRequest`.

:func:`install_signal_handlers` makes :data:`SIGNALS` latch the e-stop and set that request. The handlers
raise nothing: the C-level handler writes the signal number to a wakeup pipe and a watcher thread (started
before the signal, at the priority :func:`~vla_edge.edge.estop.latch.prefer_this_thread` grants) latches
the e-stop and sets the request, so a signal landing in a weakref callback, a ``__del__``, a lock or a C
call can neither be swallowed nor deadlock. A second signal during shutdown is counted and otherwise
ignored.

Units: a signal's detection time is the ``time.monotonic()`` second the watcher read its byte; the watcher
checks every ``10 * POLL_S`` seconds (0.1 s) whether it should end; the run's exit code is 128 + the
signal number.

Usage::

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)   # main thread; SIGINT/SIGTERM/SIGHUP
    loop.run()                                        # ends when stop.event is set
    restore()                                         # the previous handlers and wakeup fd
    sys.exit(stop.exit_code)                          # 128 + signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from vla_edge import VlaEdgeError
from vla_edge.edge.estop.latch import POLL_S, EStop, StopRequest, prefer_this_thread

log = logging.getLogger(__name__)

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
        if watcher.is_alive():  # still inside a callback: its pipe stays open (a reused fd must not be read)
            log.warning("e-stop: the signal watcher did not end within 1 s; its pipe is left open")
            return
        for fd in (rfd, wfd):
            os.close(fd)

    return restore


def _ignore_in_python(signum, frame) -> None:
    """The Python half of a signal: nothing (the wakeup pipe's watcher acts; see install_signal_handlers)."""
