"""Safety filter: limits from CONTRACT, per-tick steps, base speed/acceleration, NaN rejection, counters."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vla_edge import VlaEdgeError
from vla_edge.edge.bundle.spec import PIPER_JOINT_HI, PIPER_JOINT_LO
from vla_edge.edge.safety import JOINT_NAMES, SafetyFilter, SafetyLimits, UnsafeAction

LO = np.array(PIPER_JOINT_LO * 2)
HI = np.array(PIPER_JOINT_HI * 2)
MID = (LO + HI) / 2


def test_default_limits_are_the_contract_limits_for_both_arms():
    lim = SafetyLimits()
    np.testing.assert_array_equal(lim.joint_lo, LO)
    np.testing.assert_array_equal(lim.joint_hi, HI)
    assert JOINT_NAMES[2] == "L_j3" and JOINT_NAMES[6] == "L_gripper" and JOINT_NAMES[13] == "R_gripper"
    step = lim.step_limits
    assert step[6] == step[13] == lim.max_gripper_step_m
    assert step[0] == step[12] == lim.max_step_rad


def test_profile_overrides_and_rejects_typos():
    lim = SafetyLimits.from_profile({"safety": {"max_vx_mps": 0.2, "max_step_rad": 0.01}})
    assert lim.max_vx_mps == 0.2 and lim.max_step_rad == 0.01 and lim.max_wz_radps == SafetyLimits().max_wz_radps
    flat = SafetyLimits.from_profile({"joint_hi": [1.0] * 7})  # one arm's limits apply to both
    assert flat.joint_hi.shape == (14,) and np.all(flat.joint_hi == 1.0)
    with pytest.raises(VlaEdgeError, match="max_vx_mp"):
        SafetyLimits.from_profile({"safety": {"max_vx_mp": 0.2}})
    with pytest.raises(VlaEdgeError):
        SafetyLimits.from_profile({"max_wz_radps": -1.0})
    with pytest.raises(VlaEdgeError):
        SafetyLimits(joint_lo=np.zeros(14), joint_hi=-np.ones(14))


def test_joint_limits_clamp_and_are_counted_by_name():
    f = SafetyFilter(SafetyLimits(max_step_rad=10.0, max_gripper_step_m=10.0))  # isolate the range limit
    target = MID.copy()
    target[2] = 0.5  # L_j3 above its 0.0 upper limit
    target[13] = 0.09  # R gripper beyond 0.07 m
    safe, clamps = f.filter_joints(target, MID)
    assert safe[2] == 0.0 and safe[13] == pytest.approx(0.07)
    assert sorted(clamps) == ["L_j3_limit", "R_gripper_limit"]
    np.testing.assert_array_equal(np.delete(safe, [2, 13]), np.delete(target, [2, 13]))
    f.filter_joints(target)
    assert f.clamp_counts == {"L_j3_limit": 2, "R_gripper_limit": 2}
    assert f.total_clamps == 4


def test_step_limit_follows_the_last_command_not_the_measurement():
    lim = SafetyLimits()
    f = SafetyFilter(lim)
    target = MID.copy()
    target[0] += 1.0  # L_j1 jumps by 1 rad
    target[6] = 0.07  # L gripper fully open from mid (0.035)
    safe, clamps = f.filter_joints(target, MID)
    assert safe[0] == pytest.approx(MID[0] + lim.max_step_rad)
    assert safe[6] == pytest.approx(MID[6] + lim.max_gripper_step_m)
    assert sorted(clamps) == ["L_gripper_step", "L_j1_step"]
    # Second tick: the arm has not moved (measured still MID), yet the ramp continues from the last command.
    safe2, _ = f.filter_joints(target, MID)
    assert safe2[0] == pytest.approx(MID[0] + 2 * lim.max_step_rad)
    # reset() re-arms from the measured pose.
    f.reset(MID)
    safe3, _ = f.filter_joints(target, MID)
    assert safe3[0] == pytest.approx(MID[0] + lim.max_step_rad)
    assert f.clamp_counts["L_j1_step"] == 3


def test_first_command_without_a_reference_is_only_range_limited():
    f = SafetyFilter()
    safe, clamps = f.filter_joints(MID + 0.01)
    np.testing.assert_allclose(safe, np.clip(MID + 0.01, LO, HI))
    assert clamps == [] or all(c.endswith("_limit") for c in clamps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_targets_raise_and_leave_state_untouched(bad):
    f = SafetyFilter()
    f.filter_joints(MID, MID)
    target = MID.copy()
    target[9] = bad
    with pytest.raises(UnsafeAction, match="R_j3"):
        f.filter_joints(target, MID)
    assert isinstance(UnsafeAction("x"), VlaEdgeError)
    np.testing.assert_array_equal(f.last_q14, MID)
    with pytest.raises(UnsafeAction):
        f.filter_joints(MID[:7], MID)
    with pytest.raises(UnsafeAction):
        f.filter_base(bad, 0.0, 0.033)


def test_base_speed_and_acceleration_limits():
    lim = SafetyLimits(max_vx_mps=0.5, max_wz_radps=0.6, max_ax_mps2=1.0, max_aw_radps2=2.0)
    f = SafetyFilter(lim)
    dt = 0.1
    vx, wz, clamps = f.filter_base(2.0, -0.05, dt)
    assert vx == pytest.approx(0.1) and wz == pytest.approx(-0.05)  # accel: 1.0 m/s^2 * 0.1 s
    assert clamps == ["base_vx_limit", "base_vx_accel"]
    speeds = [f.filter_base(2.0, -3.0, dt)[:2] for _ in range(20)]
    assert speeds[-1] == pytest.approx((0.5, -0.6))
    assert all(abs(b[0] - a[0]) <= 0.1 + 1e-12 for a, b in zip([(vx, wz), *speeds], speeds, strict=False))
    # Braking is acceleration-limited too (the e-stop path bypasses the filter).
    vx, wz, clamps = f.filter_base(0.0, 0.0, dt)
    assert vx == pytest.approx(0.4) and wz == pytest.approx(-0.4)
    assert "base_wz_accel" in clamps and f.clamp_counts["base_wz_limit"] == 20
    # A stalled tick does not allow a jump.
    f.reset()
    vx, _, _ = f.filter_base(0.5, 0.0, 5.0)
    assert vx == pytest.approx(0.2)


def test_clamps_are_counted_and_only_the_first_of_each_joint_is_logged_at_debug(caplog):
    """Clamps are routine: nothing at warning level (the run's summary counts them per joint, one line)."""
    f = SafetyFilter()
    target = MID.copy()
    target[2] = 1.0  # L_j3 beyond its limit
    with caplog.at_level(logging.DEBUG, logger="vla_edge.edge.safety"):
        f.filter_joints(target)
        f.filter_joints(target)
        target[2] = MID[2] + 0.3  # within the limit now, but a step past the per-tick limit: the same joint
        f.filter_joints(target)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "first clamp of L_j3: L_j3_limit" in caplog.records[0].getMessage()
    assert f.clamp_counts == {"L_j3_limit": 2, "L_j3_step": 1}


finite = st.floats(min_value=-10, max_value=10, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(finite, min_size=14, max_size=14), min_size=1, max_size=6),
    st.lists(finite, min_size=14, max_size=14),
)
def test_property_output_is_always_within_range_and_step(targets, measured):
    f = SafetyFilter()
    step = f.limits.step_limits
    measured = np.clip(np.array(measured), LO, HI)  # a real arm reports poses inside its range
    reference = measured
    for t in targets:
        safe, clamps = f.filter_joints(t, measured)
        assert np.all(safe >= LO) and np.all(safe <= HI)
        assert np.all(np.abs(safe - reference) <= step + 1e-12)
        assert (len(clamps) == 0) == np.array_equal(safe, np.array(t))
        reference = safe


