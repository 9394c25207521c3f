"""The pure rollout planner on plain data: the stage walk, gates, abort threshold, rollback."""

from __future__ import annotations

import itertools

import pytest

from controller.planner import (
    DEVICE_STATES,
    FINAL_DEVICE_STATES,
    ABChoice,
    Action,
    AdvanceStage,
    AssignmentView,
    BeginRollback,
    DecideWinner,
    FinishRollout,
    GateReading,
    PauseRollout,
    Progress,
    RetryDevice,
    RolloutView,
    SendDeploy,
    SendRegionDeploy,
    SendRollback,
    SendSwitch,
    SettleStage,
    StartRollout,
    TimeOutDevice,
    TimeOutRollback,
    advances,
)
from controller.planner import plan_next_actions as plan_on_progress
from controller.strategies import Stage

TIMEOUT = 30.0
TWO_STAGES = [Stage("canary", ("a",), bake_s=60), Stage("rest", ("b", "c"))]
THREE_STAGES = [
    Stage("s0", ("a",), bake_s=10),
    Stage("s1", ("b",), bake_s=10),
    Stage("s2", ("c",)),
]


def plan_next_actions(
    rollout: RolloutView,
    stages: list[Stage],
    assignments: list[AssignmentView],
    gates: GateReading | None,
    now: float,
    ab: ABChoice | None = None,
) -> list[Action]:
    """The planner on these assignments (their `Progress` built from the list)."""
    progress = Progress.of(stages, assignments, rollout.retries)
    return plan_on_progress(rollout, stages, progress, gates, now, ab)


def view(status: str = "InProgress", strategy: str = "canary", **kw: object) -> RolloutView:
    return RolloutView("r-1", strategy, status, device_timeout_s=TIMEOUT, **kw)  # type: ignore[arg-type]


def a(
    device: str, state: str = "pending", sent_at: float | None = None, **kw: object
) -> AssignmentView:
    return AssignmentView(device, state, sent_at, **kw)  # type: ignore[arg-type]


def done(*devices: str) -> list[AssignmentView]:
    return [a(d, "activated", 1.0) for d in devices]


PASS = GateReading("pass", "all gates pass")
INCONCLUSIVE = GateReading("inconclusive", "3 of 20 samples")
FAIL = GateReading("fail", "max_latency_ms: 250 > 100 (candidate p95)")


# ---------------------------------------------------------------- the stage walk


def test_pending_rollout_starts_and_deploys_the_first_stage_only() -> None:
    """Pending → StartRollout then a deploy for each stage-0 device, none for later stages."""
    actions = plan_next_actions(view("Pending"), TWO_STAGES, [a("a"), a("b"), a("c")], None, 0)
    assert actions == [StartRollout(), SendDeploy("a")]


def test_pending_direct_rollout_deploys_every_device() -> None:
    """Pending direct rollout → StartRollout and one SendDeploy per device of its single stage."""
    stage = [Stage("all", ("a", "b", "c"))]
    actions = plan_next_actions(view("Pending", "direct"), stage, [a(d) for d in "abc"], None, 0)
    assert actions == [StartRollout(), SendDeploy("a"), SendDeploy("b"), SendDeploy("c")]


def test_stage_waits_while_devices_are_not_final() -> None:
    """A stage with in-flight devices (before the timeout) yields no action at all."""
    for state in ("sent", "received", "downloading", "verified"):
        members = [a("a", state, sent_at=100.0), a("b"), a("c")]
        assert plan_next_actions(view(), TWO_STAGES, members, PASS, 110.0) == [], state


def test_stage_waits_for_the_last_in_flight_device_even_if_others_are_done() -> None:
    """One device still downloading holds the stage although its peers are final."""
    stage = [Stage("all", ("a", "b", "c"))]
    members = [a("a", "activated", 1.0), a("b", "failed", 1.0), a("c", "downloading", 1.0)]
    assert plan_next_actions(view(strategy="direct"), stage, members, None, 5.0) == []


def test_device_times_out_only_after_device_timeout_from_sent_at() -> None:
    """TimeOutDevice is emitted at sent_at + device_timeout_s, not a moment earlier."""
    members = [a("a", "downloading", sent_at=100.0), a("b"), a("c")]
    assert plan_next_actions(view(), TWO_STAGES, members, None, 100.0 + TIMEOUT - 0.001) == []
    assert plan_next_actions(view(), TWO_STAGES, members, None, 100.0 + TIMEOUT) == [
        TimeOutDevice("a")
    ]
    assert plan_next_actions(view(), TWO_STAGES, members, None, 500.0) == [TimeOutDevice("a")]


