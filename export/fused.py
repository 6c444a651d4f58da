"""The *fused* decoder graph, written node by node with ``onnx.helper`` from the checkpoint's weights.

Same job as the plain graph (:mod:`vla_edge.export.graphs`), built the way the onnxruntime-genai
model builder builds LLMs: one contrib node per fused operation, and a KV cache that is one
preallocated buffer per layer, shared by ``past.*`` and ``present.*``.

Per layer ``i`` (``H`` hidden, ``Nq`` heads, ``Nkv`` KV heads, ``D`` head_dim)::

    x ─ SimplifiedLayerNormalization (layer 0) | SkipSimplifiedLayerNormalization (residual add fused)
      ─ MatMul [H, (Nq+2Nkv)D] ─ Add bias                        packed q|k|v
      ─ com.microsoft.GroupQueryAttention                        rotary (cos/sin caches), causal, GQA,
                                                                 appends k|v into the shared buffer
      ─ MatMul o_proj ─ SkipSimplifiedLayerNormalization         (residual add fused)
      ─ MatMul gate, MatMul up, gate * Sigmoid(gate) * up, MatMul down

then the last residual add + final norm + cut head run only at the ``logit_index`` positions.

Inputs and outputs (``L`` = ``max_len``, fixed when the graph is built)::

    image_embeds           (B, I, H)            float   the vision graph's output, or 0 rows
    inputs_embeds          (B, E, H)            float   rows from embeddings.npy, or 0 rows
    head_index             (B, N)               int64   cut-head rows (0..n_head-1), or none
    logit_index            (K,)                 int64   which of the B x T positions get logits (row b's
                                                        position t is b * T + t)
    seqlens_k              (B,)                 int32   past_len[b] + T - 1 (GQA's convention)
    total_sequence_length  ()                   int32   max_b past_len[b] + T
    past.{i}.key|value     (B, Nkv, L, D)       float   rows < past_len[b] are row b's cache; the rest unused
    -> logits              (1, K, n_head)       float32 cut head (TokenSpec.head_ids rows)
    -> present.{i}.key|value (B, Nkv, L, D)     float   the same buffer, rows past_len[b]..+T-1 written

The T = I + E + N new positions are ``concat(image_embeds, inputs_embeds, head_table[head_index])``:
a prefill joins the image embeddings (left on the device by the vision graph) to the text rows, and a
decode step is fed by *head index*, gathered from the 261 head rows' embeddings (``head.embeddings``,
a (n_head, H) initializer) inside the graph, so no embedding row is looked up or uploaded by the host.
Every call feeds all three; the unused ones are empty (0 rows). (Empty initializers as defaults
would make them optional, but ONNX Runtime's IO binding cannot bind such "overridable initializers".)

**Batches** (``B`` > 1, :mod:`vla_edge.edge.batch`): every row takes T new positions after its own
``past_len[b]`` (GroupQueryAttention reads each row's length from ``seqlens_k`` and applies the rotary
embedding at the row's own positions), so rows with different prompt lengths share a call when the shorter
ones are padded *at the end*: causal attention keeps a row's real positions blind to its padding, and the
padding's cache rows are overwritten by the row's next call. ``B`` = 1 is the single-robot case.

Bind each ``present`` to the OrtValue of its ``past`` (IO binding) and nothing is copied: the host
tracks ``past_len``, and rolling back (Jacobi decoding) is just lowering it. Without binding,
``session.run`` still works (ONNX Runtime copies the past rows into a new present buffer).

``dtype="float16"`` builds the same graph in half precision (weights, activations, cache; logits are
cast to float32). ONNX Runtime's CUDA GroupQueryAttention has float16/bfloat16 kernels only, so that
is the variant a GPU needs; the float32 graph is the one verified here, on the CPU provider.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
DEFAULT_MAX_LEN = 1024
"""KV buffer length (positions): 730 image tokens + system prompt + instruction + 14 proprio tokens +
suffix + the chunk (up to 73 tokens) fit with room to spare for both the real and the tiny model."""


def rotary_caches(head_dim: int, theta: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_len, head_dim/2) cos and sin tables, computed like transformers' Qwen2 rotary (float32)."""
    import torch  # torch: the [export] extra

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


