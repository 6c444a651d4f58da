"""Actions decoded as the reference decodes them, under each of its three encodings (CONTRACT section 1c).

The oracles are LLaVA-VLA's own decoders (``llava/action_tokenizer.py``), re-implemented here from their
published definitions, not with vla-edge's code: ``ActionTokenizer.decode_token_ids_to_actions`` (the bin
centre: ``raw``, what the reference trainer's ``encode_actions(statistics=None)`` data decodes with),
``denormalize_actions`` (``bounds``: min-max, the statistics tiled over the chunk) and
``denormalize_actions_real`` (``sigma3``: ``x * 3 * std + mean`` with std read from ``act_min_bound`` and mean
from ``act_max_bound``). A checkpoint directory as the trainer writes it is exported with each encoding, and
the chunk the bundle decodes (the engine, and the PyTorch baseline of ``eval``/``bench``) must equal the
reference's decoding of the very tokens it generated.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from test_checkpoint import TrainerCheckpoint  # noqa: E402  (the trainer's own directory layout)
from vla_edge import VlaEdgeError  # noqa: E402
from vla_edge.edge.bundle.manifest import Bundle  # noqa: E402
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT  # noqa: E402
from vla_edge.edge.engine import Engine  # noqa: E402
from vla_edge.export.checkpoint import CheckpointError, LoadOptions, load_checkpoint  # noqa: E402

EDGES = np.linspace(-1, 1, 256)


def decode_token_ids_to_actions(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``ActionTokenizer.decode_token_ids_to_actions``: the bin centre of each token."""
    centres = (EDGES[:-1] + EDGES[1:]) / 2.0
    return centres[np.clip(vocab_size - ids - 1, 0, centres.shape[0] - 1)]


def denormalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    lo, hi = np.array(stats["act_min_bound"]), np.array(stats["act_max_bound"])
    times = len(actions) // len(lo)
    lo, hi = np.tile(lo, times), np.tile(hi, times)
    return (actions + 1) / 2 * (hi - lo) + lo


def denormalize_actions_real(actions: np.ndarray, stats: dict) -> np.ndarray:
    act_std, act_mean = np.array(stats["act_min_bound"]), np.array(stats["act_max_bound"])
    return actions * 3 * np.tile(act_std, 5) + np.tile(act_mean, 5)


REFERENCE = {"raw": lambda x, stats: x, "bounds": denormalize_actions, "sigma3": denormalize_actions_real}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> TrainerCheckpoint:
    ck = TrainerCheckpoint(tmp_path_factory.mktemp("enc"), seed=2)
    rng = np.random.default_rng(5)
    # sigma3 statistics as the reference reads them: std under act_min_bound, mean under act_max_bound; some
    # means below their std (a file that is not min <= max, which only sigma3 accepts)
    ck.sigma3 = {**ck.stats, "act_min_bound": rng.uniform(0.05, 0.4, 14).round(4).tolist(),
                 "act_max_bound": rng.uniform(-0.5, 0.5, 14).round(4).tolist()}
    ck.sigma3_path = ck.stats_path.parent.parent / "sigma3" / "statistics.yaml"
    ck.sigma3_path.parent.mkdir()
    ck.sigma3_path.write_text(yaml.safe_dump(ck.sigma3))
    return ck


