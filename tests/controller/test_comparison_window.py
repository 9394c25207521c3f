"""controller.live feeding the gates: the settle rule, the same time window for both sides,
sketches merged per device and cohort, devices' spreads kept exactly as devices move,
and agents without sketches falling back to the histograms."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from controller.db import RolloutRow
from controller.gates import CohortStats, evaluate_gates
from controller.live import LiveRollout, Rollup, cohort_stats
from controller.planner import AssignmentView
from controller.strategies import Stage
from edge_agent.telemetry import bucket_counts
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    GateSpec,
    Histogram,
    ModelRef,
    StartRollout,
    TelemetryWindow,
)
from shared.sketch import QuantileSketch


def window(
    device: str, version: str, median_ms: float, n: int, *, sketches: bool = True, seed: int = 0
) -> TelemetryWindow:
    """One window as an agent sends it: histograms, and sketches unless an older agent's."""
    rng = np.random.default_rng(seed)
    lat = rng.lognormal(math.log(median_ms), 0.2, n)
    conf = np.clip(rng.normal(0.9, 0.02, n), 0.0, 1.0)
    ls, cs = QuantileSketch.latency(), QuantileSketch.confidence()
    ls.add(lat)
    cs.add(conf)
    return TelemetryWindow(
        device_id=device,
        model=ModelRef(name="m", version=version, sha256="0" * 64),
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC),
        count=n,
        errors=0,
        latency_ms=Histogram(
            counts=tuple(int(c) for c in bucket_counts(np.array(LATENCY_BUCKETS_MS), lat)),
            total=float(lat.sum()),
        ),
        confidence=Histogram(
            counts=tuple(int(c) for c in bucket_counts(np.array(CONFIDENCE_BUCKETS), conf)),
            total=float(conf.sum()),
        ),
        latency_sketch=ls.to_data() if sketches else None,
        confidence_sketch=cs.to_data() if sketches else None,
    )


def rollup(w: TelemetryWindow) -> Rollup:
    """What the controller makes of a window (the store's reading, then its sketches)."""
    stats = CohortStats(0, w.count, w.errors, w.latency_ms, w.confidence)
    return Rollup.of_window(stats, w)


def live(states: dict[str, str], settle_s: float = 1.0) -> LiveRollout:
    row = RolloutRow(
        rollout_id="r-1", model="m", version="2", sha256="0" * 64, strategy="canary",
        spec="{}", status="InProgress", created_at=0.0, updated_at=0.0, stage_started_at=10.0,
    )  # fmt: skip
    spec = StartRollout(
        model="m", version="2", devices=tuple(states), gates=GateSpec(settle_s=settle_s)
    )
    views = [AssignmentView(d, s, None) for d, s in states.items()]
    return LiveRollout.start(
        row, spec, [Stage("all", tuple(states))], views, {d: "eu" for d in states}
    )


def test_a_swap_window_and_the_settle_time_after_it_are_left_out() -> None:
    """First window (the swap's) out; windows starting < its end + settle_s out; then in."""
    r = live({"c": "activated"}, settle_s=2.0)
    w = rollup(window("c", "2", 1.0, 100))
    r.add_window("c", "2", False, w, window_end=11.0, window_start=10.0)
    r.add_window("c", "2", False, w, window_end=12.0, window_start=11.0)
    r.add_window("c", "2", False, w, window_end=13.0, window_start=12.9)
    assert r.cohort("candidate").count == 0
    r.add_window("c", "2", False, w, window_end=14.0, window_start=13.0)
    assert r.cohort("candidate").count == 100
    assert "2 s" in (r.cohort("candidate").settle or "")


def test_without_settle_time_only_the_swap_window_is_left_out() -> None:
    r = live({"c": "activated"}, settle_s=0.0)
    w = rollup(window("c", "2", 1.0, 100))
    r.add_window("c", "2", False, w, window_end=11.0, window_start=10.0)
    r.add_window("c", "2", False, w, window_end=12.0, window_start=11.0)
    assert r.cohort("candidate").count == 100


