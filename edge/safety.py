"""Safety filter between the policy and the actuators, on by default.

Every joint target the loop sends to the Piper arms and every base command sent to the TRACER passes
through :class:`SafetyFilter` first:

* non-finite values (NaN, inf) are never clamped into something plausible: they raise
  :class:`UnsafeAction`, and the loop goes to its safe state (base zero, arms hold);
* joint targets are clamped to the published limits (``spec.PIPER_JOINT_LO``/``HI``, per arm:
  J1..J6 in rad, gripper in m);
* each joint may move at most ``max_step_rad`` (grippers ``max_gripper_step_m``) per tick away from
  the last commanded target (or the measured pose before the first command / after :meth:`reset`);
* base speeds are clamped to ``max_vx_mps``/``max_wz_radps`` and their change per tick to
  ``max_ax_mps2``/``max_aw_radps2`` times the tick's ``dt_s``.

Every clamp is counted in :attr:`SafetyFilter.clamp_counts` under a name such as ``"L_j3_limit"``,
``"R_gripper_step"`` or ``"base_vx_accel"``, and the first clamp of each joint (``L_j3``, ``base_vx``:
:func:`clamp_joint`) is logged at debug level. Clamps are routine (a policy asking for more than the step
limit): the run's summary says how many per joint, in one line (:class:`~vla_edge.edge.telemetry.RunStats`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import numpy as np
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.spec import PIPER_JOINT_HI, PIPER_JOINT_LO

log = logging.getLogger(__name__)

ARM_JOINTS = ("j1", "j2", "j3", "j4", "j5", "j6", "gripper")
JOINT_NAMES = tuple(f"{side}_{j}" for side in ("L", "R") for j in ARM_JOINTS)
"""Names of the 14 entries of the state/action vector (CONTRACT section 2), e.g. ``"L_j3"``."""
IS_GRIPPER = np.array([j == "gripper" for _ in ("L", "R") for j in ARM_JOINTS])

MAX_BASE_DT_S = 0.2
"""A longer tick (a stall) does not buy a bigger base speed change than this many seconds would."""


def clamp_joint(name: str) -> str:
    """The joint (or base axis) of a clamp name: ``"L_j3_step"`` -> ``"L_j3"``, ``"base_vx_accel"`` -> ``"base_vx"``."""
    return name.rsplit("_", 1)[0]


class UnsafeAction(VlaEdgeError):
    """A command that must not be sent at all (NaN/inf, wrong shape): go to the safe state."""


def _vec14(values, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (14,):
        raise UnsafeAction(f"{what}: expected 14 values, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = [JOINT_NAMES[i] for i in np.flatnonzero(~np.isfinite(a))]
        raise UnsafeAction(f"{what}: non-finite value in {', '.join(bad)}")
    return a


@dataclass
class SafetyLimits:
    """Limits the :class:`SafetyFilter` enforces. Steps are per control tick (defaults for 30 Hz)."""

    joint_lo: np.ndarray = field(default_factory=lambda: np.array(PIPER_JOINT_LO * 2, dtype=np.float64))
    joint_hi: np.ndarray = field(default_factory=lambda: np.array(PIPER_JOINT_HI * 2, dtype=np.float64))
    max_step_rad: float = 0.05
    max_gripper_step_m: float = 0.005
    max_vx_mps: float = 0.5
    max_wz_radps: float = 0.6
    max_ax_mps2: float = 1.0
    max_aw_radps2: float = 2.0

    def __post_init__(self):
        self.joint_lo = np.asarray(self.joint_lo, dtype=np.float64)
        self.joint_hi = np.asarray(self.joint_hi, dtype=np.float64)
        if self.joint_lo.shape == (7,):  # one arm given: both arms share it
            self.joint_lo = np.tile(self.joint_lo, 2)
        if self.joint_hi.shape == (7,):
            self.joint_hi = np.tile(self.joint_hi, 2)
        if self.joint_lo.shape != (14,) or self.joint_hi.shape != (14,):
            raise VlaEdgeError("safety: joint_lo/joint_hi need 7 (one arm) or 14 values")
        if not np.all(self.joint_lo <= self.joint_hi):
            raise VlaEdgeError("safety: joint_lo must not exceed joint_hi")
        for f in fields(self):
            if f.name.startswith("max_"):
                v = getattr(self, f.name)
                if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                    raise VlaEdgeError(f"safety: {f.name} must be a positive number, got {v!r}")

    @classmethod
    def from_profile(cls, profile: dict | None) -> SafetyLimits:
        """Defaults overridden by a robot profile: its ``"safety"`` section if present, else the dict itself.

        Unknown keys are an error (a typo must not silently leave a limit at its default).
        """
        section = dict((profile or {}).get("safety", profile or {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise VlaEdgeError(f"safety: unknown limit(s) in robot profile: {', '.join(unknown)}")
        return cls(**section)

    @classmethod
    def for_robot(cls, robot, policy=None, edges=None) -> SafetyLimits:
        """The limits of a loaded robot profile (:class:`~vla_edge.edge.robot.RobotConfig`): its arms' joint
        limits, its base's speed (m/s, rad/s) and acceleration (m/s^2, rad/s^2) limits.

        ``policy``: the bundle's :class:`~vla_edge.edge.bundle.spec.PolicySpec`; the joints whose targets, as
        the bundle decodes them (:meth:`PolicySpec.action_bounds`, its action encoding), can leave these limits
        are logged once as a warning (those targets will be clamped: a sign of a wrong encoding); ``edges``: its
        bin edges (``TokenSpec.bin_edges``; default uniform)."""
        arm, base = robot.arms["left"], robot.base
        limits = cls(joint_lo=arm.joint_lo, joint_hi=arm.joint_hi, max_vx_mps=base.max_linear_mps,
                     max_wz_radps=base.max_angular_radps, max_ax_mps2=base.max_linear_accel_mps2,
                     max_aw_radps2=base.max_angular_accel_radps2)
        if policy is not None and policy.action_dim == len(JOINT_NAMES):
            beyond = limits.beyond(*policy.action_bounds(), edges=edges)
            if beyond:
                log.warning("safety: the bundle's actions (encoding %s) reach beyond the joint limits on %s; those "
                            "targets will be clamped", policy.actions, ", ".join(beyond))
        return limits

    def beyond(self, lo, hi, edges=None) -> list[str]:
        """Joints whose decoded targets can leave the limits: ``(lo, hi)`` as ``kernels.detokenize_actions``
        takes them, and the bundle's bin ``edges`` (default: the uniform 256), whose first and last bin centres
        are the extreme values a token decodes to, e.g. ``["L_gripper [-0.996, 0.996] vs [0, 0.07]"]``."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        b = kernels.UNIFORM_EDGES if edges is None else np.asarray(edges, np.float64)
        ends = [((b[0] + b[1]) / 2 + 1) / 2 * (hi - lo) + lo, ((b[-2] + b[-1]) / 2 + 1) / 2 * (hi - lo) + lo]
        first, last = np.minimum(*ends), np.maximum(*ends)
        out = []
        for i in np.flatnonzero((first < self.joint_lo - 1e-9) | (last > self.joint_hi + 1e-9)):
            out.append(f"{JOINT_NAMES[i]} [{first[i]:.3g}, {last[i]:.3g}] vs [{self.joint_lo[i]:.3g}, "
                       f"{self.joint_hi[i]:.3g}]")
        return out

    @property
    def step_limits(self) -> np.ndarray:
        """(14,) largest change per tick of each entry: rad for joints, m for grippers."""
        return np.where(IS_GRIPPER, self.max_gripper_step_m, self.max_step_rad)


