"""LLaVA-VLA in PyTorch, built from transformers classes: the reference that export is checked against.

The module holds the SigLIP trunk (embeddings + the kept encoder layers, no post-layernorm, no head),
the 2-layer MLP projector, the ``image_newline`` row and a ``Qwen2ForCausalLM``. It is also the
``--baseline torch`` of ``vla-edge bench`` (eager, greedy ``generate``).
"""

from __future__ import annotations

import torch
from torch import nn
from vla_edge.export.checkpoint import NEWLINE_KEY, PROJECTOR_PREFIX, VISION_PREFIX, Checkpoint
from vla_edge.export.config import ModelConfig


def _hf_configs(m: ModelConfig, attn: str):
    from transformers import Qwen2Config, SiglipVisionConfig  # transformers: the [export] extra

    v, t = m.vision, m.text
    vcfg = SiglipVisionConfig(
        hidden_size=v.hidden,
        intermediate_size=v.intermediate,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        patch_size=v.patch,
        image_size=v.image_size,
        layer_norm_eps=v.layer_norm_eps,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
    )
    tcfg = Qwen2Config(
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        vocab_size=t.vocab_rows,
        rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_positions,
        tie_word_embeddings=t.tie_word_embeddings,
        hidden_act="silu",
        use_sliding_window=False,
    )
    vcfg._attn_implementation = attn
    tcfg._attn_implementation = attn
    return vcfg, tcfg


class LlavaVLA(nn.Module):
    """SigLIP trunk + projector + image_newline + Qwen2 causal LM (CONTRACT section 1)."""

    def __init__(self, cfg: ModelConfig, attn: str = "eager"):
        super().__init__()
        from transformers import Qwen2ForCausalLM, SiglipVisionModel  # transformers: the [export] extra

        self.cfg = cfg
        vcfg, tcfg = _hf_configs(cfg, attn)
        self.vision = SiglipVisionModel(vcfg)
        self.vision.post_layernorm = nn.Identity()  # LLaVA reads hidden_states[-1]: never normalised
        self.projector = nn.Sequential(
            nn.Linear(cfg.vision.hidden, cfg.text.hidden), nn.GELU(), nn.Linear(cfg.text.hidden, cfg.text.hidden)
        )
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden))
        self.lm = Qwen2ForCausalLM(tcfg)

    # -- weights -------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, attn: str = "eager") -> LlavaVLA:
        model = cls(ckpt.model, attn=attn)
        model.load_state_dict(to_module_keys(ckpt.state_dict, ckpt.model), strict=True)
        if ckpt.model.text.tie_word_embeddings:
            model.lm.tie_weights()
        return model.float().eval()

    def llava_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights in llava_qwen naming (what a LLaVA-VLA ``best.pt`` holds)."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("vision."):
                if k.startswith(("vision.post_layernorm", "vision.head")):
                    continue
                out[VISION_PREFIX + k[len("vision.") :]] = v
            elif k.startswith("projector."):
                out[PROJECTOR_PREFIX + k[len("projector.") :]] = v
            elif k == "image_newline":
                out[NEWLINE_KEY] = v
            elif k.startswith("lm."):
                if k == "lm.lm_head.weight" and self.cfg.text.tie_word_embeddings:
                    continue
                out[k[len("lm.") :]] = v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    # -- forward pieces ------------------------------------------------------------------------------
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised pixels -> (B, n_patches + 1, hidden): projected features + image_newline."""
        x = self.vision.embeddings(pixels)
        x = self.vision.encoder(inputs_embeds=x).last_hidden_state  # hidden_states[-1], no post-layernorm
        x = self.projector(x)
        nl = self.image_newline.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        return torch.cat([x, nl], dim=1)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(ids)


def to_module_keys(sd: dict, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Map llava_qwen keys onto :class:`LlavaVLA` keys, dropping what the model does not use."""
    out = {}
    for k, v in sd.items():
        if k.startswith(VISION_PREFIX):
            rest = k[len(VISION_PREFIX) :]
            if rest.startswith(("post_layernorm.", "head.")):
                continue  # LLaVA replaces the head by Identity and reads hidden_states[-1]
            if rest.startswith("encoder.layers."):
                if int(rest.split(".")[2]) >= m.vision.layers:
                    continue  # the removed last layer, if a checkpoint still carries it
            out["vision." + rest] = v.float()
        elif k.startswith(PROJECTOR_PREFIX):
            out["projector." + k[len(PROJECTOR_PREFIX) :]] = v.float()
        elif k == NEWLINE_KEY:
            out["image_newline"] = v.float()
        elif k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
            out["lm." + k] = v.float()
        elif k == "lm_head.weight":
            out["lm.lm_head.weight"] = v.float()
    if "lm.lm_head.weight" not in out:
        out["lm.lm_head.weight"] = out["lm.model.embed_tokens.weight"]
    return out
