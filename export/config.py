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
