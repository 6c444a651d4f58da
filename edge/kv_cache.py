"""The decoder's KV cache as the engine sees it: the rows of one call and how many cached rows are valid.

Usage::

    cache = SharedKV(engine, engine.prefix_len)  # fused graph; plain: GrowingKV(engine, engine.prefix_past, n)
    logits = cache.run(np.array([n - 1]), Rows(embeds=e))  # e: (1,n,H) float32 -> (1, n_head) logits
    cache.truncate(cache.length - 2)  # forget the last two rows (a Jacobi rollback)
    seqlens_k, total = gqa_lengths(past_len=10, new_len=3)  # int32 [12], int32 13

Lengths and positions are counted in rows (tokens); embeddings are (1,T,H) float32 host arrays of the
bundle's hidden size H; logits are float32 over the cut head (``n_head`` entries per requested position).

* :class:`GrowingKV` (``plain`` graph): ``present.*`` outputs are kept as OrtValues and fed back as
  the next ``past.*``; the cache grows by T rows per call; rolling back copies the kept rows to the host.
* :class:`SharedKV` (``fused`` graph): the engine's buffers of ``max_len`` rows per tensor, bound as both
  ``past.*`` and ``present.*``; only the count of valid rows is tracked, and rolling back lowers it.

Both delegate the decoder call itself to the engine (``Engine._run_plain`` / ``Engine._run_fused``),
which owns the sessions and their IO bindings. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vla_edge.edge.engine import Engine


def gqa_lengths(past_len: int, new_len: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's length inputs for ``new_len`` positions after ``past_len`` cached ones.

    ``seqlens_k`` (1,) int32 = past_len + new_len - 1 (GQA's convention: the index of the last
    position, not a count); ``total_sequence_length`` () int32 = past_len + new_len.
    """
    total = past_len + new_len
    return np.array([total - 1], np.int32), np.array(total, np.int32)


@dataclass
class Rows:
    """The new positions of one decoder call, in order: image, host embedding rows, head indices.

    ``image_tokens``: how many rows come from the engine's device-side image buffer (0 or the
    bundle's image tokens); ``embeds``: (1,E,H) host rows; ``heads``: (1,N) int64 cut-head indices.
    """

    image_tokens: int = 0
    embeds: np.ndarray | None = None
    heads: np.ndarray | None = None

    @property
    def count(self) -> int:
        e = 0 if self.embeds is None else self.embeds.shape[1]
        return self.image_tokens + e + (0 if self.heads is None else self.heads.size)


class GrowingKV:
    """Plain-graph cache: each call returns a cache T rows longer (the ``present`` OrtValues)."""

    def __init__(self, engine: Engine, past: list, length: int):
        self.engine, self.past, self.length = engine, past, length

    def run(self, logit_index: np.ndarray, rows: Rows) -> np.ndarray:
        """``rows`` at positions ``length .. length+T-1`` -> (K, n_head) logits."""
        logits, self.past = self.engine._run_plain(rows, logit_index, self.past)
        self.length += rows.count
        return logits

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` rows (copies them to the host: the plain graph's rollback)."""
        if length < self.length:
            self.past = [np.ascontiguousarray((v if isinstance(v, np.ndarray) else v.numpy())[:, :, :length])
                         for v in self.past]
            self.length = length


class SharedKV:
    """Fused-graph cache: the engine's preallocated buffers; only the first ``length`` rows are valid."""

    def __init__(self, engine: Engine, length: int):
        self.engine, self.length = engine, length

    def run(self, logit_index: np.ndarray, rows: Rows) -> np.ndarray:
        """``rows`` at positions ``length .. length+T-1`` -> (K, n_head) logits."""
        logits = self.engine._run_fused(rows, logit_index, self.length)
        self.length += rows.count
        return logits

    def truncate(self, length: int) -> None:
        """Forget rows >= ``length``: the next call overwrites them. Nothing is copied."""
        self.length = min(self.length, length)
