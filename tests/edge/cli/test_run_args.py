"""``vla-edge run`` refuses what it can check before connecting (one line, exit 2, nothing started), and keeps
the terminal quiet (issue 23).

The real CLI in a subprocess, on the simulated robot: an instruction whose prompt does not fit the bundle's KV
cache, an empty one, and a ``--json`` summary file that exists (refused unless ``--force``); a plain run prints
no warning while it runs and sums its safety clamps per joint in one line.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def one_error_line(r) -> str:
    """Exit 2 and nothing but the one error line: nothing was loaded, connected or logged before it."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("vla-edge run: error: "), r.stderr[-3000:]
    assert r.stdout == ""  # no run summary: the robot never ran
    return lines[0].removeprefix("vla-edge run: error: ")


@pytest.mark.parametrize(("bundle", "holds", "what"), [
    ("fused_int8_bundle", None, "its fused decoder's max_len (re-export with a larger --max-len, or shorten it)"),
    ("int8_bundle", 2048, "its model's max_positions (shorten it)"),
], ids=["fused", "plain"])
def test_an_instruction_too_long_for_the_kv_cache_is_refused_before_connecting(request, bundle, holds, what):
    path = request.getfixturevalue(bundle)
    holds = holds or json.loads((path / "manifest.json").read_text())["max_len"]
    text = "pick up the red cube and " * 4200  # 105 000 characters
    r = run_cli("run", "--robot", "sim", "--bundle", str(path), "--instruction", text, "--seconds", "5",
                "--keyboard", "none", timeout=120)
    line = one_error_line(r)
    assert line.startswith(f"--instruction is {len(text)} characters, "), line
    assert f"KV rows and this bundle holds {holds}, {what}; at most " in line, line


def test_an_empty_instruction_is_refused_before_connecting(fused_int8_bundle):
    r = run_cli("run", "--robot", "sim", "--bundle", str(fused_int8_bundle), "--instruction", "  ", "--seconds", "5",
                "--keyboard", "none", timeout=120)
    assert one_error_line(r) == "--instruction is empty"


def test_json_to_an_existing_file_is_refused_unless_force(fused_int8_bundle, tmp_path):
    out = tmp_path / "summary.json"
    out.write_text('{"ticks": 1}\n')  # the first run's summary
    args = ("run", "--robot", "sim", "--bundle", str(fused_int8_bundle), "--max-ticks", "3", "--keyboard", "none",
            "--json", str(out))
    line = one_error_line(run_cli(*args, timeout=120))
    assert line == f"--json {out}: exists (give --force to replace it, or another file)"
    assert out.read_text() == '{"ticks": 1}\n'
    r = run_cli(*args, "--force", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["ticks"] == 3


def test_a_plain_run_is_quiet_and_sums_its_clamps_in_one_line(int8_bundle, tmp_path):
    """No warning line while it runs (clamps are routine: the first of each joint is at debug level), and one
    line at the end of the summary with the clamps per joint, as in the JSON."""
    out = tmp_path / "summary.json"
    r = run_cli("run", "--robot", "sim", "--bundle", str(int8_bundle), "--seconds", "2", "--keyboard", "none",
                "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [x for x in r.stderr.splitlines() if "WARNING" in x or "clamp" in x or "Warning" in x], r.stderr
    s = json.loads(out.read_text())
    by_joint = s["clamps_by_joint"]
    assert s["clamps"] > 0 and sum(by_joint.values()) == s["clamps"]  # the random tiny policy asks for big steps
    [line] = [x for x in r.stdout.splitlines() if x.startswith("safety clamps: ")]
    assert line == f"safety clamps: {s['clamps']} (" + ", ".join(f"{j} {n}" for j, n in by_joint.items()) + ")"
