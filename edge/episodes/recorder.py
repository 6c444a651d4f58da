"""Episode recording (``vla-edge run --record DIR``): one HDF5 file per episode, written off the tick.

The file's layout (the Cobot Magic stock layout plus vla-edge's ``vla_edge/`` datasets), its keys and
its naming are defined in :mod:`.format`; this module is the writer.

**Off the tick.** :meth:`EpisodeRecorder.record_tick` checks its arguments and hands them to a writer
thread through a bounded queue (``queue_ticks`` rows, 1 s at 30 Hz); it never waits for the disk. The
frames are queued by reference (cameras hand out a new array per frame: do not modify one after).

**Compression** (``compress``): ``"gzip"`` (default) stores each frame as one HDF5 chunk with the
standard deflate filter at level 1, so plain h5py reads ``(N, 480, 640, 3)`` uint8 back with no
plugin. The frames are compressed with :func:`zlib.compress` (which releases the GIL), one camera per
thread of a small pool, and stored with ``write_direct_chunk``: the control thread is never blocked
behind the compressor, and a robot computer with spare cores compresses the cameras in parallel. ``"lzf"``
uses h5py's LZF filter (cheaper per frame on noisy images, ~30 % bigger files, one frame at a time since
h5py serialises its calls, and only h5py reads it), ``False`` stores raw frames (2.8 MB a tick).
HDF5 filters are transparent to readers, so the stock ``compress`` attribute (which means
JPEG-encoded rows to ALOHA-style loaders) stays False; ``attrs["image_filter"]`` names the filter.

**Faults.** A write error (``ENOSPC``, ``EFBIG``, an I/O error) or a full queue (the disk or the
compressor cannot keep up for ``queue_ticks`` rows) makes the recorder *faulted*: that
:meth:`record_tick` and every later one raise :class:`RecorderFault` (one line), which the control
loop turns into a safe stop. No row is dropped silently: a full queue refuses the new row and the
writer still writes every row it accepted; after a write error nothing more is written and the file
keeps every row flushed before it. Rows are written whole or not at all (the row count advances only
after every per-tick dataset holds the row), and :meth:`close` drains the queue, then cuts every
per-tick dataset to the rows written completely: all have the same length on every exit path.

Every dataset is chunked and resizable and the file is written in SWMR mode. The writer takes
whatever is queued (up to ``BATCH_ROWS``), writes it and flushes: one row per flush while it keeps
up, bigger and cheaper batches when it lags. A crash or ``kill -9`` leaves a file holding every row
flushed before it (:attr:`EpisodeRecorder.rows_written`); such a file opens with
``h5py.File(path, "r", swmr=True)`` and :func:`.repair.recover_episode` turns it into an ordinary file.

Usage::

    rec = EpisodeRecorder("episodes/", cameras=["cam_high", "cam_left_wrist", "cam_right_wrist"])
    rec.start_episode({"instruction": "pick up the cup"})   # creates episode_<n>.hdf5
    rec.record_tick(frames, frame_ts, qpos, action, base_action, tick_t)   # per tick, returns at once
    rec.close()                                               # drains the queue; equal row counts
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from vla_edge import VlaEdgeError
from vla_edge.edge.engine import STAGES
from vla_edge.edge.episodes import format as fmt

log = logging.getLogger(__name__)

GZIP_LEVEL = 1
"""deflate level of the image chunks (level 1: ~10x faster than 6 for a few % larger files)."""
QUEUE_TICKS = 30
"""Rows the writer may lag behind the tick (1 s at 30 Hz, at most ~83 MB of raw frames)."""
RESERVE_BYTES = 8_000_000
"""Disk space (and file-size-limit room) kept free: a recording stops before the disk is full."""
BATCH_ROWS = 30
"""At most this many queued items are written per HDF5 flush."""
CLOSE_TIMEOUT_S = 30.0
"""close() waits this long for the queued rows to be written (a hung disk must not hang shutdown)."""
_CLOSE = object()


class RecorderFault(VlaEdgeError):
    """The recording cannot go on (a write error such as a full disk, or a writer that fell behind)."""


class WriterStats:
    """What the writer thread spent: per-row milliseconds (compress + write + flush; ``max_ms``: the
    worst batch's per-row time), and the deepest the queue got."""

    def __init__(self) -> None:
        self.rows = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.max_queued = 0

    def add(self, ms: float, rows: int = 1) -> None:
        """One batch of ``rows`` rows written in ``ms``."""
        self.rows += rows
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms / rows)

    def summary(self) -> dict:
        return {"rows": self.rows, "mean_ms": self.total_ms / self.rows if self.rows else 0.0,
                "max_ms": self.max_ms, "max_queued": self.max_queued}


