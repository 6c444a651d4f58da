"""``vla-edge run`` with one device fault injected mid-run, for the fault tests in test_faults.py.

    python fault_child.py FAULT run --bundle B [--record DIR] ...     (the CLI's own arguments)

FAULT is one of ``camera-resolution`` (cam_high starts delivering 320x240 frames), ``camera-grey``
(single-channel frames), ``can-down`` (the left arm's CAN bus goes down under piper_sdk: its python-can bus
is shut down, so every send fails), ``inference-hang`` (the next policy step never returns; the loop's
inference deadline is 1 s here instead of 10 s). It is the real CLI with hooks that only observe and
inject; this process reports on stdout::

    INJECTED <monotonic s>                    the fault is in place (after 15 ticks of arm motion)
    SAFE_STOP <monotonic s> <14 commanded>    the loop's safe stop ran (hold sent): what the arms were last told
    ROBOT_LEFT <vx> <wz> <12 sim targets>     after disconnect: the base's last command, the arms' targets (rad)

``time.monotonic()`` is the machine's CLOCK_MONOTONIC, the same clock as the test's.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from vla_edge.edge import cli
from vla_edge.edge.engine import Engine
from vla_edge.edge.loop import ControlLoop
from vla_edge.edge.robot import Robot

FAULT = sys.argv.pop(1)
hang = threading.Event()


def say(*words) -> None:
    print(*words, flush=True)


def inject(loop: ControlLoop) -> None:
    robot = loop.robot
    while loop.ticks < 15 or robot.commanded_qpos() is None:
        time.sleep(0.01)
    if FAULT == "camera-resolution":
        robot.sim.cameras["cam_high"].reformat(320, 240)
    elif FAULT == "camera-grey":
        robot.sim.cameras["cam_high"].reformat(grey=True)
    elif FAULT == "can-down":
        robot.arms["left"]._sdk.GetCanBus().send_bus.shutdown()
    elif FAULT == "inference-hang":
        hang.set()
    else:
        raise SystemExit(f"unknown fault {FAULT}")
    say("INJECTED", time.monotonic())


_run, _safe_stop, _disconnect, _step, _init = (ControlLoop.run, ControlLoop._safe_stop, Robot.disconnect,
                                                 Engine.step, ControlLoop.__init__)


def init(self, *a, **kw):
    _init(self, *a, **kw)
    self.cfg.inference_deadline_s = 1.0


def run(self):
    threading.Thread(target=inject, args=(self,), daemon=True).start()
    return _run(self)


def safe_stop(self, message):
    first = self.fault is None
    _safe_stop(self, message)
    if first:
        q = self.robot.commanded_qpos()
        say("SAFE_STOP", time.monotonic(), *np.round(q, 6))


def disconnect(self):
    sim = self.sim
    _disconnect(self)
    if sim is not None:
        time.sleep(0.05)
        _, vx, wz = sim.base.commands[-1]
        targets = np.concatenate([np.asarray(sim.arms[s].target_rad) for s in ("left", "right")])
        say("ROBOT_LEFT", vx, wz, *np.round(targets, 6))


def step(self, frames, state):
    if hang.is_set():
        threading.Event().wait()  # never returns
    return _step(self, frames, state)


ControlLoop.__init__, ControlLoop.run, ControlLoop._safe_stop = init, run, safe_stop
Robot.disconnect, Engine.step = disconnect, step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
