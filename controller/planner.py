"""The rollout planner: a pure function from what a rollout's state says to actions.

`plan_next_actions(rollout, stages, progress, gates, now)` has no I/O and no
clock of its own; the executor (controller.service) persists the intent of each
action and only then publishes. It reads the rollout's devices through
`controller.progress.Progress` (counts and small indexes kept in step with every
change), so a step costs what it decides, not the rollout's size. Every decision
is re-derived from that state on every step, so a controller killed at any
moment resumes where it was. Tested with plain data.

A stage runs like this: deploy to its pending devices (or one region-wide
command), time out the ones that take too long, *settle* once every device of
the stage is final, *bake* for the stage's duration while the gates watch, then
advance (or wait for the operator's approval, or pause when the gates stay
inconclusive). A failing gate or too many failed devices starts a rollback:
every device that activated the candidate gets a rollback command, and the
rollout ends `RolledBack` once they answered. What differs per strategy is read
from its `controller.strategies.Strategy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from controller.gates import Verdict
from controller.progress import (
    DEVICE_STATES,
    FINAL_DEVICE_STATES,
    FINAL_ROLLBACK_STATES,
    LEFT_STATES,
    AssignmentView,
    Progress,
)
from controller.strategies import Stage, strategy
from shared.messages import RolloutState, StrategyName

__all__ = [
    "DEVICE_STATES",
    "FINAL_DEVICE_STATES",
    "FINAL_ROLLBACK_STATES",
    "LEFT_STATES",
    "AssignmentView",
    "Progress",
]

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


_STATUSES: dict[str, RolloutState] = {
    s: s
    for s in ("Pending", "InProgress", "Paused", "Succeeded", "Failed", "RolledBack", "Aborted")
}


def strategy_name(text: str) -> StrategyName:
    """A stored strategy as its type; ValueError for one this controller does not know."""
    return strategy(text).name


def rollout_state(text: str) -> RolloutState:
    """A stored rollout status as its type; ValueError for an unknown one."""
    try:
        return _STATUSES[text]
    except KeyError:
        raise ValueError(f"unknown rollout status {text!r}") from None


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
    progress: Progress,
    gates: GateReading | None,
    now: float,
    ab: ABChoice | None = None,
) -> list[Action]:
    """What to do next; `gates` is None when the rollout has no gates, `ab` unless A/B.

    Invariant: at most one command intent per device (a device pending in the current
    stage and in an earlier one, as A/B winners and retried devices are, is sent once).
    Devices are named in the order of their ids.
    """
    return _one_command_per_device(_plan(rollout, stages, progress, gates, now, ab))


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
    progress: Progress,
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
        return actions + _plan_rollback(rollout, progress, now)
    if not stages:
        return [*actions, FinishRollout("Failed", "the rollout has no target devices")]
    kind = strategy(rollout.strategy)

    # Retries first: a device with attempts left is not counted as failed yet
    # (attempts counts sends: 1 + retries in all).
    retrying = set(progress.retryable) if rollout.retries else set()
    actions += [RetryDevice(d) for d in sorted(retrying)]
    if kind.failure_threshold:
        finished = progress.finished() - len(retrying)
        failed = finished - progress.counts["activated"]
        if (
            failed
            and finished >= rollout.min_executed
            and 100.0 * failed / finished > rollout.max_failure_percent
        ):
            return [
                *actions,
                BeginRollback(
                    f"{failed} of {finished} devices failed, over the "
                    f"{rollout.max_failure_percent:g}% abort threshold: "
                    f"{_failures(progress, progress.failures - retrying, failed)}"
                ),
            ]
    if gates is not None and gates.verdict == "fail":
        return [*actions, BeginRollback(f"gate failed: {gates.detail}")]

    index = min(rollout.stage_index, len(stages) - 1)
    stage = stages[index]

    def waiting(i: int) -> list[str]:
        """Stage i's devices to send to: pending, or to be retried."""
        again = [d for d in retrying if i in progress.stage_of.get(d, ())]
        return sorted(progress.pending[i].union(again))

    pending = tuple(waiting(index))
    if stage.action == "shadow":
        actions += [SendDeploy(d, activate=False, shadow=True) for d in pending]
    elif stage.action == "switch":
        staged = tuple(sorted(progress.staged[index]))
        if staged:
            actions.append(SendSwitch(staged))
        actions += [SendDeploy(d, activate=False) for d in pending]  # retried ones: stage first
    elif pending and stage.region is not None:
        actions.append(SendRegionDeploy(stage.region, pending, stage.action != "stage"))
    else:
        actions += [SendDeploy(d, stage.action != "stage") for d in pending]
    # Retried devices of stages already passed go again on their own.
    earlier = sorted({d for i in range(index) for d in waiting(i)})
    actions += [SendDeploy(d) for d in earlier]
    staging = stage.action in ("stage", "shadow")
    actions += [TimeOutDevice(d) for d in progress.timed_out(index, now, rollout.device_timeout_s)]
    if retrying or progress.not_done(index, staged_is_done=staging):
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
        shadowing = progress.counts["staged"]
        return [
            *actions,
            FinishRollout(
                "Succeeded" if shadowing else "Failed",
                f"shadow on {shadowing} of {progress.total} devices; nothing was served",
            ),
        ]
    if last:
        return [*actions, _finish(progress, kind.failure_threshold)]
    following = stages[index + 1].name
    if kind.two_versions and rollout.winner is None:
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