class EpisodeRecorder:
    """Writes episodes as ``DIRECTORY/episode_<n>.hdf5`` (n continues after the files already there).

    ``compress``: ``"gzip"`` (default; True means the same), ``"lzf"``, or False (raw frames).
    ``queue_ticks``: rows the writer may lag behind before the recorder faults.
    """

    def __init__(
        self,
        directory: str | Path,
        cameras: list[str],
        image_shape: tuple[int, int, int] = (480, 640, 3),
        stage_names: list[str] | tuple[str, ...] = STAGES,
        max_tokens: int = 80,
        compress: bool | str = "gzip",
        queue_ticks: int = QUEUE_TICKS,
    ):
        if compress not in (False, True, "gzip", "lzf"):
            raise VlaEdgeError(f"recorder: compress must be False, True, 'gzip' or 'lzf', got {compress!r}")
        if queue_ticks < 1:
            raise VlaEdgeError(f"recorder: queue_ticks must be >= 1, got {queue_ticks}")
        self.directory = Path(directory)
        self.cameras = list(cameras)
        self.image_shape = tuple(image_shape)
        self.stage_names = list(stage_names)
        self.max_tokens = max_tokens
        self.image_filter = {True: "gzip", "gzip": "gzip", "lzf": "lzf", False: "none"}[compress]
        self.queue_ticks = queue_ticks
        self.path: Path | None = None
        self.n_ticks = 0
        """Ticks accepted by :meth:`record_tick` in this episode."""
        self.rows_written = 0
        """Ticks written completely (every per-tick dataset holds the row)."""
        self.stats = WriterStats()
        self.fault: str | None = None
        self._f: h5py.File | None = None
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._counts = {"inference": 0, "events": 0}
        self._broken = False
        self._abandoned: list[h5py.File] = []  # files HDF5 failed on: never closed (closing may crash)

    # -- episode lifecycle ----------------------------------------------------------------------------
    def start_episode(self, meta: dict | None = None) -> Path:
        """Create the next episode file with every dataset empty and start its writer; return its path."""
        if self._f is not None:
            raise VlaEdgeError("recorder: an episode is already open; close() it first")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = fmt.next_episode_path(self.directory)
            f = h5py.File(path, "w", libver="latest")
        except OSError as e:
            raise RecorderFault(f"recorder: cannot create an episode in {self.directory}: {e}") from e
        try:
            self._create_layout(f, meta or {})
            f.swmr_mode = True  # no new datasets or attributes from here on
            f.flush()
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)
            raise
        self._f, self.path = f, path
        self.n_ticks = self.rows_written = 0
        self._counts = {"inference": 0, "events": 0}
        self.stats, self.fault, self._broken = WriterStats(), None, False
        self._queue = queue.Queue(maxsize=self.queue_ticks)
        self._pool = ThreadPoolExecutor(max_workers=len(self.cameras) or 1, thread_name_prefix="recorder-zlib")
        self._writer = threading.Thread(target=self._write_loop, args=(f, self._queue), name="recorder", daemon=True)
        self._writer.start()
        log.info("recording episode to %s (images: %s)", path, self.image_filter)
        return path

    def _create_layout(self, f: h5py.File, meta: dict) -> None:
        kw = {"gzip": {"compression": "gzip", "compression_opts": GZIP_LEVEL}, "lzf": {"compression": "lzf"}}
        name = self.image_filter if self.image_filter != "gzip" else f"gzip-{GZIP_LEVEL}"
        fmt.create_layout(f, meta, self.cameras, self.image_shape, self.stage_names, self.max_tokens,
                          image_filter=name, image_kw=kw.get(self.image_filter, {}))

    def close(self) -> Path | None:
        """Drain the queue, cut every dataset group to its complete rows, close the file. Safe to call twice.

        Never raises for a write error (the recording already faulted, or faults now: logged); the file
        on disk then holds every row written before the error.
        """
        f, self._f = self._f, None
        if f is None:
            return self.path
        q, writer = self._queue, self._writer
        if writer is not None:
            try:  # the writer keeps taking rows, so this waits at most for the queue to drain
                q.put(_CLOSE, timeout=CLOSE_TIMEOUT_S)
            except queue.Full:
                pass
            writer.join(CLOSE_TIMEOUT_S)
            if writer.is_alive():  # stuck in HDF5: touching the file now would wait on it too
                self._broken = True
                self._set_fault(f"recorder: the writer did not finish within {CLOSE_TIMEOUT_S:.0f} s (disk hung?)")
            self._pool.shutdown(wait=False)
        if self._broken:  # HDF5 failed or hangs mid-write: closing could crash or hang; the file keeps its last flush
            log.error("recorder: %s left as last flushed (open it with swmr=True or recover_episode())", self.path)
            self._abandoned.append(f)
        else:
            try:
                self._trim(f)
                f.flush()
            except Exception as e:
                self._set_fault(f"recorder: closing {self.path}: {_short(e)}")
            finally:
                f.close()
        s = self.stats.summary()
        log.info("episode %s: %d ticks written (writer %.1f ms/row mean, %.1f ms max, %d rows queued at most)%s",
                 self.path, self.rows_written, s["mean_ms"], s["max_ms"], s["max_queued"],
                 f"; {self.fault}" if self.fault else "")
        return self.path

    def _trim(self, f: h5py.File) -> None:
        groups = [(fmt.per_tick_datasets(f), self.rows_written),
                  (fmt.INFERENCE_DATASETS, self._counts["inference"]), (fmt.EVENT_DATASETS, self._counts["events"])]
        for names, n in groups:
            for name in names:
                if f[name].shape[0] != n:
                    f[name].resize(n, axis=0)

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows (any thread; they return at once) -------------------------------------------------------
    def _require_open(self) -> None:
        if self._f is None:
            raise VlaEdgeError("recorder: no episode open; call start_episode() first")

    def record_tick(self, frames: dict, frame_ts: dict, qpos, action, base_action, tick_t: float,
                    clamps: int = 0, qvel=None, effort=None) -> int:
        """Queue one tick for the writer; return the number of ticks accepted in this episode.

        ``frames``: camera -> (H, W, 3) uint8 RGB; ``frame_ts``: camera -> capture time (s);
        ``qpos``/``action`` (14,) rad/m; ``base_action`` (vx m/s, wz rad/s); ``tick_t`` (s).
        Everything is checked here, so a bad call leaves no row. Raises :class:`RecorderFault` once the
        writer has failed or fallen ``queue_ticks`` rows behind.
        """
        self._require_open()
        if self.fault:
            raise RecorderFault(self.fault)
        if set(frames) != set(self.cameras) or set(frame_ts) != set(self.cameras):
            raise VlaEdgeError(f"recorder: need a frame and a timestamp for each of {self.cameras}, "
                               f"got {sorted(frames)} / {sorted(frame_ts)}")
        images = {}
        for cam in self.cameras:
            img = np.asarray(frames[cam])
            if img.shape != self.image_shape or img.dtype != np.uint8:
                raise VlaEdgeError(f"recorder: {cam} frame is {img.shape} {img.dtype}, expected {self.image_shape} uint8")
            images[cam] = img
        rows = fmt.tick_row(frame_ts, qpos, action, base_action, tick_t, clamps, qvel, effort)
        self._put(("tick", images, rows), f"{self.queue_ticks} ticks waiting to be written")
        self.n_ticks += 1
        return self.n_ticks

    def record_inference(self, t: float, stage_ms: dict, token_ids) -> None:
        """Queue one inference: per-stage milliseconds (missing stages NaN) and the generated token ids."""
        self._require_open()
        rows = fmt.inference_row(t, stage_ms, token_ids, self.stage_names, self.max_tokens)
        self._put(("inference", None, rows), "the writer fell behind")

    def record_event(self, t: float, kind: str, reason: str = "") -> None:
        """Queue an event (e.g. an :class:`~vla_edge.edge.estop.latch.EStop` trip); text is truncated to fit.

        Never raises for a faulted recording (events come from e-stop callbacks): the event is dropped.
        """
        self._require_open()
        rows = fmt.event_row(t, kind, reason)
        try:
            self._put(("events", None, rows), "the writer fell behind")
        except RecorderFault as e:  # already reported once, when the recording faulted
            log.debug("recorder: event %s not recorded: %s", kind, e)

    # -- a tick observer (vla_edge.edge.observers): only complete ticks are recorded --------------------------
    def on_tick(self, tick) -> None:
        if len(tick.frames) == len(self.cameras):
            self.record_tick(tick.frames, tick.stamps_s, tick.qpos, tick.action, np.asarray(tick.base, np.float64),
                             tick.t_s, tick.clamps, qvel=tick.qvel, effort=tick.effort)

    def on_chunk(self, index: int, t_s: float, chunk, note: str) -> None:
        self.record_inference(t_s, chunk.timings_ms, chunk.token_ids)

    def on_event(self, index: int, t_s: float, kind: str, reason: str = "") -> None:
        self.record_event(t_s, kind, reason)

    def _put(self, item, full_reason: str) -> None:
        if self.fault:
            raise RecorderFault(self.fault)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._set_fault(f"recording cannot keep up: {full_reason} (disk or compression too slow)")
            raise RecorderFault(self.fault) from None
        self.stats.max_queued = max(self.stats.max_queued, self._queue.qsize())

    def _set_fault(self, message: str) -> None:
        if self.fault is None:
            self.fault = message
            log.error("%s", message)

    # -- the writer thread ----------------------------------------------------------------------------
    def _write_loop(self, f: h5py.File, q: queue.Queue) -> None:
        """Take whatever is queued (up to ``BATCH_ROWS`` items), write it as one batch, flush; repeat.

        A writer that keeps up writes one row per flush; one that falls behind writes bigger batches,
        which cost less per row (fewer HDF5 calls, one flush), so it catches up.
        """
        ds = {name: obj for name, obj in _datasets(f)}
        stopped = closing = False
        while not closing:
            batch = [q.get()]
            while len(batch) < BATCH_ROWS and batch[-1] is not _CLOSE:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _CLOSE:
                closing = True
                batch.pop()
            if stopped or not batch:
                continue  # keep draining so that nobody waits on a full queue; nothing more is written
            t0 = time.perf_counter()
            try:
                ticks = [(images, rows) for kind, images, rows in batch if kind == "tick"]
                chunks = self._compress([images for images, _ in ticks])
                need = sum(len(c) for row in chunks for c in row.values()) or sum(
                    img.nbytes for images, _ in ticks for img in images.values())
                if (problem := self._room_problem(need)) is not None:
                    stopped = True
                    self._set_fault(f"recording stopped after {self.rows_written} rows: {problem}")
                    continue
                self._write_ticks(ds, ticks, chunks)
                for kind in ("inference", "events"):
                    rows = [r for k, _, r in batch if k == kind]
                    if rows:
                        _append(ds, rows, self._counts[kind])
                f.flush()
            except Exception as e:  # EIO, a closed file: HDF5's state is unknown, do not touch the file again
                stopped = self._broken = True
                self._set_fault(f"recording failed after {self.rows_written} rows: {_short(e)}")
                continue
            # Only now, flushed: every per-tick dataset holds these rows.
            self.rows_written += len(ticks)
            for kind in ("inference", "events"):
                self._counts[kind] += sum(1 for k, _, _ in batch if k == kind)
            if ticks:
                self.stats.add((time.perf_counter() - t0) * 1e3, len(ticks))

    def _compress(self, ticks_images: list[dict]) -> list[dict]:
        """Deflate chunks of the frames (``"gzip"`` only) on the pool's threads, without the GIL."""
        if self.image_filter != "gzip" or not ticks_images:
            return []
        jobs = [(i, cam, img) for i, images in enumerate(ticks_images) for cam, img in images.items()]
        chunks = self._pool.map(lambda job: zlib.compress(np.ascontiguousarray(job[2]).data, GZIP_LEVEL), jobs)
        out: list[dict] = [{} for _ in ticks_images]
        for (i, cam, _), chunk in zip(jobs, chunks, strict=True):
            out[i][cam] = chunk
        return out

    def _room_problem(self, need_bytes: int) -> str | None:
        """Why ``need_bytes`` more must not be written now (free space or file-size limit), or None.

        HDF5 does not survive a failed write (measured: h5py 3.16 segfaults in the next flush), so a full
        disk is caught here, ``RESERVE_BYTES`` early, and the file closes as an ordinary file.
        """
        need = need_bytes + RESERVE_BYTES
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        if free < need:
            return f"disk full ({free / 1e6:.1f} MB free in {self.path.parent}, keeping {RESERVE_BYTES / 1e6:.0f} MB)"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit - self.path.stat().st_size < need:
            return f"file size limit reached ({limit / 1e6:.1f} MB, ulimit -f)"
        return None

    def _write_ticks(self, ds: dict, ticks: list, chunks: list[dict]) -> None:
        if not ticks:
            return
        n, k = self.rows_written, len(ticks)
        for cam in self.cameras:
            images = ds[fmt.image_key(cam)]
            images.resize(n + k, axis=0)
            if chunks:
                for i in range(k):
                    images.id.write_direct_chunk((n + i, 0, 0, 0), chunks[i][cam], 0)
            else:
                images[n : n + k] = np.stack([t[0][cam] for t in ticks])
        _append(ds, [rows for _, rows in ticks], n)


def _datasets(f: h5py.File):
    """Every dataset of the file, by path (handles looked up once: lookups cost per call)."""
    out = []
    f.visititems(lambda name, obj: out.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return out


def _append(ds: dict, rows: list[dict], n: int) -> None:
    """Write ``rows`` (each a dataset -> value mapping, same keys) as rows ``n ..`` of those datasets."""
    for name in rows[0]:
        d = ds[name]
        d.resize(n + len(rows), axis=0)
        d[n : n + len(rows)] = np.array([r[name] for r in rows], dtype=d.dtype)


def _short(e: Exception) -> str:
    """One line for a write error: errno name and text when there is one."""
    text = " ".join(str(e).split())
    return text[:200]

