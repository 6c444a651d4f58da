"""``vla-edge record``: teleoperation on the simulated Cobot Magic, through the real piper_sdk.

The simulated master arms send control frames on the puppets' virtual CAN buses; the test decodes
what they sent itself (CONTRACT section 2: big-endian int32 0.001 degree / 0.001 mm) and compares it
with the recorded ``action``, as an outsider would with a CAN log.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import run_cli
from vla_edge.edge.estop.keyboard import _tty_keys
from vla_edge.edge.teleop import EpisodeKeys

# The CLI in a child process; PiperMasterSim instances are collected so their sent frames can be dumped.
CHILD = """
import json, sys
from vla_edge.firmware_bridge import piper_master_sim as pms
sims, start = [], pms.PiperMasterSim.start
def collect(self):
    sims.append(self)
    return start(self)
pms.PiperMasterSim.start = collect
from vla_edge.edge.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump([{"channel": s.config.channel, "sent": [[t, i, d.hex()] for t, i, d in s.sent]} for s in sims], f)
sys.exit(code)
"""

FRAME_COLUMNS = {0x155: (0, 1), 0x156: (2, 3), 0x157: (4, 5)}  # joint pairs of one arm's 7 columns


def _sent_values(sent) -> dict[int, list[np.ndarray]]:
    """Per frame id: the values each sent frame carried, in SI units (rad, m), in send order."""
    out: dict[int, list[np.ndarray]] = {0x155: [], 0x156: [], 0x157: [], 0x159: []}
    for _t, aid, data in sent:
        raw = bytes.fromhex(data)
        if aid in FRAME_COLUMNS:
            out[aid].append(np.array(struct.unpack(">ii", raw)) * math.pi / 180_000.0)
        elif aid == 0x159:
            out[aid].append(np.array([struct.unpack(">iHBB", raw)[0] / 1e6]))
    return {k: np.stack(v) for k, v in out.items()}


def test_record_sim_two_episodes_action_is_what_the_masters_sent(tmp_path):
    dump = tmp_path / "sent.json"
    out = tmp_path / "episodes"
    args = ["record", "--robot", "sim", "--instruction", "touch the red target", "--episodes", "2",
            "--out", str(out), "--episode-seconds", "1.0", "--keyboard", "none", "--seed", "3"]
    r = subprocess.run([sys.executable, "-c", CHILD, str(dump), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["episode_0.hdf5", "episode_1.hdf5"]
    masters = json.loads(dump.read_text())
    assert ["left" in m["channel"] for m in masters] == [True, False]
    sent = [_sent_values(m["sent"]) for m in masters]

    moved, after = 0, {}
    for e, path in enumerate(sorted(out.iterdir())):
        with h5py.File(path, "r") as f:
            action = f["action"][()].astype(np.float64)
            qpos = f["observations/qpos"][()]
            assert f.attrs["instruction"] == "touch the red target" and f.attrs["seed"] == 3 + e
            assert f["observations/images/cam_high"].shape[1:] == (480, 640, 3)
            n = len(action)
            assert 5 <= n <= 31  # 1 s at 30 Hz; a loaded machine may skip deadlines, never add ticks
            assert all(f[name].shape[0] == n for name in ("observations/qpos", "base_action", "vla_edge/tick_t"))
            # the simulated puppets send no 0x251..0x256 (NaN) but their 0x2A8 gripper effort (1 N m)
            effort = f["observations/effort"][()]
            assert np.isnan(f["observations/qvel"][()]).all() and np.isnan(effort[:, [0, 5, 7, 12]]).all()
            assert np.all(effort[:, [6, 13]] == 1.0)
        for side, values in enumerate(sent):
            for aid, cols in {**FRAME_COLUMNS, 0x159: (6,)}.items():
                recorded = action[:, [7 * side + i for i in cols]]
                # The recorded rows are a subsequence of the frames sent: each value is exactly one the
                # master sent (to float32 rounding, well under the bus unit of 1.7e-5 rad / 1e-6 m), in
                # the order it was sent.
                prev = after.get((side, aid), 0)
                for t, row in enumerate(recorded):
                    match = np.flatnonzero(np.abs(values[aid][prev:] - row).max(-1) < 1e-6)
                    assert match.size, f"episode {e} tick {t}: {row} was never sent in {aid:#x} (side {side})"
                    prev += int(match[0])
                after[(side, aid)] = prev
        moved += int(np.abs(np.diff(action, axis=0)).max() > 0.01)
        # the puppets follow the masters (in firmware, on the shared bus): they end nearer the last command
        assert np.abs(qpos[-1] - action[-1]).max() < np.abs(qpos[0] - action[-1]).max() - 0.1
    assert moved == 2  # the expert moved the masters in both episodes


def test_sim_operator_ends_each_episode_after_it_touched_the_target_and_starts_where_asked(tmp_path):
    """The simulated operator presses "n" 0.5 s after it reached the target, long before --episode-seconds;
    --start-spread 0 starts every episode at the ready pose (where demo and eval start). Checked on the
    recorded joints with the task's own success geometry, not the operator's bookkeeping."""
    from conftest import stall_tolerant_sim
    from vla_edge.edge.sim.task import ReachTask

    task = ReachTask()
    out = tmp_path / "ep"
    r = run_cli("record", "--robot", str(stall_tolerant_sim(tmp_path)), "--instruction", "touch the red target",
                "--episodes", "2", "--out", str(out), "--episode-seconds", "10", "--reset-seconds", "0.2",
                "--keyboard", "none", "--seed", "7", "--start-spread", "0", timeout=120)
    assert r.returncode == 0, r.stderr
    for e in range(2):
        with h5py.File(out / f"episode_{e}.hdf5", "r") as f:
            qpos, tick_t = f["observations/qpos"][()].astype(np.float64), f["vla_edge/tick_t"][()]
            target = json.loads(f.attrs["target_xy_m"])  # a JSON list, as every list attribute
            assert f.attrs["start_spread_rad"] == 0.0
        assert np.abs(qpos[0] - task.ready_q14).max() < 5e-3  # the ready pose, to the bus's resolution
        assert task.at_target(qpos[-1], target)  # it ended on the target ...
        assert tick_t[-1] - tick_t[0] < 4.0  # ... about 1.5 s in (reach ~0.8 s + 0.5 s), not after 10 s
        assert sum(task.at_target(q, target) for q in qpos) >= task.hold_ticks  # and held it for the success test
    r = run_cli("record", "--robot", "sim", "--instruction", "x", "--out", str(tmp_path / "o"), "--start-spread", "-1",
                "--keyboard", "none")
    assert r.returncode == 2 and r.stderr.strip() == "vla-edge record: error: need 0 <= --start-spread <= 1 rad; got -1.0"
    r = run_cli("record", "--robot", "cobot_magic", "--instruction", "x", "--out", str(tmp_path / "o"),
                "--hold-seconds", "1", "--keyboard", "none")  # refused before any device is touched
    assert r.returncode == 2 and r.stderr.strip() == ("vla-edge record: error: --start-spread and --hold-seconds move "
                                                      "the simulated operator; robot cobot_magic is teleoperated by "
                                                      "a person")


def test_record_refuses_bad_arguments_in_one_line(tmp_path):
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    r = run_cli("record", "--robot", "sim", "--instruction", "x", "--out", str(not_dir), "--keyboard", "none")
    assert r.returncode == 2 and r.stderr.strip() == f"vla-edge record: error: --out {not_dir} exists and is not a directory"
    r = run_cli("record", "--robot", "sim", "--instruction", " ", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "instruction must not be empty" in r.stderr
    profile = tmp_path / "nomaster.toml"
    from vla_edge.edge.profile import PROFILE_DIR

    profile.write_text((PROFILE_DIR / "sim.toml").read_text().replace('master_can = "sim_can_right"', "#"))
    r = run_cli("record", "--robot", str(profile), "--instruction", "x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no arms.right.master_can" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was created or connected


def test_episode_keys_and_terminal_key_decoding():
    assert _tty_keys(b" rY\x03") == [" ", "r", "y", "\x03"]
    assert _tty_keys(b"\x1b[C") == ["right"] and _tty_keys(b"\x1b") == ["esc"] and _tty_keys(b"\x1b[Dn") == ["n"]
    keys = EpisodeKeys()
    keys.on_key("right")
    assert keys.end.is_set() and not keys.rerecord and not keys.quit
    keys.clear()
    keys.on_key("b")
    assert keys.end.is_set() and keys.rerecord
    keys.clear()
    keys.on_key("x")
    assert not keys.end.is_set()
    keys.on_key("esc")
    assert keys.quit and keys.end.is_set()


@pytest.mark.parametrize("forward", [True])
def test_record_forwarding_master_on_its_own_bus(tmp_path, forward):
    """A master on a bus of its own: vla-edge forwards its commands to the puppet through the safety filter."""
    from vla_edge.edge.profile import PROFILE_DIR

    profile = tmp_path / "sep.toml"
    text = (PROFILE_DIR / "sim.toml").read_text()
    profile.write_text(text.replace('master_can = "sim_can_left"', 'master_can = "sim_master_left"')
                       .replace('master_can = "sim_can_right"', 'master_can = "sim_master_right"'))
    out = tmp_path / "ep"
    r = run_cli("record", "--robot", str(profile), "--instruction", "x", "--episodes", "1", "--out", str(out),
                "--episode-seconds", "1.0", "--keyboard", "none", "--seed", "5", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "forwarding through the safety filter" in r.stderr
    with h5py.File(out / "episode_0.hdf5", "r") as f:
        action, qpos = f["action"][()], f["observations/qpos"][()]
        assert bool(f.attrs["forwarding"]) is forward
    assert np.abs(np.diff(action, axis=0)).max() > 0.01  # the master moved ...
    # ... and the puppet, which only vla-edge commands here, followed it (step-limited per tick)
    assert np.abs(qpos[-1] - action[-1]).max() < np.abs(qpos[0] - action[-1]).max() - 0.1


def test_space_estops_the_puppets_while_recording_and_q_quits(tmp_path):
    """The e-stop stays live while recording: space (from the terminal) puts the puppets in the Piper
    firmware e-stop, so they stop following the masters that the operator keeps moving; q then ends."""
    import os

    master_fd, slave_fd = os.openpty()
    out = tmp_path / "ep"
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "record", "--robot", "sim", "--instruction",
                             "x", "--episodes", "1", "--out", str(out), "--episode-seconds", "20",
                             "--keyboard", "tty", "--seed", "1", "--hold-seconds", "60"],
                            stdin=slave_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until the episode is being recorded
            if line.startswith("recording episode 1/1"):
                break
        time.sleep(0.2)
        os.write(master_fd, b" ")
        time.sleep(1.5)
        os.write(master_fd, b"q")
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        os.close(master_fd)
        os.close(slave_fd)
    assert proc.returncode == 0, err
    with h5py.File(out / "episode_0.hdf5", "r") as f:
        kinds = [k.decode() for k in f["vla_edge/events/kind"][()]]
        reasons = [r.decode() for r in f["vla_edge/events/reason"][()]]
        t_stop = f["vla_edge/events/t"][0]
        tick_t, action, qpos = f["vla_edge/tick_t"][()], f["action"][()], f["observations/qpos"][()]
    assert kinds == ["estop"] and reasons == ["space key"]
    after = tick_t > t_stop + 0.05  # the 0x150 frame has reached the puppet
    assert after.sum() >= 20 and tick_t[-1] - tick_t[0] < 5.0  # q ended the episode long before 20 s
    # the masters kept moving (the expert: 1.2 rad/s), the puppets did not follow: they only sink,
    # damped (the simulator's 0.05 rad/s)
    # speed over 5-tick windows: one feedback frame landing just before or after a tick must not count
    # as a burst (a tick-to-tick ratio once read 0.1008 rad/s on the loaded CI box)
    q, t = qpos[after], tick_t[after]
    speed_radps = np.abs(q[5:] - q[:-5]) / (t[5:] - t[:-5])[:, None]
    assert speed_radps.max() < 0.1
    assert np.abs(action[-1] - qpos[-1]).max() > 0.1


def test_read_motion_from_the_arms_high_speed_feedback():
    """0x251..0x256 frames as the Piper firmware sends them (big-endian int16 speed 0.001 rad/s, int16
    current 0.001 A, int32 position) become joint velocities and efforts through piper_sdk."""
    import uuid

    import can
    from vla_edge.firmware_bridge.piper_arm import PiperArm, PiperArmConfig
    from vla_edge.firmware_bridge.piper_motion import read_motion
    from vla_edge.firmware_bridge.piper_sim import PiperSim, PiperSimConfig

    channel = f"motion-{uuid.uuid4().hex[:8]}"
    with PiperSim(PiperSimConfig(channel=channel)):
        arm = PiperArm(PiperArmConfig(can_name=channel, bustype="virtual"))
        arm.connect()
        try:
            qvel, effort = read_motion(channel)
            assert np.isnan(qvel).all() and np.isnan(effort[:6]).all()  # the simulator sends no 0x251..
            assert effort[6] == pytest.approx(1.0)  # its 0x2A8 gripper effort: 1000 x 0.001 N m
            speeds, currents = [1500, -250, 0, 40, -3000, 7], [100, -200, 300, 400, -500, 600]
            with can.Bus(interface="virtual", channel=channel) as peer:
                for i in range(6):
                    peer.send(can.Message(arbitration_id=0x251 + i, is_extended_id=False,
                                          data=struct.pack(">hhi", speeds[i], currents[i], 12345)))
                time.sleep(0.1)
                qvel, effort = read_motion(channel, max_age_s=1.0)
            assert qvel[:6] == pytest.approx(np.array(speeds) / 1000)
            coefficient = np.array([1.18125] * 3 + [0.95844] * 3)  # piper_sdk's current -> torque factors
            assert effort[:6] == pytest.approx(np.array(currents) * coefficient / 1000)
            assert np.isnan(qvel[6])
        finally:
            arm.disconnect()


def test_b_discards_and_records_again_n_ends_early(tmp_path):
    """b throws the episode being recorded away and records it again (same seed); n ends it early, kept."""
    import os

    master_fd, slave_fd = os.openpty()
    out = tmp_path / "ep"
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "record", "--robot", "sim", "--instruction",
                             "x", "--episodes", "1", "--out", str(out), "--episode-seconds", "20",
                             "--keyboard", "tty", "--seed", "2", "--hold-seconds", "60"],
                            stdin=slave_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for key in (b"b", b"n"):
            for line in proc.stderr:
                seen.append(line)
                if line.startswith("recording episode 1/1"):
                    break
            time.sleep(0.5)
            os.write(master_fd, key)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        os.close(master_fd)
        os.close(slave_fd)
    assert proc.returncode == 0, "".join(seen) + err
    assert "discarded episode_0.hdf5: recording it again" in "".join(seen) + err
    assert [p.name for p in out.iterdir()] == ["episode_0.hdf5"]
    with h5py.File(out / "episode_0.hdf5", "r") as f:
        tick_t = f["vla_edge/tick_t"][()]
        assert f.attrs["seed"] == 2
    assert tick_t[-1] - tick_t[0] < 10.0  # n ended it long before --episode-seconds


def test_sigterm_ends_a_recording_as_an_operator_stop(tmp_path):
    """SIGTERM (systemctl/docker stop) while recording: the session ends through the same path as run,
    exit 143, and the episode being recorded is kept, readable, with equal row counts."""
    import signal as sig

    out = tmp_path / "ep"
    proc = subprocess.Popen([sys.executable, "-m", "vla_edge.edge.cli", "record", "--robot", "sim", "--instruction",
                             "x", "--episodes", "3", "--out", str(out), "--episode-seconds", "30",
                             "--keyboard", "none", "--seed", "2", "--hold-seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("recording episode 1/3"):
                break
        time.sleep(1.0)
        proc.send_signal(sig.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by" in err and "1 episodes saved" in err, err
    with h5py.File(out / "episode_0.hdf5", "r") as f:
        rows = {len(f["action"]), len(f["observations/qpos"])} | {len(f[f"observations/images/{c}"])
                                                                     for c in f["observations/images"]}
    assert len(rows) == 1 and rows.pop() > 5
