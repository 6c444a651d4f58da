"""Loading LLaVA-VLA checkpoints as untrusted input.

Two formats are accepted (README, "Checkpoints"):

* ``best.pt``: ``torch.save`` of a ``llava_qwen`` state dict, either bare or wrapped as::

      {"format": "vla-edge-ckpt", "version": 1,
       "state_dict": {...},            # llava_qwen keys (CONTRACT section 1)
       "model": ModelConfig.to_dict(), # optional; inferred from shapes when absent
       "policy": PolicySpec.to_dict(), "image_layout": ImageLayout.to_dict(),
       "tokens": TokenSpec.to_dict(), "tokenizer_json": "<tokenizer.json text>"}

* an HF ``save_pretrained`` directory: ``config.json`` (model_type ``llava_qwen``),
  ``*.safetensors`` and ``tokenizer.json``; optional ``vla_edge.json`` with the policy, image layout
  and token fields of the wrapper.

Everything is loaded with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused. Missing or mis-shaped tensors are reported by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from vla_edge.edge.errors import VlaEdgeError
from vla_edge.edge.spec import (
    COBOT_MAGIC_LAYOUT,
    QWEN2_TOKENS,
    ImageLayout,
    PolicySpec,
    TokenSpec,
    cobot_magic_policy,
)
from vla_edge.export.config import ModelConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

WRAPPER_FORMAT = "vla-edge-ckpt"
WRAPPER_VERSION = 1

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
NEWLINE_KEY = "model.image_newline"


class CheckpointError(VlaEdgeError):
    """The checkpoint is missing, unreadable, of an unknown kind, or its tensors do not fit."""


@dataclass
class Checkpoint:
    """A validated checkpoint: tensors in llava_qwen naming plus everything export needs."""

    path: Path
    sha256: str
    model: ModelConfig
    state_dict: dict  # str -> torch.Tensor, llava_qwen keys
    policy: PolicySpec
    layout: ImageLayout
    tokens: TokenSpec
    tokenizer_json: str | None


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of every file (sorted by relative name) of a directory."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate ``best.pt`` or an HF directory. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raw = _load_hf_dir(path)
    else:
        raw = _load_pt(path)
    sd = raw["state_dict"]
    model = ModelConfig.from_dict(raw["model"]) if raw.get("model") else infer_model_config(sd)
    validate_state_dict(sd, model)
    tokens = TokenSpec.from_dict(raw["tokens"]) if raw.get("tokens") else QWEN2_TOKENS
    if tokens.embedding_rows != model.text.vocab_rows:
        raise CheckpointError(
            f"token layout has {tokens.embedding_rows} embedding rows but model.embed_tokens has "
            f"{model.text.vocab_rows}"
        )
    policy = PolicySpec.from_dict(raw["policy"]) if raw.get("policy") else None
    if policy is None:
        log.warning("checkpoint carries no policy statistics: using Cobot Magic joint limits as action bounds")
        policy = cobot_magic_policy()
    layout = ImageLayout.from_dict(raw["image_layout"]) if raw.get("image_layout") else COBOT_MAGIC_LAYOUT
    if layout.output != model.vision.image_size:
        raise CheckpointError(
            f"image layout output {layout.output} px does not match the vision tower's {model.vision.image_size} px"
        )
    return Checkpoint(
        path=path,
        sha256=file_sha256(path),
        model=model,
        state_dict=sd,
        policy=policy,
        layout=layout,
        tokens=tokens,
        tokenizer_json=raw.get("tokenizer_json"),
    )


def _load_pt(path: Path) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise CheckpointError(
            f"{path.name}: refused to load: the file holds objects other than tensors and plain data "
            f"(weights_only=True): {first[:160]}"
        ) from None
    except Exception as e:  # torch raises many types for junk files (RuntimeError, IndexError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint: {msg[:160]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a dict (state dict or vla-edge wrapper), got {type(obj).__name__}")
    if obj.get("format") == WRAPPER_FORMAT:
        if obj.get("version") != WRAPPER_VERSION:
            raise CheckpointError(f"{path.name}: wrapper version {obj.get('version')} is not supported (expected 1)")
        if not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{path.name}: wrapper has no 'state_dict' dict")
        return obj
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # common trainer wrapper
        return {"state_dict": obj["state_dict"]}
    return {"state_dict": obj}


def _load_hf_dir(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: directory has no config.json (expected an HF save_pretrained directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    if cfg.get("model_type") != "llava_qwen":
        raise CheckpointError(f"{cfg_path}: unknown model_type {cfg.get('model_type')!r} (expected 'llava_qwen')")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for shard in shards:
        try:
            sd.update(load_file(str(shard)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard.name}: not a readable safetensors file: {e}") from None
    raw: dict = {"state_dict": sd}
    extra = path / "vla_edge.json"
    if extra.exists():
        raw.update(json.loads(extra.read_text()))
    tok = path / "tokenizer.json"
    if tok.exists():
        raw["tokenizer_json"] = tok.read_text()
    if "model" not in raw:
        raw["model"] = _model_from_hf_config(cfg, sd).to_dict()
    return raw


def _model_from_hf_config(cfg: dict, sd: dict) -> ModelConfig:
    inferred = infer_model_config(sd)
    text = TextConfig(
        hidden=cfg.get("hidden_size", inferred.text.hidden),
        intermediate=cfg.get("intermediate_size", inferred.text.intermediate),
        layers=cfg.get("num_hidden_layers", inferred.text.layers),
        heads=cfg.get("num_attention_heads", inferred.text.heads),
        kv_heads=cfg.get("num_key_value_heads", inferred.text.kv_heads),
        vocab_rows=cfg.get("vocab_size", inferred.text.vocab_rows),
        rope_theta=float(cfg.get("rope_theta", inferred.text.rope_theta)),
        rms_norm_eps=cfg.get("rms_norm_eps", inferred.text.rms_norm_eps),
        max_positions=cfg.get("max_position_embeddings", inferred.text.max_positions),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
    )
    vision = inferred.vision
    if isinstance(cfg.get("vision_config"), dict):
        vc = cfg["vision_config"]
        vision = VisionConfig(
            hidden=vc.get("hidden_size", vision.hidden),
            intermediate=vc.get("intermediate_size", vision.intermediate),
            layers=vision.layers,  # the layers actually present
            heads=vc.get("num_attention_heads", vision.heads),
            patch=vc.get("patch_size", vision.patch),
            image_size=vc.get("image_size", vision.image_size),
            layer_norm_eps=vc.get("layer_norm_eps", vision.layer_norm_eps),
        )
    return ModelConfig(vision, text)


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing tensor {key!r}")
    return tuple(sd[key].shape)


def _count_layers(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def infer_model_config(sd: dict) -> ModelConfig:
    """Infer the shape of a bare llava_qwen state dict.

    Head counts cannot be read off weight shapes: they follow the 0.5B family (64-dim text heads,
    72-dim SigLIP heads). Checkpoints of other shapes must use the wrapper and state ``model``.
    """
    if not any(k.startswith("model.layers.") for k in sd):
        raise CheckpointError("not a llava_qwen state dict: no 'model.layers.*' tensors")
    emb_rows, hidden = _shape(sd, "model.embed_tokens.weight")
    inter = _shape(sd, "model.layers.0.mlp.gate_proj.weight")[0]
    kv_dim = _shape(sd, "model.layers.0.self_attn.k_proj.weight")[0]
    v_hidden = _shape(sd, VISION_PREFIX + "embeddings.patch_embedding.weight")[0]
    patch = _shape(sd, VISION_PREFIX + "embeddings.patch_embedding.weight")[-1]
    n_pos = _shape(sd, VISION_PREFIX + "embeddings.position_embedding.weight")[0]
    grid = round(n_pos**0.5)
    text = TextConfig(
        hidden=hidden,
        intermediate=inter,
        layers=_count_layers(sd, "model.layers."),
        heads=hidden // 64,
        kv_heads=kv_dim // 64,
        vocab_rows=emb_rows,
    )
    vision = VisionConfig(
        hidden=v_hidden,
        intermediate=_shape(sd, VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
        layers=_count_layers(sd, VISION_PREFIX + "encoder.layers."),
        heads=max(1, v_hidden // 72),
        patch=patch,
        image_size=grid * patch,
    )
    return ModelConfig(vision, text)


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor export needs, with its shape, in llava_qwen naming."""
    v, t = m.vision, m.text
    shapes: dict[str, tuple[int, ...]] = {
        VISION_PREFIX + "embeddings.patch_embedding.weight": (v.hidden, 3, v.patch, v.patch),
        VISION_PREFIX + "embeddings.patch_embedding.bias": (v.hidden,),
        VISION_PREFIX + "embeddings.position_embedding.weight": (v.n_patches, v.hidden),
        PROJECTOR_PREFIX + "0.weight": (t.hidden, v.hidden),
        PROJECTOR_PREFIX + "0.bias": (t.hidden,),
        PROJECTOR_PREFIX + "2.weight": (t.hidden, t.hidden),
        PROJECTOR_PREFIX + "2.bias": (t.hidden,),
        NEWLINE_KEY: (t.hidden,),
        "model.embed_tokens.weight": (t.vocab_rows, t.hidden),
        "model.norm.weight": (t.hidden,),
    }
    for i in range(v.layers):
        p = f"{VISION_PREFIX}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (v.hidden, v.hidden)
            shapes[p + f"self_attn.{name}.bias"] = (v.hidden,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{ln}.weight"] = (v.hidden,)
            shapes[p + f"{ln}.bias"] = (v.hidden,)
        shapes[p + "mlp.fc1.weight"] = (v.intermediate, v.hidden)
        shapes[p + "mlp.fc1.bias"] = (v.intermediate,)
        shapes[p + "mlp.fc2.weight"] = (v.hidden, v.intermediate)
        shapes[p + "mlp.fc2.bias"] = (v.hidden,)
    kv = t.kv_heads * t.head_dim
    for i in range(t.layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (t.hidden, t.hidden)
        shapes[p + "self_attn.q_proj.bias"] = (t.hidden,)
        shapes[p + "self_attn.k_proj.weight"] = (kv, t.hidden)
        shapes[p + "self_attn.k_proj.bias"] = (kv,)
        shapes[p + "self_attn.v_proj.weight"] = (kv, t.hidden)
        shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (t.hidden, t.hidden)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate, t.hidden)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate, t.hidden)
        shapes[p + "mlp.down_proj.weight"] = (t.hidden, t.intermediate)
        shapes[p + "input_layernorm.weight"] = (t.hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (t.hidden,)
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_rows, t.hidden)
    return shapes


def validate_state_dict(sd: dict, m: ModelConfig) -> None:
    """Check every needed tensor exists with the right shape and a float dtype."""
    import torch

    for key, shape in expected_shapes(m).items():
        if key not in sd:
            raise CheckpointError(f"missing tensor {key!r}")
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{key!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, expected a floating-point type")
    if "lm_head.weight" in sd and tuple(sd["lm_head.weight"].shape) != (m.text.vocab_rows, m.text.hidden):
        raise CheckpointError(
            f"tensor 'lm_head.weight' has shape {tuple(sd['lm_head.weight'].shape)}, "
            f"expected {(m.text.vocab_rows, m.text.hidden)}"
        )
