"""The data loop closes, as a user runs it: record -> convert -> train -> export -> eval, each a CLI command.

1. ``vla-edge record --robot sim``: 24 teleoperated episodes of the reach task (the simulated operator moves
   the master arms with the scripted expert; seeds 40..63, six at each of the four spots, random start poses);
2. ``vla-edge convert --to llava-vla``: data.json (each sample with its simulated episode's ``target_xy_m``), the
   JPEGs, statistics.yaml, vla_edge.json;
3. ``vla-edge train-tiny --data <convert's output>``: the tiny LLaVA-VLA-shaped model trained from data.json,
   the JPEGs and statistics.yaml only, the text encoded as the reference trainer encodes it (fine-tuned from
   the shipped tiny policy, as LLaVA-VLA fine-tunes a pretrained model; with the training-only target probe, fed
   by the samples' ``target_xy_m``);
4. ``vla-edge export --ckpt best.pt --stats data/statistics.yaml``: no flag says how actions were encoded;
5. ``vla-edge eval`` on held-out seeds (1000.., never trained on).

Checked as an outsider: the reference trainer's ``encode_actions(statistics=None)`` (clip to [-1, 1],
``digitize`` on ``linspace(-1, 1, 256)``, ``id = V - i``) is re-implemented here from its published definition,
and the recorded HDF5 actions are the oracle: the bundle's decoding of the tokens the trainer makes of every
training sample gives the recorded action back within one bin; the trained bundle, run on training ticks,
reproduces most recorded actions within one bin; and it reaches held-out targets at the rate the README states.
A wrong action encoding anywhere (convert's data, the bundle's decoding) fails all three.

Duration on the shared 2-core development machine: see the README ("Collecting data").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli, stall_tolerant_sim

pytest.importorskip("torch")
pytest.importorskip("PIL")

EPISODES, FIRST_SEED = 24, 40
EVAL_EPISODES = 12
MIN_SUCCESSES = 4
"""Held-out successes the test requires of 12 (README, "Collecting data": measured 7-9 of 12 before the probe
read data.json's targets, 10 of 12 with it; the weights of the policy shipped before 2026-12-05 with the data's
statistics but no training: 0 of 8, as a wrong encoding gives)."""


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict:
    from vla_edge.export.demo import shipped_policy

    d = tmp_path_factory.mktemp("loop")
    times = {}

    def step(name: str, *args: str, timeout: float = 600) -> None:
        t0 = time.monotonic()
        r = run_cli(*args, timeout=timeout)
        times[name] = time.monotonic() - t0
        assert r.returncode == 0, (name, r.stderr[-3000:])

    robot = str(stall_tolerant_sim(d))  # the sim profile with 2 s watchdogs: a loaded CI box stalls ~0.4 s
    step("record", "record", "--robot", robot, "--instruction", "touch the red target", "--episodes", str(EPISODES),
         "--episode-seconds", "2", "--reset-seconds", "0.2", "--seed", str(FIRST_SEED), "--keyboard", "none", "--out",
         str(d / "episodes"))
    step("convert", "convert", str(d / "episodes"), "--to", "llava-vla", str(d / "data"))
    step("train", "train-tiny", "--data", str(d / "data"), "--out", str(d / "best.pt"), "--steps", "400", "--batch",
         "8", "--lr", "1e-3", "--init", str(shipped_policy()))
    step("export", "export", "--ckpt", str(d / "best.pt"), "--stats", str(d / "data" / "statistics.yaml"), "--out",
         str(d / "bundle"))
    print("data loop, seconds per step:", {k: round(v) for k, v in times.items()})
    return {"dir": d, "times": times}


def _reference_action_ids(sentence: str, vocab_size: int) -> np.ndarray:
    """``encode_actions(sentence, action_tokenizer, statistics=None)``: the floats binned as they are."""
    actions = np.clip(np.array([float(a) for a in sentence.split(" ")]), -1.0, 1.0)
    return vocab_size - np.digitize(actions, np.linspace(-1, 1, 256))


def _recorded(episodes: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in episodes.glob("episode_*.hdf5"):
        with h5py.File(path, "r") as f:
            out[path.stem] = f["action"][()]
    return out


def test_every_training_sample_decodes_back_to_its_recorded_actions(loop):
    from vla_edge.edge.bundle.manifest import Bundle
    from vla_edge.edge.engine import Engine

    bundle = Bundle.load(loop["dir"] / "bundle")
    assert bundle.policy.actions == "bounds" and bundle.policy.state_pad == (0.0,)  # from convert's vla_edge.json
    engine = Engine(bundle, provider="cpu", threads=1)
    v = bundle.tokens.vocab_base
    lo, hi = np.array(bundle.policy.action_lo), np.array(bundle.policy.action_hi)
    recorded = _recorded(loop["dir"] / "episodes")
    samples = json.loads((loop["dir"] / "data" / "data.json").read_text())
    assert len(samples) == sum(len(a) for a in recorded.values())
    for s in samples:
        episode, tick = s["id"].rsplit("_", 1)
        a = recorded[episode]
        want = a[np.minimum(int(tick) + np.arange(5), len(a) - 1)]
        ids = _reference_action_ids(s["conversations"][1]["value"], v)
        got = engine.detokenize(ids - (v - 256)).joints  # cut-head index j is token V - 256 + j
        assert np.all(np.abs(got - want) <= (hi - lo) / 255 + 1e-9), s["id"]


def test_the_trained_bundle_reproduces_training_actions_within_one_bin(loop):
    from vla_edge.edge.bundle.manifest import Bundle
    from vla_edge.edge.engine import Engine

    bundle = Bundle.load(loop["dir"] / "bundle")
    engine = Engine(bundle, provider="cpu", threads=1)
    engine.start_episode("touch the red target")
    lo, hi = bundle.policy.action_bounds()
    within = []
    for path in sorted((loop["dir"] / "episodes").glob("episode_*.hdf5"))[:4]:
        with h5py.File(path, "r") as f:
            action, qpos = f["action"][()], f["observations/qpos"][()]
            for t in range(0, len(action) - 5, 6):
                frames = [f[f"observations/images/{c}"][t] for c in bundle.layout.cameras]
                chunk = engine.step(frames, qpos[t])  # the robot's 14 values; the bundle pads them as convert did
                within.append(np.abs(chunk.joints - action[t : t + 5]) <= (hi - lo) / 255)
    share = float(np.mean(within))
    print(f"trained bundle on {len(within)} training ticks: {100 * share:.1f} % of action values within one bin")
    assert share >= 0.8


def test_the_trained_bundle_reaches_held_out_targets(loop):
    report = loop["dir"] / "eval.json"
    r = run_cli("eval", "--robot", str(stall_tolerant_sim(loop["dir"])), "--bundle", str(loop["dir"] / "bundle"), "--episodes", str(EVAL_EPISODES), "--max-seconds",
                "6", "--json", str(report), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(report.read_text())["summaries"][0]
    print(f"held-out seeds 1000..{999 + EVAL_EPISODES}: {summary['successes']} of {summary['episodes']} reached")
    assert summary["episodes"] == EVAL_EPISODES and summary["successes"] >= MIN_SUCCESSES
