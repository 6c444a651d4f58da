"""``vla-edge run`` and ``vla-edge demo``: put the policy on a robot (the simulated one by default).

Usage::

    vla-edge run --robot sim --seconds 10                       # the demo bundle on the simulated robot
    vla-edge run --robot cobot_magic --bundle b/ --record eps/  # the real one, recording each episode
    vla-edge run --robot sim --seconds 10 --view                # and watch it live in Rerun ([view] extra)
    vla-edge run --robot sim --seconds 10 --view-save run.rrd   # or stream it into a file

``--view`` / ``--view-save`` stream the cameras, the composed model image, commanded vs measured joints,
the base command, stage latencies, chunk boundaries and e-stop events (:mod:`vla_edge.edge.episodes.view`); the
control tick only hands over a copy of its frames, and a tick the logger is behind on is dropped.
"""

from __future__ import annotations

import logging
import os
import sys

from vla_edge.edge.errors import VlaEdgeError

log = logging.getLogger(__name__)


SWITCH_INTERVAL_S = 0.001
"""GIL switch interval during a run (Python's default is 5 ms): a thread waiting for the GIL (the
e-stop's) gets it within about this long while another thread runs Python code (decode steps)."""


def run(robot_name: str, bundle_path: str | None, instruction: str, *, mode: str = "sync", seconds: float = 0.0,
        rate_hz: float | None = None, navigation: bool = False, record: str | None = None, json_path: str | None = None,
        provider: str = "auto", keyboard: str = "auto", keyboard_tty=None, max_ticks: int = 0,
        firmware_estop: bool = False, policy_wrapper=None, on_connected=None, restore_signals: bool = True,
        view: bool = False, view_save: str | None = None, record_compression: str = "gzip") -> int:
    """Connect, run the loop, make everything safe, print the summary. Returns the exit code.

    Exit codes: 0 the run ended by itself (``seconds``, ``max_ticks``); 3 a fault (safe stop, the
    reason on one line); 128 + the signal number for an operator stop: 130 SIGINT or Ctrl+C, 143
    SIGTERM, 129 SIGHUP or a lost terminal. Every signal latches the e-stop at once and ends the
    run through the same path as the end of a run (robot safe, recording closed, summary printed);
    a signal during start-up ends it after the current start-up step, with one line.

    ``keyboard``/``keyboard_tty``: the e-stop key source and, for ``tty``, the terminal (an fd or a
    path; default stdin). ``policy_wrapper(engine) -> policy`` and ``on_connected(robot, loop, estop)``
    are hooks for tests and evaluation (a slowed-down policy, fault injection). ``restore_signals``:
    put the previous SIGINT/SIGTERM/SIGHUP handlers back at the end (False: the process exits next).
    ``view`` / ``view_save``: stream the run to a Rerun viewer / into a .rrd file.
    ``record_compression``: the recorder's image filter, ``gzip`` (default), ``lzf`` (cheaper on noisy
    real-camera frames) or ``none``.
    """
    import signal

    from vla_edge.edge.estop import EStop, StopRequest, install_signal_handlers

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        return _run(robot_name, bundle_path, instruction, estop, stop, mode=mode, seconds=seconds, rate_hz=rate_hz,
                    navigation=navigation, record=record, json_path=json_path, provider=provider, keyboard=keyboard,
                    keyboard_tty=keyboard_tty, max_ticks=max_ticks, firmware_estop=firmware_estop,
                    policy_wrapper=policy_wrapper, on_connected=on_connected, view=view, view_save=view_save,
                    record_compression=record_compression)
    except KeyboardInterrupt:  # raised by code that is not ours (our handlers raise nothing)
        stop.request(signal.SIGINT, "interrupted")
        print("vla-edge run: interrupted", file=sys.stderr)
        return stop.exit_code
    finally:
        sys.setswitchinterval(switch_interval)
        if restore_signals:
            restore()


