"""``vla-edge convert --to llava-vla``: recorded episodes -> LLaVA-VLA training data, checked as an outsider.

Samples are parsed the way LLaVA-VLA's trainer parses them (split on "\\n" and " ", ``float()``), the
canvas is recomposed with PIL (``Image.resize`` LANCZOS tiles pasted on a black canvas, as the
reference's calvin2json.py does) and saved with PIL's default JPEG settings, and statistics.yaml is read
with ``yaml.safe_load`` and compared with numpy on the HDF5 datasets. The trainer's own checks hold: the
state line has the 15 values ``encode_robot_obs`` asserts, and every action value lies in [-1, 1], where
``encode_actions(statistics=None)`` bins it as it is; the reference's min-max decoding
(``denormalize_actions``) of it gives back the recorded float32 action exactly.
"""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import yaml
from conftest import run_cli
from vla_edge.edge.bundle.spec import CALVIN_LAYOUT, COBOT_MAGIC_LAYOUT
from vla_edge.edge.episodes.convert import ConvertConfig, ConvertError, convert

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two short scripted-expert episodes of the simulated reach task, recorded through the control loop."""
    from vla_edge.edge.sim.evaluate import record_expert_episodes

    d = tmp_path_factory.mktemp("episodes")
    record_expert_episodes(d, 2, first_seed=3, linger_ticks=2)
    return d


def _pil_canvas(frames, layout) -> Image.Image:
    canvas = Image.new("RGB", (layout.canvas_w, layout.canvas_h))
    for tile, frame in zip(layout.tiles, frames, strict=True):
        canvas.paste(Image.fromarray(frame).resize((tile.w, tile.h), Image.LANCZOS), (tile.x, tile.y))
    return canvas


def _floats(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.split(" ")])


def test_round_trip_samples_images_statistics(recorded, tmp_path):
    out = tmp_path / "llava"
    r = run_cli("convert", str(recorded), "--to", "llava-vla", str(out))
    assert r.returncode == 0, r.stderr
    samples = json.loads((out / "data.json").read_text())
    files = sorted(recorded.glob("episode_*.hdf5"))
    assert len(files) == 2

    all_q, all_a, decoded, k = [], [], [], 0
    for path in files:
        with h5py.File(path, "r") as f:
            q, a = f["observations/qpos"][()], f["action"][()]
            instruction = f.attrs["instruction"]
            target = json.loads(f.attrs["target_xy_m"])  # a simulated episode's target, for train-tiny's probe
            n = len(q)
            all_q.append(q)
            all_a.append(a)
            for t in range(n):
                s = samples[k + t]
                assert set(s) == {"id", "image", "conversations", "embody", "target_xy_m"} and s["embody"] is True
                assert s["target_xy_m"] == target and len(target) == 2
                human, gpt = s["conversations"]
                assert human["from"] == "human" and gpt["from"] == "gpt"
                image_tag, text, state = human["value"].split("\n")
                assert image_tag == "<image>" and text == instruction
                state = _floats(state)
                assert len(state) == 15 and state[14] == 0.0  # padded to what encode_robot_obs asserts
                assert np.array_equal(state[:14].astype(np.float32), q[t])  # str() round-trips float32
                x = _floats(gpt["value"])
                assert x.shape == (70,) and np.all(np.abs(x) <= 1.0)  # encode_actions clips nothing
                want = [a[min(t + j, n - 1)] for j in range(5)]  # the episode's last action repeats
                decoded.append((x, np.stack(want)))
                if t in (0, n - 1):  # images: the first and the padded last sample of each episode
                    frames = [f[f"observations/images/{c}"][t] for c in COBOT_MAGIC_LAYOUT.cameras]
                    buf = io.BytesIO()
                    _pil_canvas(frames, COBOT_MAGIC_LAYOUT).save(buf, format="JPEG")
                    written = (out / s["image"]).read_bytes()
                    assert Image.open(io.BytesIO(written)).size == (336, 336)
                    assert written == buf.getvalue()  # same canvas, same encoder settings as PIL's default
            k += n
    assert k == len(samples)
    assert len({s["id"] for s in samples}) == len(samples)

    stats = yaml.safe_load((out / "statistics.yaml").read_text())
    q, a = np.concatenate(all_q).astype(np.float64), np.concatenate(all_a).astype(np.float64)
    lo, hi = np.array(stats["act_min_bound"]), np.array(stats["act_max_bound"])
    varies = a.max(0) > a.min(0)
    assert lo.shape == hi.shape == (14,) and varies.sum() >= 4
    assert np.array_equal(lo[varies], a.min(0)[varies]) and np.array_equal(hi[varies], a.max(0)[varies])
    assert np.all(hi > lo)  # constant dimensions are widened, the trainer divides by hi - lo
    assert np.allclose(stats["robot_obs"][0]["mean"], list(q.mean(0)) + [0.0], rtol=0, atol=1e-12)
    assert np.allclose(stats["robot_obs"][0]["std"], list(q.std(0)) + [1.0], rtol=0, atol=1e-12)
    for x, want in decoded:  # the reference's denormalize_actions: bounds tiled over the chunk
        back = (x + 1) / 2 * (np.tile(hi, 5) - np.tile(lo, 5)) + np.tile(lo, 5)
        assert np.array_equal(back.astype(np.float32).reshape(5, 14), want)  # lossless
    assert any(np.any(np.abs(want) > 1.0) for _, want in decoded)  # raw radians would have been clipped
    assert np.array_equal(decoded[-1][0].reshape(5, 14), np.tile(decoded[-1][0][:14], (5, 1)))  # last: padding

    sidecar = json.loads((out / "vla_edge.json").read_text())
    assert sidecar == {"policy": {"chunk_size": 5, "action_dim": 14, "state_dim": 15, "state_pad": [0.0]},
                       "actions": "bounds", "image_layout": json.loads(json.dumps(COBOT_MAGIC_LAYOUT.to_dict()))}


def _stock_episode(path, n: int, instruction: str | None = "stack the cups", compression="gzip") -> np.ndarray:
    """An episode as the stock AgileX recorder writes it (h5py directly, gzip-compressed images)."""
    rng = np.random.default_rng(n)
    action = rng.uniform(-1, 1, (n, 14)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["sim"] = False
        if instruction is not None:
            f.attrs["instruction"] = instruction
        for cam in ("rgb_static", "rgb_gripper"):
            f.create_dataset(f"observations/images/{cam}", data=rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8),
                             compression=compression, chunks=(1, 48, 64, 3))
        f["observations/qpos"] = rng.normal(size=(n, 14)).astype(np.float32)
        f["action"] = action
    return action


def test_short_episode_other_layout_and_compressed_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    action = _stock_episode(src / "episode_7.hdf5", 3)  # shorter than a chunk
    r = convert(src, tmp_path / "out", ConvertConfig(layout=CALVIN_LAYOUT, chunk_size=5))
    assert (r.episodes, r.samples) == (1, 3)
    samples = json.loads((tmp_path / "out/data.json").read_text())
    assert [s["id"] for s in samples] == ["episode_7_0000000", "episode_7_0000001", "episode_7_0000002"]
    assert all(set(s) == {"id", "image", "conversations", "embody"} for s in samples)  # no target on a real robot
    stats = yaml.safe_load((tmp_path / "out/statistics.yaml").read_text())
    lo, hi = np.array(stats["act_min_bound"]), np.array(stats["act_max_bound"])
    first = (_floats(samples[0]["conversations"][1]["value"]).reshape(5, 14) + 1) / 2 * (hi - lo) + lo
    assert np.array_equal(first.astype(np.float32), action[[0, 1, 2, 2, 2]])
    assert Image.open(tmp_path / "out" / samples[0]["image"]).size == (334, 334)
    assert json.loads((tmp_path / "out/vla_edge.json").read_text())["image_layout"]["canvas_w"] == 334


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _stock_episode(src / "episode_0.hdf5", 4)
    _stock_episode(src / "episode_1.hdf5", 4, instruction=None)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="episode_1.hdf5: no 'instruction'"):
        convert(src, out, ConvertConfig(layout=CALVIN_LAYOUT))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no partial output, no temp dir left

    with h5py.File(src / "episode_1.hdf5", "a") as f:
        f["observations/qpos"][2, 5] = np.nan
    with pytest.raises(ConvertError, match="qpos is not finite at tick 2, dimension 5"):
        convert(src, out, ConvertConfig(layout=CALVIN_LAYOUT, instruction="x"))

    with pytest.raises(ConvertError, match="no dataset observations/images/cam_high"):
        convert(src, out)  # the Cobot Magic layout's cameras are not in these files

    # Qwen2 merges a final '.' with the newline the reference trainer locates the state by: it would train
    # without the instruction (tests/tools/test_llava_data.py shows the trainer's spans go wrong)
    for instruction in ("stack the cups.", "stack the cups ", "stack\nthe cups"):
        with pytest.raises(ConvertError, match="the reference trainer would train without it"):
            convert(src, out, ConvertConfig(layout=CALVIN_LAYOUT, instruction=instruction))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("convert", str(src), "--to", "llava-vla", str(out), "--instruction", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("vla-edge convert: error: ") and "not empty" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_data_tools_import_no_torch_transformers_pil_or_rerun(recorded, tmp_path):
    """convert, record and the master-arm modules are robot-side: they run with torch, transformers,
    PIL and rerun made unimportable."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'PIL', 'rerun'): sys.modules[m] = None\n"
        "import vla_edge.edge.episodes.convert, vla_edge.edge.teleop, vla_edge.edge.episodes.view\n"
        "import vla_edge.firmware_bridge.piper_master, vla_edge.firmware_bridge.piper_master_sim\n"
        "from vla_edge.edge.episodes.convert import convert\n"
        f"r = convert({str(recorded)!r}, {str(tmp_path / 'out')!r})\n"
        "assert r.samples > 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_export_with_the_converted_statistics(recorded, request, tmp_path):
    """``vla-edge export --stats OUT/statistics.yaml`` gives the bundle the converted statistics."""
    from vla_edge.edge.bundle.manifest import Bundle

    torch = pytest.importorskip("torch")
    wrapper = torch.load(request.getfixturevalue("tiny_ckpt"), weights_only=True)
    del wrapper["policy"], wrapper["image_layout"]  # as a trainer's checkpoint: the statistics stay with the data
    torch.save(wrapper, tmp_path / "best.pt")
    out = tmp_path / "llava"
    convert(recorded, out)
    stats = yaml.safe_load((out / "statistics.yaml").read_text())
    r = run_cli("export", "--ckpt", str(tmp_path / "best.pt"), "--stats", str(out / "statistics.yaml"), "--out",
                str(tmp_path / "bundle"), "--precision", "fp32", "--parity-samples", "1")
    assert r.returncode == 0, r.stderr
    policy = Bundle.load(tmp_path / "bundle").policy
    assert np.allclose(policy.action_lo, stats["act_min_bound"]) and np.allclose(policy.action_hi, stats["act_max_bound"])
    assert np.allclose(policy.proprio_mean, stats["robot_obs"][0]["mean"])
    assert np.allclose(policy.proprio_std, stats["robot_obs"][0]["std"])
    assert policy.chunk_size == 5 and policy.action_dim == 14 and policy.state_dim == 15
    assert policy.actions == "bounds" and policy.state_pad == (0.0,) and policy.robot_state_dim == 14


