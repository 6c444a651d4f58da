"""Argument checks that need the file system, made before anything slow or any device is touched.

Usage::

    from vla_edge.edge.cli.checks import validate
    validate(args)         # raises ArgumentError (one line, exit 2) for a path or combination that cannot work
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import zipfile
from pathlib import Path

from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import check_replaceable
from vla_edge.edge.remote import parse_server_urls


class ArgumentError(VlaEdgeError):
    """An argument that cannot work (a range, a path, a missing companion flag), found before any slow work."""


def _probe_writable(d: Path, what: str, path) -> None:
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ArgumentError(f"{what} {path}: cannot write in {d} ({e.strerror or e})") from None


def out_file(path, what: str) -> None:
    """A file we will write: its directory exists and is writable, and it is not a directory."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ArgumentError(f"{what} {path}: is a directory (expected a file name)")
    parent = p.parent
    if not parent.is_dir():
        raise ArgumentError(f"{what} {path}: directory {parent} does not exist (create it first)")
    _probe_writable(parent, what, path)


def out_dir(path, what: str) -> None:
    """A directory we will create or fill: it is a writable directory, or its parent is."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ArgumentError(f"{what} {path}: exists and is not a directory")
    d = p if p.is_dir() else p.parent
    if not d.is_dir():
        raise ArgumentError(f"{what} {path}: directory {d} does not exist (create it first)")
    _probe_writable(d, what, path)


def in_checkpoint(path, what: str = "--ckpt") -> None:
    """A checkpoint to read: a torch.save file (zip archive or legacy pickle) or an HF directory."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ArgumentError(f"{what} {path}: not found")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ArgumentError(f"{what} {path}: directory has no config.json (expected an HF save_pretrained directory)")
        return
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise ArgumentError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if not (zipfile.is_zipfile(p) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        raise ArgumentError(f"{what} {path}: not a PyTorch checkpoint (torch.save writes a zip archive or a "
                            "pickle; this file is neither)")


def in_dir(path, what: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise ArgumentError(f"{what} {path}: no such directory")


def view_args(args: argparse.Namespace) -> None:
    """``--view`` / ``--view-save FILE``: at most one, and Rerun installed (found, not imported: that is slow)."""
    if args.view and args.view_save:
        raise ArgumentError("give --view (a Rerun viewer) or --view-save FILE, not both")
    if args.view or args.view_save:
        if importlib.util.find_spec("rerun") is None:
            raise ArgumentError("Rerun is not installed: pip install 'vla-edge[view]'")
        out_file(args.view_save, "--view-save")


def policy_server_args(args: argparse.Namespace) -> None:
    """``--policy-server URL[,URL2]``: one or two http(s) URLs; ``--policy-timeout``: two tries fit in 10 s."""
    if args.policy_server:
        try:
            parse_server_urls(args.policy_server)
        except VlaEdgeError as e:
            raise ArgumentError(str(e)) from None
    if args.policy_timeout > 4.0:
        raise ArgumentError(f"--policy-timeout {args.policy_timeout:g}: at most 4 s (two tries must fit in the "
                            "loop's 10 s inference deadline)")


def serve_args(args: argparse.Namespace) -> None:
    """``vla-edge serve``: Ray Serve installed, the bundle a directory, autoscaling bounds in order."""
    if importlib.util.find_spec("ray") is None:
        raise ArgumentError("Ray Serve is not installed: pip install 'vla-edge[serve]'")
    in_dir(args.bundle, "--bundle")
    lo, hi = args.min_replicas, args.max_replicas
    if lo is not None and hi is not None and lo > hi:
        raise ArgumentError(f"--min-replicas {lo} is more than --max-replicas {hi}")
    if (lo is not None or hi is not None) and args.replicas != 1:
        raise ArgumentError("give --replicas N or autoscaling bounds (--min-replicas/--max-replicas), not both")
    if args.address and args.num_cpus:
        raise ArgumentError("--num-cpus sizes a local Ray; a cluster (--address) has its own")
    if not args.route_prefix.startswith("/"):
        raise ArgumentError(f"--route-prefix {args.route_prefix!r}: must start with /")
    out_file(args.write_config, "--write-config")


def validate(args: argparse.Namespace) -> None:
    """Every check that can be made from the arguments alone, before anything slow or any device."""
    cmd = args.command
    if cmd == "tiny-ckpt":
        out_file(args.out, "--out")
    elif cmd == "export":
        if bool(args.ckpt) == bool(args.shape):
            raise ArgumentError("give exactly one of --ckpt PATH or --shape NAME")
        in_checkpoint(args.ckpt)
        extras = [f for f in ("stats", "tokenizer", "layout", "vision_tower", "bins", "resize_order", "actions")
                  if getattr(args, f)]
        if args.shape and extras:
            raise ArgumentError(f"--{extras[0].replace('_', '-')} goes with --ckpt, not --shape")
        if args.stats and not Path(args.stats).is_file():
            raise ArgumentError(f"--stats {args.stats}: no such file (the dataset's statistics.yaml)")
        if args.tokenizer and not Path(args.tokenizer).exists():
            raise ArgumentError(f"--tokenizer {args.tokenizer}: no such file or directory")
        if Path(args.out).exists() or Path(args.out).is_symlink():
            if not args.force:
                raise ArgumentError(f"{args.out} already exists (use --force to replace a bundle)")
            check_replaceable(Path(args.out), keep=[Path(args.ckpt)] if args.ckpt else [])
        else:
            out_dir(args.out, "--out")
    elif cmd == "bench":
        if not (args.bundle or args.shape or args.kernels):
            raise ArgumentError("give --bundle DIR, --shape NAME or --kernels")
        if args.fleet and (not args.bundle or args.shape or args.kernels or args.baseline or args.parallel):
            raise ArgumentError("--fleet goes with --bundle DIR alone (no --shape, --kernels, --baseline, --parallel)")
        if args.fleet and importlib.util.find_spec("ray") is None:
            raise ArgumentError("--fleet needs Ray Serve: pip install 'vla-edge[serve]'")
        in_dir(args.bundle, "--bundle")
        if args.baseline == "torch" and args.bundle and not args.shape and not args.ckpt:
            raise ArgumentError("--baseline torch with --bundle needs --ckpt (the checkpoint the bundle was "
                                "exported from; the bundle records only its sha256)")
        in_checkpoint(args.ckpt)
        out_file(args.json, "--json")
        if args.plot:
            # a command's module: imported only when it runs (parser._call)
            from vla_edge.edge.cli.bench import plot_refusal

            if args.kernels:
                raise ArgumentError("--plot goes with --bundle or --shape, not --kernels")
            if why := plot_refusal(args.plot):
                raise ArgumentError(why)
            out_file(args.plot, "--plot")
    elif cmd == "run":
        in_dir(args.bundle, "--bundle")
        out_file(args.json, "--json")
        if args.json and Path(args.json).exists() and not args.force:  # a second run must not replace the first's
            raise ArgumentError(f"--json {args.json}: exists (give --force to replace it, or another file)")
        out_dir(args.record, "--record")
        view_args(args)
        policy_server_args(args)
    elif cmd == "record":
        view_args(args)
    elif cmd == "demo":
        out_dir(args.workdir, "--workdir")
        view_args(args)
        policy_server_args(args)
    elif cmd == "serve":
        serve_args(args)
    elif cmd == "eval":
        in_dir(args.bundle, "--bundle")
        in_checkpoint(args.ckpt)
        out_file(args.json, "--json")
    elif cmd == "train-tiny":
        (out_dir if args.record else in_dir)(args.data, "--data")
        out_file(args.out, "--out")
        in_checkpoint(args.init, "--init")
