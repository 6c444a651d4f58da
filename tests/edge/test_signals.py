"""Signals and a lost terminal, sent from outside to the real CLI (``vla-edge run --robot ...``).

Each test starts ``python -m vla_edge.edge.cli run`` in a process of its own, waits until its loop
runs, sends the signal (or closes the terminal) and asserts what an operator or ``systemctl stop``
sees: the exit code (128 + the signal: 130 SIGINT, 143 SIGTERM, 129 SIGHUP or a lost terminal;
3 is for faults only), the summary, one "stopped by" line, no traceback, and the time to exit.

The start-up test plays the TRACER base itself on a pseudo-terminal, with frames built by hand from
the manual (section 3.4), so that the run is held in start-up (waiting for the base's first feedback)
for as long as the test wants.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

EXIT_S = 20.0
"""Signal to process exit, generous: a loaded 2-core box. The measured value is printed."""
SIM_PROFILE = Path(__file__).parents[2] / "edge" / "robots" / "sim.toml"


class Cli:
    """The real CLI in a subprocess; stdout and stderr are collected on threads, line by line, with
    arrival times (results may go to either: the tests look at both)."""

    def __init__(self, *args: str, stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "run", *args], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._readers = [threading.Thread(target=self._read, args=(f,), daemon=True)
                         for f in (self.proc.stdout, self.proc.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def err(self) -> str:
        """Everything the run printed, both streams."""
        return "\n".join(line for _, line in self.lines)

    def wait_for_line(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for _, line in self.lines):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.err[-3000:]}"
            assert time.monotonic() < deadline, f"{text!r} never appeared: {self.err[-3000:]}"
            time.sleep(0.01)

    def finish(self, timeout: float = EXIT_S) -> tuple[int, float]:
        """Wait for the exit; return (exit code, monotonic time of the exit)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not exit within {timeout} s: {self.err[-3000:]}") from None
        t = time.monotonic()
        for r in self._readers:
            r.join(5)
        return rc, t

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_running(bundle: Path, tmp_path: Path, *extra: str, stdin=subprocess.DEVNULL) -> Cli:
    cli = Cli("--robot", "sim", "--bundle", str(bundle), "--keyboard", "none", "--json",
              str(tmp_path / "summary.json"), *extra, stdin=stdin)
    cli.wait_for_line("vla-edge run")  # the banner: the loop starts right after it
    time.sleep(1.0)  # some ticks and inferences
    return cli


def assert_operator_stop(cli: Cli, rc: int, expected_rc: int, name: str, tmp_path: Path) -> None:
    err = cli.err
    assert rc == expected_rc, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert "stopped safely" not in err  # that line is for faults
    stopped = [line for _, line in cli.lines if line.startswith("vla-edge run: stopped by")]
    assert len(stopped) == 1 and name in stopped[0], stopped
    assert "ticks in" in err  # the summary table's title (stdout or stderr)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ticks"] > 0
    assert summary["estop_trips"] == 1  # one stop, one trip


