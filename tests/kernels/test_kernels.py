"""Parity of the C++ kernels with the numpy/PIL references (kernels/reference.py), and their errors.

Images: bit-exact with PIL 13 (stricter than the 1/255 the issue asks), for the scalar and the AVX2
kernels, on random sizes, both reference layouts, random noise and natural-looking frames.
Tokens: exact equality (float64 bits) with the numpy formulas, including the bin edges.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import vla_edge.kernels as K
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from vla_edge.edge.bundle.spec import (
    CALVIN_LAYOUT,
    COBOT_MAGIC_LAYOUT,
    N_BINS,
    QWEN2_TOKENS,
    ImageLayout,
    Tile,
)
from vla_edge.kernels import _core
from vla_edge.kernels import reference as ref

V = QWEN2_TOKENS.vocab_base
FILTERS = ["lanczos", "bicubic", "bilinear", "hamming", "box"]
SIMD = _core.simd_levels()  # scalar, then avx2 and avx512vnni where the CPU has them


@pytest.fixture(params=SIMD)
def simd(request):
    """Run a test once per available kernel flavour (they must give identical bytes)."""
    before = _core._set_simd(request.param)
    yield request.param
    _core._set_simd(before)


# ------------------------------------------------------------------------------------------------
# Images


def natural_frame(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients, hard edges, a disc and text: what camera frames and their aliasing look like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    img[..., 2] = ((x // 7 + y // 5) % 2 * 255).astype(np.uint8)  # checkerboard: worst-case edges
    cv2.rectangle(img, (w // 8, h // 8), (w // 2, h // 2), (255, 255, 255), -1)
    cv2.circle(img, (w * 2 // 3, h * 2 // 3), max(min(h, w) // 6, 1), (0, 0, 0), -1)
    for i in range(3):
        org = (int(rng.integers(0, max(w // 2, 1))), int(rng.integers(h // 4, h)))
        cv2.putText(img, "VLA-edge 0123", org, cv2.FONT_HERSHEY_SIMPLEX, 0.4 + i * 0.5, (255, 0, 255), 1 + i)
    return img


def random_frame(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 90),
    w=st.integers(1, 90),
    oh=st.integers(1, 90),
    ow=st.integers(1, 90),
    filt=st.sampled_from(FILTERS),
    seed=st.integers(0, 2**32 - 1),
)
def test_resize_matches_pil_bit_for_bit(h, w, oh, ow, filt, seed):
    img = random_frame(h, w, seed)
    want = np.asarray(Image.fromarray(img).resize((ow, oh), ref._pil_filter(filt)))
    for flavour in SIMD:
        before = _core._set_simd(flavour)
        try:
            np.testing.assert_array_equal(_core.resize_rgb(img, ow, oh, filt), want, err_msg=flavour)
        finally:
            _core._set_simd(before)


@pytest.mark.parametrize(
    "size,out",
    [((480, 640), (168, 336)), ((480, 640), (168, 168)), ((200, 200), (167, 334)), ((84, 84), (167, 334)),
     ((336, 336), (384, 384)), ((300, 40), (20, 30)), ((40, 300), (30, 20))],
)
def test_resize_layout_sizes_natural(simd, size, out):
    for filt in ("lanczos", "bicubic"):
        img = natural_frame(*size, seed=1)
        want = np.asarray(Image.fromarray(img).resize(out[::-1], ref._pil_filter(filt)))
        np.testing.assert_array_equal(_core.resize_rgb(img, out[1], out[0], filt), want)


CALVIN_FRAMES = [(200, 200), (84, 84)]  # CALVIN's static and gripper cameras
COBOT_FRAMES = [(480, 640)] * 3


@pytest.mark.parametrize("layout,shapes", [(CALVIN_LAYOUT, CALVIN_FRAMES), (COBOT_MAGIC_LAYOUT, COBOT_FRAMES)])
@pytest.mark.parametrize("kind", ["random", "natural"])
@pytest.mark.parametrize("bgr", [False, True])
def test_compose_matches_pil(simd, layout, shapes, kind, bgr):
    make = random_frame if kind == "random" else natural_frame
    frames = [make(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    comp = K.Composer(layout, shapes)
    np.testing.assert_array_equal(comp.canvas(frames), ref.compose_canvas(frames, layout))  # channel-blind stage
    want8 = ref.compose_uint8(frames, layout, bgr)
    np.testing.assert_array_equal(comp.compose_uint8(frames, bgr), want8)
    out = np.full((1, 3, layout.output, layout.output), np.nan, np.float32)
    assert K.compose_views(frames, layout, out, bgr=bgr) is out
    np.testing.assert_array_equal(out, ref.compose_views(frames, layout, bgr))
    out16 = np.zeros((1, 3, layout.output, layout.output), np.float16)
    comp.compose(frames, out16, bgr)
    np.testing.assert_array_equal(out16, ref.compose_views(frames, layout, bgr, dtype=np.float16))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_compose_random_layouts(data):
    cw, ch = data.draw(st.integers(8, 120)), data.draw(st.integers(8, 120))
    tiles = []
    for i in range(data.draw(st.integers(1, 3))):
        w, h = data.draw(st.integers(1, cw)), data.draw(st.integers(1, ch))
        tiles.append(Tile(f"cam{i}", data.draw(st.integers(0, cw - w)), data.draw(st.integers(0, ch - h)), w, h))
    layout = ImageLayout(tuple(tiles), cw, ch, data.draw(st.integers(4, 128)),
                         data.draw(st.sampled_from(FILTERS)), data.draw(st.sampled_from(FILTERS)))
    shapes = [(data.draw(st.integers(1, 100)), data.draw(st.integers(1, 100))) for _ in tiles]
    frames = [random_frame(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    out = np.empty((1, 3, layout.output, layout.output), np.float32)
    for flavour in SIMD:
        before = _core._set_simd(flavour)
        try:
            K.Composer(layout, shapes).compose(frames, out)
        finally:
            _core._set_simd(before)
        np.testing.assert_array_equal(out, ref.compose_views(frames, layout), err_msg=flavour)


def test_normalisation_every_pixel_value(simd):
    """Identity sizes: the output is just the normalisation, checked on all 256 values (float32, float16)."""
    layout = ImageLayout((Tile("cam", 0, 0, 16, 16),), 16, 16, output=16)
    frame = np.arange(256 * 3, dtype=np.uint16).reshape(16, 16, 3).astype(np.uint8)
    for dtype in (np.float32, np.float16):
        out = np.empty((1, 3, 16, 16), dtype)
        K.Composer(layout, [(16, 16)]).compose([frame], out)
        np.testing.assert_array_equal(out, ref.normalise(frame, dtype))


# ------------------------------------------------------------------------------------------------
# Tokens


def test_bin_edges_are_numpys_linspace():
    np.testing.assert_array_equal(_core.bin_edges(N_BINS), np.linspace(-1, 1, N_BINS))


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    d=st.integers(1, 16),
    steps=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_detokenize_equals_reference(d, steps, seed, scale):
    rng = np.random.default_rng(seed)
    ids = rng.integers(V - N_BINS, V, steps * d).astype(np.int64)
    ids[: min(2, ids.size)] = [V - 1, V - N_BINS][: min(2, ids.size)]  # both ends of the range
    lo = rng.normal(size=d) * scale
    hi = lo + np.abs(rng.normal(size=d)) * scale
    got = K.detokenize_actions(ids, V, lo, hi)
    want = ref.detokenize_actions(ids, V, lo, hi)
    assert got.shape == (steps, d) and got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


def test_detokenize_cobot_policy_chunk():
    from vla_edge.edge.bundle.spec import cobot_magic_policy

    p = cobot_magic_policy()
    ids = np.random.default_rng(0).integers(V - N_BINS, V, p.chunk_tokens).astype(np.int64)
    got = K.detokenize_actions(ids, V, p.action_lo, p.action_hi)
    np.testing.assert_array_equal(got, ref.detokenize_actions(ids, V, p.action_lo, p.action_hi))


@settings(max_examples=300, deadline=None)
@given(
    state=st.lists(st.one_of(finite, st.sampled_from([np.inf, -np.inf, 0.0, -0.0])), min_size=1, max_size=14),
    seed=st.integers(0, 2**32 - 1),
)
def test_tokenize_equals_reference(state, seed):
    rng = np.random.default_rng(seed)
    s = np.asarray(state, np.float64)
    mean = rng.normal(size=s.size)
    std = np.abs(rng.normal(size=s.size)) + 0.1
    np.testing.assert_array_equal(K.tokenize_proprio(s, mean, std, V), ref.tokenize_proprio(s, mean, std, V))


def test_tokenize_exact_bin_edges():
    """x exactly on every edge b[i] (and -1, 1): mean 0, std chosen so that z/3 == b[i] exactly."""
    b = np.linspace(-1, 1, N_BINS)
    std = np.full(b.size, 1.0 - 1e-5)  # std + 1e-5 is not exactly 1: compute the state that hits b
    denom = std + 1e-5
    state = b * 3 * denom
    x = (state / denom) / 3
    hits = x == b
    assert hits.sum() > 200  # most states land exactly on their edge
    got = K.tokenize_proprio(state, np.zeros(b.size), std, V)
    np.testing.assert_array_equal(got, ref.tokenize_proprio(state, np.zeros(b.size), std, V))
    ends = K.tokenize_proprio(np.array([-3.0, 3.0]) * (1 + 1e-5), np.zeros(2), np.ones(2), V)
    np.testing.assert_array_equal(ends, ref.tokenize_proprio(np.array([-3.0, 3.0]) * (1 + 1e-5), np.zeros(2), np.ones(2), V))
    assert K.tokenize_proprio(np.array([-1e9, 1e9]), np.zeros(2), np.ones(2), V).tolist() == [V - 1, V - 256]


def test_tokenize_nan_raises_naming_the_dimension():
    with pytest.raises(ValueError, match=r"state\[2\]"):
        K.tokenize_proprio(np.array([0.0, 1.0, np.nan]), np.zeros(3), np.ones(3), V)
    with pytest.raises(ValueError, match=r"state\[0\]"):
        K.tokenize_proprio(np.array([0.0]), np.array([np.nan]), np.ones(1), V)


@pytest.mark.parametrize("direction", ["forward", "turn_left", "turn_right", "stop"])
def test_parse_navigation(direction):
    dirs = QWEN2_TOKENS.head_directions
    for value in (0, 1, 127, 128, 254, 255):
        heads = np.array([dirs[direction], value, N_BINS], np.int64)
        got = K.parse_navigation(heads, 1.5, 90.0)
        assert got == ref.parse_navigation(heads, 1.5, 90.0)
        assert got[0] == direction
    assert K.parse_navigation(np.array([dirs["forward"], 0], np.int64), 2.0, 90.0)[1] == 2.0 * (1 - 0.5 / 255)


# ------------------------------------------------------------------------------------------------
# Grammar


def random_logits(rng, rows, width=N_BINS + 5, ties=False):
    x = rng.normal(size=(rows, width)).astype(np.float32)
    if ties:
        x = np.round(x).astype(np.float32)  # many equal maxima: lowest index must win
    return x


@pytest.mark.parametrize("navigation", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_grammar_matches_reference(navigation, ties):
    rng = np.random.default_rng(int(navigation) * 2 + int(ties))
    for trial in range(60):
        chunk = int(rng.integers(1, 71))
        logits = random_logits(rng, chunk + 4, ties=ties)
        if navigation and trial % 2:
            logits[0, N_BINS + 4] = 100.0  # force stop: the chunk follows
        g = K.ChunkGrammar(N_BINS, chunk, navigation)
        r = ref.GrammarReference(N_BINS, chunk, navigation)
        rows = g.argmax_rows(logits)
        np.testing.assert_array_equal(rows, r.decode(logits))
        assert g.position == 0 and not g.done  # argmax_rows works on a copy
        stepped = []
        while not g.done:
            stepped.append(g.step(logits[len(stepped)]))
        np.testing.assert_array_equal(stepped, rows[rows >= 0])
        assert stepped[-1] == N_BINS and g.allowed() == (0, 0)


def test_grammar_shapes_and_state():
    g = K.ChunkGrammar(N_BINS, 70, False)
    assert g.allowed() == (0, N_BINS) and g.width == N_BINS + 5
    rows = g.argmax_rows(np.zeros((71, N_BINS + 5), np.float32))
    assert rows.dtype == np.int64 and (rows[:70] == 0).all() and rows[70] == N_BINS
    for _ in range(69):
        g.advance(3)
    saved = g.state
    g.advance(5)
    assert g.allowed() == (N_BINS, N_BINS + 1)
    g.set_state(saved)
    assert g.position == 69
    g.advance(0)
    g.advance(N_BINS)
    assert g.done
    with pytest.raises(ValueError, match="done"):
        g.step(np.zeros(N_BINS + 5, np.float32))
    g.reset()
    assert g.state == (0, -1)

    nav = K.ChunkGrammar(N_BINS, 70, True)
    assert nav.allowed() == (N_BINS + 1, N_BINS + 5)
    nav.advance(QWEN2_TOKENS.head_directions["forward"])
    nav.advance(17)
    assert nav.allowed() == (N_BINS, N_BINS + 1)
    nav.advance(N_BINS)
    assert nav.done and nav.state == (3, 0)


# ------------------------------------------------------------------------------------------------
# Errors: a Python exception naming the argument, never a crash.


def test_compose_errors():
    comp = K.Composer(COBOT_MAGIC_LAYOUT, COBOT_FRAMES)
    good = [random_frame(480, 640, i) for i in range(3)]
    out = np.empty((1, 3, 384, 384), np.float32)
    cases = [
        (good[:2], out, ValueError, "frames"),
        ([good[0], good[1], good[2].astype(np.float32)], out, TypeError, r"frames\[2\]"),
        ([good[0], good[1], good[2][:, :, :2]], out, ValueError, r"frames\[2\]"),
        ([good[0], good[1], random_frame(480, 641, 0)], out, ValueError, r"frames\[2\]"),
        ([good[0][::-1], good[1], good[2]], out, ValueError, r"frames\[0\].*contiguous"),
        ([good[0], good[1], [[1, 2, 3]]], out, TypeError, r"frames\[2\]"),
        (good, np.empty((1, 3, 384, 384), np.float64), TypeError, "out"),
        (good, np.empty((3, 384, 384), np.float32), ValueError, "out"),
        (good, np.empty((1, 3, 384, 768), np.float32)[..., ::2], ValueError, "out"),
    ]
    for frames, o, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            comp.compose(frames, o)
    ro = np.empty((1, 3, 384, 384), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        comp.compose(good, ro)


def test_layout_errors():
    bad = ImageLayout((Tile("a", 0, 0, 336, 168), Tile("b", 200, 168, 168, 168)), 336, 336)
    with pytest.raises(ValueError, match=r"layout.tiles\[1\].*canvas"):
        K.Composer(bad, COBOT_FRAMES[:2])
    with pytest.raises(ValueError, match="tile_filter"):
        K.Composer(ImageLayout(CALVIN_LAYOUT.tiles, 334, 334, tile_filter="nearest"), CALVIN_FRAMES)
    with pytest.raises(ValueError, match="output"):
        K.Composer(ImageLayout(CALVIN_LAYOUT.tiles, 334, 334, output=0), CALVIN_FRAMES)
    with pytest.raises(TypeError, match="layout"):
        K.Composer({"tiles": []}, CALVIN_FRAMES)


def test_token_errors():
    lo, hi = np.zeros(7), np.ones(7)
    with pytest.raises(ValueError, match=r"token_ids\[3\]"):
        K.detokenize_actions(np.array([V - 1, V - 2, V - 3, V, V - 5, V - 6, V - 7], np.int64), V, lo, hi)
    with pytest.raises(ValueError, match="token_ids"):
        K.detokenize_actions(np.full(8, V - 1, np.int64), V, lo, hi)
    with pytest.raises(TypeError, match="token_ids"):
        K.detokenize_actions(np.full(7, V - 1, np.float64), V, lo, hi)
    with pytest.raises(ValueError, match="hi"):
        K.detokenize_actions(np.full(7, V - 1, np.int64), V, lo, np.ones(6))
    with pytest.raises(TypeError, match="state"):
        K.tokenize_proprio(np.zeros(3, np.float32), np.zeros(3), np.ones(3), V)
    with pytest.raises(ValueError, match="state"):
        K.tokenize_proprio(np.zeros((3, 2)), np.zeros(3), np.ones(3), V)
    with pytest.raises(ValueError, match="head_indices"):
        K.parse_navigation(np.array([5, 5], np.int64), 1.0, 90.0)


def test_grammar_errors():
    g = K.ChunkGrammar(N_BINS, 5, True)
    with pytest.raises(ValueError, match="logits"):
        g.step(np.zeros(N_BINS + 4, np.float32))
    with pytest.raises(TypeError, match="logits"):
        g.step(np.zeros(N_BINS + 5, np.float64))
    with pytest.raises(ValueError, match="logits"):
        g.argmax_rows(np.zeros((3, N_BINS + 6), np.float32))
    with pytest.raises(ValueError, match="logits"):
        g.argmax_rows(np.zeros((3, 2 * (N_BINS + 5)), np.float32)[:, ::2])
    nan = np.zeros(N_BINS + 5, np.float32)
    nan[N_BINS + 2] = np.nan
    with pytest.raises(ValueError, match=r"logits\[258\].*NaN"):
        g.step(nan)
    with pytest.raises(ValueError, match="head index"):
        g.advance(3)  # a bin where a direction must come
    with pytest.raises(ValueError, match="state"):
        g.set_state((2, -1))
    with pytest.raises(ValueError, match="state"):
        K.ChunkGrammar(N_BINS, 5, False).set_state((7, -1))
    with pytest.raises(ValueError, match="chunk_tokens"):
        K.ChunkGrammar(N_BINS, 0, False)


# ------------------------------------------------------------------------------------------------
# Packaging


def test_runtime_import_pulls_in_neither_pil_nor_torch():
    import subprocess
    import sys

    code = "import sys, vla_edge.kernels; assert not {'PIL', 'torch'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_runs_and_reports():
    from vla_edge.edge.cli import kernel_bench as bench

    r = bench.run(repeats=3)
    for name in ("compose", "decode"):
        assert r[name]["cpp"]["median_ms"] > 0 and r[name]["speedup"] > 0
    # every lower level this CPU has is timed too, and the level in use is left as it was
    assert set(r["compose"]["levels"]) == set(SIMD) - {r["simd"]}
    assert _core.simd() == r["simd"]
