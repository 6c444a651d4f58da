"""Batched inference: N robots' observations in one call give each robot the chunk of its step alone.

The oracle is :meth:`Engine.step`, one observation at a time, on the same bundle (the tiny checkpoint's random
weights: small logit margins, so a wrong position, a row seeing another row's or its own padding, or a wrong
logit row changes tokens). Rows differ in instruction length (the padding path), navigation mode (chunks of
different lengths: 3 tokens for a drive, 71 for a manipulation chunk) and input (pixels or camera frames).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from vla_edge.edge.batch import BatchedEngine, Observation, batch_refusal
from vla_edge.edge.bundle.manifest import Bundle
from vla_edge.edge.engine import Engine, EngineError
from vla_edge.edge.serve.handler import PolicyHandler, RequestError, normalise
from vla_edge.edge.wire import bundle_id, decode_reply, encode_request

INSTRUCTIONS = ("pick up the red cube", "go", "open the top drawer of the white cabinet slowly and carefully, then stop",
                "reach", "put the blue block on the plate")


@pytest.fixture(scope="module")
def engine(fused_fp32_bundle):
    return Engine(Bundle.load(fused_fp32_bundle), provider="cpu", threads=1)


def observations(bundle, n: int = 5) -> list[Observation]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        state = np.array([0.0, 1.57, -1.48, 0.0, 0.0, 0.0, 0.03] * 2) + rng.normal(0, 0.3, 14)
        if i % 2:  # camera frames, composed by the batch
            frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in bundle.layout.cameras]
            out.append(Observation(state, INSTRUCTIONS[i], frames=frames, navigation=i == 3))
        else:
            s = bundle.layout.output
            pixels = rng.uniform(-1, 1, (1, 3, s, s)).astype(np.float32)
            out.append(Observation(state, INSTRUCTIONS[i], pixels=pixels, navigation=i == 1))
    return out


def alone(engine: Engine, obs: Observation):
    engine.start_episode(obs.instruction, navigation=obs.navigation)
    return engine.step(obs.frames, obs.state, pixels=obs.pixels)


def logits_of_each_call(monkeypatch, obj, name: str) -> list[np.ndarray]:
    """Every decoder call's logits, as ``obj.name`` returns them (the call itself runs unchanged)."""
    seen, call = [], getattr(obj, name)

    def recorded(*args, **kwargs):
        out = call(*args, **kwargs)
        seen.append(np.array(out))
        return out

    monkeypatch.setattr(obj, name, recorded)
    return seen


def test_a_batch_gives_every_robot_the_chunk_of_its_step_alone(engine):
    obs = observations(engine.bundle)
    want = [alone(engine, o) for o in obs]
    lengths = {len(engine.bundle.prompt.instruction_ids(engine.encode, o.instruction, o.navigation)) for o in obs}
    assert len(lengths) >= 4, "the rows should need padding"
    assert {len(w.token_ids) for w in want} == {3, 71} or any(w.joints is None for w in want), "a drive and a chunk"
    batch = BatchedEngine(engine, max_batch=5)
    for rows in ([0], [0, 1], [2, 0, 4], [4, 3, 2, 1, 0], [1, 1, 3]):
        got = batch.step([obs[i] for i in rows])
        for g, i in zip(got, rows, strict=True):
            np.testing.assert_array_equal(g.token_ids, want[i].token_ids, err_msg=f"row {i} of {rows}")
            assert g.base == want[i].base
            if want[i].joints is None:
                assert g.joints is None
            else:
                np.testing.assert_array_equal(g.joints, want[i].joints)
        assert got[0].decode_calls == max(len(want[i].token_ids) for i in rows) - 1
        assert set(got[0].timings_ms) >= {"vision", "prefill", "decode", "total"}


def test_every_rows_logits_at_every_position_are_those_of_its_step_alone(engine, monkeypatch):
    """Stricter than tokens (random weights lean on the last token): each row's prefill and decode logits."""
    obs = observations(engine.bundle)
    batch = BatchedEngine(engine, max_batch=5)
    want = []
    for o in obs:
        single = logits_of_each_call(monkeypatch, engine, "_run_fused")
        alone(engine, o)
        monkeypatch.undo()
        want.append(np.concatenate(single))  # (tokens, n_head): the prefill's row, then one per decode call
    batched = logits_of_each_call(monkeypatch, batch, "_run")
    batch.step(obs)
    for i, w in enumerate(want):
        got = np.stack([call[i] for call in batched[: len(w)]])
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5, err_msg=f"row {i}")


