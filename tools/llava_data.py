"""LLaVA-VLA training data (``data.json``, the JPEGs, ``statistics.yaml``) read and encoded as the reference trainer does.

What ``vla-edge convert`` writes, or any dataset made for LLaVA-VLA's trainer (``llava/train/train_vla.py``,
the Qwen path), becomes token ids and labels exactly as that trainer makes them, so that a tiny model trained
here smoke-tests a dataset before a real training run:

* the conversation as text, one ChatML turn at a time (``<|im_start|>{role}\\n{content}<|im_end|>\\n``, the
  system turn first; ``<image>`` a special token), each turn tokenised on its own and concatenated;
* the gpt turn's floats through ``encode_actions(statistics=None)``: clipped to [-1, 1] and binned as they are
  (``id = V - digitize(x, edges)``); the human turn's last line through ``encode_robot_obs`` with the
  statistics' ``robot_obs``: ``((s - mean) / (std + 1e-5)) / 3``, clipped and binned, **15 values asserted**;
  both replaced by the tokenizer's decoding of their ids before tokenising the turn;
* then the exact ids written over the decoded text's spans (the assistant turn's content, the user turn's
  last line), and labels: the system and user turns ignored except newline, ``<|im_start|>`` and
  ``<|im_end|>`` tokens, the assistant turn learnt whole, the state span ignored.

Target positions: a sample may carry ``target_xy_m`` (``[x, y]`` m, where the simulated target was: ``vla-edge
convert`` copies it from a simulated episode; the reference trainer ignores the key). When every sample has one,
:attr:`LlavaData.targets_xy_m` holds them and ``vla-edge train-tiny`` turns on its training-only target probe
(what the tiny model needs to learn the reach task from scratch); nothing else reads them.

Images: ``images/<id>.jpg`` opened with PIL, RGB, resized to the vision tower's size with PIL BICUBIC (the
SigLIP image processor's resize), scaled to ``(px / 255 - 0.5) / 0.5`` when batched.

The spans are found from the turns' own token boundaries (the text before the numbers, tokenised alone, must
be a prefix of the turn's ids). The reference finds them by the positions of the newline token (the action
span between the last two newlines, the state span between the fourth- and third-last): the same spans
whenever no state or action token is the newline token, true of Qwen2, whose bins are ids 151387..151642,
not of the tiny test tokenizer, whose 256 bins include its newline byte.

Smoke-test a dataset before a real training run (the tiny model, fine-tuned from the shipped policy; then
``vla-edge export --ckpt best.pt --stats data/statistics.yaml --out bundle/`` and ``vla-edge eval``)::

    vla-edge train-tiny --data data/ --out best.pt --steps 400 --lr 1e-3 --init export/data/tiny_policy.pt

Usage (``vla-edge train-tiny --data data/`` does this when the directory holds a ``data.json``)::

    data = LlavaData.load("data/", tokenizer_json, tokens, image_size=384)   # data.json, images/, statistics.yaml
    ids, labels = data.ids[0], data.labels[0]     # the image a single IMAGE_TOKEN_INDEX, as the reference has it
    batch = JsonBatcher(model, data)([0, 1, 2])    # (inputs_embeds, attention_mask, labels, image_embeds, after_image)

Needs Pillow, PyYAML and ``tokenizers``; :class:`JsonBatcher` needs torch (the ``[export]`` extra).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import SYSTEM_PROMPT, TokenSpec
from vla_edge.export.stats import read_statistics

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # llava.constants: where the image embeddings go
IGNORE_INDEX = -100
REFERENCE_STATE_VALUES = 15
"""``encode_robot_obs`` asserts this many state values (CALVIN's ``robot_obs``)."""
EPISODE_ID = re.compile(r"(episode_\d+)_\d+$")


class LlavaDataError(VlaEdgeError):
    """A dataset the reference trainer would stop on, or that cannot be read."""


class ReferenceEncoder:
    """The reference trainer's text path for one tokenizer: ``ActionTokenizer``, ``encode_actions``,
    ``encode_robot_obs`` and ``preprocess_qwen_vla``."""

    def __init__(self, tokenizer_json: str, tokens: TokenSpec, obs_mean, obs_std):
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.add_special_tokens([IMAGE_TOKEN])  # tokenizer.add_tokens(["<image>"], special_tokens=True)
        self.image_id = self.tok.token_to_id(IMAGE_TOKEN)
        self.tokens, self.edges = tokens, tokens.bin_edges
        self.mean, self.std = np.asarray(obs_mean, np.float64), np.asarray(obs_std, np.float64)

    def _bins(self, values: np.ndarray) -> tuple[list[int], str]:
        """``ActionTokenizer.__call__``: clip to [-1, 1], digitize, ids below V, and their decoded text."""
        ids = (self.tokens.vocab_base - np.digitize(np.clip(values, -1.0, 1.0), self.edges)).tolist()
        return ids, self.tok.decode(ids, skip_special_tokens=False)

    def encode_actions(self, sentence: str) -> tuple[list[int], str]:
        return self._bins(np.array([float(a) for a in sentence.split(" ")]))

    def encode_robot_obs(self, sentence: str) -> tuple[list[int], str]:
        values = sentence.split(" ")
        if len(values) != REFERENCE_STATE_VALUES:
            raise LlavaDataError(f"the state line has {len(values)} values; the reference trainer's encode_robot_obs "
                                 f"asserts {REFERENCE_STATE_VALUES} (convert pads a shorter state)")
        obs = (np.array([float(v) for v in values]) - self.mean) / (self.std + 1e-5)
        return self._bins(obs / 3.0)

    def _turn(self, role: str, content: str) -> list[int]:
        return self.tok.encode(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False).ids

    def conversation(self, conversations: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one sample's conversation, the image a single ``IMAGE_TOKEN_INDEX``."""
        ids = self._turn("system", SYSTEM_PROMPT)
        labels = [IGNORE_INDEX] * len(ids)
        spans = []  # (start, end, exact ids, learnt)
        tail = len(self.tok.encode("<|im_end|>\n", add_special_tokens=False).ids)
        for turn in conversations:
            gpt = turn["from"] == "gpt"
            if gpt:
                role, head = "assistant", ""
                exact, text = self.encode_actions(turn["value"])
            else:
                role, parts = "user", turn["value"].split("\n")
                head = "\n".join(parts[:-1]) + "\n"
                exact, numbers = self.encode_robot_obs(parts[-1])
                text = head + numbers
            enc = self._turn(role, text)
            lead = self.tok.encode(f"<|im_start|>{role}\n{head}", add_special_tokens=False).ids
            if enc[: len(lead)] != lead:
                raise LlavaDataError(f"the {role} turn's text and numbers do not tokenise apart")
            spans.append((len(ids) + len(lead), len(ids) + len(enc) - tail, exact, gpt))
            ids += enc
            labels += enc if gpt else [IGNORE_INDEX] * len(enc)
        if [s[3] for s in spans] != [False, True]:
            raise LlavaDataError("a sample is one human turn (image, instruction, state) and one gpt turn (actions)")
        v, nl_id = self.tokens.vocab_base, self.tokens.newline
        if not v - self.tokens.n_bins <= nl_id < v:  # the reference's newline search is meaningful: it must agree
            nl = [i for i, t in enumerate(ids) if t == nl_id]
            if len(nl) < 4 or [(nl[-4] + 1, nl[-3] - 1), (nl[-2] + 1, nl[-1] - 1)] != [s[:2] for s in spans]:
                raise LlavaDataError("the reference trainer locates the state and the actions by the newline tokens "
                                     "and would misplace them here (an instruction that ends in punctuation or a "
                                     "space, or holds a newline): it would train on another prompt")
        keep = (self.tokens.newline, self.tokens.im_start, self.tokens.im_end)
        for i, t in enumerate(ids):
            if t in keep:
                labels[i] = t
            if t == self.image_id:
                ids[i] = IMAGE_TOKEN_INDEX
        for start, end, exact, learnt in reversed(spans):  # the later span first: the earlier one's indices hold
            ids[start:end] = exact
            labels[start:end] = exact if learnt else [IGNORE_INDEX] * len(exact)
        return ids, labels


@dataclass
class LlavaData:
    """Every sample of a LLaVA-VLA dataset: the model's image (uint8, S x S x 3), ids and labels."""

    root: Path
    images: np.ndarray  # (n, S, S, 3) uint8: the JPEG resized as the trainer's image processor does
    ids: list[list[int]] = field(repr=False)
    labels: list[list[int]] = field(repr=False)
    sample_ids: list[str] = field(repr=False)
    targets_xy_m: np.ndarray | None = field(default=None, repr=False)
    """(n, 2) each sample's ``target_xy_m`` when every sample has one (simulated data), else None: train-tiny's
    target probe stays off."""

    @property
    def episodes(self) -> int:
        """Episodes named by the sample ids (``episode_<n>_<tick>``, as convert writes them); 0 if none are."""
        return len({m.group(1) for m in map(EPISODE_ID.match, self.sample_ids) if m})

    @classmethod
    def load(cls, root: str | Path, tokenizer_json: str, tokens: TokenSpec, image_size: int,
             stats_path: str | Path | None = None, progress=None) -> LlavaData:
        """Read ``root/data.json``, its images and ``statistics.yaml`` (or ``stats_path``); one-line errors."""
        from PIL import Image  # Pillow: the [export] extra (the reference trainer's image reader)

        root = Path(root)
        try:
            samples = json.loads((root / "data.json").read_text())
        except (OSError, ValueError) as e:
            raise LlavaDataError(f"{root / 'data.json'}: {e}") from None
        stats = read_statistics(Path(stats_path) if stats_path else root / "statistics.yaml")
        enc = ReferenceEncoder(tokenizer_json, tokens, stats.proprio_mean, stats.proprio_std)
        if not isinstance(samples, list) or not samples:
            raise LlavaDataError(f"{root / 'data.json'}: no samples")
        # one array filled in place: a list of per-sample arrays stacked at the end held every image twice
        images = np.empty((len(samples), image_size, image_size, 3), np.uint8)
        ids, labels, names, targets = [], [], [], []
        for k, s in enumerate(samples):
            try:
                a, b = enc.conversation(s["conversations"])
                target = s.get("target_xy_m")
                if target is not None:
                    target = [float(v) for v in target]
                    if len(target) != 2 or not np.all(np.isfinite(target)):
                        raise ValueError(f"target_xy_m {s['target_xy_m']!r} is not a finite [x, y]")
                with Image.open(root / s["image"]) as im:
                    px = im.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise LlavaDataError(f"{root / 'data.json'}: sample {k} ({s.get('id', '?')}): {e}") from None
            except LlavaDataError as e:
                raise LlavaDataError(f"{root / 'data.json'}: sample {k} ({s.get('id', '?')}): {e}") from None
            images[k] = np.asarray(px, np.uint8)
            ids.append(a)
            labels.append(b)
            names.append(str(s.get("id", k)))
            targets.append(target)
            if progress is not None:
                progress()
        known = all(t is not None for t in targets)
        return cls(root, images, ids, labels, names, np.asarray(targets, np.float64) if known else None)


class JsonBatcher:
    """A batch of :class:`LlavaData` samples for :func:`vla_edge.tools.train_tiny.loss_of`: the image
    embeddings spliced in at the image token (labels ignored there), right-padded; and per sample the first
    position after the image (the target probe reads the decoder only where the image is in view)."""

    def __init__(self, model, data: LlavaData):
        self.model, self.data = model, data
        self.split = [ids.index(IMAGE_TOKEN_INDEX) for ids in data.ids]

    def __call__(self, idx):
        import torch  # torch: the [export] extra

        m, d = self.model, self.data
        pixels = torch.from_numpy(d.images[idx]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        image = m.image_embeds(pixels)  # (B, image tokens, H)
        rows, labels = [], []
        for b, i in enumerate(idx):
            ids, lab, p = d.ids[i], d.labels[i], self.split[i]
            rows.append(torch.cat([m.embed_tokens(torch.tensor(ids[:p])), image[b],
                                   m.embed_tokens(torch.tensor(ids[p + 1:]))]))
            labels.append(lab[:p] + [IGNORE_INDEX] * image.shape[1] + lab[p + 1:])
        width = max(len(r) for r in rows)
        embeds = torch.zeros((len(idx), width, rows[0].shape[1]))
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        full = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        for b, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            embeds[b, : len(r)], attn[b, : len(r)], full[b, : len(lab)] = r, 1, torch.tensor(lab)
        after_image = torch.tensor([self.split[i] + image.shape[1] for i in idx])
        return embeds, attn, full, image, after_image
