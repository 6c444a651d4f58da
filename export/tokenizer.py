"""The checkpoint's tokenizer as one ``tokenizer.json`` text, from whatever files the trainer saved.

Usage::

    text = load_tokenizer_json(Path("ckpt/"))          # tokenizer.json, or vocab.json + merges.txt
    text = load_tokenizer_json(Path("tokenizer.json"))

Qwen2 saves ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``, ``added_tokens.json``) and
usually ``tokenizer.json``. Without ``tokenizer.json`` the fast tokenizer is rebuilt here with the
``tokenizers`` library exactly as Qwen2's is defined (NFC, the Qwen2 pre-tokenizer regex, byte-level
BPE, the added special tokens at their saved ids). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from vla_edge import VlaEdgeError

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen2's pre-tokenizer split (transformers ``tokenization_qwen2.PRETOKENIZE_REGEX``)."""


class TokenizerError(VlaEdgeError):
    """The tokenizer files are missing or unreadable."""


def load_tokenizer_json(path: Path) -> str:
    """``tokenizer.json`` text from a file, or from a directory (tokenizer.json or vocab.json + merges.txt)."""
    path = Path(path)
    if path.is_file():
        return _checked(path.read_text(encoding="utf-8"), path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer not found: {path}")
    if (path / "tokenizer.json").is_file():
        return _checked((path / "tokenizer.json").read_text(encoding="utf-8"), path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return qwen2_tokenizer_json(path)
    raise TokenizerError(f"{path}: no tokenizer.json, and no vocab.json + merges.txt to build one from")


def _checked(text: str, where: Path) -> str:
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{where}: not a tokenizers tokenizer.json: {str(e).splitlines()[0][:120]}") from None
    return text


def _added_tokens(d: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the added tokens: ``tokenizer_config.json``, then ``added_tokens.json``."""
    found: dict[int, tuple[str, bool]] = {}
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        for k, v in json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            found[int(k)] = (v["content"], bool(v.get("special", True)))
    extra = d / "added_tokens.json"
    if extra.is_file():
        for content, i in json.loads(extra.read_text(encoding="utf-8")).items():
            found.setdefault(int(i), (content, True))
    return sorted((i, c, s) for i, (c, s) in found.items())


def qwen2_tokenizer_json(d: Path) -> str:
    """Build Qwen2's fast tokenizer from ``vocab.json`` + ``merges.txt`` and its added tokens."""
    try:
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{d}: unreadable vocab.json / merges.txt: {e}") from None
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{d / 'merges.txt'}: every line must hold two symbols separated by one space")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for i, content, special in _added_tokens(d):
        if i in vocab.values():
            continue
        token = AddedToken(content, special=special, normalized=not special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if tok.token_to_id(content) != i:
            raise TokenizerError(f"{d}: added token {content!r} has id {i}, but the vocabulary puts it at "
                                 f"{tok.token_to_id(content)} (added tokens must follow the vocabulary in order)")
    return tok.to_str()