def test_a_bundle_whose_decoded_targets_leave_the_limits_is_named_at_start(caplog):
    """The filter's limits and the bundle's decoding (its action encoding) are compared once: the joints whose
    targets can leave the limits, as the bundle decodes them, are logged (a wrong encoding shows up there)."""
    from vla_edge.edge.bundle.spec import cobot_magic_policy
    from vla_edge.edge.profile import load_profile

    profile = load_profile("sim")
    with caplog.at_level("WARNING", logger="vla_edge.edge.safety"):
        SafetyLimits.for_robot(profile, cobot_magic_policy())  # bounds = the joint limits: every target inside
    assert not caplog.records
    with caplog.at_level("WARNING", logger="vla_edge.edge.safety"):
        SafetyLimits.for_robot(profile, cobot_magic_policy(actions="raw"))  # bin centres: within +-0.996
    [rec] = caplog.records
    for joint in ("L_j2 [-0.996, 0.996] vs [0, 3.14]", "L_j3", "L_gripper [-0.996, 0.996] vs [0, 0.07]", "R_gripper"):
        assert joint in rec.getMessage()
    assert "encoding raw" in rec.getMessage() and "L_j1" not in rec.getMessage()  # J1: +-2.62 rad holds +-0.996
    # the bundle's own bins (e.g. export --bins norm): the extreme bin centres, not the uniform ones
    edges = np.concatenate([[-1.0], np.linspace(-0.5, 0.5, 254), [1.0]])  # first centre -0.75, last +0.75
    caplog.clear()
    with caplog.at_level("WARNING", logger="vla_edge.edge.safety"):
        SafetyLimits.for_robot(profile, cobot_magic_policy(actions="raw"), edges)
    [rec] = caplog.records
    assert "L_j2 [-0.75, 0.75] vs [0, 3.14]" in rec.getMessage(), rec.getMessage()
