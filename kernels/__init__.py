"""C++ kernels (pybind11) for the per-step hot path."""

from vla_edge.kernels._core import build_info

__all__ = ["build_info"]
