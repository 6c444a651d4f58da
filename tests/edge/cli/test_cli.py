"""Every mistake a user can type: one line on stderr, exit 2, nothing destroyed, before any slow work.

Table-driven: each row is a command line (with ``{tmp}`` standing for a scratch directory holding a
real checkpoint ``tiny.pt``, a user's ``mydata/`` directory, a text ``.pt`` and a random-bytes ``.pt``)
and a phrase the one error line must contain. Run as a user would, in a subprocess.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from conftest import run_cli

CASES = [
    # export --force never deletes what is not a bundle
    ("export --ckpt tiny.pt --out . --force", "current directory"),
    ("export --ckpt tiny.pt --out mydata --force", "not a vla-edge bundle"),
    ("export --ckpt tiny.pt --out tiny.pt --force", "not a directory"),
    ("export --ckpt {tmp}/tiny.pt --out {tmp} --force", "current directory"),
    ("export --ckpt ckdir/best.pt --out ckdir --force", "the checkpoint being exported"),
    ("export --ckpt tiny.pt --out mydata", "already exists"),
    ("export --ckpt text.pt --out new", "not a PyTorch checkpoint"),
    ("export --ckpt random.pt --out new", "not a PyTorch checkpoint"),
    ("export --ckpt nope.pt --out new", "not found"),
    ("export --out new", "exactly one of --ckpt"),
    ("export --shape llava-ov-0.5b --out new --max-len 0", "--max-len"),
    ("export --ckpt tiny.pt --out new --stats nostats.yaml", "--stats nostats.yaml: no such file"),
    ("export --ckpt tiny.pt --out new --tokenizer notok", "--tokenizer notok: no such file or directory"),
    ("export --shape llava-ov-0.5b --out new --layout calvin", "--layout goes with --ckpt, not --shape"),
    # paths we write
    ("run --json /nonexistent/s.json", "/nonexistent does not exist"),
    ("run --json mydata", "is a directory"),
    ("run --record /proc/nope", "cannot write in /proc"),
    ("run --record tiny.pt", "not a directory"),
    ("tiny-ckpt --out /nonexistent_dir/t.pt", "/nonexistent_dir does not exist"),
    ("bench --bundle mydata --json /nonexistent/b.json", "/nonexistent does not exist"),
    ("eval --json /nonexistent/e.json", "/nonexistent does not exist"),
    ("train-tiny --data nodata --out best.pt", "--data nodata: no such directory"),
    # ranges
    ("run --rate 0", "--rate: 0 must be > 0"),
    ("run --rate -5", "--rate: -5 must be > 0"),
    ("run --rate nan", "--rate: nan must be > 0"),
    ("run --seconds -1", "--seconds: -1 must be >= 0"),
    ("run --max-ticks -1", "--max-ticks: -1 must be >= 0"),
    ("bench --steps 0", "--steps: 0 must be >= 1"),
    ("bench --kernels --warmup -1", "--warmup: -1 must be >= 0"),
    ("eval --episodes 0", "--episodes: 0 must be >= 1"),
    ("eval --max-seconds 0", "--max-seconds: 0 must be > 0"),
    ("demo --seconds 0", "--seconds: 0 must be > 0"),
    ("check --seconds -1", "--seconds: -1 must be >= 0"),
    ("train-tiny --data mydata --out best.pt --steps 0", "--steps: 0 must be >= 1"),
    ("run --rate fast", "'fast' is not a number"),
    # flags that need each other
    ("bench --bundle mydata --baseline torch", "needs --ckpt"),
    ("bench", "give --bundle DIR, --shape NAME or --kernels"),
    ("bench --bundle mydata --plot latency.txt", "--plot latency.txt: give a file name ending in .png"),
    ("bench --kernels --plot latency.png", "--plot goes with --bundle or --shape, not --kernels"),
    ("run --view --view-save run.rrd", "give --view (a Rerun viewer) or --view-save FILE, not both"),
    ("demo --view --view-save demo.rrd", "give --view (a Rerun viewer) or --view-save FILE, not both"),
    ("record --instruction x --out eps --view --view-save r.rrd", "--view-save FILE, not both"),
    ("run --bundle nobundle", "--bundle nobundle: no such directory"),
    # --debug after the subcommand is accepted (the error is still one line: a usage mistake)
    ("run --debug --rate 0", "--rate: 0 must be > 0"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_ckpt) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.pt").write_bytes(tiny_ckpt.read_bytes())  # the checkpoint a user exports
    (d / "mydata").mkdir()
    (d / "mydata" / "notes.txt").write_text("a user's file\n")
    (d / "text.pt").write_text("this is a text file, not a checkpoint\n" * 3)
    (d / "random.pt").write_bytes(random.Random(0).randbytes(4096))  # starts 0xcd: no zip, no pickle
    (d / "ckdir").mkdir()
    (d / "ckdir" / "best.pt").write_bytes(tiny_ckpt.read_bytes())
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("command", "phrase"), CASES, ids=[c for c, _ in CASES])
def test_mistake_is_one_line_exit_2_and_destroys_nothing(scratch, monkeypatch, command, phrase):
    before = _snapshot(scratch)
    monkeypatch.chdir(scratch)
    args = [a.replace("{tmp}", str(scratch)) for a in command.split()]
    t0 = time.monotonic()
    r = run_cli(*args, timeout=120)
    elapsed_s = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (command, r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, (command, r.stderr)
    assert lines[0].startswith(f"vla-edge {args[0]}: error: "), lines[0]
    assert phrase in lines[0], (command, lines[0])
    assert len(lines[0]) <= 200, lines[0]
    assert _snapshot(scratch) == before, command  # nothing deleted, nothing written
    assert not Path("/nonexistent_dir").exists()
    assert elapsed_s < 60, (command, elapsed_s)  # refused before any export, benchmark or run (generous)


def test_debug_after_the_subcommand_shows_the_traceback(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    r = run_cli("export", "--debug", "--ckpt", "tiny.pt", "--out", "mydata", "--force")
    assert r.returncode != 0 and "Traceback" in r.stderr and "not a vla-edge bundle" in r.stderr
    assert (scratch / "mydata" / "notes.txt").exists()


def test_text_and_random_checkpoints_get_a_short_correct_message(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    for name in ("text.pt", "random.pt"):
        r = run_cli("export", "--ckpt", name, "--out", "new")
        line = r.stderr.strip()
        assert r.returncode == 2 and "non-tensor" not in line and line.endswith("neither)"), line


def test_bench_parallel_labels_the_decoder_call_row(fused_fp32_bundle, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--bundle", str(fused_fp32_bundle), "--steps", "1", "--warmup", "0", "--parallel",
                "--provider", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "per token (decode)" in r.stdout and "per decoder call" in r.stdout
    report = json.loads(out.read_text())
    calls = report["decoder_calls_per_step"]
    assert 1 <= calls <= report["tokens_per_step"] - 1  # Jacobi: at most one call per token
    per_token, per_call = report["per_token_ms"]["p50"], report["per_decoder_call_ms"]["p50"]
    assert per_call == pytest.approx(per_token * (report["tokens_per_step"] - 1) / calls, rel=1e-6)


def test_export_prints_results_to_stdout_and_each_step_once_to_stderr(tiny_ckpt, tmp_path):
    out = tmp_path / "bundle"
    r = run_cli("export", "--ckpt", str(tiny_ckpt), "--out", str(out), "--precision", "int8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote bundle {out} in " in r.stdout and "bundle bundle" not in r.stdout
    assert "fp32 vision" not in r.stdout and "parity vs PyTorch fp32" in r.stdout  # only the bundle's files
    for step in ("build PyTorch model", "quantize (dynamic-qint8)", "parity on 2 fixed inputs"):
        assert r.stderr.count(step) == 1, (step, r.stderr)
    assert "pre-processing" not in r.stderr  # ONNX Runtime's quantiser warning: shown with --debug only
    assert out.stat().st_mode & 0o777 == 0o755


def test_help_texts():
    r = run_cli("eval", "--help")
    assert "95 % Wilson" in " ".join(r.stdout.split()) and "%%" not in r.stdout
    r = run_cli("check", "--help")
    assert "one row per device" in " ".join(r.stdout.split())
