"""INT8 quantisation of the exported fp32 graphs.

* ``cuda``: weight-only 8-bit ``MatMulNBits`` (block 128, symmetric), fp32 activations here;
  ONNX Runtime's CUDA provider runs it with fp16/fp32 activations.
* ``cpu``: dynamic QInt8 (weights int8 per tensor, activations quantised per call). On 2 CPU cores
  with the 0.5B shape it measured faster per step than MatMulNBits with ``accuracy_level=4``
  (1.32 s / 1.41 s / 32 ms vs 2.11 s / 2.10 s / 28.6 ms for vision / prefill / token), so it is the
  CPU default; ``matmulnbits`` can still be chosen.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMES = {"cpu": "dynamic-qint8", "cuda": "matmulnbits-8bit"}


def quantize(src: Path, dst: Path, scheme: str) -> dict:
    """Write the quantised copy of ``src`` to ``dst``; returns what was done (for the manifest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if scheme == "dynamic-qint8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
            return {"scheme": scheme, "weight_type": "QInt8", "ops": ["MatMul"]}
        if scheme in ("matmulnbits-8bit", "matmulnbits-8bit-acc4"):
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            acc = 4 if scheme.endswith("acc4") else None
            q = MatMulNBitsQuantizer(str(src), bits=8, block_size=128, is_symmetric=True, accuracy_level=acc)
            q.process()
            onnx.save_model(q.model.model, str(dst))
            return {"scheme": scheme, "bits": 8, "block_size": 128, "accuracy_level": acc}
    raise ValueError(f"unknown quantisation scheme {scheme!r}")
