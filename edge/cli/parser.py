"""The ``vla-edge`` argument parser: every command, its options with units and defaults, its help.

Usage::

    from vla_edge.edge.cli.parser import build_parser
    args = build_parser().parse_args(["run", "--robot", "sim", "--seconds", "10"])
    args.func(args)        # the command's main, imported only when it runs

Each command's implementation is imported lazily (:func:`_call`), so ``vla-edge run`` on a robot never
imports torch and starts fast. Ranges are checked here (argparse types); what needs the file system is
checked by :mod:`vla_edge.edge.cli.checks` before any slow work.
"""

from __future__ import annotations

import argparse
import importlib


def _call(module: str, func: str, args: argparse.Namespace) -> int:
    return int(getattr(importlib.import_module(module), func)(args) or 0)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``vla-edge CMD: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, lo, strict: bool):
    """An argparse type: ``kind`` with a lower bound (``> lo`` when strict, else ``>= lo``)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or v in (float("inf"), float("-inf")) or (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {lo}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _number(float, 0, strict=True)
NON_NEGATIVE = _number(float, 0, strict=False)
COUNT = _number(int, 1, strict=False)  # >= 1
NON_NEGATIVE_INT = _number(int, 0, strict=False)


def _add_tiny_ckpt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-ckpt",
        help="build a tiny LLaVA-VLA-shaped checkpoint (for tests and the demo)",
        description="Build a small model with the LLaVA-VLA architecture (SigLIP trunk, MLP projector, "
        "image_newline, Qwen2 decoder) and a locally made tokenizer, from fixed seeds. Nothing is "
        "downloaded. Needs the [export] extra (torch, transformers).",
    )
    p.add_argument("--out", required=True, help="where to write the checkpoint (.pt)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=lambda a: _call("vla_edge.export.tiny", "main", a))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="turn a checkpoint into an INT8 ONNX bundle",
        description="Export a LLaVA-VLA checkpoint (the trainer's HF save_pretrained directory, or a best.pt) to an ONNX "
        "bundle: vision graph, decoder with KV cache and cut output head, token embeddings, tokenizer, "
        "manifest.json and parity.json. The bundle is built in a temporary directory and renamed into "
        "place only when every step, parity included, has passed.",
    )
    p.add_argument("--ckpt", help="checkpoint: a .pt file or an HF directory with config.json")
    p.add_argument("--shape", choices=["llava-ov-0.5b"], help="instead of --ckpt: random weights of this real shape")
    p.add_argument("--stats", help="the dataset's statistics.yaml (act_min_bound, act_max_bound, robot_obs: "
                   "LLaVA-VLA's format); overrides the checkpoint's. Required when the checkpoint carries none")
    p.add_argument("--tokenizer", help="tokenizer.json, or a directory with it or with vocab.json + merges.txt "
                   "(for a bare best.pt)")
    p.add_argument("--layout", choices=["cobot_magic", "calvin"],
                   help="camera layout of the model's one image (default: the checkpoint's, else by action width: "
                   "7 dims -> calvin, else cobot_magic)")
    p.add_argument("--vision-tower", help="for a bare best.pt: a known tower name (siglip-so400m-patch14-384) or a "
                   "local SigLIP directory with its config.json")
    p.add_argument("--bins", choices=["uniform", "norm"],
                   help="bin edges the model was trained with: uniform (default) or norm (use_norm_bins)")
    p.add_argument("--actions", choices=["raw", "bounds", "sigma3"],
                   help="how training encoded the actions: raw (bin centre = action; the reference trainer's "
                   "default), bounds (min-max over act_min/max_bound; what vla-edge convert writes) or sigma3 "
                   "(3 x std + mean, std/mean read from act_min/max_bound as the reference does). Default: the "
                   "data's vla_edge.json, else the checkpoint's, else raw for a trainer directory or a bare state "
                   "dict")
    p.add_argument("--resize-order", choices=["pillow13", "pillow-pre13"],
                   help="order of PIL's two resize passes in the Pillow that made the training images: pillow13 "
                   "(Pillow >= 13) or pillow-pre13 (older; the LLaVA-VLA reference's era). Default: the order "
                   "vla-edge convert recorded in vla_edge.json, else pillow-pre13 for a trainer directory and "
                   "pillow13 for a .pt")
    p.add_argument("--out", required=True, help="bundle directory to create (must not exist unless --force)")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu", help="device the bundle is tuned for")
    p.add_argument(
        "--precision",
        choices=["int8", "fp32", "fp16"],
        default="int8",
        help="int8 (default): weight-only 8-bit MatMulNBits for cuda, dynamic QInt8 for cpu; "
        "fp32/fp16 for parity work",
    )
    p.add_argument(
        "--decoder",
        choices=["auto", "plain", "fused"],
        default="auto",
        help="auto (default): fused when the head size is a multiple of 16 (the 0.5B's is), else plain; "
        "fused: GroupQueryAttention graph with fused rotary and one preallocated KV buffer "
        "per layer; plain: TorchScript export of transformers' Qwen2, KV cache grows every step",
    )
    p.add_argument("--max-len", type=COUNT,
                   help="fused decoder only: KV buffer length in positions (prompt + chunk; default 1024)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--opset", type=COUNT, default=18, help="ONNX opset (default 18)")
    p.add_argument("--parity-samples", type=COUNT, default=2, help="fixed inputs used for the parity report")
    p.set_defaults(func=lambda a: _call("vla_edge.export.pipeline", "main", a))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="per-stage latency of one policy step (or of the C++ kernels)",
        description="Run N policy steps after warm-up and print per-stage latency p50/p95/p99. "
        "--baseline torch also runs the PyTorch reference in the same process and prints the ratio. "
        "--kernels benchmarks the C++ kernels against their numpy/PIL references.",
    )
    p.add_argument("--bundle", help="bundle directory")
    p.add_argument("--shape", choices=["llava-ov-0.5b"], help="benchmark the real shape with random weights")
    p.add_argument("--kernels", action="store_true", help="benchmark the C++ kernels instead")
    p.add_argument("--steps", type=COUNT, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=1, help="warm-up steps (default 1)")
    p.add_argument("--baseline", choices=["torch"], help="also run the PyTorch reference")
    p.add_argument("--ckpt", help="checkpoint for --baseline torch with --bundle (required: the one the bundle "
                   "was exported from; its sha256 is checked)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider")
    p.add_argument("--parallel", action="store_true",
                   help="also decode with Jacobi parallel decoding and report both and the ratio")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA only: replay the one-token step as a CUDA graph")
    p.add_argument("--navigation", action="store_true", help="use a navigation prompt")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--plot", help="also draw per-stage latency distributions into this .png/.svg/.pdf "
                   "([plot] extra: matplotlib)")
    p.add_argument("--fleet", action="store_true",
                   help="with --bundle: the policy server (a private local Ray Serve, [serve] extra) against an "
                   "in-process engine: per-request overhead, and steps/s of 1, 2, 4 and 8 robots at once")
    p.add_argument("--fleet-seconds", type=POSITIVE, default=5.0, help="--fleet: seconds per fleet size (default 5)")
    p.add_argument("--batch-wait-ms", type=NON_NEGATIVE, default=0.0,
                   help="--fleet: the server's batch wait (as vla-edge serve --batch-wait-ms; default 0)")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.fleet_bench" if a.fleet else "vla_edge.edge.cli.bench",
                                        "main", a))


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the realtime control loop on a robot (sim by default)",
        description="Single-process realtime loop: cameras, policy, Piper arms, TRACER base, keyboard e-stop "
        "(space latches, r then y resumes).",
    )
    p.add_argument("--robot", default="sim", help="robot profile name (sim, cobot_magic) or a .toml path")
    p.add_argument("--bundle", help="bundle directory (default for sim: the demo bundle)")
    p.add_argument("--instruction", default="pick up the red cube", help="task instruction")
    p.add_argument("--navigation", action="store_true", help="ask for mobile manipulation (<Navigation>)")
    p.add_argument("--mode", choices=["sync", "async"], default="sync", help="chunk execution mode")
    p.add_argument("--seconds", type=NON_NEGATIVE, default=0.0, help="stop after this long (0: until e-stop/Ctrl+C)")
    p.add_argument("--rate", type=POSITIVE, help="control rate in Hz (default: the robot profile's, 30)")
    p.add_argument("--max-ticks", type=NON_NEGATIVE_INT, default=0, help="stop after this many control ticks (0: no limit)")
    p.add_argument("--keyboard", choices=["auto", "tty", "evdev", "pynput", "none"], default="auto",
                   help="e-stop keyboard: the terminal (tty), a physical keyboard (evdev), a desktop (pynput)")
    p.add_argument("--firmware-estop", action="store_true",
                   help="e-stop also sends the Piper firmware e-stop (0x150: arms sink slowly, damped)")
    p.add_argument("--record", help="write each episode as HDF5 into this directory")
    p.add_argument("--record-compression", choices=["gzip", "lzf", "none"], default="gzip",
                   help="image filter of the recorded frames: gzip (default, smallest), lzf (less CPU on noisy "
                   "real-camera frames), none (raw, ~5 GB/min)")
    p.add_argument("--json", help="write the end-of-run summary as JSON (an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true", help="let --json replace an existing file")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider")
    _policy_server_options(p)
    _view_options(p, "the run")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.run", "main", a))


def _policy_server_options(p: argparse.ArgumentParser) -> None:
    """``--policy-server URL[,URL2]`` / ``--policy-timeout S`` (checked by ``checks.validate``)."""
    p.add_argument("--policy-server", metavar="URL[,URL2]",
                   help="run the policy on a vla-edge serve server (the robot keeps cameras, loop, safety, e-stop); "
                   "a second URL takes the retry. With --bundle, the server must serve that bundle")
    p.add_argument("--policy-timeout", type=POSITIVE, default=1.0, metavar="S",
                   help="per request to the policy server, in s (default 1.0, at most 4: two tries must fit in the "
                   "loop's 10 s inference deadline); a second failed try is a safe stop")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle to robots over HTTP on Ray Serve ([serve] extra; robots: run --policy-server)",
        description="Deploy the bundle as a Ray Serve application: replicas of the same engine as run (kernels, "
        "decoding, Jacobi with --parallel) behind Serve's HTTP proxies, on a local Ray or an existing cluster "
        "(--address). Prints where it listens; Ctrl+C shuts it down.",
    )
    p.add_argument("--bundle", help="bundle directory (default: the demo bundle, exported on first use)")
    p.add_argument("--address", help="an existing Ray cluster (auto, or HOST:PORT of its head); default: a local Ray")
    p.add_argument("--host", default="127.0.0.1", help="the proxies' address (default 127.0.0.1; 0.0.0.0 for robots)")
    p.add_argument("--port", type=COUNT, default=8000, help="the proxies' HTTP port (default 8000)")
    p.add_argument("--route-prefix", default="/", help="URL path of the application (default /)")
    p.add_argument("--replicas", type=COUNT, default=1, help="fixed number of replicas (default 1)")
    p.add_argument("--min-replicas", type=NON_NEGATIVE_INT, help="autoscaling: at least this many replicas")
    p.add_argument("--max-replicas", type=COUNT, help="autoscaling: at most this many replicas")
    p.add_argument("--cpus-per-replica", type=NON_NEGATIVE, default=1.0, help="Ray CPUs per replica (default 1)")
    p.add_argument("--gpus-per-replica", type=NON_NEGATIVE, default=0.0, help="Ray GPUs per replica (default 0)")
    p.add_argument("--threads", type=COUNT, help="ONNX Runtime threads per replica (default: --cpus-per-replica)")
    p.add_argument("--num-cpus", type=COUNT, help="CPUs of the local Ray (default: all)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto", help="ONNX Runtime provider")
    p.add_argument("--parallel", action="store_true", help="Jacobi parallel decoding (as bench --parallel)")
    p.add_argument("--max-batch", type=COUNT, default=8,
                   help="requests a replica runs as one batch (default 8; 1: one at a time). Each robot's tokens "
                   "equal its step alone; a dynamically quantised (CPU int8) bundle always runs one at a time")
    p.add_argument("--batch-wait-ms", type=NON_NEGATIVE, default=0.0,
                   help="how long a batch waits for more requests once one arrived (default 0: a batch is what "
                   "waits while the engine is busy, so a lone robot never waits)")
    p.add_argument("--write-config", metavar="FILE",
                   help="write a Serve config file for `serve deploy FILE` on a cluster, and exit")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.serve", "main", a))


def _view_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--view`` / ``--view-save FILE`` (checked by :func:`view_args`)."""
    p.add_argument("--view", action="store_true", help=f"stream {what} live to a Rerun viewer ([view] extra)")
    p.add_argument("--view-save", help=f"stream {what} live into this .rrd file instead ([view] extra)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="everything a new user needs: the shipped tiny reach policy, INT8 export, simulated run, summary",
        description="Export the trained tiny reach policy shipped with vla-edge to an INT8 bundle (once, cached), "
        "put a red target at a random spot and run the simulated Cobot Magic: the arm on the target's side "
        "reaches over it. Prints the run summary and how close the fingertip ended.",
    )
    p.add_argument("--seconds", type=POSITIVE, default=10.0, help="how long to run the simulated robot")
    p.add_argument("--seed", type=int, help="episode seed: where the target is (default: a random one)")
    p.add_argument("--workdir", help="where to keep the checkpoint and bundle (default: user cache)")
    p.add_argument("--bundle", help="run this bundle instead of the shipped policy's (another reach policy: "
                   "python -m vla_edge.tools.demo_rate --bundle measures it)")
    _policy_server_options(p)
    _view_options(p, "the demo")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.run", "demo", a))


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="probe every device of a robot profile (arms, base, cameras), print one row each, exit",
        description="Probe every device of a robot profile: each Piper arm's CAN interface, the TRACER base's "
        "serial port, each camera. Prints one row per device (found or missing, why, how to fix) and exits "
        "1 if any is missing or faulted, 0 when all answered. Touches nothing: no motion is commanded.",
    )
    p.add_argument("--robot", default="sim", help="robot profile name (sim, cobot_magic) or a .toml path")
    p.add_argument("--seconds", type=NON_NEGATIVE, default=1.0, help="how long to watch the cameras before reporting fps")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.check", "main", a))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="success rate of a bundle on the simulated reach task (optionally vs PyTorch)",
        description="Run N seeded episodes of the simulated reach task (a red target on the table; the "
        "arm on its side must touch it) through the normal control loop and report the success rate "
        "with a 95 % Wilson interval and the mean time to success. --baseline torch also runs the "
        "checkpoint's PyTorch model on the same seeds and reports per-step token agreement.",
    )
    p.add_argument("--bundle", help="bundle directory (default: the demo bundle)")
    p.add_argument("--robot", default="sim", help="a simulated robot profile (default sim)")
    p.add_argument("--episodes", type=COUNT, default=20, help="number of seeded episodes (default 20)")
    p.add_argument("--seed", type=int, default=1000, help="first episode seed (default 1000; training uses < 1000)")
    p.add_argument("--max-seconds", type=POSITIVE, default=8.0, help="an episode fails after this long (default 8)")
    p.add_argument("--baseline", choices=["torch"], help="also evaluate the PyTorch model of the checkpoint")
    p.add_argument("--ckpt", help="checkpoint for --baseline torch (default: the shipped tiny policy if it matches)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.evaluate", "main", a))


