"""E-stop latency measured from outside the process: key on the terminal -> zero frame on the base's serial line.

This process plays the operator and the TRACER base; ``vla-edge run`` runs in a child process on the
simulated arms and cameras, with its keyboard on a pseudo-terminal (its stdin, ``--keyboard tty``)
and its base on a second pseudo-terminal that this process owns (a copy of the ``sim`` profile whose
``[base] port`` is that pty). For each trip::

    the child's base drives forward (a navigation plan that never ends), non-zero frames on the line
    t_key   = time.monotonic() just before this process writes b" " to the keyboard pty
    t_frame = time.monotonic() when this process reads the first zero-velocity frame after t_key
    latency = t_frame - t_key; then r, y (resume) and wait until the base drives again

Two loads: ``idle`` (no inference) and ``inference`` (the bundle's real engine steps back to back on a
thread of the child, ONNX Runtime and the decode loop competing with the e-stop thread for the CPU and
the GIL). Both clocks are this machine's CLOCK_MONOTONIC; this process's own wake-up time is included
(its reader thread asks for real-time priority, else niceness -10, as the child's keyboard thread does).

Usage::

    python -m vla_edge.tools.bench_estop --bundle BUNDLE [--trips 30] [--load idle inference] [--nice -5]
                                         [--busy 6] [--json out.json]
    python -m vla_edge.tools.bench_estop --load pty [--busy 4]   # the kernel's part alone: a bare pty each way

``--busy N`` starts N busy-loop Python processes for the whole benchmark (the README's "under CPU load").

Prints p50/p99/max (ms) over the trips of each load, and the child's own e-stop latency from its
summary (key read -> every stop command written: base frame and both arms' hold frames on CAN).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from vla_edge.edge.estop.latch import prefer_this_thread
from vla_edge.edge.policy import ActionChunk
from vla_edge.edge.session import RunConfig, run
from vla_edge.firmware_bridge import tracer_protocol as tp

SIM_PROFILE = Path(__file__).parents[1] / "edge" / "robots" / "sim.toml"
if not SIM_PROFILE.exists():  # installed layout: vla_edge/tools -> vla_edge/edge
    SIM_PROFILE = Path(__file__).resolve().parents[1] / "edge" / "robots" / "sim.toml"
DRIVE_MPS = 0.2
FEEDBACK_PERIOD_S = 0.02
TRIP_TIMEOUT_S = 3.0


class PtyBase:
    """The TRACER base on a pty this process owns: logs every motion command as it is read
    (``(t_read_s, vx_mps, wz_radps)``) and answers motion feedback every 20 ms."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self._slave)
        self.commands: list[tuple[float, float, float]] = []
        self.watch_from_s: float | None = None
        """Set before a key: the reader sets :attr:`stopped` on the first zero frame read after it."""
        self.stopped = threading.Event()
        self.stop_read_s: float | None = None
        self._reader = tp.FrameReader()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._answer, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        prefer_this_thread()  # this process's wake-up time is measurement error: keep it small
        while not self._stop.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            t = time.monotonic()
            try:
                chunk = os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                time.sleep(0.001)
                continue
            for f in self._reader.feed(chunk):
                if f.type == tp.TYPE_COMMAND and f.id == tp.CMD_MOTION:
                    vx, wz, _, _ = tp.decode_motion_command(f)
                    self.commands.append((t, vx, wz))
                    since = self.watch_from_s
                    if since is not None and t >= since and vx == wz == 0.0 and not self.stopped.is_set():
                        self.stop_read_s = t
                        self.stopped.set()

    def _answer(self) -> None:
        n = 0
        while not self._stop.wait(FEEDBACK_PERIOD_S):
            try:
                os.write(self.master, tp.motion_feedback(0.0, 0.0, n & 0xFF))
            except OSError:
                pass
            n += 1

    def driving(self) -> bool:
        return bool(self.commands) and self.commands[-1][1] > 0.0

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(1.0)
        for fd in (self.master, self._slave):
            os.close(fd)


