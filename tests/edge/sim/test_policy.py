"""The reach task, its evaluation and tiny-policy training, at a small scale (a few episodes, a few steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_cli
from vla_edge.edge.sim.evaluate import CountingPolicy, EvalSummary, SimBench, wilson_interval
from vla_edge.edge.sim.task import ExpertPolicy, ReachTask, TaskError, expert_chunk, reach_pose


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_reach_pose_touches_every_spot_and_ready_pose_does_not():
    task = ReachTask()
    for seed in range(200):
        ep = task.sample(seed)
        assert task.at_target(ep.reach_q14, ep.target_xy_m)
        assert not task.at_target(task.ready_q14, ep.target_xy_m)
        assert (ep.side == "left") == (ep.target_xy_m[0] < 0)
    with pytest.raises(TaskError):
        reach_pose(0.0, 0.9, 0.05)  # out of reach


def test_random_start_is_seeded_varied_within_limits_and_off_target():
    from vla_edge.edge.bundle.spec import PIPER_JOINT_HI, PIPER_JOINT_LO

    task = ReachTask()
    starts = np.stack([task.start_pose(s) for s in range(100)])
    assert np.array_equal(starts[0], task.start_pose(0))  # seeded
    off = starts - task.ready_q14
    moved = [0, 1, 2, 4, 7, 8, 9, 11]
    assert np.all(np.abs(off) <= task.start_spread_rad + 1e-12)
    assert np.all(off[:, moved].std(0) > task.start_spread_rad / 3)  # spread over the range
    assert np.allclose(np.delete(off, moved, axis=1), 0.0)  # J4, J6 and the grippers stay at ready
    assert np.all(starts >= np.array(PIPER_JOINT_LO * 2)) and np.all(starts <= np.array(PIPER_JOINT_HI * 2))
    for s in range(100):
        assert not task.at_target(starts[s], task.sample(s).target_xy_m)
    assert np.array_equal(task.start_pose(5, spread_rad=0.0), task.ready_q14)


def test_expert_chunk_moves_each_joint_at_the_step_then_stops():
    q0, goal = np.zeros(14), np.zeros(14)
    goal[2], goal[4] = 0.5, -0.1
    c = expert_chunk(q0, goal, 0.04)
    assert c.shape == (5, 14)
    assert np.allclose(c[:, 2], 0.04 * np.arange(1, 6))
    assert np.allclose(c[:, 4], [-0.04, -0.08, -0.1, -0.1, -0.1])  # arrived: stays at its goal
    assert np.allclose(c[:, [0, 1, 3]], 0.0)
    assert np.allclose(expert_chunk(goal, goal, 0.04), goal)


class _Frozen:
    """An obviously wrong policy: keeps the arms where they are."""

    def start_episode(self, instruction, navigation=False):
        pass

    def step(self, frames, state):
        from vla_edge.edge.policy import ActionChunk

        return ActionChunk(joints=np.repeat(np.asarray(state)[None], 5, axis=0))


def test_eval_counts_expert_successes_and_frozen_failures():
    with SimBench(max_seconds=1.5) as bench:
        expert = [bench.run_episode(CountingPolicy(ExpertPolicy(bench.task, bench.sim)), s) for s in (1000, 1001)]
        frozen = [bench.run_episode(CountingPolicy(_Frozen()), 1000)]
    ok = EvalSummary.of("expert", expert)
    assert ok.successes == 2 and ok.success_rate == 1.0 and ok.ci95 == wilson_interval(2, 2)
    for r in expert:
        assert r.success and r.fault is None and r.final_error_m <= bench.task.tolerance_m
        assert 0 < r.time_to_success_s < 1.5 and 0 < r.ticks_to_success <= r.ticks and r.steps >= 2
    assert ok.mean_time_to_success_s == pytest.approx(np.mean([r.time_to_success_s for r in expert]))
    bad = EvalSummary.of("frozen", frozen)
    assert bad.successes == 0 and bad.mean_time_to_success_s is None
    assert frozen[0].time_to_success_s is None and frozen[0].ticks >= 30  # ran until the time limit


def test_train_tiny_loss_falls_and_checkpoint_loads(tmp_path):
    pytest.importorskip("torch")
    from vla_edge.edge.sim.evaluate import record_expert_episodes
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.tools.train_tiny import train

    results = record_expert_episodes(tmp_path / "episodes", 2, first_seed=3, linger_ticks=2)
    assert len(list((tmp_path / "episodes").glob("episode_*.hdf5"))) == 2
    assert all(r.success for r in results)
    import h5py

    firsts = []
    for path in sorted((tmp_path / "episodes").glob("episode_*.hdf5")):
        with h5py.File(path, "r") as f:
            assert f.attrs["start"] == "random"
            firsts.append(f["observations/qpos"][0])
    task = ReachTask()
    for seed, q0 in zip((3, 4), firsts, strict=True):  # each episode starts from its seed's random pose
        assert np.allclose(q0, task.start_pose(seed), atol=5e-3)
    res = train(tmp_path / "episodes", tmp_path / "best.pt", steps=12, batch=2, lr=3e-3, progress=False)
    assert res.episodes == 2 and res.samples > 20
    assert all(math.isfinite(x) for x in res.losses)
    assert np.mean(res.losses[-3:]) < np.mean(res.losses[:3]) - 0.5
    # the episodes record their target, so the training-only target probe was on ...
    assert len(res.probe_losses) == 12 and all(math.isfinite(x) for x in res.probe_losses)
    ck = load_checkpoint(res.path)  # weights_only=True inside
    import torch

    assert json.loads(torch.load(res.path, weights_only=True)["training"])["aux_weight"] == 1.0
    # ... and is not part of the checkpoint: the same tensors as a run without it
    off = train(tmp_path / "episodes", tmp_path / "off.pt", steps=2, batch=2, progress=False, aux_weight=0.0)
    assert off.probe_losses == []
    # --init continues from the checkpoint's weights: its first loss is the trained model's, not a fresh one's
    cont = train(tmp_path / "episodes", tmp_path / "cont.pt", steps=2, batch=2, progress=False, init=res.path)
    assert cont.losses[0] < np.mean(res.losses[:3]) - 0.5
    ck_off = load_checkpoint(off.path)
    assert {k: v.shape for k, v in ck.state_dict.items()} == {k: v.shape for k, v in ck_off.state_dict.items()}
    lo, hi = np.array(ck.policy.action_lo), np.array(ck.policy.action_hi)
    assert (hi > lo).all() and ck.layout.cameras == ["cam_high", "cam_left_wrist", "cam_right_wrist"]


@pytest.mark.parametrize("command", ["eval", "train-tiny"])
def test_cli_help(command):
    r = run_cli(command, "--help", timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout


class _Slow:
    """The expert, thinking ``delay_s`` per chunk: the episode's success comes while a step is in flight."""

    def __init__(self, policy, delay_s: float):
        self.policy, self.delay_s = policy, delay_s

    def start_episode(self, instruction, navigation=False):
        self.policy.start_episode(instruction, navigation)

    def step(self, frames, state):
        import time

        time.sleep(self.delay_s)
        return self.policy.step(frames, state)


