"""Camera drivers: one thread per camera keeping its newest frame, and a synchronised read of all.

Usage::

    rig = CameraRig([Camera(n, OpenCVSource(f"/dev/video{i}")) for i, n in enumerate(CAMERA_NAMES)])
    rig.start()                     # open every camera, wait for a first frame from each
    fs = rig.read()                 # FrameSet: fs["cam_high"], fs.ages_s, fs.skew_s, fs.synced
    rig.faults()                    # [] when healthy; "camera cam_high stale: ..." lines otherwise
    rig.reconnect("cam_high")       # reopen one camera after an unplug
    rig.stop()

Units: every frame is **RGB** ``uint8``, shape ``(H, W, 3)`` (OpenCV sources convert from BGR on
capture); timestamps are ``time.monotonic()`` seconds at capture; rates in frames per second.

Sources (each has ``open()``, ``read() -> (rgb, stamp_s) | None`` blocking for the next frame,
``close()``):

* :class:`OpenCVSource` - a V4L2 device (path or index) asked for MJPG 640x480 at 30 fps, verified.
* ``ReplaySource`` (:mod:`vla_edge.firmware_bridge.camera_replay`) - an HDF5 episode or a video file, paced.
* ``SyntheticSource`` (:mod:`vla_edge.firmware_bridge.camera_sim`) - the simulated robot's drawn views.

:class:`CameraRig` owns the :class:`Camera` threads; :meth:`CameraRig.read` returns a
:class:`FrameSet` (one frame per camera, their ages and skew), waiting at most one frame period for
a set within ``max_skew_s``, and raises :class:`CameraFault` (a :class:`~vla_edge.DeviceFault`)
when a camera is stale or gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from vla_edge import DeviceFault

log = logging.getLogger(__name__)

CAMERA_NAMES = ("cam_high", "cam_left_wrist", "cam_right_wrist")


class CameraFault(DeviceFault):
    """A camera cannot be opened, delivers the wrong format, went stale or is gone."""


class FrameSource(Protocol):
    def open(self) -> None: ...

    def read(self) -> tuple[np.ndarray, float] | None:
        """Block until the next frame: ``(rgb uint8 (H, W, 3), capture time.monotonic())``; None: gone."""

    def close(self) -> None: ...


# -- OpenCV (V4L2 devices) ---------------------------------------------------------------------
class OpenCVSource:
    """A V4L2/UVC camera through ``cv2.VideoCapture``; size, fps and fourcc are requested and checked."""

    def __init__(self, device: str | int, width: int = 640, height: int = 480, fps: float = 30.0, fourcc: str = "MJPG"):
        self.device, self.width, self.height, self.fps, self.fourcc = device, width, height, fps, fourcc
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        dev = self.device
        if isinstance(dev, str) and dev.isdigit():
            dev = int(dev)
        if isinstance(dev, str) and dev.startswith("/dev/") and not Path(dev).exists():
            raise CameraFault(f"camera device {dev} not found")
        cap = cv2.VideoCapture(dev, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise CameraFault(f"cannot open camera device {dev}")
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = cap.get(cv2.CAP_PROP_FPS)
        if (w, h) != (self.width, self.height):
            cap.release()
            raise CameraFault(f"camera {dev}: asked {self.width}x{self.height}, got {w}x{h}")
        if fps > 0 and abs(fps - self.fps) > 1.0:
            cap.release()
            raise CameraFault(f"camera {dev}: asked {self.fps:g} fps, got {fps:g}")
        self._cap = cap

    def read(self) -> tuple[np.ndarray, float] | None:
        cap = self._cap
        if cap is None:
            return None
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.monotonic()

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


class FramePacer:
    """Frame clock at ``fps`` with Gaussian jitter (s); :meth:`wait` returns False once closed.

    Paces the sources that have no clock of their own (replay here, the synthetic cameras).
    """

    def __init__(self, fps: float, jitter_s: float, seed: int) -> None:
        self.period = 1.0 / fps
        self.jitter_s = jitter_s
        self._rng = np.random.default_rng(seed)
        self._next = time.monotonic()
        self.closed = threading.Event()

    def wait(self) -> bool:
        self._next += self.period
        now = time.monotonic()
        if now - self._next > 3 * self.period:  # far behind (loaded machine): skip, do not burst
            self._next = now
        j = float(np.clip(self._rng.normal(0.0, self.jitter_s), -3 * self.jitter_s, 3 * self.jitter_s)) if self.jitter_s else 0.0
        return not self.closed.wait(max(0.0, self._next + j - now))


# -- camera threads and the synchronised read -------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One captured image (RGB uint8) with its capture time (``time.monotonic()``) and sequence number."""

    image: np.ndarray
    stamp_s: float
    seq: int


