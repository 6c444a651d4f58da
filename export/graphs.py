"""The two ONNX graphs of a bundle, as PyTorch modules, and their export.

* ``vision.onnx``: ``pixels`` (B,3,S,S) float32 -> ``image_embeds`` (B, n_patches+1, hidden): the
  truncated SigLIP trunk, the projector, and the ``image_newline`` row appended; B images are B
  independent rows (one robot: B = 1; a batch of robots: :mod:`vla_edge.edge.batch`).
* ``decoder.onnx``: ``inputs_embeds`` (1,T,hidden) + ``logit_index`` (K,) int64 + the past cache
  ``past.{i}.key|value`` (1, kv_heads, P, head_dim) -> ``logits`` (1,K,n_head) for the positions in
  ``logit_index`` only, over the *cut* head (the rows that can ever be generated), and
  ``present.{i}.key|value`` (1, kv_heads, P+T, head_dim). Positions are ``P .. P+T-1``, causal.
  The same graph serves prefill (T = prompt, K = 1), single-token decode (T = 1) and parallel
  (Jacobi) decoding of a whole chunk (T = K = chunk).

The token embedding table is not a graph: prompts are assembled on the host from ``embeddings.npy``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from vla_edge.export.model import LlavaVLA

log = logging.getLogger(__name__)


class VisionGraph(nn.Module):
    def __init__(self, model: LlavaVLA):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_embeds(pixels)


class DecoderGraph(nn.Module):
    """Qwen2 decoder over ``inputs_embeds`` with a flat KV cache and a cut output head."""

    def __init__(self, model: LlavaVLA, head_ids: torch.Tensor):
        super().__init__()
        self.lm = model.lm
        self.n_layers = model.cfg.text.layers
        # (hidden, n_head): stored transposed so the exported MatMul has a constant B (quantisable).
        head = model.lm.lm_head.weight.detach()[head_ids].t().contiguous()
        self.register_buffer("head_weight_t", head, persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, logit_index: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache  # transformers: the [export] extra

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        out = self.lm.model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state.index_select(1, logit_index)
        logits = torch.matmul(hidden, self.head_weight_t)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins = ["inputs_embeds", "logit_index"]
    outs = ["logits"]
    for i in range(n_layers):
        ins += [f"past.{i}.key", f"past.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def export_vision(model: LlavaVLA, path: Path, opset: int) -> None:
    s = model.cfg.vision.image_size
    pixels = torch.zeros(1, 3, s, s)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            VisionGraph(model),
            (pixels,),
            str(path),
            input_names=["pixels"],
            output_names=["image_embeds"],
            dynamic_axes={"pixels": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            external_data=_large(model),
        )


def export_decoder(model: LlavaVLA, head_ids, path: Path, opset: int) -> None:
    t = model.cfg.text
    graph = DecoderGraph(model, torch.as_tensor(head_ids, dtype=torch.long))
    ins, outs = decoder_io_names(t.layers)
    past_len, new_len = 3, 2  # example shapes only: every axis below is dynamic
    past = [torch.zeros(1, t.kv_heads, past_len, t.head_dim) for _ in range(2 * t.layers)]
    args = (torch.zeros(1, new_len, t.hidden), torch.tensor([new_len - 1]), *past)
    dyn = {"inputs_embeds": {1: "new_len"}, "logit_index": {0: "n_logits"}, "logits": {1: "n_logits"}}
    for i in range(t.layers):
        for kv in ("key", "value"):
            dyn[f"past.{i}.{kv}"] = {2: "past_len"}
            dyn[f"present.{i}.{kv}"] = {2: "total_len"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=ins,
            output_names=outs,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
            external_data=_large(model),
        )


def _large(model: LlavaVLA) -> bool:
    """Graphs over 2 GB must keep weights in an external file (protobuf limit)."""
    n = sum(p.numel() for p in model.parameters())
    return n * 4 > 1.8e9
