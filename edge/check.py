"""``vla-edge check``: connect to every device of a robot profile, print what was found, exit.

Exit status 0 when every device answered and no fault is active, 1 when connected but with
faults; a device that cannot be reached raises :class:`VlaEdgeError` (one line from the CLI, 2).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table
from vla_edge.edge.cameras import CameraFault
from vla_edge.edge.robot import SIDES, Robot, load_profile
from vla_edge.firmware_bridge import tracer_protocol as tp


def main(args) -> int:
    config = load_profile(args.robot)
    console = Console()
    kind = "simulated" if config.sim is not None else "hardware"
    console.print(f"[bold]vla-edge check[/bold]: robot profile [cyan]{config.name}[/cyan] ({kind})")
    robot = Robot(config)
    robot.connect()
    try:
        time.sleep(max(0.0, getattr(args, "seconds", 1.0)))  # let the camera fps estimate settle
        frames = None
        for attempt in range(5):  # a diagnostic: tolerate a momentary hiccup, report a lasting one
            try:
                frames = robot.read_frames()
                break
            except CameraFault:
                if attempt == 4:
                    raise
                time.sleep(0.2)
        state = robot.read_state()

        arms = Table(title="Piper arms", title_justify="left")
        for col in ("side", "bus", "firmware", "enabled", "status", "qpos (rad, gripper m)"):
            arms.add_column(col)
        for i, side in enumerate(SIDES):
            arm = robot.arms[side]
            s = arm.read_state()
            q = state.qpos[7 * i : 7 * i + 7]
            arms.add_row(side, arm.name, arm.firmware or "?", "yes" if all(s.enabled) else str(s.enabled),
                         f"{s.status:#04x}", " ".join(f"{v:+.3f}" for v in q))
        console.print(arms)

        b = robot.base.read_state()
        base = Table(title="TRACER base", title_justify="left")
        for col in ("port", "state", "battery", "velocity", "fault bits"):
            base.add_column(col)
        base.add_row(robot.base.config.port, tp.VEHICLE_STATES.get(b.vehicle_state, hex(b.vehicle_state)),
                     f"{b.battery_v:.1f} V", f"{b.vx_mps:+.3f} m/s {b.wz_radps:+.3f} rad/s",
                     ", ".join(b.fault_names) or "none")
        console.print(base)

        cams = Table(title="Cameras", title_justify="left")
        for col in ("camera", "size", "fps measured", "age", "skew"):
            cams.add_column(col)
        for name, cam in robot.cameras.cameras.items():
            img = frames.images[name]
            cams.add_row(name, f"{img.shape[1]}x{img.shape[0]}", f"{cam.fps_measured:.1f}",
                         f"{frames.ages_s[name] * 1000:.0f} ms", f"{frames.skew_s * 1000:.1f} ms")
        console.print(cams)

        faults = robot.faults()
    finally:
        robot.disconnect()
    if faults:
        for f in faults:
            console.print(f"[red]fault[/red] {f}")
        return 1
    console.print("[green]all devices OK[/green]")
    return 0
