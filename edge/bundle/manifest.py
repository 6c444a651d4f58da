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

Checks at load, in order, all before a robot connects (each a one-line :class:`BundleError`):

1. ``format`` and ``format_version`` (an int equal to :data:`FORMAT_VERSION`);
2. **manifest integrity**: ``manifest_sha256`` is the sha256 of the canonical JSON of every other key
   (:func:`manifest_digest`: sorted keys, no whitespace, UTF-8). It detects an edited or corrupted
   manifest (a changed ``action_hi``, a truncated file); it does **not** protect against someone who
   edits the manifest and recomputes the hash (it is a checksum, not a signature). Manifests written
   before this key existed are refused with "re-export";
3. the **schema** (:func:`check_manifest`): types and ranges of the known keys, roles naming listed
   files only, head ids consistent with the token spec and the decoder's logits width; unknown extra
   keys are allowed (newer exporters add fields);
4. every listed file's sha256 (``verify=True``).

Usage::

    bundle = Bundle.load("bundle/")            # raises BundleError with one line on any problem
    check_replaceable(Path("bundle/"), keep=[Path("best.pt")])   # before ``export --force`` deletes it
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.prompt import PromptTemplate
from vla_edge.edge.bundle.spec import (
    ACTION_ENCODINGS,
    DIRECTIONS,
    RESIZE_ORDERS,
    ImageLayout,
    PolicySpec,
    TokenSpec,
)