def test_stock_recorder_jpeg_rows(tmp_path):
    """The stock AgileX recorder with compress=True stores each frame as JPEG bytes, zero-padded to the
    longest one, in an (N, max_len) uint8 dataset; convert decodes them like the stock loaders do."""
    import cv2

    rng = np.random.default_rng(1)
    n = 3
    frames = {c: [cv2.GaussianBlur(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), (7, 7), 0) for _ in range(n)]
              for c in COBOT_MAGIC_LAYOUT.cameras}
    src = tmp_path / "src"
    src.mkdir()
    with h5py.File(src / "episode_0.hdf5", "w") as f:
        f.attrs.update({"sim": False, "compress": True, "instruction": "wave"})
        for cam, imgs in frames.items():
            encoded = [cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].ravel() for img in imgs]
            padded = np.zeros((n, max(len(e) for e in encoded)), np.uint8)
            for i, e in enumerate(encoded):
                padded[i, : len(e)] = e
            f[f"observations/images/{cam}"] = padded
        f["observations/qpos"] = np.zeros((n, 14), np.float32)
        f["action"] = rng.uniform(0, 1, (n, 14)).astype(np.float32)
    convert(src, tmp_path / "out")
    sample = json.loads((tmp_path / "out/data.json").read_text())[1]
    with h5py.File(src / "episode_0.hdf5", "r") as f:
        decoded = [np.asarray(Image.open(io.BytesIO(f[f"observations/images/{c}"][1].tobytes())).convert("RGB"))
                   for c in COBOT_MAGIC_LAYOUT.cameras]
    buf = io.BytesIO()
    _pil_canvas(decoded, COBOT_MAGIC_LAYOUT).save(buf, format="JPEG")
    written = np.asarray(Image.open(tmp_path / "out" / sample["image"]), dtype=np.int16)
    expected = np.asarray(Image.open(buf), dtype=np.int16)
    assert np.abs(written - expected).max() <= 2  # same canvas; JPEG decoders may differ by a level
