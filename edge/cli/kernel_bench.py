"""Kernel benchmark: C++ vs the numpy/PIL reference, measured in the same run on this machine.

    python -m vla_edge.edge.cli.kernel_bench [repeats]      (also: vla-edge bench --kernels)

Two workloads:
  compose  3 x 640x480 frames -> Cobot Magic layout -> (1, 3, 384, 384) float32, at the level the
           kernels pick on this CPU and at every lower SIMD level it has (avx2, scalar: same pixels)
  decode   one 70-token chunk: 71 grammar steps over (71, 261) logits + detokenize to (5, 14)
Needs Pillow (the reference), which the robot runtime itself never imports.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, N_BINS, QWEN2_TOKENS, cobot_magic_policy
from vla_edge.kernels import ChunkGrammar, Composer, _core, detokenize_actions, simd
from vla_edge.kernels import reference as ref


def _time(fn, repeats: int) -> dict:
    """Median and p99 wall time of ``fn()`` in milliseconds (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    t = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        t[i] = time.perf_counter() - t0
    return {"median_ms": float(np.median(t) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3)}


def _frames(seed: int = 0) -> list[np.ndarray]:
    """Camera-like frames: gradients plus noise (the content does not change the cost)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], axis=-1)
    return [np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8) for _ in range(3)]


def run(repeats: int = 200) -> dict:
    """Time both workloads for C++ and the reference; print a table; return the numbers.

    Returns ``{"compose": {"cpp": {...}, "reference": {...}, "speedup": x, "levels": {level: {...}}},
    "decode": {...}, "simd": str}`` (``levels``: the lower SIMD levels, each with its speed-up).
    """
    policy = cobot_magic_policy()
    V = QWEN2_TOKENS.vocab_base

    frames = _frames()
    composer = Composer(COBOT_MAGIC_LAYOUT, [f.shape[:2] for f in frames])
    out = np.empty((1, 3, COBOT_MAGIC_LAYOUT.output, COBOT_MAGIC_LAYOUT.output), np.float32)
    if not np.array_equal(composer.compose(frames, out), ref.compose_views(frames, COBOT_MAGIC_LAYOUT)):
        raise AssertionError("C++ composition differs from the PIL reference")
    compose = {
        "cpp": _time(lambda: composer.compose(frames, out), repeats),
        "reference": _time(lambda: ref.compose_views(frames, COBOT_MAGIC_LAYOUT), max(repeats // 4, 10)),
    }
    levels = {}
    for level in reversed(_core.simd_levels()):  # the lower levels a CPU without the best one would run
        if level == simd():
            continue
        before = _core._set_simd(level)
        try:
            levels[level] = _time(lambda: composer.compose(frames, out), repeats)
        finally:
            _core._set_simd(before)

    chunk = policy.chunk_tokens
    logits = np.random.default_rng(1).normal(size=(chunk + 1, N_BINS + 5)).astype(np.float32)
    grammar = ChunkGrammar(N_BINS, chunk, False)
    head_ids = QWEN2_TOKENS.head_ids
    lo, hi = policy.action_bounds()

    def decode_cpp():
        heads = grammar.argmax_rows(logits)
        return detokenize_actions(head_ids[heads[:chunk]], V, lo, hi)

    def decode_ref():
        heads = ref.GrammarReference(N_BINS, chunk, False).decode(logits)
        return ref.detokenize_actions(head_ids[heads[:chunk]], V, lo, hi)

    if not np.array_equal(decode_cpp(), decode_ref()):
        raise AssertionError("C++ decoding differs from the numpy reference")
    decode = {"cpp": _time(decode_cpp, repeats), "reference": _time(decode_ref, repeats)}

    result = {"simd": simd(), "repeats": repeats}
    for name, r in (("compose", compose), ("decode", decode)):
        r["speedup"] = r["reference"]["median_ms"] / r["cpp"]["median_ms"]
        result[name] = r
    compose["levels"] = {k: {**t, "speedup": compose["reference"]["median_ms"] / t["median_ms"]}
                         for k, t in levels.items()}
    _print(result)
    return result


def _print(result: dict) -> None:
    table = Table(title=f"vla-edge kernels (C++ {result['simd']}, one thread, {result['repeats']} repeats)")
    for col in ("workload", "impl", "median", "p99", "speed-up"):
        table.add_column(col, justify="right" if col not in ("workload", "impl") else "left")
    labels = {"compose": "compose 3x640x480 -> 384", "decode": "decode 70-token chunk"}
    for name in ("compose", "decode"):
        r = result[name]
        unit, scale = ("ms", 1.0) if name == "compose" else ("us", 1e3)
        for impl in ("cpp", "reference"):
            t = r[impl]
            table.add_row(
                labels[name] if impl == "cpp" else "",
                "C++" if impl == "cpp" else "numpy/PIL",
                f"{t['median_ms'] * scale:.3f} {unit}",
                f"{t['p99_ms'] * scale:.3f} {unit}",
                f"{r['speedup']:.1f}x" if impl == "cpp" else "",
            )
        for level, t in r.get("levels", {}).items():
            table.add_row("", f"C++ {level}", f"{t['median_ms'] * scale:.3f} {unit}",
                          f"{t['p99_ms'] * scale:.3f} {unit}", f"{t['speedup']:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
