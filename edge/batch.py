"""Batched inference: N observations (N robots) -> N action chunks, one vision call and one decoder call per token.

A policy server with several robots waiting runs them together: the image trunk sees a (N,3,S,S) batch and
every decoder call advances all N chunks by one token, each under its own grammar, instruction and
navigation mode. A row's tokens equal those of running it alone (:meth:`Engine.step <vla_edge.edge.engine.Engine.step>`)
wherever the rows of one call do not interact: float32/float16 graphs and weight-only ``MatMulNBits``
(the GPU bundles). Dynamically quantised INT8 bundles (the CPU default) scale activations over all rows of a
call, so :func:`batch_refusal` refuses them, as the engine refuses Jacobi decoding there.

Usage::

    batch = BatchedEngine(engine, max_batch=8)   # shares the engine's sessions, tables and cached prefix
    chunks = batch.step([Observation(state_rad, "pick up the red cube", pixels=p),   # p: (1,3,S,S) float32
                         Observation(state2_rad, "open the drawer", frames=[f0, f1, f2])])

How the rows share a call (the fused decoder, :mod:`vla_edge.export.fused`): every row starts after the
cached system prompt; the prompts (image, instruction, proprio tokens, suffix) differ in length with the
instruction, so shorter ones are padded *at the end* to the longest. Causal attention keeps a row's real
positions blind to its padding; its logits are read at its own last position, and its next call starts
right after its real prompt (``seqlens_k`` per row), overwriting the padding's cache rows. Decoding stops
when every row's grammar is done; a finished row is fed in place (its result is already taken).

Per batch size the cache buffers (N x kv_heads x max_len x head_dim per tensor, the system prompt's rows
copied in) and the bound image buffers are allocated once, at the first batch of that size. State in
radians / metres (the robot's ``state_dim`` values), pixels as :func:`vla_edge.kernels.compose_views`
writes them. No torch here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from vla_edge.edge.decoding import parallel_refusal
from vla_edge.edge.engine import Engine, EngineError
from vla_edge.edge.kv_cache import gqa_lengths
from vla_edge.edge.policy import ActionChunk

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8


@dataclass
class Observation:
    """One robot's request: the state (rad, m), its instruction, and either ``pixels`` ((1,3,S,S) float32,
    composed and normalised) or ``frames`` (the layout's cameras, RGB uint8 HxWx3, composed here)."""

    state: np.ndarray
    instruction: str
    pixels: np.ndarray | None = None
    frames: list[np.ndarray] | None = None
    navigation: bool = False


def batch_refusal(manifest: dict) -> str | None:
    """Why this bundle cannot run a batch whose rows equal one-at-a-time steps, or None when it can.

    Reads the manifest only (as :func:`~vla_edge.edge.decoding.parallel_refusal` does): the fused decoder with a
    batch axis (bundles exported by this version) and graphs whose rows do not interact.
    """
    if manifest.get("decoder_kind") != "fused":
        return "batching needs the fused decoder (this bundle's is plain): re-export with --decoder fused"
    graphs = manifest.get("graphs") or {}
    if (graphs.get("decoder") or {}).get("inputs", {}).get("seqlens_k") != ["batch"]:
        return "this bundle's graphs have no batch axis (exported before batching): re-export it"
    q = manifest.get("quantization") or {}
    for graph in ("vision", "decoder"):
        record = q.get(graph) or {}
        if record.get("rows_interact") or parallel_refusal({"quantization": {"decoder": record}}):
            return (f"its {graph} graph is dynamically quantised ({record.get('scheme')}: activations are scaled "
                    "over all rows of a call), so a batch would not equal one robot at a time; serve an fp32/fp16 "
                    "or MatMulNBits bundle (export --precision fp32, or --target cuda)")
    return None


class _Buffers:
    """The device buffers and IO bindings of one batch size."""

    def __init__(self, engine: Engine, n: int):
        import onnxruntime as ort  # onnxruntime: the [cpu] or [gpu] extra

        d, dev = engine.dims, engine.device
        s = engine.bundle.layout.output
        self.pixels_host = np.zeros((n, 3, s, s), np.float32)
        self.pixels = ort.OrtValue.ortvalue_from_shape_and_type(self.pixels_host.shape, np.float32, dev, 0)
        self.vision = engine.vision.io_binding()
        self.vision.bind_ortvalue_input("pixels", self.pixels)
        self.vision.bind_output("image_embeds", "cpu")  # the prefill takes it after the system prompt, from the host
        self.kv = []
        self.decoder = engine.decoder.io_binding()
        self.decoder.bind_output("logits", "cpu")
        for past, present in zip(engine.past_names, engine.present_names, strict=True):
            shape = (n, d.kv_heads, d.max_len, d.head_dim)
            v = ort.OrtValue.ortvalue_from_shape_and_type(shape, engine.kv_dtype, dev, 0)
            v.update_inplace(np.zeros(shape, engine.kv_dtype))  # rows past a row's length are never read
            self.kv.append(v)
            self.decoder.bind_ortvalue_input(past, v)
            self.decoder.bind_ortvalue_output(present, v)
        self.no_image = np.zeros((n, 0, d.hidden), engine.act_dtype)
        self.no_embeds = np.zeros((n, 0, d.hidden), engine.act_dtype)
        self.no_heads = np.zeros((n, 0), np.int64)


class BatchedEngine:
    """Runs N observations together on an :class:`~vla_edge.edge.engine.Engine`'s sessions (one thread at a time)."""

    def __init__(self, engine: Engine, max_batch: int = DEFAULT_MAX_BATCH):
        if why := batch_refusal(engine.bundle.manifest):
            raise EngineError(why)
        if not engine.by_head:  # a hand-edited manifest, or graphs it does not describe
            raise EngineError("this bundle's graphs do not match its manifest's batch axis: re-export it")
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self._buffers: dict[int, _Buffers] = {}
        self._instructions: dict[tuple[str, bool], np.ndarray] = {}

    def step(self, observations: list[Observation]) -> list[ActionChunk]:
        """N observations -> N chunks, in order. Raises EngineError (naming the row) for a bad observation
        (state width or NaN, empty instruction, camera count), before any graph runs."""
        e = self.engine
        n = len(observations)
        if not 1 <= n <= self.max_batch:
            raise EngineError(f"a batch holds 1..{self.max_batch} observations, got {n}")
        t0 = time.perf_counter()
        rows = []  # each row's prompt after the image: instruction, proprio tokens, suffix
        for i, obs in enumerate(observations):
            try:
                proprio = self._proprio(e.policy.model_state(obs.state))  # shape, then NaN: ValueError
                rows.append(np.concatenate([self._instruction(obs.instruction, obs.navigation), e._embed(proprio),
                                            e.suffix_embeds]))
            except (ValueError, EngineError) as err:
                raise EngineError(f"observation {i}: {err}") from None
        buf = self._buffers.get(n) or self._allocate(n)
        t1 = time.perf_counter()
        for i, obs in enumerate(observations):
            self._pixels_into(buf.pixels_host[i : i + 1], obs, i)
        t2 = time.perf_counter()
        buf.pixels.update_inplace(buf.pixels_host)
        e.vision.run_with_iobinding(buf.vision)
        image = buf.vision.get_outputs()[0].numpy()  # (n, image_tokens, H)
        t3 = time.perf_counter()
        heads, calls, t_prefill = self._generate(buf, image, rows, [o.navigation for o in observations])
        t5 = time.perf_counter()
        chunks = [e.detokenize(np.asarray(h, np.int64), navigation=o.navigation)
                  for h, o in zip(heads, observations, strict=True)]
        t6 = time.perf_counter()
        timings = {"prompt": t1 - t0, "compose": t2 - t1, "vision": t3 - t2, "prefill": t_prefill,
                   "decode": t5 - t3 - t_prefill, "detokenize": t6 - t5, "total": t6 - t0}
        for c in chunks:
            c.timings_ms = {k: v * 1e3 for k, v in timings.items()}  # the batch's stages: shared by its rows
            c.decode_calls = calls
        return chunks

    # -- inputs --------------------------------------------------------------------------------------
    def _allocate(self, n: int) -> _Buffers:
        log.info("batched engine: buffers for batches of %d", n)
        self._buffers[n] = _Buffers(self.engine, n)
        return self._buffers[n]

    def _instruction(self, instruction: str, navigation: bool) -> np.ndarray:
        key = (instruction, navigation)
        if key not in self._instructions:
            if not instruction.strip():
                raise EngineError("instruction is empty")
            if len(self._instructions) >= 256:  # a long-running server sees many; keep the table bounded
                self._instructions.clear()
            e = self.engine
            self._instructions[key] = e._embed(e.bundle.prompt.instruction_ids(e.encode, instruction, navigation))
        return self._instructions[key]

    def _pixels_into(self, out: np.ndarray, obs: Observation, i: int) -> None:
        e = self.engine
        if obs.pixels is not None:
            p = np.asarray(obs.pixels, np.float32)
            if p.size != out.size:
                raise EngineError(f"observation {i}: pixels have shape {p.shape}, expected {out.shape}")
            out[...] = p.reshape(out.shape)
            return
        cams = e.bundle.layout.cameras
        if obs.frames is None or len(obs.frames) != len(cams):
            got = 0 if obs.frames is None else len(obs.frames)
            raise EngineError(f"observation {i}: expected {len(cams)} camera frames ({', '.join(cams)}), got {got}")
        try:
            e.kernels.compose_views(obs.frames, e.bundle.layout, out)
        except (ValueError, TypeError) as err:  # a frame of another shape or type
            raise EngineError(f"observation {i}: {err}") from None

    def _proprio(self, state: np.ndarray) -> np.ndarray:
        e = self.engine
        return e.kernels.tokenize_proprio(state, e.mean, e.std, e.tokens.vocab_base, e.edges)

    # -- decoding ------------------------------------------------------------------------------------
    def _generate(self, buf: _Buffers, image: np.ndarray, rows: list[np.ndarray], navigation: list[bool]):
        """Prefill every row's whole prompt, then one decoder call per token for all rows until every grammar is done.

        GroupQueryAttention takes several rows of several new positions only as a first prompt (no cached rows),
        so the batch's prefill starts at position 0 with the system prompt (a single robot's engine caches it).
        """
        e = self.engine
        n = len(rows)
        lengths = np.array([e.prefix_len + image.shape[1] + len(r) for r in rows])  # each row's real prompt
        width = int(lengths.max())
        longest = max(e.policy.chunk_tokens + (3 if nav else 1) for nav in navigation)
        if width + longest > e.dims.max_len:
            raise EngineError(f"prompt + chunk needs {width + longest} KV rows; this bundle's decoder has "
                              f"max_len {e.dims.max_len} (re-export with a larger --max-len)")
        embeds = np.zeros((n, width, e.dims.hidden), e.act_dtype)
        for i, r in enumerate(rows):
            embeds[i, : lengths[i]] = np.concatenate([e.prefix_embeds, image[i], r])  # padded at the end
        t0 = time.perf_counter()
        logits = self._run(buf, np.zeros(n, np.int64), width, lengths - 1 + np.arange(n) * width, embeds=embeds)
        t_prefill = time.perf_counter() - t0
        grammars = [e._grammar(nav) for nav in navigation]
        out = [[g.step(logits[i])] for i, g in enumerate(grammars)]
        calls = 0
        while not all(g.done for g in grammars):
            heads = np.array([[o[-1]] for o in out], np.int64)
            logits = self._run(buf, lengths, 1, np.arange(n, dtype=np.int64), heads=heads)
            calls += 1
            for i, g in enumerate(grammars):
                if not g.done:  # a finished row is fed in place: its logits are not used
                    out[i].append(g.step(logits[i]))
                    lengths[i] += 1
        return out, calls, t_prefill

    def _run(self, buf: _Buffers, past_len: np.ndarray, t: int, logit_index: np.ndarray,
             embeds: np.ndarray | None = None, heads: np.ndarray | None = None) -> np.ndarray:
        """One decoder call: ``t`` new positions per row after each row's ``past_len`` -> (K, n_head) logits."""
        b = buf.decoder
        seqlens_k = (past_len + t - 1).astype(np.int32)
        _, total = gqa_lengths(int(past_len.max()), t)
        b.bind_cpu_input("image_embeds", buf.no_image)
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds) if embeds is not None else buf.no_embeds)
        b.bind_cpu_input("head_index", heads if heads is not None else buf.no_heads)
        b.bind_cpu_input("logit_index", np.ascontiguousarray(logit_index, np.int64))
        b.bind_cpu_input("seqlens_k", seqlens_k)
        b.bind_cpu_input("total_sequence_length", total)
        b.bind_output("logits", "cpu")
        self.engine.decoder.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[0]
