"""The policy server end to end: a real Ray Serve (a private ``ray.init(num_cpus=2)``, loopback only) running the
real engine on the shipped reach policy's INT8 bundle (the demo's), and the robot's :class:`RemotePolicy` (no ray, no torch) against it.

One Ray and one Serve for the module (started by the fixture, shut down after the last test); the last test
stops Serve under a running ``vla-edge run --policy-server``. Waits are generous for a loaded 2-core box.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SERVE_PATIENCE, stall_tolerant_sim
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine
from vla_edge.edge.remote import RemotePolicy, RemotePolicyError
from vla_edge.edge.wire import CONTENT_TYPE, bundle_id, encode_request

# CI installs the [serve] extra and must run these; elsewhere they skip without Ray.
ray = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray", reason="[serve] extra")
importlib.import_module("vla_edge.edge.serve.app")  # first: it imports Ray Serve with Serve's Pydantic noise filtered
serve = importlib.import_module("ray.serve")

INSTRUCTION = "pick up the red cube"
TIMEOUT_S = 2.0  # per request: a loaded 2-core box with Ray on it answers in ~30 ms, but stalls happen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(bundle: Path, name: str, route_prefix: str, replicas: int = 1) -> None:
    from vla_edge.edge.serve.app import ServeOptions, application

    opts = ServeOptions(bundle=str(bundle), provider="cpu", threads=1, replicas=replicas, cpus_per_replica=0,
                        name=name, route_prefix=route_prefix)
    serve.run(application(opts), name=name, route_prefix=route_prefix)


@pytest.fixture(scope="module")
def policy_bundle(tmp_path_factory) -> Path:
    """The shipped trained reach policy as the demo exports it (INT8): its chunks depend on what it sees."""
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.export.demo import shipped_policy
    from vla_edge.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("served") / "policy-int8"
    export_bundle(load_checkpoint(shipped_policy()), ExportOptions(out=out, precision="int8", parity_samples=1))
    return out


@pytest.fixture(scope="module")
def server(policy_bundle):
    """``http://127.0.0.1:PORT``: one replica of the policy bundle's engine on a private Ray."""
    # patient proxy checks for the test's Ray (conftest.SERVE_PATIENCE: a starved proxy is otherwise killed)
    saved = {k: os.environ.get(k) for k in SERVE_PATIENCE}
    os.environ.update(SERVE_PATIENCE)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(policy_bundle, "vla-edge", "/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def engine(policy_bundle):
    return Engine(Bundle.load(policy_bundle), provider="cpu", threads=1)


def observation(seed: int, layout) -> tuple[list[np.ndarray], np.ndarray]:
    """Random camera frames (480x640 RGB) and a state near the sim's home pose, different per seed."""
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in layout.cameras]
    state = np.array([0.0, 1.57, -1.48, 0.0, 0.0, 0.0, 0.03] * 2) + rng.normal(0, 0.3, 14)
    return frames, state


