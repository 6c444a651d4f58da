"""``vla-edge eval``: success rate of a policy on the simulated reach task (:mod:`vla_edge.edge.sim.task`).

Each episode runs through the normal control loop (:class:`~vla_edge.edge.loop.ControlLoop`: sync
chunks, safety filter, e-stop latch, optional HDF5 recording) against one connected simulated robot:

1. the target disc is placed at the episode's seeded spot, the arms go back to the ready pose;
2. the loop runs the policy until the task's success test has held for ``hold_ticks`` ticks, or
   ``max_seconds`` pass (failure), or a fault stops the robot (failure, reason recorded);
3. a monitor thread applies the success test every control period to the simulator's measured joints.

The report: success rate with a 95 % Wilson interval, mean time to success (seconds and control ticks,
over the successful episodes), and with ``--baseline torch`` the PyTorch model's rate on the same
seeds plus the per-step token agreement of the bundle with PyTorch on the bundle's own observations
(computed after each episode, so the PyTorch steps never slow the bundle's loop down).

The same runner records the expert's demonstrations for ``vla-edge train-tiny``
(:func:`record_expert_episodes`). No torch unless ``--baseline torch``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from vla_edge import VlaEdgeError
from vla_edge.edge.engine import STAGES
from vla_edge.edge.episodes.recorder import EpisodeRecorder
from vla_edge.edge.loop import ControlLoop, LoopConfig
from vla_edge.edge.profile import load_profile
from vla_edge.edge.robot import Robot
from vla_edge.edge.safety import SafetyFilter, SafetyLimits
from vla_edge.edge.session import Session
from vla_edge.edge.sim.task import INSTRUCTION, Episode, ExpertPolicy, ReachTask
from vla_edge.edge.telemetry import RunStats, log_console, out_console

log = logging.getLogger(__name__)

COBOT_CAMERAS = ["cam_high", "cam_left_wrist", "cam_right_wrist"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for ``z = 1.96``); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    target_xy_m: tuple[float, float]
    side: str
    time_to_success_s: float | None  # loop start -> first tick of the held window
    ticks_to_success: int | None
    ticks: int
    final_error_m: float  # fingertip to target, horizontally, at the end
    fault: str | None = None
    steps: int = 0  # policy steps (inferences)


@dataclass
class EvalSummary:
    policy: str
    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_time_to_success_s: float | None
    mean_ticks_to_success: float | None
    results: list[EpisodeResult] = field(default_factory=list)

    @classmethod
    def of(cls, policy: str, results: list[EpisodeResult]) -> EvalSummary:
        n, k = len(results), sum(r.success for r in results)
        ok = [r for r in results if r.success]
        return cls(
            policy=policy, episodes=n, successes=k, success_rate=k / n if n else 0.0, ci95=wilson_interval(k, n),
            mean_time_to_success_s=float(np.mean([r.time_to_success_s for r in ok])) if ok else None,
            mean_ticks_to_success=float(np.mean([r.ticks_to_success for r in ok])) if ok else None,
            results=results,
        )

    def line(self) -> str:
        t = f"{self.mean_time_to_success_s:.2f} s" if self.mean_time_to_success_s is not None else "-"
        return (f"{self.policy}: {self.successes}/{self.episodes} = {100 * self.success_rate:.0f} % "
                f"(95 % CI {100 * self.ci95[0]:.0f}-{100 * self.ci95[1]:.0f} %), mean time to success {t}")


class SuccessMonitor:
    """Applies the task's test every control period; stops the loop once it held long enough."""

    def __init__(self, task: ReachTask, sim, episode: Episode, loop, period_s: float, linger_ticks: int = 0):
        self.task, self.sim, self.episode, self.loop = task, sim, episode, loop
        self.period_s, self.linger_ticks = period_s, linger_ticks
        self.t0 = time.monotonic()
        self.success_t: float | None = None
        self.success_tick: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="success-monitor", daemon=True)

    def __enter__(self):
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        held, first_t, first_tick, linger = 0, 0.0, 0, 0
        while not self._stop.wait(self.period_s):
            if self.success_t is not None:  # recording: keep the goal pose in view a little longer
                linger += 1
                if linger >= self.linger_ticks:
                    self.loop.stop_requested.set()
                    return
                continue
            if self.task.at_target(self.sim.joint_state(), self.episode.target_xy_m):
                if held == 0:
                    first_t, first_tick = time.monotonic(), self.loop.ticks
                held += 1
                if held >= self.task.hold_ticks:
                    self.success_t, self.success_tick = first_t - self.t0, first_tick
                    if self.linger_ticks <= 0:
                        self.loop.stop_requested.set()
                        return
            else:
                held = 0


class CountingPolicy:
    """Counts steps and (optionally) keeps each step's observation and tokens for the agreement check."""

    def __init__(self, policy, keep: bool = False):
        self.policy, self.keep = policy, keep
        self.provider = getattr(policy, "provider", "?")
        self.steps: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]] = []
        self.n = 0

    def start_episode(self, instruction: str, navigation: bool = False) -> None:
        self.policy.start_episode(instruction, navigation=navigation)

    def step(self, frames, state):
        chunk = self.policy.step(frames, state)
        self.n += 1
        if self.keep:
            self.steps.append(([np.array(f) for f in frames], np.array(state, np.float64), np.array(chunk.token_ids)))
        return chunk


