"""A recorded episode or a video file as a camera: :class:`ReplaySource`, a paced
:class:`~vla_edge.firmware_bridge.cameras.FrameSource`.

Usage::

    src = ReplaySource("episodes/episode_0.hdf5", camera="cam_high", fps=30.0)   # or a video file
    rig = CameraRig([Camera("cam_high", src, size=(640, 480))])               # vla_edge.firmware_bridge.cameras

Frames are RGB ``uint8`` ``(height, width, 3)``; the pace is ``fps`` frames per second (``jitter_s``: Gaussian
timing noise, seconds), stamped with ``time.monotonic()`` when delivered.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import h5py
import numpy as np
from vla_edge.firmware_bridge.cameras import CameraFault, FramePacer


class ReplaySource:
    """Replay one camera of a recorded episode, paced at ``fps``.

    ``path`` is an HDF5 episode in the Cobot Magic layout (``observations/images/<camera>``,
    ``(N, 480, 640, 3)`` uint8 RGB; JPEG-encoded rows when the file's ``compress`` attribute is
    true) or any video file OpenCV reads (decoded BGR, converted to RGB). Loops at the end unless
    ``loop=False`` (then the camera is gone).
    """

    def __init__(self, path: str | Path, camera: str = "cam_high", fps: float = 30.0, loop: bool = True,
                 jitter_s: float = 0.0) -> None:
        self.path, self.camera, self.fps, self.loop, self.jitter_s = Path(path), camera, fps, loop, jitter_s
        self._frames: list[np.ndarray] | None = None
        self._cap: cv2.VideoCapture | None = None
        self._i = 0
        self._pacer: FramePacer | None = None

    def open(self) -> None:
        if not self.path.exists():
            raise CameraFault(f"replay file {self.path} not found")
        if self.path.suffix in (".h5", ".hdf5"):
            with h5py.File(self.path, "r") as f:
                key = f"observations/images/{self.camera}"
                if key not in f:
                    raise CameraFault(f"{self.path}: no dataset {key}")
                data = f[key][()]
                compressed = bool(f.attrs.get("compress", False))
            if compressed:
                self._frames = [cv2.cvtColor(cv2.imdecode(row, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for row in data]
            else:
                self._frames = list(data)
        else:
            cap = cv2.VideoCapture(str(self.path))
            if not cap.isOpened():
                raise CameraFault(f"cannot open video {self.path}")
            self._cap = cap
        self._i = 0
        self._pacer = FramePacer(self.fps, self.jitter_s, 0)

    def _next_image(self) -> np.ndarray | None:
        if self._frames is not None:
            if self._i >= len(self._frames):
                if not self.loop or not self._frames:
                    return None
                self._i = 0
            img = self._frames[self._i]
            self._i += 1
            return np.ascontiguousarray(img)
        cap = self._cap
        if cap is None:
            return None
        ok, bgr = cap.read()
        if not ok and self.loop:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = cap.read()
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None

    def read(self) -> tuple[np.ndarray, float] | None:
        if self._pacer is None or not self._pacer.wait():
            return None
        img = self._next_image()
        return None if img is None else (img, time.monotonic())

    def close(self) -> None:
        if self._pacer is not None:
            self._pacer.closed.set()
        if self._cap is not None:
            self._cap.release()
            self._cap = None
