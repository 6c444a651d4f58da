"""Benchmark: resident memory of a long simulated run stays flat (issue 12: it grew 41 MB/min).

Starts ``vla-edge run --robot sim --mode async --seconds S --keyboard none`` as a child process (the
real command, nothing of it in this process), samples its RSS from ``/proc/PID/status`` every
``--every`` seconds and prints one line per sample, then the growth: a least-squares slope over the
samples after ``--warmup`` seconds (MB/min, MB = 1e6 bytes) and the last minus the first of those.
This is the outside view; ``tests/firmware_bridge/test_piper.py`` checks the cause (no unread queue on the CAN bus).

``--robot-only`` runs just the simulated robot instead (no policy, no watchdog ending the run): a child
connects ``Robot(load_profile("sim"))`` and sends targets, a base velocity and reads state and frames
at 30 Hz; device faults are counted, not fatal, so a loaded machine cannot cut the run short.

Usage::

    python tools/bench_memory.py --seconds 600            # the issue's 10-minute run
    python tools/bench_memory.py --seconds 120 --every 10 # a short one
    python tools/bench_memory.py --seconds 120 --record /tmp/episodes   # with recording
    python tools/bench_memory.py --seconds 120 --robot-only              # the device layer alone
    python tools/bench_memory.py --seconds 60 --robot-only --unfixed     # ... as it was before the fix

The bundle defaults to the demo bundle (``--workdir``; exported once, needs the [export] extra).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from vla_edge.export.demo import ensure_demo_bundle

ROBOT_ONLY = """
import sys, time
import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.profile import load_profile
from vla_edge.edge.robot import Robot
from vla_edge.firmware_bridge import piper_arm
if sys.argv[2] == "unfixed":  # issue 12 as it was: keep piper_sdk's second, never-read send bus
    piper_arm.send_on_the_receive_bus = lambda sdk: None
robot = Robot(load_profile("sim"))
robot.connect()
q0 = robot.read_state().qpos.copy()
t0 = time.monotonic()
k = faults = 0
try:
    while time.monotonic() - t0 < float(sys.argv[1]):
        k += 1
        try:
            faults += bool(robot.faults())
            robot.send_joint_targets(q0 + 0.05 * np.sin(k / 30))
            robot.send_base_velocity(0.1 * np.sin(k / 60), 0.0)
            robot.read_frames()
        except VlaEdgeError:  # a stale camera on a loaded machine: counted, the run goes on
            faults += 1
        time.sleep(max(0.0, t0 + k / 30 - time.monotonic()))
finally:
    robot.disconnect()
print(f"{k} ticks, {faults} with a device fault", file=sys.stderr)
"""


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (1e6 bytes), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--every", type=float, default=10.0, help="sampling period (s)")
    p.add_argument("--warmup", type=float, default=20.0, help="samples before this are not in the slope (s)")
    p.add_argument("--mode", choices=["sync", "async"], default="async")
    p.add_argument("--bundle")
    p.add_argument("--record", help="also record into this directory")
    p.add_argument("--robot-only", action="store_true", help="the simulated robot alone, faults not fatal")
    p.add_argument("--unfixed", action="store_true",
                   help="with --robot-only: keep piper_sdk's unread send bus, to see issue 12's growth")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vla-edge-bench-demo"))
    args = p.parse_args()

    if args.robot_only:
        cmd = [sys.executable, "-c", ROBOT_ONLY, str(args.seconds), "unfixed" if args.unfixed else "fixed"]
    else:
        if args.bundle is None:
            args.bundle = str(ensure_demo_bundle(args.workdir))
        cmd = [sys.executable, "-m", "vla_edge.edge.cli", "run", "--robot", "sim", "--bundle", args.bundle,
               "--mode", args.mode, "--seconds", str(args.seconds), "--keyboard", "none"]
        if args.record:
            cmd += ["--record", args.record]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    samples = []
    print("t_s   rss_mb", flush=True)
    while child.poll() is None:
        rss = rss_mb(child.pid)
        if rss is not None:
            t = time.monotonic() - t0
            samples.append((t, rss))
            print(f"{t:5.0f} {rss:8.1f}", flush=True)
        time.sleep(args.every)
    err = child.stderr.read()
    steady = np.array([(t, r) for t, r in samples if t >= args.warmup])
    if len(steady) >= 2:
        slope = np.polyfit(steady[:, 0], steady[:, 1], 1)[0] * 60
        print(f"growth after {args.warmup:g} s: {slope:+.2f} MB/min (least squares), "
              f"{steady[-1, 1] - steady[0, 1]:+.1f} MB from {steady[0, 0]:.0f} s to {steady[-1, 0]:.0f} s; "
              f"peak {max(r for _, r in samples):.1f} MB; exit code {child.returncode}")
    else:
        print(f"too few samples after the warm-up; exit code {child.returncode}")
    print(err.strip().splitlines()[-1] if err.strip() else "", file=sys.stderr)
    if child.returncode:
        print(err[-2000:], file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