class SafetyFilter:
    """Clamps joint targets and base commands to :class:`SafetyLimits`; counts and logs every clamp.

    Keeps the last commanded targets (arms and base) to apply the per-tick step/acceleration limits.
    Call :meth:`reset` with what the arms hold when (re-)arming, e.g. after an e-stop resume (the loop
    passes the last commanded target, or the measured pose after a firmware reset re-enabled the arms).
    """

    def __init__(self, limits: SafetyLimits | None = None):
        self.limits = limits or SafetyLimits()
        self.clamp_counts: dict[str, int] = {}
        self.last_q14: np.ndarray | None = None
        self.last_vx_mps = 0.0
        self.last_wz_radps = 0.0

    @property
    def total_clamps(self) -> int:
        return sum(self.clamp_counts.values())

    def reset(self, measured_q14=None) -> None:
        """Forget the last commands: the next step limit is relative to ``measured_q14``, base starts at rest."""
        self.last_q14 = None if measured_q14 is None else _vec14(measured_q14, "measured").copy()
        self.last_vx_mps = 0.0
        self.last_wz_radps = 0.0

    def _count(self, name: str, detail: str) -> None:
        joint = clamp_joint(name)  # the scan below runs only for a name not seen yet, not every clamp of a tick
        if name not in self.clamp_counts and not any(clamp_joint(k) == joint for k in self.clamp_counts):
            log.debug("safety: first clamp of %s: %s (%s); the run's summary counts them", joint, name, detail)
        self.clamp_counts[name] = self.clamp_counts.get(name, 0) + 1

    def filter_joints(self, target_q14, measured_q14=None) -> tuple[np.ndarray, list[str]]:
        """Return ``(safe_q14, clamps)``: the target limited to the joint range and the per-tick step.

        The step is measured from the last commanded target, or from ``measured_q14`` when nothing
        was commanded since construction / :meth:`reset`. Raises :class:`UnsafeAction` on NaN/inf or a
        wrong shape in either vector (the caller must then go to the safe state).
        """
        target = _vec14(target_q14, "joint target")
        measured = None if measured_q14 is None else _vec14(measured_q14, "measured joints")
        reference = self.last_q14 if self.last_q14 is not None else measured
        lo, hi = self.limits.joint_lo, self.limits.joint_hi
        clamps: list[str] = []

        safe = np.clip(target, lo, hi)
        for i in np.flatnonzero(safe != target):
            clamps.append(f"{JOINT_NAMES[i]}_limit")
            self._count(clamps[-1], f"target {target[i]:.4f} outside [{lo[i]:.4f}, {hi[i]:.4f}]")

        if reference is not None:
            step = self.limits.step_limits
            stepped = np.clip(safe, reference - step, reference + step)
            # If the reference itself lies outside the range, the range wins over the step.
            stepped = np.clip(stepped, lo, hi)
            for i in np.flatnonzero(stepped != safe):
                clamps.append(f"{JOINT_NAMES[i]}_step")
                self._count(clamps[-1], f"step {safe[i] - reference[i]:+.4f} > {step[i]:.4f} per tick")
            safe = stepped

        self.last_q14 = safe.copy()
        return safe, clamps

    def filter_base(self, vx_mps: float, wz_radps: float, dt_s: float) -> tuple[float, float, list[str]]:
        """Return ``(vx_mps, wz_radps, clamps)`` within the speed limits and the acceleration limits over ``dt_s``.

        Acceleration is measured from the last returned command (zero at start and after
        :meth:`reset`); ``dt_s`` is capped at :data:`MAX_BASE_DT_S`. NaN/inf raise :class:`UnsafeAction`.
        """
        if not (math.isfinite(vx_mps) and math.isfinite(wz_radps)):
            raise UnsafeAction(f"base command: non-finite value (vx={vx_mps}, wz={wz_radps})")
        if not math.isfinite(dt_s) or dt_s < 0:
            raise UnsafeAction(f"base command: bad tick duration dt_s={dt_s}")
        dt_s = min(dt_s, MAX_BASE_DT_S)
        lim = self.limits
        clamps: list[str] = []
        out = []
        for name, value, last, vmax, amax in (
            ("base_vx", vx_mps, self.last_vx_mps, lim.max_vx_mps, lim.max_ax_mps2),
            ("base_wz", wz_radps, self.last_wz_radps, lim.max_wz_radps, lim.max_aw_radps2),
        ):
            v = min(max(value, -vmax), vmax)
            if v != value:
                clamps.append(f"{name}_limit")
                self._count(clamps[-1], f"{value:.3f} beyond +-{vmax:.3f}")
            dv = amax * dt_s
            va = min(max(v, last - dv), last + dv)
            if va != v:
                clamps.append(f"{name}_accel")
                self._count(clamps[-1], f"change {v - last:+.3f} > {dv:.3f} in {dt_s:.3f} s")
            out.append(va)
        self.last_vx_mps, self.last_wz_radps = out
        return out[0], out[1], clamps
