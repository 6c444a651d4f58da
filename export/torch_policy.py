"""The checkpoint's PyTorch model as a loop policy: ``eval --baseline torch``'s second policy.

Usage::

    from vla_edge.export.torch_policy import TorchPolicy
    policy = TorchPolicy(load_checkpoint("best.pt"))       # has start_episode()/step() like the Engine
    same, total, same_chunks, chunks = policy.agreement(steps, instruction)

Needs the [export] extra (torch, transformers).
"""

from __future__ import annotations

import time

import numpy as np
from vla_edge import kernels
from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
from vla_edge.edge.policy import ActionChunk
from vla_edge.export.model import LlavaVLA
from vla_edge.export.reference import TorchReference


class TorchPolicy:
    """The checkpoint's PyTorch model (:class:`~vla_edge.export.reference.TorchReference`) as a loop policy."""

    provider = "torch"

    def __init__(self, ckpt):
        encode = tokenizer_encoder(ckpt.tokenizer_json)
        self.ref = TorchReference(LlavaVLA.from_checkpoint(ckpt), ckpt.tokens, ckpt.policy, ckpt.layout,
                                  PromptTemplate.build(encode, ckpt.tokens), encode)
        self.tokens, self.policy = ckpt.tokens, ckpt.policy
        self.instruction, self.navigation = "", False

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        self.instruction, self.navigation = instruction, navigation

    def head_indices(self, frames, state) -> np.ndarray:
        return self.ref.step(self.ref.pixels(frames), np.asarray(state, np.float64), self.instruction,
                             self.navigation).head_idx

    def step(self, frames, state):
        t0 = time.perf_counter()
        head_idx = self.head_indices(frames, state)
        ids = self.tokens.head_ids[head_idx]
        lo, hi = self.policy.action_bounds()  # the encoding the bundle records (policy.actions), as the engine
        joints = kernels.detokenize_actions(ids[head_idx < self.tokens.n_bins], self.tokens.vocab_base, lo, hi,
                                            self.tokens.bin_edges)
        return ActionChunk(joints=joints, token_ids=ids, timings_ms={"total": (time.perf_counter() - t0) * 1e3})

    def agreement(self, steps, instruction: str) -> tuple[int, int, int, int]:
        """(equal tokens, tokens, identical chunks, chunks) of this model vs a bundle, on the bundle's own
        observations ``steps``: ``(frames, state, token_ids)`` per policy step."""
        self.start_episode(instruction)
        same = total = same_chunks = 0
        for frames, state, ids in steps:
            ref = self.tokens.head_ids[self.head_indices(frames, state)]
            n = min(len(ref), len(ids))
            eq = int(np.sum(ref[:n] == ids[:n]))
            same += eq
            total += max(len(ref), len(ids))
            same_chunks += int(len(ref) == len(ids) and eq == n)
        return same, total, same_chunks, len(steps)
