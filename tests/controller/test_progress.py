"""`Progress`, what the planner reads of a rollout's devices: kept in step change by
change, and read by a step without walking every device."""

from __future__ import annotations

import random
from collections.abc import Iterator

from controller.planner import (
    AdvanceStage,
    GateReading,
    RolloutView,
    SendDeploy,
    SettleStage,
    TimeOutDevice,
    plan_next_actions,
)
from controller.progress import DEVICE_STATES, AssignmentView, Progress
from controller.strategies import Stage

STAGES = [Stage("s0", ("a", "b"), bake_s=5), Stage("s1", ("c", "d")), Stage("s2", ("e",))]


def _snapshot(p: Progress) -> dict[str, object]:
    return {
        "views": dict(p.views),
        "counts": +p.counts,
        "rollback_counts": +p.rollback_counts,
        "stage_counts": [+c for c in p.stage_counts],
        "pending": p.pending,
        "staged": p.staged,
        "in_flight": p.in_flight,
        "sent": p.sent.keys,
        "retryable": p.retryable,
        "failures": p.failures,
        "left": p.left,
        "rollback_todo": p.rollback_todo,
        "rollback_open": p.rollback_open,
        "rollback_sent": p.rollback_sent.keys,
        "rollback_problems": p.rollback_problems,
        "activated_rolled": p.activated_rolled,
    }


def _random_view(rng: random.Random, device: str) -> AssignmentView:
    state = rng.choice(DEVICE_STATES)
    rollback = rng.choice([None, "sent", "rolled_back", "failed", "timed_out"])
    return AssignmentView(
        device,
        state,
        None if state == "pending" else rng.choice([1.0, 5.0, 9.0]),
        rollback_state=rollback,
        rollback_sent_at=rng.choice([None, 2.0, 7.0]) if rollback else None,
        attempts=rng.randint(0, 3),
    )


def test_progress_built_change_by_change_equals_progress_built_from_the_end_state() -> None:
    """2,000 random changes applied one at a time leave exactly what `Progress.of` builds
    from the final views (every count, set and time index)."""
    rng = random.Random(12)
    devices = [d for s in STAGES for d in s.devices] + ["outside"]
    live = Progress.of(STAGES, [AssignmentView(d, "pending", None) for d in devices], retries=2)
    for _ in range(2000):
        live.update(_random_view(rng, rng.choice(devices)))
    rebuilt = Progress.of(STAGES, live.views.values(), retries=2)
    assert _snapshot(live) == _snapshot(rebuilt)


class _NoWalk(dict[str, AssignmentView]):
    """A views dict that fails the test when a step walks it whole."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the planner walked every device")

    def values(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the planner walked every device")

    def items(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the planner walked every device")


def test_a_step_of_a_big_rollout_reads_only_what_changed() -> None:
    """10,000 devices in flight, one of them answered: the step decides without looking
    at the other 9,999 (no walk over the views; only the one timed-out device named)."""
    devices = tuple(f"d{i:05d}" for i in range(10_000))
    stages = [Stage("all", devices)]
    progress = Progress.of(
        stages, [AssignmentView(d, "sent", 100.0 + i) for i, d in enumerate(devices)]
    )
    progress.update(AssignmentView("d00042", "activated", 142.0))
    progress.views = _NoWalk(progress.views)
    rollout = RolloutView("r-1", "direct", "InProgress", device_timeout_s=30.0)
    assert plan_next_actions(rollout, stages, progress, None, 100.5 + 30.0) == [
        TimeOutDevice("d00000")
    ]


def test_a_retried_device_of_an_earlier_stage_that_never_answers_times_out() -> None:
    """A device of a passed stage sent again (a retry) holds the rollout until it answers,
    and times out like any other: before, the planner only looked at the current stage's
    members and pending earlier ones, so it advanced past it and never timed it out."""
    stages = [Stage("s0", ("a",), bake_s=0), Stage("s1", ("b",)), Stage("s2", ("c",))]
    views = [
        AssignmentView("a", "sent", 10.0, attempts=2),  # retried, the command out again
        AssignmentView("b", "activated", 12.0),
        AssignmentView("c", "pending", None),
    ]
    rollout = RolloutView(
        "r-1", "canary", "InProgress", device_timeout_s=30.0, stage_index=1, retries=1
    )
    progress = Progress.of(stages, views, retries=1)
    gates = GateReading("pass")
    assert plan_next_actions(rollout, stages, progress, gates, 20.0) == []
    assert plan_next_actions(rollout, stages, progress, gates, 40.0) == [TimeOutDevice("a")]
    progress.update(AssignmentView("a", "activated", 10.0, attempts=2))
    assert plan_next_actions(rollout, stages, progress, gates, 41.0) == [SettleStage(1)]
    settled = RolloutView(
        "r-1",
        "canary",
        "InProgress",
        device_timeout_s=30.0,
        stage_index=1,
        stage_settled_at=41.0,
        retries=1,
    )
    assert plan_next_actions(settled, stages, progress, gates, 42.0) == [AdvanceStage(2)]
    assert SendDeploy("c") in plan_next_actions(
        RolloutView("r-1", "canary", "InProgress", device_timeout_s=30.0, stage_index=2),
        stages,
        progress,
        gates,
        43.0,
    )


def test_staged_devices_waiting_for_their_switch_are_not_timed_out() -> None:
    """Blue-green: the devices staged the candidate long ago (the operator approved the
    switch 20 minutes later). The switch goes out to them, and nothing times them out:
    before, the same step also said TimeOutDevice for each (their deploy was sent more
    than the device timeout ago), and the executor timed out the devices it had just
    sent the switch to."""
    from controller.planner import SendSwitch

    devices = ("a", "b")
    stages = [Stage("stage", devices, action="stage"), Stage("switch", devices, action="switch")]
    progress = Progress.of(stages, [AssignmentView(d, "staged", 10.0) for d in devices])
    rollout = RolloutView("r-1", "blue-green", "InProgress", device_timeout_s=600.0, stage_index=1)
    assert plan_next_actions(rollout, stages, progress, None, 1_210.0) == [SendSwitch(devices)]
    progress.update(AssignmentView("a", "switching", 1_210.0))
    progress.update(AssignmentView("b", "switching", 1_210.0))
    assert plan_next_actions(rollout, stages, progress, None, 1_800.0) == []
    assert plan_next_actions(rollout, stages, progress, None, 1_810.0) == [
        TimeOutDevice("a"),
        TimeOutDevice("b"),
    ]
