"""The ChatML prompt of CONTRACT section 1, built as token ids (never decoded and re-encoded).

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n      <- prefix
    <IMAGE x n_image_tokens>                                          <- image embeddings
    \\n{instruction}[<Navigation>]\\n                                   <- instruction (once per episode)
    {P x D_state}                                                     <- proprio tokens (every step)
    <|im_end|>\\n<|im_start|>assistant\\n                               <- suffix

The fixed pieces are computed at export and stored in the manifest (``prompt``); only
``"\\n" + instruction + "\\n"`` is tokenised at run time, as one string like the reference inference,
once per episode, with the bundle's ``tokenizer.json``. :func:`instruction_refusal` says, before anything
starts, whether an instruction fits the decoder's KV cache::

    if why := instruction_refusal(Bundle.load(path, verify=False), "pick up the red cube"):
        raise VlaEdgeError(why)
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


def kv_rows_needed(prompt: PromptTemplate, instruction_ids: int, image_tokens: int, state_dim: int,
                   chunk_tokens: int, navigation: bool) -> int:
    """KV-cache rows (positions) one step needs at most: the whole prompt (prefix, image, instruction,
    proprio, suffix) and every generated token but the last (``DIR VALUE`` too with navigation, then
    ``<|im_end|>``), whether decoded one at a time or in Jacobi blocks."""
    generated = chunk_tokens + (3 if navigation else 1)
    return len(prompt.prefix) + image_tokens + instruction_ids + state_dim + len(prompt.suffix) + generated - 1


def instruction_refusal(bundle, instruction: str, navigation: bool = False) -> str | None:
    """Why ``instruction`` cannot run on ``bundle`` (a :class:`~vla_edge.edge.bundle.manifest.Bundle`), or None.

    Empty, or too long: its prompt needs more KV rows (:func:`kv_rows_needed`) than the decoder holds (the
    fused graph's ``max_len``; the plain graph's limit is the model's ``max_positions``). Needs only the
    manifest and the tokenizer: ``vla-edge run`` asks before it connects anything.
    """
    if not instruction.strip():
        return "--instruction is empty"
    d, policy = bundle.dims, bundle.policy
    if d.kind == "fused":
        limit, what = d.max_len, "its fused decoder's max_len (re-export with a larger --max-len, or shorten it)"
    else:
        limit = (bundle.manifest.get("model", {}).get("text", {}) or {}).get("max_positions")
        what = "its model's max_positions (shorten it)"
    if not limit:
        return None
    n = len(bundle.prompt.instruction_ids(tokenizer_encoder(bundle.tokenizer_json()), instruction, navigation))
    rows = kv_rows_needed(bundle.prompt, n, d.image_tokens, policy.state_dim, policy.chunk_tokens, navigation)
    if rows <= limit:
        return None
    return (f"--instruction is {len(instruction)} characters, {n} tokens: a step would need {rows} KV rows and this "
            f"bundle holds {limit}, {what}; at most {n - (rows - limit)} tokens fit")


def tokenizer_encoder(tokenizer_json: str) -> TextEncoder:
    """An encoder over a ``tokenizer.json`` (HF tokenizers), without special-token insertion."""
    tok = Tokenizer.from_str(tokenizer_json)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return encode
