"""The recorded-episode format: one HDF5 file per episode, ``DIRECTORY/episode_<n>.hdf5``.

This module is the format's one home: the dataset keys (named constants, :func:`image_key` and
:func:`frame_ts_key` per camera), the row shapes and dtypes (:func:`create_layout`, :func:`tick_row`), the file naming
(:func:`episode_name`, :func:`next_episode_path`, :func:`episode_paths`) and the reader
(:class:`EpisodeReader`, :func:`read_frames`) that ``vla-edge convert``, ``vla-edge view`` and
``vla-edge train-tiny`` share. The writer is :mod:`.recorder`; :mod:`.repair` recovers an interrupted file.

Usage::

    from vla_edge.edge.episodes import format as ep

    for path in ep.episode_paths("episodes/"):            # episode_0.hdf5, episode_1.hdf5, ... in order
        with ep.EpisodeReader(path, cameras=["cam_high"]) as r:
            qpos, action = r.qpos(), r.action()           # (N, 14) rad / m, as stored
            frames = r.frames(0)                          # tick 0: [(H, W, 3) uint8 RGB] per camera
    ep.next_episode_path("episodes/")                     # the file the recorder creates next

The file has the Cobot Magic stock layout (CONTRACT section 2), so existing loaders read it::

    observations/images/<cam>   (N, H, W, 3) uint8      one dataset per camera (RGB)
    observations/qpos           (N, 14) float32         measured joints (rad) and grippers (m)
    observations/qvel|effort    (N, 14) float32         NaN where the caller did not measure them
    action                      (N, 14) float32         joint targets sent, rad / m (after the safety filter)
    base_action                 (N, 2)  float32         [vx m/s, wz rad/s] sent
    attrs: sim=False, compress=False, plus the episode's meta (instruction, bundle, robot, ...)

and vla-edge's own datasets under ``vla_edge/``::

    vla_edge/tick_t                (N,) float64          monotonic start time of each tick (s)
    vla_edge/clamps                (N,) int32            safety clamps in that tick
    vla_edge/frame_ts/<cam>        (N,) float64          capture time of the frame used (s)
    vla_edge/inference/t           (M,) float64          one row per inference (s)
    vla_edge/inference/stage_ms    (M, S) float32        per-stage latency (ms), attr stage_names
    vla_edge/inference/token_ids   (M, max_tokens) int32 generated ids, padded with -1
    vla_edge/inference/n_tokens    (M,) int32
    vla_edge/events/t|kind|reason  (K,) float64 | S16 | S128   e-stop and other events (t in s)

Files of the stock AgileX recorder read the same way; their frames may be JPEG-encoded rows
(``(N, max_bytes)`` uint8, ``compress=True``), which :func:`read_frames` decodes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import cv2
import h5py
import numpy as np
from vla_edge import VlaEdgeError

log = logging.getLogger(__name__)

# -- dataset keys ---------------------------------------------------------------------------------------
IMAGES = "observations/images"
"""Group of the camera frames: one (N, H, W, 3) uint8 dataset per camera (:func:`image_key`)."""
QPOS = "observations/qpos"
QVEL = "observations/qvel"
EFFORT = "observations/effort"
ACTION = "action"
BASE_ACTION = "base_action"
TICK_T = "vla_edge/tick_t"
CLAMPS = "vla_edge/clamps"
FRAME_TS = "vla_edge/frame_ts"
"""Group of the frames' capture times (s): one (N,) float64 dataset per camera (:func:`frame_ts_key`)."""
INFERENCE_T = "vla_edge/inference/t"
STAGE_MS = "vla_edge/inference/stage_ms"
TOKEN_IDS = "vla_edge/inference/token_ids"
N_TOKENS = "vla_edge/inference/n_tokens"
EVENT_T = "vla_edge/events/t"
EVENT_KIND = "vla_edge/events/kind"
EVENT_REASON = "vla_edge/events/reason"

ARM_DATASETS = (QPOS, QVEL, EFFORT, ACTION)
"""The (N, ARM_DIM) float32 per-tick datasets (rad, m)."""
INFERENCE_DATASETS = (STAGE_MS, TOKEN_IDS, N_TOKENS, INFERENCE_T)
"""One row per inference."""
EVENT_DATASETS = (EVENT_KIND, EVENT_REASON, EVENT_T)
"""One row per event."""