def test_device_without_sent_at_and_final_devices_never_time_out() -> None:
    """No timeout without a sent_at, and a final device is never timed out again."""
    stage = [Stage("all", ("a", "b", "c"))]
    members = [a("a", "sent", None), a("b", "failed", 0.0), a("c", "activated", 0.0)]
    actions = plan_next_actions(view(strategy="direct"), stage, members, None, 10_000.0)
    assert not any(isinstance(x, TimeOutDevice) for x in actions)


def test_only_devices_of_the_current_stage_time_out() -> None:
    """A late device outside the current stage is not timed out by this stage."""
    members = [a("a", "activated", 0.0), a("b", "sent", 0.0), a("c")]
    actions = plan_next_actions(view(), TWO_STAGES, members, None, 1000.0)
    assert TimeOutDevice("b") not in actions


def test_stage_settles_once_all_its_devices_are_final() -> None:
    """Every stage device final and not yet settled → exactly SettleStage(index)."""
    members = [a("a", "activated", 1.0), a("b"), a("c")]
    assert plan_next_actions(view(), TWO_STAGES, members, PASS, 10) == [SettleStage(0)]
    lenient = view(max_failure_percent=100.0)
    for final in ("failed", "timed_out", "rolled_back"):
        members = [a("a", final, 1.0), a("b"), a("c")]
        assert plan_next_actions(lenient, TWO_STAGES, members, PASS, 10) == [SettleStage(0)]
    second = view(stage_index=1, stage_settled_at=None)
    assert plan_next_actions(second, TWO_STAGES, done("a", "b", "c"), PASS, 10) == [SettleStage(1)]


def test_stage_bakes_before_advancing() -> None:
    """No advance before stage_settled_at + bake_s; AdvanceStage(index+1) from that moment."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    baking = view(stage_settled_at=10.0)
    assert plan_next_actions(baking, TWO_STAGES, members, PASS, 10.0) == []
    assert plan_next_actions(baking, TWO_STAGES, members, PASS, 69.999) == []
    assert plan_next_actions(baking, TWO_STAGES, members, PASS, 70.0) == [AdvanceStage(1)]
    assert plan_next_actions(baking, TWO_STAGES, members, None, 70.0) == [AdvanceStage(1)]


def test_middle_stage_advances_to_the_next_one() -> None:
    """Stage 1 of three, baked → AdvanceStage(2), never a finish."""
    rollout = view(stage_index=1, stage_settled_at=0.0)
    members = [*done("a", "b"), a("c")]
    assert plan_next_actions(rollout, THREE_STAGES, members, PASS, 10.0) == [AdvanceStage(2)]


def test_second_stage_deploys_its_pending_devices() -> None:
    """Stage 1 sends to its own pending devices only."""
    second = view(stage_index=1)
    members = [a("a", "activated", 1), a("b"), a("c")]
    assert plan_next_actions(second, TWO_STAGES, members, None, 0) == [
        SendDeploy("b"),
        SendDeploy("c"),
    ]


def test_regional_stage_emits_one_region_deploy_with_the_pending_devices() -> None:
    """A stage with a region → one SendRegionDeploy naming exactly its pending devices."""
    stages = [Stage("eu", ("a", "b", "c"), region="eu"), Stage("us", ("d",), region="us")]
    members = [a("a", "activated", 1.0), a("b"), a("c"), a("d")]
    actions = plan_next_actions(view(strategy="regional"), stages, members, None, 2.0)
    assert actions == [SendRegionDeploy("eu", ("b", "c"))]


def test_regional_stage_without_pending_devices_sends_nothing() -> None:
    """Once none of the region's devices is pending, no region-wide command is repeated."""
    stages = [Stage("eu", ("a", "b"), region="eu"), Stage("us", ("c",), region="us")]
    members = [a("a", "sent", 1.0), a("b", "received", 1.0), a("c")]
    assert plan_next_actions(view(strategy="regional"), stages, members, None, 2.0) == []


def test_last_stage_finishes_succeeded() -> None:
    """Last stage settled and baked with every device activated → FinishRollout Succeeded."""
    last = view(stage_index=1, stage_settled_at=1.0)
    assert plan_next_actions(last, TWO_STAGES, done("a", "b", "c"), PASS, 2) == [
        FinishRollout("Succeeded", None)
    ]


