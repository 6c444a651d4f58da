"""Loading LLaVA-VLA checkpoints as untrusted input, as the trainer writes them.

Usage::

    ckpt = load_checkpoint("ckpt_dir/", LoadOptions(stats=Path("statistics.yaml")))

Accepted (README, "Checkpoints"):

* an HF ``save_pretrained`` directory of LLaVA-NeXT's ``LlavaQwenForCausalLM`` (what LLaVA-VLA training
  writes): ``config.json`` with the Qwen2 fields at top level and the ``mm_*`` fields (``model_type``
  ``llava_qwen``, or ``llava`` with ``architectures`` naming ``LlavaQwenForCausalLM``; no vision config),
  ``model.safetensors`` or shards with ``model.safetensors.index.json`` (bf16, fp16 or fp32), and
  ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; optionally ``statistics.yaml`` and ``vla_edge.json``
  (``policy``, ``image_layout``, ``tokens``, ``vision_config``) beside them.
* ``best.pt``: ``torch.save`` of a ``llava_qwen`` state dict, bare (or ``{"state_dict": ...}``) or wrapped::

      {"format": "vla-edge-ckpt", "version": 1,
       "state_dict": {...},             # llava_qwen keys (CONTRACT section 1)
       "config": {...},                 # optional: the trainer's config.json
       "model": ModelConfig.to_dict(),  # optional: the exact shape (vision "layers" = layers used)
       "policy": PolicySpec.to_dict(), "image_layout": ImageLayout.to_dict(),
       "tokens": TokenSpec.to_dict(), "tokenizer_json": "<tokenizer.json text>"}

Shapes come from ``model``, else ``config`` / config.json, else the tensors; what tensors cannot show
(head counts, image size) comes from a config, the tower's own config.json, or the known-model tables in
:mod:`vla_edge.export.config`, never from a guess. Statistics (``--stats``) and the tokenizer
(``--tokenizer``) may come from the command line. Everything is loaded with
``torch.load(..., weights_only=True)``; missing or mis-shaped tensors are reported by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenizers import Tokenizer
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import (
    ACTION_ENCODINGS,
    BIN_KINDS,
    CALVIN_LAYOUT,
    COBOT_MAGIC_LAYOUT,
    RESIZE_ORDERS,
    ImageLayout,
    PolicySpec,
    TokenSpec,
)
from vla_edge.export.config import (
    KNOWN_TEXT_MODELS,
    KNOWN_VISION_TOWERS,
    ModelConfig,
    TextConfig,
    VisionConfig,
    kept_layers,
    tower_name,
    vision_from_hf,
)
from vla_edge.export.stats import DatasetStats, read_statistics
from vla_edge.export.tokenizer import load_tokenizer_json

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
    actions_from: str = ""  # where the action encoding (policy.actions) was read, for the export's report


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


LAYOUTS = {"cobot_magic": COBOT_MAGIC_LAYOUT, "calvin": CALVIN_LAYOUT}
"""Named image layouts (``--layout``); a checkpoint or ``vla_edge.json`` may carry any other."""


@dataclass
class LoadOptions:
    """What the user adds to a checkpoint on the command line (each wins over the checkpoint's own)."""

    stats: Path | None = None  # statistics.yaml (LLaVA-VLA dataset format), see vla_edge.export.stats
    tokenizer: Path | None = None  # tokenizer.json, or a directory with it or with vocab.json + merges.txt
    layout: str | None = None  # a LAYOUTS name
    vision_tower: str | None = None  # a known tower name or a local SigLIP directory (for a bare best.pt)
    bins: str | None = None  # BIN_KINDS: uniform (default) or norm (the reference's use_norm_bins)
    resize_order: str | None = None  # RESIZE_ORDERS: the Pillow order of the training images' resize passes
    actions: str | None = None  # ACTION_ENCODINGS: how training encoded the actions (raw, bounds, sigma3)
    defaults: dict = field(default_factory=dict)  # wrapper fields to use where the checkpoint has none


def bundle_defaults(bundle) -> dict:
    """A bundle's statistics, layout, tokens and tokenizer as :attr:`LoadOptions.defaults`: what a
    baseline run needs of a checkpoint that came without them (the bundle was exported with them)."""
    return {"policy": bundle.policy.to_dict(), "image_layout": bundle.layout.to_dict(),
            "tokens": bundle.tokens.to_dict(), "tokenizer_json": bundle.tokenizer_json()}


def load_checkpoint(path: str | Path, opts: LoadOptions | None = None) -> Checkpoint:
    """Load and validate ``best.pt`` or an HF directory. Raises :class:`CheckpointError`.

    The small inputs (``opts``) are read and checked first, so a mistake there is reported before
    gigabytes of weights are read.
    """
    opts = opts or LoadOptions()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if opts.layout is not None and opts.layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {opts.layout!r} (known: {', '.join(LAYOUTS)})")
    if opts.resize_order is not None and opts.resize_order not in RESIZE_ORDERS:
        raise CheckpointError(f"unknown resize order {opts.resize_order!r} (known: {', '.join(RESIZE_ORDERS)})")
    if opts.bins is not None and opts.bins not in BIN_KINDS:
        raise CheckpointError(f"unknown bin kind {opts.bins!r} (known: {', '.join(BIN_KINDS)})")
    if opts.actions is not None and opts.actions not in ACTION_ENCODINGS:
        raise CheckpointError(f"unknown action encoding {opts.actions!r} (known: {', '.join(ACTION_ENCODINGS)})")
    stats = read_statistics(opts.stats) if opts.stats else None
    tokenizer_json = load_tokenizer_json(opts.tokenizer) if opts.tokenizer else None
    raw = _load_hf_meta(path) if path.is_dir() else _load_pt(path)
    for key, value in opts.defaults.items():
        if not raw.get(key) and not (key == "policy" and raw.get("stats_path")):
            raw[key] = value
    if stats is None and raw.get("stats_path"):
        stats = read_statistics(raw["stats_path"])
    actions, actions_from = _action_encoding(raw, stats, opts, path)
    if path.is_dir():  # what the command line must add is known before gigabytes of weights are read
        if stats is None and not raw.get("policy"):
            _policy(raw, None, path, actions)  # raises, naming --stats
        if stats is not None:
            _policy({}, stats, path, actions)  # the statistics under this encoding: checked now
        if tokenizer_json is None and not raw.get("tokenizer_json"):
            raise _no_tokenizer(path)
        raw["state_dict"] = _read_safetensors(path)
    sd = raw["state_dict"]
    model = _model_config(raw, sd, opts)
    validate_state_dict(sd, model)
    tokenizer_json = tokenizer_json or raw.get("tokenizer_json")
    if tokenizer_json is None:
        raise _no_tokenizer(path)
    tokens = (TokenSpec.from_dict(raw["tokens"]) if raw.get("tokens")
              else tokens_from_tokenizer(tokenizer_json, model.text.vocab_rows))
    bins = opts.bins or ("norm" if raw.get("use_norm_bins") else None)
    if bins:
        tokens = replace(tokens, bins=bins)
    if tokens.embedding_rows != model.text.vocab_rows:
        raise CheckpointError(
            f"token layout has {tokens.embedding_rows} embedding rows but model.embed_tokens has "
            f"{model.text.vocab_rows}"
        )
    policy = _policy(raw, stats, path, actions)
    layout = _layout(raw, stats, opts, policy)
    layout = replace(layout, resize_order=_resize_order(raw, stats, opts, path))
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
        tokenizer_json=tokenizer_json,
        actions_from=actions_from,
    )