ARM_DIM = 14
"""Joints and grippers of both arms (CONTRACT order)."""
BASE_DIM = 2
"""[vx m/s, wz rad/s]."""
KIND_BYTES = 16
"""Width of an event's kind (``S16``); longer text is truncated."""
REASON_BYTES = 128
"""Width of an event's reason (``S128``); longer text is truncated."""
STAGE_NAMES_ATTR = "stage_names"
"""Attribute of :data:`STAGE_MS`: the JSON list naming its columns."""
INSTRUCTION_ATTR = "instruction"
CAMERAS_ATTR = "cameras"
IMAGE_FILTER_ATTR = "image_filter"


def image_key(cam: str) -> str:
    """Dataset of camera ``cam``'s frames."""
    return f"{IMAGES}/{cam}"


def frame_ts_key(cam: str) -> str:
    """Dataset of camera ``cam``'s frame capture times (s)."""
    return f"{FRAME_TS}/{cam}"


def per_tick_datasets(f: h5py.File) -> list[str]:
    """Names of the datasets that get one row per tick (all must have the same length)."""
    names = [*ARM_DATASETS, BASE_ACTION, TICK_T, CLAMPS]
    names += [image_key(c) for c in f[IMAGES]]
    names += [frame_ts_key(c) for c in f[FRAME_TS]]
    return names


class EpisodeFormatError(VlaEdgeError):
    """An episode file that cannot be read (not HDF5, a dataset missing, a frame that does not decode), or a
    row that does not fit the layout (a wrong shape, an unknown stage)."""


# -- writing ---------------------------------------------------------------------------------------------
ROWS_PER_CHUNK = 256
"""Rows per HDF5 chunk of the small per-tick datasets (images: one frame per chunk)."""


def create_layout(f: h5py.File, meta: dict, cameras: list[str], image_shape: tuple[int, int, int],
                  stage_names: list[str], max_tokens: int, image_filter: str, image_kw: dict) -> None:
    """Write the attributes and create every dataset of the layout above, empty, chunked and resizable.

    ``meta``: the episode's attributes (non-scalar values stored as JSON); ``image_filter``: the
    ``image_filter`` attribute's text; ``image_kw``: the frames' HDF5 filter (``compression=...``).
    """
    f.attrs["sim"] = False
    f.attrs["compress"] = False  # ALOHA-style loaders read True as "rows are JPEG bytes"
    f.attrs[IMAGE_FILTER_ATTR] = image_filter
    for key, value in meta.items():
        f.attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    f.attrs[CAMERAS_ATTR] = json.dumps(list(cameras))

    def grow(name, row_shape, dtype, rows_per_chunk=ROWS_PER_CHUNK, **kw):
        return f.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                chunks=(rows_per_chunk, *row_shape), **kw)

    for cam in cameras:
        grow(image_key(cam), image_shape, np.uint8, rows_per_chunk=1, **image_kw)
        grow(frame_ts_key(cam), (), np.float64)
    for name in ARM_DATASETS:
        grow(name, (ARM_DIM,), np.float32)
    grow(BASE_ACTION, (BASE_DIM,), np.float32)
    grow(TICK_T, (), np.float64)
    grow(CLAMPS, (), np.int32)
    grow(INFERENCE_T, (), np.float64, rows_per_chunk=64)
    grow(STAGE_MS, (len(stage_names),), np.float32, rows_per_chunk=64)
    f[STAGE_MS].attrs[STAGE_NAMES_ATTR] = json.dumps(list(stage_names))
    grow(TOKEN_IDS, (max_tokens,), np.int32, rows_per_chunk=64)
    grow(N_TOKENS, (), np.int32, rows_per_chunk=64)
    grow(EVENT_T, (), np.float64, rows_per_chunk=64)
    grow(EVENT_KIND, (), f"S{KIND_BYTES}", rows_per_chunk=64)
    grow(EVENT_REASON, (), f"S{REASON_BYTES}", rows_per_chunk=64)