def test_last_stage_waits_for_its_bake_before_finishing() -> None:
    """A last stage with a bake time finishes only once the bake is over."""
    stages = [Stage("only", ("a",), bake_s=50)]
    rollout = view(stage_settled_at=100.0)
    assert plan_next_actions(rollout, stages, done("a"), PASS, 149.0) == []
    assert plan_next_actions(rollout, stages, done("a"), PASS, 150.0) == [
        FinishRollout("Succeeded", None)
    ]


def test_direct_with_a_failed_device_finishes_failed_naming_it() -> None:
    """Direct (ungated): a failed device does not roll back, the rollout ends Failed."""
    stage = [Stage("all", ("a", "b"))]
    settled = view(strategy="direct", stage_settled_at=5.0)
    members = [a("a", "activated", 1), a("b", "failed", 1, reason="incompatible")]
    (finish,) = plan_next_actions(settled, stage, members, None, 6)
    assert isinstance(finish, FinishRollout)
    assert finish.status == "Failed"
    assert finish.reason is not None and "b: incompatible" in finish.reason


def test_direct_failure_before_settling_does_not_roll_back() -> None:
    """Direct rollouts have no abort threshold: failures only settle the stage."""
    stage = [Stage("all", ("a", "b"))]
    members = [a("a", "failed", 1), a("b", "failed", 1)]
    assert plan_next_actions(view(strategy="direct"), stage, members, None, 2) == [SettleStage(0)]


def test_rollout_without_stages_fails() -> None:
    """No stages (no targets) → FinishRollout Failed."""
    (finish,) = plan_next_actions(view(), [], [], None, 0)
    assert isinstance(finish, FinishRollout) and finish.status == "Failed"


# ---------------------------------------------------------------- gates


def test_gate_fail_at_stage_end_begins_rollback() -> None:
    """A failing gate after the bake → BeginRollback quoting the gate detail, no advance."""
    rollout = view(stage_settled_at=0.0, has_gates=True)
    actions = plan_next_actions(rollout, TWO_STAGES, [*done("a"), a("b"), a("c")], FAIL, 100)
    assert len(actions) == 1 and isinstance(actions[0], BeginRollback)
    assert FAIL.detail in actions[0].reason


def test_gate_fail_mid_stage_begins_rollback_at_once() -> None:
    """A failing gate while devices are still in flight or baking → BeginRollback right away."""
    in_flight = [a("a", "downloading", 0.0), a("b"), a("c")]
    actions = plan_next_actions(view(has_gates=True), TWO_STAGES, in_flight, FAIL, 1)
    assert [type(x) for x in actions] == [BeginRollback]
    baking = view(stage_settled_at=0.0, has_gates=True)
    actions = plan_next_actions(baking, TWO_STAGES, [*done("a"), a("b"), a("c")], FAIL, 1)
    assert [type(x) for x in actions] == [BeginRollback]


def test_inconclusive_gates_at_stage_end_pause() -> None:
    """Inconclusive at the end of a non-last stage → PauseRollout naming the next stage."""
    rollout = view(stage_settled_at=0.0, has_gates=True)
    members = [*done("a"), a("b"), a("c")]
    (pause,) = plan_next_actions(rollout, TWO_STAGES, members, INCONCLUSIVE, 100)
    assert isinstance(pause, PauseRollout)
    assert "inconclusive" in pause.reason and "rest" in pause.reason


def test_inconclusive_gates_while_baking_do_not_pause() -> None:
    """Inconclusive during the bake → keep waiting, no pause yet."""
    rollout = view(stage_settled_at=0.0, has_gates=True)
    members = [*done("a"), a("b"), a("c")]
    assert plan_next_actions(rollout, TWO_STAGES, members, INCONCLUSIVE, 30) == []


def test_inconclusive_gates_advance_once_the_operator_approved() -> None:
    """Inconclusive but approved_stage > index → AdvanceStage; approved_stage == index → pause."""
    members = [*done("a"), a("b"), a("c")]
    approved = view(stage_settled_at=0.0, has_gates=True, approved_stage=1)
    assert plan_next_actions(approved, TWO_STAGES, members, INCONCLUSIVE, 100) == [AdvanceStage(1)]
    stage1 = view(stage_index=1, stage_settled_at=0.0, has_gates=True, approved_stage=1)
    three = [*done("a", "b"), a("c")]
    (pause,) = plan_next_actions(stage1, THREE_STAGES, three, INCONCLUSIVE, 100)
    assert isinstance(pause, PauseRollout)


