"""The demo's policy and bundle: the trained tiny reach policy shipped in the package, exported once and
cached, and the checkpoint a bundle came from when it is that policy.

Usage::

    from vla_edge.export.demo import ensure_demo_bundle
    bundle_dir = ensure_demo_bundle()        # <cache>/demo/bundle, exported on first use

The cache is ``$VLA_EDGE_CACHE`` (default ``~/.cache/vla-edge``). Importing this module needs no torch; making
the bundle needs the [export] extra.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import Bundle, BundleError
from vla_edge.edge.telemetry import log_console

log = logging.getLogger(__name__)

SHIPPED_POLICY = Path(__file__).parent / "data" / "tiny_policy.pt"
"""The trained tiny reach policy (README, "A policy that does something"), when one is shipped."""


def shipped_policy() -> Path | None:
    return SHIPPED_POLICY if SHIPPED_POLICY.exists() else None


def cache_dir() -> Path:
    """vla-edge's cache: ``$VLA_EDGE_CACHE``, else ``~/.cache/vla-edge``."""
    return Path(os.environ.get("VLA_EDGE_CACHE", Path.home() / ".cache" / "vla-edge"))


def demo_dir(workdir: str | None = None) -> Path:
    """Where the demo keeps its checkpoint and bundle: ``workdir``, else ``<cache>/demo``."""
    return Path(workdir) if workdir else cache_dir() / "demo"


def ensure_demo_bundle(workdir: str | None = None) -> Path:
    """The demo's INT8 bundle, made on first use (needs the [export] extra).

    It is the trained tiny reach policy shipped as ``vla_edge/export/data/tiny_policy.pt`` when that file
    exists (README, "A policy that does something"), else a tiny checkpoint with random weights.
    """
    policy = shipped_policy()
    d = demo_dir(workdir)
    bundle = d / "bundle"
    wanted = policy.name if policy is not None else "tiny.pt"
    if _loads(bundle):
        source = json.loads((bundle / "manifest.json").read_text())["source"]
        # the shipped policy by content: a bundle cached from an earlier tiny_policy.pt is exported again
        if source["name"] == wanted and (policy is None or source.get("sha256") == _file_sha256(policy)):
            return bundle
    try:
        # the export tools: a robot-side install lacks them (the except below)
        from vla_edge.export.checkpoint import load_checkpoint
        from vla_edge.export.pipeline import ExportOptions, export_bundle
        from vla_edge.export.tiny import write_tiny_checkpoint
    except ImportError as e:  # torch or transformers missing: a robot-side install
        raise VlaEdgeError(
            f"no demo bundle in {bundle} and the export tools are not installed ({e.name}): "
            "pip install 'vla-edge[export]' or pass --bundle"
        ) from None

    ckpt = policy
    if ckpt is None:
        ckpt = d / "tiny.pt"
        if not ckpt.exists():
            log.info("making the tiny demo checkpoint %s", ckpt)
            write_tiny_checkpoint(ckpt, seed=0)
    log.info("exporting %s -> %s", ckpt, bundle)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=log_console()) as progress:
        export_bundle(load_checkpoint(ckpt), ExportOptions(out=bundle, precision="int8", force=True), progress)
    return bundle


def _file_sha256(path: Path) -> str:
    """The file's sha256, as export records its source's (export.checkpoint: kept out of `vla-edge run`'s start-up)."""
    from vla_edge.export.checkpoint import file_sha256

    return file_sha256(path)


def _loads(bundle: Path) -> bool:
    """Whether a cached bundle loads with this vla-edge (an older one is exported again)."""
    try:
        Bundle.load(bundle, verify=False)
    except BundleError:
        return False
    return True


def shipped_checkpoint_for(bundle) -> str | None:
    """The shipped tiny policy's path, when ``bundle`` was exported from it (its sha256 matches)."""
    if SHIPPED_POLICY.exists() and _file_sha256(SHIPPED_POLICY) == bundle.manifest.get("source", {}).get("sha256"):
        return str(SHIPPED_POLICY)
    return None