class _Builder:
    """Collects nodes and initializers; names are readable (``layers.3.attn.qkv.weight``)."""

    def __init__(self, np_dtype):
        self.nodes: list = []
        self.inits: list = []
        self.np_dtype = np_dtype

    def weight(self, name: str, array, dtype=None) -> str:
        from onnx import numpy_helper  # onnx: the [export] extra

        a = np.ascontiguousarray(np.asarray(array, dtype=dtype or self.np_dtype))
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        from onnx import helper  # onnx: the [export] extra

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def build_fused_decoder(lm, text, head_ids, max_len: int = DEFAULT_MAX_LEN, dtype: str = "float32"):
    """The fused decoder as an ``onnx.ModelProto``.

    ``lm``: transformers ``Qwen2ForCausalLM`` (the weights are read from it, float32);
    ``text``: :class:`~vla_edge.export.config.TextConfig`; ``head_ids``: the cut head's token ids
    (``TokenSpec.head_ids``); ``max_len``: KV buffer length in positions.
    """
    from onnx import TensorProto, helper  # onnx: the [export] extra

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else np.float16
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    H, D, nq, nkv, eps = text.hidden, text.head_dim, text.heads, text.kv_heads, text.rms_norm_eps
    sd = {k: v.detach().float().numpy() for k, v in lm.state_dict().items()}
    g = _Builder(np_dtype)

    cos, sin = rotary_caches(D, text.rope_theta, max_len)
    g.weight("rotary.cos", cos)
    g.weight("rotary.sin", sin)

    def norm(name: str, x: str, weight: str, skip: str | None = None) -> tuple[str, str | None]:
        """RMSNorm of x (+ skip when given); returns (normed, x + skip or None)."""
        w = g.weight(f"{name}.weight", sd[weight])
        if skip is None:
            return g.node("SimplifiedLayerNormalization", [x, w], [f"{name}.out"], name, axis=-1, epsilon=eps,
                          stash_type=1)[0], None
        out = g.node("SkipSimplifiedLayerNormalization", [x, skip, w], [f"{name}.out", "", "", f"{name}.sum"],
                     name, domain=MS_DOMAIN, epsilon=eps)
        return out[0], out[3]

    def linear(name: str, x: str, w_t: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ w_t (+ bias); ``w_t`` is (in, out) so that the MatMul's B is a constant (quantisable)."""
        y = g.node("MatMul", [x, g.weight(f"{name}.weight", w_t)], [f"{name}.mm"], f"{name}.MatMul")[0]
        if bias is not None:
            y = g.node("Add", [y, g.weight(f"{name}.bias", bias)], [f"{name}.out"], f"{name}.Add")[0]
        return y

    head_rows = np.asarray(head_ids, np.int64)
    head_table = g.weight("head.embeddings", sd["model.embed_tokens.weight"][head_rows])  # (n_head, H)
    fed = g.node("Gather", [head_table, "head_index"], ["head.fed"], "head.Gather", axis=0)[0]
    x = g.node("Concat", ["image_embeds", "inputs_embeds", fed], ["embeds"], "embeds.Concat", axis=1)[0]
    inputs = [
        helper.make_tensor_value_info("image_embeds", elem, ["batch", "image_len", H]),
        helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "embeds_len", H]),
        helper.make_tensor_value_info("head_index", TensorProto.INT64, ["batch", "head_len"]),
        helper.make_tensor_value_info("logit_index", TensorProto.INT64, ["n_logits"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "n_logits", len(head_ids)])]
    residual, mlp = None, None
    for i in range(text.layers):
        p = f"model.layers.{i}."
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kv}", elem, ["batch", nkv, max_len, D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", elem, ["batch", nkv, max_len, D]))
        if i == 0:
            h, residual = norm(f"layers.{i}.input_norm", x, p + "input_layernorm.weight")[0], x
        else:
            h, residual = norm(f"layers.{i}.input_norm", mlp, p + "input_layernorm.weight", skip=residual)
        a = p + "self_attn."
        qkv_w = np.concatenate([sd[a + f"{n}_proj.weight"] for n in "qkv"]).T
        qkv_b = np.concatenate([sd[a + f"{n}_proj.bias"] for n in "qkv"])
        qkv = linear(f"layers.{i}.attn.qkv", h, qkv_w, qkv_b)
        attn = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length",
             "rotary.cos", "rotary.sin"],
            [f"layers.{i}.attn.out", f"present.{i}.key", f"present.{i}.value"],
            f"layers.{i}.attn.GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=nq, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
        )[0]
        o = linear(f"layers.{i}.attn.o_proj", attn, sd[a + "o_proj.weight"].T)
        h, residual = norm(f"layers.{i}.post_attention_norm", o, p + "post_attention_layernorm.weight", skip=residual)
        m = p + "mlp."
        gate = linear(f"layers.{i}.mlp.gate_proj", h, sd[m + "gate_proj.weight"].T)
        up = linear(f"layers.{i}.mlp.up_proj", h, sd[m + "up_proj.weight"].T)
        sig = g.node("Sigmoid", [gate], [f"layers.{i}.mlp.sigmoid"], f"layers.{i}.mlp.Sigmoid")[0]
        act = g.node("Mul", [gate, sig], [f"layers.{i}.mlp.silu"], f"layers.{i}.mlp.SiLU")[0]
        gated = g.node("Mul", [act, up], [f"layers.{i}.mlp.gated"], f"layers.{i}.mlp.Mul")[0]
        mlp = linear(f"layers.{i}.mlp.down_proj", gated, sd[m + "down_proj.weight"].T)

    # Only the K requested positions go through the last residual add, the final norm and the head; the
    # B rows of T positions are one row of B x T first, so logit_index picks positions of any row.
    flat = g.weight("final.flat_shape", np.array([1, -1, H], np.int64), dtype=np.int64)
    picked = []
    for t, n in ((mlp, "mlp"), (residual, "residual")):
        row = g.node("Reshape", [t, flat], [f"final.{n}.flat"], f"final.Reshape.{n}")[0]
        picked.append(g.node("Gather", [row, "logit_index"], [f"final.{n}"], f"final.Gather.{n}", axis=1)[0])
    h, _ = norm("final_norm", picked[0], "model.norm.weight", skip=picked[1])
    head = sd["lm_head.weight"][head_rows].T  # (H, n_head)
    logits = linear("head", h, head)
    if dtype == "float16":
        logits = g.node("Cast", [logits], ["head.float"], "head.Cast", to=TensorProto.FLOAT)[0]
    g.node("Identity", [logits], ["logits"], "logits")

    # ONNX shape inference stops at contrib ops; declaring every intermediate's element type keeps
    # the graph self-describing for tools that need it (the quantisers do).
    declared = {v.name for v in inputs + outputs}
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT if n.op_type == "Cast" else elem, None)
                  for n in g.nodes for name in n.output if name and name not in declared]
    graph = helper.make_graph(g.nodes, "vla_edge_fused_decoder", inputs, outputs, g.inits, value_info=value_info)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="vla-edge",
        producer_version="fused-decoder",
    )
    model.ir_version = 10
    return model


def export_fused_decoder(model, head_ids, path: Path, max_len: int = DEFAULT_MAX_LEN, dtype: str = "float32") -> None:
    """Build the fused graph of a :class:`~vla_edge.export.model.LlavaVLA` and save it to ``path``.

    Weights go to ``<path>.data`` only when the graph would pass protobuf's 2 GB limit.
    """
    import onnx  # onnx: the [export] extra

    proto = build_fused_decoder(model.lm, model.cfg.text, head_ids, max_len=max_len, dtype=dtype)
    large = proto.ByteSize() > 1.8e9
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data")
    log.info("fused decoder: %d nodes, max_len %d, %s -> %s", len(proto.graph.node), max_len, dtype, path)
