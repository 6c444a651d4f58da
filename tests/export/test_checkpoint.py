"""Checkpoints as LLaVA-VLA training writes them, checked against transformers itself.

The fixture is written the way LLaVA-NeXT's HF Trainer saves ``LlavaQwenForCausalLM`` (CONTRACT 1b):
``config.json`` with the Qwen2 fields at top level and the ``mm_*`` fields, ``model_type`` ``llava``, no
vision config (the tower is a local SigLIP directory with its own ``save_pretrained`` config), bf16
shards with an index, the tower's last layer deleted, ``vocab.json`` + ``merges.txt`` (Qwen2's
pre-tokenizer, merges that create ``".\\n"``) and ``statistics.yaml`` beside the data. The reference
forward uses transformers' own SigLIP (``hidden_states[-2]`` of the full tower) and Qwen2, and a
transformers tokenizer, none of vla-edge's model or prompt code.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, SYSTEM_PROMPT, cobot_magic_policy  # noqa: E402
from vla_edge.export.checkpoint import CheckpointError, LoadOptions, load_checkpoint  # noqa: E402

VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
              image_size=384)  # 24 x 24 = 576 patches; 4 heads of 24 (a head count 96 // 72 would get wrong)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=True)
VLLM = "model.vision_tower.vision_tower.vision_model."


def _corpus() -> list[str]:
    verbs = ["pick up", "put down", "place", "push", "open", "close", "move", "lift"]
    objects = ["the red cube", "the blue block", "the green cup", "the drawer", "the towel"]
    lines = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"]
    for v in verbs:
        for o in objects:
            for end in (".", "!", "?", ""):
                lines.append(f"\n{v} {o}{end}\n")
    return lines * 3


def write_qwen2_tokenizer_files(d: Path) -> int:
    """A byte-level BPE with Qwen2's pre-tokenizer, saved as Qwen2 saves it (no tokenizer.json). Returns V."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(d))  # vocab.json + merges.txt, the files Qwen2 ships
    v = tok.get_vocab_size()
    specials = {"<|endoftext|>": v, "<|im_start|>": v + 1, "<|im_end|>": v + 2}
    (d / "added_tokens.json").write_text(json.dumps(specials, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for c, i in specials.items()},
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "split_special_tokens": False,
    }, indent=2))
    return v


def hf_tokenizer(d: Path):
    """transformers' Qwen2 tokenizer built from vocab.json + merges.txt (the independent reference)."""
    from transformers import Qwen2Tokenizer

    specials = json.loads((d / "added_tokens.json").read_text())
    tok = Qwen2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    assert all(tok.convert_tokens_to_ids(c) == i for c, i in specials.items())
    return tok