def _no_tokenizer(path: Path) -> CheckpointError:
    return CheckpointError(f"{path.name} carries no tokenizer: give --tokenizer DIR_OR_FILE (tokenizer.json, "
                           "or the directory with vocab.json + merges.txt the trainer saved)")


ACTION_DECODING = {"raw": "bin centre = action", "bounds": "(x + 1) / 2 * (act_max_bound - act_min_bound) + "
                   "act_min_bound", "sigma3": "3 x act_min_bound + act_max_bound (std, mean as the reference reads them)"}


def _action_encoding(raw: dict, stats: DatasetStats | None, opts: LoadOptions, path: Path) -> tuple[str, str]:
    """How training encoded the actions, and where that was read: ``--actions`` > the data's ``vla_edge.json``
    (``actions``, as ``vla-edge convert`` writes it) > the checkpoint's ``actions`` (its ``vla_edge.json`` or
    wrapper; or its ``policy.actions``) > for a trainer directory or a bare state dict, the reference trainer's
    ``raw`` (``encode_actions(statistics=None)``) > for a vla-edge wrapper's policy from before the field,
    ``bounds`` (what it was trained with)."""
    own = raw.get("policy") if isinstance(raw.get("policy"), dict) else {}
    for value, source in ((opts.actions, "--actions"),
                          (stats.actions if stats is not None else None, f"{stats.path.parent / 'vla_edge.json'}"
                           if stats is not None else ""),
                          (raw.get("actions"), f"{path.name}'s actions"),
                          (own.get("actions"), f"{path.name}'s policy")):
        if value is not None:
            if value not in ACTION_ENCODINGS:
                raise CheckpointError(f"{source}: unknown action encoding {value!r} (known: "
                                      f"{', '.join(ACTION_ENCODINGS)})")
            return value, source
    if path.is_dir() or not own:
        return "raw", "the reference trainer's default, encode_actions(statistics=None)"
    return "bounds", f"{path.name}'s policy, from before action encodings were recorded"


