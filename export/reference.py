"""The PyTorch reference step: what LLaVA-VLA does with plain transformers, PIL and numpy.

Used by the export parity report and by ``vla-edge bench --baseline torch``: PIL composition
(:mod:`vla_edge.kernels.reference`), eager ``LlavaVLA``, greedy ``generate`` with the output
grammar applied as a logits processor (the same decisions as the engine's constrained decoder).

On a GPU (``device="cuda"``, ``dtype=torch.float16``) it is the baseline ``vla-edge bench --provider
cuda --baseline torch`` measures: HF eager attention in float16 on the same card; each stage is timed
after ``torch.cuda.synchronize()``.

Usage::

    ref = TorchReference(model, tokens, policy, layout, prompt, encode)                   # CPU fp32
    ref = TorchReference(model, tokens, policy, layout, prompt, encode, "cuda", torch.float16)
    step = ref.step(ref.pixels(frames), state, "pick up the red cube", navigation=False)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from vla_edge import kernels
from vla_edge.edge.bundle.prompt import PromptTemplate
from vla_edge.edge.bundle.spec import ImageLayout, PolicySpec, TokenSpec
from vla_edge.export.model import LlavaVLA
from vla_edge.kernels import reference


@dataclass
class ReferenceStep:
    head_idx: np.ndarray  # (K,) chosen cut-head indices
    logits: np.ndarray  # (K, n_head) raw logits of the cut rows at each generated position
    timings_ms: dict[str, float]


class GrammarProcessor:
    """A transformers LogitsProcessor that keeps only the grammar's greedy choice at each step."""

    def __init__(self, grammar, head_ids: np.ndarray):
        self.grammar = grammar
        self.head_ids = torch.as_tensor(head_ids)
        self.raw: list[np.ndarray] = []
        self.chosen: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        row = scores[0, self.head_ids.to(scores.device)].float().cpu().numpy()
        self.raw.append(row)
        j = self.grammar.step(np.ascontiguousarray(row, np.float32))
        self.chosen.append(j)
        out = torch.full_like(scores, float("-inf"))
        out[0, self.head_ids[j]] = 0.0
        return out


class TorchReference:
    def __init__(self, model: LlavaVLA, tokens: TokenSpec, policy: PolicySpec, layout: ImageLayout,
                 prompt: PromptTemplate, encode, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type != "cpu" or dtype != torch.float32:
            model = model.to(device=self.device, dtype=dtype)
        self.model = model
        self.tokens = tokens
        self.policy = policy
        self.layout = layout
        self.prompt = prompt
        self.encode = encode

    def pixels(self, frames: list[np.ndarray]) -> np.ndarray:
        return reference.compose_views(frames, self.layout)

    @torch.no_grad()
    def step(self, pixels: np.ndarray, state: np.ndarray, instruction: str, navigation: bool) -> ReferenceStep:
        m = self.model
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        image = m.image_embeds(torch.as_tensor(pixels).to(self.device, self.dtype))[0]
        sync()
        t1 = time.perf_counter()
        proprio = reference.tokenize_proprio(  # the robot's state, then the policy's state_pad
            self.policy.model_state(state), np.asarray(self.policy.proprio_mean), np.asarray(self.policy.proprio_std),
            self.tokens.vocab_base, self.tokens.bin_edges,
        )
        after = self.prompt.instruction_ids(self.encode, instruction, navigation) + list(proprio) + self.prompt.suffix
        emb = m.embed_tokens
        ids = {k: torch.tensor(v, device=self.device) for k, v in (("prefix", self.prompt.prefix), ("after", after))}
        embeds = torch.cat([emb(ids["prefix"]), image, emb(ids["after"])])[None]
        grammar = kernels.ChunkGrammar(self.tokens.n_bins, self.policy.chunk_tokens, navigation)
        proc = GrammarProcessor(grammar, self.tokens.head_ids)
        from transformers import LogitsProcessorList  # transformers: the [export] extra

        m.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=self.policy.chunk_tokens + 4,
            do_sample=False,
            logits_processor=LogitsProcessorList([proc]),
            eos_token_id=self.tokens.im_end,
            pad_token_id=self.tokens.im_end,
        )
        sync()
        t2 = time.perf_counter()
        return ReferenceStep(
            head_idx=np.asarray(proc.chosen, np.int64),
            logits=np.stack(proc.raw),
            timings_ms={"vision": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3},
        )