def test_an_episode_returns_with_no_inference_in_flight():
    """eval's episode ends on success without waiting for the loop's step in flight; run_episode must wait for it
    (robot safe first): a step left running shares the policy with the next episode, or is still inside torch
    or ONNX Runtime when the process exits, which aborts it ("terminate called without an active exception")."""
    import threading

    with SimBench(max_seconds=6.0) as bench:
        slow = _Slow(ExpertPolicy(bench.task, bench.sim), 0.3)
        r = bench.run_episode(CountingPolicy(slow), 1001)
        assert r.success
        assert not [t for t in threading.enumerate() if t.name == "inference" and t.is_alive()]


def test_eval_with_the_torch_baseline_exits_0(tmp_path):
    """Issue 20 item 5: ``eval --baseline torch`` printed its result and then aborted (exit 134) in 7 of 8 runs."""
    pytest.importorskip("torch")
    from vla_edge.export.demo import shipped_policy

    r = run_cli("export", "--ckpt", str(shipped_policy()), "--out", str(tmp_path / "b"), "--parity-samples", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    for _ in range(2):
        r = run_cli("eval", "--bundle", str(tmp_path / "b"), "--episodes", "1", "--baseline", "torch", "--ckpt",
                    str(shipped_policy()), timeout=180)
        assert r.returncode == 0 and "token agreement" in r.stdout, (r.returncode, r.stderr[-2000:])
