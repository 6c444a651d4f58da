"""``vla-edge eval`` under an operator stop: a signal ends the evaluation after the running episode, with the
robot safe, the episodes so far reported and the shell's exit code (130 for SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine
from vla_edge.edge.session import Session
from vla_edge.edge.sim.evaluate import evaluate


class _SignalMidEpisode:
    """The bundle's engine, which sends this process SIGINT at the third step of the first episode."""

    def __init__(self, engine):
        self.engine, self.steps, self.provider = engine, 0, "cpu"
        self.signalled_s: float | None = None

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        self.engine.start_episode(instruction, navigation=navigation)

    def step(self, frames, state):
        self.steps += 1
        if self.steps == 3:
            self.signalled_s = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
        return self.engine.step(frames, state)


def test_a_signal_ends_the_running_episode_and_the_evaluation(int8_bundle):
    policy = _SignalMidEpisode(Engine(Bundle.load(int8_bundle), provider="cpu"))
    with Session(keyboard="none") as session:
        report = evaluate([("bundle", policy)], 4, max_seconds=60.0, session=session, progress=False)
    ended_after_s = time.monotonic() - policy.signalled_s
    assert ended_after_s < 10.0, f"the running episode went on for {ended_after_s:.1f} s after the signal"
    assert report["stopped"] == "SIGINT"
    assert session.estop.is_latched and session.stop.exit_code == 130
    (summary,) = report["summaries"]
    assert summary["episodes"] == 0, "the interrupted episode is not a result, and no other one ran"


def test_eval_cli_exits_130_on_sigint_with_one_line(int8_bundle):
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "eval", "--bundle", str(int8_bundle),
                             "--episodes", "50", "--max-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    loaded = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "engine:" in line:
                loaded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert loaded.wait(60), "".join(lines)
        time.sleep(8.0)  # past the robot's connection: the episodes are running
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        proc.kill()
    reader.join(5)
    err = "".join(lines)
    assert rc == 130, err
    assert "vla-edge eval: stopped by SIGINT after" in err and "Traceback" not in err, err
