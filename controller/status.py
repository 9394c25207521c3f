"""Builds the retained rollout status from a rollout's rows. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from controller.db import AssignmentRow, RolloutRow
from controller.planner import FINAL_DEVICE_STATES, LEFT_STATES
from shared.messages import DeviceProgress, RolloutState, RolloutStatus

_ROLLOUT_STATES: dict[str, RolloutState] = {
    s: s
    for s in ("Pending", "InProgress", "Paused", "Succeeded", "Failed", "RolledBack", "Aborted")
}


def build_status(
    rollout: RolloutRow,
    assignments: Sequence[AssignmentRow],
    avg_latency_ms: float | None,
    now: float,
) -> RolloutStatus:
    targeted = len(assignments)
    updated = sum(a.state == "activated" for a in assignments)
    failed = sum(
        a.state in FINAL_DEVICE_STATES and a.state != "activated" and a.state not in LEFT_STATES
        for a in assignments
    )
    return RolloutStatus(
        rollout_id=rollout.rollout_id,
        model=rollout.model,
        version=rollout.version,
        strategy=rollout.strategy,
        status=_ROLLOUT_STATES[rollout.status],
        devices_targeted=targeted,
        devices_updated=updated,
        devices_failed=failed,
        devices_pending=targeted - updated - failed,
        success_rate=round(100.0 * updated / targeted, 2) if targeted else 0.0,
        avg_inference_latency=round(avg_latency_ms, 4) if avg_latency_ms is not None else None,
        stage="all" if rollout.status not in ("Pending",) else "",
        devices=tuple(_progress(a) for a in assignments),
        reason=rollout.reason,
        created_at=datetime.fromtimestamp(rollout.created_at, UTC),
        updated_at=datetime.fromtimestamp(now, UTC),
    )


def _progress(a: AssignmentRow) -> DeviceProgress:
    """One device's line: its deploy's state, or its rollback's once one was sent."""
    if a.rollback_state == "rolled_back":
        return DeviceProgress(device_id=a.device_id, state="rolled_back", reason=a.reason)
    if a.rollback_state in ("failed", "timed_out"):
        reason = a.reason if a.rollback_state == "failed" else "no answer to the rollback"
        return DeviceProgress(device_id=a.device_id, state="rollback_failed", reason=reason)
    return DeviceProgress(device_id=a.device_id, state=a.state, reason=a.reason)
