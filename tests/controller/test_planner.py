"""The planner on plain data: every decision of a Direct rollout, no I/O."""

from __future__ import annotations

from controller.planner import (
    AssignmentView,
    FinishRollout,
    RolloutView,
    SendDeploy,
    StartRollout,
    TimeOutDevice,
    advances,
    plan_next_actions,
)


def rollout(status: str = "InProgress", timeout: float = 60.0) -> RolloutView:
    return RolloutView("r-1", "direct", status, timeout)


def test_pending_rollout_starts_and_sends_to_every_device() -> None:
    """A new Direct rollout starts and sends one deploy to each target at once."""
    actions = plan_next_actions(
        rollout("Pending"),
        [AssignmentView("b", "pending", None), AssignmentView("a", "pending", None)],
        now=100.0,
    )
    assert actions == [StartRollout(), SendDeploy("a"), SendDeploy("b")]


def test_sent_devices_are_not_sent_again_and_rollout_waits() -> None:
    """Devices already sent a command get nothing new while they work."""
    actions = plan_next_actions(
        rollout(),
        [AssignmentView("a", "downloading", 90.0), AssignmentView("b", "sent", 95.0)],
        now=100.0,
    )
    assert actions == []


def test_device_past_its_timeout_is_timed_out() -> None:
    """A device silent past the device timeout is timed out, others keep waiting."""
    actions = plan_next_actions(
        rollout(timeout=10.0),
        [AssignmentView("a", "sent", 80.0), AssignmentView("b", "received", 95.0)],
        now=100.0,
    )
    assert actions == [TimeOutDevice("a")]


def test_all_activated_finishes_succeeded() -> None:
    """When every device activated, the rollout succeeds."""
    actions = plan_next_actions(
        rollout(),
        [AssignmentView("a", "activated", 1.0), AssignmentView("b", "activated", 1.0)],
        now=100.0,
    )
    assert actions == [FinishRollout("Succeeded", None)]


def test_any_failure_finishes_failed_with_reasons() -> None:
    """One failed device fails a Direct rollout, and the reason names it."""
    actions = plan_next_actions(
        rollout(),
        [
            AssignmentView("a", "activated", 1.0),
            AssignmentView("b", "failed", 1.0, "incompatible"),
            AssignmentView("c", "timed_out", 1.0, "timeout"),
        ],
        now=100.0,
    )
    assert len(actions) == 1
    finish = actions[0]
    assert isinstance(finish, FinishRollout)
    assert finish.status == "Failed"
    assert finish.reason == "2 of 3 devices failed: b: incompatible, c: timeout"


def test_final_rollouts_plan_nothing() -> None:
    """A rollout that ended is never acted on again."""
    for status in ("Succeeded", "Failed", "RolledBack", "Aborted", "Paused"):
        assert plan_next_actions(rollout(status), [AssignmentView("a", "pending", None)], 1) == []


def test_event_ordering_rules() -> None:
    """Progress only moves forward, and final records never reopen."""
    assert advances("sent", "received")
    assert advances("sent", "activated")  # intermediate events may be lost
    assert not advances("downloading", "received")  # out of order
    assert not advances("activated", "activated")  # duplicate
    assert not advances("timed_out", "activated")  # late success after a timeout
    assert not advances("failed", "activated")
