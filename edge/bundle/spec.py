"""The facts of CONTRACT.md as data: token layout, image layout, policy statistics.

Everything here is carried in a bundle's ``manifest.json`` (see :mod:`vla_edge.edge.bundle.manifest`), so a
different checkpoint can override it; the module-level constants are the defaults for the real
LLaVA-VLA 0.5B model and the Cobot Magic. Python + numpy (bin count and direction order come from
the C++ codecs in :mod:`vla_edge.kernels`): safe to import on the robot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from vla_edge.firmware_bridge.piper_arm import PIPER_JOINT_HI, PIPER_JOINT_LO  # Cobot Magic limits, per arm
from vla_edge.kernels import DIRECTIONS, N_BINS  # the codecs' own facts: one source of truth

BIN_KINDS = ("uniform", "norm")
"""``uniform``: ``linspace(-1, 1, 256)`` (LLaVA-VLA's default). ``norm``: the reference's fixed
non-uniform table (``use_norm_bins``, CONTRACT section 1b), dense around 0."""


def bin_edges(kind: str = "uniform", n_bins: int = N_BINS) -> np.ndarray:
    """The ``n_bins`` ascending bin edges (float64) of a :data:`BIN_KINDS` kind; centres are midpoints."""
    if kind == "uniform":
        return np.linspace(-1.0, 1.0, n_bins)
    if kind == "norm":
        if n_bins != N_BINS:
            raise ValueError(f"the norm bin table has {N_BINS} edges, not {n_bins}")
        parts = [(-1.0, -0.5, 15), (-0.5, -0.25, 40), (-0.25, -0.1, 42), (-0.1, 0.1, 62), (0.1, 0.25, 42),
                 (0.25, 0.5, 40)]
        return np.concatenate([np.linspace(a, b, n, endpoint=False) for a, b, n in parts]
                              + [np.linspace(0.5, 1.0, 15, endpoint=True)])
    raise ValueError(f"unknown bin kind {kind!r} (expected one of {', '.join(BIN_KINDS)})")



@dataclass(frozen=True)
class TokenSpec:
    """Token ids of one model. ``vocab_base`` is V: bins occupy ids ``V-256 .. V-1``; ``bins`` names
    their edges (:func:`bin_edges`).

    The decoder's output head is cut to :attr:`head_ids`, in this order:
    index ``j`` in ``0..255`` is token ``V - 256 + j`` (ascending ids, so *descending* values),
    index 256 is ``<|im_end|>``, indices 257..260 are the directions in :data:`DIRECTIONS` order.
    """

    vocab_base: int
    endoftext: int
    im_start: int
    im_end: int
    newline: int
    navigation: int
    directions: dict[str, int]
    embedding_rows: int
    n_bins: int = N_BINS
    bins: str = "uniform"  # BIN_KINDS: which edges the checkpoint was trained with

    @property
    def bin_edges(self) -> np.ndarray:
        """The bin edges (float64, ascending) shared by action and proprio tokens."""
        return bin_edges(self.bins, self.n_bins)

    @property
    def head_ids(self) -> np.ndarray:
        """Token id of each row of the cut output head (int64)."""
        bins = np.arange(self.vocab_base - self.n_bins, self.vocab_base, dtype=np.int64)
        rest = [self.im_end] + [self.directions[d] for d in DIRECTIONS]
        return np.concatenate([bins, np.asarray(rest, dtype=np.int64)])

    @property
    def head_im_end(self) -> int:
        """Index of ``<|im_end|>`` in the cut head."""
        return self.n_bins

    @property
    def head_directions(self) -> dict[str, int]:
        """Index of each direction token in the cut head."""
        return {d: self.n_bins + 1 + k for k, d in enumerate(DIRECTIONS)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenSpec:
        return cls(**{**d, "directions": dict(d["directions"])})


# LLaVA-VLA 0.5B (Qwen2 tokenizer). Navigation rows: vla-edge defines them in embedding rows no
# tokenizer token claims (the tokenizer ends at 151646 with LLaVA's <image>; the table has 151936).
QWEN2_TOKENS = TokenSpec(
    vocab_base=151643,
    endoftext=151643,
    im_start=151644,
    im_end=151645,
    newline=198,
    navigation=151930,
    directions={"forward": 151931, "turn_left": 151932, "turn_right": 151933, "stop": 151934},
    embedding_rows=151936,
)

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence robot. "
    "The robot provides actions to follow out the user's instructions."
)


RESIZE_ORDERS = ("pillow13", "pillow-pre13")
"""The orders of PIL's two resize passes a layout can name (:attr:`ImageLayout.resize_order`)."""


@dataclass(frozen=True)
class Tile:
    """One camera view placed on the canvas: resized (``ImageLayout.tile_filter``) to w x h pixels at (x, y)."""

    camera: str
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class ImageLayout:
    """How camera views become the model's one image (CONTRACT section 1, image composition).

    Each tile's view is resized to its w x h with ``tile_filter`` and pasted on a black canvas of
    ``canvas_w x canvas_h``; the canvas is resized to ``output x output`` with ``output_filter``;
    pixels become ``(px/255 - 0.5) / 0.5``, RGB, NCHW. Filters are PIL names: lanczos, bicubic,
    bilinear, nearest. ``resize_order``: the order of PIL's two resize passes, as the Pillow that made the
    training images had it: ``"pillow13"`` (Pillow >= 13: the vertical pass first when the height shrinks by
    more than twice as many pixels as the width) or ``"pillow-pre13"`` (horizontal first, always: the
    LLaVA-VLA reference's era). The two differ by up to 13 levels on CALVIN's static view (CONTRACT 1c).
    """

    tiles: tuple[Tile, ...]
    canvas_w: int
    canvas_h: int
    output: int = 384
    tile_filter: str = "lanczos"
    output_filter: str = "bicubic"
    resize_order: str = "pillow13"

    @property
    def cameras(self) -> list[str]:
        return [t.camera for t in self.tiles]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageLayout:
        return cls(**{**d, "tiles": tuple(Tile(**t) for t in d["tiles"])})


# The reference two-view layout of LLaVA-VLA on CALVIN: 334x167 tiles stacked into 334x334.
CALVIN_LAYOUT = ImageLayout(
    tiles=(Tile("rgb_static", 0, 0, 334, 167), Tile("rgb_gripper", 0, 167, 334, 167)),
    canvas_w=334,
    canvas_h=334,
)

# vla-edge's Cobot Magic layout: the front camera across the top half, the wrists side by side below.
COBOT_MAGIC_LAYOUT = ImageLayout(
    tiles=(
        Tile("cam_high", 0, 0, 336, 168),
        Tile("cam_left_wrist", 0, 168, 168, 168),
        Tile("cam_right_wrist", 168, 168, 168, 168),
    ),
    canvas_w=336,
    canvas_h=336,
)


ACTION_ENCODINGS = ("raw", "bounds", "sigma3")
"""How training turned an action into the value in [-1, 1] it binned (CONTRACT section 1c), so how a bin
centre ``x`` decodes, with ``lo``/``hi`` the statistics' ``act_min_bound``/``act_max_bound``:

* ``raw``: ``a = x``. The reference trainer's default (``encode_actions(statistics=None)``: the data's
  floats are clipped to [-1, 1] and binned as they are); its Qwen server and CALVIN client decode so.
* ``bounds``: ``a = (x + 1) / 2 * (hi - lo) + lo`` (the reference's ``denormalize_actions``, for data
  normalised min-max: ``vla-edge convert`` writes its data so).
* ``sigma3``: ``a = 3 x std + mean`` (the reference's ``denormalize_actions_real``), where, as the reference
  reads its file, **std is ``act_min_bound`` and mean is ``act_max_bound``**.
"""


@dataclass(frozen=True)
class PolicySpec:
    """Action/proprio shapes and normalisation statistics (CONTRACT section 1).

    ``action_lo``/``action_hi``: the statistics file's ``act_min_bound``/``act_max_bound`` as given
    (radians for joints, metres for grippers), read according to ``actions`` (:data:`ACTION_ENCODINGS`; a
    manifest without the field is ``bounds``); :meth:`action_bounds` is the decoding the runtime applies.
    ``proprio_mean``/``proprio_std``: z-score statistics of the model's state vector, ``state_dim`` values:
    the robot's state followed by ``state_pad`` (constants the training data appended: ``vla-edge convert``
    pads the Cobot Magic's 14 values with one 0.0 to the 15 the reference trainer asserts).
    ``d_max_m``/``theta_max_deg``: the navigation VALUE token's full scale.
    """

    chunk_size: int
    action_dim: int
    state_dim: int
    action_lo: list[float]
    action_hi: list[float]
    proprio_mean: list[float]
    proprio_std: list[float]
    d_max_m: float = 1.0
    theta_max_deg: float = 90.0
    actions: str = "bounds"
    state_pad: tuple[float, ...] = ()

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    @property
    def robot_state_dim(self) -> int:
        """Values of the robot's own state (what the loop passes): ``state_dim`` less the padding."""
        return self.state_dim - len(self.state_pad)

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` (float64, one per action dimension) with which ``a = (x + 1) / 2 * (hi - lo) + lo``
        decodes a bin centre ``x`` under :attr:`actions` (the form ``kernels.detokenize_actions`` takes):
        raw ``(-1, 1)``; bounds ``(action_lo, action_hi)``; sigma3 ``mean -/+ 3 std`` with std =
        ``action_lo`` and mean = ``action_hi`` (the reference's field swap). Equal to the reference's
        decodings to float rounding (a few ulp)."""
        lo, hi = np.asarray(self.action_lo, np.float64), np.asarray(self.action_hi, np.float64)
        if self.actions == "raw":
            return np.full(self.action_dim, -1.0), np.full(self.action_dim, 1.0)
        if self.actions == "sigma3":
            return hi - 3.0 * lo, hi + 3.0 * lo
        if self.actions == "bounds":
            return lo, hi
        raise ValueError(f"unknown action encoding {self.actions!r} (expected one of {', '.join(ACTION_ENCODINGS)})")

    def model_state(self, state) -> np.ndarray:
        """The robot's state (``robot_state_dim`` values) followed by ``state_pad``: what the model's proprio
        tokens encode (float64). Raises ValueError on another width."""
        s = np.asarray(state, np.float64)
        if s.shape != (self.robot_state_dim,):
            raise ValueError(f"state has shape {s.shape}, expected ({self.robot_state_dim},)")
        return np.concatenate([s, np.asarray(self.state_pad, np.float64)]) if self.state_pad else s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state_pad"] = list(self.state_pad)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        return cls(**{**d, "state_pad": tuple(d.get("state_pad", ()))})




def cobot_magic_policy(**overrides) -> PolicySpec:
    """Default 14-dim bimanual policy spec: action bounds = the published joint limits."""
    lo = PIPER_JOINT_LO * 2
    hi = PIPER_JOINT_HI * 2
    base = dict(
        chunk_size=5,
        action_dim=14,
        state_dim=14,
        action_lo=lo,
        action_hi=hi,
        proprio_mean=[(a + b) / 2 for a, b in zip(lo, hi, strict=True)],
        proprio_std=[(b - a) / 4 for a, b in zip(lo, hi, strict=True)],
    )
    base.update(overrides)
    return PolicySpec(**base)
