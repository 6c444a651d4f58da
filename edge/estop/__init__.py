"""Keyboard e-stop: a latch that acts at once, independent of the control loop and of inference.

Three modules (this package re-exports nothing: import from the one that defines the name):

* :mod:`vla_edge.edge.estop.latch`: :class:`~vla_edge.edge.estop.latch.EStop`, the latch (``on_trip``
  callbacks run in the triggering thread before it returns; a resume needs a request and a confirmation),
  :class:`~vla_edge.edge.estop.latch.StopRequest` (the run is told to end from outside; exit code 128 +
  the signal number) and :func:`~vla_edge.edge.estop.latch.prefer_this_thread` (real-time priority, else
  niceness, for the threads that detect a stop);
* :mod:`vla_edge.edge.estop.signals`: :func:`~vla_edge.edge.estop.signals.install_signal_handlers`:
  SIGINT, SIGTERM and SIGHUP latch the e-stop and set the stop request, raising nothing in the main thread;
* :mod:`vla_edge.edge.estop.keyboard`: :class:`~vla_edge.edge.estop.keyboard.KeyboardListener`: space
  trips, ``r`` then ``y`` resumes, Ctrl+C trips and ends the run; from a terminal (a native thread writes
  the base's stop frame at once), an evdev keyboard or a display.

Units: times are ``time.monotonic()`` seconds, trip latencies milliseconds.

Usage::

    from vla_edge.edge.estop.keyboard import KeyboardListener
    from vla_edge.edge.estop.latch import EStop, StopRequest
    from vla_edge.edge.estop.signals import install_signal_handlers

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)   # main thread; SIGINT/SIGTERM/SIGHUP
    with KeyboardListener(estop, on_interrupt=lambda: stop.request(signal.SIGINT, "ctrl+c"),
                          on_lost=lambda why: stop.request(signal.SIGHUP, why)):
        loop.run()                                    # ends when stop.event is set
    restore()
    sys.exit(stop.exit_code)                          # 128 + signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)
"""
