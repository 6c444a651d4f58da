"""E-stop latch and keyboard listener, driven through a real pseudo-terminal."""

from __future__ import annotations

import io
import os
import select
import signal
import statistics
import subprocess
import sys
import termios
import threading
import time
from typing import NamedTuple

import pytest
from vla_edge import VlaEdgeError
from vla_edge.edge.estop.keyboard import KeyboardListener
from vla_edge.edge.estop.latch import (
    ESTOP_THREAD_NICE,
    ESTOP_THREAD_RT_PRIORITY,
    EStop,
    StopRequest,
    prefer_this_thread,
)
from vla_edge.edge.estop.signals import install_signal_handlers

WAIT_S = 10.0
"""Bound for every wait on a thread's reaction (milliseconds when it works): only a failure takes this long,
so it is generous (a 2-core box with busy processes beside the test may be slow to schedule a thread)."""


@pytest.fixture
def pty():
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def read_until(master: int, text: str, timeout: float = WAIT_S) -> str:
    """Read the terminal's output (what the operator sees) until ``text`` appears."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never appeared on the terminal; saw {seen!r}"
        if select.select([master], [], [], left)[0]:
            seen += os.read(master, 1024)
    return seen.decode(errors="replace")


def wait_for(predicate, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# -- the latch ------------------------------------------------------------------------------------
def test_latch_runs_callbacks_in_the_callers_thread_and_needs_a_confirmed_resume():
    estop = EStop()
    calls = []
    estop.on_trip(lambda reason: calls.append(("trip", reason, threading.current_thread().name)))
    estop.on_resume(lambda: calls.append(("resume", None, threading.current_thread().name)))
    assert not estop.is_latched and not estop.resume()
    assert estop.trigger("test") is True
    assert calls == [("trip", "test", threading.current_thread().name)]  # before trigger returned
    assert estop.is_latched and estop.reason == "test" and estop.last_trip_ms >= 0
    assert estop.trigger("again") is False and len(calls) == 2 and estop.reason == "test"
    assert not estop.resume(), "resume without request_resume must not unlatch"
    assert estop.is_latched
    assert estop.request_resume()
    estop.cancel_resume()
    assert not estop.resume() and estop.is_latched
    assert estop.request_resume() and estop.resume()
    assert not estop.is_latched and calls[-1][0] == "resume"
    kinds = [k for _, k, _ in estop.events]
    assert kinds == ["trip", "retrip", "resume_requested", "resume_cancelled", "resume_requested", "resume"]
    assert all(isinstance(t, float) for t, _, _ in estop.events)


def test_a_failing_callback_does_not_stop_the_others_and_blocks_resume():
    estop = EStop()
    hit = []

    def broken(reason):
        raise RuntimeError("CAN down")

    estop.on_trip(broken)
    estop.on_trip(hit.append)
    estop.trigger("x")
    assert hit == ["x"] and estop.is_latched
    assert any(k == "callback_error" and "CAN down" in r for _, k, r in estop.events)

    def cannot_rearm():
        raise RuntimeError("no pose")

    estop.on_resume(cannot_rearm)
    assert estop.request_resume() and not estop.resume()
    assert estop.is_latched


def test_concurrent_triggers_never_run_callbacks_at_the_same_time():
    estop = EStop()
    inside, overlap, count = [0], [], [0]

    def actuator(reason):
        inside[0] += 1
        overlap.append(inside[0])
        time.sleep(0.001)
        count[0] += 1
        inside[0] -= 1

    estop.on_trip(actuator)
    threads = [threading.Thread(target=lambda: [estop.trigger("t") for _ in range(10)]) for _ in range(4)]
    waiter = threading.Thread(target=lambda: overlap.append(("waited", estop.wait_latched(WAIT_S))))
    waiter.start()
    for t in threads:
        t.start()
    for t in threads + [waiter]:
        t.join()
    assert count[0] == 40
    assert ("waited", True) in overlap
    assert max(x for x in overlap if isinstance(x, int)) == 1


# -- the keyboard, through a pseudo-terminal ------------------------------------------------------
def test_space_trips_within_50ms(pty):
    master, slave = pty
    estop = EStop()
    hit_t, hit = [], threading.Event()
    estop.on_trip(lambda reason: (hit_t.append(time.monotonic()), hit.set()))
    latencies_ms = []
    with KeyboardListener(estop, source="tty", tty_fd=slave) as kl:
        assert kl.source == "tty"
        for _ in range(7):
            hit.clear()
            t0 = time.monotonic()
            os.write(master, b" ")
            assert hit.wait(WAIT_S), "space did not trip the e-stop"
            latencies_ms.append((hit_t[-1] - t0) * 1e3)
    print(f"trip latency ms: {[round(x, 2) for x in latencies_ms]}")
    assert estop.is_latched and estop.reason == "space key"
    # Median over several trips: one scheduler hiccup on a loaded box must not decide the result.
    assert statistics.median(latencies_ms) < 50.0


def _scheduling() -> tuple[int, int, int]:
    """The calling thread's (policy, real-time priority, niceness), as the kernel reports them."""
    tid = threading.get_native_id()
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority, os.getpriority(os.PRIO_PROCESS, tid)