def test_manual_approval_pauses_at_a_stage_boundary() -> None:
    """manual_approval and approved_stage <= index → PauseRollout instead of advancing."""
    rollout = view(stage_settled_at=0.0, manual_approval=True)
    members = [*done("a"), a("b"), a("c")]
    (pause,) = plan_next_actions(rollout, TWO_STAGES, members, PASS, 100)
    assert isinstance(pause, PauseRollout)
    assert "approval" in pause.reason and "rest" in pause.reason


def test_manual_approval_does_not_pause_before_the_bake_is_over() -> None:
    """The approval pause comes at the boundary, not while the stage still bakes."""
    rollout = view(stage_settled_at=0.0, manual_approval=True)
    assert plan_next_actions(rollout, TWO_STAGES, [*done("a"), a("b"), a("c")], PASS, 59) == []


def test_manual_approval_advances_once_approved() -> None:
    """manual_approval with approved_stage > index → AdvanceStage(index+1)."""
    rollout = view(stage_settled_at=0.0, manual_approval=True, approved_stage=1)
    assert plan_next_actions(rollout, TWO_STAGES, [*done("a"), a("b"), a("c")], PASS, 100) == [
        AdvanceStage(1)
    ]


def test_manual_approval_does_not_hold_the_last_stage() -> None:
    """Nothing follows the last stage, so it finishes without asking for approval."""
    rollout = view(stage_index=1, stage_settled_at=0.0, manual_approval=True, approved_stage=1)
    assert plan_next_actions(rollout, TWO_STAGES, done("a", "b", "c"), PASS, 100) == [
        FinishRollout("Succeeded", None)
    ]


# ---------------------------------------------------------------- abort threshold


def test_gated_failures_over_threshold_after_min_executed_begin_rollback() -> None:
    """1 of 2 finished failed (50%) > 10% with min_executed=2 → BeginRollback naming the device."""
    rollout = view(max_failure_percent=10.0, min_executed=2)
    stages = [Stage("canary", ("a", "b"), bake_s=60), Stage("rest", ("c",))]
    members = [a("a", "activated", 1), a("b", "failed", 1, reason="bad sha"), a("c")]
    (rollback,) = plan_next_actions(rollout, stages, members, None, 2)
    assert isinstance(rollback, BeginRollback)
    assert "b: bad sha" in rollback.reason and "1 of 2" in rollback.reason


def test_gated_failures_before_min_executed_do_not_abort() -> None:
    """Fewer finished devices than min_executed → no abort yet, the stage keeps going."""
    rollout = view(max_failure_percent=10.0, min_executed=3)
    stages = [Stage("canary", ("a", "b"), bake_s=60), Stage("rest", ("c",))]
    members = [a("a", "failed", 1), a("b", "downloading", 1), a("c")]
    assert plan_next_actions(rollout, stages, members, None, 2) == []


def test_gated_failures_under_threshold_continue() -> None:
    """1 failed of 4 finished (25%) under a 30% threshold → the stage settles normally."""
    rollout = view(max_failure_percent=30.0, min_executed=1)
    stages = [Stage("canary", ("a", "b", "c", "d"), bake_s=60), Stage("rest", ("e",))]
    members = [*done("a", "b", "c"), a("d", "timed_out", 1), a("e")]
    assert plan_next_actions(rollout, stages, members, None, 2) == [SettleStage(0)]


def test_gated_failures_exactly_at_threshold_continue() -> None:
    """The threshold is 'over', not 'at': 1 of 4 = 25% with max 25% continues."""
    rollout = view(max_failure_percent=25.0, stage_settled_at=0.0)
    stages = [Stage("canary", ("a", "b", "c", "d"), bake_s=0), Stage("rest", ("e",))]
    members = [*done("a", "b", "c"), a("d", "failed", 1), a("e")]
    assert plan_next_actions(rollout, stages, members, None, 2) == [AdvanceStage(1)]


def test_gated_default_zero_threshold_rolls_back_on_any_failure() -> None:
    """With max_failure_percent=0 a single failed device aborts a gated rollout."""
    members = [a("a", "failed", 1), a("b"), a("c")]
    (rollback,) = plan_next_actions(view(), TWO_STAGES, members, None, 2)
    assert isinstance(rollback, BeginRollback)


