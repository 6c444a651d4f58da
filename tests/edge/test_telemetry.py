"""Run statistics: jitter, overruns, percentiles, status line, summary table and JSON."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console
from vla_edge.edge.telemetry import Ring, RunStats, percentiles

PERIOD = 1 / 30


def test_percentiles_helper():
    p = percentiles(np.arange(101))
    assert p == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([1.0, float("nan"), 3.0], qs=(50,)) == {"p50": 2.0}
    assert all(math.isnan(v) for v in percentiles([]).values())
    assert list(percentiles([1, 2], qs=(99.9,))) == ["p99.9"]


def test_ring_keeps_only_the_newest_samples():
    r = Ring(4)
    for v in range(10):
        r.add(v)
    assert r.count == 10
    assert list(r.values()) == [6, 7, 8, 9]
    assert list(r.values(last=2)) == [8, 9]


def simulated_run(stats: RunStats, n: int = 300) -> None:
    """A 30 Hz loop whose every 10th tick starts 5 ms late and every 50th overruns by 10 ms."""
    for i in range(n):
        deadline = i * PERIOD
        start = deadline + (0.005 if i % 10 == 0 else 0.0005)
        end = start + (PERIOD + 0.010 if i % 50 == 0 else 0.010)
        stats.tick(start, deadline, end)
        stats.frames([0.020, 0.030, 0.025 + (0.1 if i % 50 == 7 else 0.0)], skew_s=0.004)
        stats.clamps(i % 2, ["L_j3_step"] if i % 2 else [])
        if i % 100 == 0:
            stats.clamps(2, ["R_gripper_limit", "base_vx_accel"])
        if i % 5 == 0:
            stats.inference(100.0 + (i % 100), {"vision": 20.0, "decode": 60.0 + i % 7})


def test_jitter_overruns_and_summary_numbers():
    stats = RunStats(PERIOD)
    simulated_run(stats)
    s = stats.summary()
    assert s["ticks"] == 300 and s["overruns"] == 6 and s["overrun_fraction"] == pytest.approx(6 / 306)
    assert s["rate_hz"] == pytest.approx(30.0, rel=0.01)
    assert s["jitter_ms"]["p50"] == pytest.approx(0.5)
    assert s["jitter_ms"]["p99"] == pytest.approx(5.0)
    assert s["frame_age_ms"]["p50"] == pytest.approx(30.0) and s["frame_age_ms"]["p99"] == pytest.approx(125.0)
    assert s["frame_skew_ms"]["p99"] == pytest.approx(4.0)
    assert s["inferences"] == 60 and 100 <= s["inference_ms"]["p50"] <= 199
    assert s["stage_ms"]["vision"]["p99"] == pytest.approx(20.0)
    assert s["clamps"] == 156 and s["clamps_by_joint"] == {"L_j3": 150, "R_gripper": 3, "base_vx": 3}
    assert list(s["clamps_by_joint"]) == ["L_j3", "R_gripper", "base_vx"]  # most clamped first
    assert s["estop_trips"] == 0 and math.isnan(s["estop_latency_ms"]["max"])


def test_the_clamps_are_one_line_at_the_end_of_the_summary_at_any_width():
    from rich.console import Console

    stats = RunStats(PERIOD)
    simulated_run(stats)
    console = Console(width=40, record=True, force_terminal=False)
    stats.print_summary(console)
    lines = console.export_text().splitlines()
    assert lines[-1] == "safety clamps: 156 (L_j3 150, R_gripper 3, base_vx 3)"


def test_status_line_fits_80_columns_and_never_shows_nan():
    stats = RunStats(PERIOD)
    empty = stats.status_line(width=80)
    assert "\n" not in empty and "armed" in empty and "nan" not in empty.lower()
    simulated_run(stats, 100)
    line = stats.status_line(width=80)
    assert "\n" not in line and len(line) <= 80 and "nan" not in line.lower()
    assert "30.0 Hz" in line and "clamps 52" in line and "overruns 2" in line
    stats.estop(True, "space key")
    latched = stats.status_line(width=80)
    assert latched.startswith("e-stop LATCHED") and len(latched) <= 80
    stats.clamps(10**9)  # a long line is cut at the width, never wrapped
    assert len(stats.status_line(width=60)) == 60 and stats.status_line(width=60).endswith("…")


def loop_schedule(stats: RunStats, tick_s, seconds: float) -> int:
    """The control loop's schedule (edge/loop.py): absolute deadlines, late ticks skip missed deadlines.

    ``tick_s(k)`` is how long tick ``k`` runs. Returns the number of deadlines that passed.
    """
    t, k, ticks = 0.0, 0, 0
    while k * PERIOD < seconds:
        deadline = k * PERIOD
        start = max(t, deadline)
        end = start + tick_s(ticks)
        stats.tick(start, deadline, end)
        ticks, t, k = ticks + 1, end, k + 1
        if end >= k * PERIOD:
            k = max(k, int(end / PERIOD) + 1)
    return k


@pytest.mark.parametrize("tick_s", [lambda i: 0.045 if i % 4 == 0 else 0.01,  # ~26 Hz: many skipped deadlines
                                    lambda i: 0.2 if i == 10 else 0.01,        # one long stall
                                    lambda i: 0.01])                           # on time
def test_overruns_count_every_skipped_deadline(tick_s):
    stats = RunStats(PERIOD)
    deadlines = loop_schedule(stats, tick_s, 10.0)
    s = stats.summary()
    assert s["ticks"] + s["overruns"] == deadlines
    assert s["overrun_fraction"] == pytest.approx(s["overruns"] / deadlines)
    assert (s["overruns"] > 0) == (tick_s(0) > 0.01 or tick_s(10) > 0.01)


def test_summary_has_no_nan_cells():
    stats = RunStats(PERIOD)
    stats.tick(0.0, 0.0, 0.01)
    stats.tick(PERIOD, PERIOD, PERIOD + 0.01)
    out = io.StringIO()
    stats.print_summary(Console(file=out, width=120))
    assert "nan" not in out.getvalue().lower(), out.getvalue()


def test_print_summary_and_json(tmp_path):
    stats = RunStats(PERIOD)
    empty_path = tmp_path / "empty.json"
    stats.write_json(empty_path)  # no samples: NaN becomes null, file stays valid JSON
    assert json.loads(empty_path.read_text())["jitter_ms"]["p99"] is None
    simulated_run(stats)
    stats.estop_latency(0.8)
    stats.estop_latency(1.6)
    out = io.StringIO()
    stats.print_summary(Console(file=out, width=120))
    text = out.getvalue()
    for label in ("tick jitter", "frame age", "frame skew", "inference", "vision", "overruns", "e-stop"):
        assert label in text
    path = tmp_path / "run.json"
    stats.write_json(path)
    data = json.loads(path.read_text())
    assert data["overruns"] == 6 and data["estop_trips"] == 2
    assert data["estop_latency_ms"] == {"max": 1.6, "p50": pytest.approx(1.2)}
    assert data["jitter_ms"]["p99"] == pytest.approx(5.0)


def test_memory_stays_bounded():
    stats = RunStats(PERIOD, max_samples=1000)
    for i in range(5000):
        stats.tick(i * PERIOD + (0.001 if i >= 4000 else 0.0), i * PERIOD, i * PERIOD + 0.01)
        stats.inference(float(i), {"decode": float(i)})
    assert stats._jitter_s.values().size == 1000 and stats._stage_ms["decode"].values().size == 1000
    s = stats.summary()
    assert s["ticks"] == 5000 and s["inferences"] == 5000
    assert s["jitter_ms"]["p50"] == pytest.approx(1.0)  # only the newest 1000 samples are kept
    assert s["inference_ms"]["p50"] >= 4000
