"""Parity report: PyTorch fp32 vs the exported graphs, on a fixed set of inputs.

For each input (fixed-seed frames, state, instruction; manipulation and navigation prompts):

* PyTorch runs its reference step (greedy, grammar-constrained) -> tokens and logits;
* each exported variant is fed the same tokens (teacher forcing) -> logits at every position:
  max/mean abs error and cosine against PyTorch's;
* each variant also decodes freely with the engine -> greedy token agreement over the full chunk and
  the resulting action error in joint units (rad / m).
"""

from __future__ import annotations

import numpy as np

INSTRUCTIONS = ["pick up the red cube", "open the drawer", "drive to the table"]


def fixed_inputs(layout, state_dim: int, n: int, seed: int = 1234):
    """Deterministic (frames, state, instruction, navigation) tuples; half of them navigation."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = []
        for _ in layout.tiles:
            base = rng.integers(0, 256, size=(3,), dtype=np.uint8)
            img = np.empty((480, 640, 3), np.uint8)
            img[:] = base
            noise = rng.integers(0, 64, size=(480, 640, 3), dtype=np.uint8)
            img = np.clip(img.astype(np.int16) + noise - 32, 0, 255).astype(np.uint8)
            frames.append(img)
        state = rng.normal(0, 0.5, size=state_dim)
        out.append((frames, state, INSTRUCTIONS[i % len(INSTRUCTIONS)], i % 2 == 1))
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare(reference, engines: dict, inputs) -> dict:
    """Run every input through the reference and each engine; returns the parity dict."""
    report: dict = {"inputs": len(inputs), "variants": {}}
    refs = []
    for frames, state, instr, nav in inputs:
        pixels = reference.pixels(frames)
        refs.append((pixels, reference.step(pixels, state, instr, nav)))
    for name, eng in engines.items():
        max_abs, mean_abs, cos, agree, total, act_err, exact = 0.0, [], [], 0, 0, 0.0, True
        for (_frames, state, instr, nav), (pixels, ref) in zip(inputs, refs, strict=True):
            eng.start_episode(instr, navigation=nav)
            forced = eng.forced_logits(pixels, state, ref.head_idx)
            d = np.abs(forced - ref.logits)
            max_abs = max(max_abs, float(d.max()))
            mean_abs.append(float(d.mean()))
            cos.append(_cos(forced, ref.logits))
            chunk = eng.step(None, state, pixels=pixels)
            got = np.asarray([int(np.nonzero(eng.head_ids == t)[0][0]) for t in chunk.token_ids])
            n = min(len(got), len(ref.head_idx))
            agree += int((got[:n] == ref.head_idx[:n]).sum())
            total += max(len(got), len(ref.head_idx))
            same = len(got) == len(ref.head_idx) and bool((got == ref.head_idx).all())
            exact &= same
            ref_chunk = eng.detokenize(ref.head_idx)
            if chunk.joints is not None and ref_chunk.joints is not None:
                act_err = max(act_err, float(np.abs(chunk.joints - ref_chunk.joints).max()))
            elif (chunk.joints is None) != (ref_chunk.joints is None):
                act_err = float("inf")
        report["variants"][name] = {
            "logit_max_abs_err": max_abs,
            "logit_mean_abs_err": float(np.mean(mean_abs)),
            "logit_cosine_min": float(np.min(cos)),
            "token_agreement": agree / max(total, 1),
            "chunks_identical": exact,
            "action_max_abs_err": act_err,
        }
    return report
