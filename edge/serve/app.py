"""The policy server on Ray Serve: replicas of :class:`~vla_edge.edge.serve.handler.PolicyHandler` (one bundle's
engine each) behind Serve's HTTP proxies. ``vla-edge serve`` deploys it on a local Ray or a cluster; a Serve
config file naming :func:`build_app` (``vla-edge serve --write-config``) does the same with ``serve deploy``.

Routes, under the application's route prefix (default ``/``)::

    GET  /v1/info    JSON: wire version, bundle id, the bundle's manifest, provider, replica
    POST /v1/step    a wire request (vla_edge.edge.wire) -> a wire reply; errors are one line of text with
                     400 (malformed), 409 (another bundle), 413 (over the bundle's size limit), 500 (a bug)

A bad request never takes a replica down: it is answered and the replica goes on. The engine runs in a
worker thread, so the replica's event loop keeps reading requests and answering Serve's health checks.
Requests that wait together run as one batch (``@serve.batch``, up to ``max_batch``; each robot's tokens are
those of its step alone) where the bundle allows it (:func:`vla_edge.edge.batch.batch_refusal`).

Usage::

    opts = ServeOptions(bundle="bundle/", replicas=2, gpus_per_replica=0.5)
    serve.run(application(opts), name=opts.name, route_prefix=opts.route_prefix)
    yaml.safe_dump(serve_config(opts, host="0.0.0.0", port=8000))      # for `serve deploy`
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from dataclasses import asdict, dataclass, fields

with warnings.catch_warnings():  # Ray Serve's config models pass Field options Pydantic 2 deprecates: not ours
    warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field` is deprecated",
                            category=DeprecationWarning)
    from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from vla_edge.edge.batch import DEFAULT_MAX_BATCH
from vla_edge.edge.serve.handler import PolicyHandler, RequestError
from vla_edge.edge.wire import CONTENT_TYPE

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """One served bundle. ``replicas`` fixed, or autoscaling between ``min_replicas`` and ``max_replicas``
    (Serve's autoscaler, aiming at ``target_ongoing_requests`` per replica). ``threads``: ONNX Runtime
    intra-op threads per replica (default: ``cpus_per_replica``, at least 1). ``max_batch``: requests a replica
    runs as one batch (1: one at a time); ``batch_wait_s``: how long a batch waits for more requests once one
    has arrived (0: a batch is whatever waits when the engine is free, so a lone robot never waits)."""

    bundle: str
    provider: str = "auto"
    threads: int | None = None
    parallel: bool = False
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 16
    max_batch: int = DEFAULT_MAX_BATCH
    batch_wait_s: float = 0.0
    name: str = "vla-edge"
    route_prefix: str = "/"

    @classmethod
    def from_dict(cls, d: dict) -> ServeOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown vla-edge serve option(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def autoscaling(self) -> dict | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        lo = self.min_replicas if self.min_replicas is not None else 1
        return {"min_replicas": lo, "max_replicas": self.max_replicas if self.max_replicas is not None else max(lo, 1),
                "target_ongoing_requests": self.target_ongoing_requests}

    def deployment_options(self) -> dict:
        actor = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        opts = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling:
            opts["autoscaling_config"] = self.autoscaling
        else:
            opts["num_replicas"] = self.replicas
        return opts


@serve.deployment(name="VlaEdgePolicy", health_check_period_s=2.0, health_check_timeout_s=10.0,
                  graceful_shutdown_timeout_s=2.0)
class PolicyDeployment:
    """One replica: the bundle's engine behind ``/v1/info`` and ``/v1/step``; steps that wait together run as
    one batch (``@serve.batch``; the handler runs them one at a time where the bundle cannot batch)."""

    def __init__(self, bundle: str, provider: str = "auto", threads: int | None = None, parallel: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH, batch_wait_s: float = 0.0):
        self.handler = PolicyHandler(bundle, provider=provider, threads=threads, parallel=parallel, max_batch=max_batch)
        self._steps.set_max_batch_size(self.handler.max_batch)
        self._steps.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        received_s = time.perf_counter()
        path = request.url.path.rstrip("/")
        try:
            if path.endswith("/v1/info") and request.method == "GET":
                return JSONResponse(self.handler.info())
            if path.endswith("/v1/step") and request.method == "POST":
                body = await _read_capped(request, self.handler.max_request_bytes)
                reply = await self._steps((body, received_s))
                if isinstance(reply, RequestError):
                    raise reply
                return Response(reply, media_type=CONTENT_TYPE)
            return PlainTextResponse(f"error: no route {request.method} {path or '/'} (GET /v1/info, POST /v1/step)",
                                     status_code=404)
        except RequestError as e:
            return PlainTextResponse(f"error: {e}", status_code=e.status)
        except Exception as e:  # a bug: answered, logged, and the replica goes on
            log.exception("policy server: request failed")
            return PlainTextResponse(f"error: internal: {type(e).__name__}: {e}".splitlines()[0], status_code=500)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=0.0)
    async def _steps(self, requests: list[tuple[bytes, float]]) -> list:
        """The requests waiting together -> a reply (or a RequestError) each; the engine runs in a worker thread,
        so the replica's event loop keeps reading requests and answering Serve's health checks."""
        return await asyncio.to_thread(self.handler.step_many, [b for b, _ in requests], [t for _, t in requests])

    def check_health(self) -> None:
        """Serve's periodic health check: the engine exists (a replica whose constructor failed never gets here)."""
        if self.handler.engine is None:
            raise RuntimeError("no engine")


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request of {declared} bytes is over this bundle's limit of {limit}")
    parts, n = [], 0
    async for part in request.stream():
        n += len(part)
        if n > limit:
            raise RequestError(413, f"request of more than {limit} bytes is over this bundle's limit")
        parts.append(part)
    return b"".join(parts)


def application(opts: ServeOptions):
    """The Serve application of ``opts`` (bind it with ``serve.run``)."""
    threads = opts.threads or max(1, int(opts.cpus_per_replica))
    return PolicyDeployment.options(**opts.deployment_options()).bind(opts.bundle, opts.provider, threads,
                                                                      opts.parallel, opts.max_batch, opts.batch_wait_s)


def build_app(args: dict):
    """Serve's application builder (``import_path: vla_edge.edge.serve.app:build_app``; ``args``: ServeOptions)."""
    return application(ServeOptions.from_dict(dict(args)))


def serve_config(opts: ServeOptions, host: str, port: int) -> dict:
    """A Serve config file (``serve deploy FILE``) for ``opts``: the builder, its args, the proxies' address."""
    args = {k: v for k, v in asdict(opts).items() if k not in ("name", "route_prefix")}
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": opts.name, "route_prefix": opts.route_prefix,
                              "import_path": "vla_edge.edge.serve.app:build_app", "args": args}]}
