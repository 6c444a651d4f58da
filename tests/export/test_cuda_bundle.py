"""The ``--target cuda`` bundle, checked on the CPU: every node has a CUDA kernel, float16 parity, Jacobi.

No GPU here: the CUDA execution provider is never run by these tests. What they establish:

* every node of both graphs, with the element types of its inputs, is in the table of kernels that
  ONNX Runtime's CUDA execution provider registers (:data:`CUDA_KERNELS`), so a CUDA session places
  nothing on the CPU provider (the fallback ONNX Runtime takes silently for a missing kernel);
* the float16 graphs (MatMulNBits weights, float16 activations, float32 logits) reproduce PyTorch's
  greedy chunks on the CPU provider, with logits within a stated tolerance;
* parallel (Jacobi) decoding equals sequential decoding token for token on this bundle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from vla_edge.edge.bundle.manifest import Bundle  # noqa: E402
from vla_edge.edge.cli.bench import synthetic_inputs  # noqa: E402
from vla_edge.edge.engine import Engine  # noqa: E402

# --- The CUDA execution provider's kernels, per op and input position ------------------------------------
# Source: onnxruntime docs/OperatorKernels.md, section "Operators implemented by CUDAExecutionProvider"
# (generated from the registered kernels; github.com/microsoft/onnxruntime, read at commit 001d12d2623f,
# the 1.31 line), highest opset row of each op used by vla-edge's graphs. Only the ops our graphs use are
# listed: an op missing here fails the check, so a new op has to be looked up before it ships.
_FLOAT = {"float", "float16", "bfloat16", "double"}
_INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_ALL = _FLOAT | _INTS | {"bool"}
_ANY = None  # no constraint (type-agnostic kernels: Identity, Shape, Cast's input)
CUDA_KERNELS: dict[tuple[str, str], dict[int, set | None] | str] = {
    # ai.onnx
    ("", "Add"): {0: _FLOAT | _INTS, 1: _FLOAT | _INTS},
    ("", "Cast"): {0: _ANY},
    ("", "Concat"): {-1: _ALL},  # -1: every input
    ("", "ConstantOfShape"): {0: {"int64"}},
    ("", "Conv"): {0: _FLOAT, 1: _FLOAT, 2: _FLOAT},
    ("", "Div"): {0: _FLOAT | _INTS, 1: _FLOAT | _INTS},
    ("", "Equal"): {0: {"bool", "double", "float", "float16", "int32", "int64", "uint32", "uint64"},
                    1: {"bool", "double", "float", "float16", "int32", "int64", "uint32", "uint64"}},
    ("", "Erf"): {0: _FLOAT},
    ("", "Expand"): {0: _ALL, 1: {"int64"}},
    ("", "Gather"): {0: _ALL, 1: {"int32", "int64"}},
    ("", "Identity"): {0: _ANY},
    ("", "LayerNormalization"): {0: _FLOAT, 1: _FLOAT, 2: _FLOAT},
    ("", "MatMul"): {0: _FLOAT, 1: _FLOAT},
    ("", "Mul"): {0: _FLOAT | _INTS, 1: _FLOAT | _INTS},
    ("", "Reshape"): {0: _ALL, 1: {"int64"}},
    ("", "Shape"): {0: _ANY},
    ("", "Sigmoid"): {0: _FLOAT},
    ("", "SimplifiedLayerNormalization"): {0: _FLOAT, 1: _FLOAT},
    ("", "Slice"): {0: _ALL, 1: {"int32", "int64"}, 2: {"int32", "int64"}, 3: {"int32", "int64"},
                    4: {"int32", "int64"}},
    ("", "Softmax"): {0: _FLOAT},
    ("", "Tanh"): {0: _FLOAT},
    ("", "Transpose"): {0: _ALL},
    ("", "Unsqueeze"): {0: _ALL, 1: {"int64"}},  # the vision graph's batch axis: attention shapes from Shape
    ("", "Where"): {0: {"bool"}, 1: {"bfloat16", "double", "float", "float16", "int32", "int64", "uint8"},
                    2: {"bfloat16", "double", "float", "float16", "int32", "int64", "uint8"}},
    ("", "Constant"): "folded into an initializer when the session loads: no kernel runs",
    # com.microsoft
    ("com.microsoft", "GroupQueryAttention"): {0: {"float16", "bfloat16"}, 1: {"float16", "bfloat16"},
                                               2: {"float16", "bfloat16"}, 3: {"float16", "bfloat16"},
                                               4: {"float16", "bfloat16"}, 5: {"int32"}, 6: {"int32"},
                                               7: {"float16", "bfloat16"}, 8: {"float16", "bfloat16"}},
    ("com.microsoft", "MatMulNBits"): {0: {"float", "float16", "bfloat16"}, 1: {"uint8"},
                                       2: {"float", "float16", "bfloat16"}, 3: {"float", "float16", "bfloat16", "uint8"},
                                       5: {"float", "float16", "bfloat16"}},
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): {-1: {"float", "float16", "bfloat16"}},
}


def _elem_types(model) -> dict[str, str]:
    """Element type name of every value in the graph (inputs, initializers, inferred intermediates)."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type:
            types[v.name] = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
    for t in g.initializer:
        types[t.name] = helper.tensor_dtype_to_np_dtype(t.data_type)
    for n in g.node:
        if n.op_type == "Constant":
            types[n.output[0]] = helper.tensor_dtype_to_np_dtype(n.attribute[0].t.data_type)
    names = {np.dtype(np.float32): "float", np.dtype(np.float16): "float16", np.dtype(np.float64): "double",
             np.dtype(bool): "bool"}
    return {k: names.get(np.dtype(v), np.dtype(v).name) for k, v in types.items()}


