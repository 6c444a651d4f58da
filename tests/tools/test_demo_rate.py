"""``python -m vla_edge.tools.demo_rate``: the demo's success rate, measured by running the demo itself.

Only the format and the exit code are checked here: whether a run succeeds depends on the machine's load (the
demo is a real-time control loop); the rate on an idle machine is in the README ("A policy that does something").
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from vla_edge.tools.demo_rate import draw_seeds, parse_verdict, summary

pytest.importorskip("torch")


def test_two_runs_of_the_shipped_demo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vla_edge.tools.demo_rate", "--runs", "2", "--seed-seed", "3",
                        "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = draw_seeds(2, 3)
    assert f"seeds (--seed-seed 3): {seeds[0]} {seeds[1]}" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\s*\d+/2 seed \d+: ", ln)]
    assert [int(re.search(r"seed (\d+)", ln).group(1)) for ln in lines] == seeds, r.stdout
    for ln in lines:  # a verdict read from the demo's own line, whichever it was
        assert re.search(r": (success after [0-9.]+ s|MISS, no success in time), (left|right) arm, ended "
                         r"[0-9.]+ cm from the target \[[0-9.]+ s\]$", ln), (ln, r.stderr[-3000:])
    assert re.search(r"demo_rate: [0-2] of 2 succeeded \(95 % Wilson interval \d+-\d+ %\)", r.stdout), r.stdout


def test_the_seeds_are_the_demos_and_the_verdict_line_is_read_wrapped():
    seeds = draw_seeds(40, 0)
    assert seeds == draw_seeds(40, 0) and len(set(seeds)) == 40 and all(0 <= s < 1_000_000 for s in seeds)
    out = ("run: 40 ticks in 1.3 s\ndemo: target at (+0.37, 0.42) m for the right arm (seed 1001): success after\n"
           "1.12 s (eval's test: fingertip within 4 cm, held 5 ticks); it ended 1.5 cm from the target\n")
    run = parse_verdict(1001, out, 0, 5.0)
    assert run.success and run.time_to_success_s == 1.12 and run.final_cm == 1.5 and run.side == "right"
    miss = parse_verdict(7, out.replace("seed 1001", "seed 7").replace("success after\n1.12 s", "no success within "
                                                                                                "10 s"), 0, 12.0)
    assert not miss.success and miss.final_cm == 1.5 and "MISS, no success in time" in miss.line()
    broken = parse_verdict(8, "", 3, 2.0, "vla-edge run: stopped safely: arm silent\n")
    assert not broken.success and "exit 3: vla-edge run: stopped safely: arm silent" in broken.line()
    cut = parse_verdict(7, miss_out := out.replace("seed 1001", "seed 7").replace("success after\n1.12 s",
                        "no success within 10 s"), 3, 3.0, "x\nvla-edge run: stopped safely: camera stale\n")
    assert "(vla-edge run: stopped safely: camera stale; exit 3)" in cut.line() and miss_out
    assert summary([run, miss, broken]).startswith("1 of 3 succeeded (95 % Wilson interval 6-79 %)")
    assert summary([run, miss, broken]).endswith("missed seeds: 7 8 (1 of them stopped early or without a verdict)")


def test_a_changed_shipped_policy_is_exported_again(tmp_path, monkeypatch):
    """The demo's cached bundle follows the shipped file's content, not only its name: a new tiny_policy.pt (a
    retrained policy, as demo_rate measures it) is exported again instead of running the old bundle."""
    import hashlib
    import json
    import shutil

    import vla_edge.export.demo as demo
    from vla_edge.export.tiny import write_tiny_checkpoint

    policy = tmp_path / "data" / "tiny_policy.pt"
    policy.parent.mkdir()
    shutil.copyfile(demo.SHIPPED_POLICY, policy)
    monkeypatch.setattr(demo, "SHIPPED_POLICY", policy)
    work = tmp_path / "demo"

    def source() -> dict:
        return json.loads((demo.ensure_demo_bundle(str(work)) / "manifest.json").read_text())["source"]

    assert source() == {"name": "tiny_policy.pt", "sha256": hashlib.sha256(policy.read_bytes()).hexdigest()}
    before = (work / "bundle" / "manifest.json").stat().st_mtime_ns
    assert source()["name"] == "tiny_policy.pt" and (work / "bundle" / "manifest.json").stat().st_mtime_ns == before
    write_tiny_checkpoint(policy, seed=1)  # another policy under the same name
    assert source()["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
