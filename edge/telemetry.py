"""Run telemetry and the terminal: a one-line live status, the end-of-run summary, where output goes.

Every command writes its **results** (tables, summaries, the demo's verdict) to stdout through
:func:`out_console`, and its **logs, progress and live status** to stderr through :func:`log_console`,
one shared rich console, so log lines appear above a live region instead of inside it.
:func:`setup_logging` routes log records there and hides third-party warnings unless ``--debug``.

Usage::

    setup_logging(debug=False)
    with rich.live.Live(console=log_console()) as live: ...   # status region; logs print above it
    out_console().print(table)

:class:`RunStats` collects per-tick timing, frame ages and skew, inference latencies, safety clamps
(per joint: one line at the end of the summary, ``clamps_by_joint`` in the JSON) and e-stop latencies. Samples live in ring buffers of bounded size (the last ``max_samples``), so a
long run uses constant memory; counters (ticks, overruns, clamps) cover the whole run.
:func:`percentiles` is shared with the benchmark.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from vla_edge.edge.safety import clamp_joint

MAX_SAMPLES = 100_000
LIVE_WINDOW = 300
"""Samples the live status line looks at (10 s at 30 Hz)."""


@cache
def log_console() -> Console:
    """The one stderr console: logs, progress bars, the live status line."""
    return Console(stderr=True)


@cache
def out_console() -> Console:
    """The stdout console: results a user may pipe or keep."""
    return Console()


class _OursOrErrors(logging.Filter):
    """Keep vla-edge's own records, and other libraries' errors; drop libraries' info and warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("vla_edge") or record.levelno >= logging.ERROR


def setup_logging(debug: bool = False) -> None:
    """Logs to :func:`log_console` (info for vla-edge, errors only for libraries; everything with ``debug``).

    Without ``debug``, Python warnings from libraries (ONNX Runtime's quantiser, python-can and
    piper_sdk deprecations) are hidden too.
    """
    if log_console().is_terminal:  # above the live region and progress bars, wrapped to the width
        handler = RichHandler(console=log_console(), show_path=debug, show_time=debug, markup=False)
    else:  # a pipe or a file: plain lines, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not debug:
        handler.addFilter(_OursOrErrors())
        warnings.filterwarnings("ignore")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)  # libraries: warnings and up reach the filter
    logging.getLogger("vla_edge").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(debug)


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``values``; NaN for each when there are none."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {f"p{q:g}": math.nan for q in qs}
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(a, qs), strict=True)}


class Ring:
    """Last ``size`` float samples in a fixed numpy array."""

    def __init__(self, size: int = MAX_SAMPLES):
        self._buf = np.empty(size, dtype=np.float64)
        self.count = 0  # samples ever added

    def add(self, value: float) -> None:
        self._buf[self.count % self._buf.size] = value
        self.count += 1

    def values(self, last: int | None = None) -> np.ndarray:
        """The kept samples, oldest first (only the newest ``last`` if given)."""
        n = min(self.count, self._buf.size)
        if last is not None:
            n = min(n, last)
        idx = np.arange(self.count - n, self.count) % self._buf.size
        return self._buf[idx]


def _num(value: float, fmt: str) -> str:
    """``value`` formatted, or ``-`` when there is no sample (NaN)."""
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _ms(seconds: np.ndarray) -> np.ndarray:
    return seconds * 1e3


