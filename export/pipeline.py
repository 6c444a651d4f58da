"""``vla-edge export``: checkpoint -> verified ONNX bundle, one checked step at a time.

Steps (each verifies its own output before the next runs):

1. load      read and validate the checkpoint (weights_only, names, shapes)
2. vision    export vision.onnx (fp32); ORT output must match PyTorch
3. decoder   export decoder.onnx (fp32, cut head, KV cache; ``--decoder plain`` TorchScript export or
            ``--decoder fused`` GroupQueryAttention graph); prefill + decode must match a full forward
4. assets    embeddings.npy, tokenizer.json, prompt template ids
5. quantize  the target's copies of both graphs (:func:`precision_plan`): cpu int8 = dynamic QInt8;
            cuda = float16 vision + float16 fused decoder (+ weight-only 8-bit MatMulNBits for int8),
            float32 logits; skipped for --precision fp32
6. parity    PyTorch vs fp32 vs INT8 on fixed inputs -> parity.json; fails if fp32 greedy tokens differ
7. manifest  every file's sha256; the temporary directory is renamed into place

Nothing is written at ``--out`` unless every step passed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vla_edge
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.manifest import Bundle, check_replaceable, write_manifest
from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, QWEN2_TOKENS, cobot_magic_policy
from vla_edge.edge.engine import Engine
from vla_edge.edge.kv_cache import gqa_lengths
from vla_edge.edge.providers import available_providers
from vla_edge.edge.telemetry import log_console, out_console
from vla_edge.export import fused, quantize
from vla_edge.export.checkpoint import ACTION_DECODING, Checkpoint, LoadOptions, load_checkpoint
from vla_edge.export.config import LLAVA_OV_05B
from vla_edge.export.fused import DEFAULT_MAX_LEN
from vla_edge.export.parity import compare, fixed_inputs
from vla_edge.export.tiny import build_tiny_tokenizer

log = logging.getLogger(__name__)


class ExportError(VlaEdgeError):
    """An export step failed its own check."""


@dataclass
class ExportOptions:
    out: Path
    target: str = "cpu"
    precision: str = "int8"
    opset: int = 18
    parity_samples: int = 2
    force: bool = False
    quant_scheme: str | None = None  # default: quantize.SCHEMES[target]
    decoder: str = "auto"  # "fused" (fused.export_fused_decoder), "plain" (graphs.export_decoder), or "auto"
    max_len: int = DEFAULT_MAX_LEN  # fused only: KV buffer length in positions


@dataclass
class ExportResult:
    bundle: Path
    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    parity: dict = field(default_factory=dict)


def check_out(out: Path, force: bool, ckpt_path: Path | None = None) -> None:
    """Refuse (one line) an ``--out`` that exists unless ``force`` and it is a vla-edge bundle directory."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists (use --force to replace a bundle)")
        check_replaceable(out, keep=[ckpt_path] if ckpt_path is not None else [])