def _policy(raw: dict, stats: DatasetStats | None, path: Path, actions: str) -> PolicySpec:
    """Statistics: ``--stats`` (or a statistics.yaml in the directory) over the checkpoint's own, read under
    the action encoding ``actions``."""
    own = PolicySpec.from_dict(raw["policy"]) if raw.get("policy") else None
    if stats is None:
        if own is None:
            raise CheckpointError(
                f"{path.name} carries no normalisation statistics: give --stats statistics.yaml (the dataset's "
                "act_min_bound, act_max_bound and robot_obs, as LLaVA-VLA training wrote them)")
        return replace(own, actions=actions)
    if own is None:
        return stats.policy(actions=actions)
    new = stats.policy(chunk_size=own.chunk_size, d_max_m=own.d_max_m, theta_max_deg=own.theta_max_deg,
                       actions=actions)
    for key, what in (("action_dim", "action dimensions"), ("state_dim", "state dimensions")):
        if getattr(new, key) != getattr(own, key):
            raise CheckpointError(
                f"{stats.path.name} has {getattr(new, key)} {what} but the checkpoint was trained with "
                f"{getattr(own, key)} (chunk {own.chunk_size} x {own.action_dim} = {own.chunk_tokens} action tokens, "
                f"{own.state_dim} proprio tokens)")
    return new


def _layout(raw: dict, stats: DatasetStats | None, opts: LoadOptions, policy: PolicySpec) -> ImageLayout:
    """``--layout`` > the statistics' ``vla_edge.json`` > the checkpoint's > by the action width."""
    if opts.layout:
        return LAYOUTS[opts.layout]
    if stats is not None and stats.layout is not None:
        return stats.layout
    if raw.get("image_layout"):
        return ImageLayout.from_dict(raw["image_layout"])
    name = "calvin" if policy.action_dim == 7 else "cobot_magic"
    log.info("image layout: %s (%s), chosen for %d action dimensions; --layout to change it",
             name, ", ".join(LAYOUTS[name].cameras), policy.action_dim)
    return LAYOUTS[name]


def _resize_order(raw: dict, stats: DatasetStats | None, opts: LoadOptions, path: Path) -> str:
    """The order of PIL's resize passes the training images were made with: ``--resize-order`` > the order
    recorded with the data (``vla_edge.json``, as ``vla-edge convert`` writes it) or in the checkpoint > for a
    trainer directory, the LLaVA-VLA reference era's (Pillow < 13: ``pillow-pre13``) > Pillow 13's."""
    recorded = [d.get("resize_order") for d in ((stats.sidecar.get("image_layout") if stats else None),
                                                raw.get("image_layout")) if isinstance(d, dict)]
    order = opts.resize_order or next((o for o in recorded if o), None)
    if order is None:
        order = "pillow-pre13" if path.is_dir() else "pillow13"
        log.info("image resize order: %s (%s); --resize-order to change it", order,
                 "a trainer directory: the reference's Pillow < 13" if path.is_dir() else "Pillow 13")
    return order