def wait_until(cond, timeout_s: float, what: str, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if child.poll() is not None:
            raise RuntimeError(f"bench_estop: the run exited ({child.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench_estop: timed out waiting for {what}")
        time.sleep(0.001)


def measure(bundle: str, load: str, trips: int, workdir: Path, nice: int = 0) -> dict:
    base = PtyBase()
    profile = workdir / f"sim_{load}.toml"
    # This measures the e-stop, not the watchdogs: on a loaded machine a stall of either process must
    # not end the run, so the sim's 0.3 s feedback and camera limits become 2 s here.
    text = SIM_PROFILE.read_text().replace('port = "sim"', f'port = "{base.port}"')
    text = text.replace("feedback_timeout_s = 0.3", "feedback_timeout_s = 2.0").replace(
        "stale_after_s = 0.3", "stale_after_s = 2.0")
    profile.write_text(text)
    summary = workdir / f"summary_{load}.json"
    kbd_master, kbd_slave = os.openpty()
    child = subprocess.Popen(
        (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", "vla_edge.tools.bench_estop", "--child", "--load", load, "--bundle", bundle,
         "--profile", str(profile), "--json", str(summary)],
        stdin=kbd_slave, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    os.close(kbd_slave)
    lat_ms, keys, send_ms = [], [], []
    # This thread timestamps and writes the key: not preempted in between. Only now, after the child is
    # started: a process inherits its parent thread's policy, and a real-time child would starve the rest.
    prefer_this_thread()
    try:
        wait_until(base.driving, 120.0, "the child's base to drive", child)
        rng = random.Random(0)
        for _ in range(trips):
            time.sleep(0.15 + 0.1 * rng.random())  # land anywhere in the stream period and the inference
            wait_until(base.driving, 5.0, "the base to drive", child)
            base.stopped.clear()
            base.watch_from_s = t_key = time.monotonic()
            os.write(kbd_master, b" ")
            send_ms.append(1e3 * (time.monotonic() - t_key))  # this process's own share, an upper bound
            if not base.stopped.wait(TRIP_TIMEOUT_S):
                raise RuntimeError("bench_estop: no zero frame on the base's line after the key")
            base.watch_from_s = None
            lat_ms.append(1e3 * (base.stop_read_s - t_key))
            keys.append(t_key)
            time.sleep(0.1)
            os.write(kbd_master, b"r")
            time.sleep(0.05)
            os.write(kbd_master, b"y")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    except BaseException:
        child.kill()
        print(child.communicate(timeout=60)[1].decode(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(kbd_master)
        base.close()
        try:  # back to normal before the next load's child is started (it would inherit real-time)
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
    inside = json.loads(summary.read_text()).get("estop_latency_ms", {}) if summary.exists() else {}
    trips_file = summary.with_suffix(".trips.json")
    seen = json.loads(trips_file.read_text()) if trips_file.exists() else []
    # key written -> the child's keyboard thread saw it (CPU and GIL wait before the e-stop code runs)
    to_detect_ms = [1e3 * (t_seen - t_key) for t_key, t_seen in zip(keys, seen, strict=False)]
    a = np.asarray(lat_ms)
    return {"load": load, "trips": len(a), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "child_exit": child.returncode,
            "child_summary_ms": inside, "key_to_detection_ms": to_detect_ms, "latencies_ms": lat_ms,
            "send_ms": send_ms}


class _Cruise:
    """A navigation plan that never ends: DRIVE_MPS forward every tick."""

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return 1 << 30

    def pop(self, i: int = 0) -> tuple[float, float]:
        return (DRIVE_MPS, 0.0)


def child(args) -> int:
    """The run under test: the real ``run()``; its base drives, and with ``--load inference`` the real
    engine steps back to back on a thread of its own."""
    engines = []

    class HoldPolicy:  # the loop's own (rare) requests: a hold chunk, no engine work
        def __init__(self, engine):
            self.engine = engine
            engines.append(engine)

        def start_episode(self, instruction, navigation=False):
            self.engine.start_episode(instruction, navigation=navigation)

        def step(self, frames, state):
            return ActionChunk(joints=np.tile(np.asarray(state, np.float64), (5, 1)), timings_ms={"total": 0.0})

    estops = []

    def on_connected(robot, loop, estop):
        estops.append(estop)

        def drive():
            while True:
                if not estop.is_latched and not loop.base_plan:
                    loop.base_plan = _Cruise()
                time.sleep(0.005)

        def infer():
            time.sleep(0.5)
            cams = list(robot.camera_names)
            while robot.base is not None:
                try:
                    fs = robot.read_frames()
                    engines[0].step([fs.images[c] for c in cams], robot.read_state().qpos)
                except Exception:  # the run ended (robot disconnected) or a stale frame: try again
                    time.sleep(0.01)

        threading.Thread(target=drive, daemon=True).start()
        if args.load == "inference":
            threading.Thread(target=infer, daemon=True).start()

    rc = run(RunConfig(bundle=args.bundle, robot=args.profile, keyboard="tty", json_path=args.json),
             policy_wrapper=HoldPolicy, on_connected=on_connected)
    if estops and args.json:  # when the child saw each key (monotonic s), for the breakdown
        trips = [t for t, kind, _ in estops[0].events if kind == "trip"]
        Path(args.json).with_suffix(".trips.json").write_text(json.dumps(trips))
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="the bundle vla-edge runs (needed for the idle and inference loads)")
    p.add_argument("--trips", type=int, default=30)
    p.add_argument("--load", nargs="+", choices=["idle", "inference", "pty"], default=["idle", "inference"],
                   help="pty: no vla-edge, one byte through a bare pty each way between two real-time threads")
    p.add_argument("--nice", type=int, default=0,
                   help="run vla-edge under nice -n N (negative: ahead of other processes; needs root)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N busy-loop processes beside the run, for the whole benchmark (CPU load; README: 6)")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.bundle and set(args.load) - {"pty"}:
        p.error("--bundle is needed for the idle and inference loads")
    if args.child:
        args.load = args.load[0]
        return child(args)
    results = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    if busy:
        time.sleep(10)  # let the load average show them
        print(f"{args.busy} busy processes; load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        _measure_all(args, results)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure_pty(trips: int) -> list[dict]:
    """One byte through a bare pty, master -> slave (a terminal's key) and slave -> master (what a process
    writes on a pty, as the simulated base's line): a real-time writer thread, a real-time reader thread, no
    vla-edge. The kernel delivers pty bytes through its tty flip buffer, a work item of an ordinary-priority
    kworker: what is left when no process of ours is in the way."""
    import termios
    import tty

    out = []
    for way in ("master -> slave", "slave -> master"):
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        src, dst = (master, slave) if way.startswith("master") else (slave, master)
        read_s, got = [], threading.Event()

        def reader(dst=dst, read_s=read_s, got=got) -> None:
            prefer_this_thread()
            while len(read_s) < trips:
                select.select([dst], [], [])
                os.read(dst, 64)
                read_s.append(time.monotonic())
                got.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        prefer_this_thread()
        lat_ms, rng = [], random.Random(0)
        try:
            for _ in range(trips):
                time.sleep(0.05 + 0.05 * rng.random())
                got.clear()
                t = time.monotonic()
                os.write(src, b" ")
                if not got.wait(TRIP_TIMEOUT_S):
                    raise RuntimeError(f"bench_estop: a byte {way} never arrived")
                lat_ms.append(1e3 * (read_s[-1] - t))
            thread.join(TRIP_TIMEOUT_S)
        finally:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_OTHER, os.sched_param(0))
            os.close(master)
            os.close(slave)
        a = np.asarray(lat_ms)
        out.append({"load": f"pty {way}", "trips": len(a), "p50_ms": float(np.percentile(a, 50)),
                    "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "latencies_ms": lat_ms})
    return out


def _measure_all(args, results: list) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        for load in args.load:
            if load == "pty":
                for r in measure_pty(args.trips):
                    results.append(r)
                    print(f"{r['load']}: trips {r['trips']:3d}  p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  "
                          f"max {r['max_ms']:6.2f} ms", flush=True)
                continue
            r = measure(args.bundle, load, args.trips, Path(workdir), args.nice)
            results.append(r)
            inside = r["child_summary_ms"]
            print(f"{load:10s} trips {r['trips']:3d}  key -> zero frame on the base's serial line: "
                  f"p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:6.2f}  max {r['max_ms']:6.2f} ms   "
                  f"(child's own: p50 {inside.get('p50', float('nan')):.2f} max {inside.get('max', float('nan')):.2f} ms, "
                  f"exit {r['child_exit']}; writing the key took at most {max(r['send_ms']):.2f} ms)", flush=True)
            if r["key_to_detection_ms"]:
                d = np.asarray(r["key_to_detection_ms"])
                print(f"{'':10s} of which key -> seen by the child's keyboard thread: p50 {np.percentile(d, 50):6.2f}  "
                      f"p99 {np.percentile(d, 99):6.2f}  max {d.max():6.2f} ms", flush=True)
            r["load_average"] = os.getloadavg()[0]


if __name__ == "__main__":
    sys.exit(main())
