"""``vla-edge serve``: a bundle as a Ray Serve application, for robots that run ``vla-edge run --policy-server``
(the ``[serve]`` extra: Ray Serve on the server; the robot needs neither Ray nor torch).

Usage::

    vla-edge serve                                              # the demo bundle on a local Ray, 127.0.0.1:8000
    vla-edge serve --bundle b/                                  # a bundle of yours, 1 replica
    vla-edge serve --bundle b/ --host 0.0.0.0 --replicas 2      # reachable from the robots, two replicas
    vla-edge serve --bundle b/ --address auto --gpus-per-replica 0.5 --min-replicas 1 --max-replicas 8
    vla-edge serve --bundle b/ --write-config serve.yaml        # a Serve config; then `serve deploy serve.yaml`
    vla-edge serve --bundle b/ --max-batch 8 --batch-wait-ms 2  # robots waiting together run as one batch

It prints where it listens and what it serves (stdout), then serves until Ctrl+C or SIGTERM, and shuts
down cleanly: on its own local Ray, Serve and Ray; on a cluster (``--address``), only its application.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import yaml
from vla_edge import VlaEdgeError
from vla_edge.edge.batch import batch_refusal
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.wire import bundle_id
from vla_edge.export.demo import ensure_demo_bundle

log = logging.getLogger(__name__)


def _options(args, bundle: Path):
    from vla_edge.edge.serve.app import ServeOptions  # Ray: the [serve] extra, only when serving

    return ServeOptions(bundle=str(bundle.resolve()), provider=args.provider, threads=args.threads,
                        parallel=args.parallel, replicas=args.replicas, min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas, cpus_per_replica=args.cpus_per_replica,
                        gpus_per_replica=args.gpus_per_replica, route_prefix=args.route_prefix,
                        max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1e3)


def _port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise VlaEdgeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                               "is another server running? pick another --port") from None


def main(args) -> int:
    bundle = Bundle.load(args.bundle or ensure_demo_bundle())  # one line before Ray starts, if missing or corrupt
    opts = _options(args, bundle.root)
    if args.write_config:
        from vla_edge.edge.serve.app import serve_config  # Ray: the [serve] extra

        Path(args.write_config).write_text(yaml.safe_dump(serve_config(opts, args.host, args.port), sort_keys=False))
        print(f"vla-edge serve: wrote {args.write_config}; on the cluster's head node: serve deploy {args.write_config}")
        return 0
    if not args.address:
        _port_free(args.host, args.port)
    import ray  # the [serve] extra: imported only by this command
    from ray import serve
    from vla_edge.edge.serve.app import application

    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    if args.address:
        ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
        except ray.exceptions.RayError as e:  # e.g. the HTTP proxy did not come up: its first line, no traceback
            raise VlaEdgeError(f"Ray Serve did not start on {args.host}:{args.port}: "
                               f"{str(e).strip().splitlines()[0]}") from None
        try:
            serve.run(application(opts), name=opts.name, route_prefix=opts.route_prefix, blocking=False)
        except RuntimeError as e:  # the replicas' constructor failed (Serve retried it): its first line
            raise VlaEdgeError(f"the deployment failed: {str(e).strip().splitlines()[0]}") from None
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}{opts.route_prefix.rstrip('/')}"
        scale = (f"{opts.autoscaling['min_replicas']}..{opts.autoscaling['max_replicas']} replicas (autoscaling)"
                 if opts.autoscaling else f"{opts.replicas} replica{'s' if opts.replicas != 1 else ''}")
        where = f"the Ray cluster at {args.address}" if args.address else "a local Ray"
        refused = batch_refusal(bundle.manifest) if opts.max_batch > 1 else "--max-batch 1"
        batching = f"one request at a time ({refused})" if refused else f"batches of up to {opts.max_batch}"
        print(f"vla-edge serve: bundle {bundle.root} ({bundle_id(bundle.manifest)[:12]}, {bundle.precision}) "
              f"on {where}, {scale}, {batching}, listening on {args.host}:{args.port}", flush=True)
        print(f"vla-edge serve: robots: vla-edge run --policy-server {url}   (Ctrl+C stops)", flush=True)
        while not stop.wait(0.5):
            pass
        print("vla-edge serve: stopping", file=sys.stderr, flush=True)
    finally:
        try:
            if args.address:
                serve.delete(opts.name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