def test_gated_finish_within_threshold_is_succeeded_with_a_reason() -> None:
    """A gated rollout that stayed under its threshold ends Succeeded, listing the failures."""
    rollout = view(max_failure_percent=50.0, stage_index=1, stage_settled_at=0.0)
    members = [*done("a", "b"), a("c", "failed", 1, reason="oom")]
    (finish,) = plan_next_actions(rollout, TWO_STAGES, members, PASS, 2)
    assert isinstance(finish, FinishRollout)
    assert finish.status == "Succeeded"
    assert finish.reason is not None and "c: oom" in finish.reason


# ---------------------------------------------------------------- rolling back


def rb(**kw: object) -> RolloutView:
    return view(rolling_back=True, **kw)  # type: ignore[arg-type]


def test_rollback_sends_to_each_activated_device_without_rollback_state() -> None:
    """SendRollback for every activated device not yet asked; nobody else; no finish yet."""
    members = [
        a("a", "activated", 1),
        a("b", "activated", 1, rollback_state="sent", rollback_sent_at=5.0),
        a("c", "failed", 1),
        a("d", "pending"),
        a("e", "activated", 1),
    ]
    actions = plan_next_actions(rb(), TWO_STAGES, members, FAIL, 6.0)
    assert actions == [SendRollback("a"), SendRollback("e")]


def test_rollback_ignores_stages_and_gates() -> None:
    """While rolling back, no deploys, settles or gate reactions are planned."""
    members = [a("a", "activated", 1), a("b"), a("c")]
    actions = plan_next_actions(rb(stage_settled_at=0.0), TWO_STAGES, members, FAIL, 1000.0)
    assert actions == [SendRollback("a")]


def test_rollback_waits_for_in_flight_deploys() -> None:
    """A device still downloading the candidate holds the rollback open (until its timeout)."""
    members = [
        a("a", "activated", 1, rollback_state="rolled_back"),
        a("b", "downloading", 10.0),
    ]
    assert plan_next_actions(rb(), TWO_STAGES, members, None, 20.0) == []
    assert plan_next_actions(rb(), TWO_STAGES, members, None, 10.0 + TIMEOUT) == [
        TimeOutDevice("b")
    ]


def test_rollback_waits_for_rollback_answers_and_times_them_out() -> None:
    """rollback_state 'sent' waits; after device_timeout_s from rollback_sent_at → TimeOutRollback."""
    members = [a("a", "activated", 1, rollback_state="sent", rollback_sent_at=100.0)]
    assert plan_next_actions(rb(), TWO_STAGES, members, None, 100.0 + TIMEOUT - 0.001) == []
    assert plan_next_actions(rb(), TWO_STAGES, members, None, 100.0 + TIMEOUT) == [
        TimeOutRollback("a")
    ]


def test_rollback_finishes_rolled_back_once_every_device_confirmed() -> None:
    """Every activated device answered rolled_back (the rest never served it) → RolledBack."""
    members = [
        a("a", "activated", 1, rollback_state="rolled_back", rollback_sent_at=1.0),
        a("d", "failed", 1),
        a("e", "timed_out", 1),
        a("f", "pending"),
    ]
    assert plan_next_actions(rb(), TWO_STAGES, members, FAIL, 500.0) == [
        FinishRollout("RolledBack", None)
    ]


def test_rollback_refused_or_unanswered_by_a_device_finishes_failed_naming_it() -> None:
    """A device that answered failed (not_resident) or never answered still runs the candidate:
    the rollout ends Failed, not RolledBack, and says which devices and why."""
    members = [
        a("a", "activated", 1, rollback_state="rolled_back", rollback_sent_at=1.0),
        a("b", "activated", 1, reason="not_resident", rollback_state="failed"),
        a("c", "activated", 1, rollback_state="timed_out", rollback_sent_at=1.0),
    ]
    assert plan_next_actions(rb(), TWO_STAGES, members, FAIL, 500.0) == [
        FinishRollout(
            "Failed",
            "rollback failed on 2 device(s), 1 rolled back: b: not_resident, c: no answer",
        )
    ]


def test_rollback_with_nothing_activated_finishes_at_once() -> None:
    """No device ever activated and none in flight → RolledBack immediately."""
    members = [a("a", "failed", 1), a("b"), a("c")]
    assert plan_next_actions(rb(), TWO_STAGES, members, None, 2.0) == [
        FinishRollout("RolledBack", None)
    ]


# ---------------------------------------------------------------- A/B

AB_STAGES = [Stage("a/b test", ("a", "b"), bake_s=10), Stage("winner", ("a", "b"))]


def ab_view(**kw: object) -> RolloutView:
    return view(strategy="ab", stage_settled_at=0.0, version="1", version_b="2", **kw)  # type: ignore[arg-type]