def export_bundle(ckpt, opts: ExportOptions, progress=None) -> ExportResult:
    """Export a loaded :class:`~vla_edge.export.checkpoint.Checkpoint` to ``opts.out``."""
    import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra
    import torch  # torch: the [export] extra
    from vla_edge.export import graphs  # imports torch at its top
    from vla_edge.export.model import LlavaVLA  # imports torch at its top
    from vla_edge.export.reference import TorchReference  # imports torch at its top

    out = Path(opts.out)
    check_out(out, opts.force, ckpt.path)  # before any slow work: --force replaces only a bundle
    opts.decoder = resolve_decoder(opts.decoder, ckpt.model.text.head_dim)
    plan = precision_plan(opts.target, opts.precision, opts.decoder, opts.quant_scheme)
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists (use --force to replace it)")
    if ckpt.tokenizer_json is None:
        raise ExportError("checkpoint has no tokenizer (wrapper 'tokenizer_json' or tokenizer.json in the directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    scratch = Path(tempfile.mkdtemp(prefix="vla-edge-export-"))
    res = ExportResult(bundle=out)
    step = _Steps(progress, res.seconds)
    try:
        torch.manual_seed(0)
        with step("build PyTorch model"):
            model = LlavaVLA.from_checkpoint(ckpt)
        fp32_vision, fp32_decoder = scratch / "vision.onnx", scratch / "decoder.onnx"
        with step("export vision graph"):
            graphs.export_vision(model, fp32_vision, opts.opset)
            _check_vision(model, fp32_vision)
        with step(f"export decoder graph ({opts.decoder})"):
            if opts.decoder == "fused":
                fused.export_fused_decoder(model, ckpt.tokens.head_ids, fp32_decoder, max_len=opts.max_len)
            else:
                graphs.export_decoder(model, ckpt.tokens.head_ids, fp32_decoder, opts.opset)
            _check_decoder(model, ckpt.tokens.head_ids, fp32_decoder, opts.decoder, opts.max_len)
        encode = tokenizer_encoder(ckpt.tokenizer_json)
        prompt = PromptTemplate.build(encode, ckpt.tokens)
        emb = model.lm.model.embed_tokens.weight.detach().float().numpy()
        manifest = _manifest(ckpt, opts, prompt, ort.__version__)
        fp32_dir = scratch / "fp32"
        with step("write embeddings, tokenizer, prompt"):
            for d, dtype in ((fp32_dir, np.float32), (tmp, np.float16 if opts.precision != "fp32" else np.float32)):
                d.mkdir(exist_ok=True)
                np.save(d / "embeddings.npy", emb.astype(dtype))
                (d / "tokenizer.json").write_text(ckpt.tokenizer_json)
            shutil.copy(fp32_vision, fp32_dir / "vision.onnx")
            shutil.copy(fp32_decoder, fp32_dir / "decoder.onnx")
            write_manifest(fp32_dir, {**manifest, "precision": "fp32", "quantization": None})
        variants = {"fp32": fp32_dir}
        manifest["dtypes"] = plan.dtypes()
        if opts.precision == "fp32":
            shutil.copy(fp32_vision, tmp / "vision.onnx")
            shutil.copy(fp32_decoder, tmp / "decoder.onnx")
            manifest["quantization"] = None
        elif plan.decoder_dtype == "float16":
            with step(f"float16 graphs for {opts.target}" + (f" + {plan.scheme}" if plan.scheme else "")):
                manifest["quantization"] = _float16_graphs(model, ckpt.tokens.head_ids, opts, plan, fp32_vision,
                                                           scratch, tmp)
            write_manifest(tmp, {**manifest})  # provisional, so the engine can load it for parity
            variants[opts.precision] = tmp
        else:
            with step(f"quantize ({plan.scheme})"):
                qv = quantize.quantize(fp32_vision, tmp / "vision.onnx", plan.scheme)
                qd = quantize.quantize(fp32_decoder, tmp / "decoder.onnx", plan.scheme)
                manifest["quantization"] = {"vision": qv, "decoder": qd}
            write_manifest(tmp, {**manifest})  # provisional, so the engine can load it for parity
            variants[opts.precision] = tmp
        with step(f"parity on {opts.parity_samples} fixed inputs"):
            engines = {name: Engine(Bundle.load(d), provider="cpu") for name, d in variants.items()}
            reference = TorchReference(model, ckpt.tokens, ckpt.policy, ckpt.layout, prompt, encode)
            inputs = fixed_inputs(ckpt.layout, ckpt.policy.robot_state_dim, opts.parity_samples)
            res.parity, gpu_error = _parity(reference, engines, inputs, tmp if opts.target == "cuda" else None,
                                            opts.precision)
            if gpu_error:
                res.parity["gpu_error"] = gpu_error
            res.parity["checkpoint_sha256"] = ckpt.sha256
            (tmp / "parity.json").write_text(json.dumps(res.parity, indent=2) + "\n")
            if not res.parity["variants"]["fp32"]["chunks_identical"]:
                raise ExportError(
                    "fp32 export does not reproduce PyTorch's greedy tokens "
                    f"(agreement {res.parity['variants']['fp32']['token_agreement']:.3f}); see parity.json in {scratch}"
                )
        with step("write manifest, move bundle into place"):
            write_manifest(tmp, manifest)
            Bundle.load(tmp)  # verify what we wrote
            if out.exists():
                shutil.rmtree(out)
            tmp.chmod(0o755)  # mkdtemp made it 0700; a bundle is read by other users (the robot's service)
            tmp.rename(out)
        res.sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        return res
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class PrecisionPlan:
    """What ``--target`` and ``--precision`` make of the two graphs (recorded in the manifest)."""

    vision_dtype: str  # "float32" | "float16" (activations and weights)
    decoder_dtype: str
    scheme: str | None  # weight quantisation (quantize.SCHEMES), None for none

    def dtypes(self) -> dict:
        return {"vision": {"pixels": "float32", "image_embeds": self.vision_dtype, "activations": self.vision_dtype},
                "decoder": {"activations": self.decoder_dtype, "kv_cache": self.decoder_dtype, "logits": "float32"}}


def precision_plan(target: str, precision: str, decoder: str, quant_scheme: str | None = None) -> PrecisionPlan:
    """Validate ``--target``/``--precision``/``--decoder`` together, before any slow work.

    cuda + fused: float16 graphs (ONNX Runtime's CUDA GroupQueryAttention has float16/bfloat16 kernels
    only: a float32 fused graph would run attention on the CPU provider), ``int8`` adding weight-only
    MatMulNBits. cpu: float32 graphs, ``int8`` = dynamic QInt8. ``fp16`` is for the GPU only.
    """
    if target not in quantize.SCHEMES:
        raise ExportError(f"unknown target {target!r} ({', '.join(quantize.SCHEMES)})")
    if precision not in ("int8", "fp16", "fp32"):
        raise ExportError(f"unknown precision {precision!r} (int8, fp16, fp32)")
    scheme = (quant_scheme or quantize.SCHEMES[target]) if precision == "int8" else None
    if target == "cuda" and decoder == "fused":
        if precision == "fp32":
            raise ExportError("--target cuda --precision fp32: ONNX Runtime's CUDA GroupQueryAttention has float16 "
                              "kernels only, so attention would run on the CPU; use --precision fp16 or int8")
        return PrecisionPlan("float16", "float16", scheme)
    if precision == "fp16":
        raise ExportError("--precision fp16 needs --target cuda and the fused decoder (the CPU runs float32 graphs)")
    return PrecisionPlan("float32", "float32", scheme)


def _parity(reference, engines: dict, inputs, cuda_bundle: Path | None, precision: str) -> tuple[dict, str | None]:
    """The parity report of ``engines`` (CPU provider) and, when this machine has CUDA and the bundle is
    for it, of the bundle on the GPU too (variant ``<precision>@cuda``: the GPU parity check).

    A GPU failure does not fail the export (the bundle is the same either way): it is returned, recorded
    in parity.json as ``gpu_error`` and logged; the CPU report is computed without it.
    """
    gpu_error = None
    if cuda_bundle is not None and "CUDAExecutionProvider" in available_providers():
        try:
            with_gpu = {**engines, f"{precision}@cuda": Engine(Bundle.load(cuda_bundle), provider="cuda")}
            report = compare(reference, with_gpu, inputs)
            report["providers"] = {name: e.provider for name, e in with_gpu.items()}
            return report, None
        except Exception as e:  # noqa: BLE001 - any ONNX Runtime failure on the GPU is reported, not fatal
            gpu_error = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("parity on the GPU failed (%s); the report covers the CPU provider only", gpu_error)
    report = compare(reference, engines, inputs)
    report["providers"] = {name: e.provider for name, e in engines.items()}
    return report, gpu_error


def _float16_graphs(model, head_ids, opts: ExportOptions, plan: PrecisionPlan, fp32_vision: Path, scratch: Path,
                    out: Path) -> dict:
    """The GPU graphs into ``out``: float16 vision (pixels stay float32), float16 fused decoder with
    float32 logits, its MatMuls weight-only quantised when ``plan.scheme``; each checked against PyTorch."""
    rec = {"vision": quantize.to_float16(fp32_vision, out / "vision.onnx", keep_float32=["pixels"])}
    _check_vision(model, out / "vision.onnx", tol=FLOAT16_TOL)
    dec16 = scratch / "decoder.float16.onnx"
    fused.export_fused_decoder(model, head_ids, dec16, max_len=opts.max_len, dtype="float16")
    _check_decoder(model, head_ids, dec16, "fused", opts.max_len, tol=FLOAT16_TOL)
    if plan.scheme:
        rec["decoder"] = quantize.quantize(dec16, out / "decoder.onnx", plan.scheme)
    else:
        shutil.copy(dec16, out / "decoder.onnx")
        rec["decoder"] = {"scheme": "float16", "rows_interact": False}
    rec["decoder"]["activations"] = "float16"
    return rec


FLOAT16_TOL = 2e-2
"""Export check of the float16 graphs against PyTorch fp32: max abs error <= this x max(1, max |ref|)."""

FUSED_HEAD_DIM_MULTIPLE = 16
"""ONNX Runtime's GroupQueryAttention kernels need a head size that is a multiple of 16."""


def resolve_decoder(kind: str, head_dim: int) -> str:
    """``auto`` -> ``fused`` when the model's head size allows it (the 0.5B's 64 does), else ``plain``."""
    fits = head_dim % FUSED_HEAD_DIM_MULTIPLE == 0
    if kind == "auto":
        if not fits:
            log.info("decoder: plain (head size %d is not a multiple of %d, which the fused graph needs)",
                     head_dim, FUSED_HEAD_DIM_MULTIPLE)
        return "fused" if fits else "plain"
    if kind not in DECODER_KINDS:
        raise ExportError(f"unknown decoder kind {kind!r} (auto, {', '.join(DECODER_KINDS)})")
    if kind == "fused" and not fits:
        raise ExportError(f"--decoder fused needs a head size that is a multiple of {FUSED_HEAD_DIM_MULTIPLE} "
                          f"(this model's is {head_dim}): use --decoder plain or auto")
    return kind


def _manifest(ckpt, opts: ExportOptions, prompt: PromptTemplate, ort_version: str) -> dict:
    import onnx  # onnx: the [export] extra
    import torch  # torch: the [export] extra
    import transformers  # transformers: the [export] extra

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"name": ckpt.path.name, "sha256": ckpt.sha256},
        "target": opts.target,
        "precision": opts.precision,
        "versions": {
            "vla_edge": vla_edge.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort_version,
            "opset": opts.opset,
        },
        "model": ckpt.model.to_dict(),
        "tokens": ckpt.tokens.to_dict(),
        "bin_edges": ckpt.tokens.bin_edges.tolist(),
        "head_ids": ckpt.tokens.head_ids.tolist(),
        "policy": ckpt.policy.to_dict(),
        "image_layout": ckpt.layout.to_dict(),
        "prompt": prompt.to_dict(),
        "roles": {"vision": "vision.onnx", "decoder": "decoder.onnx", "embeddings": "embeddings.npy",
                  "tokenizer": "tokenizer.json"},
        "decoder_kind": opts.decoder,
        "max_len": opts.max_len if opts.decoder == "fused" else None,
        "graphs": _graph_io(ckpt.model, opts.decoder, opts.max_len),
    }


