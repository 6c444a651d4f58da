"""``vla-edge convert DIR --to llava-vla OUT``: recorded episodes -> what LLaVA-VLA's trainer reads.

Usage::

    vla-edge convert episodes/ --to llava-vla data/      # every episode_*.hdf5 in episodes/
    # then train LLaVA-VLA, unmodified, with  --data_path data/data.json --image_folder data
    #                                         --action_stat data/statistics.yaml   (README: the whole command)
    vla-edge export --ckpt checkpoint-N/ --stats data/statistics.yaml --out bundle/   # decodes as data/vla_edge.json says

Input: HDF5 episodes in the Cobot Magic layout (:mod:`vla_edge.edge.episodes.format`: vla-edge's recorder
or the stock AgileX recorder): each camera's frames (N, H, W, 3) uint8 RGB (any HDF5 filter; the stock
recorder's JPEG-encoded rows too), ``qpos`` (N, 14) rad/m, ``action`` (N, 14) rad/m and the
``instruction`` attribute (or ``--instruction``).

Output, in OUT (written to a temporary directory and renamed into place only when complete)::

    data.json          a JSON list, one sample per recorded tick t (reference: scripts/helper/calvin2json.py):
                       {"id": "episode_3_0000012", "image": "images/episode_3_0000012.jpg",
                        "conversations": [{"from": "human", "value": "<image>\\n" + instruction + "\\n" + state},
                                          {"from": "gpt", "value": actions}],
                        "embody": true}
                       in the form the reference trainer takes unmodified (``llava/train/train_vla.py``):
                       ``actions`` is the chunk action[t .. t+4] flattened step-major (70 numbers; the last
                       ticks' chunks repeat the episode's last action, as the reference pads), each value
                       **min-max normalised** into [-1, 1] with statistics.yaml's bounds,
                       ``(a - act_min_bound) / (act_max_bound - act_min_bound) * 2 - 1`` (the trainer's
                       ``encode_actions(statistics=None)`` bins what it reads as it is, clipping to [-1, 1]:
                       raw radians would be cut); ``state`` is qpos[t] **padded with 0.0 to the 15 values**
                       the trainer's ``encode_robot_obs`` asserts (the Cobot Magic has 14; a wider state is
                       refused). Floats are ``str()`` joined by single spaces: the recorded float32 state
                       values, and the float64 normalised actions (shortest round-trip form: lossless, the
                       recorded float32 action is ``float32((x + 1) / 2 * (hi - lo) + lo)``).
                       A simulated episode (one with the ``target_xy_m`` attribute, as ``vla-edge record
                       --robot sim`` writes it) adds ``"target_xy_m": [x, y]`` to each of its samples: where
                       the simulated target was, for ``vla-edge train-tiny``'s training-only target probe.
                       The reference trainer reads only ``image``, ``conversations``, ``embody`` and ``id``
                       of a sample (``LazySupervisedDataset._get_item``) and ignores the extra key
    images/*.jpg       the composed canvas of tick t (e.g. 336 x 336 for the Cobot Magic layout), before
                       the trainer's resize to 384: the layout's tiles and filter, composed by the same
                       C++ kernel as the runtime (bit-identical to PIL), JPEG quality 75 (PIL's default,
                       which the reference's ``Image.save`` uses)
    statistics.yaml    act_min_bound / act_max_bound (per action dimension, min/max over every recorded
                       action) and robot_obs: [{mean, std}] (per state dimension, numpy mean and std with
                       ddof 0 over every recorded qpos; mean 0, std 1 for each padded value). A dimension
                       whose actions never vary gets the Piper's joint limits as bounds instead (a range
                       the normalisation can divide by).
    vla_edge.json      {"policy": {"chunk_size", "action_dim", "state_dim", "state_pad"}, "actions": "bounds",
                        "image_layout": {...}}: what ``vla-edge export --stats`` needs beside statistics.yaml:
                       the bundle then decodes actions min-max (``bounds``) and pads the robot's state with
                       ``state_pad`` exactly as the data was padded

Robot-side: numpy, h5py, OpenCV, PyYAML and the kernel; no torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, PIPER_JOINT_HI, PIPER_JOINT_LO, ImageLayout
from vla_edge.edge.episodes.format import (
    ACTION,
    EPISODE_GLOB,
    QPOS,
    EpisodeFormatError,
    EpisodeReader,
    episode_paths,
)

log = logging.getLogger(__name__)

DATA_JSON = "data.json"
ACTIONS = "bounds"
"""The action encoding convert writes (``vla_edge.json`` ``actions``; :data:`~vla_edge.edge.bundle.spec.ACTION_ENCODINGS`)."""
TRAINER_STATE_VALUES = 15
"""The state width the reference trainer's ``encode_robot_obs`` asserts (CALVIN's ``robot_obs``): shorter
states are padded with 0.0 to it."""
STATISTICS_YAML = "statistics.yaml"
SIDECAR_JSON = "vla_edge.json"
IMAGE_DIR = "images"


class ConvertError(VlaEdgeError):
    """Episodes that cannot be converted (missing datasets, NaN, no instruction) or an unusable OUT."""


@dataclass(frozen=True)
class ConvertConfig:
    """``chunk_size``: actions per sample (LLaVA-VLA: 5); ``jpeg_quality``: 75 is PIL's default."""

    layout: ImageLayout = COBOT_MAGIC_LAYOUT
    chunk_size: int = 5
    jpeg_quality: int = 75
    instruction: str | None = None  # overrides the episodes' ``instruction`` attribute


