"""``vla-edge bench``: per-stage latency of one policy step, optionally against PyTorch.

Runs ``--warmup`` then ``--steps`` steps of the engine on fixed synthetic inputs (three 640x480
frames, a state vector, an instruction) and prints p50/p95/p99 per stage, per token and tokens/s.
``--baseline torch`` runs the PyTorch reference (transformers eager, greedy ``generate``, PIL
preprocessing) on the same checkpoint and inputs in the same process, then prints the ratio and
whether the chunks were identical. ``--shape llava-ov-0.5b`` exports random weights of the real
shape once into the user cache dir and benchmarks that.

``--provider cuda``: the engine on ONNX Runtime's CUDA provider and, with ``--baseline torch``, the
PyTorch model in float16 (HF eager) on the same GPU, in the same process; GPU memory is reported
(``nvidia-smi`` used-memory deltas, and PyTorch's peak allocation). ``--parallel`` runs the engine
twice, sequential then Jacobi-parallel decoding, and reports both, the decoder calls per chunk and the
decode ratio. ``--cuda-graph`` replays the one-token step as a CUDA graph.

``--plot latency.png`` draws each stage's distribution over the measured steps (a box and every step as
a dot, milliseconds, log scale), one box per run: the engine, its sequential run with ``--parallel``, and
the PyTorch baseline with ``--baseline torch`` (whose prefill and decode are one ``generate`` stage).
matplotlib comes from the optional ``[plot]`` extra and is imported only for ``--plot``.

Usage::

    vla-edge bench --bundle b/ --steps 5 --json out.json
    vla-edge bench --bundle b/ --steps 30 --plot latency.png
    vla-edge bench --shape llava-ov-0.5b --provider cuda --baseline torch --parallel --cuda-graph
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.manifest import Bundle, BundleError
from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
from vla_edge.edge.cli import kernel_bench as kbench
from vla_edge.edge.decoding import parallel_refusal
from vla_edge.edge.engine import STAGES, Engine, EngineError
from vla_edge.edge.telemetry import log_console, out_console, percentiles
from vla_edge.export.checkpoint import LoadOptions, bundle_defaults, load_checkpoint
from vla_edge.export.demo import cache_dir
from vla_edge.export.pipeline import ExportOptions, export_bundle, random_checkpoint

log = logging.getLogger(__name__)


def synthetic_inputs(layout, state_dim: int, seed: int = 0):
    """Three textured 640x480 RGB frames and a state vector, fixed by the seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    frames = []
    for i, _ in enumerate(layout.tiles):
        img = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, ((xx + yy) // 3) % 256], -1).astype(np.uint8)
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        frames.append(img)
    return frames, rng.normal(0, 0.3, state_dim)


def _shape_bundle(shape: str, target: str, precision: str) -> tuple[Path, object]:
    """Export (once) and return the cached bundle of a real shape with random weights."""
    out = cache_dir() / "bundles" / f"{shape}-{target}-{precision}-{ExportOptions.decoder}"
    ckpt = None
    try:
        Bundle.load(out, verify=False)
        fresh = False
    except BundleError:  # not there yet, or written by an older vla-edge
        fresh = True
    if fresh:
        log.info("exporting %s (random weights) into %s: several minutes on a CPU, once", shape, out)
        ckpt = random_checkpoint(shape)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=log_console()) as progress:
            export_bundle(ckpt, ExportOptions(out=out, target=target, precision=precision, force=True), progress)
    return out, ckpt