def local_step(engine, frames, state, navigation=False):
    engine.start_episode(INSTRUCTION, navigation=navigation)
    return engine.step(frames, state)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    try:
        conn.request("POST", "/v1/step", body, {"Content-Type": CONTENT_TYPE, **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        return r.status, data.decode(errors="replace") if r.status != 200 else ""
    finally:
        conn.close()


def replica_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA")]


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Until ``/v1/info`` and a step answer again (Serve restarts a killed replica)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            p = RemotePolicy.connect([url], timeout_s=TIMEOUT_S)
            p.start_episode(INSTRUCTION)
            p.step(*observation(0, p.bundle.layout))
            return
        except RemotePolicyError:
            assert time.monotonic() < deadline, f"{url} did not come back within {timeout_s} s"
            time.sleep(0.5)


# -- the answers ---------------------------------------------------------------------------------------
def test_remote_chunk_equals_in_process_chunk_bit_for_bit(server, engine):
    policy = RemotePolicy.connect([server], timeout_s=TIMEOUT_S, bundle_id=bundle_id(engine.bundle.manifest))
    assert policy.bundle.layout == engine.bundle.layout and policy.bundle.policy == engine.bundle.policy
    for seed, navigation in ((1, False), (2, False), (3, True)):
        frames, state = observation(seed, policy.bundle.layout)
        want = local_step(engine, frames, state, navigation)
        policy.start_episode(INSTRUCTION, navigation=navigation)
        got = policy.step(frames, state)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        assert got.base == want.base
        if want.joints is None:
            assert got.joints is None
        else:
            np.testing.assert_array_equal(got.joints, want.joints)  # bit-equal, not close
        assert got.decode_calls == want.decode_calls
        assert {"compose", "vision", "prefill", "decode", "server", "network", "total"} <= set(got.timings_ms)
        assert got.timings_ms["total"] >= got.timings_ms["server"] + got.timings_ms["network"] - 1e-6
    assert policy.failures == []


def test_the_servers_pixels_are_the_kernels_pixels(engine):
    """What the server feeds the vision graph from the robot's uint8 image equals the in-process composition."""
    from vla_edge.edge.remote import RemoteBundle
    from vla_edge.edge.serve.handler import normalise

    policy = RemotePolicy([], RemoteBundle.from_manifest("-", engine.bundle.manifest), TIMEOUT_S)
    frames, _ = observation(4, engine.bundle.layout)
    want = engine.prepare_pixels(frames).copy()
    got = normalise(policy.compose(frames))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def test_four_robots_at_once_each_get_their_own_answers(server, engine):
    robots, steps = 4, 3
    obs = {(r, k): observation(100 * r + k, engine.bundle.layout) for r in range(robots) for k in range(steps)}
    want = {key: local_step(engine, *o).token_ids for key, o in obs.items()}
    got, errors = {}, []

    def robot(r: int) -> None:
        try:
            p = RemotePolicy.connect([server], timeout_s=10.0)  # four at once queue on one replica
            p.start_episode(INSTRUCTION)
            for k in range(steps):
                got[(r, k)] = p.step(*obs[(r, k)]).token_ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=robot, args=(r,)) for r in range(robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"robot {key[0]} step {key[1]}")
    assert len({tuple(v) for v in want.values()}) > 1, "the observations should not all give the same chunk"


def test_robots_waiting_together_run_as_one_batch_and_get_their_own_answers(server, fused_fp32_bundle):
    """An fp32 bundle (rows independent) served with batches of up to 4: ``@serve.batch`` hands the replica the
    requests that wait together, and each robot's reply equals its in-process step alone."""
    from vla_edge.edge.serve.app import ServeOptions, application
    from vla_edge.edge.serve.handler import normalise
    from vla_edge.edge.wire import decode_reply

    opts = ServeOptions(bundle=str(fused_fp32_bundle), provider="cpu", threads=1, cpus_per_replica=0, name="batched",
                        route_prefix="/batched", max_batch=4, batch_wait_s=0.3)
    serve.run(application(opts), name="batched", route_prefix="/batched")
    try:
        local = Engine(Bundle.load(fused_fp32_bundle), provider="cpu", threads=1)
        bid, s = bundle_id(local.bundle.manifest), local.bundle.layout.output
        rng = np.random.default_rng(11)
        images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(4)]
        states = [rng.normal(0, 0.3, 14) for _ in range(4)]
        instructions = ["pick up the red cube", "reach", "open the top drawer slowly", "go"]
        want = []
        for img, st, instr in zip(images, states, instructions, strict=True):
            local.start_episode(instr)
            want.append(local.step(None, st, pixels=normalise(img)).token_ids)
        replies, errors = {}, []
        start = threading.Barrier(4)

        def robot(r: int) -> None:
            try:
                for k in range(2):
                    start.wait(60)
                    body = encode_request(k, bid, instructions[r], False, images[r], states[r])
                    conn = http.client.HTTPConnection(server.split("//")[1], timeout=60)
                    conn.request("POST", "/batched/v1/step", body, {"Content-Type": CONTENT_TYPE})
                    resp = conn.getresponse()
                    assert resp.status == 200, resp.read()[:300]
                    replies[(r, k)] = decode_reply(resp.read())
                    conn.close()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=robot, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        for (r, k), reply in replies.items():
            np.testing.assert_array_equal(reply.token_ids, want[r], err_msg=f"robot {r} step {k}")
        sizes = [reply.server["batch"] for reply in replies.values()]
        assert len(replies) == 8 and max(sizes) > 1, sizes
    finally:
        serve.delete("batched")