DECODER_KINDS = ("plain", "fused")


def _graph_io(m, decoder: str = "plain", max_len: int = 0) -> dict:
    t = m.text
    dec_in = {"inputs_embeds": [1, "new_len", t.hidden], "logit_index": ["n_logits"]}
    dec_out = {"logits": [1, "n_logits", "n_head"]}
    if decoder == "fused":
        # a batch of B robots: row b's positions past_len[b].. (vla_edge.edge.batch); logit_index over B x T
        dec_in = {"image_embeds": ["batch", "image_len", t.hidden], "inputs_embeds": ["batch", "embeds_len", t.hidden],
                  "head_index": ["batch", "head_len"], "logit_index": ["n_logits"], "seqlens_k": ["batch"],
                  "total_sequence_length": []}
        past = present = ["batch", t.kv_heads, max_len, t.head_dim]  # one shared buffer per tensor
    else:
        past = [1, t.kv_heads, "past_len", t.head_dim]
        present = [1, t.kv_heads, "past_len + new_len", t.head_dim]
    for i in range(t.layers):
        for k in ("key", "value"):
            dec_in[f"past.{i}.{k}"] = past
            dec_out[f"present.{i}.{k}"] = present
    s = m.vision.image_size
    return {
        "vision": {"inputs": {"pixels": ["batch", 3, s, s]},
                   "outputs": {"image_embeds": ["batch", m.image_tokens, t.hidden]}},
        "decoder": {"inputs": dec_in, "outputs": dec_out},
    }


