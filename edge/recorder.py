"""Episode recording (``vla-edge run --record DIR``): one HDF5 file per episode, crash-safe.

The file has the Cobot Magic stock layout (CONTRACT section 2), so existing loaders read it::

    observations/images/<cam>   (N, H, W, 3) uint8      one dataset per camera
    observations/qpos           (N, 14) float32         measured joints (rad) and grippers (m)
    observations/qvel|effort    (N, 14) float32         NaN where the caller did not measure them
    action                      (N, 14) float32         joint targets sent (after the safety filter)
    base_action                 (N, 2)  float32         [vx m/s, wz rad/s] sent
    attrs: sim=False, compress, plus the episode's meta (instruction, bundle, robot, ...)

and vla-edge's own datasets under ``vla_edge/``::

    vla_edge/tick_t                (N,) float64          monotonic start time of each tick (s)
    vla_edge/clamps                (N,) int32            safety clamps in that tick
    vla_edge/frame_ts/<cam>        (N,) float64          capture time of the frame used (s)
    vla_edge/inference/t           (M,) float64          one row per inference
    vla_edge/inference/stage_ms    (M, S) float32        attr stage_names
    vla_edge/inference/token_ids   (M, max_tokens) int32 generated ids, padded with -1
    vla_edge/inference/n_tokens    (M,) int32
    vla_edge/events/t|kind|reason  (K,) float64 | S16 | S128   e-stop and other events

Every dataset is chunked and resizable and the file is written in SWMR mode, flushed after each
tick: a crash or ``kill -9`` leaves a file holding every completed tick. Such a file opens with
``h5py.File(path, "r", swmr=True)``; :func:`recover_episode` turns it into an ordinary file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
from vla_edge.edge.engine import STAGES
from vla_edge.edge.errors import VlaEdgeError

log = logging.getLogger(__name__)

KIND_BYTES = 16
REASON_BYTES = 128
_ROWS_PER_CHUNK = 256  # small per-tick datasets: rows per HDF5 chunk
_EPISODE_RE = re.compile(r"episode_(\d+)\.hdf5$")


def per_tick_datasets(f: h5py.File) -> list[str]:
    """Names of the datasets that get one row per tick (all must have the same length)."""
    names = ["observations/qpos", "observations/qvel", "observations/effort", "action", "base_action",
             "vla_edge/tick_t", "vla_edge/clamps"]
    names += [f"observations/images/{c}" for c in f["observations/images"]]
    names += [f"vla_edge/frame_ts/{c}" for c in f["vla_edge/frame_ts"]]
    return names


class EpisodeRecorder:
    """Writes episodes as ``DIRECTORY/episode_<n>.hdf5`` (n continues after the files already there).

    ``compress``: False (default, raw uint8 images), True or ``"gzip"`` (gzip level 1), or ``"lzf"``.
    """

    def __init__(
        self,
        directory: str | Path,
        cameras: list[str],
        image_shape: tuple[int, int, int] = (480, 640, 3),
        stage_names: list[str] | tuple[str, ...] = STAGES,
        max_tokens: int = 80,
        compress: bool | str = False,
    ):
        if compress not in (False, True, "gzip", "lzf"):
            raise VlaEdgeError(f"recorder: compress must be False, True, 'gzip' or 'lzf', got {compress!r}")
        self.directory = Path(directory)
        self.cameras = list(cameras)
        self.image_shape = tuple(image_shape)
        self.stage_names = list(stage_names)
        self.max_tokens = max_tokens
        self.compress = compress
        self.path: Path | None = None
        self.n_ticks = 0
        self._f: h5py.File | None = None

    # -- episode lifecycle ----------------------------------------------------------------------------
    def _next_path(self) -> Path:
        taken = [int(m.group(1)) for p in self.directory.glob("episode_*.hdf5") if (m := _EPISODE_RE.search(p.name))]
        return self.directory / f"episode_{max(taken, default=-1) + 1}.hdf5"

    def start_episode(self, meta: dict | None = None) -> Path:
        """Create the next episode file with every dataset empty; return its path."""
        if self._f is not None:
            raise VlaEdgeError("recorder: an episode is already open; close() it first")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._next_path()
        f = h5py.File(path, "w", libver="latest")
        try:
            self._create_layout(f, meta or {})
            f.swmr_mode = True  # no new datasets or attributes from here on
            f.flush()
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise
        self._f, self.path, self.n_ticks = f, path, 0
        log.info("recording episode to %s", path)
        return path

    def _create_layout(self, f: h5py.File, meta: dict) -> None:
        f.attrs["sim"] = False
        f.attrs["compress"] = bool(self.compress)
        for key, value in meta.items():
            f.attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
        f.attrs["cameras"] = json.dumps(self.cameras)

        def grow(name, row_shape, dtype, rows_per_chunk=_ROWS_PER_CHUNK, **kw):
            return f.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                                    chunks=(rows_per_chunk, *row_shape), **kw)

        image_kw = {}
        if self.compress in (True, "gzip"):
            image_kw = {"compression": "gzip", "compression_opts": 1}
        elif self.compress == "lzf":
            image_kw = {"compression": "lzf"}
        for cam in self.cameras:
            grow(f"observations/images/{cam}", self.image_shape, np.uint8, rows_per_chunk=1, **image_kw)
            grow(f"vla_edge/frame_ts/{cam}", (), np.float64)
        for name in ("observations/qpos", "observations/qvel", "observations/effort", "action"):
            grow(name, (14,), np.float32)
        grow("base_action", (2,), np.float32)
        grow("vla_edge/tick_t", (), np.float64)
        grow("vla_edge/clamps", (), np.int32)
        grow("vla_edge/inference/t", (), np.float64, rows_per_chunk=64)
        grow("vla_edge/inference/stage_ms", (len(self.stage_names),), np.float32, rows_per_chunk=64)
        f["vla_edge/inference/stage_ms"].attrs["stage_names"] = json.dumps(self.stage_names)
        grow("vla_edge/inference/token_ids", (self.max_tokens,), np.int32, rows_per_chunk=64)
        grow("vla_edge/inference/n_tokens", (), np.int32, rows_per_chunk=64)
        grow("vla_edge/events/t", (), np.float64, rows_per_chunk=64)
        grow("vla_edge/events/kind", (), f"S{KIND_BYTES}", rows_per_chunk=64)
        grow("vla_edge/events/reason", (), f"S{REASON_BYTES}", rows_per_chunk=64)

    def close(self) -> Path | None:
        """Finish the episode (the file is then an ordinary HDF5 file). Safe to call twice."""
        f, self._f = self._f, None
        if f is not None:
            f.flush()
            f.close()
            log.info("episode %s: %d ticks", self.path, self.n_ticks)
        return self.path

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows -----------------------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._f is None:
            raise VlaEdgeError("recorder: no episode open; call start_episode() first")
        return self._f

    @staticmethod
    def _append(ds: h5py.Dataset, row) -> None:
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = row

    def record_tick(self, frames: dict, frame_ts: dict, qpos, action, base_action, tick_t: float,
                    clamps: int = 0, qvel=None, effort=None) -> int:
        """Append one tick and flush it to disk; return the number of ticks recorded.

        ``frames``: camera -> (H, W, 3) uint8 RGB; ``frame_ts``: camera -> capture time (s);
        ``qpos``/``action`` (14,) rad/m; ``base_action`` (vx m/s, wz rad/s); ``tick_t`` (s).
        Everything is checked before anything is written, so a bad call leaves no partial row.
        """
        f = self._file()
        if set(frames) != set(self.cameras) or set(frame_ts) != set(self.cameras):
            raise VlaEdgeError(f"recorder: need a frame and a timestamp for each of {self.cameras}, "
                               f"got {sorted(frames)} / {sorted(frame_ts)}")
        images = {}
        for cam in self.cameras:
            img = np.asarray(frames[cam])
            if img.shape != self.image_shape or img.dtype != np.uint8:
                raise VlaEdgeError(f"recorder: {cam} frame is {img.shape} {img.dtype}, expected {self.image_shape} uint8")
            images[cam] = img
        rows = {
            "observations/qpos": qpos,
            "observations/qvel": np.full(14, np.nan) if qvel is None else qvel,
            "observations/effort": np.full(14, np.nan) if effort is None else effort,
            "action": action,
            "base_action": base_action,
        }
        for name, value in rows.items():
            rows[name] = np.asarray(value, dtype=np.float32)
            if rows[name].shape != f[name].shape[1:]:
                raise VlaEdgeError(f"recorder: {name} has shape {rows[name].shape}, expected {f[name].shape[1:]}")

        for cam in self.cameras:
            self._append(f[f"observations/images/{cam}"], images[cam])
            self._append(f[f"vla_edge/frame_ts/{cam}"], float(frame_ts[cam]))
        for name, value in rows.items():
            self._append(f[name], value)
        self._append(f["vla_edge/clamps"], int(clamps))
        self._append(f["vla_edge/tick_t"], float(tick_t))
        f.flush()
        self.n_ticks += 1
        return self.n_ticks

    def record_inference(self, t: float, stage_ms: dict, token_ids) -> None:
        """Append one inference: per-stage milliseconds (missing stages NaN) and the generated token ids."""
        f = self._file()
        ids = np.asarray(token_ids, dtype=np.int64).ravel()
        if ids.size > self.max_tokens:
            log.warning("recorder: %d tokens, keeping the first %d", ids.size, self.max_tokens)
            ids = ids[: self.max_tokens]
        padded = np.full(self.max_tokens, -1, dtype=np.int32)
        padded[: ids.size] = ids
        unknown = set(stage_ms) - set(self.stage_names)
        if unknown:
            raise VlaEdgeError(f"recorder: unknown stage(s) {sorted(unknown)}; known: {self.stage_names}")
        stages = np.array([stage_ms.get(s, np.nan) for s in self.stage_names], dtype=np.float32)
        self._append(f["vla_edge/inference/stage_ms"], stages)
        self._append(f["vla_edge/inference/token_ids"], padded)
        self._append(f["vla_edge/inference/n_tokens"], ids.size)
        self._append(f["vla_edge/inference/t"], float(t))
        f.flush()

    def record_event(self, t: float, kind: str, reason: str = "") -> None:
        """Append an event (e.g. an :class:`~vla_edge.edge.estop.EStop` event); text is truncated to fit."""
        f = self._file()
        self._append(f["vla_edge/events/kind"], kind.encode()[:KIND_BYTES])
        self._append(f["vla_edge/events/reason"], reason.encode()[:REASON_BYTES])
        self._append(f["vla_edge/events/t"], float(t))
        f.flush()


def recover_episode(path: str | Path) -> int:
    """Turn the file of an interrupted recording into an ordinary HDF5 file; return its tick count.

    Per-tick datasets are cut to the shortest one (a kill during a tick's writes may leave some a row
    ahead); the file is rewritten next to the original and renamed over it.
    """
    path = Path(path)
    tmp = path.with_suffix(".recovering.hdf5")
    with h5py.File(path, "r", swmr=True) as src:
        per_tick = per_tick_datasets(src)
        n = min(src[name].shape[0] for name in per_tick)
        with h5py.File(tmp, "w") as dst:
            dst.attrs.update(src.attrs)

            def copy(name, obj):
                if isinstance(obj, h5py.Group):
                    dst.require_group(name).attrs.update(obj.attrs)
                    return
                rows = n if name in per_tick else obj.shape[0]
                ds = dst.create_dataset(name, shape=(rows, *obj.shape[1:]), maxshape=obj.maxshape, dtype=obj.dtype,
                                        chunks=obj.chunks, compression=obj.compression,
                                        compression_opts=obj.compression_opts)
                for start in range(0, rows, 64):  # bounded memory for long image datasets
                    ds[start : start + 64] = obj[start : min(start + 64, rows)]
                ds.attrs.update(obj.attrs)

            src.visititems(copy)
    os.replace(tmp, path)
    return n
