"""``vla-edge check``: probe every device of a robot profile, print one row each, exit.

Usage::

    vla-edge check --robot cobot_magic     # the real robot: both CAN buses, the serial port, each camera
    vla-edge check --robot sim             # the simulators, probed the same way

Each device is probed on its own, so one missing device does not hide the others: the left and right
Piper arms (SocketCAN interface up, feedback, motors enabled; the arms hold their pose, nothing moves),
the TRACER base (serial port present and writable, feedback frames), and each camera (opens, delivers
frames for ``--seconds``; fps measured). The table (stdout) says for each: found or missing, what was
seen or why not; below it, one line per missing device says how to fix it (commands are never wrapped, so
they copy whole at any width). Exit status 0 when every device was found, 1 otherwise.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text
from vla_edge.edge.estop.latch import PRIORITY_WORDS, prefer_this_thread
from vla_edge.edge.profile import SIDES, load_profile
from vla_edge.edge.robot import Robot
from vla_edge.edge.telemetry import out_console
from vla_edge.firmware_bridge import tracer_protocol as tp
from vla_edge.firmware_bridge.cameras import Camera
from vla_edge.firmware_bridge.piper_arm import PiperArm, PiperArmConfig, can_interface_problem
from vla_edge.firmware_bridge.tracer_base import TracerBase, TracerBaseConfig


@dataclass(frozen=True)
class Probe:
    """One device's row: ``found`` or not, what was seen (or why not), and how to fix it."""

    device: str
    where: str
    found: bool
    detail: str
    fix: str = ""


def can_fix(name: str, why: str) -> str:
    if f"CAN interface {name}" in why:  # not found, or down
        return f"plug in its USB-CAN adapter, then: sudo ip link set {name} up type can bitrate 1000000"
    return f"power the arm on; is {name} its bus? (candump {name})"


def probe_arm(side: str, cfg: PiperArmConfig) -> Probe:
    device, where = f"arm {side}", f"CAN {cfg.can_name}"
    if cfg.bustype == "socketcan" and (why := can_interface_problem(cfg.can_name)):
        return Probe(device, where, False, why, can_fix(cfg.can_name, why))
    arm = PiperArm(cfg)
    try:
        arm.connect()
        s = arm.read_state()
        q = " ".join(f"{v:+.2f}" for v in s.qpos)
        return Probe(device, where, True, f"firmware {arm.firmware or '?'}, enabled {all(s.enabled)}, "
                     f"status {s.status:#04x}, qpos {q}")
    except Exception as e:  # any failure is this device's row, not the end of the check
        return Probe(device, where, False, str(e), can_fix(cfg.can_name, str(e)))
    finally:
        arm.disconnect()


def probe_base(cfg: TracerBaseConfig) -> Probe:
    device, where = "TRACER base", f"serial {cfg.port}"
    port = Path(cfg.port)
    if not port.exists():
        return Probe(device, where, False, f"{cfg.port} not found",
                     "plug in the USB-RS232 cable (ls /dev/ttyUSB*); [base] port in the profile")
    if not os.access(port, os.R_OK | os.W_OK):
        return Probe(device, where, False, f"no permission to open {cfg.port}",
                     "sudo usermod -aG dialout $USER, then log in again")
    base = TracerBase(cfg)
    try:
        base.connect()
        b = base.read_state()
        state = tp.VEHICLE_STATES.get(b.vehicle_state, hex(b.vehicle_state))
        return Probe(device, where, True, f"{state}, battery {b.battery_v:.1f} V, faults "
                     f"{', '.join(b.fault_names) or 'none'}")
    except Exception as e:
        return Probe(device, where, False, str(e),
                     "switch the base on, in serial control mode (115200 baud)")
    finally:
        base.disconnect()