def _session(path: Path):
    import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_vision(model, path: Path, tol: float = 1e-3) -> None:
    import torch  # torch: the [export] extra

    s = model.cfg.vision.image_size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        ref = model.image_embeds(x).numpy()
    got = _session(path).run(None, {"pixels": x.numpy()})[0]
    err = float(np.abs(got - ref).max())
    log.info("vision graph: max abs error vs PyTorch %.2e", err)
    if got.shape != ref.shape or err > tol * max(1.0, float(np.abs(ref).max())):
        raise ExportError(f"vision graph does not match PyTorch (shape {got.shape} vs {ref.shape}, max err {err:.2e})")


def _check_decoder(model, head_ids, path: Path, kind: str = "plain", max_len: int = 0, tol: float = 1e-3) -> None:
    """Prefill of the first part, a one-token decode and a multi-token block must equal one full forward."""
    import torch  # torch: the [export] extra

    t = model.cfg.text
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 12, t.hidden, generator=g) * 0.5
    with torch.no_grad():
        full = model.lm(inputs_embeds=emb).logits[0][:, torch.as_tensor(head_ids)].numpy()
    sess = _session(path)
    types = {i.name: i.type for i in sess.get_inputs()}
    act = np.float16 if types["inputs_embeds"] == "tensor(float16)" else np.float32  # the cuda graph: float16
    rows = max_len if kind == "fused" else 0  # fused: fixed-length buffers; plain: the cache grows
    past = [np.zeros((1, t.kv_heads, rows, t.head_dim), act)] * (2 * t.layers)
    got = []
    for lo, hi in ((0, 8), (8, 9), (9, 12)):
        feed = {"inputs_embeds": emb[:, lo:hi].numpy().astype(act), "logit_index": np.arange(hi - lo, dtype=np.int64)}
        if kind == "fused":
            feed["seqlens_k"], feed["total_sequence_length"] = gqa_lengths(lo, hi - lo)
        if "head_index" in types:  # the fused graph's other row sources, empty here
            feed["head_index"] = np.zeros((1, 0), np.int64)
            feed["image_embeds"] = np.zeros((1, 0, t.hidden), act)
        for i in range(t.layers):
            feed[f"past.{i}.key"], feed[f"past.{i}.value"] = past[2 * i], past[2 * i + 1]
        outs = sess.run(None, feed)
        got.append(outs[0][0])
        past = outs[1:]
    got = np.concatenate(got)
    err = float(np.abs(got - full).max())
    log.info("decoder graph: cached vs full forward max abs error %.2e", err)
    if err > tol * max(1.0, float(np.abs(full).max())):
        raise ExportError(f"decoder graph with KV cache does not match a full PyTorch forward (max err {err:.2e})")