def _add_train_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tiny",
        help="fit a tiny LLaVA-VLA-shaped policy to recorded episodes on a CPU",
        description="Train the tiny model on HDF5 episodes (Cobot Magic layout) with cross-entropy on the "
        "action tokens, the contract's prompt, proprio tokens and image layout; normalisation statistics "
        "come from the data. --record N first records N scripted-expert episodes of the simulated reach "
        "task into --data. Writes a best.pt that vla-edge export takes. Needs the [export] extra.",
    )
    p.add_argument("--data", required=True, help="directory of episode_*.hdf5 files, or LLaVA-VLA data (data.json, "
                   "its images, statistics.yaml: vla-edge convert's output), encoded as the reference trainer does")
    p.add_argument("--out", required=True, help="checkpoint to write (best.pt)")
    p.add_argument("--record", type=NON_NEGATIVE_INT, default=0, help="first record this many expert episodes into --data")
    p.add_argument("--record-seed", type=int, default=0, help="seed of the first recorded episode (default 0)")
    p.add_argument("--steps", type=COUNT, default=1500, help="optimiser steps (default 1500)")
    p.add_argument("--batch", type=COUNT, default=8, help="samples per step (default 8)")
    p.add_argument("--lr", type=POSITIVE, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)")
    p.add_argument("--max-episodes", type=NON_NEGATIVE_INT, default=0, help="use at most this many episodes (0: all)")
    p.add_argument("--init", help="continue from this checkpoint's weights (one train-tiny wrote)")
    p.add_argument("--aux-weight", type=NON_NEGATIVE, default=1.0,
                   help="weight of the training-only target-position loss, used when the episodes record "
                   "target_xy_m (default 1.0; 0 turns it off)")
    p.add_argument("--with-stats", action="store_true",
                   help="LLaVA-VLA data: record its statistics.yaml and vla_edge.json in the checkpoint, so that "
                   "vla-edge export needs no --stats (as vla-edge demo exports its policy)")
    p.set_defaults(func=lambda a: _call("vla_edge.tools.train_tiny", "main", a))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="turn recorded HDF5 episodes into LLaVA-VLA training data",
        description="Convert every episode_*.hdf5 in SRC into what LLaVA-VLA's trainer reads: data.json "
        "(one sample per tick: instruction, state, the next 5 actions), the composed canvas of each tick "
        "as a JPEG, statistics.yaml (action bounds, state mean/std) and vla_edge.json (chunk size, image "
        "layout) for vla-edge export --stats. Written to a temporary directory and renamed into place.",
    )
    p.add_argument("src", help="directory of episode_*.hdf5 files (vla-edge record / run --record)")
    p.add_argument("--to", required=True, choices=["llava-vla"], help="target format")
    p.add_argument("out", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--instruction", help="instruction of every sample (default: each episode's own)")
    p.add_argument("--layout", help="image layout JSON (a layout, a bundle manifest.json or a vla_edge.json; "
                   "default: the Cobot Magic layout)")
    p.add_argument("--chunk-size", type=int, default=5, help="actions per sample (default 5)")
    p.add_argument("--jpeg-quality", type=int, default=75, help="JPEG quality (default 75, PIL's default)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.episodes", "convert_main", a))


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="record teleoperated demonstrations (the puppet arms follow the master arms; no policy)",
        description="Record episodes while an operator moves the master arms: the masters' commands are the "
        "action, the puppets' feedback the state, plus the three cameras, at the profile's rate (30 Hz), one "
        "HDF5 file per episode. Keys: n/right = end the episode (keep it), b = record it again, q/esc = keep "
        "and quit, space = e-stop, r then y = resume. sim: simulated masters driven by the reach task's expert.",
    )
    p.add_argument("--robot", default="sim", help="robot profile name (sim, cobot_magic) or a .toml path")
    p.add_argument("--instruction", required=True, help="the task instruction stored with every episode")
    p.add_argument("--episodes", type=int, default=1, help="episodes to record (default 1)")
    p.add_argument("--out", required=True, help="directory for episode_<n>.hdf5 (numbering continues)")
    p.add_argument("--episode-seconds", type=float, default=30.0, help="longest episode (default 30 s; n ends one "
                   "early; sim: the simulated operator ends each --hold-seconds after it reached the target)")
    p.add_argument("--reset-seconds", type=float, default=5.0,
                   help="reset period between episodes (default 5 s; n ends it early)")
    p.add_argument("--rate", type=float, help="recording rate in Hz (default: the robot profile's, 30)")
    p.add_argument("--seed", type=int, default=0, help="sim: seed of the first episode's target and start pose")
    p.add_argument("--start-spread", type=float, default=None, metavar="RAD",
                   help="sim: each episode starts from the ready pose plus up to this much on J1, J2, J3 and J5 "
                        "(default 0.3 rad; 0: the ready pose, where demo and eval start)")
    p.add_argument("--hold-seconds", type=float, default=None, metavar="S",
                   help="sim: the simulated operator ends each episode (as n would) once it has held the reached "
                        "target this long (default 0.5 s; longer than --episode-seconds: never)")
    p.add_argument("--keyboard", choices=["auto", "tty", "evdev", "pynput", "none"], default="auto",
                   help="episode and e-stop keys: the terminal (tty), a physical keyboard (evdev), a desktop (pynput)")
    _view_options(p, "the recording")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.record", "main", a))


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="replay a recorded episode in Rerun (needs the [view] extra)",
        description="Replay an HDF5 episode to Rerun: the cameras, the composed model image, planned vs "
        "measured joints, the base command, inference latencies and e-stop events, on a tick and a time "
        "timeline. Opens the Rerun viewer, or writes a .rrd file with --save.",
    )
    p.add_argument("episode", help="an episode_<n>.hdf5 file (vla-edge record / run --record)")
    p.add_argument("--save", help="write the recording to this .rrd file instead of opening the viewer")
    p.add_argument("--layout", help="image layout JSON for the model image (default: the Cobot Magic layout)")
    p.set_defaults(func=lambda a: _call("vla_edge.edge.cli.episodes", "view_main", a))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vla-edge",
        description="Deploy LLaVA-VLA on an AgileX Cobot Magic: export, benchmark, run (sim by default).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks, debug logs and library warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_run, _add_tiny_ckpt, _add_export, _add_bench, _add_check, _add_eval,
                _add_train_tiny, _add_record, _add_convert, _add_view, _add_serve):
        add(sub)
    for p in sub.choices.values():  # `vla-edge run --debug` as well as `vla-edge --debug run`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks, debug logs and library warnings")
    return parser
