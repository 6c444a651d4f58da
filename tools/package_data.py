"""Files shipped inside the package (no torch: the robot-side runtime may import this)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_POLICY = Path(__file__).parent / "data" / "tiny_policy.pt"
"""The trained tiny reach policy (README, "A policy that does something"), when one is shipped."""


def shipped_policy() -> Path | None:
    return SHIPPED_POLICY if SHIPPED_POLICY.exists() else None