class _Steps:
    """Times each step and shows it on a rich progress display (or the log without one)."""

    def __init__(self, progress, seconds: dict):
        self.progress = progress
        self.seconds = seconds

    def __call__(self, name: str):
        @contextlib.contextmanager
        def run():
            task = self.progress.add_task(name, total=1) if self.progress else None
            log.debug("export: %s", name)
            t0 = time.perf_counter()
            yield
            self.seconds[name] = time.perf_counter() - t0
            if self.progress:
                self.progress.update(task, completed=1)  # the elapsed column shows its time

        return run()


def random_checkpoint(shape: str):
    """A checkpoint of a real shape with random weights (for benchmarks; nothing downloaded)."""
    import torch  # torch: the [export] extra
    from vla_edge.export.model import LlavaVLA  # imports torch at its top

    if shape != "llava-ov-0.5b":
        raise ExportError(f"unknown shape {shape!r}")
    torch.manual_seed(0)
    model = LlavaVLA(LLAVA_OV_05B)
    return Checkpoint(
        path=Path(shape),
        sha256=f"random-{shape}-seed0",
        model=LLAVA_OV_05B,
        state_dict=model.llava_state_dict(),
        policy=cobot_magic_policy(),
        layout=COBOT_MAGIC_LAYOUT,
        tokens=QWEN2_TOKENS,
        tokenizer_json=build_tiny_tokenizer(),  # stand-in: only instruction ids are taken from it
    )


