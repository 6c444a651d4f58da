"""``vla-edge record``: teleoperated demonstrations (:mod:`vla_edge.edge.teleop`).

Usage::

    vla-edge record --robot cobot_magic --instruction "stack the cups" --episodes 20 --out episodes/
    vla-edge record --robot sim --instruction "touch the red target" --episodes 3 --out episodes/
"""

from __future__ import annotations

from pathlib import Path

from vla_edge.edge.sim.teleoperator import SimTeleoperator
from vla_edge.edge.teleop import RecordConfig, Recorder


def main(args) -> int:
    cfg = RecordConfig(robot=args.robot, instruction=args.instruction, episodes=args.episodes, out=Path(args.out),
                       episode_s=args.episode_seconds, reset_s=args.reset_seconds, rate_hz=args.rate,
                       keyboard=args.keyboard, seed=args.seed, start_spread_rad=args.start_spread,
                       hold_s=args.hold_seconds, view=args.view,
                       view_save=Path(args.view_save) if args.view_save else None)
    return Recorder(cfg, sim_teleoperator=SimTeleoperator).run()
