"""LLaVA-VLA data encoded as the reference trainer encodes it (``vla_edge.tools.llava_data``), against the trainer.

The oracle is ``preprocess_qwen_vla`` of ``llava/train/train_vla.py`` with ``encode_actions(statistics=None)`` and
``encode_robot_obs`` (``llava/action_tokenizer.py``), re-implemented here from their published definitions on
transformers' own Qwen2 tokenizer and chat template: each turn rendered with the trainer's template and
tokenised, ``<image>`` added as a special token, the numbers replaced by the decoding of their token ids, then
the exact ids written between the newline tokens the trainer locates them by. The tokenizer has Qwen2's
pre-tokenizer (its bins are merges, never the newline, as in the real vocabulary).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder  # noqa: E402
from vla_edge.edge.bundle.spec import SYSTEM_PROMPT  # noqa: E402
from vla_edge.export.checkpoint import tokens_from_tokenizer  # noqa: E402
from vla_edge.export.tokenizer import load_tokenizer_json  # noqa: E402
from vla_edge.tools.llava_data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaData, LlavaDataError  # noqa: E402


def write_qwen2_tokenizer(d: Path):
    """A byte-level BPE with Qwen2's pre-tokenizer, saved as Qwen2 saves it (vocab.json, merges.txt and the
    specials), large enough that its top 256 ids (the bins) are merges, as in Qwen2's vocabulary; and
    transformers' Qwen2Tokenizer over the same files (the trainer's tokenizer)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "zu", "ba", "de", "fo", "gi", "hu", "ja",
                 "ke", "la", "mo", "nu"]
    words = ["".join(p) for p in itertools.product(syllables, repeat=2)]
    corpus = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", "pick up the red cube", "open the drawer",
              "push the towel"] + [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)] * 3
    corpus += [f"\npick up the red cube{end}\n" for end in ".!?"] * 3  # Qwen2's merges of ".\n" and the like
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    d.mkdir(parents=True)
    tok.model.save(str(d))
    v = tok.get_vocab_size()
    specials = {"<|endoftext|>": v, "<|im_start|>": v + 1, "<|im_end|>": v + 2}
    (d / "added_tokens.json").write_text(json.dumps(specials))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for c, i in specials.items()},
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer"}))
    hf = Qwen2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    hf.add_special_tokens({"additional_special_tokens": list(specials)})
    assert hf.vocab_size == v and v - 256 > 198  # the bins are merges, not bytes such as the newline
    return hf


TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def reference_sample(tok, conversations, stats) -> tuple[list[int], list[int]]:
    """``preprocess_qwen_vla`` for one sample (has_image, has_embody), as published."""
    bins = np.linspace(-1, 1, 256)
    vocab_size = tok.vocab_size

    def action_tokenizer(values):
        ids = list(vocab_size - np.digitize(np.clip(values, -1.0, 1.0), bins))
        return [int(i) for i in ids], tok.decode([int(i) for i in ids])

    def encode_actions(sentence):
        return action_tokenizer([float(a) for a in sentence.split(" ")])

    def encode_robot_obs(sentence):
        obs = sentence.split(" ")
        assert len(obs) == 15, "The observation of the robot is mismatch."
        mean, std = np.array(stats["robot_obs"][0]["mean"]), np.array(stats["robot_obs"][0]["std"])
        return action_tokenizer((np.array([float(x) for x in obs]) - mean) / (std + 1e-5) / 3.0)

    def chat(role, content):
        out = tok.apply_chat_template([{"role": role, "content": content}], chat_template=TEMPLATE, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    image_token_index = tok.convert_tokens_to_ids("<image>")
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    input_id = chat("system", SYSTEM_PROMPT)
    target = [IGNORE_INDEX] * len(input_id)
    for conv in conversations:
        if conv["from"] == "gpt":
            real_action_token, sent_value = encode_actions(conv["value"])
        else:
            parts = conv["value"].split("\n")
            real_obs_token, parts[-1] = encode_robot_obs(parts[-1])
            sent_value = "\n".join(parts)
        role = {"human": "user", "gpt": "assistant"}[conv["from"]]
        encode_id = chat(role, sent_value)
        input_id += encode_id
        target += [IGNORE_INDEX] * len(encode_id) if role == "user" else encode_id
    for idx, encode_id in enumerate(input_id):
        if encode_id in (198, im_start, im_end):
            target[idx] = encode_id
        if encode_id == image_token_index:
            input_id[idx] = IMAGE_TOKEN_INDEX
    index_198 = np.where(np.array(input_id) == 198)[0]
    input_id[index_198[-2] + 1 : index_198[-1] - 1] = real_action_token
    target[index_198[-2] + 1 : index_198[-1] - 1] = real_action_token
    input_id[index_198[-4] + 1 : index_198[-3] - 1] = real_obs_token
    target[index_198[-4] + 1 : index_198[-3] - 1] = [IGNORE_INDEX] * len(real_obs_token)
    return input_id, target


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    tok = write_qwen2_tokenizer(d / "tok")
    assert tok("\n")["input_ids"] == [198]
    tok.add_tokens(["<image>"], special_tokens=True)  # as preprocess_qwen_vla does
    rng = np.random.default_rng(0)
    stats = {"act_min_bound": [-1.0] * 14, "act_max_bound": [1.0] * 14,
             "robot_obs": [{"mean": rng.normal(0, 0.3, 15).tolist(), "std": rng.uniform(0.2, 0.6, 15).tolist()}]}
    (d / "data" / "images").mkdir(parents=True)
    (d / "data" / "statistics.yaml").write_text(yaml.safe_dump(stats))
    samples = []
    for k, instruction in enumerate(["pick up the red cube", "open the drawer", "push the towel"]):
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(d / "data" / "images" / f"{k}.jpg")
        state = " ".join(map(str, rng.normal(0, 0.5, 15).astype(np.float32)))
        actions = " ".join(map(str, np.clip(rng.normal(0, 0.5, 70), -1.2, 1.2)))  # a few beyond [-1, 1]: clipped
        samples.append({"id": f"episode_{k}_0000000", "image": f"images/{k}.jpg", "embody": True, "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}\n{state}"}, {"from": "gpt", "value": actions}]})
    (d / "data" / "data.json").write_text(json.dumps(samples))
    tokenizer_json = load_tokenizer_json(d / "tok")
    tokens = tokens_from_tokenizer(tokenizer_json, 1024)
    return {"dir": d, "tok": tok, "stats": stats, "samples": samples, "tokenizer_json": tokenizer_json,
            "tokens": tokens}


def test_ids_and_labels_are_the_reference_trainers(dataset):
    data = LlavaData.load(dataset["dir"] / "data", dataset["tokenizer_json"], dataset["tokens"], 384)
    assert data.images.shape == (3, 384, 384, 3) and data.episodes == 3
    for k, s in enumerate(dataset["samples"]):
        ids, labels = reference_sample(dataset["tok"], s["conversations"], dataset["stats"])
        assert data.ids[k] == ids and data.labels[k] == labels


def test_the_training_prompt_is_the_runtime_prompt(dataset):
    """What the trainer trains on is what the engine feeds at run time: prefix, image, instruction, proprio,
    suffix, then the 70 action tokens, <|im_end|> and the newline."""
    from vla_edge import kernels

    tokens, stats = dataset["tokens"], dataset["stats"]
    data = LlavaData.load(dataset["dir"] / "data", dataset["tokenizer_json"], tokens, 384)
    encode = tokenizer_encoder(dataset["tokenizer_json"])
    prompt = PromptTemplate.build(encode, tokens)
    for k, s in enumerate(dataset["samples"]):
        instruction, state = s["conversations"][0]["value"].split("\n")[1:]
        proprio = kernels.tokenize_proprio(np.array([float(x) for x in state.split(" ")]),
                                           stats["robot_obs"][0]["mean"], stats["robot_obs"][0]["std"],
                                           tokens.vocab_base).tolist()
        ids = data.ids[k]
        p = ids.index(IMAGE_TOKEN_INDEX)
        after = prompt.instruction_ids(encode, instruction, False) + proprio + prompt.suffix
        assert ids[:p] == prompt.prefix and ids[p + 1 : p + 1 + len(after)] == after
        assert len(ids) == p + 1 + len(after) + 72 and ids[-2:] == [tokens.im_end, tokens.newline]