def test_ab_winner_b_picks_version_b_and_a_keeps_version() -> None:
    """After the test stage: B's win → DecideWinner(version_b); A's → DecideWinner(version)."""
    members = done("a", "b")
    assert plan_next_actions(
        ab_view(), AB_STAGES, members, None, 11, ABChoice("b", "B faster")
    ) == [DecideWinner("2", "B faster")]
    assert plan_next_actions(ab_view(), AB_STAGES, members, None, 11, ABChoice("a", "no gain")) == [
        DecideWinner("1", "no gain")
    ]


def test_ab_waits_for_the_test_duration() -> None:
    """No decision while the a/b test stage still bakes."""
    members = done("a", "b")
    assert plan_next_actions(ab_view(), AB_STAGES, members, None, 9.9, ABChoice("b", "x")) == []


def test_ab_inconclusive_pauses_until_approved_then_keeps_a() -> None:
    """Inconclusive → PauseRollout; once approved, DecideWinner keeps version A."""
    members = done("a", "b")
    (pause,) = plan_next_actions(ab_view(), AB_STAGES, members, None, 11, ABChoice(None, "A 3"))
    assert isinstance(pause, PauseRollout) and "A 3" in pause.reason
    (pause,) = plan_next_actions(ab_view(), AB_STAGES, members, None, 11)
    assert isinstance(pause, PauseRollout)
    approved = ab_view(approved_stage=1)
    (decide,) = plan_next_actions(approved, AB_STAGES, members, None, 11, ABChoice(None, "A 3"))
    assert isinstance(decide, DecideWinner) and decide.version == "1"


def test_ab_with_a_decided_winner_advances() -> None:
    """Once the winner is recorded the test stage advances to the winner stage."""
    assert plan_next_actions(ab_view(winner="2"), AB_STAGES, done("a", "b"), None, 11) == [
        AdvanceStage(1)
    ]


def commanded(actions: list[object]) -> list[str]:
    """Every device named by a command intent, once per intent (duplicates stay)."""
    out: list[str] = []
    for x in actions:
        if isinstance(x, SendDeploy | RetryDevice):
            out.append(x.device_id)
        elif isinstance(x, SendSwitch | SendRegionDeploy):
            out += list(x.devices)
    return out


def test_ab_winner_stage_sends_each_moved_device_one_deploy() -> None:
    """At the winner stage the devices moved to the winner are pending in the current
    stage and in the one before: they get one deploy each, not two."""
    members = [a("a", "activated", 1.0, version="2"), a("b", "pending", version="2")]
    winner_stage = view(strategy="ab", version="1", version_b="2", winner="2", stage_index=1)
    actions = plan_next_actions(winner_stage, AB_STAGES, members, None, 20)
    assert commanded(actions) == ["b"], actions


def test_blue_green_retry_of_a_device_sends_it_one_deploy() -> None:
    """A failed device retried at the switch stage is staged again once."""
    stages = [
        Stage("stage", ("a", "b"), action="stage"),
        Stage("switch", ("a", "b"), action="switch"),
    ]
    members = [a("a", "failed", 1.0, attempts=1), a("b", "staged", 1.0, attempts=1)]
    bg = view(strategy="blue-green", stage_index=1, retries=1)
    actions = plan_next_actions(bg, stages, members, None, 2.0)
    sends = [x for x in actions if isinstance(x, SendDeploy)]
    assert [x.device_id for x in sends] == ["a"], actions


# ---------------------------------------------------------------- inactive rollouts


@pytest.mark.parametrize("status", ["Paused", "Succeeded", "Failed", "RolledBack", "Aborted"])
def test_inactive_rollouts_plan_nothing(status: str) -> None:
    """Paused or final rollouts get no action, even with pending devices and a failing gate."""
    members = [a("a"), a("b", "downloading", 0.0), a("c", "activated", 0.0)]
    assert plan_next_actions(view(status), TWO_STAGES, members, FAIL, 10_000.0) == []
    assert plan_next_actions(view(status, rolling_back=True), TWO_STAGES, members, None, 1e6) == []


# ---------------------------------------------------------------- advances()


def test_advances_never_reopens_final_states() -> None:
    """From a final state no event applies, except a timed-out device's late final answer."""
    for current, new in itertools.product(sorted(FINAL_DEVICE_STATES), DEVICE_STATES):
        late = current == "timed_out" and new in ("staged", "activated", "failed")
        assert advances(current, new) == late, (current, new)


