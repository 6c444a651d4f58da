"""``vla-edge view EPISODE.hdf5``: replay a recorded episode to Rerun (the optional ``[view]`` extra).

Usage::

    pip install 'vla-edge[view]'
    vla-edge view episodes/episode_0.hdf5                 # opens the Rerun viewer
    vla-edge view episodes/episode_0.hdf5 --save ep0.rrd  # writes a recording file instead
    vla-edge record ... --view | --view-save rec.rrd      # live, while recording (LiveView)
    vla-edge run ... --view | --view-save run.rrd         # live, while the policy runs (LiveView)

What is logged, on the timelines ``tick`` (control tick index) and ``time`` (seconds since the first tick)::

    cameras/<cam>                      each camera's frame (JPEG-encoded, quality --jpeg-quality)
    model/image                        the composed model input (the layout's tiles, then output x output),
                                       composed by the same C++ kernel as the runtime
    joints/<L|R>_<j1..j6|gripper>/planned    the recorded action (rad, m)
    joints/<L|R>_<j1..j6|gripper>/measured   the recorded qpos (rad, m)
    base/vx_mps, base/wz_radps         the recorded base command
    latency/<stage>_ms                 per-stage inference latency, at each inference (run recordings, run --view)
    chunks                             run --view: each chunk boundary, the tick a new chunk took over (text log)
    events                             e-stop, resume and fault events (text log)

Live (``LiveView``), ``joints/*/planned`` is the target commanded at the tick and ``base/*`` the base
command sent, as ``run --record`` stores them.

``import rerun`` happens only here, only when asked: the runtime never imports it.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, ImageLayout

log = logging.getLogger(__name__)

JOINT_NAMES = [f"{side}_{j}" for side in "LR" for j in ("j1", "j2", "j3", "j4", "j5", "j6", "gripper")]
"""Names of the 14 state/action dimensions, in CONTRACT order."""
STOCK_RATE_HZ = 30.0
"""Tick rate assumed for a recording without tick times (the stock recorder's)."""


class ViewError(VlaEdgeError):
    """An episode that cannot be viewed, or Rerun not installed."""


@dataclass(frozen=True)
class ViewConfig:
    layout: ImageLayout = COBOT_MAGIC_LAYOUT
    jpeg_quality: int = 85
    app_id: str = "vla-edge"


def import_rerun():
    """``rerun``, or a one-line error saying how to install it."""
    try:
        import rerun  # Rerun: the [view] extra, only with --view
    except ImportError:
        raise ViewError("Rerun is not installed: pip install 'vla-edge[view]'") from None
    return rerun


def _jpeg(rr, image_rgb: np.ndarray, quality: int):
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ViewError("JPEG encoding failed")
    return rr.EncodedImage(contents=buf.tobytes(), media_type="image/jpeg")


class TickLogger:
    """Logs one control tick (joints, base, cameras, composed model image) into a recording stream."""

    def __init__(self, rec, cfg: ViewConfig = ViewConfig()):
        self.rr, self.rec, self.cfg = import_rerun(), rec, cfg
        self._composer = None

    def at(self, tick: int, time_s: float) -> None:
        self.rec.set_time("tick", sequence=tick)
        self.rec.set_time("time", duration=time_s)

    def log(self, tick: int, time_s: float, frames: dict, qpos, action, base) -> None:
        rr, rec = self.rr, self.rec
        self.at(tick, time_s)
        for i, name in enumerate(JOINT_NAMES[: len(qpos)]):
            rec.log(f"joints/{name}/measured", rr.Scalars([float(qpos[i])]))
            rec.log(f"joints/{name}/planned", rr.Scalars([float(action[i])]))
        rec.log("base/vx_mps", rr.Scalars([float(base[0])]))
        rec.log("base/wz_radps", rr.Scalars([float(base[1])]))
        for cam, img in frames.items():
            rec.log(f"cameras/{cam}", _jpeg(rr, img, self.cfg.jpeg_quality))
        if all(c in frames for c in self.cfg.layout.cameras):
            tiles = [np.ascontiguousarray(frames[c]) for c in self.cfg.layout.cameras]
            if self._composer is None or self._composer.frame_shapes != [t.shape[:2] for t in tiles]:
                self._composer = kernels.Composer(self.cfg.layout, [t.shape[:2] for t in tiles])
            rec.log("model/image", rr.Image(np.asarray(self._composer.compose_uint8(tiles))))

    def inference(self, tick: int, time_s: float, timings_ms: dict, text: str) -> None:
        """One policy step's stage latencies and the chunk boundary it makes, at the tick it took over."""
        self.at(tick, time_s)
        for name, ms in timings_ms.items():
            if np.isfinite(ms):
                self.rec.log(f"latency/{name}_ms", self.rr.Scalars([float(ms)]))
        self.rec.log("chunks", self.rr.TextLog(text, level="INFO"))

    def event(self, tick: int, time_s: float, kind: str, reason: str = "") -> None:
        self.at(tick, time_s)
        text = kind + (f": {reason}" if reason else "")
        self.rec.log("events", self.rr.TextLog(text, level="INFO" if kind in ("resume", "episode") else "WARN"))


def log_episode(rec, path: Path, cfg: ViewConfig = ViewConfig()) -> int:
    """Log episode ``path`` into the Rerun recording stream ``rec``; returns the number of ticks."""
    from vla_edge.edge.episodes.format import EpisodeFormatError, EpisodeReader  # h5py: only when reading

    rr = import_rerun()
    try:
        reader = EpisodeReader(path)  # every camera in the file
    except EpisodeFormatError as e:
        raise ViewError(str(e)) from None
    with reader:
        qpos, action = reader.qpos(), reader.action()
        n = len(qpos)
        tick_t = reader.tick_t_s()
        tick_t = np.arange(n) / STOCK_RATE_HZ if tick_t is None else tick_t
        t0 = float(tick_t[0]) if n else 0.0
        base = reader.base_action()
        base = np.zeros((n, 2)) if base is None else base
        logger = TickLogger(rec, cfg)
        for k in range(n):
            frames = dict(zip(reader.cameras, reader.frames(k), strict=True))
            logger.log(k, float(tick_t[k]) - t0, frames, qpos[k], action[k], base[k])
        _log_timed(rec, rr, reader, tick_t, t0)
    return n


class LiveView:
    """Streams ticks to Rerun from a thread of its own: :meth:`on_tick` never blocks the control thread
    (when the logger is behind, the tick is dropped and counted in ``dropped``)."""

    def __init__(self, save: str | Path | None = None, cfg: ViewConfig = ViewConfig()):
        rr = import_rerun()
        self.rec = rr.RecordingStream(cfg.app_id)
        self.rec.save(str(save)) if save is not None else self.rec.spawn()
        self.logger = TickLogger(self.rec, cfg)
        self.dropped = 0
        self._q: queue.Queue = queue.Queue()  # unbounded: events always go in; ticks only when it is short
        self._t0: float | None = None
        self._thread = threading.Thread(target=self._run, name="rerun-view", daemon=True)
        self._thread.start()

    def _time(self, t: float) -> float:
        if self._t0 is None:
            self._t0 = t
        return t - self._t0

    # -- a tick observer (vla_edge.edge.observers) -------------------------------------------------------
    def on_tick(self, tick) -> None:
        """Queued unless the logger is behind (then dropped and counted)."""
        if self._q.qsize() >= 2:
            self.dropped += 1
            return
        copies = {c: np.array(img) for c, img in tick.frames.items()}  # camera buffers may be reused
        self._q.put(("tick", (tick.index, self._time(tick.t_s), copies, np.array(tick.qpos), np.array(tick.action),
                              tuple(tick.base))))

    def on_event(self, index: int, t_s: float, kind: str, reason: str = "") -> None:
        self._q.put(("event", (index, self._time(t_s), kind, reason)))

    def on_chunk(self, index: int, t_s: float, chunk, note: str) -> None:
        """A few scalars and a line, a few times a second: never dropped, like events."""
        self._q.put(("inference", (index, self._time(t_s), dict(chunk.timings_ms), note)))

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            kind, args = item
            try:
                getattr(self.logger, "log" if kind == "tick" else kind)(*args)
            except Exception as e:  # a viewer problem must never reach the robot
                log.warning("view: %s", e)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10.0)
        self.rec.flush()
        if self.dropped:
            log.info("view: %d ticks not shown (the logger was behind)", self.dropped)


