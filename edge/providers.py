"""Which ONNX Runtime execution providers a session gets: CUDA when asked for (or available), else CPU.

Usage::

    pick_providers("auto")  # ["CUDAExecutionProvider", "CPUExecutionProvider"] with onnxruntime-gpu, else CPU only
    pick_providers("cpu")   # ["CPUExecutionProvider"]
    pick_providers("cuda")  # as auto, or ProviderError when this onnxruntime has no CUDA provider
    "CUDAExecutionProvider" in available_providers()  # what this onnxruntime install offers

Provider names are ONNX Runtime's; the list is in priority order, as ``InferenceSession(providers=...)``
takes it. ``onnxruntime`` is imported on first call, not with this module. No torch here.
"""

from __future__ import annotations

import logging

from vla_edge import VlaEdgeError

log = logging.getLogger(__name__)

class ProviderError(VlaEdgeError):
    """An unknown provider name, or CUDA asked for from an onnxruntime without it (the engine re-raises it
    as ``EngineError``)."""


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA/cuDNN libraries of the nvidia-* wheels (a torch install brings
    them) before its provider loads; a robot with system CUDA libraries does not need it."""
    import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra

    try:
        ort.preload_dlls()
    except Exception as e:  # noqa: BLE001 - best effort: the session reports what is really missing
        log.debug("onnxruntime.preload_dlls: %s", e)


def available_providers() -> list[str]:
    import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra

    return ort.get_available_providers()


def pick_providers(provider: str) -> list[str]:
    """``auto``: CUDA when this ONNX Runtime has it, else CPU. ``cuda`` fails if it is missing."""
    avail = available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise ProviderError(
                "CUDA provider requested but this onnxruntime has none "
                f"(available: {', '.join(avail)}); install vla-edge[gpu] (onnxruntime-gpu)"
            )
        preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in avail else [
            "CPUExecutionProvider"
        ]
    raise ProviderError(f"unknown provider {provider!r} (auto, cpu, cuda)")
