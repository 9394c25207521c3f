"""The pure rollout planner on plain data: every strategy's stage walk and every gate outcome."""

from __future__ import annotations

from controller.planner import (
    ABChoice,
    AdvanceStage,
    AssignmentView,
    BeginRollback,
    DecideWinner,
    FinishRollout,
    GateReading,
    PauseRollout,
    RolloutView,
    SendDeploy,
    SendRegionDeploy,
    SendRollback,
    SettleStage,
    StartRollout,
    TimeOutDevice,
    TimeOutRollback,
    advances,
    plan_next_actions,
)
from controller.strategies import Stage

TWO_STAGES = [Stage("canary", ("a",), bake_s=60), Stage("rest", ("b", "c"))]


def view(status: str = "InProgress", strategy: str = "canary", **kw: object) -> RolloutView:
    return RolloutView("r-1", strategy, status, device_timeout_s=30, **kw)  # type: ignore[arg-type]


def a(
    device: str, state: str = "pending", sent_at: float | None = None, **kw: object
) -> AssignmentView:
    return AssignmentView(device, state, sent_at, **kw)  # type: ignore[arg-type]


def test_pending_rollout_starts_and_deploys_the_first_stage_only() -> None:
    """Pending → StartRollout and deploys for stage 0's devices, none for later stages."""
    actions = plan_next_actions(view("Pending"), TWO_STAGES, [a("a"), a("b"), a("c")], None, 0)
    assert actions == [StartRollout(), SendDeploy("a")]


def test_direct_sends_to_every_device_and_finishes_when_all_activated() -> None:
    """One stage with everything; all activated → Succeeded; one failed → Failed."""
    stage = [Stage("all", ("a", "b"))]
    assert plan_next_actions(view(strategy="direct"), stage, [a("a"), a("b")], None, 0) == [
        SendDeploy("a"), SendDeploy("b"),
    ]  # fmt: skip
    done = [a("a", "activated", 1), a("b", "activated", 1)]
    settled = view(strategy="direct", stage_settled_at=5.0)
    assert plan_next_actions(settled, stage, done, None, 6) == [FinishRollout("Succeeded", None)]
    failed = [a("a", "activated", 1), a("b", "failed", 1, reason="incompatible")]
    (finish,) = plan_next_actions(settled, stage, failed, None, 6)
    assert isinstance(finish, FinishRollout) and finish.status == "Failed"
    assert finish.reason and "b: incompatible" in finish.reason


def test_stage_waits_for_devices_and_times_them_out_after_the_device_timeout() -> None:
    """In-flight devices hold the stage; past device_timeout_s from sent_at they time out."""
    members = [a("a", "downloading", sent_at=100.0)]
    assert plan_next_actions(view(), TWO_STAGES, members, None, 129.0) == []
    assert plan_next_actions(view(), TWO_STAGES, members, None, 130.0) == [TimeOutDevice("a")]


def test_stage_settles_then_bakes_then_advances() -> None:
    """All final → SettleStage; before settled+bake nothing; after it AdvanceStage."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    assert plan_next_actions(view(), TWO_STAGES, members, None, 10) == [SettleStage(0)]
    baking = view(stage_settled_at=10.0)
    assert plan_next_actions(baking, TWO_STAGES, members, None, 69.0) == []
    assert plan_next_actions(baking, TWO_STAGES, members, None, 70.0) == [AdvanceStage(1)]


def test_second_stage_deploys_the_rest_and_finishes() -> None:
    """Stage 1 sends to its pending devices, then finishes Succeeded once all activated."""
    second = view(stage_index=1)
    members = [a("a", "activated", 1), a("b"), a("c")]
    assert plan_next_actions(second, TWO_STAGES, members, None, 0) == [
        SendDeploy("b"),
        SendDeploy("c"),
    ]
    done = [a(d, "activated", 1) for d in "abc"]
    last = view(stage_index=1, stage_settled_at=1.0)
    assert plan_next_actions(last, TWO_STAGES, done, None, 2) == [FinishRollout("Succeeded", None)]


def test_regional_stage_is_one_region_wide_deploy() -> None:
    """A stage with a region sends one command for all its pending devices."""
    stages = [Stage("eu", ("a", "b"), region="eu"), Stage("us", ("c",), region="us")]
    actions = plan_next_actions(
        view(strategy="regional"), stages, [a("a"), a("b"), a("c")], None, 0
    )
    assert actions == [SendRegionDeploy("eu", ("a", "b"))]


def test_failing_gate_rolls_back_even_mid_stage() -> None:
    """A gate verdict of fail starts the rollback at once, baking or not."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    fail = GateReading("fail", "max_latency_increase: 9 > 2")
    (action,) = plan_next_actions(view(stage_settled_at=10.0), TWO_STAGES, members, fail, 20)
    assert isinstance(action, BeginRollback) and "max_latency_increase" in action.reason
    in_flight = [a("a", "verified", 1), a("b"), a("c")]
    (action,) = plan_next_actions(view(), TWO_STAGES, in_flight, fail, 2)
    assert isinstance(action, BeginRollback)


