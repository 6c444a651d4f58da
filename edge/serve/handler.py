"""One bundle's :class:`~vla_edge.edge.engine.Engine` behind the wire format: what a policy-server replica does
with a request, apart from Ray (the Ray Serve deployment, :mod:`vla_edge.edge.serve.app`, calls it).

The composed uint8 image is normalised with the kernel's own values (``(px/255 - 0.5)/0.5`` as float32, a
256-entry table equal to the C++ ``normalise`` for every byte) and handed to ``Engine.step(pixels=...)``,
so a remote step's tokens are those of an in-process step on the same frames. Requests that arrive together
(Serve's ``@serve.batch``) run as one batch (:class:`~vla_edge.edge.batch.BatchedEngine`: each row's tokens
equal its step alone) where the bundle allows it (:func:`~vla_edge.edge.batch.batch_refusal`: not on a
dynamically quantised CPU bundle), else one at a time; a bad request is answered on its own and never fails
the others. One batch at a time per handler; the wait is reported as ``queue_ms``, the batch size as ``batch``.

Usage::

    handler = PolicyHandler("bundle/", provider="cpu")
    handler.info()                       # {"wire_version", "bundle_id", "manifest", ...}: GET /v1/info
    reply = handler.step(request_bytes)  # reply bytes; RequestError(status, one line) for a bad request
    replies = handler.step_many([a, b])  # reply bytes or a RequestError per request, in order
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
from vla_edge import VlaEdgeError, __version__
from vla_edge.edge.batch import DEFAULT_MAX_BATCH, BatchedEngine, Observation, batch_refusal
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine
from vla_edge.edge.wire import (
    MAX_HEADER_BYTES,
    WIRE_VERSION,
    WireError,
    bundle_id,
    decode_request,
    encode_reply,
)

log = logging.getLogger(__name__)

NORMALISE_LUT = ((np.arange(256) / 255.0 - 0.5) / 0.5).astype(np.float32)
"""``(px/255 - 0.5)/0.5`` in float64 cast to float32, per byte: the C++ kernel's values (its tests check all 256)."""


class RequestError(VlaEdgeError):
    """A request the server refuses: ``status`` is the HTTP status (400 malformed, 409 other bundle, 413 too big)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def normalise(image: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 RGB -> (1, 3, S, S) float32 model input, bit-equal to ``kernels.compose_views``."""
    return np.ascontiguousarray(NORMALISE_LUT[image].transpose(2, 0, 1)[None])