def _plan_rollback(rollout: RolloutView, progress: Progress, now: float) -> list[Action]:
    timeout = rollout.device_timeout_s
    actions: list[Action] = [SendRollback(d) for d in sorted(progress.rollback_todo)]
    actions += [TimeOutRollback(d) for d in sorted(progress.rollback_sent.expired(now, timeout))]
    # Staged devices still serve the old model: nothing to wait for or undo there.
    actions += [TimeOutDevice(d) for d in sorted(progress.sent.expired(now, timeout))]
    waiting = len(progress.in_flight) + progress.counts["activated"] - progress.activated_rolled
    if waiting or progress.rollback_todo:
        return actions
    # Only what the devices confirmed counts: a refused or unanswered rollback leaves
    # that device on the candidate, and the record must say so.
    unconfirmed = progress.rollback_problems
    if not unconfirmed:
        return [*actions, FinishRollout("RolledBack", None)]
    shown = ", ".join(
        f"{a.device_id}: {a.reason if a.rollback_state == 'failed' else 'no answer'}"
        for a in progress.smallest(unconfirmed)
    )
    more = f" (+{len(unconfirmed) - 5} more)" if len(unconfirmed) > 5 else ""
    reverted = progress.rollback_counts["rolled_back"]
    return [
        *actions,
        FinishRollout(
            "Failed",
            f"rollback failed on {len(unconfirmed)} device(s), {reverted} rolled back: "
            f"{shown}{more}",
        ),
    ]


def _failures(progress: Progress, failed: set[str], count: int) -> str:
    shown = ", ".join(f"{a.device_id}: {a.reason or a.state}" for a in progress.smallest(failed))
    return shown + (f" (+{count - 5} more)" if count > 5 else "")


def _finish(progress: Progress, gated: bool) -> FinishRollout:
    remaining = progress.total - len(progress.left)
    if not remaining:
        left = [progress.views[d] for d in progress.left]
        reasons = sorted({a.reason or a.state for a in left})
        return FinishRollout("Aborted", f"every device left the rollout ({', '.join(reasons)})")
    failed = remaining - progress.counts["activated"]
    if not failed:
        return FinishRollout("Succeeded", None)
    shown = _failures(progress, progress.failures, failed)
    summary = f"{failed} of {remaining} devices failed: {shown}"
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


def plan_resends(strategy_of: str, assignments: Sequence[AssignmentView]) -> list[Resend]:
    """Every command whose outcome is still open, to be sent again under its own id.

    After the controller reconnects (what it published may have died with the
    broker), and for one device when it comes back online (its session, and the
    commands queued in it, may be gone). At most one command per device: a device
    rolling back gets its rollback, not the deploy it already answered.
    """
    out: list[Resend] = []
    kind = strategy(strategy_of)
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
                    activate=not kind.standby,
                    shadow=kind.mirrors,
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