def probe_cameras(cameras: dict[str, Camera], seconds: float, devices: dict) -> list[Probe]:
    started, rows = {}, {}
    for name, cam in cameras.items():
        where = str(devices.get(name, type(cam.source).__name__.removesuffix("Source").lower()))
        try:
            cam.start()
            started[name] = where
        except Exception as e:
            rows[name] = Probe(f"camera {name}", where, False, str(e).removeprefix(f"camera {name}: "),
                               "plug it in (v4l2-ctl --list-devices); [cameras.devices] in the profile; "
                               "permission: sudo usermod -aG video $USER")
    try:
        if started:
            time.sleep(seconds)
        for name, where in started.items():
            cam = cameras[name]
            frame = cam.latest()
            if frame is None or cam.error or cam.wrong_frame:
                rows[name] = Probe(f"camera {name}", where, False,
                                   cam.wrong_frame or cam.error or f"no frame in {seconds:g} s",
                                   "check the cable; one camera per USB controller")
            else:
                h, w = frame.image.shape[:2]
                rows[name] = Probe(f"camera {name}", where, True, f"{w}x{h} at {cam.fps_measured:.1f} fps, "
                                   f"newest frame {1e3 * (time.monotonic() - frame.stamp_s):.0f} ms old")
    finally:
        for name in started:
            cameras[name].stop()
    return [rows[name] for name in cameras]


def probe_all(robot_name: str, seconds: float = 1.0) -> list[Probe]:
    """One :class:`Probe` per device of the profile (arms, base, cameras), in that order."""
    config = load_profile(robot_name)
    robot = Robot(config)
    try:
        if config.sim is not None:  # start the simulators, then probe them like hardware
            arm_cfgs, base_cfg, rig = robot._start_sim()
        else:
            arm_cfgs, base_cfg, rig = dict(config.arms), config.base, None
        rig = rig or robot._make_rig()
        rows = [probe_arm(side, arm_cfgs[side]) for side in SIDES]
        rows.append(probe_base(base_cfg))
        rows += probe_cameras(rig.cameras, seconds, config.cameras.devices if config.sim is None else {})
        return rows
    finally:
        robot.disconnect()  # stops the simulators


def estop_priority_line() -> str:
    """What the e-stop threads would get in this process (a thread asks, as the keyboard's do), and how
    to get real-time priority when it is not granted."""
    got = []
    t = threading.Thread(target=lambda: got.append(prefer_this_thread()), name="check-priority")
    t.start()
    t.join()
    line = f"e-stop threads: {PRIORITY_WORDS[got[0]]}"
    if got[0] != "fifo":
        line += ("; for real-time priority run as root or give this user an rtprio limit "
                 "(/etc/security/limits.conf: USER - rtprio 10, then log in again)")
    return line


def main(args) -> int:
    config = load_profile(args.robot)
    kind = "simulated" if config.sim is not None else "hardware"
    rows = probe_all(args.robot, getattr(args, "seconds", 1.0))
    table = Table(title=f"vla-edge check: robot profile {config.name} ({kind})", title_justify="left")
    for col in ("device", "where", ""):
        table.add_column(col, no_wrap=True)
    table.add_column("seen / why", overflow="fold")
    for r in rows:
        table.add_row(r.device, r.where, Text("found", "green") if r.found else Text("missing", "red"),
                      Text(r.detail))
    console = out_console()
    console.print(table)
    fixes = [r for r in rows if r.fix and not r.found]
    if fixes:  # commands to copy: each on a line of its own, never wrapped by us, at any width
        console.print("how to fix:")
        for r in fixes:
            console.print(Text(f"  {r.device}: {r.fix}"), soft_wrap=True)
    console.print(estop_priority_line(), highlight=False, soft_wrap=True)
    missing = [r.device for r in rows if not r.found]
    if missing:
        console.print(f"[red]{len(missing)} of {len(rows)} devices missing[/]: {', '.join(missing)}")
        return 1
    console.print(f"[green]all {len(rows)} devices found[/]")
    return 0
