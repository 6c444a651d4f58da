"""``vla-edge run`` and ``vla-edge demo``: the command-line side of :func:`vla_edge.edge.session.run`.

Usage::

    vla-edge run --robot sim --seconds 10                       # the demo bundle on the simulated robot
    vla-edge run --robot cobot_magic --bundle b/ --record eps/  # the real one, recording each episode
    vla-edge run --robot sim --seconds 10 --view                # and watch it live in Rerun ([view] extra)
    vla-edge demo                                               # shipped policy -> INT8 bundle -> sim reach
    vla-edge demo --policy-server http://127.0.0.1:8000         # the same, the policy on `vla-edge serve`
    vla-edge demo --bundle b/                                   # the same episode with another reach policy

Without ``--bundle`` the simulated robot runs the demo bundle (exported from the shipped tiny policy on first
use, :mod:`vla_edge.export.demo`); a real robot needs ``--bundle``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.bundle.prompt import instruction_refusal
from vla_edge.edge.chunks import abandoned_step_running
from vla_edge.edge.estop.signals import SIGNALS
from vla_edge.edge.profile import load_profile
from vla_edge.edge.session import RunConfig, run
from vla_edge.edge.sim.evaluate import SuccessMonitor
from vla_edge.edge.sim.task import INSTRUCTION, ReachTask
from vla_edge.edge.telemetry import out_console
from vla_edge.export.demo import demo_dir, ensure_demo_bundle


def _demo_bundle_for(robot: str):
    profile = load_profile(robot)
    if profile.sim is None:
        raise VlaEdgeError(f"robot {profile.name}: give --bundle (the demo bundle is only for the sim robot)")
    return ensure_demo_bundle()


def main(args) -> int:
    # The process exits after the run: a late second signal (after the summary, during the
    # interpreter's exit, which puts Python-handled signals back to their default) must not change
    # the exit code or print a traceback. So run()'s handlers stay until they are replaced by SIG_IGN.
    served = args.policy_server and not args.bundle  # the server's bundle; none needed here
    cfg = RunConfig(bundle=args.bundle or ("" if served else str(_demo_bundle_for(args.robot))), robot=args.robot,
                    instruction=args.instruction, mode=args.mode, seconds=args.seconds, rate_hz=args.rate,
                    max_ticks=args.max_ticks, navigation=args.navigation, provider=args.provider,
                    keyboard=args.keyboard, firmware_estop=args.firmware_estop, record=args.record,
                    record_compression=args.record_compression, json_path=args.json, view=args.view,
                    view_save=args.view_save, policy_server=args.policy_server, policy_timeout_s=args.policy_timeout)
    if cfg.bundle and (why := instruction_refusal(Bundle.load(cfg.bundle, verify=False), cfg.instruction,
                                                   cfg.navigation)):
        raise VlaEdgeError(why)  # before anything connects: one line, exit 2
    rc = run(cfg, restore_signals=False)
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    exit_now_if_a_step_hangs(rc)
    return rc


def exit_now_if_a_step_hangs(rc: int) -> None:
    """End the process with ``rc`` at once when a policy step past its deadline still runs: the robot is safe
    and the summary and the one line are out, and tearing the interpreter down under a thread inside ONNX
    Runtime aborts it (:func:`~vla_edge.edge.chunks.abandoned_step_running`)."""
    if abandoned_step_running():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def demo(args) -> int:
    """Trained tiny reach policy -> INT8 bundle -> the simulated robot reaches a red target -> verdict.

    The run ends as soon as ``vla-edge eval``'s success test has held (the fingertip within the
    task's tolerance of the target and low enough, for ``hold_ticks`` ticks in a row), or after
    ``--seconds``. The verdict (stdout) is eval's: success and time to success, or none.
    """
    served = getattr(args, "policy_server", None)  # vla-edge serve runs the (demo) bundle
    bundle = getattr(args, "bundle", None)  # another policy's bundle instead of the shipped one's
    if not served and not bundle:
        ensure_demo_bundle(args.workdir)
    task = ReachTask()
    seed = args.seed if getattr(args, "seed", None) is not None else random.randrange(1_000_000)
    episode = task.sample(seed)
    seen = {}

    def place_target(robot, loop, estop) -> None:
        robot.sim.scene.target_radius_m = task.target_radius_m
        robot.sim.set_target(*episode.target_xy_m)
        time.sleep(0.1)  # as eval's reset does: the first frames the policy sees show the target
        seen["sim"] = robot.sim
        seen["monitor"] = SuccessMonitor(task, robot.sim, episode, loop, 1.0 / loop.cfg.rate_hz).__enter__()

    try:
        cfg = RunConfig(bundle="" if served else (bundle or str(demo_dir(args.workdir) / "bundle")), robot="sim",
                        instruction=INSTRUCTION, seconds=args.seconds, view=getattr(args, "view", False),
                        view_save=getattr(args, "view_save", None), policy_server=served,
                        policy_timeout_s=getattr(args, "policy_timeout", 1.0))
        code = run(cfg, on_connected=place_target)
    finally:
        if "monitor" in seen:
            seen["monitor"].__exit__(None, None, None)
    if "sim" in seen:  # the simulators keep their last state after the robot disconnected
        mon = seen["monitor"]
        err_m, _ = task.tip_error(seen["sim"].joint_state(), episode.target_xy_m)
        where = (f"target at ({episode.target_xy_m[0]:+.2f}, {episode.target_xy_m[1]:.2f}) m for the "
                 f"{episode.side} arm (seed {seed})")
        verdict = (f"success after {mon.success_t:.2f} s" if mon.success_t is not None
                   else f"no success within {args.seconds:g} s")
        out_console().print(f"demo: {where}: {verdict} (eval's test: fingertip within "
                            f"{100 * task.tolerance_m:.0f} cm, held {task.hold_ticks} ticks); it ended "
                            f"{100 * err_m:.1f} cm from the target", highlight=False)
    exit_now_if_a_step_hangs(code)
    return code
