"""The inference engine: three frames + a state vector -> one action chunk, on ONNX Runtime.

One :meth:`Engine.step` runs the stages that ``vla-edge bench`` times::

    compose     camera frames -> (1,3,S,S) pixels        (C++ kernel, into a preallocated buffer)
    vision      pixels -> image embeddings               (vision.onnx)
    prompt      template ids + image + instruction + proprio tokens -> inputs_embeds (host)
    prefill     the prompt (after the system prefix, cached at start-up) -> KV cache + first token
    decode      one token at a time (or Jacobi-parallel), grammar-constrained over the cut head
    detokenize  bin tokens -> joint targets (rad, m); navigation tokens -> (direction, m | deg)

The cache never leaves the device between decode calls: ``present.*`` outputs are bound as
OrtValues and fed back as the next ``past.*`` (IO binding). No torch here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from vla_edge.edge.bundle import Bundle
from vla_edge.edge.errors import VlaEdgeError
from vla_edge.edge.prompt import tokenizer_encoder

log = logging.getLogger(__name__)

STAGES = ("compose", "vision", "prompt", "prefill", "decode", "detokenize")


class EngineError(VlaEdgeError):
    """Bad engine input (camera count, state width) or an unavailable provider."""


@dataclass
class ActionChunk:
    """One policy output.

    ``joints``: (chunk_size, action_dim) absolute joint targets, radians for joints and metres for
    grippers, in the robot's 14-vector order. ``None`` for a navigation step that moves the base.
    ``base``: ``(direction, value)`` for navigation outputs: metres for ``forward``, degrees for
    turns, ``("stop", 0.0)`` when the model chose to manipulate; ``None`` in manipulation mode.
    """

    joints: np.ndarray | None
    base: tuple[str, float] | None = None
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    timings_ms: dict[str, float] = field(default_factory=dict)
    decode_calls: int = 0


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def pick_providers(provider: str) -> list[str]:
    """``auto``: CUDA when this ONNX Runtime has it, else CPU. ``cuda`` fails if it is missing."""
    avail = available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise EngineError(
                "CUDA provider requested but this onnxruntime has none "
                f"(available: {', '.join(avail)}); install vla-edge[gpu] (onnxruntime-gpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in avail else [
            "CPUExecutionProvider"
        ]
    raise EngineError(f"unknown provider {provider!r} (auto, cpu, cuda)")


class Engine:
    """Runs a bundle. Create once; call :meth:`start_episode` per instruction, :meth:`step` per chunk."""

    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int | None = None, parallel: bool = False):
        import onnxruntime as ort
        from vla_edge import kernels

        self.bundle = bundle
        self.parallel = parallel
        providers = pick_providers(provider)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.vision = ort.InferenceSession(str(bundle.path("vision")), so, providers=providers)
        self.decoder = ort.InferenceSession(str(bundle.path("decoder")), so, providers=providers)
        self.provider = self.decoder.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        log.info("engine: %s on %s (%s)", bundle.root, self.provider, bundle.precision)

        d = bundle.dims
        self.dims = d
        self.embeddings = np.load(bundle.path("embeddings"), mmap_mode="r")
        self.embed_dtype = np.float32
        self.encode = tokenizer_encoder(bundle.tokenizer_json())
        self.tokens = bundle.tokens
        self.policy = bundle.policy
        self.head_ids = self.tokens.head_ids
        self.kernels = kernels
        self.pixels = np.zeros((1, 3, bundle.layout.output, bundle.layout.output), np.float32)
        prefix_embeds = self._embed(bundle.prompt.prefix)
        self.suffix_embeds = self._embed(bundle.prompt.suffix)
        self.instruction_embeds: np.ndarray | None = None
        self.navigation = False
        self.lo = np.asarray(self.policy.action_lo, np.float64)
        self.hi = np.asarray(self.policy.action_hi, np.float64)
        self.mean = np.asarray(self.policy.proprio_mean, np.float64)
        self.std = np.asarray(self.policy.proprio_std, np.float64)
        self._empty_past = np.zeros((1, d.kv_heads, 0, d.head_dim), np.float32)
        self.past_names = [f"past.{i}.{kv}" for i in range(d.layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(d.layers) for kv in ("key", "value")]
        # The system-prompt prefix never changes: its KV cache is computed once, here, not every step.
        _, self.prefix_past = self._run_decoder(
            prefix_embeds[None], np.zeros(1, np.int64), [self._empty_past] * len(self.past_names)
        )

    # -- episode -------------------------------------------------------------------------------------
    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        """Tokenise the instruction once; every step of the episode reuses its embeddings."""
        if not instruction.strip():
            raise EngineError("instruction is empty")
        ids = self.bundle.prompt.instruction_ids(self.encode, instruction, navigation)
        self.instruction_embeds = self._embed(ids)
        self.navigation = navigation

    def _embed(self, ids) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(ids, np.int64)], dtype=np.float32)

    # -- one step ------------------------------------------------------------------------------------
    def prepare_pixels(self, frames: list[np.ndarray], bgr: bool = False) -> np.ndarray:
        cams = self.bundle.layout.cameras
        if len(frames) != len(cams):
            raise EngineError(f"expected {len(cams)} camera frames ({', '.join(cams)}), got {len(frames)}")
        self.kernels.compose_views(frames, self.bundle.layout, self.pixels, bgr=bgr)
        return self.pixels

    def step(self, frames: list[np.ndarray] | None, state: np.ndarray, pixels: np.ndarray | None = None,
             bgr: bool = False) -> ActionChunk:
        """Frames (in the layout's camera order, HxWx3 uint8) or ready ``pixels`` + state -> chunk."""
        if self.instruction_embeds is None:
            raise EngineError("call start_episode(instruction) before step()")
        state = np.asarray(state, np.float64)
        if state.shape != (self.policy.state_dim,):
            raise EngineError(f"state has shape {state.shape}, expected ({self.policy.state_dim},)")
        t = {}
        t0 = time.perf_counter()
        if pixels is None:
            pixels = self.prepare_pixels(frames, bgr=bgr)
        t1 = time.perf_counter()
        image = self.vision.run(None, {"pixels": pixels})[0][0]
        t2 = time.perf_counter()
        embeds = self._prompt_embeds(image, state)
        t3 = time.perf_counter()
        head_idx, calls, t_prefill = self._generate(embeds)
        t5 = time.perf_counter()
        chunk = self.detokenize(head_idx)
        t6 = time.perf_counter()
        t.update(compose=t1 - t0, vision=t2 - t1, prompt=t3 - t2, prefill=t_prefill, decode=t5 - t3 - t_prefill,
                 detokenize=t6 - t5, total=t6 - t0)
        chunk.timings_ms = {k: v * 1e3 for k, v in t.items()}
        chunk.decode_calls = calls
        return chunk

    def _prompt_embeds(self, image: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Everything after the cached system-prompt prefix: image, instruction, proprio, suffix."""
        proprio = self.kernels.tokenize_proprio(state, self.mean, self.std, self.tokens.vocab_base)
        return np.concatenate(
            [image, self.instruction_embeds, self._embed(proprio), self.suffix_embeds]
        )[None]

    def forced_logits(self, pixels: np.ndarray, state: np.ndarray, head_idx: np.ndarray) -> np.ndarray:
        """Cut-head logits at every generated position when the given tokens are fed (teacher forcing).

        Used by the parity report to compare logits with PyTorch position by position.
        """
        image = self.vision.run(None, {"pixels": pixels})[0][0]
        prompt = self._prompt_embeds(image, np.asarray(state, np.float64))
        fed = self._embed(self.head_ids[np.asarray(head_idx[:-1], np.int64)])[None]
        embeds = np.concatenate([prompt, fed], axis=1)
        k = len(head_idx)
        index = np.arange(embeds.shape[1] - k, embeds.shape[1], dtype=np.int64)
        logits, _ = self._run_decoder(embeds, index, self.prefix_past)
        return logits

    def detokenize(self, head_idx: np.ndarray) -> ActionChunk:
        ids = self.head_ids[head_idx]
        bins = head_idx < self.tokens.n_bins
        base = None
        if self.navigation:
            direction, value = self.kernels.parse_navigation(head_idx, self.policy.d_max_m, self.policy.theta_max_deg)
            base = (direction, float(value))
            if direction != "stop":
                return ActionChunk(joints=None, base=base, token_ids=ids)
            bins[:2] = False  # DIR VALUE precede the chunk
        joints = self.kernels.detokenize_actions(ids[bins], self.tokens.vocab_base, self.lo, self.hi)
        return ActionChunk(joints=joints, base=base, token_ids=ids)

    # -- decoding ------------------------------------------------------------------------------------
    def _grammar(self):
        return self.kernels.ChunkGrammar(self.tokens.n_bins, self.policy.chunk_tokens, self.navigation)

    def _run_decoder(self, embeds: np.ndarray, logit_index: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One decoder call with IO binding; ``past`` and the returned cache are OrtValues (or arrays)."""
        b = self.decoder.io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        b.bind_cpu_input("logit_index", logit_index)
        for name, v in zip(self.past_names, past, strict=True):
            if isinstance(v, np.ndarray):
                b.bind_cpu_input(name, v)
            else:
                b.bind_ortvalue_input(name, v)
        b.bind_output("logits", "cpu")
        for name in self.present_names:
            b.bind_output(name, self.device)
        self.decoder.run_with_iobinding(b)
        outs = b.get_outputs()
        return outs[0].numpy()[0], list(outs[1:])

    def _generate(self, embeds: np.ndarray) -> tuple[np.ndarray, int, float]:
        t0 = time.perf_counter()
        past = self.prefix_past
        logits, past = self._run_decoder(embeds, np.array([embeds.shape[1] - 1], np.int64), past)
        t_prefill = time.perf_counter() - t0
        grammar = self._grammar()
        first = grammar.step(logits[0])
        if self.parallel and not grammar.done:
            out, calls = self._decode_jacobi(grammar, first, past)
        else:
            out, calls = self._decode_sequential(grammar, first, past)
        return np.asarray(out, np.int64), calls, t_prefill

    def _decode_sequential(self, grammar, first: int, past: list) -> tuple[list[int], int]:
        out = [first]
        one = np.zeros(1, np.int64)
        calls = 0
        while not grammar.done:
            emb = self._embed([self.head_ids[out[-1]]])[None]
            logits, past = self._run_decoder(emb, one, past)
            calls += 1
            out.append(grammar.step(logits[0]))
        return out, calls

    def _decode_jacobi(self, grammar, first: int, past: list) -> tuple[list[int], int]:
        """Exact parallel decoding: iterate the rest of the chunk to its greedy fixed point.

        Each call feeds ``[last accepted token, guesses...]`` and takes the constrained argmax at
        every position. Prediction ``i`` is exact when the inputs before it were all right, so the
        longest such prefix is accepted (at least one token per call) and the result equals
        sequential greedy decoding token for token. The cache keeps the rows of accepted inputs.
        """
        accepted = [first]
        max_tokens = self.policy.chunk_tokens + (3 if self.navigation else 1)
        guess: list[int] = []
        calls = 0
        while not grammar.done:
            left = max_tokens - len(accepted)  # predictions still needed (upper bound)
            guess = (guess + [accepted[-1]] * left)[: left - 1]
            block = np.asarray([accepted[-1]] + guess, np.int64)
            logits, present = self._run_decoder(
                self._embed(self.head_ids[block])[None], np.arange(len(block), dtype=np.int64), past
            )
            calls += 1
            pred = grammar.argmax_rows(logits)  # -1 once the grammar is done
            n = 1
            while n < len(block) and pred[n - 1] >= 0 and block[n] == pred[n - 1]:
                n += 1
            for tok in pred[:n]:
                if tok < 0 or grammar.done:
                    break
                grammar.advance(int(tok))
                accepted.append(int(tok))
            past_len = self._cache_len(past)
            past = [self._cache_prefix(v, past_len + n) for v in present]
            guess = [int(x) for x in pred[n:] if x >= 0]
        return accepted, calls

    @staticmethod
    def _cache_len(past: list) -> int:
        v = past[0]
        return v.shape[2] if isinstance(v, np.ndarray) else v.shape()[2]

    @staticmethod
    def _cache_prefix(v, rows: int) -> np.ndarray:
        arr = v if isinstance(v, np.ndarray) else v.numpy()
        return np.ascontiguousarray(arr[:, :, :rows])