def test_the_robot_side_steps_with_neither_ray_nor_torch_nor_onnxruntime_importable(server):
    """As on a robot with only the runtime installed: ray, torch and ONNX Runtime unimportable, a remote step works."""
    code = (
        "import sys\n"
        "for m in ('ray', 'torch', 'onnxruntime'): sys.modules[m] = None\n"
        "import numpy as np\n"
        "from vla_edge.edge.remote import RemotePolicy\n"
        f"p = RemotePolicy.connect([{server!r}], timeout_s=10.0)\n"
        "p.start_episode('pick up the red cube')\n"
        "frames = [np.zeros((480, 640, 3), np.uint8)] * len(p.bundle.layout.cameras)\n"
        "c = p.step(frames, np.zeros(14))\n"
        "assert c.joints.shape == (5, 14) and np.isfinite(c.joints).all()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- refusals --------------------------------------------------------------------------------------------
def test_malformed_and_oversized_requests_get_one_line_and_the_replica_lives(server, engine):
    replicas = replica_names()
    frames, state = observation(5, engine.bundle.layout)
    policy = RemotePolicy.connect([server], timeout_s=TIMEOUT_S)
    image = policy.compose(frames)
    good = encode_request(1, policy.bundle.id, INSTRUCTION, False, image, state)
    limit = 12 + 64 * 1024 + image.size + 8 * 14
    cases = {
        "garbage": (b"GET me a policy, please", 400, "not a vla-edge message"),
        "truncated": (good[:-5], 400, "runs past the end"),
        "other bundle": (encode_request(1, "0" * 64, INSTRUCTION, False, image, state), 409, "request is for bundle"),
        "small image": (encode_request(1, policy.bundle.id, INSTRUCTION, False, image[:100], state), 400, "shape"),
        "NaN state": (encode_request(1, policy.bundle.id, INSTRUCTION, False, image, state * np.nan), 400, "NaN"),
        "oversized": (good + b"\0" * limit, 413, "over this bundle's limit"),
    }
    for what, (body, status, text) in cases.items():
        got_status, got_text = post(server, body)
        assert got_status == status, (what, got_status, got_text)
        assert text in got_text and got_text.startswith("error: ") and "\n" not in got_text.strip(), (what, got_text)
    policy.start_episode(INSTRUCTION)
    np.testing.assert_array_equal(policy.step(frames, state).token_ids, local_step(engine, frames, state).token_ids)
    assert replica_names() == replicas, "a bad request must not cost a replica"


def test_another_bundle_is_refused_at_connect_with_one_line(server):
    with pytest.raises(RemotePolicyError, match=r"serves bundle \w{12}, not this robot's --bundle") as e:
        RemotePolicy.connect([server], bundle_id="f" * 64)
    assert "\n" not in str(e.value)
    with pytest.raises(RemotePolicyError, match="no policy server answered: .*connection refused"):
        RemotePolicy.connect([f"http://127.0.0.1:{_free_port()}"], timeout_s=0.5)


# -- failures --------------------------------------------------------------------------------------------
def test_a_killed_replica_is_a_timeout_within_the_budget_not_a_hang(server, engine):
    """Serve keeps routing to a dead replica for a while: without the client's timeout the step would hang."""
    timeout_s = 0.5
    policy = RemotePolicy.connect([server], timeout_s=TIMEOUT_S)
    policy.start_episode(INSTRUCTION)
    frames, state = observation(6, engine.bundle.layout)
    policy.step(frames, state)  # a healthy replica, with the patient timeout of a loaded box
    policy.timeout_s = timeout_s
    (name,) = replica_names()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    t0 = time.monotonic()
    try:
        policy.step(frames, state)  # the retry may reach the restarted replica
    except RemotePolicyError as e:
        assert "timed out" in str(e) and "\n" not in str(e), e
    elapsed = time.monotonic() - t0
    assert policy.failures and "timed out" in policy.failures[0], policy.failures
    assert elapsed < 2 * timeout_s + 2.0, f"two tries of {timeout_s} s took {elapsed:.2f} s"
    wait_ready(server)


def test_with_two_replicas_a_killed_one_costs_the_robot_nothing(server, engine, policy_bundle):
    _deploy(policy_bundle, "two", "/two", replicas=2)
    try:
        url = f"{server}/two"
        policy = RemotePolicy.connect([url], timeout_s=TIMEOUT_S)
        policy.start_episode(INSTRUCTION)
        frames, state = observation(7, engine.bundle.layout)
        want = local_step(engine, frames, state).token_ids
        for _ in range(6):
            policy.step(frames, state)
        names = [n for n in replica_names() if n.startswith("SERVE_REPLICA::two#")]
        assert len(names) == 2
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        for _ in range(10):
            chunk = policy.step(frames, state)  # no RemotePolicyError
            np.testing.assert_array_equal(chunk.token_ids, want)
        assert policy.failures == [], policy.failures
    finally:
        serve.delete("two")


# -- vla-edge run --policy-server ------------------------------------------------------------------------
def run_args(tmp_path: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vla_edge.edge.cli", "run", "--robot", str(stall_tolerant_sim(tmp_path)),
            "--policy-server", url, "--policy-timeout", str(TIMEOUT_S), "--keyboard", "none", *extra]


def test_run_with_a_policy_server_drives_the_sim_robot_in_async_mode(server, tmp_path, policy_bundle):
    out = tmp_path / "run.json"
    r = subprocess.run(run_args(tmp_path, server, "--bundle", str(policy_bundle), "--mode", "async", "--seconds", "3",
                                "--json", str(out)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["inferences"] >= 2, summary
    stages = summary.get("stage_ms", {})
    assert "network" in stages and "server" in stages, stages


def test_run_refuses_a_server_of_another_bundle_at_connect(server, tmp_path, int8_bundle):
    r = subprocess.run(run_args(tmp_path, server, "--bundle", str(int8_bundle), "--seconds", "1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vla-edge run: error: policy server") and "not this robot's --bundle" in last, last


def test_the_e_stop_does_not_wait_for_a_hung_request(server, tmp_path, policy_bundle):
    """A request hangs on a killed replica (up to the 4 s timeout); the e-stop latches and makes the robot safe
    (base zero, arms hold) at once, from the thread that tripped it, while the request is still in flight."""
    from vla_edge.edge.session import RunConfig, run

    seen: dict = {}

    def script(robot, loop, estop) -> None:
        def go() -> None:
            try:
                deadline = time.monotonic() + 60
                while loop.stats.summary()["inferences"] < 1:  # a remote step has landed
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                (name,) = replica_names()
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                while not (loop.worker.busy and loop.worker.running_for_s > 0.3):  # a request in flight, hanging
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                t0 = time.monotonic()
                estop.trigger("test: e-stop during a hung request")
                seen["trip_s"] = time.monotonic() - t0
                seen["estopped"] = robot.estopped
                seen["request_in_flight"] = loop.worker.busy
            finally:
                loop.stop_requested.set()

        threading.Thread(target=go, daemon=True).start()

    cfg = RunConfig(bundle=str(policy_bundle), robot=str(stall_tolerant_sim(tmp_path)), keyboard="none", seconds=60,
                    policy_server=server, policy_timeout_s=4.0)
    try:
        run(cfg, on_connected=script)
    finally:
        wait_ready(server)
    assert seen.get("estopped") and seen["request_in_flight"], seen
    assert seen["trip_s"] < 0.5, f"the e-stop took {seen['trip_s']:.3f} s (the request hangs for 4 s)"


def test_server_stopped_mid_run_is_a_safe_stop_with_one_line(server, tmp_path):
    """Last in the module: it shuts Serve down under a running robot."""
    p = subprocess.Popen(run_args(tmp_path, server, "--seconds", "60"), stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("vla-edge run: robot=" in ln for ln in lines):
            assert p.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)  # a few remote steps
        serve.shutdown()
        t0 = time.monotonic()
        rc = p.wait(60)
        ended_s = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(10)
    text = "".join(lines)
    assert rc == 3, text[-2000:]
    stops = [ln for ln in lines if ln.startswith("vla-edge run: stopped safely:")]
    assert len(stops) == 1 and "policy server" in stops[0], text[-2000:]
    assert "Traceback" not in text
    assert ended_s < 2 * TIMEOUT_S + 15, ended_s  # two tries, then the loop's stop and the summary