def _expected(granted: str) -> tuple[int, int, int]:
    return {"fifo": (os.SCHED_FIFO, ESTOP_THREAD_RT_PRIORITY, 0), "nice": (os.SCHED_OTHER, 0, ESTOP_THREAD_NICE),
            "default": (os.SCHED_OTHER, 0, 0)}[granted]


def test_the_keyboard_thread_runs_at_the_priority_it_reports_and_only_that_thread(pty):
    master, slave = pty
    estop, seen = EStop(), {}
    estop.on_trip(lambda reason: seen.setdefault("listener", _scheduling()))  # runs in the listener thread
    before = _scheduling()
    with KeyboardListener(estop, source="tty", tty_fd=slave) as kl:
        os.write(master, b" ")
        assert wait_for(lambda: "listener" in seen), "space did not trip the e-stop"
    assert kl.priority in ("fifo", "nice", "default")
    assert seen["listener"] == _expected(kl.priority)
    assert _scheduling() == before  # the rest of the process keeps its priority


def test_without_real_time_priority_the_thread_falls_back_to_niceness():
    got = {}

    def ask():  # priority 100 is outside SCHED_FIFO's 1-99: refused like a missing permission
        got["granted"] = prefer_this_thread(rt_priority=100)
        got["now"] = _scheduling()

    t = threading.Thread(target=ask)
    t.start()
    t.join()
    assert got["granted"] in ("nice", "default") and got["now"] == _expected(got["granted"])


def test_stays_latched_until_r_then_y_and_r_then_other_key_cancels(pty):
    master, slave = pty
    estop = EStop()
    rearmed = []
    estop.on_resume(lambda: rearmed.append(time.monotonic()))
    with KeyboardListener(estop, source="tty", tty_fd=slave):
        os.write(master, b"y")  # a stray confirm while armed does nothing
        os.write(master, b" ")
        assert estop.wait_latched(WAIT_S)
        read_until(master, "E-STOP latched")
        os.write(master, b"yq")  # no resume requested: stays latched
        os.write(master, b"r")
        read_until(master, "resume? press y")
        os.write(master, b"x")
        read_until(master, "resume cancelled")
        assert estop.is_latched and not rearmed
        os.write(master, b"y")  # the request was cancelled: a late y does nothing
        os.write(master, b"r")
        read_until(master, "resume? press y")
        assert estop.is_latched and estop.resume_pending
        os.write(master, b"y")
        read_until(master, "resumed")
        assert not estop.is_latched and len(rearmed) == 1
        os.write(master, b" ")  # and it trips again
        assert wait_for(lambda: estop.is_latched)


def test_resume_request_expires(pty):
    master, slave = pty
    estop = EStop()
    estop.trigger("test")
    with KeyboardListener(estop, source="tty", tty_fd=slave, confirm_timeout_s=0.05):
        os.write(master, b"r")
        read_until(master, "resume? press y")
        time.sleep(0.2)
        os.write(master, b"y")
        read_until(master, "resume cancelled")
    assert estop.is_latched


