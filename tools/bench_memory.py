"""Benchmark: resident memory of a long simulated run stays flat (issue 12: it grew 41 MB/min).

Starts ``vla-edge run --robot sim --mode async --seconds S --keyboard none`` as a child process (the
real command, nothing of it in this process), samples its RSS from ``/proc/PID/status`` every
``--every`` seconds and prints one line per sample, then the growth: a least-squares slope over the
samples after ``--warmup`` seconds (MB/min, MB = 1e6 bytes) and the last minus the first of those.
This is the outside view; ``tests/test_piper.py`` checks the cause (no unread queue on the CAN bus).

Usage::

    python tools/bench_memory.py --seconds 600            # the issue's 10-minute run
    python tools/bench_memory.py --seconds 120 --every 10 # a short one
    python tools/bench_memory.py --seconds 120 --record /tmp/episodes   # with recording

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
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vla-edge-bench-demo"))
    args = p.parse_args()

    if args.bundle is None:
        from vla_edge.edge.run import ensure_demo_bundle

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
    if child.returncode:
        print(err[-2000:], file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
