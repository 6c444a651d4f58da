"""Benchmark: a recorded run of the simulated robot holds its rate (issue 12), and what the codecs cost.

Runs ``vla_edge.edge.session.run`` (what ``vla-edge run --robot sim --record DIR`` runs) in this process
with the keyboard off, then reads the episode it wrote and prints::

    rate_hz, ticks, overruns          the loop's own summary
    longest_tick_gap_ms               max time between two tick starts (and the same from the file's
                                      ``vla_edge/tick_t`` rows: longest_recorded_gap_ms)
    watchdog_trips                    1 if the run ended on a fault (camera stale, no feedback, ...)
                                      + the simulated base's own 500 ms watchdog stops
    rows, equal_rows                  rows per dataset, and whether every per-tick dataset has as many
    mb_per_min                        episode file size over the run's duration (MB = 1e6 bytes)
    record_tick_ms                    what recording costs the tick: checking the row and queueing it
    writer_ms_mean|max, max_queued    the recorder's writer thread: compress + write + flush per row

``--codecs`` instead times each image option on one 640x480 frame (the simulator's rendering, and the
same frame with camera-like noise, sigma 3) and the longest stall a 1 ms sleeper on the main thread
sees while a writer thread writes 60 such frames.

Usage::

    python tools/bench_record.py --seconds 60 --mode async [--compress gzip|lzf|none] [--bundle DIR]
    python tools/bench_record.py --seconds 60 --mode async --no-record      # the baseline, same load
    python tools/bench_record.py --codecs

The bundle defaults to the demo bundle (the shipped tiny reach policy, exported once into
``--workdir``; needs the [export] extra the first time).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
from vla_edge.edge.episodes import recorder as recorder_mod
from vla_edge.edge.episodes.format import TICK_T, episode_paths, per_tick_datasets
from vla_edge.edge.session import RunConfig, run
from vla_edge.export.demo import ensure_demo_bundle
from vla_edge.firmware_bridge.camera_sim import Scene, SceneRenderer


def bench_run(args) -> dict:
    bundle = args.bundle or str(ensure_demo_bundle(args.workdir))
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_record_"))
    seen = {}
    compress = {"none": False}.get(args.compress, args.compress)
    original = recorder_mod.EpisodeRecorder.__init__

    def with_compress(self, *a, **kw):  # run() builds the recorder with the default: choose it here
        original(self, *a, **{**kw, "compress": compress})

    recorder_mod.EpisodeRecorder.__init__ = with_compress

    gaps = {"last": None, "max_s": 0.0}
    tick_cost_s: list[float] = []

    def hook(robot, loop, estop):
        seen.update(robot=robot, loop=loop)
        tick = loop.stats.tick

        def timed_tick(t_start, t_deadline, t_end):  # the longest gap between two tick starts
            if gaps["last"] is not None:
                gaps["max_s"] = max(gaps["max_s"], t_start - gaps["last"])
            gaps["last"] = t_start
            tick(t_start, t_deadline, t_end)

        loop.stats.tick = timed_tick
        recorder = next((o for o in loop.observers if isinstance(o, recorder_mod.EpisodeRecorder)), None)
        seen["recorder"] = recorder
        if recorder is not None:  # what recording costs the tick itself: check + queue
            record_tick = recorder.record_tick

            def timed_record_tick(*a, **kw):
                t = time.perf_counter()
                try:
                    return record_tick(*a, **kw)
                finally:
                    tick_cost_s.append(time.perf_counter() - t)

            recorder.record_tick = timed_record_tick

    json_path = out / "summary.json"
    t0 = time.monotonic()
    try:
        cfg = RunConfig(bundle=bundle, mode=args.mode, seconds=args.seconds, keyboard="none",
                        record=None if args.no_record else str(out), json_path=str(json_path))
        code = run(cfg, on_connected=hook)
    finally:
        recorder_mod.EpisodeRecorder.__init__ = original
    wall_s = time.monotonic() - t0
    loop = seen["loop"]
    summary = json.loads(json_path.read_text())
    sim_base_trips = loop.robot.sim.base.watchdog_trips if getattr(loop.robot, "sim", None) else 0
    result = {
        "exit_code": code, "fault": loop.fault, "mode": args.mode, "seconds": args.seconds, "wall_s": round(wall_s, 1),
        "compress": "no recording" if args.no_record else args.compress, "rate_hz": round(summary["rate_hz"], 2),
        "ticks": summary["ticks"], "overruns": summary["overruns"],
        "jitter_ms": {k: round(v, 2) for k, v in summary["jitter_ms"].items()},
        "longest_tick_gap_ms": round(gaps["max_s"] * 1e3, 1),
        "watchdog_trips": int(loop.fault is not None) + sim_base_trips,
    }
    if args.no_record:
        return result
    [path] = episode_paths(out)
    with h5py.File(path, "r") as f:
        lengths = {f[n].shape[0] for n in per_tick_datasets(f)}
        t = f[TICK_T][:]
    duration_s = float(t[-1] - t[0]) if t.size > 1 else 0.0
    writer = seen["recorder"].stats.summary()
    return {
        **result,
        "longest_recorded_gap_ms": round(float(np.diff(t).max() * 1e3), 1) if t.size > 1 else None,
        "rows": max(lengths), "equal_rows": len(lengths) == 1,
        "mb_per_min": round(path.stat().st_size / 1e6 / (duration_s / 60), 1) if duration_s else None,
        "record_tick_ms": {q: round(float(np.percentile(tick_cost_s, p) * 1e3), 3)
                           for q, p in (("p50", 50), ("p99", 99), ("max", 100))} if tick_cost_s else None,
        "writer_ms_mean": round(writer["mean_ms"], 2), "writer_ms_max": round(writer["max_ms"], 1),
        "max_queued": writer["max_queued"], "file": str(path),
    }


def _frames() -> dict[str, np.ndarray]:
    sim = SceneRenderer("cam_high", Scene(), 640, 480).render()
    noise = np.random.default_rng(0).normal(0, 3, sim.shape).round().astype(np.int16)
    return {"sim": sim, "sim+noise3": np.clip(sim.astype(np.int16) + noise, 0, 255).astype(np.uint8)}


def _stall_while(write) -> float:
    """Longest extra delay (ms) of 1 ms sleeps on this thread while ``write()`` runs on another."""
    done = threading.Event()
    th = threading.Thread(target=lambda: (write(), done.set()))
    worst = 0.0
    th.start()
    while not done.is_set():
        t = time.perf_counter()
        time.sleep(0.001)
        worst = max(worst, time.perf_counter() - t - 0.001)
    th.join()
    return worst * 1e3


def bench_codecs(n: int = 60) -> list[dict]:
    rows = []
    for name, img in _frames().items():
        with tempfile.TemporaryDirectory() as d:
            for codec in ("gzip-1 direct", "lzf", "none"):
                f = h5py.File(Path(d) / f"{codec}.h5", "w", libver="latest")
                kw = {"gzip-1 direct": {"compression": "gzip", "compression_opts": 1}, "lzf": {"compression": "lzf"},
                      "none": {}}[codec]
                ds = f.create_dataset("x", shape=(n, *img.shape), chunks=(1, *img.shape), dtype=np.uint8, **kw)

                def write(ds=ds, f=f, codec=codec, img=img):
                    for i in range(n):
                        if codec == "gzip-1 direct":
                            ds.id.write_direct_chunk((i, 0, 0, 0), zlib.compress(img.data, 1), 0)
                        else:
                            ds[i] = img
                        f.flush()

                t = time.perf_counter()
                stall_ms = _stall_while(write)
                ms = (time.perf_counter() - t) / n * 1e3
                f.close()
                size = (Path(d) / f"{codec}.h5").stat().st_size / n
                rows.append({"frames": name, "codec": codec, "ms_per_frame": round(ms, 2), "kB_per_frame": round(size / 1e3),
                             "mb_per_min_3cams_30hz": round(size * 3 * 30 * 60 / 1e6), "main_thread_stall_ms": round(stall_ms, 1)})
        t = time.perf_counter()
        for _ in range(n):
            ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append({"frames": name, "codec": "jpeg-90 (breaks the (N,480,640,3) layout)",
                     "ms_per_frame": round((time.perf_counter() - t) / n * 1e3, 2), "kB_per_frame": round(jpg.size / 1e3),
                     "mb_per_min_3cams_30hz": round(jpg.size * 3 * 30 * 60 / 1e6), "main_thread_stall_ms": None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--mode", choices=["sync", "async"], default="async")
    p.add_argument("--compress", choices=["gzip", "lzf", "none"], default="gzip")
    p.add_argument("--no-record", action="store_true", help="the same run without recording (the baseline)")
    p.add_argument("--bundle")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vla-edge-bench-demo"))
    p.add_argument("--out", help="episode directory (default: a new temporary directory)")
    p.add_argument("--codecs", action="store_true", help="time the image codecs instead of running the robot")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.codecs:
        for row in bench_codecs():
            print(json.dumps(row))
    else:
        print(json.dumps(bench_run(args), indent=1))


if __name__ == "__main__":
    main()