def test_advances_never_moves_backwards_or_repeats() -> None:
    """Among non-final states, only strictly later states apply; duplicates do not."""
    for i, current in enumerate(DEVICE_STATES):
        if current in FINAL_DEVICE_STATES:
            continue
        for j, new in enumerate(DEVICE_STATES):
            assert advances(current, new) == (j > i), (current, new)


def test_advances_examples() -> None:
    """Concrete cases: skipping ahead applies, out-of-order and unknown states do not."""
    assert advances("sent", "activated")
    assert advances("pending", "failed")
    assert advances("downloading", "timed_out")
    assert not advances("verified", "received")
    assert not advances("received", "received")
    assert advances("timed_out", "activated")  # it did activate: the record says so
    assert not advances("timed_out", "received")
    assert not advances("cancelled", "activated")
    assert not advances("sent", "bogus")


def test_retries_resend_a_failed_device_until_its_attempts_are_used() -> None:
    """--retries 1: a device failed after one send goes again; after two it counts as failed."""
    stages = [Stage("all", ("a", "b"))]
    retrying = view(strategy="rolling", retries=1)
    once = [
        a("a", "activated", 1, attempts=1),
        a("b", "failed", 1, reason="download_failed", attempts=1),
    ]
    assert plan_next_actions(retrying, stages, once, None, 5) == [RetryDevice("b"), SendDeploy("b")]
    twice = [
        a("a", "activated", 1, attempts=1),
        a("b", "failed", 1, reason="download_failed", attempts=2),
    ]
    (action,) = plan_next_actions(retrying, stages, twice, None, 5)
    assert isinstance(action, BeginRollback)


def test_retry_of_a_device_from_a_passed_stage_is_sent_directly() -> None:
    """A timed-out device of stage 0 is re-sent while stage 1 runs, and holds the stage."""
    second = view(strategy="rolling", retries=2, stage_index=1, max_failure_percent=100)
    members = [
        a("a", "timed_out", 1, attempts=1),
        a("b", "activated", 1, attempts=1),
        a("c", "activated", 1, attempts=1),
    ]
    actions = plan_next_actions(second, TWO_STAGES, members, None, 5)
    assert actions == [RetryDevice("a"), SendDeploy("a")]


def test_blue_green_stages_everywhere_then_switches_the_staged_devices() -> None:
    """Stage 0 sends stage-only deploys and settles on `staged`; stage 1 sends one switch."""
    stages = [
        Stage("stage", ("a", "b"), action="stage"),
        Stage("switch", ("a", "b"), action="switch"),
    ]
    bg = view(strategy="blue-green")
    assert plan_next_actions(bg, stages, [a("a"), a("b")], None, 0) == [
        SendDeploy("a", activate=False), SendDeploy("b", activate=False),
    ]  # fmt: skip
    staged = [a("a", "staged", 1), a("b", "staged", 1)]
    assert plan_next_actions(bg, stages, staged, None, 2) == [SettleStage(0)]
    switch = view(strategy="blue-green", stage_index=1)
    assert plan_next_actions(switch, stages, staged, None, 3) == [SendSwitch(("a", "b"))]
    flipping = [a("a", "switching", 3), a("b", "activated", 3)]
    assert plan_next_actions(switch, stages, flipping, None, 4) == []
    done = view(strategy="blue-green", stage_index=1, stage_settled_at=5.0)
    finished = [a("a", "activated", 3), a("b", "activated", 3)]
    assert plan_next_actions(done, stages, finished, None, 6) == [FinishRollout("Succeeded", None)]


def test_rollback_of_blue_green_leaves_staged_devices_alone() -> None:
    """Staged devices still serve the old model: rollback only reverts the switched ones."""
    rb = view(strategy="blue-green", rolling_back=True)
    members = [a("a", "activated", 1), a("b", "staged", 1)]
    assert plan_next_actions(rb, [], members, None, 2) == [SendRollback("a")]
    answered = [a("a", "activated", 1, rollback_state="rolled_back"), a("b", "staged", 1)]
    assert plan_next_actions(rb, [], answered, None, 3) == [FinishRollout("RolledBack", None)]


