"""The inference engine: three frames + a state vector -> one action chunk, on ONNX Runtime.

One :meth:`Engine.step` runs the stages that ``vla-edge bench`` times::

    compose     camera frames -> (1,3,S,S) pixels        (C++ kernel, into a preallocated buffer)
    vision      pixels -> image embeddings               (vision.onnx; pixels uploaded into a bound buffer)
    prompt      instruction + proprio tokens + suffix -> text rows (host, from embeddings.npy)
    prefill     image + text rows (after the system prefix, cached at start-up) -> KV cache + first token
    decode      one token at a time (or Jacobi-parallel), grammar-constrained over the cut head
    detokenize  bin tokens -> joint targets (rad, m) under the bundle's action encoding (manifest
                ``policy.actions``: raw, bounds or sigma3); navigation tokens -> (direction, m | deg)

What crosses between host and device inside a step (fused decoder built by this version, whose
graph takes ``image_embeds`` and ``head_index``): up go the pixels (into one bound buffer), the
text rows of the prompt and, per decode call, the chosen head indices (int64) and two int32
lengths; down come only the cut-head logits (K x 261 float32) of each call. The image embeddings
stay on the device between the vision graph and the prefill, the KV cache never moves, and decode
steps are fed by head index (the graph gathers the row from the head's embedding table). Older
fused bundles and the plain graph take the image and decode rows through the host, as before.

Two decoder graphs exist (manifest ``decoder_kind``): ``plain`` (the cache grows by T rows per call)
and ``fused`` (one buffer of ``max_len`` rows per tensor, allocated once per engine and bound as both
``past.*`` and ``present.*``); :mod:`vla_edge.edge.kv_cache` tracks either. On CUDA, ``cuda_graph=True``
adds a second session that replays the fused graph's fixed-shape one-token step as a CUDA graph.
Jacobi (parallel) decoding, and why the engine refuses ``parallel=True`` on dynamic-QInt8 decoders:
:mod:`vla_edge.edge.decoding`; provider choice: :mod:`vla_edge.edge.providers`.

The system-prompt prefix is run once at start-up; every step's cache starts from it. Several robots'
observations in one call (a policy server): :mod:`vla_edge.edge.batch`. No torch here.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.bundle.prompt import tokenizer_encoder
from vla_edge.edge.decoding import decode_jacobi, decode_sequential, parallel_refusal
from vla_edge.edge.kv_cache import GrowingKV, Rows, SharedKV, gqa_lengths
from vla_edge.edge.policy import ActionChunk
from vla_edge.edge.providers import ProviderError, pick_providers

log = logging.getLogger(__name__)

STAGES = ("compose", "vision", "prompt", "prefill", "decode", "detokenize")


class EngineError(VlaEdgeError):
    """Bad engine input (camera count, state width) or an unavailable provider."""


_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

class Engine:
    """Runs a bundle. Create once; call :meth:`start_episode` per instruction, :meth:`step` per chunk."""

    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int | None = None, parallel: bool = False,
                 cuda_graph: bool = False):
        """``cuda_graph``: fused decoder on CUDA only; replay the one-token decode step as a CUDA graph
        (not yet measured on a GPU: see :meth:`_init_cuda_graph`). Ignored elsewhere, with a log line."""
        import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra

        if parallel and (why := parallel_refusal(bundle.manifest)):
            raise EngineError(why)
        self.bundle = bundle
        self.parallel = parallel
        try:
            providers = pick_providers(provider)
        except ProviderError as e:
            raise EngineError(str(e)) from e
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        # Idle intra-op threads sleep instead of spinning: spinning ones starve the e-stop and the tick.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.vision = ort.InferenceSession(str(bundle.path("vision")), so, providers=providers)
        self.decoder = ort.InferenceSession(str(bundle.path("decoder")), so, providers=providers)
        self.provider = self.decoder.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise EngineError("CUDA provider requested but ONNX Runtime fell back to the CPU (CUDA 13 or cuDNN "
                              "libraries not found?); run with --debug to see ONNX Runtime's reason")
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
        self._init_vision(ort)
        self.prefix_embeds = self._embed(bundle.prompt.prefix)
        self.suffix_embeds = self._embed(bundle.prompt.suffix)
        self.instruction_embeds: np.ndarray | None = None
        self.navigation = False
        self.lo, self.hi = self.policy.action_bounds()  # the bundle's action encoding (policy.actions)
        self.mean = np.asarray(self.policy.proprio_mean, np.float64)
        self.edges = self.tokens.bin_edges
        self.std = np.asarray(self.policy.proprio_std, np.float64)
        self.past_names = [f"past.{i}.{kv}" for i in range(d.layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(d.layers) for kv in ("key", "value")]
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.act_dtype = _ORT_FLOAT[types["inputs_embeds"]]  # float16 for a half-precision fused graph
        self.kv_dtype = _ORT_FLOAT[types[self.past_names[0]]]
        self.kind = d.kind
        self.by_head = "head_index" in types  # decode steps fed by head index (gathered inside the graph)
        self.image_on_device = self.by_head and self._image.data_type() == types["image_embeds"]
        self.kv_buffers: list = []  # fused: the preallocated per-tensor buffers (OrtValues)
        self._graph_session = None
        if self.kind == "fused":
            self._init_shared_kv(ort)
            if cuda_graph:
                self._init_cuda_graph(ort, so)
        elif cuda_graph:
            log.warning("engine: cuda_graph needs the fused decoder (this bundle's is %s): ignored", self.kind)
        # The system-prompt prefix never changes: its KV cache is computed once, here, not every step.
        self.prefix_len = 0
        self.prefix_past: list = [np.zeros((1, d.kv_heads, 0, d.head_dim), self.kv_dtype)] * len(self.past_names)
        cache = self._new_cache()
        cache.run(np.zeros(1, np.int64), Rows(embeds=self.prefix_embeds[None]))
        self.prefix_len = cache.length
        self.prefix_past = cache.past if isinstance(cache, GrowingKV) else []

    def _init_vision(self, ort) -> None:
        """Bind the vision graph once: pixels in and image embeddings out, both buffers on the device."""
        d = self.dims
        out_dtype = _ORT_FLOAT[self.vision.get_outputs()[0].type]
        self._pixels = ort.OrtValue.ortvalue_from_shape_and_type(self.pixels.shape, np.float32, self.device, 0)
        self._image = ort.OrtValue.ortvalue_from_shape_and_type((1, d.image_tokens, d.hidden), out_dtype, self.device, 0)
        self._vision_binding = self.vision.io_binding()
        self._vision_binding.bind_ortvalue_input("pixels", self._pixels)
        self._vision_binding.bind_ortvalue_output("image_embeds", self._image)

    def _run_vision(self, pixels: np.ndarray) -> np.ndarray | None:
        """Upload the pixels into their bound buffer and run vision; the embeddings stay in ``self._image``.

        Returns them on the host (1 row per image token) only when the decoder cannot take them there.
        """
        self._pixels.update_inplace(np.ascontiguousarray(pixels, np.float32))
        self.vision.run_with_iobinding(self._vision_binding)
        return None if self.image_on_device else self._image.numpy()[0]

    def _init_shared_kv(self, ort) -> None:
        """Allocate the fused graph's KV buffers once, on the session's device, and bind them.

        Each buffer is bound as ``past.*`` input *and* ``present.*`` output of one IO binding that
        lives as long as the engine: GroupQueryAttention sees the same address for both and appends
        the new rows in place. Only the small inputs are re-bound per call.
        """
        d = self.dims
        shape = (1, d.kv_heads, d.max_len, d.head_dim)
        zeros = np.zeros(shape, self.kv_dtype)
        for _ in self.past_names:
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
            v.update_inplace(zeros)  # rows past the valid length are never read; zeros keep runs reproducible
            self.kv_buffers.append(v)
        self._kv_binding = self.decoder.io_binding()
        self._kv_binding.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits
        for past, present, v in zip(self.past_names, self.present_names, self.kv_buffers, strict=True):
            self._kv_binding.bind_ortvalue_input(past, v)
            self._kv_binding.bind_ortvalue_output(present, v)

    def _init_cuda_graph(self, ort, so) -> None:
        """A second session over the same graph, with ``enable_cuda_graph=1``, for the T=1 decode step.

        NOT YET MEASURED: written for onnxruntime-gpu 1.31 and untested here (no GPU). What a CUDA
        graph needs, and how this provides it:

        * every input and output at a fixed device address for the graph's lifetime: the token's
          head index (1,1) int64 (or, for a graph without ``head_index``, its embedding (1,1,H)),
          ``logit_index`` [0], ``seqlens_k`` and the logits (1,1,n_head) are preallocated here and
          refreshed with ``update_inplace``; ``image_embeds`` and ``inputs_embeds`` are bound to
          empty (0-row) device buffers; the KV buffers are the engine's shared ones;
        * no host-side value may change between replays: ``total_sequence_length`` (a CPU input of
          the CUDA GQA kernel) is pinned to ``max_len``; for one-token steps the kernel reads each
          step's real length from ``seqlens_k`` on the device, and the present shape is ``max_len``
          either way since past and present share the buffer;
        * every node on the CUDA provider: CUDA GroupQueryAttention has float16/bfloat16 kernels
          only, so this needs a float16 fused graph (``build_fused_decoder(dtype="float16")``); with
          a float32 graph, GQA would fall back to the CPU and ONNX Runtime refuses the capture.

        The weights are loaded a second time on the device (one copy per session).
        """
        if self.device != "cuda":
            log.warning("engine: cuda_graph requested on %s: ignored (CUDA only)", self.provider)
            return
        d = self.dims
        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
        self._graph_session = ort.InferenceSession(str(self.bundle.path("decoder")), so, providers=providers)
        new = ort.OrtValue.ortvalue_from_numpy
        self._g_empty: list = []
        n_head = len(self.head_ids)
        if self.by_head:
            self._g_token = ort.OrtValue.ortvalue_from_shape_and_type((1, 1), np.int64, "cuda", 0)
        else:
            self._g_token = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, d.hidden), self.act_dtype, "cuda", 0)
        self._g_index = new(np.zeros(1, np.int64), "cuda", 0)
        self._g_seqlens = new(np.zeros(1, np.int32), "cuda", 0)
        self._g_total = new(np.array(d.max_len, np.int32))  # host memory, never changes (see above)
        self._g_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, n_head), np.float32, "cuda", 0)
        b = self._graph_session.io_binding()
        b.bind_ortvalue_input("head_index" if self.by_head else "inputs_embeds", self._g_token)
        if self.by_head:
            for name in ("inputs_embeds", "image_embeds"):
                empty = ort.OrtValue.ortvalue_from_shape_and_type((1, 0, d.hidden), self.act_dtype, "cuda", 0)
                self._g_empty.append(empty)  # referenced for the session's lifetime
                b.bind_ortvalue_input(name, empty)
        b.bind_ortvalue_input("logit_index", self._g_index)
        b.bind_ortvalue_input("seqlens_k", self._g_seqlens)
        b.bind_ortvalue_input("total_sequence_length", self._g_total)
        b.bind_ortvalue_output("logits", self._g_logits)
        for past, present, v in zip(self.past_names, self.present_names, self.kv_buffers, strict=True):
            b.bind_ortvalue_input(past, v)
            b.bind_ortvalue_output(present, v)
        self._g_binding = b
        log.info("engine: CUDA graph session for one-token decode steps (unmeasured)")

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
        try:
            state = self.policy.model_state(state)  # the robot's state, then the bundle's state_pad
        except ValueError as e:
            raise EngineError(str(e)) from None
        t = {}
        t0 = time.perf_counter()
        if pixels is None:
            pixels = self.prepare_pixels(frames, bgr=bgr)
        t1 = time.perf_counter()
        image = self._run_vision(pixels)
        t2 = time.perf_counter()
        prompt = self._prompt_rows(image, state)
        t3 = time.perf_counter()
        head_idx, calls, t_prefill = self._generate(prompt)
        t5 = time.perf_counter()
        chunk = self.detokenize(head_idx)
        t6 = time.perf_counter()
        t.update(compose=t1 - t0, vision=t2 - t1, prompt=t3 - t2, prefill=t_prefill, decode=t5 - t3 - t_prefill,
                 detokenize=t6 - t5, total=t6 - t0)
        chunk.timings_ms = {k: v * 1e3 for k, v in t.items()}
        chunk.decode_calls = calls
        return chunk

    def _prompt_rows(self, image: np.ndarray | None, state: np.ndarray) -> Rows:
        """Everything after the cached system-prompt prefix: image, instruction, proprio, suffix.

        ``image`` is None when the image embeddings stay on the device (joined inside the decoder).
        """
        proprio = self.kernels.tokenize_proprio(state, self.mean, self.std, self.tokens.vocab_base, self.edges)
        text = [self.instruction_embeds, self._embed(proprio), self.suffix_embeds]
        if image is not None:
            return Rows(embeds=np.concatenate([image, *text])[None])
        return Rows(image_tokens=self.dims.image_tokens, embeds=np.concatenate(text)[None])

    def forced_logits(self, pixels: np.ndarray, state: np.ndarray, head_idx: np.ndarray) -> np.ndarray:
        """Cut-head logits at every generated position when the given tokens are fed (teacher forcing).

        Used by the parity report to compare logits with PyTorch position by position.
        """
        prompt = self._prompt_rows(self._run_vision(pixels), self.policy.model_state(state))
        rows = Rows(prompt.image_tokens, prompt.embeds, np.asarray(head_idx[:-1], np.int64)[None])
        k = len(head_idx)
        return self._new_cache().run(np.arange(rows.count - k, rows.count, dtype=np.int64), rows)

    def detokenize(self, head_idx: np.ndarray, navigation: bool | None = None) -> ActionChunk:
        """Cut-head indices -> chunk; ``navigation``: the output's grammar (default: the episode's)."""
        ids = self.head_ids[head_idx]
        bins = head_idx < self.tokens.n_bins
        base = None
        if self.navigation if navigation is None else navigation:
            direction, value = self.kernels.parse_navigation(head_idx, self.policy.d_max_m, self.policy.theta_max_deg,
                                                              self.edges)
            base = (direction, float(value))
            if direction != "stop":
                return ActionChunk(joints=None, base=base, token_ids=ids)
            bins[:2] = False  # DIR VALUE precede the chunk
        joints = self.kernels.detokenize_actions(ids[bins], self.tokens.vocab_base, self.lo, self.hi, self.edges)
        return ActionChunk(joints=joints, base=base, token_ids=ids)

    # -- decoding ------------------------------------------------------------------------------------
    def _grammar(self, navigation: bool | None = None):
        nav = self.navigation if navigation is None else navigation
        return self.kernels.ChunkGrammar(self.tokens.n_bins, self.policy.chunk_tokens, nav)

    def _new_cache(self) -> GrowingKV | SharedKV:
        """A cache holding the system-prompt prefix (``prefix_len`` rows), ready for the next prompt."""
        if self.kind == "fused":
            return SharedKV(self, self.prefix_len)
        return GrowingKV(self, self.prefix_past, self.prefix_len)

    def _host_embeds(self, rows: Rows) -> np.ndarray:
        """All of ``rows`` as one (1,T,H) host array (graphs without ``head_index``; never the device image)."""
        if rows.image_tokens:
            raise EngineError("internal: the image embeddings are on the device but this graph cannot take them")
        parts = [] if rows.embeds is None else [rows.embeds]
        if rows.heads is not None:
            parts.append(self._embed(self.head_ids[rows.heads.ravel()])[None])
        return np.concatenate(parts, axis=1)

    def _run_plain(self, rows: Rows, logit_index: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One plain-graph call with IO binding; ``past`` and the returned cache are OrtValues (or arrays)."""
        b = self.decoder.io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(self._host_embeds(rows), np.float32))
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

    def _run_fused(self, rows: Rows, logit_index: np.ndarray, past_len: int) -> np.ndarray:
        """One fused-graph call: positions ``past_len .. past_len+T-1`` written into the shared buffers.

        Returns the (K, n_head) logits, the only output that leaves the device. One-token steps fed by
        head index go to the CUDA graph session when there is one.
        """
        t = rows.count
        if past_len + t > self.dims.max_len:
            raise EngineError(f"prompt + chunk needs {past_len + t} KV rows; this bundle's decoder has "
                              f"max_len {self.dims.max_len} (re-export with a larger --max-len)")
        if not self.by_head:
            rows = Rows(embeds=self._host_embeds(rows))
        seqlens_k, total = gqa_lengths(past_len, t)
        one_token = t == 1 and logit_index.shape == (1,) and logit_index[0] == 0
        if self._graph_session is not None and one_token and (rows.heads is not None or not self.by_head):
            self._g_token.update_inplace(rows.heads if self.by_head else rows.embeds.astype(self.act_dtype))
            self._g_seqlens.update_inplace(seqlens_k)
            self._graph_session.run_with_iobinding(self._g_binding)
            return self._g_logits.numpy()[0]
        b = self._kv_binding
        h = self.dims.hidden
        embeds = rows.embeds if rows.embeds is not None else np.zeros((1, 0, h))
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, self.act_dtype))
        if self.by_head:
            heads = rows.heads if rows.heads is not None else np.zeros((1, 0), np.int64)
            b.bind_cpu_input("head_index", np.ascontiguousarray(heads, np.int64))
        if self.by_head:  # graphs with head_index also take image_embeds
            if rows.image_tokens:
                b.bind_ortvalue_input("image_embeds", self._image)
            else:
                b.bind_cpu_input("image_embeds", np.zeros((1, 0, h), self.act_dtype))
        b.bind_cpu_input("logit_index", np.ascontiguousarray(logit_index, np.int64))
        b.bind_cpu_input("seqlens_k", seqlens_k)
        b.bind_cpu_input("total_sequence_length", total)
        b.bind_output("logits", "cpu")
        self.decoder.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[0]

    def _generate(self, prompt: Rows) -> tuple[np.ndarray, int, float]:
        t0 = time.perf_counter()
        cache = self._new_cache()
        logits = cache.run(np.array([prompt.count - 1], np.int64), prompt)
        t_prefill = time.perf_counter() - t0
        grammar = self._grammar()
        first = grammar.step(logits[0])
        if self.parallel and not grammar.done:
            max_tokens = self.policy.chunk_tokens + (3 if self.navigation else 1)
            out, calls = decode_jacobi(grammar, first, cache, max_tokens)
        else:
            out, calls = decode_sequential(grammar, first, cache)
        return np.asarray(out, np.int64), calls, t_prefill

