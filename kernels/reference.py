"""Plain numpy/PIL references for every kernel in :mod:`vla_edge.kernels` (tests and benchmark only).

These are the definitions the C++ must equal: CONTRACT.md section 1 written as directly as possible.
PIL is imported lazily inside the image functions; the runtime never imports this module.
"""

from __future__ import annotations

import numpy as np
from vla_edge.kernels import DIRECTIONS, N_BINS, Layout


def bin_edges(n_bins: int = N_BINS) -> np.ndarray:
    """``b = linspace(-1, 1, n_bins)``: the shared action/proprio bin edges."""
    return np.linspace(-1.0, 1.0, n_bins)


# ------------------------------------------------------------------------------------------------
# Image composition


def _pil_filter(name: str):
    from PIL import Image  # PIL: the [export] extra; the runtime never imports this module

    return {
        "lanczos": Image.Resampling.LANCZOS,
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "hamming": Image.Resampling.HAMMING,
        "box": Image.Resampling.BOX,
    }[name]


def compose_canvas(frames: list[np.ndarray], layout: Layout, bgr: bool = False) -> np.ndarray:
    """Each view resized to its tile (``tile_filter``) and pasted on a black canvas: (H, W, 3) uint8 RGB."""
    from PIL import Image  # PIL: see _pil_filter

    canvas = Image.new("RGB", (layout.canvas_w, layout.canvas_h))
    for frame, tile in zip(frames, layout.tiles, strict=True):
        rgb = np.ascontiguousarray(frame[..., ::-1]) if bgr else frame
        view = Image.fromarray(rgb).resize((tile.w, tile.h), _pil_filter(layout.tile_filter))
        canvas.paste(view, (tile.x, tile.y))
    return np.asarray(canvas)


def compose_uint8(frames: list[np.ndarray], layout: Layout, bgr: bool = False) -> np.ndarray:
    """The canvas resized to ``output x output`` (``output_filter``): (S, S, 3) uint8 RGB."""
    from PIL import Image  # PIL: see _pil_filter

    canvas = Image.fromarray(compose_canvas(frames, layout, bgr))
    return np.asarray(canvas.resize((layout.output, layout.output), _pil_filter(layout.output_filter)))


def normalise(image: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(S, S, 3) uint8 -> (1, 3, S, S): ``(px/255 - 0.5)/0.5`` in float64, cast to float32 (then float16)."""
    x = ((image / 255.0 - 0.5) / 0.5).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]).astype(dtype)


def compose_views(frames: list[np.ndarray], layout: Layout, bgr: bool = False, dtype=np.float32) -> np.ndarray:
    """The model input (1, 3, S, S) exactly as training built it with PIL."""
    return normalise(compose_uint8(frames, layout, bgr), dtype)


# ------------------------------------------------------------------------------------------------
# Tokens


def detokenize_actions(token_ids: np.ndarray, vocab_base: int, lo, hi, edges=None) -> np.ndarray:
    """``k = clip(V - id - 1, 0, n-2)``, ``x = (b[k] + b[k+1]) / 2``, ``a = (x + 1) / 2 * (hi - lo) + lo``."""
    b = bin_edges() if edges is None else np.asarray(edges, np.float64)
    n_bins = len(b)
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    ids = np.asarray(token_ids, dtype=np.int64)
    if np.any((ids < vocab_base - n_bins) | (ids > vocab_base - 1)):
        raise ValueError("token_ids holds a token outside the action bins")
    k = np.clip(vocab_base - ids - 1, 0, n_bins - 2)
    x = ((b[k] + b[k + 1]) / 2).reshape(-1, lo.shape[0])
    return (x + 1) / 2 * (hi - lo) + lo


def tokenize_proprio(state, mean, std, vocab_base: int, edges=None) -> np.ndarray:
    """``x = clip(((s - mean) / (std + 1e-5)) / 3, -1, 1)``, ``id = V - digitize(x, b)``; NaN raises."""
    b = bin_edges() if edges is None else np.asarray(edges, np.float64)
    s = np.asarray(state, dtype=np.float64)
    x = ((s - np.asarray(mean, dtype=np.float64)) / (np.asarray(std, dtype=np.float64) + 1e-5)) / 3
    if np.isnan(x).any():
        raise ValueError(f"state[{int(np.flatnonzero(np.isnan(x))[0])}] is NaN after normalisation")
    return vocab_base - np.digitize(np.clip(x, -1, 1), b).astype(np.int64)


def parse_navigation(head_indices, d_max_m: float, theta_max_deg: float, edges=None) -> tuple[str, float]:
    """``[DIR, VALUE, ...]`` -> (direction, ``(x + 1) / 2 * full_scale``); stop gives 0.0."""
    b = bin_edges() if edges is None else np.asarray(edges, np.float64)
    n_bins = len(b)
    direction = DIRECTIONS[int(head_indices[0]) - n_bins - 1]
    if direction == "stop":
        return "stop", 0.0
    k = min(max(n_bins - 1 - int(head_indices[1]), 0), n_bins - 2)  # head j is token V - n_bins + j
    x = (b[k] + b[k + 1]) / 2
    return direction, (x + 1) / 2 * (d_max_m if direction == "forward" else theta_max_deg)


class GrammarReference:
    """Pure-Python ChunkGrammar: the same states, ranges and choices, written out plainly."""

    def __init__(self, n_bins: int, chunk_tokens: int, navigation: bool):
        self.n_bins, self.chunk_tokens, self.navigation = n_bins, chunk_tokens, navigation
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []

    @property
    def _bins(self):
        return (0, self.n_bins)

    @property
    def _end(self):
        return (self.n_bins, self.n_bins + 1)

    def allowed(self) -> tuple[int, int]:
        t, n = self.tokens, self.chunk_tokens
        if self.done:
            return (0, 0)
        if not self.navigation:
            return self._bins if len(t) < n else self._end
        if not t:
            return (self.n_bins + 1, self.n_bins + 5)
        if len(t) == 1:
            return self._bins
        stop = t[0] == self.n_bins + 4
        return self._bins if stop and len(t) < 2 + n else self._end

    @property
    def done(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == self.n_bins

    def step(self, logits: np.ndarray) -> int:
        lo, hi = self.allowed()
        if np.isnan(logits[lo:hi]).any():
            raise ValueError("logits is NaN in the allowed range")
        j = lo + int(np.argmax(logits[lo:hi]))
        self.tokens.append(j)
        return j

    def decode(self, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(rows), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            if self.done:
                break
            out[r] = self.step(row)
        return out
