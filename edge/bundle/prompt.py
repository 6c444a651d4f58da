"""The ChatML prompt of CONTRACT section 1, built as token ids (never decoded and re-encoded).

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n      <- prefix
    <IMAGE x n_image_tokens>                                          <- image embeddings
    \\n{instruction}[<Navigation>]\\n                                   <- instruction (once per episode)
    {P x D_state}                                                     <- proprio tokens (every step)
    <|im_end|>\\n<|im_start|>assistant\\n                               <- suffix

The fixed pieces are computed at export and stored in the manifest (``prompt``); only
``"\\n" + instruction + "\\n"`` is tokenised at run time, as one string like the reference inference,
once per episode, with the bundle's ``tokenizer.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from tokenizers import Tokenizer
from vla_edge.edge.bundle.spec import SYSTEM_PROMPT, TokenSpec


class TextEncoder(Protocol):
    def __call__(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids of the fixed parts. ``newline`` is the id of "\\n"."""

    prefix: list[int]
    suffix: list[int]
    newline: int
    navigation: int

    @classmethod
    def build(cls, encode: TextEncoder, tokens: TokenSpec) -> PromptTemplate:
        prefix = (
            [tokens.im_start]
            + encode("system\n" + SYSTEM_PROMPT)
            + [tokens.im_end]
            + encode("\n")
            + [tokens.im_start]
            + encode("user\n")
        )
        suffix = [tokens.im_end] + encode("\n") + [tokens.im_start] + encode("assistant\n")
        return cls(prefix=prefix, suffix=suffix, newline=tokens.newline, navigation=tokens.navigation)

    def instruction_ids(self, encode: TextEncoder, instruction: str, navigation: bool) -> list[int]:
        """Ids between the image and the proprio tokens: ``\\n{instruction}[<Navigation>]\\n``.

        As the reference inference does, ``"\\n" + instruction + "\\n"`` is tokenised as *one* string,
        the instruction unchanged: Qwen2's pre-tokenizer and merges join a final ``.``, ``!`` or spaces
        with the newline (``".\\n"`` is one token), so encoding the pieces apart would give other ids.
        With navigation, ``<Navigation>`` (an embedding row, not text) splits the string there.
        """
        if navigation:
            return encode("\n" + instruction) + [self.navigation] + encode("\n")
        return encode("\n" + instruction + "\n")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PromptTemplate:
        return cls(**d)


def tokenizer_encoder(tokenizer_json: str) -> TextEncoder:
    """An encoder over a ``tokenizer.json`` (HF tokenizers), without special-token insertion."""
    tok = Tokenizer.from_str(tokenizer_json)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return encode