FORMAT = "vla-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH_KEY = "manifest_sha256"
ROLES = ("vision", "decoder", "embeddings", "tokenizer")


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
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise BundleError(f"{mpath}: not a vla-edge bundle manifest (format {got!r})")
        version = m.get("format_version")
        if type(version) is not int:
            raise BundleError(f"{mpath}: format_version must be the integer {FORMAT_VERSION}, got {version!r}")
        if version != FORMAT_VERSION:
            raise BundleError(f"{root}: bundle format version {version} is not supported by this vla-edge "
                              f"(it reads version {FORMAT_VERSION}); re-export it with this version")
        if MANIFEST_HASH_KEY not in m:
            raise BundleError(f"{mpath}: no {MANIFEST_HASH_KEY} (written by an older vla-edge); re-export the bundle")
        if m[MANIFEST_HASH_KEY] != manifest_digest(m):
            raise BundleError(f"{mpath}: content does not match its {MANIFEST_HASH_KEY} (edited or corrupt); "
                              "re-export the bundle")
        problem = check_manifest(m)
        if problem:
            raise BundleError(f"{mpath}: {problem}")
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
    manifest.pop(MANIFEST_HASH_KEY, None)
    manifest[MANIFEST_HASH_KEY] = manifest_digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_digest(manifest: dict) -> str:
    """sha256 (hex) of the canonical JSON of every key but ``manifest_sha256``: sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def check_replaceable(out: Path, keep: Iterable[Path] = ()) -> None:
    """Refuse (one line) to let ``export --force`` delete ``out`` unless it is a vla-edge bundle directory.

    Never the current directory or one above it, never a directory holding a path in ``keep`` (the
    checkpoint being exported), never a file or a link, never a directory whose ``manifest.json`` does
    not say ``format: vla-edge-bundle``. A path that does not exist is fine.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    why = "--force replaces only a vla-edge bundle directory"
    if out.is_symlink() or not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory: refusing to replace it ({why})")
    here = out.resolve()
    cwd = Path.cwd().resolve()
    if here == cwd or here in cwd.parents:
        raise BundleError(f"{out} is the current directory or above it: refusing to replace it ({why})")
    for k in keep:
        k = Path(k).resolve()
        if here == k or here in k.parents:
            raise BundleError(f"{out} holds {k.name}, the checkpoint being exported: refusing to replace it")
    try:
        fmt = json.loads((out / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise BundleError(f"{out} is not a vla-edge bundle (no {MANIFEST} saying format {FORMAT!r}): "
                          f"refusing to replace it ({why})")


def _int(v, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _reals(v, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(type(x) in (int, float) and math.isfinite(x) for x in v))


def _pos(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0


def check_manifest(m: dict) -> str | None:
    """The first schema problem of a parsed manifest as one phrase (``None`` when it is valid).

    Strict on the keys vla-edge reads, tolerant of extra ones.
    """
    for key, kind in (("files", dict), ("roles", dict), ("model", dict), ("tokens", dict), ("policy", dict),
                      ("image_layout", dict), ("prompt", dict), ("head_ids", list), ("precision", str)):
        if not isinstance(m.get(key), kind):
            return f"{key}: expected a {kind.__name__}, got {type(m.get(key)).__name__}"
    for name, info in m["files"].items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"files: {name!r} is not a plain file name"
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and len(info["sha256"]) == 64
                and _int(info.get("bytes"))):
            return f"files.{name}: expected {{sha256: 64 hex digits, bytes: int >= 0}}"
    for role in ROLES:
        if m["roles"].get(role) not in m["files"]:
            return f"roles.{role}: {m['roles'].get(role)!r} is not a file listed in the manifest"
    return (_check_model(m["model"]) or _check_tokens(m["tokens"], m["head_ids"], m.get("graphs"))
            or ("bin_edges" in m and _check_bin_edges(m["bin_edges"], m["tokens"].get("n_bins", 256)) or None)
            or _check_policy(m["policy"]) or _check_layout(m["image_layout"]) or _check_prompt(m["prompt"])
            or _check_decoder(m))


def _check_model(model: dict) -> str | None:
    for part, keys in (("vision", ("hidden", "intermediate", "layers", "heads", "patch", "image_size")),
                       ("text", ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab_rows"))):
        d = model.get(part)
        if not isinstance(d, dict):
            return f"model.{part}: expected a dict"
        for k in keys:
            if not _int(d.get(k), 1):
                return f"model.{part}.{k}: expected an int >= 1, got {d.get(k)!r}"
    text = model["text"]
    if text["hidden"] % text["heads"] or text["heads"] % text["kv_heads"]:
        return "model.text: hidden must be a multiple of heads, and heads of kv_heads"
    return None


def _check_tokens(t: dict, head_ids: list, graphs) -> str | None:
    for k in ("vocab_base", "endoftext", "im_start", "im_end", "newline", "navigation", "embedding_rows"):
        if not _int(t.get(k)):
            return f"tokens.{k}: expected an int >= 0, got {t.get(k)!r}"
    dirs = t.get("directions")
    if not isinstance(dirs, dict) or any(not _int(dirs.get(d)) for d in DIRECTIONS):
        return f"tokens.directions: expected an int id for each of {', '.join(DIRECTIONS)}"
    n_bins = t.get("n_bins", 256)
    if not _int(n_bins, 2) or n_bins > t["vocab_base"]:
        return f"tokens.n_bins: expected an int in 2..vocab_base, got {n_bins!r}"
    ids = [t[k] for k in ("vocab_base", "im_start", "im_end", "newline", "navigation")] + [dirs[d] for d in DIRECTIONS]
    if max(ids) >= t["embedding_rows"]:
        return f"tokens: an id is beyond embedding_rows {t['embedding_rows']}"
    want = [*range(t["vocab_base"] - n_bins, t["vocab_base"]), t["im_end"], *(dirs[d] for d in DIRECTIONS)]
    if head_ids != want:
        return (f"head_ids ({len(head_ids)} ids) do not match tokens (n_bins {n_bins} bins below vocab_base "
                f"{t['vocab_base']}, then im_end and the {len(DIRECTIONS)} directions: {len(want)} ids)")
    if "bins" in t and not isinstance(t["bins"], str):
        return f"tokens.bins: expected a name (uniform, norm), got {t['bins']!r}"
    return _check_width(graphs, head_ids)


def _check_bin_edges(edges, n_bins: int) -> str | None:
    if not (_reals(edges, n_bins) and all(a < b for a, b in zip(edges, edges[1:], strict=False))
            and -1.0 <= edges[0] and edges[-1] <= 1.0):
        return f"bin_edges: expected {n_bins} ascending numbers in [-1, 1]"
    return None


def _check_width(graphs, head_ids: list) -> str | None:
    try:
        width = graphs["decoder"]["outputs"]["logits"][-1]
    except (TypeError, KeyError, IndexError):
        return None
    if type(width) is int and width != len(head_ids):  # usually symbolic ("n_head")
        return f"graphs.decoder.outputs.logits: width {width!r} but {len(head_ids)} head ids"
    return None


def _check_policy(p: dict) -> str | None:
    for k in ("chunk_size", "action_dim", "state_dim"):
        if not _int(p.get(k), 1):
            return f"policy.{k}: expected an int >= 1, got {p.get(k)!r}"
    for k, n in (("action_lo", p["action_dim"]), ("action_hi", p["action_dim"]), ("proprio_mean", p["state_dim"]),
                 ("proprio_std", p["state_dim"])):
        if not _reals(p.get(k), n):
            return f"policy.{k}: expected {n} finite numbers"
    actions = p.get("actions", "bounds")  # absent: a bundle from before the field, decoded min-max as then
    if actions not in ACTION_ENCODINGS:
        return f"policy.actions: expected one of {', '.join(ACTION_ENCODINGS)}, got {actions!r}"
    if actions == "bounds" and any(lo >= hi for lo, hi in zip(p["action_lo"], p["action_hi"], strict=True)):
        return "policy: every action_lo must be below its action_hi"
    if actions == "sigma3" and any(std < 0 for std in p["action_lo"]):
        return "policy.action_lo: holds the std under sigma3 (the reference's field swap), must be >= 0"
    pad = p.get("state_pad", [])
    if not (isinstance(pad, list) and _reals(pad, len(pad)) and len(pad) < p["state_dim"]):
        return f"policy.state_pad: expected fewer than state_dim ({p['state_dim']}) finite numbers"
    if any(s < 0 for s in p["proprio_std"]):
        return "policy.proprio_std: must be >= 0"
    for k in ("d_max_m", "theta_max_deg"):
        if k in p and not _pos(p[k]):
            return f"policy.{k}: expected a number > 0, got {p[k]!r}"
    return None


def _check_layout(lay: dict) -> str | None:
    for k in ("canvas_w", "canvas_h", "output"):
        if not _int(lay.get(k, 384), 1):
            return f"image_layout.{k}: expected an int >= 1, got {lay.get(k)!r}"
    tiles = lay.get("tiles")
    if not isinstance(tiles, list) or not tiles:
        return "image_layout.tiles: expected a non-empty list"
    for i, tile in enumerate(tiles):
        if not (isinstance(tile, dict) and isinstance(tile.get("camera"), str) and _int(tile.get("x"))
                and _int(tile.get("y")) and _int(tile.get("w"), 1) and _int(tile.get("h"), 1)):
            return f"image_layout.tiles[{i}]: expected {{camera: str, x, y: int >= 0, w, h: int >= 1}}"
        if tile["x"] + tile["w"] > lay["canvas_w"] or tile["y"] + tile["h"] > lay["canvas_h"]:
            return f"image_layout.tiles[{i}] ({tile['camera']}) does not fit on the canvas"
    if lay.get("resize_order", "pillow13") not in RESIZE_ORDERS:  # absent: a bundle from before the field
        return f"image_layout.resize_order: expected one of {', '.join(RESIZE_ORDERS)}, got {lay['resize_order']!r}"
    return None


def _check_prompt(pr: dict) -> str | None:
    for k in ("prefix", "suffix"):
        if not (isinstance(pr.get(k), list) and all(_int(x) for x in pr[k])):
            return f"prompt.{k}: expected a list of token ids"
    return None


def _check_decoder(m: dict) -> str | None:
    kind = m.get("decoder_kind", "plain")
    if kind not in ("plain", "fused"):
        return f"decoder_kind: expected 'plain' or 'fused', got {kind!r}"
    if kind == "fused" and not _int(m.get("max_len"), 1):
        return f"max_len: a fused decoder needs an int >= 1, got {m.get('max_len')!r}"
    return None
