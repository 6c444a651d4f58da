"""A bundle on disk: ONNX graphs, token embeddings, tokenizer and ``manifest.json``, verified on load.

Layout (``vla-edge export`` writes it)::

    bundle/
      manifest.json     format version, source hash, every file's sha256, graph IO, token ids,
                        policy statistics, image layout, prompt template ids, versions used
      vision.onnx       pixels -> image_embeds (see vla_edge.export.graphs)
      decoder.onnx      inputs_embeds + KV cache -> cut-head logits + KV cache (manifest
                        ``decoder_kind``: plain or fused; ``max_len``: fused KV buffer rows)
      embeddings.npy    token embedding table (rows, hidden), for assembling prompts on the host
      tokenizer.json    for the instruction (tokenised once per episode)
      parity.json       PyTorch vs exported fp32 vs quantised, on fixed inputs

Pure Python + numpy: this is what the robot loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vla_edge.edge.errors import VlaEdgeError
from vla_edge.edge.prompt import PromptTemplate
from vla_edge.edge.spec import ImageLayout, PolicySpec, TokenSpec

FORMAT = "vla-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(VlaEdgeError):
    """The bundle is missing, of another format version, or its files do not match the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class DecoderDims:
    """What the host needs to drive the decoder: cache shape, embedding width and graph kind.

    ``kind`` is ``"plain"`` (the cache grows by T rows per call) or ``"fused"`` (one preallocated
    buffer of ``max_len`` rows per tensor, shared by past and present; see vla_edge.export.fused).
    Bundles written before the fused graph existed have no ``decoder_kind``: they are plain.
    """

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    image_tokens: int
    kind: str = "plain"
    max_len: int | None = None


@dataclass
class Bundle:
    root: Path
    manifest: dict
    tokens: TokenSpec
    policy: PolicySpec
    layout: ImageLayout
    prompt: PromptTemplate
    dims: DecoderDims

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> Bundle:
        """Read ``manifest.json`` and (by default) check every file's sha256 against it."""
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.exists():
            raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: corrupt manifest: {e}") from None
        if m.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not a vla-edge bundle manifest (format {m.get('format')!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{root}: bundle format version {m.get('format_version')} is not supported by this vla-edge "
                f"(expects {FORMAT_VERSION}); re-export it with this version"
            )
        if verify:
            for name, info in m["files"].items():
                p = root / name
                if not p.exists():
                    raise BundleError(f"{root}: file {name} listed in the manifest is missing")
                if sha256_file(p) != info["sha256"]:
                    raise BundleError(f"{root}: {name} does not match its sha256 in the manifest (corrupt or modified)")
        model = m["model"]
        text = model["text"]
        dims = DecoderDims(
            layers=text["layers"],
            kv_heads=text["kv_heads"],
            head_dim=text["hidden"] // text["heads"],
            hidden=text["hidden"],
            image_tokens=(model["vision"]["image_size"] // model["vision"]["patch"]) ** 2 + 1,
            kind=m.get("decoder_kind", "plain"),
            max_len=m.get("max_len"),
        )
        if dims.kind not in ("plain", "fused") or (dims.kind == "fused" and not dims.max_len):
            raise BundleError(f"{mpath}: unknown decoder kind {dims.kind!r} or fused decoder without max_len")
        return cls(
            root=root,
            manifest=m,
            tokens=TokenSpec.from_dict(m["tokens"]),
            policy=PolicySpec.from_dict(m["policy"]),
            layout=ImageLayout.from_dict(m["image_layout"]),
            prompt=PromptTemplate.from_dict(m["prompt"]),
            dims=dims,
        )

    def path(self, key: str) -> Path:
        """Path of a bundle file by role: 'vision', 'decoder', 'embeddings', 'tokenizer'."""
        return self.root / self.manifest["roles"][key]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def tokenizer_json(self) -> str:
        return self.path("tokenizer").read_text()


def write_manifest(root: Path, manifest: dict) -> None:
    """Fill ``files`` with the sha256 and size of every file in ``root`` and write manifest.json."""
    files = {}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
