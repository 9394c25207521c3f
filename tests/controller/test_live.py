"""controller.live: counts and cohorts follow each change, exactly, with no re-reading."""

from __future__ import annotations

import random

import pytest

from controller.db import RolloutRow
from controller.gates import CohortStats
from controller.live import LiveRollout, Rollup, cohort_of
from controller.planner import AssignmentView
from controller.strategies import Stage
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    StartRollout,
)


def stats(count: int, bucket: int, ms: float) -> CohortStats:
    lat = [0] * len(LATENCY_BUCKETS_MS)
    lat[bucket] = count
    conf = [0] * len(CONFIDENCE_BUCKETS)
    conf[8] = count
    return CohortStats(
        0,
        count,
        count // 10,
        Histogram(counts=tuple(lat), total=ms * count),
        Histogram(counts=tuple(conf), total=0.85 * count),
        Histogram(counts=(0,) * len(INPUT_BUCKETS)),
    )


def live(strategy: str = "canary", states: dict[str, str] | None = None) -> LiveRollout:
    states = states or {"a": "pending", "b": "pending", "c": "pending"}
    row = RolloutRow(
        rollout_id="r-1", model="m", version="2", sha256="0" * 64, strategy=strategy,
        spec="{}", status="InProgress", created_at=0.0, updated_at=0.0, stage_started_at=10.0,
    )  # fmt: skip
    views = [AssignmentView(d, s, None) for d, s in states.items()]
    return LiveRollout.start(
        row,
        StartRollout(model="m", version="2", devices=tuple(states)),
        [Stage("all", tuple(states))],
        views,
        {d: "eu" for d in states},
    )


def test_rollups_add_and_subtract_exactly() -> None:
    rng = random.Random(7)
    parts = [
        Rollup.of(stats(rng.randint(1, 50), rng.randint(0, 14), rng.random())) for _ in range(40)
    ]
    total = Rollup()
    for p in parts:
        total.add(p)
    for p in parts[10:]:
        total.add(p, -1)
    expected = Rollup()
    for p in parts[:10]:
        expected.add(p)
    got, want = total.stats(1), expected.stats(1)
    # Counts exactly; the sums to floating-point rounding.
    assert (got.count, got.errors, got.latency.counts, got.confidence.counts) == (
        want.count, want.errors, want.latency.counts, want.confidence.counts,
    )  # fmt: skip
    assert got.latency.total == pytest.approx(want.latency.total)
    assert got.confidence.total == pytest.approx(want.confidence.total)
    assert Rollup.from_json(total.to_json()).stats(1) == got


def test_a_device_that_activates_moves_from_baseline_to_candidate() -> None:
    """Its windows of the old version leave the baseline; the new version's count for
    the candidate; counts per state follow."""
    r = live()
    r.set_view(AssignmentView("c", "activated", 1.0))
    # Each device's first window of a version is its settle window (the swap's): not counted.
    for device, version in (("a", "1"), ("b", "1"), ("c", "2")):
        r.add_window(device, version, False, Rollup.of(stats(5, 5, 2.0)), 11.0, 10.5)
    assert r.cohort("baseline").count == r.cohort("candidate").count == 0
    # c settled (its window starts >= 11 + settle_s 1): it opens the comparison window.
    assert r.add_window("c", "2", False, Rollup.of(stats(40, 5, 2.0)), 13.0, 12.0)
    assert r.add_window("a", "1", False, Rollup.of(stats(100, 3, 0.5)), 14.0, 12.0)
    assert r.add_window("b", "1", False, Rollup.of(stats(50, 3, 0.5)), 14.0, 12.0)
    assert (r.cohort("baseline").devices, r.cohort("baseline").count) == (2, 150)
    r.set_view(AssignmentView("a", "activated", 1.0))
    assert (r.cohort("baseline").devices, r.cohort("baseline").count) == (1, 50)
    assert r.cohort("candidate").count == 40  # a's old-version windows are no evidence
    r.add_window("a", "2", False, Rollup.of(stats(30, 5, 2.0)), 15.0, 14.0)  # a's swap window
    assert r.cohort("candidate").count == 40
    r.add_window("a", "2", False, Rollup.of(stats(30, 5, 2.0)), 17.0, 16.0)
    assert (r.cohort("candidate").devices, r.cohort("candidate").count) == (2, 70)
    assert r.counts == {"pending": 1, "activated": 2}
    assert r.avg_served_latency_ms() == 2.0  # served latency counts every window


def test_windows_before_the_stage_and_of_other_devices_do_not_count() -> None:
    r = live()
    assert not r.add_window("a", "1", False, Rollup.of(stats(10, 3, 0.5)), window_end=9.0)
    assert not r.add_window("zz", "1", False, Rollup.of(stats(10, 3, 0.5)), window_end=11.0)
    assert r.cohort("baseline").count == 0
    r.new_stage(1, 20.0)
    assert not r.add_window("a", "1", False, Rollup.of(stats(10, 3, 0.5)), window_end=15.0)


def test_cohorts_by_strategy() -> None:
    staged = AssignmentView("a", "staged", 1.0)
    assert cohort_of("shadow", staged, "2", None, "2", True) == "candidate"
    assert cohort_of("shadow", staged, "2", None, "1", False) == "baseline"
    assert cohort_of("shadow", staged, "2", None, "2", False) is None
    side_b = AssignmentView("b", "activated", 1.0, version="3")
    assert cohort_of("ab", side_b, "2", "3", "3", False) == "b"
    assert cohort_of("ab", AssignmentView("a", "activated", 1.0), "2", "3", "2", False) == "a"
    assert cohort_of("canary", AssignmentView("a", "sent", 1.0), "2", None, "1", False) is None
