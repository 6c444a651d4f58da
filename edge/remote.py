"""The robot side of a policy served elsewhere (``vla-edge run --policy-server URL[,URL2]``): a :class:`Policy`
whose step composes the image here and asks a ``vla-edge serve`` server for the chunk. No torch, no ray:
the standard library's HTTP client and the wire format (:mod:`vla_edge.edge.wire`).

The robot keeps its cameras, the composition (the same C++ kernel as an in-process step, up to the uint8
image), the loop, safety, the e-stop and recording; the server runs the bundle's engine from the composed
pixels, so the tokens are those of an in-process step. At :meth:`RemotePolicy.connect` every URL is asked
for ``/v1/info``: a server of another wire version, or one serving another bundle than the robot's
``--bundle`` (or than the other URL), is refused with one line; a URL that does not answer is kept as
the fallback. Each step is one POST with a per-request timeout (a dead or hung replica otherwise hangs
the request); a timeout, a refused connection or a 5xx is retried once on the next URL (the same one
when there is one), and a second failure raises :class:`RemotePolicyError`, which the loop turns into
its safe stop (exit 3, one line). A 4xx (a request the server refuses) is not retried.

``chunk.timings_ms``: ``compose`` (here), the server engine's stages, ``server`` (the server's handling,
queueing included), ``network`` (the round trip less that) and ``total`` (the whole step on the robot:
what async mode's latency compensation counts).

Usage::

    policy = RemotePolicy.connect(["http://gpu1:8000", "http://gpu2:8000"], timeout_s=1.0, bundle_id=None)
    policy.bundle.layout, policy.bundle.policy       # the served bundle's layout and statistics
    policy.start_episode("pick up the red cube")
    chunk = policy.step(frames, state)               # RemotePolicyError after a failed retry
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.manifest import MANIFEST_HASH_KEY, check_manifest, manifest_digest
from vla_edge.edge.bundle.spec import ImageLayout, PolicySpec
from vla_edge.edge.policy import ActionChunk
from vla_edge.edge.wire import CONTENT_TYPE, WIRE_VERSION, WireError, bundle_id, decode_reply, encode_request

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
"""Per request. Two tries must fit in the loop's inference deadline (``LoopConfig.inference_deadline_s``, 10 s)."""


class RemotePolicyError(VlaEdgeError):
    """The policy server cannot be used: unreachable, another bundle or wire version, a failed step (one line)."""


def parse_server_urls(text: str) -> list[str]:
    """``URL[,URL2]`` -> the URLs (http or https, a host, an optional port and path prefix); one line if not."""
    urls = [u.strip().rstrip("/") for u in text.split(",")]
    if not 1 <= len(urls) <= 2 or not all(urls):
        raise RemotePolicyError(f"--policy-server {text!r}: give one URL or two, separated by a comma")
    for u in urls:
        p = urllib.parse.urlsplit(u)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise RemotePolicyError(f"--policy-server {u!r}: expected http://HOST[:PORT][/PREFIX]")
        try:
            p.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise RemotePolicyError(f"--policy-server {u!r}: bad port") from None
    return urls