class _StartupStopped(Exception):
    """A stop request arrived before the loop ran."""


def _run(robot_name, bundle_path, instruction, estop, stop, *, mode, seconds, rate_hz, navigation, record,
         json_path, provider, keyboard, keyboard_tty, max_ticks, firmware_estop, policy_wrapper, on_connected,
         view=False, view_save=None, record_compression="gzip") -> int:
    import signal
    import time

    from vla_edge.edge.bundle.manifest import Bundle
    from vla_edge.edge.engine import Engine
    from vla_edge.edge.estop import KeyboardListener
    from vla_edge.edge.loop import ControlLoop, LoopConfig
    from vla_edge.edge.robot import Robot, load_profile
    from vla_edge.edge.safety import SafetyFilter, SafetyLimits
    from vla_edge.edge.telemetry import RunStats

    def checkpoint(step: str) -> None:
        if stop.requested:
            raise _StartupStopped(step)

    robot = live = None
    try:
        profile = load_profile(robot_name)
        checkpoint("loading the bundle")
        bundle = Bundle.load(bundle_path)
        threads = max(1, (os.cpu_count() or 2) - 1)  # leave a core for the control tick
        policy = Engine(bundle, provider=provider, threads=threads)
        if policy_wrapper is not None:
            policy = policy_wrapper(policy)
        if view or view_save:
            from vla_edge.edge.episodes.view import LiveView, ViewConfig

            live = LiveView(view_save, ViewConfig(layout=bundle.layout))
        checkpoint("connecting the robot")
        robot = Robot(profile)
        robot.connect()
        checkpoint("starting the loop")
    except BaseException as e:
        if live is not None:
            live.close()
        if not isinstance(e, _StartupStopped):
            raise
        if robot is not None:
            robot.disconnect()  # nothing was commanded: arms hold, base zero
        print(f"vla-edge run: stopped by {stop.reason} during start-up (before {e}); nothing moved", file=sys.stderr)
        return stop.exit_code
    cfg = LoopConfig(rate_hz=rate_hz or profile.control_rate_hz, mode=mode, seconds=seconds, max_ticks=max_ticks,
                     navigation=navigation, nav_max_m=bundle.policy.d_max_m, nav_max_deg=bundle.policy.theta_max_deg)
    stats = RunStats(period_s=1.0 / cfg.rate_hz)
    recorder = None
    loop = None
    fault = None
    try:
        missing = [c for c in bundle.layout.cameras if c not in robot.camera_names]
        if missing:
            raise VlaEdgeError(f"bundle expects cameras {bundle.layout.cameras}; robot {profile.name} has no {missing[0]}")
        if record:
            from vla_edge.edge.engine import STAGES
            from vla_edge.edge.episodes.recorder import EpisodeRecorder

            recorder = EpisodeRecorder(record, cameras=bundle.layout.cameras, stage_names=[*STAGES, "total"],
                                       compress=False if record_compression == "none" else record_compression)
            recorder.start_episode({"instruction": instruction, "bundle": str(bundle.root),  # logs its path
                                    "robot": profile.name, "sim": profile.sim is not None})

        def on_trip(reason: str) -> None:  # runs in the thread that saw the key: acts at once
            robot.estop(firmware=firmware_estop)
            if recorder is not None:
                recorder.record_event(time.monotonic(), "estop", reason)
            if live is not None:
                live.event(loop.tick if loop is not None else 0, time.monotonic(), "estop", reason)

        def on_resume() -> None:
            robot.resume()
            if recorder is not None:
                recorder.record_event(time.monotonic(), "resume", "")
            if live is not None:
                live.event(loop.tick if loop is not None else 0, time.monotonic(), "resume")

        estop.on_trip(on_trip)
        estop.on_resume(on_resume)
        if estop.is_latched:  # a signal between the last checkpoint and here: its trip ran no callbacks
            estop.trigger(estop.reason)
        loop = ControlLoop(robot, policy, instruction, cfg, SafetyFilter(SafetyLimits.for_robot(profile)), estop, stats,
                           recorder, cameras=bundle.layout.cameras, stop_requested=stop.event, view=live)
        status = live_status(stats, loop)
        listener = KeyboardListener(estop, source=keyboard, tty_fd=keyboard_tty,
                                    on_interrupt=lambda: stop.request(signal.SIGINT, "ctrl+c"),
                                    on_lost=lambda why: stop.request(signal.SIGHUP, why))
        log_banner(profile, bundle, policy, mode, cfg.rate_hz, listener.source)
        if on_connected is not None:
            on_connected(robot, loop, estop)
        with status, listener:
            robot.attach_stop_wire(listener.wire)
            fault = loop.run()
    finally:
        try:
            robot.disconnect()
        finally:
            try:
                if recorder is not None:
                    if fault:
                        recorder.record_event(time.monotonic(), "fault", fault)
                    recorder.close()
            finally:
                if live is not None:
                    if fault:
                        live.event(loop.tick if loop is not None else 0, time.monotonic(), "fault", fault)
                    live.close()
    for ms in estop.trip_latencies_ms:  # one per trip: a Ctrl+C and its SIGINT are one trip
        stats.estop_latency(ms)
    if json_path:  # first: the terminal may be gone (SIGHUP), the file is not
        stats.write_json(json_path)
    _to_terminal(stats.print_summary)  # results: stdout
    if loop is not None:
        loop.finish(loop.cfg.inference_deadline_s)  # after the robot is safe and the summary is out
    if fault:
        _to_terminal(lambda: print(f"vla-edge run: stopped safely: {fault}", file=sys.stderr))
        return 3
    if stop.signum is not None:  # an operator stop (a plain ``loop.stop_requested.set()`` is an ordinary end)
        _to_terminal(lambda: print(f"vla-edge run: stopped by {stop.reason}: e-stop latched, robot in the safe state",
                                   file=sys.stderr))
        return stop.exit_code
    return 0