class SimBench:
    """One connected simulated robot on which episodes run back to back (a context manager)."""

    def __init__(self, task: ReachTask | None = None, robot: str = "sim", rate_hz: float | None = None,
                 max_seconds: float = 8.0, cameras: list[str] | None = None, session: Session | None = None):
        """``session``: the run's :class:`~vla_edge.edge.session.Session` (entered: a signal latches the e-stop
        and ends the episode); default: a latch of its own, no signal handlers."""
        self.session = session or Session(keyboard="none")
        self.task = task or ReachTask()
        self.profile = load_profile(robot)
        if self.profile.sim is None:
            raise VlaEdgeError(f"robot {self.profile.name}: evaluation needs a simulated robot (a [sim] profile)")
        self.rate_hz = rate_hz or self.profile.control_rate_hz
        self.max_seconds = max_seconds
        self.cameras = list(cameras or COBOT_CAMERAS)
        self.robot = Robot(self.profile)

    def __enter__(self) -> SimBench:
        self.robot.connect()
        missing = [c for c in self.cameras if c not in self.robot.camera_names]
        if missing:
            self.robot.disconnect()
            raise VlaEdgeError(f"policy expects cameras {self.cameras}; robot {self.profile.name} has no {missing[0]}")
        self.session.arm(self.robot, firmware_estop=False, notify=lambda kind, reason: None)
        return self

    def __exit__(self, *exc) -> None:
        self.robot.disconnect()

    @property
    def sim(self):
        return self.robot.sim

    def reset(self, episode: Episode, timeout_s: float = 5.0, start_q14=None) -> None:
        """Target at the episode's spot, arms at ``start_q14`` (default: the ready pose; commanded, then waited for)."""
        scene = self.sim.scene
        scene.target_radius_m = self.task.target_radius_m
        self.sim.set_target(*episode.target_xy_m)
        ready = self.task.ready_q14 if start_q14 is None else np.asarray(start_q14, np.float64)
        self.robot.resume()
        deadline = time.monotonic() + timeout_s
        while True:
            self.robot.send_joint_targets(ready)
            if np.max(np.abs(self.robot.read_state().qpos - ready)) < 2e-3:
                break
            if time.monotonic() > deadline:
                raise VlaEdgeError("reset: the arms did not reach the start pose")
            time.sleep(0.02)
        time.sleep(0.1)  # let the cameras draw the new scene

    def run_episode(self, policy, seed: int, instruction: str = INSTRUCTION, recorder=None,
                    linger_ticks: int = 0, random_start: bool = False) -> EpisodeResult:
        """Reset to ``seed``'s episode and run ``policy`` through the control loop until success or timeout.

        ``random_start``: start from :meth:`ReachTask.start_pose` (training data) instead of the ready pose.
        """
        episode = self.task.sample(seed)
        start = self.task.start_pose(seed) if random_start else None
        self.reset(episode, start_q14=start)
        cfg = LoopConfig(rate_hz=self.rate_hz, mode="sync", seconds=self.max_seconds)
        stats = RunStats(period_s=1.0 / cfg.rate_hz)
        if recorder is not None:
            recorder.start_episode({"instruction": instruction, "robot": self.profile.name, "sim": True,
                                    "seed": seed, "target_xy_m": list(episode.target_xy_m), "side": episode.side,
                                    "start": "random" if random_start else "ready",
                                    "policy": type(getattr(policy, "policy", policy)).__name__})
        stop = self.session.stop
        loop = ControlLoop(self.robot, policy, instruction, cfg, SafetyFilter(SafetyLimits.for_robot(self.profile)),
                           self.session.estop, stats, [recorder] if recorder is not None else [], cameras=self.cameras,
                           until=lambda: stop.requested)
        try:
            with SuccessMonitor(self.task, self.sim, episode, loop, 1.0 / cfg.rate_hz, linger_ticks) as mon:
                fault = loop.run()
        finally:
            if recorder is not None:
                recorder.close()
        self.robot.hold()
        # The monitor's stop does not wait for an inference in flight (loop.run); wait here, the robot safe: the
        # next episode must not share the policy with it, nor the process exit under it (a daemon thread still
        # in torch or ONNX Runtime at exit aborts the interpreter: "terminate called without an active exception").
        loop.finish(cfg.inference_deadline_s)
        err, _ = self.task.tip_error(self.sim.joint_state(), episode.target_xy_m)
        ok = mon.success_t is not None
        return EpisodeResult(seed=seed, success=ok, target_xy_m=episode.target_xy_m, side=episode.side,
                             time_to_success_s=mon.success_t, ticks_to_success=mon.success_tick, ticks=loop.ticks,
                             final_error_m=err, fault=fault if not ok else None,
                             steps=getattr(policy, "n", 0))


