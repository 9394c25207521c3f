"""The rollout planner: a pure function from what the database says to actions.

`plan_next_actions(rollout, assignments, now)` has no I/O and no clock of its
own; the executor (controller.service) loads the inputs, persists the intent of
each action and only then publishes. Tested with plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.strategies import STRATEGIES

# Device progress within a rollout, in the order it normally advances.
DEVICE_STATES = (
    "pending",
    "sent",
    "received",
    "downloading",
    "verified",
    "activated",
    "failed",
    "rolled_back",
    "timed_out",
)
FINAL_DEVICE_STATES = frozenset({"activated", "failed", "rolled_back", "timed_out"})
_RANK = {s: i for i, s in enumerate(DEVICE_STATES)}


def advances(current: str, new: str) -> bool:
    """Whether an event moving `current` to `new` may be applied.

    Final records never reopen (a late success after a timeout changes nothing);
    duplicates and out-of-order progress never move a record backwards.
    """
    if current in FINAL_DEVICE_STATES:
        return False
    return _RANK.get(new, -1) > _RANK.get(current, -1)


@dataclass(frozen=True, slots=True)
class RolloutView:
    rollout_id: str
    strategy: str
    status: str
    device_timeout_s: float


@dataclass(frozen=True, slots=True)
class AssignmentView:
    device_id: str
    state: str
    sent_at: float | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class StartRollout:
    pass


@dataclass(frozen=True, slots=True)
class SendDeploy:
    device_id: str


@dataclass(frozen=True, slots=True)
class TimeOutDevice:
    device_id: str


@dataclass(frozen=True, slots=True)
class FinishRollout:
    status: str
    reason: str | None


Action = StartRollout | SendDeploy | TimeOutDevice | FinishRollout


def plan_next_actions(
    rollout: RolloutView, assignments: Sequence[AssignmentView], now: float
) -> list[Action]:
    if rollout.status not in ("Pending", "InProgress"):
        return []
    actions: list[Action] = []
    if rollout.status == "Pending":
        actions.append(StartRollout())
    by_device = {a.device_id: a for a in assignments}
    stages = STRATEGIES[rollout.strategy](list(by_device))
    for stage in stages:
        members = [by_device[d] for d in stage.devices]
        actions += [SendDeploy(a.device_id) for a in members if a.state == "pending"]
        actions += [
            TimeOutDevice(a.device_id)
            for a in members
            if a.state not in FINAL_DEVICE_STATES
            and a.sent_at is not None
            and now - a.sent_at >= rollout.device_timeout_s
        ]
        if not all(a.state in FINAL_DEVICE_STATES for a in members):
            return actions  # later stages wait for this one
    actions.append(_finish(assignments))
    return actions


def _finish(assignments: Sequence[AssignmentView]) -> FinishRollout:
    failed = [a for a in assignments if a.state != "activated"]
    if not failed:
        return FinishRollout("Succeeded", None)
    shown = ", ".join(f"{a.device_id}: {a.reason or a.state}" for a in failed[:5])
    more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
    return FinishRollout(
        "Failed", f"{len(failed)} of {len(assignments)} devices failed: {shown}{more}"
    )
