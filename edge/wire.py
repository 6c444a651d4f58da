"""The policy server's wire format: one versioned binary message per request and per reply. No dependencies.

A message is a fixed 12-byte head, a UTF-8 JSON header and the raw bytes of its arrays, back to back::

    offset 0   b"VLAW"          magic
           4   u16 version      WIRE_VERSION (little-endian, like every number here)
           6   u8  kind         KIND_REQUEST (1) or KIND_REPLY (2)
           7   u8  0            reserved
           8   u32 header_len   bytes of the JSON header (at most MAX_HEADER_BYTES)
          12   header           {"arrays": [[name, dtype, shape], ...], ...the message's fields}
               payload          each array's bytes in header order (C order; dtype "|u1", "<f4", "<f8", "<i8")

A request (robot -> server) carries the composed image ``image`` (S, S, 3) uint8 RGB (the C++ kernel's
``compose_uint8``: the server normalises it exactly as the local engine does), the state ``state`` (D,)
float64 (rad, grippers m; float64 so that the proprio tokens are those of an in-process step), and the
fields ``seq`` (the robot's step counter), ``bundle`` (the bundle id: the manifest's ``manifest_sha256``),
``instruction`` and ``navigation``. A reply carries ``token_ids`` (int64) and, for a manipulation chunk,
``joints`` (chunk, D) float64, with ``seq`` (echoed), ``base`` (``[direction, value]`` or null),
``decode_calls``, ``timings_ms`` (the engine's stages) and ``server`` (``replica``, ``queue_ms``,
``handle_ms``). Errors are not messages: the server answers with an HTTP status and one line of text.

Usage::

    body = encode_request(seq=7, bundle=bundle_id, instruction="pick up the red cube", navigation=False,
                          image=image_u8, state=qpos)
    req = decode_request(body)            # WireError (one line) on anything malformed
    body = encode_reply(seq=7, token_ids=ids, joints=chunk, base=None, decode_calls=71, timings_ms={...})
    rep = decode_reply(body)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
from vla_edge import VlaEdgeError

MAGIC = b"VLAW"
WIRE_VERSION = 1
KIND_REQUEST, KIND_REPLY = 1, 2
MAX_HEADER_BYTES = 64 * 1024
MAX_INSTRUCTION_CHARS = 2048
CONTENT_TYPE = "application/x-vla-edge"
_HEAD = struct.Struct("<4sHBBI")
_DTYPES = {"|u1": np.dtype(np.uint8), "<f4": np.dtype("<f4"), "<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}
_NAMES = {KIND_REQUEST: "request", KIND_REPLY: "reply"}


class WireError(VlaEdgeError):
    """A message that is not a valid vla-edge message of the expected kind and version (one line)."""


def bundle_id(manifest: dict) -> str:
    """A bundle's id on the wire: its manifest's ``manifest_sha256`` (which covers every file's sha256)."""
    return str(manifest["manifest_sha256"])


def _dtype_name(a: np.ndarray) -> str:
    for name, dt in _DTYPES.items():
        if a.dtype == dt:
            return name
    raise WireError(f"array of dtype {a.dtype} cannot go on the wire (uint8, float32, float64, int64)")


def encode(kind: int, fields: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One message: ``fields`` (JSON values) and ``arrays`` (little-endian, C order) of ``kind``."""
    arrs = [(n, np.ascontiguousarray(a)) for n, a in arrays.items()]
    header = dict(fields, arrays=[[n, _dtype_name(a), list(a.shape)] for n, a in arrs])
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise WireError(f"message header is {len(text)} bytes (at most {MAX_HEADER_BYTES})")
    return b"".join([_HEAD.pack(MAGIC, WIRE_VERSION, kind, 0, len(text)), text,
                     *(memoryview(a).cast("B") for _, a in arrs)])


def decode(data: bytes | bytearray | memoryview, kind: int) -> tuple[dict, dict[str, np.ndarray]]:
    """``(fields, arrays)`` of a message of ``kind``; arrays are read-only views into ``data``."""
    what = _NAMES[kind]
    data = memoryview(data).cast("B")
    if len(data) < _HEAD.size:
        raise WireError(f"{what}: {len(data)} bytes is too short for a vla-edge message")
    magic, version, got_kind, _, hlen = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"{what}: not a vla-edge message (magic {bytes(magic)!r})")
    if version != WIRE_VERSION:
        raise WireError(f"{what}: wire version {version}, this vla-edge speaks version {WIRE_VERSION}")
    if got_kind != kind:
        raise WireError(f"{what}: message kind {got_kind}, expected {kind}")
    if hlen > MAX_HEADER_BYTES or _HEAD.size + hlen > len(data):
        raise WireError(f"{what}: header length {hlen} does not fit the message ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[_HEAD.size:_HEAD.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"{what}: header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise WireError(f"{what}: header must be an object with an 'arrays' list")
    arrays, at = {}, _HEAD.size + hlen
    for spec in header.pop("arrays"):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and spec[1] in _DTYPES
                and isinstance(spec[2], list) and len(spec[2]) <= 4
                and all(type(n) is int and 0 <= n <= 1 << 24 for n in spec[2])):
            raise WireError(f"{what}: bad array entry {str(spec)[:80]} (expected [name, dtype, shape])")
        name, dt, shape = spec[0], _DTYPES[spec[1]], tuple(spec[2])
        n = dt.itemsize * math.prod(shape)
        if at + n > len(data):
            raise WireError(f"{what}: array {name!r} {shape} {spec[1]} runs past the end of the message")
        arrays[name] = np.frombuffer(data, dt, math.prod(shape), at).reshape(shape)
        at += n
    if at != len(data):
        raise WireError(f"{what}: {len(data) - at} bytes after the last array")
    return header, arrays


def _field(h: dict, name: str, types, what: str):
    v = h.get(name)
    if not isinstance(v, types) or (types is int and isinstance(v, bool)):
        raise WireError(f"{what}: field {name!r} missing or of the wrong type ({type(v).__name__})")
    return v


@dataclass
class StepRequest:
    seq: int
    bundle: str
    instruction: str
    navigation: bool
    image: np.ndarray
    """(S, S, 3) uint8 RGB: the composed, resized image (not yet normalised)."""
    state: np.ndarray
    """(D,) float64: rad, grippers m."""


@dataclass
class StepReply:
    seq: int
    token_ids: np.ndarray
    joints: np.ndarray | None
    base: tuple[str, float] | None
    decode_calls: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    server: dict = field(default_factory=dict)


def encode_request(seq: int, bundle: str, instruction: str, navigation: bool, image: np.ndarray,
                   state: np.ndarray) -> bytes:
    return encode(KIND_REQUEST, {"seq": int(seq), "bundle": bundle, "instruction": instruction,
                                 "navigation": bool(navigation)},
                  {"image": np.asarray(image, np.uint8), "state": np.asarray(state, "<f8")})


def decode_request(data) -> StepRequest:
    h, arrays = decode(data, KIND_REQUEST)
    what = "request"
    seq = _field(h, "seq", int, what)
    bundle = _field(h, "bundle", str, what)
    instruction = _field(h, "instruction", str, what)
    navigation = _field(h, "navigation", bool, what)
    if not instruction.strip() or len(instruction) > MAX_INSTRUCTION_CHARS:
        raise WireError(f"{what}: instruction must be 1..{MAX_INSTRUCTION_CHARS} characters")
    image, state = arrays.get("image"), arrays.get("state")
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise WireError(f"{what}: 'image' must be an (S, S, 3) uint8 array")
    if state is None or state.dtype != np.float64 or state.ndim != 1:
        raise WireError(f"{what}: 'state' must be a (D,) float64 array")
    return StepRequest(seq, bundle, instruction, navigation, image, state)


def encode_reply(seq: int, token_ids: np.ndarray, joints: np.ndarray | None, base, decode_calls: int = 0,
                 timings_ms: dict | None = None, server: dict | None = None) -> bytes:
    arrays = {"token_ids": np.asarray(token_ids, "<i8")}
    if joints is not None:
        arrays["joints"] = np.asarray(joints, "<f8")
    fields = {"seq": int(seq), "base": None if base is None else [str(base[0]), float(base[1])],
              "decode_calls": int(decode_calls), "timings_ms": {k: float(v) for k, v in (timings_ms or {}).items()},
              "server": server or {}}
    return encode(KIND_REPLY, fields, arrays)


def decode_reply(data) -> StepReply:
    h, arrays = decode(data, KIND_REPLY)
    what = "reply"
    base = h.get("base")
    if base is not None and not (isinstance(base, list) and len(base) == 2 and isinstance(base[0], str)
                                 and isinstance(base[1], (int, float))):
        raise WireError(f"{what}: 'base' must be null or [direction, value]")
    token_ids = arrays.get("token_ids")
    if token_ids is None or token_ids.dtype != np.int64 or token_ids.ndim != 1:
        raise WireError(f"{what}: 'token_ids' must be a (N,) int64 array")
    joints = arrays.get("joints")
    if joints is not None and (joints.dtype != np.float64 or joints.ndim != 2):
        raise WireError(f"{what}: 'joints' must be a (chunk, D) float64 array")
    timings = h.get("timings_ms") or {}
    if not isinstance(timings, dict):
        raise WireError(f"{what}: 'timings_ms' must be an object")
    return StepReply(_field(h, "seq", int, what), token_ids, joints, None if base is None else (base[0], float(base[1])),
                     int(h.get("decode_calls") or 0), {str(k): float(v) for k, v in timings.items()},
                     h.get("server") if isinstance(h.get("server"), dict) else {})
