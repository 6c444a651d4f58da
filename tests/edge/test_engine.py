"""The ONNX Runtime engine against the PyTorch reference, parallel decoding, errors, and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from vla_edge.edge.bundle.manifest import Bundle  # noqa: E402
from vla_edge.edge.cli.bench import synthetic_inputs  # noqa: E402
from vla_edge.edge.engine import STAGES, Engine, EngineError  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.export.model import LlavaVLA
    from vla_edge.export.reference import TorchReference

    ck = load_checkpoint(tiny_ckpt)
    enc = tokenizer_encoder(ck.tokenizer_json)
    return TorchReference(LlavaVLA.from_checkpoint(ck), ck.tokens, ck.policy, ck.layout,
                          PromptTemplate.build(enc, ck.tokens), enc)


@pytest.fixture(params=["plain", "fused"])
def any_fp32_bundle(request):
    """The fp32 bundle of each decoder kind (plain TorchScript graph, fused GQA graph)."""
    return request.getfixturevalue("fp32_bundle" if request.param == "plain" else "fused_fp32_bundle")


@pytest.fixture(scope="module")
def policy_bundles(tmp_path_factory):
    """The shipped trained tiny reach policy, exported fp32 and with weight-only MatMulNBits (fused decoder)."""
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.export.demo import shipped_policy
    from vla_edge.export.pipeline import ExportOptions, export_bundle

    ckpt = load_checkpoint(shipped_policy())
    out = {}
    for name, precision, scheme in (("fp32", "fp32", None), ("matmulnbits", "int8", "matmulnbits-8bit")):
        out[name] = tmp_path_factory.mktemp("policy") / name
        export_bundle(ckpt, ExportOptions(out=out[name], precision=precision, quant_scheme=scheme, parity_samples=1))
    return out


@pytest.fixture(params=["tiny-plain-fp32", "tiny-fused-fp32", "policy-fp32", "policy-matmulnbits"])
def rows_independent_bundle(request):
    """Bundles whose decoder rows do not interact within a call (fp32, weight-only MatMulNBits)."""
    model, kind = request.param.split("-", 1)
    if model == "policy":
        return request.getfixturevalue("policy_bundles")[kind]
    return request.getfixturevalue("fp32_bundle" if kind == "plain-fp32" else "fused_fp32_bundle")


@pytest.mark.parametrize("navigation", [False, True])
def test_engine_chunks_equal_pytorch(any_fp32_bundle, reference, navigation):
    engine = Engine(Bundle.load(any_fp32_bundle), provider="cpu")
    rng = np.random.default_rng(7)
    for trial in range(3):
        frames, state = synthetic_inputs(engine.bundle.layout, 14, seed=trial)
        state = state + rng.normal(0, 0.2, 14)
        instruction = ["pick up the red cube", "open the drawer", "drive to the table"][trial]
        engine.start_episode(instruction, navigation=navigation)
        chunk = engine.step(frames, state)
        ref = reference.step(reference.pixels(frames), state, instruction, navigation)
        assert np.array_equal(chunk.token_ids, engine.head_ids[ref.head_idx])
        assert chunk.token_ids[-1] == engine.tokens.im_end
        if navigation:
            assert chunk.base is not None and chunk.base[0] in ("forward", "turn_left", "turn_right", "stop")
        if chunk.joints is not None:
            assert chunk.joints.shape == (5, 14)
            lo, hi = np.array(engine.policy.action_lo), np.array(engine.policy.action_hi)
            assert (chunk.joints >= lo - 1e-12).all() and (chunk.joints <= hi + 1e-12).all()


@pytest.mark.parametrize("navigation", [False, True])
def test_parallel_decoding_equals_sequential(rows_independent_bundle, navigation):
    """Holds by construction where rows do not interact: each accepted token is the argmax of a row whose
    inputs equal sequential decoding's, computed the same way (no per-call activation scale)."""
    b = Bundle.load(rows_independent_bundle)
    seq, par = Engine(b, provider="cpu"), Engine(b, provider="cpu", parallel=True)
    rng = np.random.default_rng(5)
    for seed in range(4):
        frames, state = synthetic_inputs(b.layout, 14, seed=10 + seed)
        state = state + rng.normal(0, 0.3, 14)
        for e in (seq, par):
            e.start_episode(["pick up the red cube", "reach the red target"][seed % 2], navigation=navigation)
        a, c = seq.step(frames, state), par.step(frames, state)
        assert np.array_equal(a.token_ids, c.token_ids)
        assert c.decode_calls <= a.decode_calls == len(a.token_ids) - 1


def test_parallel_is_refused_on_dynamically_quantised_decoders(int8_bundle, fused_int8_bundle):
    """Dynamic QInt8 scales activations per call over all rows: a batched call is not row by row."""
    for root in (int8_bundle, fused_int8_bundle):
        b = Bundle.load(root)
        assert b.manifest["quantization"]["decoder"]["scheme"] == "dynamic-qint8"
        with pytest.raises(EngineError, match="--parallel refused: .*dynamically quantised"):
            Engine(b, provider="cpu", parallel=True)
        Engine(b, provider="cpu")  # sequential decoding is fine
    r = run_cli("bench", "--bundle", str(fused_int8_bundle), "--parallel", "--provider", "cpu", "--steps", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("vla-edge bench: error: --parallel refused")


def test_engine_rejects_bad_inputs(int8_bundle):
    e = Engine(Bundle.load(int8_bundle), provider="cpu")
    frames, state = synthetic_inputs(e.bundle.layout, 14)
    with pytest.raises(EngineError, match="start_episode"):
        e.step(frames, state)
    e.start_episode("pick up the red cube")
    with pytest.raises(EngineError, match="expected 3 camera frames"):
        e.step(frames[:2], state)
    with pytest.raises(EngineError, match=r"state has shape \(7,\)"):
        e.step(frames, state[:7])
    with pytest.raises(EngineError, match="empty"):
        e.start_episode("   ")


def test_missing_cuda_provider_is_a_clear_error(int8_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EngineError, match="CUDA provider requested"):
        Engine(Bundle.load(int8_bundle), provider="cuda")
    r = run_cli("bench", "--bundle", str(int8_bundle), "--provider", "cuda")
    assert r.returncode == 2 and "CUDA provider requested" in r.stderr


def test_bench_json_has_every_stage(int8_bundle, tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--bundle", str(int8_bundle), "--steps", "2", "--warmup", "1", "--baseline", "torch",
                "--ckpt", str(tiny_ckpt), "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert set(rep["stages_ms"]) == {*STAGES, "total"}
    for v in rep["stages_ms"].values():
        assert v["p50"] <= v["p95"] <= v["p99"]
    assert rep["tokens_per_step"] == 71
    assert rep["baseline"]["speedup_p50"] > 0
    assert isinstance(rep["baseline"]["chunks_identical"], bool)
    assert "speed-up vs PyTorch" in r.stdout
