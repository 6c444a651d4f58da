"""A run on a robot: :class:`Session` (what every run shares: e-stop, signals, keyboard, the native stop path)
and :func:`run` (a policy bundle on a robot, ``vla-edge run`` / ``vla-edge demo``).

Usage::

    from vla_edge.edge.session import RunConfig, run
    rc = run(RunConfig(bundle="reach-int8/", robot="sim", seconds=10))    # the exit code

    with Session(keyboard="tty") as session:     # signals latch the e-stop from here on
        robot = Robot(profile); robot.connect()
        session.checkpoint("starting the loop")  # a signal during start-up: nothing moved
        session.arm(robot, firmware_estop=False, notify=observer_events)
        with session.keys(robot):                # keyboard listener + native stop path
            loop.run()                           # ends on session.stop.event

One order for ``run``, ``record``, ``demo``: signal handlers first (before any device is touched), the
robot's e-stop callbacks once it is connected, the keyboard while the loop runs. ``--view`` / ``--view-save``
stream the cameras, the composed model image, commanded vs measured joints, the base command, stage latencies,
chunk boundaries and e-stop events (:mod:`vla_edge.edge.episodes.view`); the control tick only hands over a copy
of its frames, and a tick the logger is behind on is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.live import Live
from rich.text import Text
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import STAGES, Engine
from vla_edge.edge.episodes.recorder import EpisodeRecorder
from vla_edge.edge.estop.keyboard import KeyboardListener
from vla_edge.edge.estop.latch import EStop, StopRequest
from vla_edge.edge.estop.signals import install_signal_handlers
from vla_edge.edge.loop import ControlLoop, LoopConfig
from vla_edge.edge.profile import load_profile
from vla_edge.edge.remote import DEFAULT_TIMEOUT_S, RemotePolicy, parse_server_urls
from vla_edge.edge.robot import Robot
from vla_edge.edge.safety import SafetyFilter, SafetyLimits
from vla_edge.edge.telemetry import RunStats, log_console
from vla_edge.edge.wire import bundle_id

log = logging.getLogger(__name__)


SWITCH_INTERVAL_S = 0.001
"""GIL switch interval during a run (Python's default is 5 ms): a thread waiting for the GIL (the
e-stop's) gets it within about this long while another thread runs Python code (decode steps)."""


@dataclass
class RunConfig:
    """One ``vla-edge run``. Durations in s, rates in Hz; 0 for ``seconds``/``max_ticks`` means no limit.

    ``keyboard``/``keyboard_tty``: the e-stop key source and, for ``tty``, the terminal (an fd or a path;
    default stdin). ``view`` / ``view_save``: stream the run to a Rerun viewer / into a .rrd file.
    ``record_compression``: the recorder's image filter, ``gzip``, ``lzf`` (cheaper on noisy real-camera
    frames) or ``none``.
    """

    bundle: str
    robot: str = "sim"
    instruction: str = "pick up the red cube"
    mode: str = "sync"
    seconds: float = 0.0
    rate_hz: float | None = None
    max_ticks: int = 0
    navigation: bool = False
    provider: str = "auto"
    keyboard: str = "auto"
    keyboard_tty: int | str | None = None
    firmware_estop: bool = False
    record: str | None = None
    record_compression: str = "gzip"
    json_path: str | None = None
    view: bool = False
    view_save: str | None = None
    policy_server: str | None = None
    """``URL[,URL2]`` of a ``vla-edge serve`` policy server: only the policy step is remote
    (:class:`~vla_edge.edge.remote.RemotePolicy`); ``bundle``, if given, must be the bundle it serves."""
    policy_timeout_s: float = DEFAULT_TIMEOUT_S
    """Per policy-server request; a second failed try (the next URL) is a safe stop."""


class StartupStopped(Exception):
    """A stop request arrived before the loop ran."""


class Session:
    """The e-stop latch (:attr:`estop`), the stop request (:attr:`stop`), SIGINT/SIGTERM/SIGHUP handlers, the
    keyboard listener and its native stop path, wired in one order (module docstring). A context manager:
    the handlers are installed on entry and put back on exit (``restore_signals=False``: kept, the process
    exits next). ``on_key(key)`` gets the keys that are not e-stop keys (``vla-edge record``'s episode keys).
    """

    def __init__(self, keyboard: str = "auto", keyboard_tty=None, on_key: Callable[[str], None] | None = None,
                 restore_signals: bool = True):
        self.estop, self.stop = EStop(), StopRequest()
        self.keyboard, self.keyboard_tty, self.on_key = keyboard, keyboard_tty, on_key
        self.restore_signals = restore_signals
        self.listener: KeyboardListener | None = None
        self._restore: Callable[[], None] | None = None
        self._switch_interval_s = sys.getswitchinterval()

    def __enter__(self) -> Session:
        self._restore = install_signal_handlers(self.estop, self.stop)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        return self

    def __exit__(self, *exc) -> None:
        sys.setswitchinterval(self._switch_interval_s)
        if self.restore_signals and self._restore is not None:
            self._restore()

    def checkpoint(self, step: str) -> None:
        """Raise :class:`StartupStopped` if a stop was requested before ``step``."""
        if self.stop.requested:
            raise StartupStopped(step)

    def arm(self, robot, firmware_estop: bool, notify: Callable[[str, str], None]) -> None:
        """The connected robot's e-stop callbacks: a trip makes the robot safe at once (arms hold, base zero;
        ``firmware_estop``: also the Piper firmware e-stop), a confirmed resume re-enables it; each then calls
        ``notify(kind, reason)`` with kind ``estop`` or ``resume`` (recorder, live view)."""

        def on_trip(reason: str) -> None:  # runs in the thread that saw the key: acts at once
            robot.estop(firmware=firmware_estop)
            notify("estop", reason)

        def on_resume() -> None:
            robot.resume()
            notify("resume", "")

        self.estop.on_trip(on_trip)
        self.estop.on_resume(on_resume)
        if self.estop.is_latched:  # a signal between the last checkpoint and here: its trip ran no callbacks
            self.estop.trigger(self.estop.reason)

    def open_keyboard(self) -> KeyboardListener:
        """The keyboard listener (not started yet: :meth:`keys`); ``.source`` says which keyboard it found."""
        if self.listener is None:
            self.listener = KeyboardListener(
                self.estop, source=self.keyboard, tty_fd=self.keyboard_tty, on_key=self.on_key,
                on_interrupt=lambda: self.stop.request(signal.SIGINT, "ctrl+c"),
                on_lost=lambda why: self.stop.request(signal.SIGHUP, why))
        return self.listener

    @contextlib.contextmanager
    def keys(self, robot):
        """The keyboard listener runs (and its native thread writes ``robot``'s stop frames) inside."""
        listener = self.open_keyboard()
        with listener:
            robot.attach_stop_wire(listener.wire)
            yield listener


def run(cfg: RunConfig, *, policy_wrapper=None, on_connected=None, restore_signals: bool = True) -> int:
    """Connect, run the loop, make everything safe, print the summary. Returns the exit code.

    Exit codes: 0 the run ended by itself (``seconds``, ``max_ticks``); 3 a fault (safe stop, the
    reason on one line); 128 + the signal number for an operator stop: 130 SIGINT or Ctrl+C, 143
    SIGTERM, 129 SIGHUP or a lost terminal. Every signal latches the e-stop at once and ends the
    run through the same path as the end of a run (robot safe, recording closed, summary printed);
    a signal during start-up ends it after the current start-up step, with one line.

    ``policy_wrapper(engine) -> policy`` and ``on_connected(robot, loop, estop)`` are hooks for tests and
    evaluation (a slowed-down policy, fault injection). ``restore_signals``: put the previous
    SIGINT/SIGTERM/SIGHUP handlers back at the end (False: the process exits next).
    """
    session = Session(cfg.keyboard, cfg.keyboard_tty, restore_signals=restore_signals)
    with session:
        try:
            return _run(cfg, session, policy_wrapper, on_connected)
        except KeyboardInterrupt:  # raised by code that is not ours (our handlers raise nothing)
            session.stop.request(signal.SIGINT, "interrupted")
            print("vla-edge run: interrupted", file=sys.stderr)
            return session.stop.exit_code


def _run(cfg: RunConfig, session: Session, policy_wrapper, on_connected) -> int:
    estop, stop = session.estop, session.stop
    robot = live = None
    try:
        profile = load_profile(cfg.robot)
        session.checkpoint("loading the bundle")
        if cfg.policy_server:  # the served bundle's manifest stands in for the local bundle
            expect = bundle_id(Bundle.load(cfg.bundle).manifest) if cfg.bundle else None
            policy = RemotePolicy.connect(parse_server_urls(cfg.policy_server), cfg.policy_timeout_s, expect)
            bundle = policy.bundle
        else:
            bundle = Bundle.load(cfg.bundle)
            threads = max(1, (os.cpu_count() or 2) - 1)  # leave a core for the control tick
            policy = Engine(bundle, provider=cfg.provider, threads=threads)
        if policy_wrapper is not None:
            policy = policy_wrapper(policy)
        if cfg.view or cfg.view_save:
            from vla_edge.edge.episodes.view import LiveView, ViewConfig  # Rerun: imported only when asked

            live = LiveView(cfg.view_save, ViewConfig(layout=bundle.layout))
        session.checkpoint("connecting the robot")
        robot = Robot(profile)
        robot.connect()
        session.checkpoint("starting the loop")
    except BaseException as e:
        if live is not None:
            live.close()
        if not isinstance(e, StartupStopped):
            raise
        if robot is not None:
            robot.disconnect()  # nothing was commanded: arms hold, base zero
        print(f"vla-edge run: stopped by {stop.reason} during start-up (before {e}); nothing moved", file=sys.stderr)
        return stop.exit_code
    loop_cfg = LoopConfig(rate_hz=cfg.rate_hz or profile.control_rate_hz, mode=cfg.mode, seconds=cfg.seconds,
                          max_ticks=cfg.max_ticks, navigation=cfg.navigation, nav_max_m=bundle.policy.d_max_m,
                          nav_max_deg=bundle.policy.theta_max_deg)
    stats = RunStats(period_s=1.0 / loop_cfg.rate_hz)
    recorder = None
    observers = [live] if live is not None else []
    loop = None
    fault = None

    def notify(kind: str, reason: str) -> None:  # e-stop events and the fault, to the recorder and the view
        for o in observers:
            o.on_event(loop.tick if loop is not None else 0, time.monotonic(), kind, reason)

    try:
        missing = [c for c in bundle.layout.cameras if c not in robot.camera_names]
        if missing:
            raise VlaEdgeError(f"bundle expects cameras {bundle.layout.cameras}; robot {profile.name} has no {missing[0]}")
        if cfg.record:
            recorder = EpisodeRecorder(cfg.record, cameras=bundle.layout.cameras, stage_names=[*STAGES, "total"],
                                       compress=False if cfg.record_compression == "none" else cfg.record_compression)
            recorder.start_episode({"instruction": cfg.instruction, "bundle": str(bundle.root),  # logs its path
                                    "robot": profile.name, "sim": profile.sim is not None})
            observers.insert(0, recorder)
        session.arm(robot, cfg.firmware_estop, notify)
        # warns where the bundle's targets get clamped (its bins: a served bundle's too, from its manifest)
        safety = SafetyFilter(SafetyLimits.for_robot(profile, bundle.policy, bundle.manifest["bin_edges"]))
        loop = ControlLoop(robot, policy, cfg.instruction, loop_cfg, safety, estop, stats, observers,
                           cameras=bundle.layout.cameras, stop_requested=stop.event)
        status = live_status(stats, loop)
        listener = session.open_keyboard()
        log_banner(profile, bundle, policy, cfg.mode, loop_cfg.rate_hz, listener.source)
        if on_connected is not None:
            on_connected(robot, loop, estop)
        with status, session.keys(robot):
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
                        live.on_event(loop.tick if loop is not None else 0, time.monotonic(), "fault", fault)
                    live.close()
    for ms in estop.trip_latencies_ms:  # one per trip: a Ctrl+C and its SIGINT are one trip
        stats.estop_latency(ms)
    if cfg.json_path:  # first: the terminal may be gone (SIGHUP), the file is not
        stats.write_json(cfg.json_path)
    to_terminal(stats.print_summary)  # results: stdout
    if loop is not None:
        loop.finish(loop.cfg.inference_deadline_s)  # after the robot is safe and the summary is out
    if fault:
        to_terminal(lambda: print(f"vla-edge run: stopped safely: {fault}", file=sys.stderr))
        return 3
    if stop.signum is not None:  # an operator stop (a plain ``loop.stop_requested.set()`` is an ordinary end)
        to_terminal(lambda: print(f"vla-edge run: stopped by {stop.reason}: e-stop latched, robot in the safe state",
                                  file=sys.stderr))
        return stop.exit_code
    return 0


def to_terminal(write) -> None:
    """Call ``write()``; a terminal that is gone (SSH dropped: EIO) must not turn a safe stop into a traceback."""
    try:
        write()
    except OSError as e:
        log.debug("terminal gone: %s", e)


def live_status(stats, loop):
    """The live status line as a context manager: one rich region at the bottom of a terminal (log lines
    print above it, the line is cut to the width, it is removed at the end); nothing when stderr is no terminal.
    Sets ``loop.on_status``."""
    console = log_console()
    if not console.is_terminal:
        return contextlib.nullcontext()

    def line() -> Text:
        return Text(stats.status_line(console.width - 1), no_wrap=True)

    live = Live(line(), console=console, auto_refresh=False, transient=True, redirect_stdout=False,
                redirect_stderr=False)
    loop.on_status = lambda _line: to_terminal(lambda: live.update(line(), refresh=True))

    @contextlib.contextmanager
    def region():
        to_terminal(live.start)
        try:
            yield live
        finally:
            to_terminal(live.stop)  # SSH dropped: the terminal is gone, the run still ends cleanly

    return region()


def log_banner(profile, bundle, policy, mode: str, rate_hz: float, keyboard_source: str) -> None:
    """One log line: what runs where, and the keys (none advertised when there is no keyboard)."""
    keys = ("space: e-stop, r then y: resume, Ctrl+C: stop" if keyboard_source != "none"
            else "no e-stop keys, Ctrl+C stops")
    log.info("vla-edge run: robot=%s bundle=%s (%s, %s) mode=%s rate=%g Hz; keyboard %s: %s", profile.name,
             bundle.root, bundle.precision, getattr(policy, "provider", "?"), mode, rate_hz, keyboard_source, keys)
