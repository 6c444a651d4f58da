"""How often ``vla-edge demo`` succeeds: the demo itself, run on N random seeds drawn as the demo draws them.

Usage::

    python -m vla_edge.tools.demo_rate --runs 40                   # the shipped policy, 40 random seeds
    python -m vla_edge.tools.demo_rate --runs 40 --seed-seed 7     # the same 40 seeds again
    python -m vla_edge.tools.demo_rate --runs 40 --bundle b/       # another reach policy's bundle (vla-edge export)
    python -m vla_edge.tools.demo_rate --seeds 3001 1008           # these episode seeds

Each run is one ``vla-edge demo --seed N`` in a process of its own (``python -m vla_edge.edge.cli demo``), so
what is measured is exactly what a new user runs: the target placed by ``ReachTask.sample(N)``, the arms
starting from the ready pose, at most ``--seconds`` (the demo's default, 10 s), and eval's success test
(fingertip within 4 cm of the target and low, 5 ticks in a row), read from the demo's verdict line. The
seeds are drawn as the demo draws its own, ``randrange(1_000_000)``, from a generator seeded with
``--seed-seed`` (default: a random one, printed, so that a run can be repeated). The demo's bundle is
exported before the first run (``vla-edge demo`` caches it), so no run includes the export.

Output (stdout): the seeds, one line per run (verdict, time to success, where the fingertip ended, the demo's
"stopped ..." line and exit code when the run was stopped (a stall over a watchdog stops the robot safely:
a miss, as in the demo), the process's wall time), and the summary ``S of N succeeded (95 % Wilson interval L-H %)`` with the load
average before and after (the runs are real-time control loops: a loaded machine can stall them). Exit 0
when every run was measured (a run without a verdict line counts as a miss and is reported); 2 on a usage
error.

Needs the [export] extra without ``--bundle`` (the demo exports the shipped policy on first use).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vla_edge.edge.sim.evaluate import wilson_interval

DEMO_SEEDS = 1_000_000
"""``vla-edge demo`` draws its seed with ``random.randrange(1_000_000)``."""

VERDICT = re.compile(r"demo: target at \((?P<x>[-+0-9.]+), (?P<y>[-+0-9.]+)\) m for the (?P<side>\w+) arm "
                     r"\(seed (?P<seed>\d+)\): (?:success after (?P<t>[0-9.]+) s|no success within [0-9.]+ s)"
                     r".*?it ended (?P<cm>[0-9.]+) cm from the target")


@dataclass
class DemoRun:
    seed: int
    success: bool
    time_to_success_s: float | None
    final_cm: float | None
    side: str | None
    wall_s: float
    rc: int
    problem: str | None = None  # why there is no verdict (the run counts as a miss)
    stopped: str | None = None  # the run's "stopped ..." line (a fault, e.g. a stall tripping a watchdog)

    def line(self) -> str:
        if self.problem:
            return f"seed {self.seed}: MISS, no verdict ({self.problem}) [{self.wall_s:.1f} s]"
        verdict = (f"success after {self.time_to_success_s:.2f} s" if self.success
                   else "MISS, no success in time")
        why = f" ({self.stopped}; exit {self.rc})" if self.stopped or self.rc else ""
        return (f"seed {self.seed}: {verdict}, {self.side} arm, ended {self.final_cm:.1f} cm from the target{why} "
                f"[{self.wall_s:.1f} s]")


def draw_seeds(runs: int, seed_seed: int) -> list[int]:
    """``runs`` episode seeds drawn as the demo draws one, from a generator seeded with ``seed_seed``."""
    rng = random.Random(seed_seed)
    return [rng.randrange(DEMO_SEEDS) for _ in range(runs)]


def demo_command(seed: int, seconds: float, bundle: str | None, workdir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "vla_edge.edge.cli", "demo", "--seed", str(seed), "--seconds", f"{seconds:g}"]
    if bundle:
        cmd += ["--bundle", bundle]
    if workdir:
        cmd += ["--workdir", workdir]
    return cmd


def parse_verdict(seed: int, stdout: str, rc: int, wall_s: float, stderr: str = "") -> DemoRun:
    """The demo's verdict line (it may wrap at the terminal's width) as a :class:`DemoRun`."""
    m = VERDICT.search(" ".join(stdout.split()))
    if m is None or int(m["seed"]) != seed:
        last = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["no output"])[-1]
        return DemoRun(seed, False, None, None, None, wall_s, rc, f"exit {rc}: {last[-200:]}")
    t = m["t"]
    stopped = next((ln.strip()[-200:] for ln in stderr.splitlines() if "vla-edge run: stopped" in ln), None)
    return DemoRun(seed, t is not None, float(t) if t is not None else None, float(m["cm"]), m["side"], wall_s, rc,
                   stopped=stopped)


def run_demo(seed: int, seconds: float, bundle: str | None, workdir: str | None, timeout_s: float) -> DemoRun:
    """One ``vla-edge demo --seed SEED`` as a user runs it, in a process of its own."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(demo_command(seed, seconds, bundle, workdir), capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return DemoRun(seed, False, None, None, None, time.monotonic() - t0, -1, f"killed after {timeout_s:g} s")
    return parse_verdict(seed, r.stdout, r.returncode, time.monotonic() - t0, r.stderr)


