"""The one exception type vla-edge raises for bad input or faults a user can act on.

The CLI prints such errors as a single line (no traceback unless ``--debug``) and exits non-zero.
"""


class VlaEdgeError(Exception):
    """A user-facing error: bad checkpoint, corrupt bundle, missing device, link fault."""
