"""Rebuild the shipped tiny reach policy (``vla_edge/export/data/tiny_policy.pt``) through the data loop a user
runs: ``vla-edge record`` -> ``convert`` -> ``train-tiny`` -> ``export`` -> ``demo_rate``.

Usage::

    python -m vla_edge.tools.make_demo_policy --work /tmp/demo-policy                # the shipped recipe
    python -m vla_edge.tools.make_demo_policy --work /tmp/demo-policy --install      # and replace the shipped file
    python -m vla_edge.tools.make_demo_policy --work w/ --episodes 24 --ready-episodes 8 --steps 50 --runs 2  # a try
    python -m vla_edge.tools.make_demo_policy --work w/ --init '' --steps 3000 --lr 2e-3   # from scratch instead

Steps, each a command in a process of its own (printed, timed; a step whose output exists is skipped, so a cut
run continues where it stopped; record continues after the episodes already in WORK/episodes):

1. ``vla-edge record --robot sim --instruction "touch the red target" --episodes 200 --seed 0 --episode-seconds 3
   --reset-seconds 0.2 --keyboard none --out WORK/episodes``: the simulated operator (the reach task's scripted
   expert moving the master arms) demonstrates 200 episodes, seeds 0..199 (targets at the four spots,
   jittered, each from a randomised start pose), each ended by the operator 0.5 s after it reached the target
   (about 1.3 s, 38 ticks), in real time (~6 min). On a loaded machine a stall of the whole process (over the
   sim's 0.3 s watchdogs) stops record safely (exit 3) and keeps the episode so far: that cut episode is
   deleted and recording continues from its seed (at most 5 times);
2. the same with ``--start-spread 0`` for 200 more, seeds 200..399: each from the ready pose, where the demo
   starts, so the data holds the demo's own first decision (which way J1 turns, read from the image alone)
   200 times instead of never (~5 min);
3. ``vla-edge convert WORK/episodes --to llava-vla WORK/data``: data.json (each sample also carries its
   episode's ``target_xy_m``), the JPEGs, statistics.yaml, vla_edge.json;
4. ``nice -n 5 vla-edge train-tiny --data WORK/data --out WORK/best.pt --steps 1000 --batch 16 --lr 5e-4
   --seed 0 --with-stats --init vla_edge/export/data/tiny_policy.pt``: the shipped policy fine-tuned on data.json
   as the reference trainer encodes it, with the training-only target probe (the samples' ``target_xy_m``);
   ``--with-stats`` records the data's statistics.yaml and vla_edge.json (bounds, action encoding, state
   padding, layout) in the checkpoint, which ``vla-edge demo`` exports with no ``--stats``; the checkpoint's
   training record names the file it started from by sha256;
5. ``vla-edge export --ckpt WORK/best.pt --out WORK/bundle``: INT8, as the demo exports it (no ``--stats``:
   this checks the checkpoint is self-contained);
6. ``python -m vla_edge.tools.demo_rate --runs 40 --seed-seed 0 --bundle WORK/bundle``: the demo, 40 seeds.

``--install`` copies WORK/best.pt over the shipped file at the end, only when step 6 measured at least
``--min-successes`` (39) of the runs. Needs the [export] extra. Measured: README, "A policy that does something".
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vla_edge.edge.sim.task import INSTRUCTION
from vla_edge.export.demo import SHIPPED_POLICY

CLI = [sys.executable, "-m", "vla_edge.edge.cli"]


def steps(work: Path, a) -> list[tuple[str, list[str], Path | None]]:
    """``(name, command, output)`` of each step; a step whose output exists is skipped."""
    record = [*CLI, "record", "--robot", a.robot, "--instruction", INSTRUCTION, "--episodes", "0", "--seed", "0",
              "--episode-seconds", f"{a.episode_seconds:g}", "--reset-seconds", "0.2", "--keyboard", "none",
              "--out", str(work / "episodes")]
    init = ["--init", str(a.init)] if a.init else []
    return [
        ("record", record, work / "episodes"),
        ("record ready", [*record, "--start-spread", "0"], work / "episodes"),
        ("convert", [*CLI, "convert", str(work / "episodes"), "--to", "llava-vla", str(work / "data")],
         work / "data"),
        ("train", ["nice", "-n", "5", *CLI, "train-tiny", "--data", str(work / "data"), "--out", str(work / "best.pt"),
                   "--steps", str(a.steps), "--batch", str(a.batch), "--lr", f"{a.lr:g}", "--seed", str(a.seed),
                   "--with-stats", *init], work / "best.pt"),
        ("export", [*CLI, "export", "--ckpt", str(work / "best.pt"), "--out", str(work / "bundle")],
         work / "bundle"),
        ("demo_rate", [sys.executable, "-m", "vla_edge.tools.demo_rate", "--runs", str(a.runs), "--seed-seed",
                       str(a.seed_seed), "--bundle", str(work / "bundle")], None),
    ]


def record(episodes: Path, cmd: list[str], total: int, first_seed: int) -> int:
    """Record until ``episodes`` holds ``total`` episodes, the k-th (file order) of seed ``first_seed + k``; a run
    that stopped (a stall tripped a watchdog) loses its last, cut episode and continues from its seed."""
    rc = 0
    for attempt in range(6):
        have = sorted(episodes.glob("episode_*.hdf5"), key=lambda p: int(p.stem.split("_")[1]))
        if attempt and have:  # the run before stopped safely (exit 3): its last episode was cut short
            print(f"make_demo_policy: record: deleting the cut episode {have[-1]}", flush=True)
            have.pop().unlink()
        left = total - len(have)
        if left <= 0:
            print(f"make_demo_policy: record: {len(have)} episodes in {episodes}, skipped", flush=True)
            return 0
        run = [*cmd[: cmd.index("--episodes") + 1], str(left), "--seed", str(first_seed + len(have)),
               *cmd[cmd.index("--seed") + 2 :]]
        print(f"make_demo_policy: record: {shlex.join(run)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(run).returncode
        print(f"make_demo_policy: record: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 3:  # 0: done; another code: not a stall (nothing is deleted)
            return rc
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_edge.tools.make_demo_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working directory (episodes/, data/, best.pt, bundle/)")
    p.add_argument("--robot", default="sim", help="record's --robot (a sim profile; default sim)")
    p.add_argument("--episodes", type=int, default=200,
                   help="demonstrations from randomised starts (seeds --first-seed..; default 200)")
    p.add_argument("--ready-episodes", type=int, default=200,
                   help="demonstrations from the ready pose, where the demo starts (record --start-spread 0; the "
                        "seeds after the randomised ones; default 200)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first demonstration (default 0)")
    p.add_argument("--episode-seconds", type=float, default=3.0,
                   help="record's --episode-seconds, the longest episode (default 3; the simulated operator ends "
                        "each 0.5 s after it reached the target, about 1.3 s in)")
    p.add_argument("--init", default=str(SHIPPED_POLICY),
                   help="train-tiny --init: the checkpoint to fine-tune (default: the shipped policy; '' trains "
                        "from scratch)")
    p.add_argument("--steps", type=int, default=1000, help="train-tiny --steps (default 1000)")
    p.add_argument("--batch", type=int, default=16, help="train-tiny --batch (default 16)")
    p.add_argument("--lr", type=float, default=5e-4, help="train-tiny --lr (default 5e-4)")
    p.add_argument("--seed", type=int, default=0, help="train-tiny --seed (default 0)")
    p.add_argument("--runs", type=int, default=40, help="demo_rate --runs (default 40)")
    p.add_argument("--seed-seed", type=int, default=0, help="demo_rate --seed-seed (default 0)")
    p.add_argument("--install", action="store_true", help=f"copy best.pt to {SHIPPED_POLICY} at the end, when "
                   "demo_rate measured at least --min-successes")
    p.add_argument("--min-successes", type=int, default=39, help="what --install needs of demo_rate (default 39)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    successes = -1
    for name, cmd, out in steps(work, a):
        if name.startswith("record"):  # the random starts, then the ready starts after them
            total = a.episodes + (a.ready_episodes if name == "record ready" else 0)
            rc = record(work / "episodes", cmd, total, a.first_seed)
            if rc != 0:
                return rc
            continue
        if out is not None and out.exists():
            print(f"make_demo_policy: {name}: {out} exists, skipped", flush=True)
            continue
        print(f"make_demo_policy: {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.monotonic()
        if name == "demo_rate":  # its summary decides --install
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            print(r.stdout, end="", flush=True)
            found = re.search(r"demo_rate: (\d+) of (\d+) succeeded", r.stdout)
            successes = int(found.group(1)) if found else -1
        else:
            r = subprocess.run(cmd)
        print(f"make_demo_policy: {name}: exit {r.returncode} after {time.monotonic() - t0:.0f} s", flush=True)
        if r.returncode != 0:
            return r.returncode
    if a.install:
        if successes < a.min_successes:
            print(f"make_demo_policy: not installed: {successes} successes, --install needs {a.min_successes}")
            return 1
        shutil.copyfile(work / "best.pt", SHIPPED_POLICY)
        print(f"make_demo_policy: installed {work / 'best.pt'} as {SHIPPED_POLICY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