def episode_seeds(n: int, first_seed: int = 1000) -> list[int]:
    """The evaluation seeds: ``first_seed .. first_seed + n - 1`` (training data uses seeds below 1000)."""
    return list(range(first_seed, first_seed + n))


def record_expert_episodes(out_dir: str | Path, n: int, first_seed: int = 0, task: ReachTask | None = None,
                           linger_ticks: int = 10, progress=None, random_start: bool = True) -> list[EpisodeResult]:
    """Record ``n`` scripted-expert episodes as HDF5 files (Cobot Magic layout) through the control loop.

    ``random_start`` (default): each episode starts from the seed's randomised pose
    (:meth:`ReachTask.start_pose`), so that only the image tells the policy where to go.
    """
    results = []
    with SimBench(task) as bench:
        recorder = EpisodeRecorder(out_dir, cameras=bench.cameras, compress="lzf", stage_names=[*STAGES, "total"])
        expert = ExpertPolicy(bench.task, bench.sim)
        for seed in range(first_seed, first_seed + n):
            r = bench.run_episode(CountingPolicy(expert), seed, recorder=recorder, linger_ticks=linger_ticks,
                                  random_start=random_start)
            if not r.success:
                log.warning("expert episode %d did not succeed (%s)", seed, r.fault or "timeout")
            results.append(r)
            if progress is not None:
                progress(r)
    return results


def evaluate(policies: list[tuple[str, object]], episodes: int, *, robot: str = "sim", cameras=None,
             first_seed: int = 1000, max_seconds: float = 8.0, baseline=None, progress: bool = True,
             session: Session | None = None) -> dict:
    """Run every ``(name, policy)`` on the same seeded episodes; returns the report dict (module docstring).

    ``baseline``: a PyTorch policy (:class:`vla_edge.export.torch_policy.TorchPolicy`, one of ``policies``);
    the others' observations are replayed through it after each episode for the token agreement.
    ``session``: an entered :class:`~vla_edge.edge.session.Session`; a signal ends the evaluation after the
    running episode (the robot safe), and the report holds the episodes run so far (``"stopped"``: why).
    """
    console = log_console()
    session = session or Session(keyboard="none")
    seeds = episode_seeds(episodes, first_seed)
    summaries: list[EvalSummary] = []
    agree = [0, 0, 0, 0]
    with SimBench(robot=robot, max_seconds=max_seconds, cameras=cameras, session=session) as bench, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not progress,
    ) as bar:
        for name, pol in policies:
            job = bar.add_task(f"{name}: 0 successes", total=len(seeds))
            results = []
            for seed in seeds:
                counting = CountingPolicy(pol, keep=baseline is not None and pol is not baseline)
                result = bench.run_episode(counting, seed)
                if session.stop.requested:  # the episode was cut short: not a result
                    break
                results.append(result)
                if counting.keep:
                    for i, v in enumerate(baseline.agreement(counting.steps, INSTRUCTION)):
                        agree[i] += v
                bar.update(job, advance=1, description=f"{name}: {sum(r.success for r in results)} successes")
            summaries.append(EvalSummary.of(name, results))
            if session.stop.requested:
                break
    n_run = max((s.episodes for s in summaries), default=0)
    report = {
        "task": asdict(bench.task),
        "instruction": INSTRUCTION,
        "seeds": [seeds[0], seeds[0] + max(n_run - 1, 0)] if seeds else [],
        "max_seconds": max_seconds,
        "summaries": [asdict(s) for s in summaries],
    }
    if session.stop.requested:
        report["stopped"] = session.stop.reason
    if baseline is not None:
        report["token_agreement"] = {
            "tokens": agree[0] / agree[1] if agree[1] else None, "n_tokens": agree[1],
            "chunks": agree[2] / agree[3] if agree[3] else None, "n_chunks": agree[3],
        }
    return report


def print_report(report: dict, console=None) -> None:
    console = console or out_console()
    table = Table(title=f"reach task, {report['summaries'][0]['episodes']} seeded episodes "
                        f"(seeds {report['seeds'][0]}..{report['seeds'][-1]}), max {report['max_seconds']:g} s")
    for col in ("policy", "success", "rate", "95 % CI (Wilson)", "mean time to success"):
        table.add_column(col)
    for s in report["summaries"]:
        t = s["mean_time_to_success_s"]
        table.add_row(s["policy"], f"{s['successes']}/{s['episodes']}", f"{100 * s['success_rate']:.0f} %",
                      f"{100 * s['ci95'][0]:.0f}-{100 * s['ci95'][1]:.0f} %",
                      f"{t:.2f} s ({s['mean_ticks_to_success']:.0f} ticks)" if t is not None else "-")
    console.print(table)
    ta = report.get("token_agreement")
    if ta and ta["tokens"] is not None:
        console.print(f"token agreement, bundle vs PyTorch on the bundle's observations: "
                      f"{100 * ta['tokens']:.2f} % of {ta['n_tokens']} tokens, "
                      f"{100 * ta['chunks']:.1f} % of {ta['n_chunks']} chunks identical")
