"""The thread lifecycle the simulators share: one daemon thread running ``_loop()`` until ``stop()``.

Usage::

    class MySim(SimThread):
        thread_name = "my-sim"

        def __init__(self):
            super().__init__()          # sets _stop (threading.Event) and _thread

        def _loop(self):                # runs on the thread; return when _stop is set
            while not self._stop.wait(0.02):
                ...                     # one 50 Hz tick

        def _release(self, ran):        # optional: close what start() or __init__ opened
            ...

    with MySim() as sim:                # or sim = MySim().start(); ...; sim.stop()
        ...

:meth:`SimThread.stop` sets the event, joins the thread for at most ``join_timeout_s`` (1 s), then
calls :meth:`SimThread._release`; it is safe to call twice. Times are ``time.monotonic()`` seconds.
Used by :class:`~vla_edge.firmware_bridge.piper_sim.PiperSim`,
:class:`~vla_edge.firmware_bridge.piper_master_sim.PiperMasterSim` and
:class:`~vla_edge.firmware_bridge.tracer_sim.TracerSim`.
"""

from __future__ import annotations

import threading
from typing import Self


class SimThread:
    """A simulated device driven by one daemon thread; a context manager (``with`` starts and stops)."""

    thread_name = "sim"
    """The thread's name (:meth:`_thread_label` may add to it, e.g. the CAN channel)."""
    join_timeout_s = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start the thread (after :meth:`_open`); returns ``self``."""
        self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._thread_label(), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end, wait for it, then :meth:`_release`. Safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.join_timeout_s)
        self._release(ran=thread is not None)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- to override -----------------------------------------------------------------------------
    def _loop(self) -> None:
        """The simulator's body, on the thread; returns once ``self._stop`` is set."""
        raise NotImplementedError

    def _thread_label(self) -> str:
        return self.thread_name

    def _open(self) -> None:
        """Called by :meth:`start` before the thread starts (e.g. open a bus)."""

    def _release(self, ran: bool) -> None:
        """Called by :meth:`stop` after the thread ended; ``ran``: a thread was running."""
