"""vla-edge: an edge runtime for LLaVA-VLA on an AgileX Cobot Magic.

Subpackages:
    vla_edge.edge             runtime: engine, control loop, cameras, CLI (no torch)
    vla_edge.kernels          C++ hot path (image composition, constrained decoding) + numpy references
    vla_edge.export           checkpoint loading, tiny checkpoints, ONNX export (needs the [export] extra)
    vla_edge.firmware_bridge  Piper CAN arms, TRACER serial base, and their simulators
    vla_edge.tools            training and maintenance scripts

(Installed as ``vla_edge/__init__.py`` by CMakeLists.txt.)
"""

from importlib.metadata import PackageNotFoundError, version


class VlaEdgeError(Exception):
    """A user-facing error: bad checkpoint, corrupt bundle, missing device, link fault.

    The CLI prints it as one line (no traceback unless ``--debug``) and exits non-zero. It lives at the
    import root so that every room (``edge``, ``firmware_bridge``, ``export``) raises the same type
    without the lower rooms importing the runtime.
    """


try:
    __version__ = version("vla-edge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