def cuda_fallbacks(path) -> list[str]:
    """Nodes of the graph at ``path`` that ONNX Runtime's CUDA provider has no kernel for (one line each)."""
    import onnx

    model = onnx.load(str(path))
    types = _elem_types(model)
    bad = []
    for n in model.graph.node:
        spec = CUDA_KERNELS.get((n.domain if n.domain != "ai.onnx" else "", n.op_type))
        if spec is None:
            bad.append(f"{n.name}: op {n.domain or 'ai.onnx'}.{n.op_type} has no CUDA kernel in the table")
            continue
        if isinstance(spec, str):
            continue
        for i, name in enumerate(n.input):
            if not name:
                continue
            allowed = spec.get(i, spec.get(-1, _ANY))
            if allowed is _ANY:
                continue
            got = types.get(name)
            if got is None:
                bad.append(f"{n.name}: input {i} ({name}) has no known element type")
            elif got not in allowed:
                bad.append(f"{n.name}: {n.op_type} input {i} is {got}; CUDA kernels take {sorted(allowed)}")
    return bad


@pytest.fixture(scope="module")
def cuda_bundle(tiny_ckpt, tmp_path_factory):
    """``vla-edge export --target cuda`` (int8: float16 graphs, MatMulNBits weights) of the tiny checkpoint."""
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "cuda-int8"
    export_bundle(load_checkpoint(tiny_ckpt), ExportOptions(out=out, target="cuda", precision="int8"))
    return out


def test_every_node_has_a_cuda_kernel(cuda_bundle):
    for graph in ("vision.onnx", "decoder.onnx"):
        assert cuda_fallbacks(cuda_bundle / graph) == [], graph


def test_the_check_catches_a_float32_attention_graph(fused_fp32_bundle):
    """The CPU bundle's float32 fused decoder would run GroupQueryAttention on the CPU provider."""
    bad = cuda_fallbacks(fused_fp32_bundle / "decoder.onnx")
    assert bad and all("GroupQueryAttention" in line for line in bad)
    assert any("is float;" in line for line in bad)