def summary(runs: list[DemoRun]) -> str:
    n, k = len(runs), sum(r.success for r in runs)
    lo, hi = wilson_interval(k, n)
    times = [r.time_to_success_s for r in runs if r.success]
    mean_t = f"{sum(times) / len(times):.2f} s" if times else "-"
    missed = [r.seed for r in runs if not r.success]
    stopped = sum(1 for r in runs if not r.success and (r.stopped or r.rc or r.problem))
    return (f"{k} of {n} succeeded (95 % Wilson interval {100 * lo:.0f}-{100 * hi:.0f} %); mean time to success "
            f"{mean_t}; missed seeds: {' '.join(map(str, missed)) or 'none'}"
            + (f" ({stopped} of them stopped early or without a verdict)" if stopped else ""))


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_edge.tools.demo_rate", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=40, help="demo runs, each on a random seed (default 40)")
    p.add_argument("--seed-seed", type=int, help="seed of the seed generator (default: a random one, printed)")
    p.add_argument("--seeds", type=int, nargs="+", help="run these episode seeds instead of random ones")
    p.add_argument("--bundle", help="run this bundle instead of the shipped policy's (vla-edge demo --bundle)")
    p.add_argument("--workdir", help="the demo's --workdir (default: its cache)")
    p.add_argument("--seconds", type=float, default=10.0, help="the demo's --seconds (default 10, the demo's)")
    p.add_argument("--timeout", type=float, default=180.0, help="kill a run after this long (default 180 s)")
    a = p.parse_args(argv)
    if a.runs < 1 or a.seconds <= 0:
        p.error("--runs must be >= 1 and --seconds > 0")
    if a.bundle and not (Path(a.bundle) / "manifest.json").is_file():
        p.error(f"--bundle {a.bundle}: not a bundle (no manifest.json)")
    if a.seeds:
        seeds, origin = a.seeds, "given"
    else:
        seed_seed = a.seed_seed if a.seed_seed is not None else random.SystemRandom().randrange(2**31)
        seeds, origin = draw_seeds(a.runs, seed_seed), f"--seed-seed {seed_seed}"
    if not a.bundle:  # exported once here, so that no run's time includes the export
        from vla_edge.export.demo import ensure_demo_bundle

        ensure_demo_bundle(a.workdir)
    what = a.bundle or "the shipped policy (vla-edge demo's bundle)"
    print(f"demo_rate: {len(seeds)} runs of vla-edge demo --seconds {a.seconds:g}, {what}; {_load()}")
    print(f"seeds ({origin}): {' '.join(map(str, seeds))}", flush=True)
    runs = []
    for i, seed in enumerate(seeds):
        run = run_demo(seed, a.seconds, a.bundle, a.workdir, a.timeout)
        runs.append(run)
        print(f"{i + 1:3d}/{len(seeds)} {run.line()}", flush=True)
    print(f"demo_rate: {summary(runs)}; {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