def test_terminal_attributes_are_restored_after_stop(pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    kl = KeyboardListener(EStop(), source="tty", tty_fd=os.ttyname(slave)).start()  # a device path works too
    during = termios.tcgetattr(slave)
    assert during != before
    assert not during[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
    assert during[1] == before[1], "output processing must be left alone"
    kl.stop()
    assert termios.tcgetattr(slave) == before
    kl.stop()  # idempotent
    assert termios.tcgetattr(slave) == before


def test_ctrl_c_trips_then_interrupts(pty):
    master, slave = pty
    estop = EStop()
    interrupted = threading.Event()
    with KeyboardListener(estop, source="tty", tty_fd=slave, on_interrupt=interrupted.set):
        os.write(master, b"\x03")
        assert interrupted.wait(WAIT_S)
        assert estop.is_latched and estop.reason == "ctrl+c"
    # Default: KeyboardInterrupt in the main thread, through _thread.interrupt_main(SIGINT). That raises only
    # while SIGINT's Python handler is signal.default_int_handler: a process started with SIGINT ignored (a
    # background job of a non-interactive shell, `pytest ... &`) has SIG_IGN there and the call does nothing;
    # so does one where an earlier test left its own handler. The test sets the default for its duration.
    estop = EStop()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with KeyboardListener(estop, source="tty", tty_fd=slave):
                os.write(master, b"\x03")
                # The interrupt ends this loop at the main thread's next bytecode after the listener's call;
                # short sleeps, since a blocking wait (Event.wait) would not wake for it. Only a failure waits
                # out the bound.
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    time.sleep(0.001)
                pytest.fail(f"no KeyboardInterrupt within {WAIT_S} s (latched: {estop.is_latched}, "
                            f"SIGINT handler: {signal.getsignal(signal.SIGINT)})")
    finally:
        signal.signal(signal.SIGINT, previous)  # the listener has stopped: no interrupt can follow
    assert estop.is_latched and estop.reason == "ctrl+c"


def test_losing_the_terminal_trips(pty):
    master, slave = pty
    estop = EStop()
    kl = KeyboardListener(estop, source="tty", tty_fd=slave).start()
    os.close(master)  # SSH connection gone: the slave side reads EOF/EIO
    assert estop.wait_latched(WAIT_S)
    assert "keyboard lost" in estop.reason
    kl.stop()


def test_auto_falls_back_cleanly_without_evdev_pynput_or_terminal(pty, monkeypatch):
    monkeypatch.setitem(sys.modules, "evdev", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "pynput", None)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal
    estop = EStop()
    with KeyboardListener(estop, source="auto") as kl:
        assert kl.source == "none"
    master, slave = pty
    with KeyboardListener(estop, source="auto", tty_fd=slave) as kl:
        assert kl.source == "tty"
    for source in ("tty", "evdev", "pynput"):
        with pytest.raises(VlaEdgeError, match="not available"):
            KeyboardListener(estop, source=source)
    with pytest.raises(VlaEdgeError, match="unknown"):
        KeyboardListener(estop, source="joystick")
    assert not estop.is_latched


# -- signals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_trip_and_request_the_stop_without_raising(signum):
    estop, stop = EStop(), StopRequest()
    before = signal.getsignal(signum)
    restore = install_signal_handlers(estop, stop)
    try:
        os.kill(os.getpid(), signum)  # nothing may be raised here or in the sleep
        assert stop.event.wait(WAIT_S)
        assert estop.is_latched and estop.reason == signal.Signals(signum).name
        assert stop.signum == signum and stop.exit_code == 128 + signum and stop.count == 1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: counted, nothing else
        assert wait_for(lambda: stop.count == 2)
        assert stop.signum == signum and len(estop.trip_latencies_ms) == 1
    finally:
        restore()
    assert signal.getsignal(signum) == before


def test_signal_in_a_weakref_callback_is_not_swallowed():
    """The issue's failure: an exception raised by a handler inside a weakref callback is printed as
    "Exception ignored" and lost. Now nothing is raised there, and the stop still happens."""
    import weakref

    class Thing:
        pass

    estop, stop = EStop(), StopRequest()
    restore = install_signal_handlers(estop, stop)
    try:
        thing = Thing()
        weakref.finalize(thing, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))
        del thing
        assert stop.event.wait(WAIT_S) and estop.is_latched
    finally:
        restore()


def test_signal_while_the_main_thread_holds_a_lock_the_trip_needs_does_not_deadlock():
    """SIGTERM while the main thread holds a lock the on_trip callback needs (a device lock, a
    piper_sdk getter's): the trip waits on its own thread and completes once the lock is released."""
    lock = threading.Lock()
    entered, tripped = threading.Event(), threading.Event()

    def needs_lock(reason):
        entered.set()
        if lock.acquire(timeout=2 * WAIT_S):  # without a bound a broken handler hangs the test forever
            lock.release()
            tripped.set()

    estop, stop = EStop(), StopRequest()
    estop.on_trip(needs_lock)
    restore = install_signal_handlers(estop, stop)
    try:
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            # the main thread carries on, lock held, while the watcher's trip reaches the callback and waits
            assert entered.wait(WAIT_S), "the signal's trip never reached the on_trip callback"
            assert not tripped.is_set()
        assert tripped.wait(WAIT_S) and estop.is_latched and stop.event.wait(WAIT_S)
    finally:
        restore()


def test_signal_handlers_only_from_the_main_thread():
    errors = []

    def install():
        try:
            install_signal_handlers(EStop(), StopRequest())
        except VlaEdgeError as e:
            errors.append(e)

    t = threading.Thread(target=install)
    t.start()
    t.join()
    assert errors


def test_terminal_is_restored_at_exit_without_stop(pty):
    """A program that forgets stop() (or dies of an exception) still leaves stdin's terminal as it was."""
    master, slave = pty
    before = termios.tcgetattr(slave)
    child = (
        "import sys, termios\n"
        "from vla_edge.edge.estop.keyboard import KeyboardListener\n"
        "from vla_edge.edge.estop.latch import EStop\n"
        "kl = KeyboardListener(EStop(), source='auto').start()\n"  # stdin is the pty: auto picks tty
        "assert kl.source == 'tty', kl.source\n"
        "assert not termios.tcgetattr(0)[3] & termios.ICANON\n"
        "raise RuntimeError('crash without stop()')\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], stdin=slave, capture_output=True, text=True, timeout=60)
    assert "crash without stop()" in proc.stderr and "AssertionError" not in proc.stderr, proc.stderr
    assert termios.tcgetattr(slave) == before


# -- the base's stop frame ------------------------------------------------------------------------
def _base_on_a_pty():
    """A TracerBase driver on a pty this test owns; the test answers motion feedback (manual section 3.4,
    frames built by hand) and returns a reader of every command frame ``(t_read_s, linear_pct)``."""
    from vla_edge.firmware_bridge.tracer_base import TracerBase, TracerBaseConfig

    master, slave = os.openpty()
    stop = threading.Event()
    frames: list[tuple[float, int]] = []

    def feedback_and_read():
        buf, n = b"", 0
        while not stop.is_set():
            body = bytes([0x5A, 0xA5, 0x0A, 0xAA, 0x02, 0, 0, 0, 0, 0, 0, n & 0xFF])
            os.write(master, body + bytes([sum(body) & 0xFF]))
            n += 1
            deadline = time.monotonic() + 0.02
            while (left := deadline - time.monotonic()) > 0 and select.select([master], [], [], left)[0]:
                t = time.monotonic()
                buf += os.read(master, 4096)
                while len(buf) >= 13:
                    i = buf.find(b"\x5a\xa5")
                    if i < 0:
                        buf = b""
                        break
                    frame, buf = buf[i:i + 13], buf[i + 13:]
                    if len(frame) == 13 and frame[3] == 0x55 and frame[4] == 0x01:
                        frames.append((t, int.from_bytes(frame[7:8], "big", signed=True)))  # linear %

    th = threading.Thread(target=feedback_and_read, daemon=True)
    th.start()
    base = TracerBase(TracerBaseConfig(port=os.ttyname(slave), max_linear_mps=1.5))
    base.connect()

    def close():
        base.disconnect()
        stop.set()
        th.join(WAIT_S)
        os.close(master)
        os.close(slave)

    return base, frames, close


def test_stop_now_puts_a_zero_frame_on_the_line_at_once_and_nothing_moving_after_it():
    base, frames, close = _base_on_a_pty()
    try:
        sending = threading.Event()
        sending.set()

        def control_thread():  # keeps asking for motion, as the loop would, also after the stop
            while sending.is_set():
                base.send_velocity(0.3, 0.0)
                time.sleep(0.003)

        ctl = threading.Thread(target=control_thread, daemon=True)
        ctl.start()
        delays_ms = []
        for _ in range(10):
            base.release()
            assert wait_for(lambda: frames and frames[-1][1] > 0), "the base never got a moving command"
            time.sleep(0.01 + 0.02 * (len(delays_ms) % 3) / 3)  # anywhere in the 20 ms stream period
            n, t0 = len(frames), time.monotonic()
            base.stop_now()
            assert wait_for(lambda n=n: any(pct == 0 for _, pct in frames[n:]))
            first_zero = next(i for i in range(n, len(frames)) if frames[i][1] == 0)
            delays_ms.append(1e3 * (frames[first_zero][0] - t0))
            time.sleep(0.1)  # five stream periods with the control thread still asking for 0.3 m/s
            after = [pct for _, pct in frames[first_zero:]]
            assert after and all(pct == 0 for pct in after), f"a moving frame after the stop frame: {after}"
        sending.clear()
        ctl.join(WAIT_S)
    finally:
        close()
    print(f"stop_now -> zero frame read: {sorted(round(d, 2) for d in delays_ms)} ms")
    # Median over the trips (a loaded box may delay one); waiting for the 50 Hz stream slot averages 10 ms.
    assert statistics.median(delays_ms) < 5.0


# -- the native stop path (StopWire) ----------------------------------------------------------------
class Wired(NamedTuple):
    """A StopWire reading the key pipe ``kw``, relaying into ``relay``; ``out_r``/``out_w``: a stop-frame line."""

    wire: object
    kw: int
    relay: int
    out_r: int
    out_w: int


@pytest.fixture
def wired():
    from vla_edge.kernels import StopWire

    kr, kw = os.pipe()
    rr, rw = os.pipe()
    out_r, out_w = os.pipe()
    w = StopWire(kr, " \x03", rw, ESTOP_THREAD_RT_PRIORITY, ESTOP_THREAD_NICE)
    os.close(rw)
    yield Wired(w, kw, rr, out_r, out_w)
    w.close()
    for fd in (kr, kw, rr, out_r, out_w):
        try:
            os.close(fd)
        except OSError:  # a test closed it
            pass


def _read_some(fd: int, timeout: float = WAIT_S) -> bytes:
    assert select.select([fd], [], [], timeout)[0], "nothing arrived"
    return os.read(fd, 4096)


def test_the_wire_writes_its_stop_frames_on_a_trip_key_relays_every_byte_and_gates_moving_frames(wired):
    wire, kw, relay, out_r, out_w = wired
    wire.arm(out_w, b"STOP-FRAME")
    os.write(kw, b"ry")  # not trip keys: relayed, nothing written
    assert _read_some(relay) == b"ry"
    assert not wire.tripped and not select.select([out_r], [], [], 0.05)[0]
    assert wire.write(out_w, b"moving", False) == 6 and os.read(out_r, 64) == b"moving"
    t0 = time.monotonic()
    os.write(kw, b"a b")
    assert _read_some(out_r) == b"STOP-FRAME"
    assert _read_some(relay) == b"a b"  # the trip key is relayed too: the listener latches the e-stop
    assert wire.tripped and wire.trip_reason == "key  " and t0 <= wire.trip_time_s <= time.monotonic()
    # latched: moving frames are refused (nothing written), stop frames pass
    assert wire.write(out_w, b"moving", False) == -1
    assert wire.write(out_w, b"zero", True) == 4 and os.read(out_r, 64) == b"zero"
    os.write(kw, b" ")  # a second trip while latched writes nothing more
    assert _read_some(relay) == b" " and not select.select([out_r], [], [], 0.05)[0]
    wire.rearm()
    assert not wire.tripped and wire.write(out_w, b"moving", False) == 6 and os.read(out_r, 64) == b"moving"
    wire.disarm(out_w)  # a disarmed descriptor gets nothing on the next trip
    os.write(kw, b"\x03")
    assert _read_some(relay) == b"\x03" and wire.tripped and wire.trip_reason == "key \x03"
    assert not select.select([out_r], [], [], 0.05)[0]


def test_the_wire_trips_when_the_key_source_ends_and_its_relay_then_ends(wired):
    wire, kw, relay, out_r, out_w = wired
    wire.arm(out_w, b"Z")
    os.close(kw)  # the terminal is gone
    assert _read_some(out_r) == b"Z"
    assert _read_some(relay) == b""  # end of input for the listener
    assert wire.tripped and wire.trip_reason == "keyboard lost (end of input)" and not wire.running


def test_a_listener_that_stops_reading_never_blocks_the_wire(wired):
    """64 KiB of keys nobody reads fill the relay: the wire drops what does not fit (counted), still trips
    on the next space, and closes at once."""
    wire, kw, relay, out_r, out_w = wired
    wire.arm(out_w, b"Z")
    os.set_blocking(kw, False)
    sent = 0
    deadline = time.monotonic() + WAIT_S
    while wire.relay_dropped == 0:  # the wire drains the key pipe into the relay until the relay is full
        assert time.monotonic() < deadline, f"nothing dropped after {sent} bytes"
        try:
            sent += os.write(kw, b"x" * 4096)
        except BlockingIOError:
            time.sleep(0.001)
    os.set_blocking(kw, True)
    os.write(kw, b" ")  # after whatever the key pipe still holds: the wire keeps reading, dropping
    assert _read_some(out_r) == b"Z" and wire.tripped
    t0 = time.monotonic()
    wire.close()
    assert time.monotonic() - t0 < 1.0
    assert len(os.read(relay, 1 << 17)) > 0  # what fitted is there for the listener


def test_the_wire_gates_write_errors_like_os_write(wired):
    os.close(wired.out_r)  # nobody reads the line any more
    with pytest.raises(BrokenPipeError):
        wired.wire.write(wired.out_w, b"x", True)


def test_the_wire_stops_the_base_while_no_python_thread_can_run(wired):
    """The zero frame goes out while the GIL is held (a C call that keeps it for 2.5 s), and the base's own
    streaming thread, which still wants 0.3 m/s when it runs again, puts no moving frame after it."""
    import ctypes

    base, frames, close_base = _base_on_a_pty()
    wire, kw, relay = wired.wire, wired.kw, wired.relay
    sending = threading.Event()
    sending.set()

    def control_thread():  # keeps asking for motion, as the loop would; Python's e-stop never runs here
        while sending.is_set():
            base.send_velocity(0.3, 0.0)
            time.sleep(0.003)

    ctl = threading.Thread(target=control_thread, daemon=True)
    try:
        base.attach_stop_gate(wire)
        ctl.start()
        assert wait_for(lambda: frames and frames[-1][1] > 0), "the base never got a moving command"
        key = subprocess.Popen(["sh", "-c", "sleep 0.5; printf ' '"], stdout=kw)  # the key, from outside
        t_hold = time.monotonic()  # 0.5 s before the key at the earliest: margin for a slow return from Popen
        ctypes.PyDLL(None).usleep(2_500_000)  # PyDLL: the call keeps the GIL (2.5 s: 2 s margin for a slow sh)
        t_free = time.monotonic()
        key.wait(WAIT_S)
        assert wire.tripped and t_hold < wire.trip_time_s < t_free, (t_hold, wire.trip_time_s, t_free)
        assert _read_some(relay) == b" "
        time.sleep(0.2)  # ten stream periods with the control thread asking for 0.3 m/s again
        n_moving = max(i for i, (_, pct) in enumerate(frames) if pct > 0)
        after = [pct for _, pct in frames[n_moving + 1:]]
        assert after and after[0] == 0 and all(pct == 0 for pct in after), after  # the wire's zero, then zeros
        assert frames[n_moving][0] < t_free  # the last moving frame was on the line before the hold ended
        base.release()  # the e-stop resumed: moving frames pass again
        assert wait_for(lambda: frames[-1][1] > 0), "no moving frame after release()"
    finally:
        sending.clear()
        ctl.join(WAIT_S)
        close_base()