def test_cuda_bundle_dtypes_and_manifest(cuda_bundle):
    import onnx

    m = json.loads((cuda_bundle / "manifest.json").read_text())
    assert m["target"] == "cuda" and m["decoder_kind"] == "fused"
    assert m["dtypes"]["decoder"] == {"activations": "float16", "kv_cache": "float16", "logits": "float32"}
    assert m["dtypes"]["vision"]["image_embeds"] == "float16" and m["dtypes"]["vision"]["pixels"] == "float32"
    assert m["quantization"]["decoder"]["scheme"] == "matmulnbits-8bit"
    assert m["quantization"]["decoder"]["rows_interact"] is False
    dec = onnx.load(str(cuda_bundle / "decoder.onnx")).graph
    ops = [n.op_type for n in dec.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") > 0 and "GroupQueryAttention" in ops
    io = {v.name: v.type.tensor_type.elem_type for v in [*dec.input, *dec.output]}
    assert io["inputs_embeds"] == io["image_embeds"] == io["past.0.key"] == onnx.TensorProto.FLOAT16
    assert io["logits"] == onnx.TensorProto.FLOAT and io["head_index"] == onnx.TensorProto.INT64
    vis = onnx.load(str(cuda_bundle / "vision.onnx")).graph
    assert vis.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # pixels from the C++ kernel
    assert vis.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # straight into the decoder


FLOAT16_LOGIT_TOL = 0.1
"""Cut-head logits of the float16 + MatMulNBits graphs vs PyTorch fp32, teacher-forced (tiny model: 0.033)."""


def test_float16_parity_with_pytorch_on_the_cpu_provider(cuda_bundle):
    par = json.loads((cuda_bundle / "parity.json").read_text())
    v = par["variants"]["int8"]
    assert par["providers"]["int8"] == "CPUExecutionProvider"
    assert v["chunks_identical"] is True and v["token_agreement"] == 1.0
    assert 0.0 < v["logit_max_abs_err"] < FLOAT16_LOGIT_TOL and v["logit_cosine_min"] > 0.999


def test_cuda_bundle_engine_keeps_the_image_on_the_device_and_decodes_by_head(cuda_bundle):
    e = Engine(Bundle.load(cuda_bundle), provider="cpu")
    assert e.act_dtype == np.float16 and e.image_on_device and e.by_head


@pytest.mark.parametrize("navigation", [False, True])
def test_parallel_equals_sequential_on_the_cuda_bundle(cuda_bundle, navigation):
    b = Bundle.load(cuda_bundle)
    seq, par = Engine(b, provider="cpu"), Engine(b, provider="cpu", parallel=True)
    for seed in range(3):
        frames, state = synthetic_inputs(b.layout, 14, seed=30 + seed)
        for e in (seq, par):
            e.start_episode("pick up the red cube", navigation=navigation)
        a, c = seq.step(frames, state), par.step(frames, state)
        assert np.array_equal(a.token_ids, c.token_ids)
        assert c.decode_calls <= a.decode_calls


def test_gpu_targets_refuse_what_would_leave_the_gpu(tiny_ckpt, tmp_path):
    from vla_edge.export.pipeline import ExportError, precision_plan

    with pytest.raises(ExportError, match="float16 kernels only"):
        precision_plan("cuda", "fp32", "fused")
    with pytest.raises(ExportError, match="needs --target cuda"):
        precision_plan("cpu", "fp16", "fused")
    assert precision_plan("cuda", "fp16", "fused").scheme is None
    assert precision_plan("cpu", "int8", "fused").scheme == "dynamic-qint8"
    r = run_cli("export", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--target", "cuda",
                "--precision", "fp32")
    assert r.returncode == 2 and "float16 kernels only" in r.stderr and not (tmp_path / "b").exists()
    assert [line for line in r.stderr.splitlines() if "error" in line] == [r.stderr.strip().splitlines()[-1]]


def test_bench_parallel_reports_both_decodings_and_the_ratio(fused_fp32_bundle, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--bundle", str(fused_fp32_bundle), "--provider", "cpu", "--parallel", "--steps", "2",
                "--warmup", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["parallel_decoding"] is True and rep["sequential"]["chunks_identical_to_parallel"] is True
    assert rep["sequential"]["decode_calls_per_chunk"]["p50"] == rep["tokens_per_step"] - 1
    assert 1 <= rep["decode_calls_per_chunk"]["p50"] <= rep["sequential"]["decode_calls_per_chunk"]["p50"]
    assert rep["parallel_decode_speedup_p50"] > 0 and "gpu" not in rep and rep["cuda_graph"] is False


def test_gpu_check_script_fails_fast_with_one_line_per_missing_piece(tmp_path):
    """Without a GPU the script stops at its checks, before installing or exporting anything."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "SITE": str(tmp_path / "site"), "OUT": str(tmp_path / "out")}
    bad = subprocess.run(["bash", str(script), "--provider", "tpu"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_check: error: --provider cuda|cpu"
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU: the GPU run is tools/gpu_check.sh itself")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("gpu_check: error:")]
    assert r.returncode == 1 and errors and errors[0] == "gpu_check: error: no NVIDIA GPU (nvidia-smi -L failed)"
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())  # nothing installed
