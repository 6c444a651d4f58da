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

    The tree (as python-can separates its errors, devices apart from everything else)::

        VlaEdgeError                     bad input or a fault a user can act on
        +-- DeviceFault                  a device misbehaved; the robot is put in its safe state
        |   +-- CameraFault              firmware_bridge.cameras: cannot open, wrong format, stale, gone
        |   +-- ArmFault                 firmware_bridge.piper_arm: CAN interface missing, arm silent,
        |   |                            motors not enabled, not connected (also the master arm reader)
        |   +-- BaseFault                firmware_bridge.tracer_base: serial port missing or failing,
        |                                no feedback, used before connect
        +-- everything else              configuration, arguments, files: BundleError, EngineError,
                                         CheckpointError, ConvertError, UnsafeAction, ... (their modules)
    """


class DeviceFault(VlaEdgeError):
    """A device misbehaved: camera, CAN arm, serial base; the robot is put in its safe state.

    Raised by the drivers in ``firmware_bridge`` when a device cannot be opened, goes silent, or its
    link breaks. Catch it apart from :class:`VlaEdgeError` to tell hardware trouble from bad input.
    """


try:
    __version__ = version("vla-edge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
