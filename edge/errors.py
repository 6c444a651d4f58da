"""The one exception type vla-edge raises for bad input or faults a user can act on.

The CLI prints such errors as a single line (no traceback unless ``--debug``) and exits non-zero. The
class itself is defined at the import root (:class:`vla_edge.VlaEdgeError`), which the device layer
(``firmware_bridge``) reaches without importing the runtime; this module is its name in ``edge``.
"""

from vla_edge import VlaEdgeError

__all__ = ["VlaEdgeError"]
