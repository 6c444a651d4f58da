"""``vla-edge eval``: the bundle (and with ``--baseline torch`` its checkpoint's PyTorch model) on the
simulated reach task, through :func:`vla_edge.edge.sim.evaluate.evaluate`.

Usage::

    vla-edge eval --episodes 20                                  # the demo bundle
    vla-edge eval --bundle b/ --baseline torch --ckpt best.pt    # and PyTorch on the same seeds

The PyTorch model is loaded only for ``--baseline torch`` (the [export] extra).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine
from vla_edge.edge.session import Session
from vla_edge.edge.sim.evaluate import evaluate, print_report
from vla_edge.export.demo import demo_dir, shipped_checkpoint_for


def torch_baseline(bundle: Bundle, ckpt_path: str | None):
    """The PyTorch model of the checkpoint ``bundle`` was exported from (its sha256 is checked)."""
    from vla_edge.export.checkpoint import LoadOptions, bundle_defaults, load_checkpoint
    from vla_edge.export.torch_policy import TorchPolicy

    src = ckpt_path or shipped_checkpoint_for(bundle)
    if not src:
        raise VlaEdgeError("--baseline torch needs --ckpt (the checkpoint the bundle came from)")
    ck = load_checkpoint(src, LoadOptions(defaults=bundle_defaults(bundle)))
    if ck.sha256 != bundle.manifest["source"]["sha256"]:
        raise VlaEdgeError(f"{src} is not the checkpoint {bundle.root} was exported from (sha256 differs)")
    ck.policy = bundle.policy  # the statistics, state padding and action encoding the bundle was exported with
    return TorchPolicy(ck)


def main(args) -> int:
    bundle_path = args.bundle
    if bundle_path is None:
        candidate = demo_dir(None) / "bundle"
        if not (candidate / "manifest.json").exists():
            raise VlaEdgeError("give --bundle (or run vla-edge demo once to make the demo bundle)")
        bundle_path = str(candidate)
    bundle = Bundle.load(bundle_path)
    threads = max(1, (os.cpu_count() or 2) - 1)
    policies = [(f"bundle ({bundle.precision})", Engine(bundle, provider=args.provider, threads=threads))]
    baseline = None
    if args.baseline == "torch":
        baseline = torch_baseline(bundle, args.ckpt)
        policies.append(("pytorch", baseline))
    with Session(keyboard="none") as session:  # Ctrl+C/SIGTERM: the robot safe, the episodes so far reported
        report = evaluate(policies, args.episodes, robot=args.robot, cameras=bundle.layout.cameras,
                          first_seed=args.seed, max_seconds=args.max_seconds, baseline=baseline, session=session)
    if any(s["episodes"] for s in report["summaries"]):
        print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    if session.stop.requested:
        done = sum(s["episodes"] for s in report["summaries"])
        print(f"vla-edge eval: stopped by {session.stop.reason} after {done} episodes", file=sys.stderr)
        return session.stop.exit_code
    return 0
