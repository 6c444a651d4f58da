"""``vla-edge serve`` as a user runs it (its own local Ray in a subprocess), and the argument checks of ``serve``
and ``run --policy-server`` (one line, exit 2, before anything starts)."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from conftest import SERVE_PATIENCE, run_cli
from vla_edge.edge.remote import RemotePolicy

if not os.environ.get("CI"):  # CI installs the [serve] extra and must run these
    pytest.importorskip("ray", reason="[serve] extra")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    ("serve --min-replicas 3 --max-replicas 2", "--min-replicas 3 is more than --max-replicas 2"),
    ("serve --replicas 2 --max-replicas 4", "give --replicas N or autoscaling bounds"),
    ("serve --address auto --num-cpus 2", "--num-cpus sizes a local Ray"),
    ("serve --bundle /nonexistent", "--bundle /nonexistent: no such directory"),
    ("serve --route-prefix vla", "must start with /"),
    ("run --policy-server ftp://host:1", "expected http://HOST[:PORT][/PREFIX]"),
    ("run --policy-server http://a:1,http://b:2,http://c:3", "give one URL or two"),
    ("run --policy-server http://a:1 --policy-timeout 5", "--policy-timeout 5: at most 4 s"),
    ("demo --policy-server http://a:notaport", "bad port"),
])
def test_argument_mistakes_are_one_line_exit_2(args, message):
    r = run_cli(*args.split(), timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_write_config_is_a_serve_config_for_the_builder(int8_bundle, tmp_path):
    out = tmp_path / "serve.yaml"
    r = run_cli("serve", "--bundle", str(int8_bundle), "--write-config", str(out), "--host", "0.0.0.0",
                "--min-replicas", "1", "--max-replicas", "4", "--gpus-per-replica", "0.5", timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(out.read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "vla_edge.edge.serve.app:build_app"
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert app["args"]["bundle"] == str(int8_bundle.resolve())
    assert (app["args"]["min_replicas"], app["args"]["max_replicas"], app["args"]["gpus_per_replica"]) == (1, 4, 0.5)
    # the builder takes exactly these args (what `serve deploy` will call), without deploying anything
    ServeOptions = importlib.import_module("vla_edge.edge.serve.app").ServeOptions  # noqa: N806
    opts = ServeOptions.from_dict(app["args"]).deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 4 and opts["ray_actor_options"]["num_gpus"] == 0.5


def test_serve_prints_where_it_listens_serves_and_stops_cleanly_on_ctrl_c(int8_bundle):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "serve", "--bundle", str(int8_bundle),
                          "--port", str(port), "--num-cpus", "2", "--cpus-per-replica", "0", "--provider", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **SERVE_PATIENCE})
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("--policy-server" in ln for ln in out):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:] if p.poll() else out
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        assert any(url in ln for ln in out) and any(str(int8_bundle) in ln for ln in out), out
        policy = RemotePolicy.connect([url], timeout_s=10.0)
        policy.start_episode("pick up the red cube")
        frames = [np.zeros((480, 640, 3), np.uint8)] * len(policy.bundle.layout.cameras)
        assert policy.step(frames, np.zeros(14)).joints.shape == (5, 14)
        policy.close()
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    reader.join(10)
    assert rc == 0, p.stderr.read()[-2000:]
    with socket.socket() as s:  # the proxy is gone: nothing listens on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bench_fleet_prints_the_batched_and_served_tables(fused_fp32_bundle, tmp_path):
    """``vla-edge bench --fleet`` on a bundle that batches: one run gives the in-process step, batches of 1, 2, 4
    and 8, the server's overhead and the fleet of 1, 2, 4 and 8 robots, with no errors (numbers: README)."""
    out = tmp_path / "fleet.json"
    r = subprocess.run([sys.executable, "-m", "vla_edge.edge.cli", "bench", "--bundle", str(fused_fp32_bundle),
                        "--fleet", "--provider", "cpu", "--steps", "2", "--warmup", "1", "--fleet-seconds", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **SERVE_PATIENCE})
    assert r.returncode == 0, r.stderr[-3000:]
    res = yaml.safe_load(out.read_text())  # JSON is YAML
    assert [b["robots"] for b in res["batched"]] == [1, 2, 4, 8] and res["batching_off"] is None
    assert all(b["steps_per_s"] > 0 and b["p50"] > 0 for b in res["batched"])
    assert [f["robots"] for f in res["fleet"]] == [1, 2, 4, 8] and not any(f["errors"] for f in res["fleet"])
    assert all(1 <= f["mean_batch"] <= f["robots"] for f in res["fleet"])
    for line in ("in-process batch of 8", "remote step", "fleet of 8 robots"):
        assert line in r.stdout, r.stdout