def tick_row(frame_ts: dict, qpos, action, base_action, tick_t: float, clamps: int = 0, qvel=None,
             effort=None) -> dict:
    """One tick's row (dataset -> value) of every per-tick dataset but the frames; checks the shapes.

    ``frame_ts``: camera -> capture time (s); ``qpos``/``action``/``qvel``/``effort`` (14,) rad/m
    (qvel and effort NaN when None); ``base_action`` (vx m/s, wz rad/s); ``tick_t`` (s). The arrays are
    copied as float32 (the caller may reuse its own).
    """
    rows = {
        QPOS: qpos,
        QVEL: np.full(ARM_DIM, np.nan) if qvel is None else qvel,
        EFFORT: np.full(ARM_DIM, np.nan) if effort is None else effort,
        ACTION: action,
        BASE_ACTION: base_action,
    }
    for name, value in rows.items():
        want = (BASE_DIM,) if name == BASE_ACTION else (ARM_DIM,)
        rows[name] = np.array(value, dtype=np.float32)
        if rows[name].shape != want:
            raise EpisodeFormatError(f"recorder: {name} has shape {rows[name].shape}, expected {want}")
    for cam, t in frame_ts.items():
        rows[frame_ts_key(cam)] = float(t)
    rows[CLAMPS] = int(clamps)
    rows[TICK_T] = float(tick_t)
    return rows


def inference_row(t: float, stage_ms: dict, token_ids, stage_names: list[str], max_tokens: int) -> dict:
    """One inference's row: stage milliseconds in ``stage_names`` order (missing ones NaN), the token ids
    padded with -1 to ``max_tokens`` (more are cut, with a warning), their count and ``t`` (s)."""
    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    if ids.size > max_tokens:
        log.warning("recorder: %d tokens, keeping the first %d", ids.size, max_tokens)
        ids = ids[:max_tokens]
    padded = np.full(max_tokens, -1, dtype=np.int32)
    padded[: ids.size] = ids
    unknown = set(stage_ms) - set(stage_names)
    if unknown:
        raise EpisodeFormatError(f"recorder: unknown stage(s) {sorted(unknown)}; known: {list(stage_names)}")
    stages = np.array([stage_ms.get(s, np.nan) for s in stage_names], dtype=np.float32)
    return dict(zip(INFERENCE_DATASETS, (stages, padded, ids.size, float(t)), strict=True))


def event_row(t: float, kind: str, reason: str = "") -> dict:
    """One event's row; ``kind`` and ``reason`` are cut to ``KIND_BYTES`` / ``REASON_BYTES`` of UTF-8."""
    return dict(zip(EVENT_DATASETS, (kind.encode()[:KIND_BYTES], reason.encode()[:REASON_BYTES], float(t)),
                    strict=True))


# -- file naming -------------------------------------------------------------------------------------------
EPISODE_GLOB = "episode_*.hdf5"
_EPISODE_RE = re.compile(r"^episode_(\d+)\.hdf5$")


def episode_name(index: int) -> str:
    """File name of episode ``index``: ``episode_<index>.hdf5``."""
    return f"episode_{index}.hdf5"