def test_what_the_reference_trainer_would_stop_on_or_misread(dataset, tmp_path):
    tokens, tj = dataset["tokens"], dataset["tokenizer_json"]
    assert 198 not in dataset["tok"]("\npick up the red cube.\n")["input_ids"][1:]  # ".\n" is one token, as in Qwen2
    for name, change, phrase in (
        ("14 state values", lambda v: v.rsplit(" ", 1)[0], "asserts 15"),
        ("a final full stop", lambda v: v.replace("red cube\n", "red cube.\n"), "would misplace them"),
    ):
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "images").symlink_to(dataset["dir"] / "data" / "images")
        (d / "statistics.yaml").write_text((dataset["dir"] / "data" / "statistics.yaml").read_text())
        samples = json.loads(json.dumps(dataset["samples"]))
        samples[0]["conversations"][0]["value"] = change(samples[0]["conversations"][0]["value"])
        (d / "data.json").write_text(json.dumps(samples))
        with pytest.raises(LlavaDataError, match=phrase) as e:
            LlavaData.load(d, tj, tokens, 384)
        assert "sample 0 (episode_0_0000000)" in str(e.value) and "\n" not in str(e.value)


def test_target_positions_are_read_when_every_sample_has_one(dataset, tmp_path):
    """convert copies a simulated episode's ``target_xy_m`` into its samples (the reference trainer ignores the
    key): train-tiny's target probe reads them; the ids and labels are the same as without them."""
    tokens, tj = dataset["tokens"], dataset["tokenizer_json"]
    plain = LlavaData.load(dataset["dir"] / "data", tj, tokens, 384)
    assert plain.targets_xy_m is None
    for name, targets, want in (("all", [[0.1, 0.4], [-0.2, 0.45], [0.3, 0.42]], "array"),
                                ("some", [[0.1, 0.4], None, [0.3, 0.42]], None),
                                ("bad", [[0.1, 0.4], [0.2], [0.3, 0.42]], "not a finite")):
        d = tmp_path / name
        d.mkdir()
        (d / "images").symlink_to(dataset["dir"] / "data" / "images")
        (d / "statistics.yaml").write_text((dataset["dir"] / "data" / "statistics.yaml").read_text())
        samples = json.loads(json.dumps(dataset["samples"]))
        for s, t in zip(samples, targets, strict=True):
            if t is not None:
                s["target_xy_m"] = t
        (d / "data.json").write_text(json.dumps(samples))
        if want == "not a finite":
            with pytest.raises(LlavaDataError, match="sample 1 .*not a finite"):
                LlavaData.load(d, tj, tokens, 384)
            continue
        data = LlavaData.load(d, tj, tokens, 384)
        assert data.ids == plain.ids and data.labels == plain.labels
        if want is None:
            assert data.targets_xy_m is None
        else:
            assert np.array_equal(data.targets_xy_m, np.array(targets))


def test_train_tiny_with_stats_writes_a_self_contained_checkpoint(dataset, tmp_path):
    """``train-tiny --data data/ --with-stats``: the probe is on (the samples carry targets) and the checkpoint
    records the data's statistics.yaml and vla_edge.json, so it loads (exports) with no --stats."""
    pytest.importorskip("torch")
    from vla_edge.export.checkpoint import load_checkpoint
    from vla_edge.tools.train_tiny import train

    d = tmp_path / "data"
    d.mkdir()
    (d / "images").symlink_to(dataset["dir"] / "data" / "images")
    (d / "statistics.yaml").write_text((dataset["dir"] / "data" / "statistics.yaml").read_text())
    (d / "vla_edge.json").write_text(json.dumps({"policy": {"chunk_size": 5, "action_dim": 14, "state_dim": 15,
                                                            "state_pad": [0.0]}, "actions": "bounds"}))
    samples = json.loads(json.dumps(dataset["samples"]))
    for k, s in enumerate(samples):
        s["target_xy_m"] = [0.1 * k, 0.43]
    (d / "data.json").write_text(json.dumps(samples))
    res = train(d, tmp_path / "with.pt", steps=2, batch=2, progress=False, with_stats=True)
    assert len(res.probe_losses) == 2 and all(np.isfinite(res.probe_losses))
    ck = load_checkpoint(res.path)  # no --stats
    stats = dataset["stats"]
    assert ck.policy.actions == "bounds" and ck.policy.state_pad == (0.0,) and ck.policy.state_dim == 15
    assert ck.policy.action_lo == stats["act_min_bound"] and ck.policy.proprio_std == stats["robot_obs"][0]["std"]
    res = train(d, tmp_path / "without.pt", steps=1, batch=2, progress=False, aux_weight=0)
    assert res.probe_losses == []
    with pytest.raises(Exception, match="carries no normalisation statistics"):
        load_checkpoint(res.path)  # like the reference trainer's: the statistics stay with the data
