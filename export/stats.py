"""Normalisation statistics as LLaVA-VLA's dataset writes them: ``statistics.yaml``.

Usage::

    stats = read_statistics(Path("statistics.yaml"))   # DatasetStats
    policy = stats.policy(chunk_size=5)                # a PolicySpec with these bounds and moments

The file (CONTRACT section 1b)::

    act_min_bound: [a_0, ..., a_{D-1}]     # per action dimension (rad, m): tiled over the chunk
    act_max_bound: [b_0, ..., b_{D-1}]
    robot_obs:
      - mean: [m_0, ..., m_{S-1}]          # per state dimension
        std:  [s_0, ..., s_{S-1}]

A ``vla_edge.json`` beside it (``vla-edge convert`` writes one) may add ``policy`` fields
(``chunk_size``, ``action_dim``, ``state_dim``, ``state_pad``, ``d_max_m``, ``theta_max_deg``), the
``image_layout`` the data was composed with and ``actions``, how the data's actions were encoded
(``raw``, ``bounds`` or ``sigma3``: :data:`~vla_edge.edge.bundle.spec.ACTION_ENCODINGS`); its dimensions
must agree with the statistics. Under ``sigma3`` the bounds hold std (min) and mean (max), as the reference
reads them, so ``act_min_bound <= act_max_bound`` is checked only for ``bounds``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import ACTION_ENCODINGS, ImageLayout, PolicySpec


class StatsError(VlaEdgeError):
    """statistics.yaml is missing, unreadable, or its lengths do not fit the model."""


@dataclass(frozen=True)
class DatasetStats:
    path: Path
    action_lo: list[float]
    action_hi: list[float]
    proprio_mean: list[float]
    proprio_std: list[float]
    sidecar: dict  # vla_edge.json beside the file, or {}

    @property
    def layout(self) -> ImageLayout | None:
        d = self.sidecar.get("image_layout")
        return ImageLayout.from_dict(d) if d else None

    @property
    def actions(self) -> str | None:
        """The action encoding ``vla_edge.json`` records for the data (``None``: not recorded)."""
        return self.sidecar.get("actions")

    def policy(self, chunk_size: int = 5, d_max_m: float = 1.0, theta_max_deg: float = 90.0,
               actions: str = "bounds") -> PolicySpec:
        """A :class:`PolicySpec` with these statistics, read under ``actions``; ``vla_edge.json`` fields win
        over the arguments."""
        side = self.sidecar.get("policy", {})
        if actions not in ACTION_ENCODINGS:
            raise StatsError(f"unknown action encoding {actions!r} (known: {', '.join(ACTION_ENCODINGS)})")
        if actions == "bounds":
            bad = [i for i, (a, b) in enumerate(zip(self.action_lo, self.action_hi, strict=True)) if a > b]
            if bad:
                raise StatsError(f"{self.path}: act_min_bound > act_max_bound in action dimension {bad[0]}")
        if actions == "sigma3" and any(s < 0 for s in self.action_lo):
            raise StatsError(f"{self.path}: under sigma3 act_min_bound holds the std (the reference's field swap): "
                             "it must not be negative")
        pad = side.get("state_pad", [])
        if not (isinstance(pad, list) and all(isinstance(x, int | float) and math.isfinite(x) for x in pad)
                and len(pad) < len(self.proprio_mean)):
            raise StatsError(f"{self.path.parent / 'vla_edge.json'}: policy.state_pad must be a list of fewer than "
                             f"{len(self.proprio_mean)} numbers")
        spec = PolicySpec(
            chunk_size=int(side.get("chunk_size", chunk_size)),
            action_dim=len(self.action_lo),
            state_dim=len(self.proprio_mean),
            action_lo=self.action_lo,
            action_hi=self.action_hi,
            proprio_mean=self.proprio_mean,
            proprio_std=self.proprio_std,
            d_max_m=float(side.get("d_max_m", d_max_m)),
            theta_max_deg=float(side.get("theta_max_deg", theta_max_deg)),
            actions=actions,
            state_pad=tuple(float(x) for x in pad),
        )
        for key in ("action_dim", "state_dim"):
            if key in side and int(side[key]) != getattr(spec, key):
                raise StatsError(f"{self.path.parent / 'vla_edge.json'}: {key} {side[key]} but {self.path.name} "
                                 f"has {getattr(spec, key)} values")
        if spec.chunk_size < 1:
            raise StatsError(f"chunk_size must be >= 1, got {spec.chunk_size}")
        return spec


def _floats(d: dict, key: str, where: str) -> list[float]:
    v = d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise StatsError(f"{where}: '{key}' must be a non-empty list of numbers")
    if not all(math.isfinite(x) for x in v):
        raise StatsError(f"{where}: '{key}' holds a NaN or infinite value")
    return [float(x) for x in v]


def read_statistics(path: Path) -> DatasetStats:
    """Read and check ``statistics.yaml`` (and the ``vla_edge.json`` beside it, if any)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"statistics file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StatsError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise StatsError(f"{path}: expected a mapping with act_min_bound, act_max_bound and robot_obs")
    lo, hi = _floats(doc, "act_min_bound", str(path)), _floats(doc, "act_max_bound", str(path))
    if len(lo) != len(hi):
        raise StatsError(f"{path}: act_min_bound has {len(lo)} values but act_max_bound has {len(hi)}")
    obs = doc.get("robot_obs")
    if not isinstance(obs, list) or not obs or not isinstance(obs[0], dict):
        raise StatsError(f"{path}: 'robot_obs' must be a list holding one {{mean: [...], std: [...]}} mapping")
    mean, std = _floats(obs[0], "mean", f"{path} robot_obs"), _floats(obs[0], "std", f"{path} robot_obs")
    if len(mean) != len(std):
        raise StatsError(f"{path}: robot_obs mean has {len(mean)} values but std has {len(std)}")
    if any(s < 0 for s in std):
        raise StatsError(f"{path}: robot_obs std must not be negative")
    sidecar = {}
    side = path.parent / "vla_edge.json"
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text(encoding="utf-8"))
        except ValueError as e:
            raise StatsError(f"{side}: not valid JSON: {e}") from None
    return DatasetStats(path, lo, hi, mean, std, sidecar)