def episode_index(path: str | Path) -> int | None:
    """The ``n`` of an ``episode_<n>.hdf5`` path, or None for any other name."""
    m = _EPISODE_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def episode_paths(directory: str | Path) -> list[Path]:
    """The ``episode_<n>.hdf5`` files of ``directory`` in episode order (by ``n``); [] when none or no directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(n, p) for p in directory.glob(EPISODE_GLOB) if (n := episode_index(p)) is not None]
    return [p for _, p in sorted(found)]


def next_episode_path(directory: str | Path) -> Path:
    """Where the next episode goes: ``n`` continues after the highest one already in ``directory``."""
    taken = [episode_index(p) for p in episode_paths(directory)]
    return Path(directory) / episode_name(max(taken, default=-1) + 1)


# -- reading ---------------------------------------------------------------------------------------------
def read_frames(f: h5py.File, cameras: list[str], t: int) -> list[np.ndarray]:
    """Tick ``t``'s frames, (H, W, 3) uint8 RGB, C-contiguous; decodes the stock recorder's JPEG rows."""
    frames = []
    for cam in cameras:
        ds = f[image_key(cam)]
        row = ds[t]
        if ds.ndim != 4:  # stock recorder with compress=True: one JPEG (zero-padded) per row
            row = cv2.imdecode(np.asarray(row, np.uint8).ravel(), cv2.IMREAD_COLOR)
            if row is None:
                raise EpisodeFormatError(f"{f.filename}: {cam} tick {t} is not a decodable JPEG")
            row = cv2.cvtColor(row, cv2.COLOR_BGR2RGB)
        frames.append(np.ascontiguousarray(row, dtype=np.uint8))
    return frames


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EpisodeReader:
    """An episode file open for reading (a context manager): the small datasets whole, frames per tick.

    ``cameras``: the cameras needed (their image datasets must exist); None: every camera in the file.
    Raises :class:`EpisodeFormatError` for a file that is not HDF5 or lacks qpos, action or a camera.
    Arrays come back as stored (float32 for vla-edge's recorder, the stock recorder's dtype otherwise).
    """

    def __init__(self, path: str | Path, cameras: list[str] | None = None):
        self.path = Path(path)
        self.index = episode_index(self.path)
        """The ``n`` of ``episode_<n>.hdf5`` (None for another name)."""
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise EpisodeFormatError(f"{self.path}: not a readable HDF5 episode ({e})") from None
        if cameras is None:
            cameras = list(self.f[IMAGES]) if IMAGES in self.f else []
        self.cameras = list(cameras)
        missing = [name for name in self.needed if name not in self.f]
        if missing:
            self.f.close()
            raise EpisodeFormatError(f"{self.path}: no dataset {missing[0]} (cameras needed: {self.cameras})")

    @property
    def needed(self) -> list[str]:
        """The datasets every tick needs: qpos, action and the cameras' frames."""
        return [QPOS, ACTION] + [image_key(c) for c in self.cameras]

    def __enter__(self) -> EpisodeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    def row_counts(self) -> dict[str, int]:
        """Rows of each :attr:`needed` dataset (equal in a complete file)."""
        return {name: self.f[name].shape[0] for name in self.needed}

    def check_equal_rows(self) -> None:
        """Raise :class:`EpisodeFormatError` when the needed datasets differ in length (an interrupted file)."""
        lengths = self.row_counts()
        if len(set(lengths.values())) != 1:
            raise EpisodeFormatError(f"{self.path}: datasets have different lengths {lengths} (an interrupted "
                                     "recording? vla_edge.edge.episodes.repair.recover_episode repairs it)")

    def qpos(self) -> np.ndarray:
        """(N, 14) measured joints (rad) and grippers (m)."""
        return self.f[QPOS][()]

    def action(self) -> np.ndarray:
        """(N, 14) joint (rad) and gripper (m) targets sent."""
        return self.f[ACTION][()]

    def base_action(self) -> np.ndarray | None:
        """(N, 2) base command sent [vx m/s, wz rad/s], or None when the file has none."""
        return self.f[BASE_ACTION][()] if BASE_ACTION in self.f else None

    def tick_t_s(self) -> np.ndarray | None:
        """(N,) monotonic start time of each tick (s), or None (a stock recording)."""
        return self.f[TICK_T][()] if TICK_T in self.f else None

    def frames(self, t: int) -> list[np.ndarray]:
        """Tick ``t``'s frames of :attr:`cameras` (see :func:`read_frames`)."""
        return read_frames(self.f, self.cameras, t)

    @property
    def attrs(self) -> h5py.AttributeManager:
        """The file's attributes: the stock ones and the episode's meta."""
        return self.f.attrs

    def instruction(self) -> str:
        """The ``instruction`` attribute ("" when there is none)."""
        return _text(self.f.attrs.get(INSTRUCTION_ATTR, ""))

    def inference(self) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """(t s (M,), stage_ms (M, S), stage names), or None when no inference was recorded."""
        if INFERENCE_T not in self.f or not len(self.f[INFERENCE_T]):
            return None
        names = json.loads(self.f[STAGE_MS].attrs.get(STAGE_NAMES_ATTR, "[]"))
        return self.f[INFERENCE_T][()], self.f[STAGE_MS][()], names

    def events(self) -> list[tuple[float, str, str]]:
        """Recorded events as (t s, kind, reason); [] when the file has none."""
        if EVENT_T not in self.f:
            return []
        rows = zip(self.f[EVENT_T][()], self.f[EVENT_KIND][()], self.f[EVENT_REASON][()], strict=True)
        return [(float(t), kind.decode(errors="replace"), reason.decode(errors="replace")) for t, kind, reason in rows]
