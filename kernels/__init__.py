"""C++ kernels (pybind11) for the per-step hot path, with numpy/PIL references in :mod:`.reference`.

Image composition (CONTRACT.md section 1), bit-exact with PIL 13 (``Image.resize``):

- :class:`Composer` ``(layout, frame_shapes)`` caches the resampling taps for one layout and one set of
  frame sizes. ``Composer.compose(frames, out, bgr=False)`` writes the model input into ``out``
  (float32 or float16, shape ``(1, 3, S, S)``, values ``(px/255 - 0.5)/0.5``, RGB) without allocating,
  with the GIL released. ``Composer.canvas(frames)`` and ``Composer.compose_uint8(frames)`` return
  the uint8 stages (the pasted canvas, the resized image) for tests and debugging.
- :func:`compose_views` ``(frames, layout, out, bgr=False)``: the same through a Composer cached per
  (layout, frame shapes).

Frames are ``HxWx3`` uint8, C-contiguous, in ``layout.tiles`` order (they may differ in size); ``bgr``
says they come from OpenCV. float16 output is ``float16(float32 value)`` (round to nearest even).
Supported filters: lanczos, bicubic, bilinear, hamming, box (PIL's "nearest" is not). There is no fused
single-pass mode: the canvas stage is always materialised, exactly as training did.

Token decoding, in cut-head index space (:class:`vla_edge.edge.bundle.spec.TokenSpec`):

- :class:`ChunkGrammar` ``(n_bins, chunk_tokens, navigation)``: grammar-constrained greedy decoding.
  Manipulation: ``chunk_tokens`` bins then ``<|im_end|>``; navigation: ``DIR VALUE`` then, only if DIR is
  stop, ``chunk_tokens`` bins, then ``<|im_end|>``. ``step(logits)`` returns the constrained argmax
  (lowest index wins ties) and advances; ``argmax_rows(logits_2d)`` decodes a block of rows on a copy
  of the state (``-1`` after ``<|im_end|>``); ``advance(head_index)`` feeds a token chosen elsewhere;
  ``allowed()`` is the half-open range ``(lo, hi)`` of allowed head indices (``(0, 0)`` once done);
  ``state``/``set_state`` save and restore ``(position, direction)`` (direction -1 until chosen).
  NaN logits in the allowed range raise ValueError (a corrupt model output is never decoded).
- :func:`detokenize_actions` ``(token_ids, vocab_base, lo, hi, edges) -> (chunk, D) float64``.
- :func:`tokenize_proprio` ``(state, mean, std, vocab_base, edges) -> (D,) int64``; a NaN after normalisation
  (NaN state, mean or std, or ``std + 1e-5 == 0`` with ``state == mean``) raises ValueError naming the
  dimension: a NaN state is a sensor fault. ``+-inf`` clip to the end bins like numpy does.
- :func:`parse_navigation` ``(head_indices, d_max_m, theta_max_deg, edges) -> (direction, value)``: value is
  ``(x + 1) / 2 * full_scale`` with x the VALUE bin centre: metres for forward (full scale
  ``d_max_m``), degrees for the turns (``theta_max_deg``); ``("stop", 0.0)`` for stop.

The e-stop key's native path (not a numeric kernel, but it must not wait for the GIL either):

- :class:`StopWire` ``(key_fd, trip_keys, relay_fd, rt_priority, nice)`` (vla-edge passes its e-stop threads' priorities): a native thread reads
  ``key_fd`` (the raw terminal) and, the moment a byte of ``trip_keys`` arrives or the input ends, writes
  every frame armed with ``arm(fd, frame)`` (the base's zero frame) and latches; it relays every byte to
  ``relay_fd`` (the Python keyboard listener reads that) without ever blocking (``relay_dropped`` counts
  what a listener that left 64 KiB unread missed). ``write(fd, frame, stop)`` is the devices' gate:
  one ``write(2)``, or -1 and nothing written when latched and ``stop`` is False, serialised with the trip
  by a priority-inheriting mutex; ``rearm()`` after the e-stop is resumed; ``disarm(fd)`` before fd is
  closed. ``tripped``, ``trip_time_s`` (``time.monotonic()`` clock), ``trip_reason``, ``priority``.

``edges`` are the bin edges (float64, ascending; default :data:`UNIFORM_EDGES`, a bundle's own are
``TokenSpec.bin_edges``). All token formulas equal :mod:`.reference` (numpy) bit for bit. Bad arguments raise TypeError or
ValueError naming the argument. Arrays are never converted silently (lists/tuples are, for the
statistics that come from :class:`~vla_edge.edge.bundle.spec.PolicySpec`).
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
from vla_edge.kernels import _core
from vla_edge.kernels._core import ChunkGrammar, StopWire, build_info, simd

N_BINS = 256
"""Action/proprio bins (CONTRACT section 1): token ``V - i`` for bin index ``i`` in 1..256."""

DIRECTIONS = ("forward", "turn_left", "turn_right", "stop")
"""Navigation direction tokens, in the order the cut head holds them (the C++ decoder's order)."""


class Layout(Protocol):
    """What composition needs of a layout (``vla_edge.edge.bundle.spec.ImageLayout`` is one): tiles with
    ``x, y, w, h`` on a ``canvas_w x canvas_h`` canvas, resized to ``output`` px, PIL filter names, and the
    order of the two resize passes of the Pillow that made the training images: ``"pillow13"`` (Pillow >= 13
    puts the vertical pass first when the height shrinks much more than the width) or ``"pillow-pre13"``
    (horizontal first, always)."""

    tiles: tuple
    canvas_w: int
    canvas_h: int
    output: int
    tile_filter: str
    output_filter: str
    resize_order: str

__all__ = [
    "ChunkGrammar",
    "Composer",
    "StopWire",
    "build_info",
    "compose_views",
    "detokenize_actions",
    "parse_navigation",
    "simd",
    "tokenize_proprio",
]


def Composer(layout: Layout, frame_shapes) -> _core.Composer:  # noqa: N802 - reads as a class
    """A C++ ``Composer`` for ``layout`` and frames of ``frame_shapes`` ((height, width) per tile)."""
    if not all(hasattr(layout, a) for a in Layout.__annotations__):
        raise TypeError(f"layout must be an ImageLayout, got {type(layout).__name__}")
    shapes = [(int(s[0]), int(s[1])) for s in frame_shapes]
    tiles = [(t.x, t.y, t.w, t.h) for t in layout.tiles]
    return _core.Composer(
        tiles, layout.canvas_w, layout.canvas_h, layout.output, layout.tile_filter, layout.output_filter, shapes,
        layout.resize_order,
    )


_composers: dict[tuple, _core.Composer] = {}
_composers_lock = threading.Lock()


def compose_views(frames: list[np.ndarray], layout: Layout, out: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Compose ``frames`` (``layout.tiles`` order) into ``out`` (1, 3, S, S); returns ``out``.

    Uses a Composer cached per (layout, frame shapes); see the module docstring.
    """
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"frames must be a list of arrays, got {type(frames).__name__}")
    shapes = tuple(f.shape[:2] if isinstance(f, np.ndarray) and f.ndim == 3 else (0, 0) for f in frames)
    if len(frames) != len(layout.tiles):
        raise ValueError(f"frames has {len(frames)} entries but the layout has {len(layout.tiles)} tiles")
    for i, f in enumerate(frames):
        if not isinstance(f, np.ndarray) or f.ndim != 3:
            raise ValueError(f"frames[{i}] must be an HxWx3 uint8 array")
    key = (layout, shapes)
    with _composers_lock:
        comp = _composers.get(key)
        if comp is None:
            comp = _composers[key] = Composer(layout, shapes)
    return comp.compose(list(frames), out, bgr)


def _float64(x) -> np.ndarray:
    """Lists/tuples (PolicySpec statistics) become float64 arrays; arrays are passed on unchanged."""
    return np.asarray(x, dtype=np.float64) if isinstance(x, (list, tuple)) else x


UNIFORM_EDGES = _core.bin_edges(N_BINS)
"""``linspace(-1, 1, 256)``: the default bin edges (a bundle's own are ``TokenSpec.bin_edges``)."""


def detokenize_actions(token_ids: np.ndarray, vocab_base: int, lo, hi, edges: np.ndarray = UNIFORM_EDGES) -> np.ndarray:
    """Action token ids (int64, ``chunk*D``, step-major) -> actions (chunk, D) float64.

    ``k = clip(V - id - 1, 0, n-2)``, ``x = (b[k] + b[k+1]) / 2``, ``a = (x + 1) / 2 * (hi - lo) + lo``
    with ``b = edges``. Raises ValueError on an id outside the bin range ``V-n .. V-1``.
    """
    return _core.detokenize_actions(token_ids, vocab_base, _float64(lo), _float64(hi), edges)


def tokenize_proprio(state: np.ndarray, mean, std, vocab_base: int, edges: np.ndarray = UNIFORM_EDGES) -> np.ndarray:
    """State (float64, D) -> proprio token ids (int64, D): ``V - digitize(clip(z / 3, -1, 1), edges)``."""
    return _core.tokenize_proprio(state, _float64(mean), _float64(std), vocab_base, edges)


def parse_navigation(head_indices: np.ndarray, d_max_m: float, theta_max_deg: float,
                     edges: np.ndarray = UNIFORM_EDGES) -> tuple[str, float]:
    """Navigation output ``[DIR, VALUE, ...]`` (int64 head indices) -> (direction, metres or degrees)."""
    d, value = _core.parse_navigation(head_indices, edges, d_max_m, theta_max_deg)
    return DIRECTIONS[d], value
