"""Shared fixtures: a tiny checkpoint and its bundles, built once per test session from fixed seeds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``vla-edge ARGS`` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "vla_edge.edge.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def wait_until(cond, timeout_s: float = 3.0, every_s: float = 0.005) -> bool:
    """Poll ``cond()`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from vla_edge.export.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


def _export(ckpt: Path, out: Path, precision: str, decoder: str = "plain") -> Path:
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.export.pipeline import ExportOptions, export_bundle

    export_bundle(load_checkpoint(ckpt), ExportOptions(out=out, precision=precision, decoder=decoder))
    return out


@pytest.fixture(scope="session")
def fp32_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("bundles") / "fp32", "fp32")


@pytest.fixture(scope="session")
def int8_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("bundles") / "int8", "int8")


@pytest.fixture(scope="session")
def fused_fp32_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("bundles") / "fused-fp32", "fp32", decoder="fused")


@pytest.fixture(scope="session")
def fused_int8_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("bundles") / "fused-int8", "int8", decoder="fused")


def stall_tolerant_sim(tmp_path: Path) -> Path:
    """The sim profile with 2 s device watchdogs: a loaded 2-core machine stalls the whole process for
    ~0.4 s at times, which the sim's 0.3 s limits rightly call a fault; tests of other things use this."""
    from vla_edge.edge.profile import PROFILE_DIR

    text = (PROFILE_DIR / "sim.toml").read_text()
    for key in ("feedback_timeout_s = 0.3", "stale_after_s = 0.3"):
        assert key in text, key
        text = text.replace(key, key.replace("0.3", "2.0"))
    path = tmp_path / "sim_stall_tolerant.toml"
    path.write_text(text)
    return path


SERVE_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                  "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2"}
"""Environment for a Ray Serve a test starts: beside busy loops on 2 cores Serve's HTTP proxy misses the default
5 s ready check and 10 s health check and Serve kills it; Ray's processes inherit these."""
