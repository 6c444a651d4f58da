"""Greedy, grammar-constrained decoding of one action chunk over a KV cache: sequential or Jacobi-parallel.

Usage::

    if why := parallel_refusal(bundle.manifest):  # None: Jacobi decoding equals sequential here
        raise EngineError(why)
    tokens, calls = decode_sequential(grammar, first, cache)  # one token per decoder call
    tokens, calls = decode_jacobi(grammar, first, cache, max_tokens)  # several tokens per call

``grammar`` is a ``kernels.ChunkGrammar`` that has already taken ``first`` (the prefill's token);
``cache`` is a :class:`~vla_edge.edge.kv_cache.GrowingKV` or :class:`~vla_edge.edge.kv_cache.SharedKV`
holding the prompt. Tokens are cut-head indices (int); ``calls`` counts decoder calls after the prefill;
``max_tokens`` is the chunk's token count including ``first``.

Parallel (Jacobi) decoding is exact only when the rows of one batched call do not interact: true
for float32/float16 graphs and weight-only ``MatMulNBits`` (activations stay per row), false for
dynamic QInt8 (activations are quantised with one scale per call over all rows). The engine reads
the decoder's quantisation record from the manifest and refuses ``parallel=True`` on the latter
(:func:`parallel_refusal`). No torch here.
"""

from __future__ import annotations

import numpy as np
from vla_edge.edge.kv_cache import GrowingKV, Rows, SharedKV

ROWS_INTERACT_SCHEMES = ("dynamic-qint8",)
"""Decoder quantisation schemes whose batched rows interact (one activation scale per call)."""


def parallel_refusal(manifest: dict) -> str | None:
    """Why Jacobi decoding would not equal sequential decoding on this bundle, or None when it does.

    Reads the decoder's quantisation record (``manifest["quantization"]["decoder"]``): no record
    (fp32/fp16) and weight-only schemes keep rows independent; dynamic QInt8 does not.
    """
    record = (manifest.get("quantization") or {}).get("decoder") or {}
    scheme = record.get("scheme")
    if record.get("rows_interact") or scheme in ROWS_INTERACT_SCHEMES:
        return (f"--parallel refused: this bundle's decoder is dynamically quantised ({scheme}: activations "
                "are scaled per call over all rows, so a batched call differs from one row at a time and "
                "parallel decoding would not equal sequential); use an fp32/fp16 or MatMulNBits bundle")
    return None


def decode_sequential(grammar, first: int, cache: GrowingKV | SharedKV) -> tuple[list[int], int]:
    """One token per call until the grammar is done."""
    out = [first]
    one = np.zeros(1, np.int64)
    calls = 0
    while not grammar.done:
        logits = cache.run(one, Rows(heads=np.array([[out[-1]]], np.int64)))
        calls += 1
        out.append(grammar.step(logits[0]))
    return out, calls


def decode_jacobi(grammar, first: int, cache: GrowingKV | SharedKV, max_tokens: int) -> tuple[list[int], int]:
    """Exact parallel decoding: iterate the rest of the chunk to its greedy fixed point.

    Each call feeds ``[last accepted token, guesses...]`` and takes the constrained argmax at
    every position. Prediction ``i`` is exact when the inputs before it were all right, so the
    longest such prefix is accepted (at least one token per call) and the result equals
    sequential greedy decoding token for token, provided the rows of one call do not interact
    (the engine refuses ``parallel`` where they do: :func:`parallel_refusal`). The cache keeps
    the rows of accepted inputs (``cache.truncate``: a slice for the plain graph, a lower row
    count for the fused one).
    """
    accepted = [first]
    guess: list[int] = []
    calls = 0
    while not grammar.done:
        left = max_tokens - len(accepted)  # predictions still needed (upper bound)
        guess = (guess + [accepted[-1]] * left)[: left - 1]
        block = np.asarray([accepted[-1]] + guess, np.int64)
        past_len = cache.length
        logits = cache.run(np.arange(len(block), dtype=np.int64), Rows(heads=block[None]))
        calls += 1
        pred = grammar.argmax_rows(logits)  # -1 once the grammar is done
        n = 1
        while n < len(block) and pred[n - 1] >= 0 and block[n] == pred[n - 1]:
            n += 1
        for tok in pred[:n]:
            if tok < 0 or grammar.done:
                break
            grammar.advance(int(tok))
            accepted.append(int(tok))
        cache.truncate(past_len + n)
        guess = [int(x) for x in pred[n:] if x >= 0]
    return accepted, calls