def test_the_baseline_counts_from_the_candidates_first_settled_window() -> None:
    """Baseline windows that end before the candidate side's comparison window opens are
    left out: both sides cover the same time."""
    r = live({"b": "pending", "c": "activated"}, settle_s=0.0)
    base = rollup(window("b", "1", 1.0, 100))
    r.add_window("b", "1", False, base, window_end=11.0, window_start=10.0)  # b's first
    r.add_window("b", "1", False, base, window_end=12.0, window_start=11.0)  # no candidate yet
    cand = rollup(window("c", "2", 1.0, 50))
    r.add_window("c", "2", False, cand, window_end=13.0, window_start=12.0)  # c's first
    r.add_window("b", "1", False, base, window_end=13.0, window_start=12.0)
    assert r.cohort("baseline").count == 0 and r.compare_from is None
    r.add_window("c", "2", False, cand, window_end=14.0, window_start=13.0)
    assert r.compare_from == 13.0
    r.add_window("b", "1", False, base, window_end=13.5, window_start=13.0)  # ends after 13
    r.add_window("b", "1", False, base, window_end=12.9, window_start=12.5)  # late, before
    assert (r.cohort("candidate").count, r.cohort("baseline").count) == (50, 100)
    summary = r.cohort("baseline").summary()
    assert summary.window_start == datetime.fromtimestamp(13.0, UTC)
    r.new_stage(1, 20.0)
    assert r.compare_from is None and r.cohort("baseline").count == 0


def test_cohort_spreads_follow_devices_exactly_as_they_move() -> None:
    """Kept window by window (device joins, moves to the candidate) they equal the spreads
    of the same devices' rollups built at once."""
    states = {f"d{i}": "pending" for i in range(6)}
    r = live(states, settle_s=0.0)
    r.set_view(AssignmentView("d0", "activated", 1.0))
    parts: dict[str, list[Rollup]] = {d: [] for d in states}
    for k, d in enumerate(states):
        version = "2" if d == "d0" else "1"
        r.add_window(d, version, False, rollup(window(d, version, 1.0, 80)), 11.0, 10.0)
        for j in range(3):
            w = rollup(window(d, version, 1.0 + 0.1 * k, 120, seed=10 * k + j))
            r.add_window(d, version, False, w, 12.0 + j, 11.0 + j)
            parts[d].append(w)
    r.set_view(AssignmentView("d5", "activated", 1.0))  # its old-version windows leave

    def at_once(devices: list[str]) -> CohortStats:
        merged = []
        for d in devices:
            total = Rollup()
            for w in parts[d]:
                total.add(w)
            merged.append(total)
        return cohort_stats(merged)

    for name, devices in (("baseline", ["d1", "d2", "d3", "d4"]), ("candidate", ["d0"])):
        got, want = r.cohort(name), at_once(devices)
        assert got.device_p95.devices == want.device_p95.devices == len(devices)
        assert got.device_p95.total == pytest.approx(want.device_p95.total)
        assert got.device_p95.total_sq == pytest.approx(want.device_p95.total_sq)
        assert got.device_confidence.total == pytest.approx(want.device_confidence.total)
        assert got.latency_sketch is not None and want.latency_sketch is not None
        assert got.latency_sketch.bins() == want.latency_sketch.bins() and got.sketched
        assert got.p(0.95) == want.p(0.95)


def test_rollups_with_sketches_survive_json_and_subtraction() -> None:
    a, b = rollup(window("a", "1", 1.0, 300, seed=1)), rollup(window("b", "1", 3.0, 200, seed=2))
    total = Rollup()
    total.add(a)
    total.add(b)
    assert Rollup.from_json(total.to_json()).stats(2) == total.stats(2)
    total.add(b, -1)
    assert total.latency_sketch is not None and a.latency_sketch is not None
    assert total.latency_sketch.bins() == a.latency_sketch.bins()
    assert total.device_values() == pytest.approx(a.device_values())


def test_a_rollup_stored_before_sketches_reads_as_unsketched() -> None:
    old = (
        '{"n":10,"e":0,"a":0,"l":[0,0,0,10,0,0,0,0,0,0,0,0,0,0,0],"lt":4.0,'
        '"c":[0,0,0,0,0,0,0,0,10,0],"ct":8.8,"i":[],"it":0.0,"t":[],"tasks":{},"rules":{}}'
    )
    r = Rollup.from_json(old)
    assert r.unsketched == 10 and r.latency_sketch is None
    assert not r.stats(1).sketched


def test_an_older_agents_windows_fall_back_to_histograms_and_the_verdict_says_so() -> None:
    """One candidate device without sketches: the latency gate reads the histograms (a
    point comparison, no interval) and names the fallback; the summary says so too."""
    new = [rollup(window(f"n{i}", "1", 1.0, 300, seed=i)) for i in range(4)]
    old = [rollup(window(f"o{i}", "2", 1.0, 300, sketches=False, seed=9 + i)) for i in range(3)]
    baseline, candidate = cohort_stats(new), cohort_stats(old)
    assert baseline.sketched and not candidate.sketched
    (v,) = evaluate_gates(GateSpec(max_latency_increase=0.5, min_samples=10), candidate, baseline)
    assert v.verdict == "pass" and v.low is None and v.high is None
    assert v.method is not None and "agents without sketches" in v.method
    assert candidate.summary().quantiles == "histograms"
    assert baseline.summary().quantiles == "sketch"
