"""Reduced-precision copies of the exported fp32 graphs.

* ``cuda``: weight-only 8-bit ``MatMulNBits`` (block 128, symmetric). For the GPU the graphs are
  float16 first (:func:`to_float16` for vision, the float16 fused decoder), so ``MatMulNBits`` runs
  with float16 activations; the rows of a batched call do not interact (no activation scaling).
* ``cpu``: dynamic QInt8 (weights int8 per tensor, activations quantised per call). On 2 CPU cores
  with the 0.5B shape it measured faster per step than MatMulNBits with ``accuracy_level=4``
  (1.32 s / 1.41 s / 32 ms vs 2.11 s / 2.10 s / 28.6 ms for vision / prefill / token), so it is the
  CPU default; ``matmulnbits`` can still be chosen. Its activation scale is computed over all rows of
  a call, so rows interact (recorded as ``rows_interact``: parallel decoding is refused on it).

Usage::

    quantize(Path("decoder.onnx"), Path("q/decoder.onnx"), "matmulnbits-8bit")  # -> manifest record
    to_float16(Path("vision.onnx"), Path("f16/vision.onnx"), keep_float32=["pixels"])
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMES = {"cpu": "dynamic-qint8", "cuda": "matmulnbits-8bit"}
LARGE_PROTO_BYTES = 1.8e9
"""Above this a graph keeps its weights in ``<name>.data`` (protobuf's 2 GB limit)."""


def quantize(src: Path, dst: Path, scheme: str) -> dict:
    """Write the quantised copy of ``src`` to ``dst``; returns what was done (for the manifest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if scheme == "dynamic-qint8":
            # onnxruntime: the [cpu] or [gpu] extra
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
            return {"scheme": scheme, "weight_type": "QInt8", "ops": ["MatMul"], "rows_interact": True}
        if scheme in ("matmulnbits-8bit", "matmulnbits-8bit-acc4"):
            # onnxruntime: the [cpu] or [gpu] extra
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            acc = 4 if scheme.endswith("acc4") else None
            logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per node
            q = MatMulNBitsQuantizer(str(src), bits=8, block_size=128, is_symmetric=True, accuracy_level=acc)
            q.process()
            _save(q.model.model, dst)
            return {"scheme": scheme, "bits": 8, "block_size": 128, "accuracy_level": acc, "rows_interact": False}
    raise ValueError(f"unknown quantisation scheme {scheme!r}")


def to_float16(src: Path, dst: Path, keep_float32: list[str]) -> dict:
    """A float16 copy of ``src`` (weights and activations); the graph inputs/outputs named in
    ``keep_float32`` stay float32 (a Cast is inserted). Returns the manifest record."""
    # onnx: the [export] extra; onnxruntime: the [cpu] or [gpu] extra
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=list(keep_float32))
    _save(model, dst)
    return {"scheme": "float16", "kept_float32": list(keep_float32)}


def _save(model, dst: Path) -> None:
    import onnx  # onnx: the [export] extra

    large = model.ByteSize() > LARGE_PROTO_BYTES
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data")
