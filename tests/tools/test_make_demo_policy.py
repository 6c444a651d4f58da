"""``python -m vla_edge.tools.make_demo_policy``: the shipped policy's recipe, end to end at a toy size.

Every step runs for real (record on the simulated robot, convert, train-tiny on data.json with ``--with-stats``,
export with no ``--stats``, demo_rate), and ``--install`` refuses to replace the shipped file below its bar.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import h5py
import pytest
from conftest import stall_tolerant_sim

pytest.importorskip("torch")


def test_the_recipe_runs_end_to_end_and_install_keeps_the_shipped_file_below_the_bar(tmp_path):
    from vla_edge.export.demo import SHIPPED_POLICY

    before = hashlib.sha256(SHIPPED_POLICY.read_bytes()).hexdigest()
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "vla_edge.tools.make_demo_policy", "--work", str(work), "--robot",
                        str(stall_tolerant_sim(tmp_path)), "--episodes", "2", "--ready-episodes", "1",
                        "--episode-seconds", "1", "--steps", "3", "--batch", "2", "--runs", "1", "--install", "--min-successes", "2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # 1 run cannot give the 2 successes --install needs
    assert "make_demo_policy: not installed:" in r.stdout and "--install needs 2" in r.stdout, r.stdout[-2000:]
    assert hashlib.sha256(SHIPPED_POLICY.read_bytes()).hexdigest() == before
    starts = {}
    for path in (work / "episodes").glob("episode_*.hdf5"):
        with h5py.File(path, "r") as f:
            starts[int(f.attrs["seed"])] = float(f.attrs["start_spread_rad"])
    assert starts == {0: 0.3, 1: 0.3, 2: 0.0}  # two randomised starts, then one at the ready pose (seeds go on)
    import torch

    meta = json.loads(torch.load(work / "best.pt", weights_only=True)["training"])
    assert meta["init_sha256"] == before  # fine-tuned from the shipped policy, recorded by hash
    samples = json.loads((work / "data" / "data.json").read_text())
    assert samples and all(len(s["target_xy_m"]) == 2 for s in samples)  # the probe's targets, from the sim
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    assert manifest["policy"]["actions"] == "bounds" and manifest["policy"]["state_pad"] == [0.0]  # self-contained
    assert "demo_rate: " in r.stdout and " of 1 succeeded" in r.stdout
