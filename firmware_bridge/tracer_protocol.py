"""TRACER base RS232 frames (AgileX TRACER manual v1.2, section 3.4; CONTRACT section 2).

Every frame is 13 bytes::

    5A A5 | 0A | type | id | d0 d1 d2 d3 d4 d5 | counter | checksum

``type`` is 0x55 for a command (computer -> base) and 0xAA for feedback (base -> computer).
``checksum`` is the sum of the 12 bytes before it, modulo 256. Multi-byte fields are big-endian.

The manual's example, 0.15 m/s forward (10 % of 1.5 m/s)::

    >>> motion_command(0.15, 0.0, counter=0).hex(" ")
    '5a a5 0a 55 01 02 00 0a 00 00 00 00 6b'

Pure functions and one small incremental reader; no I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOF = b"\x5a\xa5"
FRAME_LEN = 13
LENGTH_BYTE = 0x0A
TYPE_COMMAND = 0x55
TYPE_FEEDBACK = 0xAA

CMD_MOTION = 0x01
"""Motion command id: data ``[0x02 serial mode, fault_clear, linear %, angular %, 0, 0]``."""
CONTROL_MODE_SERIAL = 0x02

FB_SYSTEM = 0x01
"""System state feedback: ``[vehicle_state, control_mode, battery 0.1 V (u16), fault bits (u16)]``."""
FB_MOTION = 0x02
"""Motion feedback: ``[linear 0.001 m/s (i16), angular 0.001 rad/s (i16), 0, 0]``."""

FULL_SCALE_LINEAR_MPS = 1.5
"""100 % linear command (manual v1.2)."""
FULL_SCALE_ANGULAR_RADPS = 0.7853
"""100 % angular command (manual v1.2)."""

VEHICLE_STATES = {0x00: "normal", 0x01: "e-stop", 0x02: "exception"}
VEHICLE_ESTOP = 0x01
"""Vehicle state of a base in e-stop (its e-stop button, or the remote's)."""

# Fault bits of the system-state frame. The manual lists battery and remote faults; bit 3
# (serial command timeout) is what vla-edge's simulator reports when its 500 ms watchdog stops it.
FAULT_BITS = {
    0: "battery under-voltage fault",
    1: "battery under-voltage warning",
    2: "remote control signal lost",
    3: "serial command timeout (base stopped itself)",
    4: "motor driver 1 fault",
    5: "motor driver 2 fault",
}


class FrameError(ValueError):
    """A frame that is not 13 well-formed bytes with a correct checksum."""


def checksum(body: bytes) -> int:
    """Sum of all bytes modulo 256 (the frame's last byte is this over the 12 before it)."""
    return sum(body) & 0xFF


def build_frame(frame_type: int, frame_id: int, data: bytes, counter: int) -> bytes:
    """One 13-byte frame. ``data`` is exactly 6 bytes; ``counter`` is taken modulo 256."""
    if len(data) != 6:
        raise ValueError(f"TRACER frames carry 6 data bytes, got {len(data)}")
    body = SOF + bytes([LENGTH_BYTE, frame_type, frame_id]) + bytes(data) + bytes([counter & 0xFF])
    return body + bytes([checksum(body)])


@dataclass(frozen=True)
class Frame:
    """A parsed frame: ``type`` (0x55/0xAA), ``id``, 6 ``data`` bytes, ``counter``."""

    type: int
    id: int
    data: bytes
    counter: int


def parse_frame(raw: bytes) -> Frame:
    """Check and split one frame; raises :class:`FrameError` on a bad length, header or checksum."""
    if len(raw) != FRAME_LEN:
        raise FrameError(f"frame is {len(raw)} bytes, expected {FRAME_LEN}")
    if raw[:2] != SOF or raw[2] != LENGTH_BYTE:
        raise FrameError(f"bad header {raw[:3].hex(' ')}")
    if checksum(raw[:12]) != raw[12]:
        raise FrameError(f"bad checksum {raw[12]:#04x}, expected {checksum(raw[:12]):#04x}")
    return Frame(type=raw[3], id=raw[4], data=bytes(raw[5:11]), counter=raw[11])


def _percent(value: float, full_scale: float) -> int:
    return max(-100, min(100, round(value / full_scale * 100.0)))


def motion_command(vx_mps: float, wz_radps: float, counter: int, fault_clear: int = 0) -> bytes:
    """Serial-mode motion command. Speeds become int8 percents of full scale (clipped to +-100 %)."""
    lin = _percent(vx_mps, FULL_SCALE_LINEAR_MPS)
    ang = _percent(wz_radps, FULL_SCALE_ANGULAR_RADPS)
    data = struct.pack(">BBbbBB", CONTROL_MODE_SERIAL, fault_clear & 0xFF, lin, ang, 0, 0)
    return build_frame(TYPE_COMMAND, CMD_MOTION, data, counter)


def decode_motion_command(frame: Frame) -> tuple[float, float, int, int]:
    """``(vx_mps, wz_radps, control_mode, fault_clear)`` of a motion command frame."""
    mode, fault_clear, lin, ang, _, _ = struct.unpack(">BBbbBB", frame.data)
    return (
        lin / 100.0 * FULL_SCALE_LINEAR_MPS,
        ang / 100.0 * FULL_SCALE_ANGULAR_RADPS,
        mode,
        fault_clear,
    )


def motion_feedback(vx_mps: float, wz_radps: float, counter: int) -> bytes:
    """Motion feedback frame: speeds in 0.001 m/s and 0.001 rad/s, int16 big-endian."""
    lin = max(-32768, min(32767, round(vx_mps * 1000.0)))
    ang = max(-32768, min(32767, round(wz_radps * 1000.0)))
    return build_frame(TYPE_FEEDBACK, FB_MOTION, struct.pack(">hhBB", lin, ang, 0, 0), counter)


def decode_motion_feedback(frame: Frame) -> tuple[float, float]:
    """``(vx_mps, wz_radps)`` of a motion feedback frame."""
    lin, ang, _, _ = struct.unpack(">hhBB", frame.data)
    return lin / 1000.0, ang / 1000.0


def system_feedback(vehicle_state: int, control_mode: int, battery_v: float, fault_bits: int, counter: int) -> bytes:
    """System state frame: battery in 0.1 V, fault bits as listed in :data:`FAULT_BITS`."""
    data = struct.pack(">BBHH", vehicle_state, control_mode, round(battery_v * 10.0) & 0xFFFF, fault_bits & 0xFFFF)
    return build_frame(TYPE_FEEDBACK, FB_SYSTEM, data, counter)


def decode_system_feedback(frame: Frame) -> tuple[int, int, float, int]:
    """``(vehicle_state, control_mode, battery_v, fault_bits)`` of a system state frame."""
    state, mode, battery, faults = struct.unpack(">BBHH", frame.data)
    return state, mode, battery / 10.0, faults


def fault_names(fault_bits: int) -> list[str]:
    """Names of the set bits (unknown bits are named by number)."""
    return [FAULT_BITS.get(b, f"fault bit {b}") for b in range(16) if fault_bits >> b & 1]


class FrameReader:
    """Split a byte stream into frames, resynchronising on ``5A A5`` after garbage.

    ``feed(chunk)`` returns the good frames found so far. Bad input is counted, never raised:
    :attr:`bad_frames` (a header with a bad length byte or checksum: its ``5A A5`` is dropped and the
    search for the next one starts inside it), :attr:`skipped_bytes` (bytes outside any frame), and
    :attr:`incidents`: stretches of bad input between two good frames, however many bytes long (one
    stray byte, a garbage burst or a corrupt frame followed by its remains is one incident each).
    :attr:`last_error` describes the latest.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.bad_frames = 0
        self.skipped_bytes = 0
        self.incidents = 0
        self.last_error = ""
        self._in_bad_input = False

    def _bad_input(self, message: str) -> None:
        self.last_error = message
        if not self._in_bad_input:
            self._in_bad_input = True
            self.incidents += 1

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buf += chunk
        frames: list[Frame] = []
        while True:
            start = self._buf.find(SOF)
            if start < 0:
                # Keep a trailing 0x5A: it may be the first half of the next SOF.
                keep = 1 if self._buf.endswith(SOF[:1]) else 0
                self._skip(len(self._buf) - keep)
                return frames
            self._skip(start)
            if len(self._buf) < FRAME_LEN:
                return frames
            try:
                frames.append(parse_frame(bytes(self._buf[:FRAME_LEN])))
                del self._buf[:FRAME_LEN]
                self._in_bad_input = False
            except FrameError as e:
                self.bad_frames += 1
                self._bad_input(str(e))
                del self._buf[:2]  # drop this SOF and look for the next one

    def _skip(self, n: int) -> None:
        if n > 0:
            self.skipped_bytes += n
            self._bad_input(f"skipped {n} bytes outside frames")
            del self._buf[:n]
