"""Model shapes: the dimensions of a LLaVA-VLA checkpoint, independent of where it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP trunk *as used*: ``layers`` counts the encoder layers kept (the last one is removed)."""

    hidden: int = 1152
    intermediate: int = 4304
    layers: int = 26
    heads: int = 16
    patch: int = 14
    image_size: int = 384
    layer_norm_eps: float = 1e-6

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder."""

    hidden: int = 896
    intermediate: int = 4864
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    vocab_rows: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    text: TextConfig

    @property
    def image_tokens(self) -> int:
        """Embeddings per image: the projected patches plus one ``image_newline`` row."""
        return self.vision.n_patches + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]))


LLAVA_OV_05B = ModelConfig(VisionConfig(), TextConfig())
"""The real LLaVA-VLA 0.5B shape (SigLIP-so400m-patch14-384 minus one layer + Qwen2-0.5B)."""


# -- what a trainer's config names, and what it means -----------------------------------------------------
# SigLIP towers by the last path component of ``mm_vision_tower`` (a hub name or a local path). Full
# depth: the tower as published; LLaVA-NeXT removes its last layer (``mm_vision_select_layer`` -2).
KNOWN_VISION_TOWERS: dict[str, VisionConfig] = {
    "siglip-so400m-patch14-384": VisionConfig(
        hidden=1152, intermediate=4304, layers=27, heads=16, patch=14, image_size=384, layer_norm_eps=1e-6
    ),
}

# Qwen2 / Qwen2.5 decoders by (hidden, intermediate, kv rows): the head counts that tensors cannot show.
KNOWN_TEXT_MODELS: dict[tuple[int, int, int], dict] = {
    (896, 4864, 128): {"name": "Qwen2-0.5B", "heads": 14, "kv_heads": 2},
    (1536, 8960, 256): {"name": "Qwen2-1.5B", "heads": 12, "kv_heads": 2},
    (3584, 18944, 512): {"name": "Qwen2-7B", "heads": 28, "kv_heads": 4},
}


def tower_name(mm_vision_tower: str) -> str:
    """``google/siglip-so400m-patch14-384`` or ``/data/siglip-so400m-patch14-384/`` -> the table key."""
    return mm_vision_tower.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def vision_from_hf(vc: dict, where: str) -> VisionConfig:
    """A SigLIP vision config in HF field names (``SiglipVisionConfig``): the *full* tower.

    ``num_hidden_layers`` is the published depth (``layers`` here); :func:`kept_layers` turns it into
    the depth LLaVA uses. Every shape field is required: a head count is never guessed.
    """
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
            "image_size")
    missing = [k for k in need if not isinstance(vc.get(k), int) or isinstance(vc.get(k), bool)]
    if missing:
        raise ValueError(f"{where}: vision_config lacks integer {', '.join(missing)}")
    return VisionConfig(
        hidden=vc["hidden_size"],
        intermediate=vc["intermediate_size"],
        layers=vc["num_hidden_layers"],
        heads=vc["num_attention_heads"],
        patch=vc["patch_size"],
        image_size=vc["image_size"],
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
    )


def kept_layers(full_depth: int, select_layer: int) -> int:
    """Encoder layers whose output is the image feature: ``hidden_states[select_layer]`` of the full tower.

    ``hidden_states`` has ``full_depth + 1`` entries (the embeddings, then each layer), so -2 of a
    27-layer tower is the output of layer 26 (26 layers kept), and a positive ``n`` keeps ``n``.
    """
    kept = full_depth + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= kept <= full_depth:
        raise ValueError(f"mm_vision_select_layer {select_layer} does not select a layer of a "
                         f"{full_depth}-layer tower")
    return kept