@dataclass
class EpisodeInfo:
    """One checked episode: its index (from the file name), instruction, states and actions (float32)."""

    path: Path
    index: int
    instruction: str
    qpos: np.ndarray = field(repr=False)
    action: np.ndarray = field(repr=False)
    target_xy_m: list[float] | None = None  # a simulated episode's target (attribute ``target_xy_m``)


@dataclass
class ConvertResult:
    out: Path
    episodes: int
    samples: int
    widened_dims: list[int]


# -- reading and checking ------------------------------------------------------------------------------
def episode_files(src: Path) -> list[Path]:
    """``episode_<n>.hdf5`` files of ``src`` in episode order."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory of {EPISODE_GLOB} files")
    found = episode_paths(src)
    if not found:
        raise ConvertError(f"{src}: no {EPISODE_GLOB} files (record some: vla-edge record --out {src})")
    return found


@contextmanager
def _episode_errors():
    """An episode that cannot be read (not HDF5, a dataset missing, a frame that does not decode): ConvertError."""
    try:
        yield
    except EpisodeFormatError as e:
        raise ConvertError(str(e)) from None


def check_episode(path: Path, cfg: ConvertConfig) -> EpisodeInfo:
    """Read and check one episode's small datasets; images are read later, one tick at a time."""
    with _episode_errors(), EpisodeReader(path, cfg.layout.cameras) as r:
        qpos = r.qpos().astype(np.float32)
        action = r.action().astype(np.float32)
        instruction = cfg.instruction or r.instruction()
        target = r.attrs.get("target_xy_m")
        r.check_equal_rows()
    if qpos.ndim != 2 or action.ndim != 2 or qpos.shape[0] == 0:
        raise ConvertError(f"{path}: qpos {qpos.shape} / action {action.shape}: expected (N, D) with N > 0")
    for name, arr in ((QPOS, qpos), (ACTION, action)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ConvertError(f"{path}: {name} is not finite at tick {bad[0][0]}, dimension {bad[0][1]}")
    if not instruction.strip():
        raise ConvertError(f"{path}: no 'instruction' attribute; pass --instruction")
    if "\n" in instruction or not instruction[-1].isalnum():
        # The reference trainer finds the state's tokens by the positions of the newline token; Qwen2 merges a
        # final '.', '!', '?' or space with the newline after the instruction (".\n" is one token), and the
        # trainer then writes the state over the instruction: it would train without it.
        raise ConvertError(f"{path}: instruction {instruction!r} ends in {instruction[-1]!r} or holds a newline: "
                           "the reference trainer would train without it (Qwen2 merges a final punctuation mark or "
                           "space with the newline it locates the state by); give --instruction without it")
    return EpisodeInfo(path, r.index or 0, instruction, qpos, action, target_xy_m_attr(path, target))


def target_xy_m_attr(path: Path, value) -> list[float] | None:
    """A simulated episode's ``target_xy_m`` attribute (JSON ``[x, y]``, as ``record``/``eval`` write it) checked,
    or None when it has none; :class:`ConvertError` names ``path``."""
    if value is None:
        return None
    try:
        xy = [float(v) for v in json.loads(value if isinstance(value, str) else bytes(value).decode())]
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{path}: attribute target_xy_m {value!r} is not [x, y] ({e})") from None
    if len(xy) != 2 or not all(np.isfinite(xy)):
        raise ConvertError(f"{path}: attribute target_xy_m {value!r} is not a finite [x, y]")
    return xy


# -- samples -----------------------------------------------------------------------------------------------
def action_chunks(action: np.ndarray, chunk_size: int) -> np.ndarray:
    """(N, D) -> (N, chunk_size, D): tick t's chunk is actions t .. t+chunk_size-1, the last action repeated."""
    idx = np.minimum(np.arange(len(action))[:, None] + np.arange(chunk_size)[None, :], len(action) - 1)
    return action[idx]


def float_text(values: np.ndarray) -> str:
    """Space-separated ``str()`` of each value, flattened (the reference: ``" ".join(map(str, x.flatten()))``)."""
    return " ".join(map(str, np.asarray(values).ravel()))


def normalise_bounds(actions: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(a - lo) / (hi - lo) * 2 - 1`` in float64, clipped to [-1, 1] (the reference's min-max encoding)."""
    x = (np.asarray(actions, np.float64) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(x, -1.0, 1.0)


def sample_entry(sample_id: str, image: str, instruction: str, qpos: np.ndarray, chunk: np.ndarray,
                 target_xy_m: list[float] | None = None) -> dict:
    """One data.json sample; ``qpos`` and ``chunk`` as they are to be written (padded, normalised);
    ``target_xy_m``: a simulated episode's target, kept for train-tiny's target probe."""
    sample = {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + instruction + "\n" + float_text(qpos)},
            {"from": "gpt", "value": float_text(chunk)},
        ],
        "embody": True,
    }
    if target_xy_m is not None:
        sample["target_xy_m"] = list(target_xy_m)
    return sample


# -- statistics ----------------------------------------------------------------------------------------------
def statistics(qpos: np.ndarray, action: np.ndarray, state_pad: int = 0) -> tuple[dict, list[int]]:
    """statistics.yaml content from every recorded tick, and the action dimensions widened to the joint limits.

    ``state_pad``: padded state values after the recorded ones (mean 0, std 1 each)."""
    lo, hi = action.min(0).astype(np.float64), action.max(0).astype(np.float64)
    widened = [int(d) for d in np.flatnonzero(hi - lo < 1e-6)]
    if widened and action.shape[1] % 7 == 0:  # Piper arms: J1..J6, gripper per arm
        lim_lo = np.array(PIPER_JOINT_LO * (action.shape[1] // 7))
        lim_hi = np.array(PIPER_JOINT_HI * (action.shape[1] // 7))
        lo[widened], hi[widened] = lim_lo[widened], lim_hi[widened]
    elif widened:
        lo[widened] -= 1.0
        hi[widened] += 1.0
    stats = {
        "act_min_bound": [float(x) for x in lo],
        "act_max_bound": [float(x) for x in hi],
        "robot_obs": [{"mean": [float(x) for x in qpos.astype(np.float64).mean(0)] + [0.0] * state_pad,
                       "std": [float(x) for x in qpos.astype(np.float64).std(0)] + [1.0] * state_pad}],
    }
    return stats, widened


def write_statistics(path: Path, stats: dict, header: str) -> None:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(stats, default_flow_style=None, sort_keys=False, width=1000))


# -- the whole conversion ------------------------------------------------------------------------------------
def convert(src: str | Path, out: str | Path, cfg: ConvertConfig = ConvertConfig(), force: bool = False,
            progress=None) -> ConvertResult:
    """Convert every episode of ``src`` into ``out`` (see the module docstring). Checks everything first."""
    src, out = Path(src), Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not empty (--force replaces it)")
    if cfg.chunk_size < 1 or not 1 <= cfg.jpeg_quality <= 100:
        raise ConvertError(f"chunk size {cfg.chunk_size} / JPEG quality {cfg.jpeg_quality}: need >= 1 / 1..100")
    episodes = [check_episode(p, cfg) for p in episode_files(src)]
    dims = {(e.qpos.shape[1], e.action.shape[1]) for e in episodes}
    if len(dims) != 1:
        raise ConvertError(f"{src}: episodes disagree on (state, action) dimensions: {sorted(dims)}")
    state_dim, action_dim = dims.pop()
    if state_dim > TRAINER_STATE_VALUES:
        raise ConvertError(f"{src}: the state has {state_dim} values; the reference trainer's encode_robot_obs takes "
                           f"{TRAINER_STATE_VALUES} (shorter states are padded with 0.0)")
    pad = [0.0] * (TRAINER_STATE_VALUES - state_dim)
    stats, widened = statistics(np.concatenate([e.qpos for e in episodes]),
                                np.concatenate([e.action for e in episodes]), len(pad))
    lo, hi = np.asarray(stats["act_min_bound"]), np.asarray(stats["act_max_bound"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / IMAGE_DIR).mkdir()
        samples, composer = [], None
        for ep in episodes:
            chunks = normalise_bounds(action_chunks(ep.action, cfg.chunk_size), lo, hi)
            states = np.concatenate([ep.qpos, np.zeros((len(ep.qpos), len(pad)), np.float32)], axis=1)
            with _episode_errors(), EpisodeReader(ep.path, cfg.layout.cameras) as r:
                for t in range(len(ep.qpos)):
                    frames = r.frames(t)
                    if composer is None or composer.frame_shapes != [fr.shape[:2] for fr in frames]:
                        composer = kernels.Composer(cfg.layout, [fr.shape[:2] for fr in frames])
                    canvas = np.asarray(composer.canvas(frames))
                    sample_id = f"episode_{ep.index}_{t:07d}"
                    image = f"{IMAGE_DIR}/{sample_id}.jpg"
                    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR),
                                            [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
                    if not ok:
                        raise ConvertError(f"{ep.path}: tick {t}: JPEG encoding failed")
                    (tmp / image).write_bytes(jpeg.tobytes())
                    samples.append(sample_entry(sample_id, image, ep.instruction, states[t], chunks[t],
                                                ep.target_xy_m))
            if progress is not None:
                progress(ep)
        with open(tmp / DATA_JSON, "w") as fh:
            json.dump(samples, fh, indent=4)
        header = (f"vla-edge convert: {len(episodes)} episodes, {len(samples)} ticks of {src}\n"
                  f"data.json actions are min-max normalised with these bounds (vla_edge.json: actions {ACTIONS})")
        if pad:
            header += f"\nthe state is padded with {len(pad)} x 0.0 to {TRAINER_STATE_VALUES} values (mean 0, std 1)"
        if widened:
            header += f"\naction dimensions {widened} never vary: their bounds are the Piper joint limits"
            log.warning("action dimensions %s never vary in the data: bounds set to the joint limits", widened)
        write_statistics(tmp / STATISTICS_YAML, stats, header)
        sidecar = {"policy": {"chunk_size": cfg.chunk_size, "action_dim": action_dim,
                              "state_dim": state_dim + len(pad), "state_pad": pad},
                   "actions": ACTIONS, "image_layout": cfg.layout.to_dict()}
        (tmp / SIDECAR_JSON).write_text(json.dumps(sidecar, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out=out, episodes=len(episodes), samples=len(samples), widened_dims=widened)


def load_layout(path: str | Path) -> ImageLayout:
    """An ImageLayout from a JSON file: the layout itself, or any file with an ``image_layout`` key
    (a bundle's manifest.json, a vla_edge.json)."""
    try:
        d = json.loads(Path(path).read_text())
        return ImageLayout.from_dict(d.get("image_layout", d))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConvertError(f"--layout {path}: not an image layout ({e})") from None