def _round_bf16(module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


class TrainerCheckpoint:
    """A tiny LLaVA-VLA checkpoint directory exactly as the trainer writes it, and its reference models."""

    def __init__(self, root: Path, seed: int = 0, action_dim: int = 14, state_dim: int = 14, **cfg_over):
        from safetensors.torch import save_file
        from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

        self.dir = root / "checkpoint-1500"
        self.tower_dir = root / "siglip-tiny-patch16-384"
        self.v = write_qwen2_tokenizer_files(self.dir)
        rows = -(-(self.v + 3 + 6) // 64) * 64
        torch.manual_seed(seed)
        vcfg = SiglipVisionConfig(**VISION)
        vcfg.save_pretrained(self.tower_dir)  # the tower's own config.json: HF writes only non-defaults
        self.siglip = SiglipVisionModel(vcfg).eval()
        self.qwen = Qwen2ForCausalLM(Qwen2Config(**TEXT, vocab_size=rows)).eval()
        self.proj = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
        with torch.no_grad():
            for m in (self.siglip, self.qwen, self.proj):
                for name, p in m.named_parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, 0.08)
                    elif "norm" not in name:
                        p.normal_(0.0, 0.02)
            self.newline = torch.randn(64) * 0.5
        for m in (self.siglip, self.qwen, self.proj):
            _round_bf16(m)
        self.newline = self.newline.to(torch.bfloat16).float()
        sd = {}
        for k, t in self.siglip.state_dict().items():
            if k.startswith("head.") or k.startswith(f"encoder.layers.{VISION['num_hidden_layers'] - 1}."):
                continue  # LLaVA-NeXT deletes the tower's last layer and its head before training
            sd[VLLM + k] = t
        for i in (0, 2):
            sd[f"model.mm_projector.{i}.weight"] = self.proj[i].weight
            sd[f"model.mm_projector.{i}.bias"] = self.proj[i].bias
        sd["model.image_newline"] = self.newline
        sd.update({k: t for k, t in self.qwen.state_dict().items() if k != "lm_head.weight"})  # tied
        sd = {k: t.detach().to(torch.bfloat16).contiguous() for k, t in sd.items()}
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(self.dir / name), metadata={"format": "pt"})
        (self.dir / "model.safetensors.index.json").write_text(json.dumps({
            "metadata": {"total_size": sum(t.numel() * 2 for t in sd.values())},
            "weight_map": {k: name for name, ks in shards.items() for k in ks}}, indent=2))
        self.config = {
            "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", **TEXT, "vocab_size": rows,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": self.v,
            "eos_token_id": self.v + 2, "mm_vision_tower": str(self.tower_dir), "mm_hidden_size": 96,
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "square", "image_grid_pinpoints": None,
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", **cfg_over,
        }
        self.write_config()
        rng = np.random.default_rng(seed)
        lim = cobot_magic_policy()
        lo = np.asarray(lim.action_lo[:action_dim] + [0.0] * max(0, action_dim - 14))
        hi = np.asarray(lim.action_hi[:action_dim] + [0.07] * max(0, action_dim - 14))
        self.stats = {"act_min_bound": (lo * 0.8).tolist(), "act_max_bound": (hi * 0.8 + 0.01).tolist(),
                      "robot_obs": [{"mean": rng.normal(0, 0.3, state_dim).round(4).tolist(),
                                     "std": rng.uniform(0.2, 0.6, state_dim).round(4).tolist()}]}
        self.stats_path = root / "data" / "statistics.yaml"
        self.stats_path.parent.mkdir(exist_ok=True)
        import yaml

        self.stats_path.write_text(yaml.safe_dump(self.stats))

    def write_config(self, **over) -> None:
        (self.dir / "config.json").write_text(json.dumps({**self.config, **over}, indent=2))

    @torch.no_grad()
    def greedy_chunk(self, pixels: np.ndarray, state: np.ndarray, instruction: str, n_tokens: int) -> list[int]:
        """transformers' forward: SigLIP hidden_states[-2], projector, newline, Qwen2; argmax over the bins."""
        tok = hf_tokenizer(self.dir)
        hs = self.siglip(pixel_values=torch.as_tensor(pixels), output_hidden_states=True).hidden_states[-2]
        image = torch.cat([self.proj(hs)[0], self.newline[None]])
        mean = np.asarray(self.stats["robot_obs"][0]["mean"])
        std = np.asarray(self.stats["robot_obs"][0]["std"])
        x = np.clip((state - mean) / (std + 1e-5) / 3, -1, 1)
        proprio = (self.v - np.digitize(x, np.linspace(-1, 1, 256))).tolist()
        before = tok(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")["input_ids"]
        after = (tok("\n" + instruction + "\n")["input_ids"] + proprio
                 + tok("<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
        emb = self.qwen.get_input_embeddings()
        seq = torch.cat([emb(torch.tensor(before)), image, emb(torch.tensor(after))])[None]
        out = []
        for _ in range(n_tokens):
            logits = self.qwen(inputs_embeds=seq).logits[0, -1]
            t = int(torch.argmax(logits[self.v - 256: self.v])) + self.v - 256  # the grammar: bins only
            out.append(t)
            seq = torch.cat([seq, emb(torch.tensor([t]))[None]], dim=1)
        return out


@pytest.fixture(scope="module")
def trainer_ckpt(tmp_path_factory) -> TrainerCheckpoint:
    return TrainerCheckpoint(tmp_path_factory.mktemp("trainer"))


def _frames(layout, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in layout.tiles]


# -- the trainer's directory, end to end -------------------------------------------------------------------
def test_trainer_directory_exports_and_equals_transformers(trainer_ckpt, tmp_path):
    from vla_edge.edge.bundle.manifest import Bundle
    from vla_edge.edge.engine import Engine
    from vla_edge.kernels import reference

    out = tmp_path / "bundle"
    r = run_cli("export", "--ckpt", str(trainer_ckpt.dir), "--stats", str(trainer_ckpt.stats_path),
                "--out", str(out), "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = Bundle.load(out)
    m = bundle.manifest["model"]
    assert (m["vision"]["heads"], m["vision"]["layers"], m["vision"]["image_size"]) == (4, 2, 384)
    assert bundle.policy.action_lo == trainer_ckpt.stats["act_min_bound"]
    assert bundle.policy.proprio_std == trainer_ckpt.stats["robot_obs"][0]["std"]
    engine = Engine(bundle, provider="cpu")
    for seed, instruction in ((0, "pick up the red cube."), (1, "open the drawer!")):
        frames = _frames(COBOT_MAGIC_LAYOUT, seed)
        state = np.random.default_rng(seed).normal(0, 0.3, 14)
        engine.start_episode(instruction)
        chunk = engine.step(frames, state)
        want = trainer_ckpt.greedy_chunk(reference.compose_views(frames, COBOT_MAGIC_LAYOUT), state, instruction, 70)
        assert chunk.token_ids[:70].tolist() == want


def test_tower_with_all_27_style_layers_gives_the_same_model(trainer_ckpt, tmp_path):
    """-2 with the last layer saved (27 of 27) and -2 with it deleted (26 of 27) select the same feature."""
    from safetensors.torch import load_file, save_file
    from vla_edge.export.model import LlavaVLA

    a = load_checkpoint(trainer_ckpt.dir, LoadOptions(stats=trainer_ckpt.stats_path))
    full = tmp_path / "full"
    full.mkdir()
    for f in trainer_ckpt.dir.iterdir():
        (full / f.name).write_bytes(f.read_bytes())
    shard = full / "model-00002-of-00002.safetensors"
    sd = load_file(str(shard))
    last = VISION["num_hidden_layers"] - 1
    for k, t in trainer_ckpt.siglip.encoder.layers[last].state_dict().items():
        sd[f"{VLLM}encoder.layers.{last}.{k}"] = t.to(torch.bfloat16).contiguous() * 3
    save_file(sd, str(shard))
    index = json.loads((full / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: shard.name for k in sd})
    (full / "model.safetensors.index.json").write_text(json.dumps(index))
    b = load_checkpoint(full, LoadOptions(stats=trainer_ckpt.stats_path))
    assert a.model == b.model and a.model.vision.layers == 2
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(LlavaVLA.from_checkpoint(a).image_embeds(x), LlavaVLA.from_checkpoint(b).image_embeds(x))


def test_tokenizer_built_from_vocab_and_merges_equals_transformers(trainer_ckpt):
    from tokenizers import Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
    from vla_edge.export.checkpoint import tokens_from_tokenizer
    from vla_edge.export.tokenizer import QWEN2_PRETOKENIZE_REGEX, load_tokenizer_json

    assert QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    text = load_tokenizer_json(trainer_ckpt.dir)
    ours, ref = Tokenizer.from_str(text), hf_tokenizer(trainer_ckpt.dir)
    for s in ["pick up the red cube.\n", "\nopen the drawer!\n", "<|im_start|>user\nhi?<|im_end|>\n", "  x  \n\n"]:
        assert ours.encode(s, add_special_tokens=False).ids == ref(s)["input_ids"], s
    # The instruction segment is tokenised as one string, as the reference does: ".\n" is one token here.
    encode = tokenizer_encoder(text)
    tokens = tokens_from_tokenizer(text, trainer_ckpt.config["vocab_size"])
    prompt = PromptTemplate.build(encode, tokens)
    merged = 0
    for instruction in ("pick up the red cube.", "open the drawer!", "push the towel?", "lift the green cup  "):
        want = ref("\n" + instruction + "\n")["input_ids"]
        assert prompt.instruction_ids(encode, instruction, navigation=False) == want
        merged += want != ref("\n" + instruction)["input_ids"] + ref("\n")["input_ids"]
    assert merged >= 3  # the fixture really has the merges that made the old prompt wrong
    assert prompt.instruction_ids(encode, "pick up the red cube.", navigation=True)[-2:] == [
        tokens.navigation, ref("\n")["input_ids"][0]]


# -- refusals, each by its message -------------------------------------------------------------------------
@pytest.mark.parametrize("over, message", [
    ({"image_aspect_ratio": "anyres_max_9"}, "tiles each image into several crops"),
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' is not supported"),
    ({"mm_patch_merge_type": "flat"}, "adds no image_newline"),
    ({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}, "unknown model_type 'llava'"),
    ({"mm_vision_select_layer": -1}, "needs 3 encoder layers, but the checkpoint holds 2"),
    ({"mm_vision_tower": "google/siglip-base-patch16-224"}, "unknown vision tower 'google/siglip-base-patch16-224'"),
    ({"mm_vision_tower": "/data/siglip-so400m-patch14-384"},  # and how to fix it
     "does not match the checkpoint's vision tensors .*: give the tower's own directory .* as --vision-tower DIR "
     "or in mm_vision_tower, or the tower's shape as 'vision_config'"),
])
def test_trainer_config_refusals(trainer_ckpt, over, message):
    try:
        trainer_ckpt.write_config(**over)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_checkpoint(trainer_ckpt.dir, LoadOptions(stats=trainer_ckpt.stats_path))
    finally:
        trainer_ckpt.write_config()


def test_vision_config_in_vla_edge_json_overrides_the_tower(trainer_ckpt):
    try:
        trainer_ckpt.write_config(mm_vision_tower="/nowhere/my-own-siglip")
        (trainer_ckpt.dir / "vla_edge.json").write_text(json.dumps({"vision_config": VISION}))
        ck = load_checkpoint(trainer_ckpt.dir, LoadOptions(stats=trainer_ckpt.stats_path))
        assert (ck.model.vision.heads, ck.model.vision.layers) == (4, 2)
    finally:
        (trainer_ckpt.dir / "vla_edge.json").unlink(missing_ok=True)
        trainer_ckpt.write_config()


def test_resize_order_recorded_else_the_reference_era_for_a_trainer_directory(trainer_ckpt, tiny_ckpt, tmp_path):
    """A trainer directory's images were made by the reference's Pillow (< 13) unless the data says otherwise:
    convert's ``vla_edge.json`` beside ``statistics.yaml`` records the order it composed with."""
    stats = LoadOptions(stats=trainer_ckpt.stats_path)
    assert load_checkpoint(trainer_ckpt.dir, stats).layout.resize_order == "pillow-pre13"
    assert load_checkpoint(trainer_ckpt.dir, replace(stats, resize_order="pillow13")).layout.resize_order == "pillow13"
    sidecar = trainer_ckpt.stats_path.with_name("vla_edge.json")
    try:
        sidecar.write_text(json.dumps({"image_layout": {**COBOT_MAGIC_LAYOUT.to_dict(), "resize_order": "pillow13"}}))
        assert load_checkpoint(trainer_ckpt.dir, stats).layout.resize_order == "pillow13"
    finally:
        sidecar.unlink()
    assert load_checkpoint(tiny_ckpt).layout.resize_order == "pillow13"  # vla-edge's own checkpoint: Pillow 13
    with pytest.raises(CheckpointError, match="unknown resize order"):
        load_checkpoint(trainer_ckpt.dir, replace(stats, resize_order="pillow9"))


def test_statistics_are_required_and_checked(trainer_ckpt, tmp_path):
    import yaml

    with pytest.raises(CheckpointError, match="give --stats statistics.yaml"):
        load_checkpoint(trainer_ckpt.dir)
    bad = tmp_path / "statistics.yaml"
    bad.write_text(yaml.safe_dump({**trainer_ckpt.stats, "act_max_bound": [1.0] * 7}))
    r = run_cli("export", "--ckpt", str(trainer_ckpt.dir), "--stats", str(bad), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "act_min_bound has 14 values but act_max_bound has 7" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    (tmp_path / "vla_edge.json").write_text(json.dumps({"policy": {"state_dim": 15}}))
    bad.write_text(yaml.safe_dump(trainer_ckpt.stats))
    with pytest.raises(Exception, match="state_dim 15 but statistics.yaml has 14"):
        load_checkpoint(trainer_ckpt.dir, LoadOptions(stats=bad))


# -- a bare best.pt of the real 0.5B shape (tensors share one element of storage) ---------------------------
def _bare_05b(path: Path, vision_layers: int = 26, vision: dict | None = None) -> Path:
    """The 0.5B llava_qwen state dict built from transformers' own modules on the meta device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vc = vision or dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        patch_size=14, image_size=384)
    with torch.device("meta"):
        siglip = SiglipVisionModel(SiglipVisionConfig(**vc))
        qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                            tie_word_embeddings=True))
    one = torch.zeros(1, dtype=torch.bfloat16)
    sd = {}
    for k, t in siglip.state_dict().items():
        if k.startswith("head.") or (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= vision_layers):
            continue
        sd[VLLM + k] = one.expand(t.shape)
    sd.update({"model.mm_projector.0.weight": one.expand(896, vc["hidden_size"]), "model.mm_projector.0.bias":
               one.expand(896), "model.mm_projector.2.weight": one.expand(896, 896),
               "model.mm_projector.2.bias": one.expand(896), "model.image_newline": one.expand(896)})
    sd.update({k: one.expand(t.shape) for k, t in qwen.state_dict().items() if k != "lm_head.weight"})
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("layers", [26, 27])
def test_bare_best_pt_of_the_real_shape(trainer_ckpt, tmp_path, layers):
    from vla_edge.export.config import LLAVA_OV_05B

    path = _bare_05b(tmp_path / "best.pt", vision_layers=layers)
    assert path.stat().st_size < 5e6  # shapes only
    with pytest.raises(CheckpointError, match="give --tokenizer"):
        load_checkpoint(path, LoadOptions(stats=trainer_ckpt.stats_path))
    ck = load_checkpoint(path, LoadOptions(stats=trainer_ckpt.stats_path, tokenizer=trainer_ckpt.dir))
    assert ck.model.vision == LLAVA_OV_05B.vision and ck.model.text == LLAVA_OV_05B.text
    assert ck.model.image_tokens == 730 and ck.layout.output == 384


def test_bare_best_pt_of_an_unknown_tower_is_refused_not_guessed(trainer_ckpt, tmp_path):
    other = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
                 image_size=384)
    path = _bare_05b(tmp_path / "best.pt", vision_layers=2, vision=other)
    r = run_cli("export", "--ckpt", str(path), "--stats", str(trainer_ckpt.stats_path), "--tokenizer",
                str(trainer_ckpt.dir), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "unknown a 96-wide vision tower (patch 16)" in r.stderr, r.stderr
    assert "vision_config" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ck = load_checkpoint(path, LoadOptions(stats=trainer_ckpt.stats_path, tokenizer=trainer_ckpt.dir,
                                           vision_tower=str(trainer_ckpt.tower_dir)))
    assert (ck.model.vision.heads, ck.model.vision.layers) == (4, 2)


# -- bins --------------------------------------------------------------------------------------------------
def test_norm_bins_detokenise_with_the_reference_table():
    """The reference ActionTokenizer's use_norm_bins table, written out here: centres of its edges."""
    from vla_edge import kernels
    from vla_edge.edge.bundle.spec import QWEN2_TOKENS, TokenSpec

    edges = np.concatenate((np.linspace(-1, -0.5, 15, endpoint=False), np.linspace(-0.5, -0.25, 40, endpoint=False),
                            np.linspace(-0.25, -0.1, 42, endpoint=False), np.linspace(-0.1, 0.1, 62, endpoint=False),
                            np.linspace(0.1, 0.25, 42, endpoint=False), np.linspace(0.25, 0.5, 40, endpoint=False),
                            np.linspace(0.5, 1.0, 15, endpoint=True)))
    spec = TokenSpec.from_dict({**QWEN2_TOKENS.to_dict(), "bins": "norm"})
    np.testing.assert_array_equal(spec.bin_edges, edges)
    v = spec.vocab_base
    ids = np.arange(v - 256, v, dtype=np.int64)
    centres = (edges[:-1] + edges[1:]) / 2
    want = centres[np.clip(v - ids - 1, 0, 254)]
    got = kernels.detokenize_actions(ids, v, [-1.0], [1.0], spec.bin_edges)[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    x = np.array([-0.95, -0.05, 0.0, 0.03, 0.7])
    np.testing.assert_array_equal(kernels.tokenize_proprio(x * 3, np.zeros(5), np.ones(5) - 1e-5, v, spec.bin_edges),
                                  v - np.digitize(x, edges))
    assert not np.array_equal(got, kernels.detokenize_actions(ids, v, [-1.0], [1.0])[:, 0])


# -- CALVIN: 7 action dims, 15-dim robot_obs, two views ------------------------------------------------------
def test_calvin_checkpoint_exports_and_benches(tmp_path):
    ck = TrainerCheckpoint(tmp_path / "calvin", seed=1, action_dim=7, state_dim=15)
    out = tmp_path / "bundle"
    r = run_cli("export", "--ckpt", str(ck.dir), "--stats", str(ck.stats_path), "--layout", "calvin",
                "--out", str(out), "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["policy"]["action_dim"] == 7 and man["policy"]["state_dim"] == 15
    assert [t["camera"] for t in man["image_layout"]["tiles"]] == ["rgb_static", "rgb_gripper"]
    # The baseline loads the checkpoint directory, which carries no statistics: the bundle's are used.
    r = run_cli("bench", "--bundle", str(out), "--steps", "1", "--warmup", "0", "--baseline", "torch",
                "--ckpt", str(ck.dir), "--json", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    baseline = json.loads((tmp_path / "b.json").read_text())["baseline"]
    assert baseline["chunks_identical"] is True
    assert baseline["actions"] == "raw" and baseline["action_max_abs_diff"] == 0.0  # both decode as the bundle
    from vla_edge.edge.bundle.manifest import Bundle
    from vla_edge.edge.bundle.spec import CALVIN_LAYOUT
    from vla_edge.edge.engine import Engine
    from vla_edge.kernels import reference

    engine = Engine(Bundle.load(out), provider="cpu")
    engine.start_episode("push the towel.")
    frames = [np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8) for _ in range(2)]
    state = np.random.default_rng(3).normal(0, 0.3, 15)
    chunk = engine.step(frames, state)
    assert chunk.joints.shape == (5, 7)
    want = ck.greedy_chunk(reference.compose_views(frames, CALVIN_LAYOUT), state, "push the towel.", 35)
    assert chunk.token_ids[:35].tolist() == want
    # The reference trainer's actions are raw (encode_actions(statistics=None)); its CALVIN client takes the
    # bin centres as they are: ActionTokenizer.decode_token_ids_to_actions.
    centres = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2
    np.testing.assert_allclose(chunk.joints.ravel(), centres[np.clip(ck.v - np.asarray(want) - 1, 0, 254)],
                               rtol=0, atol=1e-12)


def test_missing_statistics_are_reported_before_the_weights_are_read(trainer_ckpt, tmp_path):
    """A 0.5B directory takes a while to read: what the command line must add is asked for first (here the
    shards are junk, so reading them would give another error)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in trainer_ckpt.dir.iterdir():
        (d / f.name).write_bytes(b"junk" if f.suffix == ".safetensors" else f.read_bytes())
    with pytest.raises(CheckpointError, match="give --stats statistics.yaml"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(d, LoadOptions(stats=trainer_ckpt.stats_path))