def frame_problem(image, size: tuple[int, int] | None) -> str | None:
    """Why ``image`` is not an RGB ``uint8`` frame of ``size`` ``(width, height)`` pixels (None: any size)."""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if shape is not None and len(shape) == 3 and shape[2] == 3 and dtype == np.uint8 \
            and (size is None or (shape[1], shape[0]) == tuple(size)):
        return None
    if shape is None:
        seen = type(image).__name__
    elif len(shape) == 2:
        seen = f"{shape[1]}x{shape[0]} grey (one channel) {dtype}"
    elif len(shape) == 3:
        seen = f"{shape[1]}x{shape[0]}x{shape[2]} {dtype}"
    else:
        seen = f"shape {tuple(shape)} {dtype}"
    return f"frame is {seen}, expected {f'{size[0]}x{size[1]}' if size else 'WxH'}x3 RGB uint8"


class Camera:
    """One source on its own thread; keeps only the newest :class:`Frame`.

    Every frame is checked at the camera: RGB ``uint8`` of ``size`` ``(width, height)`` pixels (the
    profile's; None: the first frame's). The first that is not (a USB camera that renegotiated, another
    device on its path, a grey frame) is never published: the camera stops and :attr:`wrong_frame` says
    what it saw, what was expected and what to check.
    """

    def __init__(self, name: str, source: FrameSource, fps: float = 30.0, size: tuple[int, int] | None = None) -> None:
        self.name, self.source, self.fps, self.size = name, source, fps, size
        self.error: str | None = None
        self.wrong_frame: str | None = None
        """Set (and the camera stopped) by the first frame of another size or format: the fault's text."""
        self._latest: Frame | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._stamps: list[float] = []
        self.on_frame: Callable[[], None] = lambda: None

    def start(self) -> None:
        try:
            self.source.open()
        except CameraFault as e:
            raise CameraFault(f"camera {self.name}: {e}") from e
        except Exception as e:  # an OpenCV/h5py error while opening is a camera fault too
            raise CameraFault(f"camera {self.name}: cannot open ({e})") from e
        self.error = self.wrong_frame = None
        self._latest = None
        self._stamps = []
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"camera {self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self.source.close()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def reconnect(self) -> None:
        """Close and reopen the source (after an unplug, or to recover from a stall)."""
        self.stop()
        self.start()

    def latest(self) -> Frame | None:
        return self._latest

    @property
    def fps_measured(self) -> float:
        """Frame rate over the last (up to) 30 frames; 0.0 before two frames."""
        s = self._stamps
        return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else 0.0

    def _loop(self) -> None:
        seq = 0
        while self._running:
            try:
                got = self.source.read()
            except Exception as e:  # a driver error ends this camera; reported by the rig
                got = None
                self.error = f"read failed: {e}"
            if got is None:
                if self._running:
                    self.error = self.error or "no frame from the source (device gone?)"
                    log.error("camera %s: %s", self.name, self.error)
                self.on_frame()
                return
            image, stamp = got
            if why := frame_problem(image, self.size or (self._latest and self._latest.image.shape[1::-1])):
                where = getattr(self.source, "device", None)
                check = f"v4l2-ctl -d {where} --get-fmt-video" if where is not None else "the source"
                self.wrong_frame = (f"{why} (a camera that renegotiated, or another device on its path: check "
                                    f"{check} and [cameras] in the robot profile)")
                log.debug("camera %s: %s", self.name, self.wrong_frame)
                self.on_frame()
                return
            seq += 1
            self._latest = Frame(image, stamp, seq)
            self._stamps = (self._stamps + [stamp])[-30:]
            self.on_frame()


@dataclass(frozen=True)
class FrameSet:
    """One frame per camera. ``images[name]`` is RGB uint8 ``(480, 640, 3)``.

    ``stamps_s``: capture times (``time.monotonic()``); ``ages_s``: now minus capture time at read;
    ``skew_s``: newest minus oldest capture time; ``synced``: ``skew_s <= max_skew_s``.
    """

    images: dict[str, np.ndarray]
    stamps_s: dict[str, float]
    ages_s: dict[str, float]
    skew_s: float
    synced: bool

    def __getitem__(self, name: str) -> np.ndarray:
        return self.images[name]


