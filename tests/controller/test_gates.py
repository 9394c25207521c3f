"""Gates on plain numbers: pass, fail and inconclusive for each, and the A/B comparison."""

from __future__ import annotations

from controller.gates import CohortStats, compare_ab, describe_failures, evaluate_gates, overall
from shared.messages import CONFIDENCE_BUCKETS, LATENCY_BUCKETS_MS, GateSpec, Histogram


def cohort(n: int, latency_ms: float, errors: int = 0, confidence: float = 0.9) -> CohortStats:
    """`n` inferences all in the bucket of `latency_ms`, all with `confidence`."""
    lat = [0] * len(LATENCY_BUCKETS_MS)
    lat[next(i for i, b in enumerate(LATENCY_BUCKETS_MS) if latency_ms <= b)] = n - errors
    conf = [0] * len(CONFIDENCE_BUCKETS)
    conf[next(i for i, b in enumerate(CONFIDENCE_BUCKETS) if confidence <= b)] = n - errors
    return CohortStats(
        1, n, errors,
        Histogram(counts=tuple(lat), total=latency_ms * (n - errors)),
        Histogram(counts=tuple(conf), total=confidence * (n - errors)),
    )  # fmt: skip


def verdicts(spec: GateSpec, cand: CohortStats, base: CohortStats) -> dict[str, str]:
    return {v.gate: v.verdict for v in evaluate_gates(spec, cand, base)}


def test_each_gate_passes_on_a_healthy_candidate() -> None:
    """Same speed, no errors, same confidence: every gate passes."""
    spec = GateSpec(max_latency_ms=5, max_error_rate=0.01, max_latency_increase=0.5,
                    max_confidence_drop=0.05, min_samples=10)  # fmt: skip
    got = evaluate_gates(spec, cohort(100, 1.0), cohort(100, 1.0))
    assert {v.verdict for v in got} == {"pass"} and overall(got) == "pass"


def test_each_gate_fails_on_its_own_problem() -> None:
    """Slow p95, errors, latency increase, confidence drop: each fails its gate."""
    base = cohort(100, 1.0)
    assert verdicts(GateSpec(max_latency_ms=5, min_samples=10), cohort(100, 20.0), base) == {
        "max_latency_ms": "fail"
    }
    assert verdicts(
        GateSpec(max_error_rate=0.01, min_samples=10), cohort(100, 1.0, errors=5), base
    ) == {"max_error_rate": "fail"}
    slow = evaluate_gates(
        GateSpec(max_latency_increase=1.0, min_samples=10), cohort(100, 10.0), base
    )
    assert slow[0].verdict == "fail" and slow[0].observed == 9.0
    assert "max_latency_increase" in describe_failures(slow)
    drop = verdicts(
        GateSpec(max_confidence_drop=0.1, min_samples=10), cohort(100, 1.0, confidence=0.45), base
    )
    assert drop == {"max_confidence_drop": "fail"}


def test_too_few_samples_is_inconclusive_not_pass() -> None:
    """Under min_samples in the candidate, or in the baseline for comparisons: inconclusive."""
    spec = GateSpec(max_latency_ms=5, max_latency_increase=0.5, min_samples=50)
    assert verdicts(spec, cohort(10, 1.0), cohort(100, 1.0)) == {
        "max_latency_ms": "inconclusive", "max_latency_increase": "inconclusive",
    }  # fmt: skip
    assert verdicts(spec, cohort(100, 1.0), cohort(10, 1.0)) == {
        "max_latency_ms": "pass", "max_latency_increase": "inconclusive",
    }  # fmt: skip
    assert overall(evaluate_gates(spec, cohort(10, 1.0), cohort(100, 1.0))) == "inconclusive"


def test_fail_wins_over_inconclusive() -> None:
    """One failing gate makes the whole reading fail."""
    spec = GateSpec(max_latency_ms=5, max_latency_increase=0.5, min_samples=50)
    assert overall(evaluate_gates(spec, cohort(100, 20.0), cohort(10, 1.0))) == "fail"


def test_cohorts_merge_by_adding_counts() -> None:
    """Merged histograms add up; summaries read quantiles from the merged buckets."""
    merged = cohort(90, 1.0).merged(cohort(10, 50.0, errors=1))
    assert (merged.devices, merged.count, merged.errors) == (2, 100, 1)
    s = merged.summary()
    assert s.latency_p50_ms == 1.0 and s.latency_p99_ms == 50.0 and s.error_rate == 0.01


def test_ab_comparison_picks_b_only_when_it_is_better_enough() -> None:
    """Latency: B 4x faster wins; B slightly faster under min_improvement keeps A; too few: None."""
    a, fast_b, similar_b = cohort(100, 10.0), cohort(100, 2.5), cohort(100, 10.0)
    assert compare_ab("latency", 0.2, a, fast_b, 20).winner == "b"
    assert compare_ab("latency", 0.2, a, similar_b, 20).winner == "a"
    assert compare_ab("latency", 0.2, a, cohort(5, 1.0), 20).winner is None
    assert (
        compare_ab("errors", 0.01, cohort(100, 1.0, errors=10), cohort(100, 1.0), 20).winner == "b"
    )
    assert (
        compare_ab(
            "confidence",
            0.1,
            cohort(100, 1.0, confidence=0.5),
            cohort(100, 1.0, confidence=0.95),
            20,
        ).winner
        == "b"
    )