class PolicyHandler:
    """Loads and verifies the bundle, builds its engine (same provider choice, decoding and kernels as ``run``)."""

    def __init__(self, bundle_dir: str, provider: str = "auto", threads: int | None = None, parallel: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.bundle = Bundle.load(bundle_dir)
        self.engine = Engine(self.bundle, provider=provider, threads=threads, parallel=parallel)
        self.batch_refused = batch_refusal(self.bundle.manifest) if max_batch > 1 else "--max-batch 1"
        self.batch = None if self.batch_refused else BatchedEngine(self.engine, max_batch)
        self.max_batch = 1 if self.batch is None else max_batch
        self.bundle_id = bundle_id(self.bundle.manifest)
        s, d = self.bundle.layout.output, self.bundle.policy.state_dim
        self.image_shape = (s, s, 3)
        self.max_request_bytes = 12 + MAX_HEADER_BYTES + s * s * 3 + 8 * d
        """The largest valid request: the message head, the header limit, the image and the state."""
        self._lock = threading.Lock()
        self._episode: tuple[str, bool] | None = None
        self.replica = f"{os.uname().nodename}:{os.getpid()}"
        log.info("policy server: bundle %s (%s) on %s, %s", self.bundle.root, self.bundle_id[:12], self.engine.provider,
                 f"batches of up to {self.max_batch}" if self.batch else f"one request at a time ({self.batch_refused})")

    def info(self) -> dict:
        """What ``GET /v1/info`` answers: the robot checks the wire version and bundle id at connect."""
        return {"wire_version": WIRE_VERSION, "bundle_id": self.bundle_id, "manifest": self.bundle.manifest,
                "vla_edge": __version__, "provider": self.engine.provider, "parallel": self.engine.parallel,
                "max_batch": self.max_batch, "batching_off": self.batch_refused, "replica": self.replica}

    def step(self, body: bytes, received_s: float | None = None) -> bytes:
        """One request's bytes -> the reply's bytes. ``received_s``: ``time.perf_counter()`` at arrival."""
        out = self.step_many([body], [received_s])[0]
        if isinstance(out, RequestError):
            raise out
        return out

    def step_many(self, bodies: list[bytes], received_s: list[float | None] | None = None) -> list[bytes | RequestError]:
        """Requests -> replies (or each request's RequestError), in order. Valid requests run as one batch
        (:class:`~vla_edge.edge.batch.BatchedEngine`) when the bundle allows it, else one at a time."""
        t0 = time.perf_counter()
        received = [t0 if r is None else r for r in (received_s or [None] * len(bodies))]
        out: list[bytes | RequestError | None] = [None] * len(bodies)
        valid = []
        for i, body in enumerate(bodies):
            try:
                valid.append((i, self._parse(body)))
            except RequestError as e:
                out[i] = e
        with self._lock:
            t1 = time.perf_counter()
            chunks, batch = self._run([parsed for _, parsed in valid])
        t2 = time.perf_counter()
        for (i, (req, _)), chunk in zip(valid, chunks, strict=True):
            if isinstance(chunk, RequestError):
                out[i] = chunk
                continue
            server = {"replica": self.replica, "queue_ms": (t1 - received[i]) * 1e3,
                      "handle_ms": (t2 - received[i]) * 1e3, "batch": batch}
            out[i] = encode_reply(req.seq, chunk.token_ids, chunk.joints, chunk.base, chunk.decode_calls,
                                  chunk.timings_ms, server)
        return out

    def _parse(self, body: bytes):
        """A request's bytes -> (request, (1,3,S,S) pixels), or the RequestError that answers it."""
        if len(body) > self.max_request_bytes:
            raise RequestError(413, f"request of {len(body)} bytes is over this bundle's limit of "
                               f"{self.max_request_bytes}")
        try:
            req = decode_request(body)
        except WireError as e:
            raise RequestError(400, str(e)) from None
        if req.bundle != self.bundle_id:
            raise RequestError(409, f"request is for bundle {req.bundle[:12]}, this server runs "
                               f"{self.bundle_id[:12]} ({self.bundle.root.name})")
        if req.image.shape != self.image_shape:
            raise RequestError(400, f"image has shape {req.image.shape}, this bundle takes {self.image_shape}")
        try:  # checked here so that one robot's bad state never fails another's step in the same batch
            self.bundle.policy.model_state(req.state)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        if not np.isfinite(req.state).all():
            bad = int(np.flatnonzero(~np.isfinite(req.state))[0])
            raise RequestError(400, f"state[{bad}] is {req.state[bad]} (NaN or infinite): not a robot's state")
        if not req.instruction.strip():
            raise RequestError(400, "instruction is empty")
        return req, normalise(req.image)

    def _run(self, valid: list) -> tuple[list, int]:
        """The engine on the parsed requests (under the lock): a batch when it may, else one at a time.
        Returns a chunk or a RequestError per request, and the size of the batch they ran in."""
        if self.batch is not None and len(valid) > 1:
            obs = [Observation(req.state, req.instruction, pixels=px, navigation=req.navigation) for req, px in valid]
            try:
                return self.batch.step(obs), len(valid)
            except (VlaEdgeError, ValueError) as e:  # e.g. one instruction too long: each request gets its own answer
                log.info("policy server: batch of %d failed (%s); running them one at a time", len(valid), e)
        return [self._step_one(req, px) for req, px in valid], 1

    def _step_one(self, req, pixels):
        try:
            if self._episode != (req.instruction, req.navigation):
                self.engine.start_episode(req.instruction, navigation=req.navigation)
                self._episode = (req.instruction, req.navigation)
            return self.engine.step(None, req.state, pixels=pixels)
        except (VlaEdgeError, ValueError) as e:  # a bad state (shape, NaN), an empty instruction
            return RequestError(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