def _log_timed(rec, rr, reader, tick_t: np.ndarray, t0: float) -> None:
    """Inference latencies and events of ``reader`` (an :class:`~.format.EpisodeReader`), each at the tick
    it happened in."""

    def at(t: float) -> None:
        rec.set_time("tick", sequence=int(max(0, np.searchsorted(tick_t, t, side="right") - 1)))
        rec.set_time("time", duration=float(t) - t0)

    if (inference := reader.inference()) is not None:
        times, stage_ms, names = inference
        for t, row in zip(times, stage_ms, strict=True):
            at(t)
            for name, ms in zip(names, row, strict=True):
                if np.isfinite(ms):
                    rec.log(f"latency/{name}_ms", rr.Scalars([float(ms)]))
    for t, kind, reason in reader.events():
        at(t)
        text = kind + (f": {reason}" if reason else "")
        rec.log("events", rr.TextLog(text, level="WARN" if kind != "resume" else "INFO"))


def view(path: str | Path, save: str | Path | None = None, cfg: ViewConfig = ViewConfig()) -> int:
    """Replay ``path`` to a new Rerun viewer, or into the file ``save``; returns the tick count."""
    rr = import_rerun()
    path = Path(path)
    if not path.is_file():
        raise ViewError(f"{path}: no such episode file")
    rec = rr.RecordingStream(cfg.app_id, recording_id=path.stem)
    if save is not None:
        rec.save(str(save))
    else:
        rec.spawn()
    n = log_episode(rec, path, cfg)
    rec.flush()
    return n