def test_inconclusive_gates_pause_at_the_stage_end_unless_approved() -> None:
    """Inconclusive after the bake → Paused; once the operator approved, it advances."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    unsure = GateReading("inconclusive", "max_latency_ms inconclusive (3 of 20 samples)")
    baked = view(stage_settled_at=0.0, has_gates=True)
    (pause,) = plan_next_actions(baked, TWO_STAGES, members, unsure, 61)
    assert isinstance(pause, PauseRollout) and "inconclusive" in pause.reason
    approved = view(stage_settled_at=0.0, has_gates=True, approved_stage=1)
    assert plan_next_actions(approved, TWO_STAGES, members, unsure, 61) == [AdvanceStage(1)]
    passing = GateReading("pass")
    assert plan_next_actions(baked, TWO_STAGES, members, passing, 61) == [AdvanceStage(1)]


def test_manual_approval_pauses_at_every_stage_boundary() -> None:
    """--manual-approval: Paused after each stage until approved_stage passes it."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    waiting = view(stage_settled_at=0.0, manual_approval=True)
    (pause,) = plan_next_actions(waiting, TWO_STAGES, members, None, 61)
    assert isinstance(pause, PauseRollout) and "approval" in pause.reason
    approved = view(stage_settled_at=0.0, manual_approval=True, approved_stage=1)
    assert plan_next_actions(approved, TWO_STAGES, members, None, 61) == [AdvanceStage(1)]


def test_failures_over_the_abort_threshold_roll_back_under_it_continue() -> None:
    """Gated strategies: failed share over max_failure_percent (after min_executed) → rollback."""
    stage = [Stage("batch", ("a", "b", "c", "d"), bake_s=0), Stage("rest", ("e",))]
    members = [a("a", "activated", 1), a("b", "activated", 1), a("c", "activated", 1),
               a("d", "failed", 1, reason="download_failed"), a("e")]  # fmt: skip
    strict = view(strategy="rolling")
    (action,) = plan_next_actions(strict, stage, members, None, 5)
    assert isinstance(action, BeginRollback) and "d: download_failed" in action.reason
    lenient = view(strategy="rolling", max_failure_percent=30.0, stage_settled_at=1.0)
    assert plan_next_actions(lenient, stage, members, None, 5) == [AdvanceStage(1)]
    late = view(strategy="rolling", min_executed=10, stage_settled_at=1.0)
    assert plan_next_actions(late, stage, members, None, 5) == [AdvanceStage(1)]


def test_rollback_reverts_activated_devices_and_ends_rolled_back() -> None:
    """Rolling back: a rollback per activated device; waits for in-flight ones and answers."""
    rb = view(rolling_back=True)
    members = [a("a", "activated", 1), a("b", "downloading", 1), a("c")]
    assert plan_next_actions(rb, TWO_STAGES, members, None, 5) == [SendRollback("a")]
    sent = [a("a", "activated", 1, rollback_state="sent", rollback_sent_at=5.0),
            a("b", "activated", 1), a("c")]  # fmt: skip
    assert plan_next_actions(rb, TWO_STAGES, sent, None, 6) == [SendRollback("b")]
    waiting = [a("a", "activated", 1, rollback_state="sent", rollback_sent_at=5.0), a("c")]
    assert plan_next_actions(rb, TWO_STAGES, waiting, None, 6) == []
    assert plan_next_actions(rb, TWO_STAGES, waiting, None, 35) == [TimeOutRollback("a")]
    answered = [a("a", "activated", 1, rollback_state="rolled_back"), a("b", "failed", 1), a("c")]
    assert plan_next_actions(rb, TWO_STAGES, answered, None, 7) == [
        FinishRollout("RolledBack", None)
    ]


def test_ab_decides_the_winner_after_the_test_or_pauses_when_inconclusive() -> None:
    """A/B: B's win picks version_b, A's keeps version; inconclusive pauses until approved."""
    stages = [Stage("a/b test", ("a", "b"), bake_s=10), Stage("winner", ("a", "b"))]
    members = [a("a", "activated", 1), a("b", "activated", 1)]
    ab = view(strategy="ab", stage_settled_at=0.0, version="1", version_b="2")
    assert plan_next_actions(ab, stages, members, None, 11, ABChoice("b", "B faster")) == [
        DecideWinner("2", "B faster")
    ]
    assert plan_next_actions(ab, stages, members, None, 11, ABChoice("a", "no gain")) == [
        DecideWinner("1", "no gain")
    ]
    (pause,) = plan_next_actions(ab, stages, members, None, 11, ABChoice(None, "A 3 of 20"))
    assert isinstance(pause, PauseRollout)
    decided = view(strategy="ab", stage_settled_at=0.0, version="1", version_b="2", winner="2")
    assert plan_next_actions(decided, stages, members, None, 11) == [AdvanceStage(1)]


def test_paused_and_finished_rollouts_plan_nothing() -> None:
    """Only Pending and InProgress rollouts move."""
    for status in ("Paused", "Succeeded", "Failed", "RolledBack", "Aborted"):
        assert plan_next_actions(view(status), TWO_STAGES, [a("a")], None, 0) == []


def test_no_targets_fails_the_rollout() -> None:
    """A rollout whose strategy yields no stage ends Failed with a reason."""
    (finish,) = plan_next_actions(view(), [], [], None, 0)
    assert isinstance(finish, FinishRollout) and finish.status == "Failed"


def test_events_never_reopen_final_records_or_move_backwards() -> None:
    """advances(): forward only; final states stay final (late success after timeout)."""
    assert advances("sent", "received") and advances("received", "activated")
    assert not advances("downloading", "received")
    assert not advances("timed_out", "activated")
    assert not advances("activated", "failed")
    assert not advances("sent", "no-such-phase")