def tokens_from_tokenizer(tokenizer_json: str, embedding_rows: int) -> TokenSpec:
    """The Qwen2 token layout read off a tokenizer: bins below ``<|endoftext|>``, navigation in free rows.

    ``vocab_base`` is the base vocabulary size (the reference's ``tokenizer.vocab_size``); the four
    direction tokens take rows ``embedding_rows - 5 .. - 2`` and ``<Navigation>`` the row before,
    which must lie above every id the tokenizer can produce (151930.. for the 0.5B's 151936 rows).
    """
    tok = Tokenizer.from_str(tokenizer_json)
    ids = {name: tok.token_to_id(name) for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise CheckpointError(f"the tokenizer has no {', '.join(missing)} token (not a Qwen2 ChatML tokenizer)")
    newline = tok.encode("\n", add_special_tokens=False).ids
    if len(newline) != 1:
        raise CheckpointError(f"the tokenizer encodes a newline as {len(newline)} tokens (expected 1)")
    top = max(tok.get_vocab(with_added_tokens=True).values())
    nav = embedding_rows - 6
    if nav <= top:
        raise CheckpointError(
            f"the embedding table has {embedding_rows} rows and the tokenizer uses ids up to {top}: no free rows for "
            "the navigation tokens; give 'tokens' in vla_edge.json")
    return TokenSpec(
        vocab_base=tok.get_vocab_size(with_added_tokens=False),
        endoftext=ids["<|endoftext|>"],
        im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"],
        newline=newline[0],
        navigation=nav,
        directions={d: nav + 1 + k for k, d in enumerate(("forward", "turn_left", "turn_right", "stop"))},
        embedding_rows=embedding_rows,
    )


def _load_pt(path: Path) -> dict:
    import torch  # torch: the [export] extra

    try:
        with warnings.catch_warnings():  # torch's note on a user's pickle protocol: the file is judged below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
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
        if obj.get("config") is not None:
            _check_trainer_config(obj["config"], f"{path.name} 'config'")
        return obj
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # common trainer wrapper
        return {"state_dict": obj["state_dict"]}
    return {"state_dict": obj}


def _check_trainer_config(cfg: dict, where: str) -> None:
    """Refuse what the 730-token square-image path cannot reproduce, each with its reason."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    mt, arch = cfg.get("model_type"), cfg.get("architectures") or []
    if not (mt == "llava_qwen" or (mt == "llava" and "LlavaQwenForCausalLM" in arch)):
        raise CheckpointError(f"{where}: unknown model_type {mt!r} (expected 'llava_qwen', or 'llava' with "
                              "architectures ['LlavaQwenForCausalLM'])")
    proj = cfg.get("mm_projector_type", "mlp2x_gelu")
    if proj != "mlp2x_gelu":
        raise CheckpointError(f"{where}: mm_projector_type {proj!r} is not supported (LLaVA-VLA uses 'mlp2x_gelu')")
    aspect = cfg.get("image_aspect_ratio", "square")
    if str(aspect).startswith("anyres"):
        raise CheckpointError(
            f"{where}: image_aspect_ratio {aspect!r} tiles each image into several crops; vla-edge runs the "
            "one-square-image path LLaVA-VLA fine-tunes with ('square'): fine-tune with image_aspect_ratio square")
    if aspect not in ("square", "pad"):
        raise CheckpointError(f"{where}: image_aspect_ratio {aspect!r} is not supported (square or pad)")
    merge = cfg.get("mm_patch_merge_type")
    if merge is not None and "unpad" not in merge:
        raise CheckpointError(f"{where}: mm_patch_merge_type {merge!r} adds no image_newline row; vla-edge expects "
                              "LLaVA-VLA's 'spatial_unpad' (729 patches + image_newline)")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r} is not supported ('patch')")


def _load_hf_meta(path: Path) -> dict:
    """Everything of an HF directory but its weights (read after the cheap checks)."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: directory has no config.json (expected an HF save_pretrained directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    _check_trainer_config(cfg, str(cfg_path))
    raw: dict = {"config": cfg}
    extra = path / "vla_edge.json"
    if extra.exists():
        try:
            raw.update(json.loads(extra.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{extra}: not valid JSON: {e}") from None
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        raw["tokenizer_json"] = load_tokenizer_json(path)
    if (path / "statistics.yaml").is_file():
        raw["stats_path"] = path / "statistics.yaml"
    return raw


def _read_safetensors(path: Path) -> dict:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` names (any float dtype)."""
    from safetensors import SafetensorError  # safetensors: the [export] extra
    from safetensors.torch import load_file  # safetensors: the [export] extra

    index = path / "model.safetensors.index.json"
    wanted: dict[str, str] = {}
    if index.is_file():
        try:
            wanted = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map')") from None
        shards = [path / name for name in sorted(set(wanted.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{index.name} names shards that are missing: {', '.join(absent)}")
    elif (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files")
    sd = {}
    for shard in shards:
        try:
            sd.update(load_file(str(shard)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard.name}: not a readable safetensors file: {e}") from None
    lost = [k for k in wanted if k not in sd]
    if lost:
        raise CheckpointError(f"{index.name} lists {lost[0]!r} but its shard does not hold it")
    return sd


# -- model shape -----------------------------------------------------------------------------------------
def _model_config(raw: dict, sd: dict, opts: LoadOptions) -> ModelConfig:
    """The wrapper's ``model`` as given; else the trainer's config.json; else what the tensors and the
    known-model tables determine. Head counts come from a config or a table, never from a guess."""
    if raw.get("model"):
        try:
            return ModelConfig.from_dict(raw["model"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"'model' is not a vla-edge model config: {e}") from None
    cfg = raw.get("config") or {}
    where = "config.json" if cfg else "the state dict"
    text = _text_from_config(cfg, sd) if cfg else infer_text_config(sd)
    vision = resolve_vision(
        sd,
        vision_config=raw.get("vision_config") or cfg.get("vision_config"),
        tower=opts.vision_tower or cfg.get("mm_vision_tower"),
        select_layer=cfg.get("mm_vision_select_layer", -2),
        where=where,
    )
    return ModelConfig(vision, text)


def _int_field(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(f"config.json: {key!r} must be a positive integer, got {v!r}")
    return v


def _text_from_config(cfg: dict, sd: dict) -> TextConfig:
    """Qwen2 fields at the top level of the trainer's config.json (HF defaults where HF has them)."""
    heads = _int_field(cfg, "num_attention_heads")
    hidden = _int_field(cfg, "hidden_size")
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    text = TextConfig(
        hidden=hidden,
        intermediate=_int_field(cfg, "intermediate_size"),
        layers=_int_field(cfg, "num_hidden_layers"),
        heads=heads,
        kv_heads=_int_field(cfg, "num_key_value_heads", heads),
        vocab_rows=_int_field(cfg, "vocab_size"),
        rope_theta=float(rope),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_positions=_int_field(cfg, "max_position_embeddings", 32768),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in sd)),
    )
    if hidden % heads:
        raise CheckpointError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return text


def infer_text_config(sd: dict) -> TextConfig:
    """A bare state dict's decoder: widths from the tensors, head counts from :data:`KNOWN_TEXT_MODELS`."""
    if not any(k.startswith("model.layers.") for k in sd):
        raise CheckpointError("not a llava_qwen state dict: no 'model.layers.*' tensors")
    rows, hidden = _shape(sd, "model.embed_tokens.weight")
    inter = _shape(sd, "model.layers.0.mlp.gate_proj.weight")[0]
    kv_rows = _shape(sd, "model.layers.0.self_attn.k_proj.weight")[0]
    known = KNOWN_TEXT_MODELS.get((hidden, inter, kv_rows))
    if known is None:
        raise CheckpointError(
            f"cannot tell the head counts of a {hidden}-wide decoder (intermediate {inter}) from its tensors: "
            "export the HF directory with its config.json, or wrap the state dict with 'config' or 'model'")
    return TextConfig(hidden=hidden, intermediate=inter, layers=_count_layers(sd, "model.layers."),
                      heads=known["heads"], kv_heads=known["kv_heads"], vocab_rows=rows,
                      tie_word_embeddings="lm_head.weight" not in sd)


def _tower_from_name(tower: str) -> tuple[VisionConfig | None, str]:
    """A local SigLIP directory's own config.json, else the known-tower table by the name's last part."""
    local = Path(tower)
    if (local / "config.json").is_file():
        try:
            cfg = json.loads((local / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{local / 'config.json'}: not valid JSON: {e}") from None
        vc = {**SIGLIP_VISION_DEFAULTS, **cfg.get("vision_config", cfg)}  # HF writes only non-defaults
        return vision_from_hf(vc, str(local / "config.json")), f"{local / 'config.json'}"
    known = KNOWN_VISION_TOWERS.get(tower_name(tower))
    return known, f"known tower {tower_name(tower)}"


SIGLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6}
"""transformers' ``SiglipVisionConfig`` defaults: a saved config.json omits fields equal to these."""


def resolve_vision(sd: dict, *, vision_config: dict | None, tower: str | None, select_layer: int,
                   where: str) -> VisionConfig:
    """The vision trunk as used: the full tower's shape, then the depth ``select_layer`` keeps.

    Shape, in this order: an explicit ``vision_config`` (HF field names), the tower named by
    ``mm_vision_tower`` (its local directory's config.json, or :data:`KNOWN_VISION_TOWERS`), and for a
    bare state dict the known tower whose shape the tensors match. It must agree with the tensors.
    """
    hidden, _, patch, _ = _shape(sd, VISION_PREFIX + "embeddings.patch_embedding.weight")
    inter = _shape(sd, VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0]
    positions = _shape(sd, VISION_PREFIX + "embeddings.position_embedding.weight")[0]
    saved = _count_layers(sd, VISION_PREFIX + "encoder.layers.")
    try:
        if vision_config:
            full, source = vision_from_hf(vision_config, where), "vision_config"
        elif tower:
            full, source = _tower_from_name(tower)
        else:
            full = next((v for v in KNOWN_VISION_TOWERS.values()
                         if (v.hidden, v.intermediate, v.patch, v.n_patches) == (hidden, inter, patch, positions)), None)
            source = "the known towers"
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if full is None:
        named = f"vision tower {tower!r}" if tower else f"a {hidden}-wide vision tower (patch {patch})"
        raise CheckpointError(
            f"unknown {named}: known towers are {', '.join(KNOWN_VISION_TOWERS)}; give its shape as 'vision_config' "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, patch_size, image_size) in "
            "config.json or vla_edge.json, or --vision-tower DIR with the tower's own config.json")
    got = (full.hidden, full.intermediate, full.patch, full.n_patches)
    if got != (hidden, inter, patch, positions):
        fix = ("correct its fields" if source == "vision_config" else
               "give the tower's own directory (its save_pretrained config.json) as --vision-tower DIR or in "
               "mm_vision_tower, or the tower's shape as 'vision_config' (hidden_size, intermediate_size, "
               "num_hidden_layers, num_attention_heads, patch_size, image_size) in config.json or vla_edge.json")
        raise CheckpointError(
            f"{source} (hidden {full.hidden}, intermediate {full.intermediate}, patch {full.patch}, "
            f"{full.n_patches} positions) does not match the checkpoint's vision tensors (hidden {hidden}, "
            f"intermediate {inter}, patch {patch}, {positions} positions): {fix}")
    if full.hidden % full.heads:
        raise CheckpointError(f"{source}: hidden {full.hidden} is not a multiple of {full.heads} heads")
    try:
        kept = kept_layers(full.layers, int(select_layer))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if saved < kept:
        raise CheckpointError(
            f"mm_vision_select_layer {select_layer} of the {full.layers}-layer tower needs {kept} encoder layers, "
            f"but the checkpoint holds {saved}")
    return replace(full, layers=kept)


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing tensor {key!r}")
    return tuple(sd[key].shape)


def _count_layers(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def infer_model_config(sd: dict, vision_tower: str | None = None) -> ModelConfig:
    """The shape of a bare llava_qwen state dict (see :func:`infer_text_config`, :func:`resolve_vision`)."""
    text = infer_text_config(sd)
    return ModelConfig(resolve_vision(sd, vision_config=None, tower=vision_tower, select_layer=-2,
                                      where="the state dict"), text)


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
    import torch  # torch: the [export] extra

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