@pytest.mark.parametrize("encoding", ["raw", "bounds", "sigma3"])
def test_each_encoding_decodes_as_the_reference(trainer, encoding, tmp_path):
    from vla_edge.export.torch_policy import TorchPolicy

    stats, stats_path = ((trainer.sigma3, trainer.sigma3_path) if encoding == "sigma3"
                         else (trainer.stats, trainer.stats_path))
    flags = [] if encoding == "raw" else ["--actions", encoding]  # raw: a trainer directory's default
    out = tmp_path / "bundle"
    r = run_cli("export", "--ckpt", str(trainer.dir), "--stats", str(stats_path), *flags, "--out", str(out),
                "--precision", "fp32", "--parity-samples", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"actions decoded as {encoding} (" in r.stdout
    if encoding == "raw":
        assert "the reference trainer's default" in r.stdout
    bundle = Bundle.load(out)
    assert bundle.policy.actions == encoding and json.loads((out / "manifest.json").read_text())["policy"][
        "actions"] == encoding
    engine = Engine(bundle, provider="cpu")
    torch_policy = TorchPolicy(replace(load_checkpoint(trainer.dir, LoadOptions(stats=stats_path)),
                                       policy=bundle.policy))  # as eval --baseline torch loads it
    rng = np.random.default_rng(7)
    v = bundle.tokens.vocab_base
    for policy in (engine, torch_policy):
        policy.start_episode("pick up the red cube")
        for _ in range(2):
            frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in COBOT_MAGIC_LAYOUT.tiles]
            chunk = policy.step(frames, rng.normal(0, 0.3, 14))
            ids = np.asarray(chunk.token_ids[:70], np.int64)
            want = REFERENCE[encoding](decode_token_ids_to_actions(ids, v), stats)
            np.testing.assert_allclose(chunk.joints.ravel(), want, rtol=0, atol=1e-12)
    for start in range(0, 256, 70):  # every bin, in every action dimension (cut-head index j is token V-256+j)
        heads = (start + np.arange(70) * 11) % 256
        want = REFERENCE[encoding](decode_token_ids_to_actions(v - 256 + heads, v), stats)
        np.testing.assert_allclose(engine.detokenize(heads).joints.ravel(), want, rtol=0, atol=1e-12)


def test_where_the_encoding_comes_from(trainer, tiny_ckpt, tmp_path):
    """``--actions`` > the data's vla_edge.json > the checkpoint's > raw for a trainer directory (the reference
    trainer's default) > bounds for a vla-edge wrapper from before the field."""
    opts = LoadOptions(stats=trainer.stats_path)
    assert load_checkpoint(trainer.dir, opts).policy.actions == "raw"
    assert load_checkpoint(trainer.dir, replace(opts, actions="bounds")).policy.actions == "bounds"
    assert load_checkpoint(tiny_ckpt).policy.actions == "bounds"
    sidecar = trainer.stats_path.with_name("vla_edge.json")
    own = trainer.dir / "vla_edge.json"
    try:
        own.write_text(json.dumps({"actions": "bounds"}))
        assert load_checkpoint(trainer.dir, opts).policy.actions == "bounds"
        sidecar.write_text(json.dumps({"actions": "raw"}))  # the data's record wins over the checkpoint's
        assert load_checkpoint(trainer.dir, opts).policy.actions == "raw"
        assert load_checkpoint(trainer.dir, replace(opts, actions="bounds")).policy.actions == "bounds"
        sidecar.write_text(json.dumps({"actions": "zscore"}))
        with pytest.raises(CheckpointError, match="unknown action encoding 'zscore'"):
            load_checkpoint(trainer.dir, opts)
    finally:
        own.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    # min <= max is a bounds fact: sigma3 statistics (std, mean) need not hold it, and bounds refuse them
    sigma3 = LoadOptions(stats=trainer.sigma3_path)
    assert load_checkpoint(trainer.dir, replace(sigma3, actions="sigma3")).policy.action_lo == trainer.sigma3[
        "act_min_bound"]
    with pytest.raises(VlaEdgeError, match="act_min_bound > act_max_bound"):
        load_checkpoint(trainer.dir, replace(sigma3, actions="bounds"))
    with pytest.raises(VlaEdgeError, match="act_min_bound holds the std"):  # negative: not a std
        load_checkpoint(trainer.dir, replace(opts, actions="sigma3"))
    r = run_cli("export", "--ckpt", str(trainer.dir), "--stats", str(trainer.stats_path), "--actions", "zscore",
                "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "invalid choice: 'zscore'" in r.stderr
    r = run_cli("export", "--shape", "llava-ov-0.5b", "--actions", "raw", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "--actions goes with --ckpt" in r.stderr
