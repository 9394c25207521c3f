"""The rollout planner: a pure function from what the database says to actions.

`plan_next_actions(rollout, stages, assignments, gates, now)` has no I/O and no
clock of its own; the executor (controller.service) loads the inputs, persists
the intent of each action and only then publishes. Every decision is re-derived
from the rows on every tick, so a controller killed at any moment resumes where
it was. Tested with plain data.

A stage runs like this: deploy to its pending devices (or one region-wide
command), time out the ones that take too long, *settle* once every device of
the stage is final, *bake* for the stage's duration while the gates watch, then
advance (or wait for the operator's approval, or pause when the gates stay
inconclusive). A failing gate or too many failed devices starts a rollback:
every device that activated the candidate gets a rollback command, and the
rollout ends `RolledBack` once they answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from controller.gates import Verdict
from controller.strategies import Stage
from shared.messages import RolloutState, StrategyName

# Device progress within a rollout, in the order it normally advances.
DEVICE_STATES = (
    "pending",
    "sent",
    "received",
    "downloading",
    "verified",
    "staged",  # blue-green: loaded in standby, waiting for the switch
    "switching",  # blue-green: the switch command is out
    "activated",
    "failed",
    "rolled_back",
    "timed_out",
    "cancelled",  # taken out of the rollout: superseded by another one, or revoked
)
FINAL_DEVICE_STATES = frozenset({"activated", "failed", "rolled_back", "timed_out", "cancelled"})
FINAL_ROLLBACK_STATES = frozenset({"rolled_back", "failed", "timed_out"})
# Final, but neither a success nor a failure: the device left the rollout.
LEFT_STATES = frozenset({"cancelled"})
# What a device that timed out may still say about the same command: the record then
# shows what it really runs (its deploy was bounded by the command's expiry, not undone).
LATE_ANSWERS = frozenset({"staged", "activated", "failed"})
_RANK = {s: i for i, s in enumerate(DEVICE_STATES)}


def advances(current: str, new: str) -> bool:
    """Whether an event moving `current` to `new` may be applied.

    Final records never reopen, except a timed-out one that gets a late final
    answer to the same command (the device did it: the record must say so);
    duplicates and out-of-order progress never move a record backwards.
    """
    if current == "timed_out":
        return new in LATE_ANSWERS
    if current in FINAL_DEVICE_STATES:
        return False
    return _RANK.get(new, -1) > _RANK.get(current, -1)


@dataclass(frozen=True, slots=True)
class RolloutView:
    """A rollout as the planner reads it (the typed snapshot of its row)."""

    rollout_id: str
    strategy: StrategyName
    status: RolloutState
    device_timeout_s: float
    stage_index: int = 0
    stage_settled_at: float | None = None
    approved_stage: int = 0  # the operator approved starting stages up to this index
    rolling_back: bool = False
    manual_approval: bool = False
    has_gates: bool = False
    max_failure_percent: float = 0.0
    min_executed: int = 1
    retries: int = 0
    version: str = ""  # A of an A/B test
    version_b: str | None = None
    winner: str | None = None


_STRATEGIES: dict[str, StrategyName] = {
    s: s
    for s in (
        "direct",
        "canary",
        "progressive",
        "regional",
        "rolling",
        "ab",
        "blue-green",
        "shadow",
    )
}
_STATUSES: dict[str, RolloutState] = {
    s: s
    for s in ("Pending", "InProgress", "Paused", "Succeeded", "Failed", "RolledBack", "Aborted")
}


def strategy_name(text: str) -> StrategyName:
    """A stored strategy as its type; ValueError for one this controller does not know."""
    try:
        return _STRATEGIES[text]
    except KeyError:
        raise ValueError(f"unknown strategy {text!r}") from None


def rollout_state(text: str) -> RolloutState:
    """A stored rollout status as its type; ValueError for an unknown one."""
    try:
        return _STATUSES[text]
    except KeyError:
        raise ValueError(f"unknown rollout status {text!r}") from None


@dataclass(frozen=True, slots=True)
class AssignmentView:
    device_id: str
    state: str
    sent_at: float | None
    reason: str | None = None
    rollback_state: str | None = None
    rollback_sent_at: float | None = None
    attempts: int = 0
    command_id: str | None = None
    rollback_command_id: str | None = None
    version: str = ""  # A/B: the side this device is to run ("" means the rollout's)


@dataclass(frozen=True, slots=True)
class GateReading:
    verdict: Verdict
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ABChoice:
    """The A/B reading the planner acts on: the winning side, or None (inconclusive)."""

    winner: Literal["a", "b"] | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartRollout:
    pass


@dataclass(frozen=True, slots=True)
class DecideWinner:
    version: str
    detail: str


@dataclass(frozen=True, slots=True)
class SendDeploy:
    device_id: str
    activate: bool = True  # False: stage only (blue-green)
    shadow: bool = False  # stage and mirror live inputs to it (shadow)


@dataclass(frozen=True, slots=True)
class SendRegionDeploy:
    region: str
    devices: tuple[str, ...]
    activate: bool = True


@dataclass(frozen=True, slots=True)
class SendSwitch:
    """Flip staged devices to the candidate (the executor sends one command per region)."""

    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TimeOutDevice:
    device_id: str


@dataclass(frozen=True, slots=True)
class RetryDevice:
    """Send the same target again, under a new command id."""

    device_id: str


@dataclass(frozen=True, slots=True)
class SettleStage:
    index: int


@dataclass(frozen=True, slots=True)
class AdvanceStage:
    index: int


@dataclass(frozen=True, slots=True)
class PauseRollout:
    reason: str


@dataclass(frozen=True, slots=True)
class BeginRollback:
    reason: str


@dataclass(frozen=True, slots=True)
class SendRollback:
    device_id: str


@dataclass(frozen=True, slots=True)
class TimeOutRollback:
    device_id: str


@dataclass(frozen=True, slots=True)
class FinishRollout:
    status: str
    reason: str | None


Action = (
    StartRollout
    | DecideWinner
    | SendDeploy
    | SendRegionDeploy
    | SendSwitch
    | TimeOutDevice
    | RetryDevice
    | SettleStage
    | AdvanceStage
    | PauseRollout
    | BeginRollback
    | SendRollback
    | TimeOutRollback
    | FinishRollout
)


def plan_next_actions(
    rollout: RolloutView,
    stages: Sequence[Stage],
    assignments: Sequence[AssignmentView],
    gates: GateReading | None,
    now: float,
    ab: ABChoice | None = None,
) -> list[Action]:
    """What to do next; `gates` is None when the rollout has no gates, `ab` unless A/B.

    Invariant: at most one command intent per device (a device pending in the current
    stage and in an earlier one, as A/B winners and retried devices are, is sent once).
    """
    return _one_command_per_device(_plan(rollout, stages, assignments, gates, now, ab))


def _one_command_per_device(actions: list[Action]) -> list[Action]:
    seen: set[str] = set()
    out: list[Action] = []
    for x in actions:
        if isinstance(x, SendDeploy):
            if x.device_id in seen:
                continue
            seen.add(x.device_id)
        elif isinstance(x, SendRegionDeploy | SendSwitch):
            devices = tuple(d for d in x.devices if d not in seen)
            if not devices:
                continue
            seen.update(devices)
            x = replace(x, devices=devices)
        out.append(x)
    return out


def _plan(
    rollout: RolloutView,
    stages: Sequence[Stage],
    assignments: Sequence[AssignmentView],
    gates: GateReading | None,
    now: float,
    ab: ABChoice | None,
) -> list[Action]:
    if rollout.status not in ("Pending", "InProgress"):
        return []
    actions: list[Action] = []
    if rollout.status == "Pending":
        actions.append(StartRollout())
    if rollout.rolling_back:
        return actions + _plan_rollback(rollout, assignments, now)
    if not stages:
        return [*actions, FinishRollout("Failed", "the rollout has no target devices")]

    # Retries first: a device with attempts left is not counted as failed yet.
    retry = [
        a
        for a in assignments
        if rollout.retries
        and a.state in ("failed", "timed_out")
        and a.attempts <= rollout.retries  # attempts counts sends: 1 + retries in all
    ]
    if retry:
        actions += [RetryDevice(a.device_id) for a in retry]
        retrying = {a.device_id for a in retry}
        assignments = [
            AssignmentView(a.device_id, "pending", None) if a.device_id in retrying else a
            for a in assignments
        ]
    gated = rollout.strategy != "direct"
    if gated:
        finished = [
            a for a in assignments if a.state in FINAL_DEVICE_STATES and a.state not in LEFT_STATES
        ]
        failed = [a for a in finished if a.state != "activated"]
        if (
            failed
            and len(finished) >= rollout.min_executed
            and 100.0 * len(failed) / len(finished) > rollout.max_failure_percent
        ):
            return [
                *actions,
                BeginRollback(
                    f"{len(failed)} of {len(finished)} devices failed, over the "
                    f"{rollout.max_failure_percent:g}% abort threshold: {_failures(failed)}"
                ),
            ]
    if gates is not None and gates.verdict == "fail":
        return [*actions, BeginRollback(f"gate failed: {gates.detail}")]

    by_device = {a.device_id: a for a in assignments}
    index = min(rollout.stage_index, len(stages) - 1)
    stage = stages[index]
    members = [by_device[d] for d in stage.devices if d in by_device]
    pending = tuple(a.device_id for a in members if a.state == "pending")
    activate = stage.action not in ("stage", "shadow")
    if stage.action == "shadow":
        actions += [SendDeploy(d, activate=False, shadow=True) for d in pending]
    elif stage.action == "switch":
        staged = tuple(a.device_id for a in members if a.state == "staged")
        if staged:
            actions.append(SendSwitch(staged))
        actions += [SendDeploy(d, activate=False) for d in pending]  # retried ones: stage first
    elif pending and stage.region is not None:
        actions.append(SendRegionDeploy(stage.region, pending, activate))
    else:
        actions += [SendDeploy(d, activate) for d in pending]
    # Retried devices of stages already passed go again on their own.
    earlier = {d for s in stages[:index] for d in s.devices}
    actions += [
        SendDeploy(a.device_id)
        for a in assignments
        if a.device_id in earlier and a.state == "pending"
    ]
    members = members + [a for a in assignments if a.device_id in earlier and a.state == "pending"]
    staging = stage.action in ("stage", "shadow")
    done_states = FINAL_DEVICE_STATES | {"staged"} if staging else FINAL_DEVICE_STATES
    actions += _timeouts(
        [a for a in members if a.state not in done_states], rollout.device_timeout_s, now
    )
    if not all(a.state in done_states for a in members):
        return actions
    if rollout.stage_settled_at is None:
        return [*actions, SettleStage(index)]
    if now < rollout.stage_settled_at + stage.bake_s:
        return actions  # baking: the gates keep watching
    last = index == len(stages) - 1
    if last and stage.action == "shadow":
        # Nothing was served: the verdict of the gates is the result.
        if (
            gates is not None
            and gates.verdict == "inconclusive"
            and rollout.approved_stage <= index
        ):
            return [
                *actions,
                PauseRollout(f"shadow: gates inconclusive ({gates.detail}); approve to accept"),
            ]
        shadowing = sum(a.state == "staged" for a in assignments)
        return [
            *actions,
            FinishRollout(
                "Succeeded" if shadowing else "Failed",
                f"shadow on {shadowing} of {len(assignments)} devices; nothing was served",
            ),
        ]
    if last:
        return [*actions, _finish(assignments, gated)]
    following = stages[index + 1].name
    if rollout.strategy == "ab" and rollout.winner is None:
        choice = ab.winner if ab is not None else None
        if choice is None and rollout.approved_stage <= index:
            detail = ab.detail if ab is not None else "no reading"
            return [
                *actions,
                PauseRollout(f"a/b test inconclusive ({detail}); approve to keep A"),
            ]
        version = rollout.version_b if choice == "b" and rollout.version_b else rollout.version
        return [*actions, DecideWinner(version, ab.detail if ab is not None else "approved")]
    if gates is not None and gates.verdict == "inconclusive" and rollout.approved_stage <= index:
        return [
            *actions,
            PauseRollout(
                f"stage {stage.name}: gates inconclusive ({gates.detail}); "
                f"approve to start stage {following}"
            ),
        ]
    if rollout.manual_approval and rollout.approved_stage <= index:
        return [
            *actions,
            PauseRollout(f"stage {stage.name} done; waiting for approval to start {following}"),
        ]
    return [*actions, AdvanceStage(index + 1)]


def _timeouts(
    members: Sequence[AssignmentView], timeout_s: float, now: float
) -> list[TimeOutDevice]:
    return [
        TimeOutDevice(a.device_id)
        for a in members
        if a.state not in FINAL_DEVICE_STATES
        and a.sent_at is not None
        and now - a.sent_at >= timeout_s
    ]


def _plan_rollback(
    rollout: RolloutView, assignments: Sequence[AssignmentView], now: float
) -> list[Action]:
    actions: list[Action] = []
    for a in assignments:
        if a.state == "activated" and a.rollback_state is None:
            actions.append(SendRollback(a.device_id))
        elif (
            a.rollback_state == "sent"
            and a.rollback_sent_at is not None
            and now - a.rollback_sent_at >= rollout.device_timeout_s
        ):
            actions.append(TimeOutRollback(a.device_id))
    # Staged devices still serve the old model: nothing to wait for or undo there.
    in_flight = [
        a
        for a in assignments
        if a.state not in FINAL_DEVICE_STATES and a.state not in ("pending", "staged")
    ]
    actions += _timeouts(in_flight, rollout.device_timeout_s, now)
    waiting = in_flight + [
        a
        for a in assignments
        if a.state == "activated" and a.rollback_state not in FINAL_ROLLBACK_STATES
    ]
    if not waiting and not any(isinstance(x, SendRollback) for x in actions):
        # Only what the devices confirmed counts: a refused or unanswered rollback
        # leaves that device on the candidate, and the record must say so.
        unconfirmed = [a for a in assignments if a.rollback_state in ("failed", "timed_out")]
        if unconfirmed:
            shown = ", ".join(
                f"{a.device_id}: {a.reason if a.rollback_state == 'failed' else 'no answer'}"
                for a in unconfirmed[:5]
            )
            more = f" (+{len(unconfirmed) - 5} more)" if len(unconfirmed) > 5 else ""
            reverted = sum(a.rollback_state == "rolled_back" for a in assignments)
            actions.append(
                FinishRollout(
                    "Failed",
                    f"rollback failed on {len(unconfirmed)} device(s), {reverted} rolled back: "
                    f"{shown}{more}",
                )
            )
        else:
            actions.append(FinishRollout("RolledBack", None))
    return actions


def _failures(failed: Sequence[AssignmentView]) -> str:
    shown = ", ".join(f"{a.device_id}: {a.reason or a.state}" for a in failed[:5])
    return shown + (f" (+{len(failed) - 5} more)" if len(failed) > 5 else "")


def _finish(assignments: Sequence[AssignmentView], gated: bool) -> FinishRollout:
    left = [a for a in assignments if a.state in LEFT_STATES]
    remaining = [a for a in assignments if a.state not in LEFT_STATES]
    if not remaining:
        reasons = sorted({a.reason or a.state for a in left})
        return FinishRollout("Aborted", f"every device left the rollout ({', '.join(reasons)})")
    failed = [a for a in remaining if a.state != "activated"]
    if not failed:
        return FinishRollout("Succeeded", None)
    summary = f"{len(failed)} of {len(remaining)} devices failed: {_failures(failed)}"
    # A gated rollout got here within its abort threshold: the fleet is on the candidate.
    return FinishRollout("Succeeded" if gated else "Failed", summary)


# ------------------------------------------------------------ resending open commands


@dataclass(frozen=True, slots=True)
class ResendDeploy:
    """The same deploy again (same command id): the device answers without redoing work."""

    device_id: str
    command_id: str
    since: float | None
    activate: bool = True
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class ResendSwitch:
    device_id: str
    command_id: str
    since: float | None


@dataclass(frozen=True, slots=True)
class ResendRollback:
    device_id: str
    command_id: str
    since: float | None


Resend = ResendDeploy | ResendSwitch | ResendRollback


def plan_resends(strategy: str, assignments: Sequence[AssignmentView]) -> list[Resend]:
    """Every command whose outcome is still open, to be sent again under its own id.

    After the controller reconnects (what it published may have died with the
    broker), and for one device when it comes back online (its session, and the
    commands queued in it, may be gone). At most one command per device: a device
    rolling back gets its rollback, not the deploy it already answered.
    """
    out: list[Resend] = []
    stage_only = strategy in ("blue-green", "shadow")
    for a in assignments:
        if a.rollback_command_id and a.rollback_state == "sent":
            out.append(ResendRollback(a.device_id, a.rollback_command_id, a.rollback_sent_at))
        elif not a.command_id:
            continue
        elif a.state == "switching":
            out.append(ResendSwitch(a.device_id, a.command_id, a.sent_at))
        elif a.state not in FINAL_DEVICE_STATES and a.state not in ("staged", "pending"):
            out.append(
                ResendDeploy(
                    a.device_id,
                    a.command_id,
                    a.sent_at,
                    activate=not stage_only,
                    shadow=strategy == "shadow",
                )
            )
    return out


# ------------------------------------------------------------ operator controls


@dataclass(frozen=True, slots=True)
class ControlPlan:
    """What an operator's control does to a rollout's row (the executor persists it).

    `changes`: the row's fields to set; `finish`: end it with this status and reason
    (its claims released); `reclaim`: a finished rollout reopens (rollback) and must
    take its devices' claims back first.
    """

    changes: tuple[tuple[str, object], ...] = ()
    finish: tuple[str, str] | None = None
    reclaim: bool = False


@dataclass(frozen=True, slots=True)
class ControlRefused:
    reason: str


FINAL_ROLLOUT_STATUSES = frozenset({"Succeeded", "Failed", "RolledBack", "Aborted"})


def plan_control(
    action: str, status: str, *, rolling_back: bool, stage_index: int, approved_stage: int
) -> ControlPlan | ControlRefused:
    """The operator's approve, pause, resume, abort or rollback of a rollout in `status`."""
    final = status in FINAL_ROLLOUT_STATUSES
    refused = ControlRefused(f"it is {status}")
    if action == "approve":
        if final:
            return refused
        return ControlPlan(
            (
                ("status", "InProgress" if status == "Paused" else status),
                ("approved_stage", max(approved_stage, stage_index + 1)),
                ("reason", None),
            )
        )
    if action == "pause":
        if status not in ("Pending", "InProgress"):
            return refused
        return ControlPlan((("status", "Paused"), ("reason", "paused by the operator")))
    if action == "resume":
        if status != "Paused":
            return refused
        return ControlPlan((("status", "InProgress"), ("reason", None)))
    if action == "abort":
        if final:
            return refused
        return ControlPlan(finish=("Aborted", "aborted by the operator"))
    if action == "rollback":
        if status == "RolledBack" or rolling_back:
            return refused
        return ControlPlan(
            (
                ("status", "InProgress"),
                ("rolling_back", True),
                ("finished_at", None),
                ("reason", "rolled back by the operator"),
            ),
            reclaim=final,
        )
    return ControlRefused(f"{action!r} is not a control")