def print_summary(res: ExportResult, console) -> None:
    sizes = Table(title="bundle files", title_justify="left")
    sizes.add_column("file")
    sizes.add_column("MB", justify="right")
    for name, n in res.sizes.items():
        sizes.add_row(name, f"{n / 1e6:.1f}")
    console.print(sizes)
    par = Table(title="parity vs PyTorch fp32")
    for c in ("variant", "logit max|err|", "logit mean|err|", "cos min", "token agreement", "chunks identical",
              "action max|err|"):
        par.add_column(c, justify="right")
    for name, v in res.parity.get("variants", {}).items():
        par.add_row(name, f"{v['logit_max_abs_err']:.2e}", f"{v['logit_mean_abs_err']:.2e}",
                    f"{v['logit_cosine_min']:.6f}", f"{v['token_agreement']:.3f}", str(v["chunks_identical"]),
                    f"{v['action_max_abs_err']:.4f}")
    console.print(par)
    console.print(f"wrote bundle {res.bundle} in {sum(res.seconds.values()):.1f} s", soft_wrap=True, highlight=False)


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def main(args) -> int:
    console: Console = log_console()  # progress and logs: stderr, one console (logs print above the progress)
    if bool(args.ckpt) == bool(args.shape):
        raise ExportError("give exactly one of --ckpt PATH or --shape NAME")
    check_out(Path(args.out), args.force, Path(args.ckpt) if args.ckpt else None)
    opts = ExportOptions(out=Path(args.out), target=args.target, precision=args.precision, opset=args.opset,
                         parity_samples=args.parity_samples, force=args.force, decoder=args.decoder,
                         max_len=args.max_len or DEFAULT_MAX_LEN)
    t0 = time.perf_counter()
    extras = LoadOptions(stats=_path(args.stats), tokenizer=_path(args.tokenizer), layout=args.layout,
                         vision_tower=args.vision_tower, bins=args.bins, resize_order=args.resize_order,
                         actions=args.actions)
    ckpt = load_checkpoint(args.ckpt, extras) if args.ckpt else random_checkpoint(args.shape)
    log.info("loaded %s (%s) in %.1f s", ckpt.path, ckpt.sha256[:12], time.perf_counter() - t0)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress:
        res = export_bundle(ckpt, opts, progress)
    print_summary(res, out_console())  # results: stdout
    if ckpt.actions_from:
        out_console().print(f"actions decoded as {ckpt.policy.actions} ({ckpt.actions_from}): "
                            f"{ACTION_DECODING[ckpt.policy.actions]}; --actions to change it",
                            soft_wrap=True, highlight=False)
    return 0
