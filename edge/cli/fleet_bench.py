"""``vla-edge bench --bundle B --fleet``: the policy server against an in-process engine, in the same run.

Starts a private local Ray Serve (loopback, one replica of the bundle, the same ONNX Runtime threads as the
in-process engine), then measures on the same synthetic observations:

    in-process      ``Engine.step`` (compose included), ``--steps`` steps after ``--warmup``
    batched N       ``BatchedEngine.step`` of N observations in one call (N = 1, 2, 4, 8; compose included):
                    steps/s = N / the batch's p50. Only where the bundle batches exactly
                    (:func:`~vla_edge.edge.batch.batch_refusal`: not a dynamically quantised CPU int8 bundle)
    remote          ``RemotePolicy.step`` through the server (compose here, HTTP, the replica's engine):
                    its p50 less the in-process p50 is the server's per-request overhead
    fleet N         N simulated robots stepping at once for ``--fleet-seconds`` each (N = 1, 2, 4, 8):
                    steps/s of all of them and each step's latency. The replica runs the requests that wait
                    together as one batch (up to 8) where the bundle batches, else one at a time; more
                    replicas (``vla-edge serve --replicas``) or GPUs scale it further.

Usage::

    vla-edge bench --bundle b/ --fleet [--fleet-seconds 5] [--steps 20] [--batch-wait-ms 20] [--json fleet.json]
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from vla_edge.edge.batch import BatchedEngine, Observation, batch_refusal
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.cli.bench import synthetic_inputs
from vla_edge.edge.engine import Engine
from vla_edge.edge.remote import RemotePolicy
from vla_edge.edge.telemetry import out_console, percentiles

ROBOTS = (1, 2, 4, 8)
INSTRUCTION = "pick up the red cube"


def _timed(step, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _batched(engine: Engine, steps: int, warmup: int) -> list[dict]:
    """``BatchedEngine.step`` on N different observations (composed in the call) for each N of ``ROBOTS``."""
    batch = BatchedEngine(engine, max_batch=max(ROBOTS))
    out = []
    for n in ROBOTS:
        obs = []
        for i in range(n):
            frames, state = synthetic_inputs(engine.bundle.layout, engine.bundle.policy.robot_state_dim, seed=i)
            obs.append(Observation(state, INSTRUCTION, frames=frames))
        lat = _timed(lambda obs=obs: batch.step(obs), steps, warmup)
        p = percentiles(lat, (50, 95))
        out.append({"robots": n, **p, "steps_per_s": n * 1e3 / p["p50"]})
    return out


def _fleet(url: str, robots: int, seconds: float, layout, state_dim: int) -> dict:
    """``robots`` threads, each its own RemotePolicy and observation, stepping until ``seconds`` have passed."""
    lat: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready, go = threading.Barrier(robots + 1), threading.Event()
    end_s = [0.0]

    def robot(i: int) -> None:
        frames, state = synthetic_inputs(layout, state_dim, seed=i)
        p = RemotePolicy.connect([url], timeout_s=4.0)
        p.start_episode(INSTRUCTION)
        p.step(frames, state)  # connected and warm
        ready.wait()
        go.wait()
        mine = []
        try:
            while time.perf_counter() < end_s[0]:
                t0 = time.perf_counter()
                p.step(frames, state)
                mine.append((time.perf_counter() - t0) * 1e3)
                batches.append(int(p.last_server.get("batch", 1)))
        except Exception as e:  # reported in the table, not raised from a thread
            errors.append(str(e))
        with lock:
            lat.extend(mine)
        p.close()

    threads = [threading.Thread(target=robot, args=(i,), daemon=True) for i in range(robots)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    end_s[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join(seconds + 30)
    wall = time.perf_counter() - t0
    return {"robots": robots, "steps": len(lat), "steps_per_s": len(lat) / wall, **percentiles(lat, (50, 95)),
            "mean_batch": sum(batches) / max(1, len(batches)), "errors": errors[:3]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args) -> int:
    import ray  # the [serve] extra: only this benchmark and `vla-edge serve` import it
    from ray import serve
    from vla_edge.edge.serve.app import ServeOptions, application

    console = out_console()
    bundle = Bundle.load(args.bundle)
    threads = max(1, os.cpu_count() or 1)
    frames, state = synthetic_inputs(bundle.layout, bundle.policy.robot_state_dim)
    engine = Engine(bundle, provider=args.provider, threads=threads)
    engine.start_episode(INSTRUCTION)
    local = _timed(lambda: engine.step(frames, state), args.steps, args.warmup)
    refused = batch_refusal(bundle.manifest)
    batched = [] if refused else _batched(engine, args.steps, args.warmup)
    engine = None  # free its sessions before the replica loads the same bundle
    ray.init(num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ServeOptions(bundle=str(bundle.root.resolve()), provider=args.provider, threads=threads, cpus_per_replica=0,
                            batch_wait_s=args.batch_wait_ms / 1e3)
        serve.run(application(opts), name=opts.name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        policy = RemotePolicy.connect([url], timeout_s=4.0)
        policy.start_episode(INSTRUCTION)
        remote = _timed(lambda: policy.step(frames, state), args.steps, args.warmup)
        policy.close()
        fleet = [_fleet(url, n, args.fleet_seconds, bundle.layout, bundle.policy.robot_state_dim) for n in ROBOTS]
    finally:
        serve.shutdown()
        ray.shutdown()
    lp, rp = percentiles(local, (50, 95)), percentiles(remote, (50, 95))
    res = {"bundle": str(bundle.root), "provider": args.provider, "threads": threads, "cpus": os.cpu_count(),
           "in_process_ms": lp, "remote_ms": rp, "overhead_p50_ms": rp["p50"] - lp["p50"], "batched": batched,
           "batching_off": refused, "batch_wait_ms": args.batch_wait_ms, "fleet": fleet}
    console.print(f"policy server vs in-process: {bundle.root} ({bundle.precision}), {args.provider}, {threads} "
                  f"ONNX Runtime threads; server: local Ray Serve, 1 replica, loopback HTTP, --batch-wait-ms "
                  f"{args.batch_wait_ms:g}. x: steps/s against one robot at a time in-process; batch: robots per "
                  "server batch (mean)", highlight=False)

    def row(label: str, p: dict, rate: float | None = None, extra: str = "") -> None:
        x = "" if rate is None else f"{rate:9.1f}{rate * lp['p50'] / 1e3:7.2f}x"
        console.print(f"  {label:<24}{p['p50']:8.1f}{p['p95']:8.1f}{x}{extra}", highlight=False)

    console.print(f"  {'':<24}{'p50 ms':>8}{'p95 ms':>8}{'steps/s':>9}{'x':>8}", highlight=False)
    row("in-process step", lp, 1e3 / lp["p50"])
    for b in batched:
        row(f"in-process batch of {b['robots']}", b, b["steps_per_s"])
    if refused:
        console.print(f"  in-process batches: off: {refused}", highlight=False)
    row("remote step", rp, extra=f"   overhead p50 {res['overhead_p50_ms']:+.1f} ms")
    for f in fleet:
        err = f"  errors: {f['errors'][0]}" if f["errors"] else ""
        row(f"fleet of {f['robots']} robot{'s' if f['robots'] > 1 else ''}", f, f["steps_per_s"],
            f"  batch {f['mean_batch']:.1f}{err}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if any(f["errors"] for f in fleet) else 0
