"""Export: checkpoint formats, key mapping, bad input, manifest hashes, cut head, KV cache, parity."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from vla_edge.edge.bundle.manifest import Bundle, BundleError  # noqa: E402
from vla_edge.export.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from vla_edge.export.model import LlavaVLA  # noqa: E402


# -- checkpoint formats and key mapping ----------------------------------------------------------------
def test_tiny_ckpt_cli_is_deterministic(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for p in (a, b):
        r = run_cli("tiny-ckpt", "--out", str(p), "--seed", "3")
        assert r.returncode == 0, r.stderr
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_wrapper_and_bare_state_dict_load_the_same_tensors(tiny_ckpt, tmp_path):
    wrapped = load_checkpoint(tiny_ckpt)
    raw = torch.load(tiny_ckpt, weights_only=True)
    # A bare llava_qwen state dict (no wrapper): the shape must be given, so use the wrapper's model
    # but drop everything else; a trainer-style {"state_dict": ...} dict is accepted too.
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": raw["state_dict"]}, bare)
    # A 64-wide decoder is no known Qwen2: its head count cannot be read off the tensors, so it is refused
    # (never guessed); the 0.5B shape is covered in test_checkpoint.py.
    with pytest.raises(CheckpointError, match="cannot tell the head counts of a 64-wide decoder"):
        load_checkpoint(bare)
    assert set(wrapped.state_dict) == set(raw["state_dict"])


def test_hf_directory_equals_pt(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    raw = torch.load(tiny_ckpt, weights_only=True)
    d = tmp_path / "hf"
    d.mkdir()
    save_file(raw["state_dict"], str(d / "model.safetensors"))
    t = raw["model"]["text"]
    (d / "config.json").write_text(json.dumps({
        "model_type": "llava_qwen", "hidden_size": t["hidden"], "intermediate_size": t["intermediate"],
        "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"],
        "vocab_size": t["vocab_rows"], "rope_theta": t["rope_theta"], "tie_word_embeddings": True,
        "max_position_embeddings": t["max_positions"],
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "patch_size": 14,
                          "image_size": 384, "num_hidden_layers": 3},  # the full tower; -2 keeps 2
    }))
    (d / "tokenizer.json").write_text(raw["tokenizer_json"])
    (d / "vla_edge.json").write_text(json.dumps({k: raw[k] for k in ("policy", "image_layout", "tokens")}))
    a, b = load_checkpoint(tiny_ckpt), load_checkpoint(d)
    assert a.model == b.model
    assert a.tokens == b.tokens and a.policy == b.policy and a.layout == b.layout
    ma, mb = LlavaVLA.from_checkpoint(a), LlavaVLA.from_checkpoint(b)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(ma.image_embeds(x), mb.image_embeds(x))


def test_key_mapping_round_trip_and_ignored_keys(tiny_ckpt, tmp_path):
    ck = load_checkpoint(tiny_ckpt)
    model = LlavaVLA.from_checkpoint(ck)
    sd = model.llava_state_dict()
    assert set(sd) == set(ck.state_dict)
    assert all(torch.equal(sd[k], ck.state_dict[k].float()) for k in sd)
    # A checkpoint that still carries SigLIP's removed last layer, post-layernorm and head loads the
    # same model: those tensors are not used by LLaVA-VLA.
    raw = torch.load(tiny_ckpt, weights_only=True)
    p = "model.vision_tower.vision_tower.vision_model."
    extra = dict(raw["state_dict"])
    n = ck.model.vision.layers
    for k in [k for k in raw["state_dict"] if k.startswith(p + "encoder.layers.0.")]:
        extra[k.replace("layers.0.", f"layers.{n}.")] = raw["state_dict"][k] * 100
    extra[p + "post_layernorm.weight"] = torch.zeros(ck.model.vision.hidden)
    raw["state_dict"] = extra
    raw["model"]["vision"]["layers"] = n
    path = tmp_path / "extra.pt"
    torch.save(raw, path)
    m2 = LlavaVLA.from_checkpoint(load_checkpoint(path))
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(model.image_embeds(x), m2.image_embeds(x))


# -- bad input -------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_checkpoints(tiny_ckpt: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    raw = torch.load(tiny_ckpt, weights_only=True)
    cases = {}
    cases["missing"] = (tmp / "nope.pt", "not found")
    junk = tmp / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    cases["junk"] = (junk, "not a PyTorch checkpoint")
    evil = tmp / "evil.pt"
    torch.save({"state_dict": _Evil(tmp / "PWNED")}, evil)
    cases["pickle"] = (evil, "refused to load")
    miss = dict(raw, state_dict=dict(raw["state_dict"]))
    del miss["state_dict"]["model.norm.weight"]
    torch.save(miss, tmp / "missing_tensor.pt")
    cases["missing_tensor"] = (tmp / "missing_tensor.pt", "missing tensor 'model.norm.weight'")
    bad = dict(raw, state_dict=dict(raw["state_dict"]))
    bad["state_dict"]["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp / "bad_shape.pt")
    cases["shape"] = (tmp / "bad_shape.pt", "'model.mm_projector.0.weight' has shape (3, 3)")
    hf = tmp / "hf_unknown"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases["model_type"] = (hf, "unknown model_type 'llama'")
    return cases


def test_bad_checkpoints_give_one_line_errors_and_write_nothing(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name, (path, message) in _bad_checkpoints(tiny_ckpt, src).items():
        r = run_cli("export", "--ckpt", str(path), "--out", str(outdir / "bundle"))
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert message in lines[0], (name, lines[0])
        assert list(outdir.iterdir()) == [], name  # no partial bundle, no temp dir left behind
    assert not (src / "PWNED").exists()


def test_load_refuses_code_in_pickle_directly(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil(tmp_path / "marker")}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    assert not (tmp_path / "marker").exists()


# -- the bundle ------------------------------------------------------------------------------------------
def test_bundle_manifest_and_fp32_parity(fp32_bundle):
    b = Bundle.load(fp32_bundle)
    m = b.manifest
    assert m["precision"] == "fp32"
    assert set(m["files"]) == {"vision.onnx", "decoder.onnx", "embeddings.npy", "tokenizer.json", "parity.json"}
    assert m["head_ids"] == b.tokens.head_ids.tolist()
    assert len(m["head_ids"]) == 256 + 1 + 4
    parity = json.loads((fp32_bundle / "parity.json").read_text())
    assert parity["variants"]["fp32"]["chunks_identical"] is True
    assert parity["variants"]["fp32"]["logit_max_abs_err"] < 1e-4


def test_int8_bundle_reports_parity(int8_bundle):
    b = Bundle.load(int8_bundle)
    assert b.manifest["quantization"]["decoder"]["scheme"] == "dynamic-qint8"
    parity = json.loads((int8_bundle / "parity.json").read_text())
    v = parity["variants"]["int8"]
    assert 0.0 < v["logit_max_abs_err"] < 1.0  # quantised: not exact, but close
    assert v["logit_cosine_min"] > 0.99
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_bundle / "decoder.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


def test_corrupt_bundle_is_refused(fp32_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(fp32_bundle, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.onnx does not match its sha256"):
        Bundle.load(copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99"):
        Bundle.load(copy)


def test_existing_output_is_not_overwritten(tiny_ckpt, fp32_bundle):
    before = (fp32_bundle / "manifest.json").read_text()
    r = run_cli("export", "--ckpt", str(tiny_ckpt), "--out", str(fp32_bundle))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (fp32_bundle / "manifest.json").read_text() == before


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_cut_head_equals_full_head_rows_and_cache_equals_full_forward(tiny_ckpt, fp32_bundle):
    ck = load_checkpoint(tiny_ckpt)
    model = LlavaVLA.from_checkpoint(ck)
    t = ck.model.text
    emb = torch.randn(1, 9, t.hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model.lm(inputs_embeds=emb).logits[0].numpy()
    sess = _ort(fp32_bundle / "decoder.onnx")
    empty = np.zeros((1, t.kv_heads, 0, t.head_dim), np.float32)
    feed = {"inputs_embeds": emb[:, :6].numpy(), "logit_index": np.arange(6)}
    feed.update({f"past.{i}.{kv}": empty for i in range(t.layers) for kv in ("key", "value")})
    out = sess.run(None, feed)
    pre = out[0][0]
    np.testing.assert_allclose(pre, full[:6, ck.tokens.head_ids], atol=1e-5)
    # decode the remaining 3 positions one at a time with the cache
    past = out[1:]
    for pos in range(6, 9):
        feed = {"inputs_embeds": emb[:, pos : pos + 1].numpy(), "logit_index": np.zeros(1, np.int64)}
        feed.update({f"past.{i}.{kv}": past[2 * i + j] for i in range(t.layers) for j, kv in enumerate(("key", "value"))})
        out = sess.run(None, feed)
        past = out[1:]
        assert past[0].shape[2] == pos + 1
        np.testing.assert_allclose(out[0][0, 0], full[pos, ck.tokens.head_ids], atol=1e-5)