class CameraRig:
    """Several cameras read together.

    ``max_skew_s`` (default half a frame period) is the skew a synchronised set may have;
    ``stale_after_s`` (default two frame periods) the age past which a camera is a fault.
    """

    def __init__(self, cameras: list[Camera], fps: float = 30.0, max_skew_s: float | None = None,
                 stale_after_s: float | None = None, first_frame_timeout_s: float = 2.0) -> None:
        self.cameras = {c.name: c for c in cameras}
        self.period_s = 1.0 / fps
        self.max_skew_s = 0.5 * self.period_s if max_skew_s is None else max_skew_s
        self.stale_after_s = 2.0 * self.period_s if stale_after_s is None else stale_after_s
        self.first_frame_timeout_s = first_frame_timeout_s
        self._cond = threading.Condition()
        for c in cameras:
            c.on_frame = self._notify

    @property
    def names(self) -> list[str]:
        return list(self.cameras)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def start(self) -> None:
        """Open every camera and wait for a first frame from each."""
        started = []
        try:
            for c in self.cameras.values():
                c.start()
                started.append(c)
            deadline = time.monotonic() + self.first_frame_timeout_s
            with self._cond:
                while missing := [c.name for c in started if c.latest() is None and c.error is None
                                  and c.wrong_frame is None]:
                    if time.monotonic() > deadline:
                        raise CameraFault(f"camera {missing[0]}: no frame within {self.first_frame_timeout_s:.1f} s")
                    self._cond.wait(0.05)
            self._check(time.monotonic())
        except BaseException:
            for c in started:
                c.stop()
            raise

    def stop(self) -> None:
        for c in self.cameras.values():
            c.stop()

    def reconnect(self, name: str | None = None) -> None:
        """Reopen one camera (or all): clears a 'gone' fault if the device is back."""
        for c in [self.cameras[name]] if name else self.cameras.values():
            c.reconnect()

    def faults(self) -> list[str]:
        """Stale or gone cameras, one line each."""
        now = time.monotonic()
        out = []
        for c in self.cameras.values():
            f = c.latest()
            if c.wrong_frame:
                out.append(f"camera {c.name}: {c.wrong_frame}")
            elif c.error:
                out.append(f"camera {c.name} gone: {c.error}")
            elif f is None or now - f.stamp_s > self.stale_after_s:
                age = "no frame" if f is None else f"newest frame {(now - f.stamp_s) * 1000:.0f} ms old"
                out.append(f"camera {c.name} stale: {age}")
        return out

    def _check(self, now: float) -> None:
        for c in self.cameras.values():
            if c.wrong_frame:
                raise CameraFault(f"camera {c.name}: {c.wrong_frame}")
            if c.error:
                raise CameraFault(f"camera {c.name} gone: {c.error}")
            f = c.latest()
            if f is None or now - f.stamp_s > self.stale_after_s:
                age = "no frame" if f is None else f"newest frame {(now - f.stamp_s) * 1000:.0f} ms old"
                raise CameraFault(f"camera {c.name} stale: {age} (limit {self.stale_after_s * 1000:.0f} ms)")

    def read(self) -> FrameSet:
        """Newest frame of every camera, waiting at most one period for a set within ``max_skew_s``.

        Raises :class:`CameraFault` if any camera is gone or its newest frame is older than
        ``stale_after_s``. After one period without a synchronised set, returns the newest set
        with ``synced=False``.
        """
        deadline = time.monotonic() + self.period_s
        with self._cond:
            while True:
                now = time.monotonic()
                self._check(now)
                frames = {n: c.latest() for n, c in self.cameras.items()}
                stamps = {n: f.stamp_s for n, f in frames.items()}
                skew = max(stamps.values()) - min(stamps.values())
                if skew <= self.max_skew_s or now >= deadline:
                    return FrameSet(
                        images={n: f.image for n, f in frames.items()},
                        stamps_s=stamps,
                        ages_s={n: now - s for n, s in stamps.items()},
                        skew_s=skew,
                        synced=skew <= self.max_skew_s,
                    )
                self._cond.wait(min(deadline - now, self.period_s))