def gpu_memory_used_mb() -> float | None:
    """Device memory in use on GPU 0 (all processes), from ``nvidia-smi``; None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                       capture_output=True, text=True, timeout=10)
    try:
        return float(r.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip() or None


def run_engine(engine: Engine, frames, state, instruction: str, navigation: bool, steps: int, warmup: int):
    engine.start_episode(instruction, navigation=navigation)
    for _ in range(warmup):
        engine.step(frames, state)
    chunks = [engine.step(frames, state) for _ in range(steps)]
    stages = {s: [c.timings_ms[s] for c in chunks] for s in (*STAGES, "total")}
    # decode covers the tokens after the first (prefill yields the first); with --parallel a decoder call
    # yields several tokens, so per token and per decoder call differ
    per_token = [c.timings_ms["decode"] / max(len(c.token_ids) - 1, 1) for c in chunks]
    n_tokens = [len(c.token_ids) for c in chunks]
    return chunks, stages, per_token, n_tokens


def run_torch(ckpt, bundle: Bundle, frames, state, instruction, navigation, steps, warmup, device: str = "cpu"):
    """The PyTorch reference step: fp32 on the CPU, float16 (HF eager) on ``device="cuda"``."""
    import torch  # torch: the [export] extra
    from vla_edge.export.model import LlavaVLA  # imports torch at its top
    from vla_edge.export.reference import TorchReference  # imports torch at its top

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = LlavaVLA.from_checkpoint(ckpt)
    encode = tokenizer_encoder(ckpt.tokenizer_json)
    dtype = torch.float16 if device == "cuda" else torch.float32
    ref = TorchReference(model, ckpt.tokens, ckpt.policy, ckpt.layout, PromptTemplate.build(encode, ckpt.tokens), encode,
                         device=device, dtype=dtype)
    results = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        pixels = ref.pixels(frames)
        t1 = time.perf_counter()
        r = ref.step(pixels, state, instruction, navigation)
        r.timings_ms = {"compose": (t1 - t0) * 1e3, **r.timings_ms, "total": r.timings_ms["total"] + (t1 - t0) * 1e3}
        if i >= warmup:
            results.append(r)
    return results


PLOT_SUFFIXES = (".png", ".svg", ".pdf")
"""File types ``--plot`` writes (matplotlib picks the format from the suffix)."""

_PLOT_ORDER = ("compose", "vision", "prompt", "prefill", "decode", "generate", "detokenize", "total")


def plot_refusal(path) -> str | None:
    """Why ``--plot PATH`` cannot work (matplotlib missing, an unknown file type), or None."""
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        return f"--plot {path}: give a file name ending in {', '.join(PLOT_SUFFIXES)}"
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'vla-edge[plot]'"
    return None


def plot_latency(path, runs: dict[str, dict[str, list[float]]], title: str) -> None:
    """Write a figure of per-stage latency distributions: for each stage a box per run (label -> stage -> ms per
    step), each step a dot on it, on a log millisecond axis."""
    import matplotlib  # matplotlib: the [plot] extra, only for --plot

    matplotlib.use("Agg")  # a file, never a window (and no display on a robot)
    import matplotlib.pyplot as plt  # matplotlib: the [plot] extra

    stages = [s for s in _PLOT_ORDER if any(s in r for r in runs.values())]
    stages += [s for r in runs.values() for s in r if s not in stages]
    width = 0.8 / len(runs)
    rng = np.random.default_rng(0)  # the dots' jitter: the same picture for the same numbers
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100, layout="constrained")
    for i, (label, stage_ms) in enumerate(runs.items()):
        color = f"C{i}"
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, s in enumerate(stages) if s in stage_ms]
        data = [np.maximum(np.asarray(stage_ms[s], float), 1e-3) for s in stages if s in stage_ms]  # log axis: > 0
        ax.boxplot(data, positions=xs, widths=width * 0.8, showfliers=False, patch_artist=True,
                   boxprops={"facecolor": color, "alpha": 0.35, "edgecolor": color},
                   medianprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color})
        for x, d in zip(xs, data, strict=True):
            ax.plot(x + rng.uniform(-width * 0.3, width * 0.3, len(d)), d, ".", color=color, ms=3, alpha=0.7)
        ax.plot([], [], "s", color=color, alpha=0.6, label=label)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_yscale("log")
    ax.set_ylabel("latency per policy step (ms, log scale)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path)
    plt.close(fig)


def main(args) -> int:
    console = out_console()
    if args.kernels:
        res = kbench.run()
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    ckpt = None
    if args.shape:
        target = "cuda" if args.provider == "cuda" else "cpu"
        root, ckpt = _shape_bundle(args.shape, target, "int8")
    elif args.bundle:
        root = Path(args.bundle)
    else:
        raise VlaEdgeError("give --bundle DIR, --shape NAME or --kernels")
    bundle = Bundle.load(root)
    cuda_graph = getattr(args, "cuda_graph", False)
    frames, state = synthetic_inputs(bundle.layout, bundle.policy.robot_state_dim)
    instruction = "pick up the red cube"
    if args.parallel and (why := parallel_refusal(bundle.manifest)):
        raise EngineError(why)  # before any slow work
    mem0 = gpu_memory_used_mb()
    sequential = None
    if args.parallel:  # the sequential run first, for the ratio
        seq_engine = Engine(bundle, provider=args.provider, cuda_graph=cuda_graph)
        sequential = run_engine(seq_engine, frames, state, instruction, args.navigation, args.steps, args.warmup)
        del seq_engine
    engine = Engine(bundle, provider=args.provider, parallel=args.parallel, cuda_graph=cuda_graph)
    chunks, stages, per_token, n_tokens = run_engine(
        engine, frames, state, instruction, args.navigation, args.steps, args.warmup
    )
    mem1 = gpu_memory_used_mb()
    report: dict = {
        "bundle": str(root),
        "precision": bundle.precision,
        "decoder_kind": engine.kind,
        "provider": engine.provider,
        "parallel_decoding": args.parallel,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "steps": args.steps,
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "per_token_ms": percentiles(per_token),
        "per_decoder_call_ms": percentiles([c.timings_ms["decode"] / max(c.decode_calls, 1) for c in chunks]),
        "decoder_calls_per_step": int(np.median([c.decode_calls for c in chunks])),
        "tokens_per_step": int(np.median(n_tokens)),
        "tokens_per_s": float(np.median(n_tokens) / (np.median(stages["decode"]) + np.median(stages["prefill"])) * 1e3),
        "decode_calls_per_chunk": percentiles([c.decode_calls for c in chunks]),
        "cuda_graph": engine._graph_session is not None,
    }
    if engine.device == "cuda":
        report["gpu"] = {"name": gpu_name(), "engine_memory_mb": None if mem0 is None or mem1 is None else mem1 - mem0}
    if sequential is not None:
        s_chunks, s_stages, s_per_token, _ = sequential
        report["sequential"] = {
            "stages_ms": {k: percentiles(v) for k, v in s_stages.items()},
            "per_token_ms": percentiles(s_per_token),
            "decode_calls_per_chunk": percentiles([c.decode_calls for c in s_chunks]),
            "chunks_identical_to_parallel": all(
                np.array_equal(a.token_ids, b.token_ids) for a, b in zip(s_chunks, chunks, strict=True)),
        }
        report["parallel_decode_speedup_p50"] = float(np.median(s_stages["decode"]) / max(np.median(stages["decode"]), 1e-9))
    table = Table(title=f"vla-edge step latency (ms): {root.name}, {bundle.precision}, {engine.kind} decoder, "
                  f"{engine.provider}"
                  + (", parallel decoding" if args.parallel else ""))
    table.add_column("stage")
    for q in ("p50", "p95", "p99"):
        table.add_column(q, justify="right")
    for k, v in report["stages_ms"].items():
        table.add_row(k, *(f"{v[q]:.2f}" for q in ("p50", "p95", "p99")))
    table.add_row("per token (decode)", *(f"{report['per_token_ms'][q]:.2f}" for q in ("p50", "p95", "p99")))
    if args.parallel:
        table.add_row(f"per decoder call ({report['decoder_calls_per_step']} a step)",
                      *(f"{report['per_decoder_call_ms'][q]:.2f}" for q in ("p50", "p95", "p99")))
    console.print(table)
    console.print(f"{report['tokens_per_step']} tokens per step, {report['tokens_per_s']:.1f} tokens/s (prefill + decode)")
    if sequential is not None:
        seq = report["sequential"]
        console.print(f"sequential decoding: decode p50 {seq['stages_ms']['decode']['p50']:.2f} ms in "
                      f"{seq['decode_calls_per_chunk']['p50']:.0f} calls; parallel: "
                      f"{report['stages_ms']['decode']['p50']:.2f} ms in {report['decode_calls_per_chunk']['p50']:.0f} "
                      f"calls; ratio {report['parallel_decode_speedup_p50']:.2f}x; "
                      f"chunks identical: {seq['chunks_identical_to_parallel']}")
    if "gpu" in report:
        console.print(f"GPU {report['gpu']['name']}: engine memory {report['gpu']['engine_memory_mb']} MB (nvidia-smi delta)")

    if args.baseline == "torch":
        source = bundle.manifest["source"]
        if ckpt is None:
            if args.shape or (not args.ckpt and source["sha256"] == f"random-{source['name']}-seed0"):
                ckpt = random_checkpoint(args.shape or source["name"])  # random weights of a real shape
            else:
                src = args.ckpt
                if not src:
                    raise VlaEdgeError("--baseline torch needs --ckpt (the checkpoint the bundle came from)")
                ckpt = load_checkpoint(src, LoadOptions(defaults=bundle_defaults(bundle)))
                if ckpt.sha256 != bundle.manifest["source"]["sha256"]:
                    raise VlaEdgeError(f"{src} is not the checkpoint {root} was exported from (sha256 differs)")
                ckpt.policy = bundle.policy  # the statistics, state padding and action encoding it was exported with
        refs = run_torch(ckpt, bundle, frames, state, instruction, args.navigation, args.steps, args.warmup,
                         device=engine.device)
        torch_total = [r.timings_ms["total"] for r in refs]
        same = all(
            np.array_equal(bundle.tokens.head_ids[r.head_idx], c.token_ids) for r, c in zip(refs, chunks, strict=True)
        )
        ratio = float(np.median(torch_total) / np.median(stages["total"]))
        precision = "float16 on the same GPU" if engine.device == "cuda" else "fp32"
        report["baseline"] = {
            "kind": f"torch eager {precision}, transformers generate (greedy, grammar processor), PIL preprocessing",
            "stages_ms": {k: percentiles([r.timings_ms[k] for r in refs]) for k in refs[0].timings_ms},
            "speedup_p50": ratio,
            "chunks_identical": same,
            "actions": bundle.policy.actions,  # both sides decode with the bundle's encoding
        }
        if not args.navigation:  # the PyTorch chunk decoded as the engine decodes its own
            lo, hi = bundle.policy.action_bounds()
            err = [np.abs(kernels.detokenize_actions(bundle.tokens.head_ids[r.head_idx[:-1]], bundle.tokens.vocab_base,
                                                     lo, hi, bundle.tokens.bin_edges) - c.joints).max()
                   for r, c in zip(refs, chunks, strict=True)]
            report["baseline"]["action_max_abs_diff"] = float(max(err))
        if engine.device == "cuda":
            import torch  # torch: the [export] extra

            report["baseline"]["torch_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        bt = Table(title="PyTorch baseline (ms)")
        bt.add_column("stage")
        for q in ("p50", "p95", "p99"):
            bt.add_column(q, justify="right")
        for k, v in report["baseline"]["stages_ms"].items():
            bt.add_row(k, *(f"{v[q]:.2f}" for q in ("p50", "p95", "p99")))
        console.print(bt)
        diff = report["baseline"].get("action_max_abs_diff")
        console.print(f"speed-up vs PyTorch (p50 total): [bold]{ratio:.2f}x[/]; chunks identical: {same}"
                      + (f"; actions ({bundle.policy.actions}) max |diff| {diff:.4f}" if diff is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if getattr(args, "plot", None):
        runs = {f"vla-edge ({engine.provider}{', parallel decoding' if args.parallel else ''})": stages}
        if sequential is not None:
            runs["vla-edge (sequential decoding)"] = sequential[1]
        if args.baseline == "torch":
            runs[f"PyTorch ({'float16' if engine.device == 'cuda' else 'fp32'} eager)"] = {
                k: [r.timings_ms[k] for r in refs] for k in refs[0].timings_ms}
        where = gpu_name() if engine.device == "cuda" else f"{os.cpu_count()} CPU cores"
        plot_latency(args.plot, runs, f"{root.name}: {bundle.precision}, {engine.kind} decoder, "
                     f"{args.steps} steps after {args.warmup} warm-up, {where}")
        console.print(f"wrote {args.plot}")
    return 0