@pytest.mark.parametrize(("signum", "expected_rc"), [
    (signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129),
], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_latches_and_ends_the_run_with_the_summary(fused_int8_bundle, tmp_path, signum, expected_rc):
    cli = start_running(fused_int8_bundle, tmp_path)
    try:
        t0 = time.monotonic()
        cli.proc.send_signal(signum)
        rc, t_exit = cli.finish()
    finally:
        cli.kill()
    line_t = next(t for t, line in cli.lines if line.startswith("vla-edge run: stopped by"))
    print(f"{signal.Signals(signum).name}: 'stopped by' line after {1e3 * (line_t - t0):.0f} ms, "
          f"exit after {1e3 * (t_exit - t0):.0f} ms")
    assert_operator_stop(cli, rc, expected_rc, signal.Signals(signum).name, tmp_path)


@pytest.mark.parametrize("gap_s", [0.02, 0.1], ids=["20ms", "100ms"])
def test_two_signals_end_the_run_once(fused_int8_bundle, tmp_path, gap_s):
    cli = start_running(fused_int8_bundle, tmp_path)
    try:
        cli.proc.send_signal(signal.SIGTERM)
        time.sleep(gap_s)
        if cli.proc.poll() is None:
            cli.proc.send_signal(signal.SIGINT)  # during the shutdown or the exit: must not break either
        rc, _ = cli.finish()
    finally:
        cli.kill()
    assert_operator_stop(cli, rc, 143, "SIGTERM", tmp_path)  # the first one decides
    if gap_s == 0.02:
        assert "ignored" in cli.err  # the second was seen during the shutdown and logged


def test_losing_the_terminal_ends_the_run_like_sighup(fused_int8_bundle, tmp_path):
    master, slave = os.openpty()
    try:
        cli = Cli("--robot", "sim", "--bundle", str(fused_int8_bundle), "--keyboard", "tty", "--json",
                  str(tmp_path / "summary.json"), stdin=slave)
        os.close(slave)
        try:
            cli.wait_for_line("vla-edge run")
            time.sleep(1.0)
            os.close(master)  # the SSH connection drops: the keyboard reads EOF/EIO
            master = -1
            rc, _ = cli.finish()
        finally:
            cli.kill()
    finally:
        if master >= 0:
            os.close(master)
    assert_operator_stop(cli, rc, 129, "terminal lost", tmp_path)


# -- start-up: the test is the base, on a pty, and answers only when it chooses --------------------
def manual_frame(frame_type: int, frame_id: int, data: bytes, counter: int) -> bytes:
    """A TRACER serial frame as the manual writes it: 5A A5 0A type id data[6] counter checksum."""
    body = bytes([0x5A, 0xA5, 0x0A, frame_type, frame_id, *data, counter & 0xFF])
    return body + bytes([sum(body) & 0xFF])


class PtyBase:
    """Plays the TRACER base: once :meth:`answer` is called, motion feedback (at rest) every 20 ms."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.port = os.ttyname(slave)
        self._slave = slave
        self.heard = threading.Event()
        self._answer = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def answer(self) -> None:
        self._answer.set()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.02)[0]:
                try:
                    if os.read(self.master, 1024):
                        self.heard.set()  # the driver opened the port and streams commands
                except OSError:
                    pass
            if self._answer.is_set():
                try:
                    os.write(self.master, manual_frame(0xAA, 0x02, bytes(6), n))
                except OSError:
                    pass
                n += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self.master, self._slave):
            os.close(fd)


def test_a_signal_during_start_up_ends_it_with_one_line(fused_int8_bundle, tmp_path):
    base = PtyBase()
    profile = tmp_path / "sim_external_base.toml"
    text = SIM_PROFILE.read_text().replace('port = "sim"', f'port = "{base.port}"\nconnect_timeout_s = 60.0')
    assert base.port in text
    profile.write_text(text)
    cli = Cli("--robot", str(profile), "--bundle", str(fused_int8_bundle), "--keyboard", "none")
    try:
        assert base.heard.wait(120), f"the run never opened the base's port: {cli.err[-3000:]}"
        cli.proc.send_signal(signal.SIGTERM)  # while connect() waits for the base's first feedback
        time.sleep(0.3)
        assert cli.proc.poll() is None
        base.answer()
        rc, _ = cli.finish()
    finally:
        cli.kill()
        base.close()
    err = cli.err
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [line for _, line in cli.lines if line.startswith("vla-edge run: stopped by")]
    assert lines == ["vla-edge run: stopped by SIGTERM during start-up (before starting the loop); nothing moved"]
    assert "ticks in" not in err  # no loop ran: no summary


def test_ctrl_c_on_the_terminal_is_one_trip_and_exit_130(fused_int8_bundle, tmp_path):
    master, slave = os.openpty()
    try:
        cli = Cli("--robot", "sim", "--bundle", str(fused_int8_bundle), "--keyboard", "tty", "--json",
                  str(tmp_path / "summary.json"), stdin=slave)
        try:
            cli.wait_for_line("vla-edge run")
            time.sleep(1.0)
            os.write(master, b"\x03")  # raw mode: Ctrl+C arrives as a byte, the keyboard thread trips
            rc, _ = cli.finish()
        finally:
            cli.kill()
    finally:
        os.close(master)
        os.close(slave)
    assert_operator_stop(cli, rc, 130, "ctrl+c", tmp_path)


def test_a_closed_terminal_that_was_also_stderr_still_stops_cleanly(fused_int8_bundle, tmp_path):
    """SSH drops: the keyboard reads EOF and every write to the terminal fails (EIO). The run must
    still end as an operator stop (129) with its JSON summary written, not with a traceback or 3."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "run", "--robot", "sim", "--bundle",
                             str(fused_int8_bundle), "--keyboard", "tty", "--json", str(tmp_path / "summary.json")],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"vla-edge run" not in seen:  # the banner, on the terminal
            assert time.monotonic() < deadline and proc.poll() is None, seen[-2000:]
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        time.sleep(1.0)
        os.close(master)
        master = -1
        rc = proc.wait(EXIT_S)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 129
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ticks"] > 0 and summary["estop_trips"] == 1
