"""Tiny LLaVA-VLA checkpoints for tests and the demo: same architecture, small widths, fixed seeds.

The tokenizer is a byte-level BPE trained here on a small fixed corpus (nothing is downloaded). Its
vocabulary size is ``V``; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` follow at V, V+1, V+2
as in Qwen2, bins take the top 256 ids of the base vocabulary (``V-256 .. V-1``), and the navigation
tokens sit in embedding rows that no tokenizer token claims, like the real layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, SYSTEM_PROMPT, TokenSpec, cobot_magic_policy
from vla_edge.edge.telemetry import out_console
from vla_edge.export.config import ModelConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

TINY_MODEL = ModelConfig(
    vision=VisionConfig(hidden=32, intermediate=64, layers=2, heads=2, patch=14, image_size=384),
    text=TextConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab_rows=0, max_positions=2048),
)

_CORPUS_VERBS = ["pick up", "put down", "place", "push", "open", "close", "move", "grasp", "lift", "drive to", "turn"]
_CORPUS_OBJECTS = ["the red cube", "the blue block", "the green cup", "the drawer", "the door", "the towel",
                   "the target", "the bottle", "the table", "the box"]


def _corpus() -> list[str]:
    lines = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"]
    for v in _CORPUS_VERBS:
        for o in _CORPUS_OBJECTS:
            lines.append(f"{v} {o}")
            lines.append(f"\n{v} {o} with the left arm\n")
    return lines


def build_tiny_tokenizer(vocab_size: int = 640) -> str:
    """Train the tiny byte-level BPE and return its ``tokenizer.json`` text (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok.to_str()


def tiny_token_spec(tokenizer_json: str) -> TokenSpec:
    tok = Tokenizer.from_str(tokenizer_json)
    v = tok.token_to_id("<|endoftext|>")
    rows = -(-(v + 3 + 5) // 64) * 64  # specials + navigation rows, rounded up like real tables
    return TokenSpec(
        vocab_base=v,
        endoftext=v,
        im_start=tok.token_to_id("<|im_start|>"),
        im_end=tok.token_to_id("<|im_end|>"),
        newline=tok.encode("\n", add_special_tokens=False).ids[0],
        navigation=rows - 5,
        directions={"forward": rows - 4, "turn_left": rows - 3, "turn_right": rows - 2, "stop": rows - 1},
        embedding_rows=rows,
    )


def make_tiny_checkpoint(seed: int = 0) -> dict:
    """The vla-edge wrapper dict of a tiny random model (see :mod:`vla_edge.export.checkpoint`)."""
    import torch  # torch: the [export] extra
    from vla_edge.export.model import LlavaVLA  # imports torch at its top

    tokenizer_json = build_tiny_tokenizer()
    tokens = tiny_token_spec(tokenizer_json)
    cfg = ModelConfig(TINY_MODEL.vision, TextConfig(**{**TINY_MODEL.text.__dict__, "vocab_rows": tokens.embedding_rows}))
    torch.manual_seed(seed)
    model = LlavaVLA(cfg)
    with torch.no_grad():
        # Random init with enough spread that greedy decisions have margins (not near-ties).
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "layer_norm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0.0, 0.02)
        model.image_newline.normal_(0.0, 0.5)
    policy = cobot_magic_policy()
    return {
        "format": "vla-edge-ckpt",
        "version": 1,
        "state_dict": model.llava_state_dict(),
        "model": cfg.to_dict(),
        "policy": policy.to_dict(),
        "image_layout": COBOT_MAGIC_LAYOUT.to_dict(),
        "tokens": tokens.to_dict(),
        "tokenizer_json": tokenizer_json,
    }


def write_tiny_checkpoint(out: str | Path, seed: int = 0) -> Path:
    import torch  # torch: the [export] extra

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(make_tiny_checkpoint(seed), tmp)
    tmp.replace(out)
    return out


def main(args) -> int:
    path = write_tiny_checkpoint(args.out, seed=args.seed)
    ck = json.dumps(TINY_MODEL.to_dict()["text"])
    out_console().print(f"[green]wrote[/] {path} ({path.stat().st_size / 1e6:.1f} MB, seed {args.seed}; text {ck})")
    return 0
