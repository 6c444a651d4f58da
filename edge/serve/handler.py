"""One bundle's :class:`~vla_edge.edge.engine.Engine` behind the wire format: what a policy-server replica does
with a request, apart from Ray (the Ray Serve deployment, :mod:`vla_edge.edge.serve.app`, calls it).

The composed uint8 image is normalised with the kernel's own values (``(px/255 - 0.5)/0.5`` as float32, a
256-entry table equal to the C++ ``normalise`` for every byte) and handed to ``Engine.step(pixels=...)``,
so a remote step's tokens are those of an in-process step on the same frames. One step at a time per
handler (the engine holds one KV cache); concurrent requests wait on a lock, and the wait is reported
as ``queue_ms``.

Usage::

    handler = PolicyHandler("bundle/", provider="cpu")
    handler.info()                       # {"wire_version", "bundle_id", "manifest", ...}: GET /v1/info
    reply = handler.step(request_bytes)  # reply bytes; RequestError(status, one line) for a bad request
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
from vla_edge import VlaEdgeError, __version__
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

    def __init__(self, bundle_dir: str, provider: str = "auto", threads: int | None = None, parallel: bool = False):
        self.bundle = Bundle.load(bundle_dir)
        self.engine = Engine(self.bundle, provider=provider, threads=threads, parallel=parallel)
        self.bundle_id = bundle_id(self.bundle.manifest)
        s, d = self.bundle.layout.output, self.bundle.policy.state_dim
        self.image_shape = (s, s, 3)
        self.max_request_bytes = 12 + MAX_HEADER_BYTES + s * s * 3 + 8 * d
        """The largest valid request: the message head, the header limit, the image and the state."""
        self._lock = threading.Lock()
        self._episode: tuple[str, bool] | None = None
        self.replica = f"{os.uname().nodename}:{os.getpid()}"
        log.info("policy server: bundle %s (%s) on %s", self.bundle.root, self.bundle_id[:12], self.engine.provider)

    def info(self) -> dict:
        """What ``GET /v1/info`` answers: the robot checks the wire version and bundle id at connect."""
        return {"wire_version": WIRE_VERSION, "bundle_id": self.bundle_id, "manifest": self.bundle.manifest,
                "vla_edge": __version__, "provider": self.engine.provider, "parallel": self.engine.parallel,
                "replica": self.replica}

    def step(self, body: bytes, received_s: float | None = None) -> bytes:
        """One request's bytes -> the reply's bytes. ``received_s``: ``time.perf_counter()`` at arrival."""
        t0 = time.perf_counter()
        received_s = t0 if received_s is None else received_s
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
        pixels = normalise(req.image)
        with self._lock:
            t1 = time.perf_counter()
            try:
                if self._episode != (req.instruction, req.navigation):
                    self.engine.start_episode(req.instruction, navigation=req.navigation)
                    self._episode = (req.instruction, req.navigation)
                chunk = self.engine.step(None, req.state, pixels=pixels)
            except (VlaEdgeError, ValueError) as e:  # a bad state (shape, NaN), an empty instruction
                raise RequestError(400, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        t2 = time.perf_counter()
        server = {"replica": self.replica, "queue_ms": (t1 - received_s) * 1e3, "handle_ms": (t2 - received_s) * 1e3}
        return encode_reply(req.seq, chunk.token_ids, chunk.joints, chunk.base, chunk.decode_calls,
                            chunk.timings_ms, server)