@dataclass
class RemoteBundle:
    """What the robot needs of the served bundle, from the server's manifest (its checksum checked)."""

    root: str
    """The server's URL (a local bundle has its directory here)."""
    manifest: dict
    layout: ImageLayout
    policy: PolicySpec

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def id(self) -> str:
        return bundle_id(self.manifest)

    @classmethod
    def from_manifest(cls, url: str, m) -> RemoteBundle:
        if not isinstance(m, dict) or MANIFEST_HASH_KEY not in m or m[MANIFEST_HASH_KEY] != manifest_digest(m):
            raise RemotePolicyError(f"policy server {url}: its bundle manifest does not match its checksum")
        if problem := check_manifest(m):
            raise RemotePolicyError(f"policy server {url}: its bundle manifest: {problem}")
        return cls(url, m, ImageLayout.from_dict(m["image_layout"]), PolicySpec.from_dict(m["policy"]))


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class _Server:
    """One URL with a persistent (keep-alive) connection, reopened after any failure."""

    def __init__(self, url: str):
        self.url = url
        p = urllib.parse.urlsplit(url)
        self._cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._prefix = p.hostname, p.port, p.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def call(self, method: str, route: str, body: bytes | None, timeout_s: float) -> tuple[int, bytes]:
        """``(status, body)``; raises OSError (a timeout included) or http.client.HTTPException."""
        deadline = time.monotonic() + timeout_s
        try:
            if self._conn is None:
                self._conn = self._cls(self._host, self._port, timeout=timeout_s)
            conn = self._conn
            conn.timeout = timeout_s
            headers = {"Content-Type": CONTENT_TYPE} if body is not None else {}
            conn.request(method, self._prefix + route, body=body, headers=headers)
            conn.sock.settimeout(max(1e-3, deadline - time.monotonic()))
            r = conn.getresponse()
            data = r.read()
            if time.monotonic() > deadline:
                raise TimeoutError("timed out")
            if r.will_close:
                self.close()
            return r.status, data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RemotePolicy:
    """A :class:`~vla_edge.edge.policy.Policy` served by ``vla-edge serve`` (module docstring)."""

    provider = "remote"

    def __init__(self, servers: list[_Server], bundle: RemoteBundle, timeout_s: float):
        self.servers = servers
        self.bundle = bundle
        self.timeout_s = timeout_s
        self.failures: list[str] = []
        """Every failed attempt, one line each (a retried one too)."""
        self.last_server: dict = {}
        """The last reply's server record: ``replica``, ``queue_ms``, ``handle_ms``, ``batch`` (robots in its batch)."""
        self._active = 0
        self._seq = 0
        self._instruction: str | None = None
        self._navigation = False
        self._composer = None
        self._shapes: tuple = ()

    @classmethod
    def connect(cls, urls: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, bundle_id: str | None = None) -> RemotePolicy:
        """Ask every URL for ``/v1/info``; refuse another wire version or bundle; at least one must answer."""
        servers = [_Server(u) for u in urls]
        found: RemoteBundle | None = None
        down, first = [], None
        for i, s in enumerate(servers):
            try:
                status, data = s.call("GET", "/v1/info", None, max(timeout_s, 2.0))
            except (OSError, http.client.HTTPException) as e:
                down.append(f"{s.url}: {_why(e)}")
                continue
            if status != 200:
                down.append(f"{s.url}: HTTP {status} {data[:120].decode(errors='replace').strip()}")
                continue
            try:
                info = json.loads(data)
                version = info["wire_version"]
            except (ValueError, KeyError, TypeError):
                raise RemotePolicyError(f"policy server {s.url}: /v1/info is not a vla-edge server's answer") from None
            if version != WIRE_VERSION:
                raise RemotePolicyError(f"policy server {s.url} speaks wire version {version}; this robot speaks "
                                        f"{WIRE_VERSION} (install the same vla-edge on both)")
            b = RemoteBundle.from_manifest(s.url, info.get("manifest"))
            if bundle_id is not None and b.id != bundle_id:
                raise RemotePolicyError(f"policy server {s.url} serves bundle {b.id[:12]}, not this robot's "
                                        f"--bundle ({bundle_id[:12]})")
            if found is not None and b.id != found.id:
                raise RemotePolicyError(f"policy servers {found.root} and {s.url} serve different bundles "
                                        f"({found.id[:12]}, {b.id[:12]})")
            found = found or b
            first = i if first is None else first
        if found is None:
            raise RemotePolicyError("no policy server answered: " + "; ".join(down))
        for line in down:
            log.warning("policy server %s (kept as the fallback)", line)
        policy = cls(servers, found, timeout_s)
        policy._active = first
        log.info("policy server %s: bundle %s (%s), timeout %.2f s per request", servers[first].url,
                 found.id[:12], found.precision, timeout_s)
        return policy

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        if not instruction.strip():
            raise RemotePolicyError("instruction is empty")
        self._instruction, self._navigation = instruction, navigation

    def compose(self, frames: list[np.ndarray]) -> np.ndarray:
        """The layout's cameras -> (S, S, 3) uint8: the same C++ kernel as the engine, before normalisation."""
        cams = self.bundle.layout.cameras
        if len(frames) != len(cams):
            raise RemotePolicyError(f"expected {len(cams)} camera frames ({', '.join(cams)}), got {len(frames)}")
        shapes = tuple(f.shape[:2] for f in frames)
        if self._composer is None or shapes != self._shapes:
            self._composer, self._shapes = kernels.Composer(self.bundle.layout, shapes), shapes
        return self._composer.compose_uint8(list(frames), False)

    def step(self, frames: list[np.ndarray], state: np.ndarray) -> ActionChunk:
        if self._instruction is None:
            raise RemotePolicyError("call start_episode(instruction) before step()")
        t0 = time.perf_counter()
        image = self.compose(frames)
        t1 = time.perf_counter()
        self._seq += 1
        body = encode_request(self._seq, self.bundle.id, self._instruction, self._navigation, image,
                              np.asarray(state, np.float64))
        errors = []
        for _ in range(2):
            server = self.servers[self._active]
            sent = time.perf_counter()
            try:
                status, data = server.call("POST", "/v1/step", body, self.timeout_s)
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{server.url} {_why(e)} after {time.perf_counter() - sent:.2f} s")
            else:
                if status == 200:
                    return self._chunk(server, data, t0, t1, sent)
                text = data[:300].decode(errors="replace").strip().splitlines()
                line = f"HTTP {status}: {text[0] if text else ''}".rstrip(": ")
                if status < 500:  # the server refuses this request: another try would be refused too
                    raise RemotePolicyError(f"policy server {server.url} refused the step ({line})")
                errors.append(f"{server.url} {line}")
            self.failures.append(errors[-1])
            log.warning("policy server: %s; retrying on %s", errors[-1],
                        self.servers[(self._active + 1) % len(self.servers)].url)
            self._active = (self._active + 1) % len(self.servers)
        raise RemotePolicyError("policy server: " + "; then ".join(errors))

    def _chunk(self, server: _Server, data: bytes, t0: float, t1: float, sent: float) -> ActionChunk:
        done = time.perf_counter()
        try:
            rep = decode_reply(data)
        except WireError as e:
            raise RemotePolicyError(f"policy server {server.url}: {e}") from None
        if rep.seq != self._seq:
            raise RemotePolicyError(f"policy server {server.url} answered step {rep.seq} to step {self._seq}")
        self.last_server = rep.server
        handle_ms = float(rep.server.get("handle_ms", 0.0))
        timings = {k: v for k, v in rep.timings_ms.items() if k not in ("compose", "total")}
        timings.update(compose=(t1 - t0) * 1e3, server=handle_ms,
                       network=max(0.0, (done - sent) * 1e3 - handle_ms), total=(done - t0) * 1e3)
        return ActionChunk(joints=None if rep.joints is None else np.array(rep.joints), base=rep.base,
                           token_ids=np.array(rep.token_ids), timings_ms=timings, decode_calls=rep.decode_calls)

    def close(self) -> None:
        for s in self.servers:
            s.close()