def test_bundles_whose_rows_interact_or_lack_the_batch_axis_are_refused(engine, fused_int8_bundle, fp32_bundle):
    with pytest.raises(EngineError, match="dynamically quantised .*dynamic-qint8.* one robot at a time"):
        BatchedEngine(Engine(Bundle.load(fused_int8_bundle), provider="cpu", threads=1))
    assert "fused decoder" in batch_refusal(Bundle.load(fp32_bundle).manifest)  # the plain graph
    old = json.loads(json.dumps(engine.bundle.manifest))
    old["graphs"]["decoder"]["inputs"]["seqlens_k"] = [1]  # a bundle exported before the batch axis
    assert "no batch axis" in batch_refusal(old) and "re-export" in batch_refusal(old)
    assert batch_refusal(engine.bundle.manifest) is None


def test_a_bad_observation_names_its_row_and_nothing_runs(engine):
    batch = BatchedEngine(engine, max_batch=3)
    obs = observations(engine.bundle, 3)
    bad_state = Observation(np.zeros(13), "reach", pixels=obs[0].pixels)
    with pytest.raises(EngineError, match=r"observation 2: state has shape \(13,\)"):
        batch.step([obs[0], obs[1], bad_state])
    with pytest.raises(EngineError, match="observation 1: state.* is NaN"):
        batch.step([obs[0], Observation(obs[1].state * np.nan, "reach", pixels=obs[0].pixels)])
    with pytest.raises(EngineError, match="observation 1: frames"):
        batch.step([obs[0], Observation(obs[1].state, "reach", frames=[f[:, :, :2] for f in obs[1].frames])])
    with pytest.raises(EngineError, match="observation 1: instruction is empty"):
        batch.step([obs[0], Observation(obs[1].state, "  ", pixels=obs[0].pixels)])
    with pytest.raises(EngineError, match="observation 0: expected 3 camera frames"):
        batch.step([Observation(obs[0].state, "reach", frames=obs[1].frames[:2])])
    with pytest.raises(EngineError, match=r"a batch holds 1\.\.3 observations, got 4"):
        batch.step(obs + obs[:1])
    with pytest.raises(EngineError, match="max_len 1024"):
        batch.step([Observation(obs[0].state, "reach " * 1200, pixels=obs[0].pixels)])


def test_the_server_handler_batches_valid_requests_and_answers_bad_ones_alone(fused_fp32_bundle, engine):
    """``step_many``: what a replica does with the requests ``@serve.batch`` hands it, without Ray."""
    handler = PolicyHandler(str(fused_fp32_bundle), provider="cpu", threads=1, max_batch=4)
    assert handler.max_batch == 4 and handler.info()["batching_off"] is None
    bid = bundle_id(handler.bundle.manifest)
    rng = np.random.default_rng(3)
    s = handler.bundle.layout.output
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(3)]
    states = [rng.normal(0, 0.3, 14) for _ in range(3)]
    bodies = [encode_request(1, bid, "pick up the red cube", False, images[0], states[0]),
              b"not a request",
              encode_request(2, bid, "reach", False, images[1], states[1] * np.nan),
              encode_request(3, bid, "open the top drawer", True, images[2], states[2])]
    out = handler.step_many(bodies)
    assert isinstance(out[1], RequestError) and out[1].status == 400
    assert isinstance(out[2], RequestError) and out[2].status == 400 and "NaN" in str(out[2])
    for i, (img, st, instr, nav) in {0: (images[0], states[0], "pick up the red cube", False),
                                     3: (images[2], states[2], "open the top drawer", True)}.items():
        reply = decode_reply(out[i])
        want = alone(engine, Observation(st, instr, pixels=normalise(img), navigation=nav))
        np.testing.assert_array_equal(reply.token_ids, want.token_ids)
        assert reply.server["batch"] == 2 and reply.seq == (1 if i == 0 else 3)


def test_a_dynamically_quantised_bundle_is_served_one_request_at_a_time(fused_int8_bundle):
    handler = PolicyHandler(str(fused_int8_bundle), provider="cpu", threads=1)
    assert handler.max_batch == 1 and handler.batch is None
    assert "dynamically quantised" in handler.info()["batching_off"]