class RunStats:
    """Statistics of one ``vla-edge run``. ``period_s`` is the control period (1/30 s at 30 Hz)."""

    def __init__(self, period_s: float, max_samples: int = MAX_SAMPLES):
        self.period_s = period_s
        self.n_ticks = 0
        self.n_overruns = 0
        self.n_clamps = 0
        self.clamps_by_joint: dict[str, int] = {}
        """Safety clamps per joint (``L_j3``, ``base_vx``: :func:`~vla_edge.edge.safety.clamp_joint`)."""
        self.estop_latched = False
        self.estop_reason = ""
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._tick_start_s = Ring(max_samples)
        self._jitter_s = Ring(max_samples)
        self._frame_age_s = Ring(max_samples)
        self._frame_skew_s = Ring(max_samples)
        self._inference_ms = Ring(max_samples)
        self._stage_ms: dict[str, Ring] = {}
        self._estop_ms: list[float] = []
        self._max_samples = max_samples

    # -- collecting -----------------------------------------------------------------------------------
    def tick(self, t_start: float, t_deadline: float, t_end: float) -> None:
        """One tick: started at ``t_start`` for ``t_deadline``, finished at ``t_end`` (monotonic s).

        Jitter is ``|t_start - t_deadline|``. Overruns count **skipped deadlines**: a tick that ends
        at or after the next deadline makes the loop skip every deadline up to its end (it never runs
        ticks late to catch up), so ``ticks + overruns`` is the number of deadlines that passed.
        """
        self.n_ticks += 1
        if self._t_first is None:
            self._t_first = t_start
        self._t_last = t_start
        self._tick_start_s.add(t_start)
        self._jitter_s.add(abs(t_start - t_deadline))
        if t_end >= t_deadline + self.period_s:
            self.n_overruns += int((t_end - t_deadline) / self.period_s + 1e-9)

    def frames(self, ages_s, skew_s: float) -> None:
        """Frames used this tick: their ages (s, one per camera; the oldest counts) and their skew (s)."""
        ages = np.asarray(ages_s, dtype=np.float64)
        if ages.size:
            self._frame_age_s.add(float(ages.max()))
        self._frame_skew_s.add(float(skew_s))

    def inference(self, ms: float, stage_ms: dict | None = None) -> None:
        """One inference: total milliseconds and per-stage milliseconds."""
        self._inference_ms.add(ms)
        for name, value in (stage_ms or {}).items():
            self._stage_ms.setdefault(name, Ring(self._max_samples)).add(value)

    def clamps(self, n: int, names=()) -> None:
        """``n`` safety clamps this tick; ``names`` (``"L_j3_step"``, ...) count them per joint too."""
        self.n_clamps += int(n)
        for name in names:
            joint = clamp_joint(name)
            self.clamps_by_joint[joint] = self.clamps_by_joint.get(joint, 0) + 1

    def clamp_line(self) -> str:
        """The clamps in one line, most clamped joint first, e.g. ``safety clamps: 232 (L_j2 80, R_j2 76, ...)``."""
        by = sorted(self.clamps_by_joint.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"safety clamps: {self.n_clamps}" + (f" ({', '.join(f'{j} {n}' for j, n in by)})" if by else "")

    def estop_latency(self, ms: float) -> None:
        """Time from an e-stop's detection to the actuators commanded (ms). One per trip: a short list."""
        self._estop_ms.append(float(ms))

    def estop(self, latched: bool, reason: str = "") -> None:
        """Current e-stop state, shown in the status line."""
        self.estop_latched, self.estop_reason = latched, reason

    # -- reporting ------------------------------------------------------------------------------------
    def rate_hz(self, last: int | None = None) -> float:
        """Ticks per second achieved over the newest ``last`` ticks (all kept ones by default)."""
        starts = self._tick_start_s.values(last)
        if starts.size < 2 or starts[-1] <= starts[0]:
            return math.nan
        return (starts.size - 1) / (starts[-1] - starts[0])

    def inference_p50_ms(self, last: int = 30) -> float:
        """Median of the newest ``last`` inference latencies (NaN before the first)."""
        return percentiles(self._inference_ms.values(last), (50,))["p50"]

    def status_line(self, width: int | None = None) -> str:
        """One line over the last :data:`LIVE_WINDOW` samples, most important first, cut to ``width``.

        ``infer`` is the p50/p99 inference latency, ``age`` the p99 frame age (skew is in the summary);
        ``-`` stands for "no sample yet" (never ``nan``). Example (74 characters)::

            e-stop armed  30.0 Hz  overruns 0  infer 26/97 ms  age 15 ms  clamps 12
        """
        inf = percentiles(self._inference_ms.values(LIVE_WINDOW), (50, 99))
        age = percentiles(_ms(self._frame_age_s.values(LIVE_WINDOW)), (99,))["p99"]
        estop = "LATCHED" if self.estop_latched else "armed"
        line = (f"e-stop {estop}  {_num(self.rate_hz(LIVE_WINDOW), '.1f')} Hz  overruns {self.n_overruns}  "
                f"infer {_num(inf['p50'], '.0f')}/{_num(inf['p99'], '.0f')} ms  age {_num(age, '.0f')} ms  "
                f"clamps {self.n_clamps}")
        if width is not None and len(line) > width:
            line = line[: max(0, width - 1)] + "…"
        return line

    def summary(self) -> dict:
        """End-of-run numbers (times in ms). Percentiles cover the last ``max_samples`` samples."""
        duration_s = (self._t_last - self._t_first) if self.n_ticks else 0.0
        return {
            "ticks": self.n_ticks,
            "duration_s": duration_s,
            "period_ms": self.period_s * 1e3,
            "rate_hz": self.rate_hz(),
            "jitter_ms": percentiles(_ms(self._jitter_s.values()), (50, 99)),
            "overruns": self.n_overruns,
            "overrun_fraction": self.n_overruns / (self.n_ticks + self.n_overruns) if self.n_ticks else 0.0,
            "frame_age_ms": percentiles(_ms(self._frame_age_s.values()), (50, 99)),
            "frame_skew_ms": percentiles(_ms(self._frame_skew_s.values()), (50, 99)),
            "inferences": self._inference_ms.count,
            "inference_ms": percentiles(self._inference_ms.values(), (50, 99)),
            "stage_ms": {name: percentiles(r.values(), (50, 99)) for name, r in self._stage_ms.items()},
            "clamps": self.n_clamps,
            "clamps_by_joint": dict(sorted(self.clamps_by_joint.items(), key=lambda kv: (-kv[1], kv[0]))),
            "estop_trips": len(self._estop_ms),
            "estop_latency_ms": {"max": max(self._estop_ms) if self._estop_ms else math.nan,
                                 **percentiles(self._estop_ms, (50,))},
        }

    def print_summary(self, console: Console | None = None) -> None:
        """The summary as a rich table."""
        s = self.summary()
        table = Table(title=f"run: {s['ticks']} ticks in {s['duration_s']:.1f} s ({_num(s['rate_hz'], '.1f')} Hz)")
        for col in ("", "p50", "p99"):
            table.add_column(col, justify="right" if col else "left")

        def row(label: str, pct: dict) -> None:
            table.add_row(label, _num(pct["p50"], ".2f"), _num(pct["p99"], ".2f"))

        row("tick jitter (ms)", s["jitter_ms"])
        row("frame age (ms)", s["frame_age_ms"])
        row("frame skew (ms)", s["frame_skew_ms"])
        row("inference (ms)", s["inference_ms"])
        for name, pct in s["stage_ms"].items():
            row(f"  {name} (ms)", pct)
        table.add_row("overruns (skipped deadlines)", f"{s['overruns']}", f"{100 * s['overrun_fraction']:.1f} %")
        table.add_row("safety clamps", f"{s['clamps']}", "")
        lat = s["estop_latency_ms"]
        table.add_row("e-stop trips / latency (ms)", f"{s['estop_trips']}",
                      f"max {lat['max']:.2f}" if s["estop_trips"] else "")
        console = console or out_console()
        console.print(table)
        if self.n_clamps:  # one line, whatever the width (a terminal wraps it; nothing is cut)
            console.print(self.clamp_line(), highlight=False, soft_wrap=True)

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`summary` as JSON (NaN, i.e. no samples, becomes null)."""

        def clean(x):
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, float) and not math.isfinite(x):
                return None
            return x

        Path(path).write_text(json.dumps(clean(self.summary()), indent=2, allow_nan=False) + "\n")