def test_shadow_stages_with_mirroring_and_ends_on_the_gates() -> None:
    """Shadow: stage-only deploys that mirror; after the bake the gates decide, nothing activates."""
    stages = [Stage("shadow", ("a", "b"), bake_s=10, action="shadow")]
    sh = view(strategy="shadow", has_gates=True)
    assert plan_next_actions(sh, stages, [a("a"), a("b")], None, 0) == [
        SendDeploy("a", activate=False, shadow=True), SendDeploy("b", activate=False, shadow=True),
    ]  # fmt: skip
    staged = [a("a", "staged", 1), a("b", "staged", 1)]
    assert plan_next_actions(sh, stages, staged, GateReading("pass"), 2) == [SettleStage(0)]
    baked = view(strategy="shadow", has_gates=True, stage_settled_at=2.0)
    assert plan_next_actions(baked, stages, staged, GateReading("pass"), 5) == []
    (finish,) = plan_next_actions(baked, stages, staged, GateReading("pass"), 12)
    assert isinstance(finish, FinishRollout) and finish.status == "Succeeded"
    (pause,) = plan_next_actions(baked, stages, staged, GateReading("inconclusive", "few"), 12)
    assert isinstance(pause, PauseRollout)
    (rollback,) = plan_next_actions(baked, stages, staged, GateReading("fail", "min_agreement"), 5)
    assert isinstance(rollback, BeginRollback)


def test_resends_are_one_open_command_per_device_under_its_own_id() -> None:
    from controller.planner import ResendDeploy, ResendRollback, ResendSwitch, plan_resends

    views = [
        AssignmentView("a", "sent", 1.0, command_id="c-a"),
        AssignmentView("b", "downloading", 2.0, command_id="c-b"),
        AssignmentView("c", "activated", 1.0, command_id="c-c"),
        AssignmentView(
            "d",
            "activated",
            1.0,
            rollback_state="sent",
            rollback_sent_at=5.0,
            command_id="c-d",
            rollback_command_id="r-d",
        ),
        AssignmentView("e", "switching", 3.0, command_id="s-e"),
        AssignmentView("f", "staged", 1.0, command_id="c-f"),
        AssignmentView("g", "pending", None),
        AssignmentView("h", "timed_out", 1.0, command_id="c-h"),
    ]
    resends = plan_resends("blue-green", views)
    assert resends == [
        ResendDeploy("a", "c-a", 1.0, activate=False),
        ResendDeploy("b", "c-b", 2.0, activate=False),
        ResendRollback("d", "r-d", 5.0),
        ResendSwitch("e", "s-e", 3.0),
    ]
    assert plan_resends("direct", views[:1]) == [ResendDeploy("a", "c-a", 1.0)]
    assert plan_resends("shadow", views[:1]) == [
        ResendDeploy("a", "c-a", 1.0, activate=False, shadow=True)
    ]


# ---------------------------------------------------------------- operator controls


@pytest.mark.parametrize(
    ("action", "status", "rolling_back", "allowed"),
    [
        ("approve", "Paused", False, True),
        ("approve", "Succeeded", False, False),
        ("pause", "InProgress", False, True),
        ("pause", "Paused", False, False),
        ("resume", "Paused", False, True),
        ("resume", "InProgress", False, False),
        ("abort", "InProgress", False, True),
        ("abort", "Aborted", False, False),
        ("rollback", "Succeeded", False, True),
        ("rollback", "InProgress", True, False),
        ("rollback", "RolledBack", False, False),
    ],
)
def test_operator_controls_are_allowed_by_the_rollouts_status(
    action: str, status: str, rolling_back: bool, allowed: bool
) -> None:
    from controller.planner import ControlPlan, ControlRefused, plan_control

    plan = plan_control(action, status, rolling_back=rolling_back, stage_index=0, approved_stage=0)
    assert isinstance(plan, ControlPlan) is allowed, plan
    if not allowed:
        assert isinstance(plan, ControlRefused) and status in plan.reason


def test_approve_opens_the_next_stage_and_a_finished_rollouts_rollback_reclaims() -> None:
    from controller.planner import ControlPlan, plan_control

    approve = plan_control("approve", "Paused", rolling_back=False, stage_index=2, approved_stage=1)
    assert isinstance(approve, ControlPlan)
    assert dict(approve.changes) == {"status": "InProgress", "approved_stage": 3, "reason": None}
    rollback = plan_control(
        "rollback", "Succeeded", rolling_back=False, stage_index=0, approved_stage=0
    )
    assert isinstance(rollback, ControlPlan) and rollback.reclaim
    assert dict(rollback.changes)["rolling_back"] is True
    abort = plan_control("abort", "Paused", rolling_back=False, stage_index=0, approved_stage=0)
    assert isinstance(abort, ControlPlan) and abort.finish == ("Aborted", "aborted by the operator")