def _to_terminal(write) -> None:
    """Call ``write()``; a terminal that is gone (SSH dropped: EIO) must not turn a safe stop into a traceback."""
    try:
        write()
    except OSError as e:
        log.debug("terminal gone: %s", e)


def live_status(stats, loop):
    """The live status line as a context manager: one rich region at the bottom of a terminal (log lines
    print above it, the line is cut to the width, it is removed at the end); nothing when stderr is no terminal.
    Sets ``loop.on_status``."""
    import contextlib

    from rich.live import Live
    from rich.text import Text
    from vla_edge.edge.telemetry import log_console

    console = log_console()
    if not console.is_terminal:
        return contextlib.nullcontext()

    def line() -> Text:
        return Text(stats.status_line(console.width - 1), no_wrap=True)

    live = Live(line(), console=console, auto_refresh=False, transient=True, redirect_stdout=False,
                redirect_stderr=False)
    loop.on_status = lambda _line: _to_terminal(lambda: live.update(line(), refresh=True))

    @contextlib.contextmanager
    def region():
        _to_terminal(live.start)
        try:
            yield live
        finally:
            _to_terminal(live.stop)  # SSH dropped: the terminal is gone, the run still ends cleanly

    return region()


def log_banner(profile, bundle, policy, mode: str, rate_hz: float, keyboard_source: str) -> None:
    """One log line: what runs where, and the keys (none advertised when there is no keyboard)."""
    keys = ("space: e-stop, r then y: resume, Ctrl+C: stop" if keyboard_source != "none"
            else "no e-stop keys, Ctrl+C stops")
    log.info("vla-edge run: robot=%s bundle=%s (%s, %s) mode=%s rate=%g Hz; keyboard %s: %s", profile.name,
             bundle.root, bundle.precision, getattr(policy, "provider", "?"), mode, rate_hz, keyboard_source, keys)
