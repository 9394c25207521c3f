"""Builds the retained rollout status from counts of a rollout's devices. Pure: no I/O.

The status is a bounded summary: counts per state, the stage, the gates, the
cohorts; its size does not depend on the number of devices. Rollouts of at most
`STATUS_DEVICE_LINES` devices also carry each device's line; larger ones page
through `ListRolloutDevices`. `gate_line` and `cohort_window` render the gates'
readings (estimate, interval, what each side counted) for the CLI.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from controller.db import RolloutRow
from controller.planner import FINAL_DEVICE_STATES, LEFT_STATES, AssignmentView, rollout_state
from shared.messages import CohortSummary, DeviceProgress, GateVerdict, RolloutStatus


def device_states(counts: Mapping[str, int], rollback_counts: Mapping[str, int]) -> dict[str, int]:
    """Devices per state as operators read them: a device whose rollback answered shows
    `rolled_back` or `rollback_failed` instead of `activated`."""
    shown: Counter[str] = Counter({k: v for k, v in counts.items() if v > 0})
    moved = {
        "rolled_back": rollback_counts.get("rolled_back", 0),
        "rollback_failed": rollback_counts.get("failed", 0) + rollback_counts.get("timed_out", 0),
    }
    for state, n in moved.items():
        if n > 0:
            shown["activated"] -= n
            shown[state] += n
    return {k: v for k, v in sorted(shown.items()) if v > 0}


def build_status(
    rollout: RolloutRow,
    counts: Mapping[str, int],
    rollback_counts: Mapping[str, int],
    lines: Sequence[DeviceProgress],
    avg_latency_ms: float | None,
    now: float,
) -> RolloutStatus:
    targeted = sum(counts.values())
    updated = counts.get("activated", 0)
    failed = sum(
        n
        for state, n in counts.items()
        if state in FINAL_DEVICE_STATES and state != "activated" and state not in LEFT_STATES
    )
    return RolloutStatus(
        rollout_id=rollout.rollout_id,
        model=rollout.model,
        version=rollout.version,
        strategy=rollout.strategy,
        status=rollout_state(rollout.status),
        devices_targeted=targeted,
        devices_updated=updated,
        devices_failed=failed,
        devices_pending=targeted - updated - failed,
        success_rate=round(100.0 * updated / targeted, 2) if targeted else 0.0,
        avg_inference_latency=round(avg_latency_ms, 4) if avg_latency_ms is not None else None,
        stage="all" if rollout.status not in ("Pending",) else "",
        device_states=device_states(counts, rollback_counts),
        devices=tuple(lines),
        reason=rollout.reason,
        created_at=datetime.fromtimestamp(rollout.created_at, UTC),
        updated_at=datetime.fromtimestamp(now, UTC),
    )


def progress(a: AssignmentView) -> DeviceProgress:
    """One device's line: its deploy's state, or its rollback's once one was sent."""
    if a.rollback_state == "rolled_back":
        return DeviceProgress(device_id=a.device_id, state="rolled_back", reason=a.reason)
    if a.rollback_state in ("failed", "timed_out"):
        reason = a.reason if a.rollback_state == "failed" else "no answer to the rollback"
        return DeviceProgress(device_id=a.device_id, state="rollback_failed", reason=reason)
    return DeviceProgress(device_id=a.device_id, state=a.state, reason=a.reason)


def gate_line(v: GateVerdict) -> str:
    """One gate as operators read it: verdict, estimate and interval against the threshold,
    what each side counted, how it was computed (or why there is no verdict yet)."""
    reading = "-"
    if v.observed is not None:
        reading = f"{v.observed:.4g}"
        if v.low is not None and v.level is not None:
            high = f"{v.high:.4g}" if v.high is not None else "unbounded"
            reading += f" [{v.low:.4g}, {high}] ({interval_levels(v)})"
    counted = ""
    if v.samples is not None:
        counted = f"; candidate {v.samples} samples"
        if v.devices is not None:
            counted += f", {v.devices} devices"
        if v.baseline_samples is not None:
            counted += f"; baseline {v.baseline_samples} samples"
            if v.baseline_devices is not None:
                counted += f", {v.baseline_devices} devices"
    threshold = "-" if v.threshold is None else f"{v.threshold:g}"
    detail = v.detail
    if v.method and v.method != detail:
        detail = f"{detail} ({v.method})" if detail else v.method
    tail = f"; {detail}" if detail else ""
    return f"{v.gate}: {v.verdict.replace('_', ' ')}, {reading} vs {threshold}{counted}{tail}"


def one_sided(level: float) -> str:
    """A one-sided level as a percentage with two significant digits of what it leaves
    out: 99.5%, 99.951%, 99.99977%."""
    left = 100 * (1 - level)
    digits = max(1, 1 - math.floor(math.log10(left))) if left > 0 else 1
    return f"{100 * level:.{digits}f}".rstrip("0").rstrip(".") + "%"


def interval_levels(v: GateVerdict) -> str:
    """`99% interval`, or, for a reading with a sequential fail bound, each bound's
    one-sided level: `low 99.951%, high 99.5% one-sided` (low is a `max_` gate's fail
    bound, high a `min_` gate's)."""
    assert v.level is not None
    if v.fail_level is None:
        return f"{v.level:.0%} interval"
    other = one_sided((1 + v.level) / 2)
    fail = one_sided(v.fail_level)
    if v.gate.startswith("min_"):
        return f"low {other}, high {fail} one-sided"
    return f"low {fail}, high {other} one-sided"


def cohort_window(summary: CohortSummary) -> str | None:
    """The comparison window and settle rule a cohort's numbers cover, for operators."""
    parts = []
    if summary.quantiles:
        parts.append(f"quantiles from {summary.quantiles}")
    if summary.window_start is not None:
        parts.append(f"compared from {summary.window_start:%H:%M:%S} UTC")
    if summary.settle:
        parts.append(f"settle: {summary.settle}")
    return "; ".join(parts) or None
