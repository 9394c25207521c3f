"""Telemetry gates on plain numbers: each gate's pass/fail/inconclusive, merging, A/B compare."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from controller.gates import CohortStats, compare_ab, describe_failures, evaluate_gates, overall
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    GateSpec,
    GateVerdict,
    Histogram,
)


def hist(bounds: Sequence[float], by_bound: Mapping[float, int], total: float) -> Histogram:
    """A histogram on `bounds` with the given count in the bucket of each upper bound."""
    assert set(by_bound) <= set(bounds)
    return Histogram(counts=tuple(by_bound.get(b, 0) for b in bounds), total=total)


def cohort(
    n: int, latency_ms: float, errors: int = 0, confidence: float = 0.9, devices: int = 1
) -> CohortStats:
    """`n` inferences, `n - errors` successful ones all at `latency_ms` and `confidence`."""
    ok = n - errors
    lat_bound = next(b for b in LATENCY_BUCKETS_MS if latency_ms <= b)
    conf_bound = next(b for b in CONFIDENCE_BUCKETS if confidence <= b)
    return CohortStats(
        devices,
        n,
        errors,
        hist(LATENCY_BUCKETS_MS, {lat_bound: ok}, latency_ms * ok),
        hist(CONFIDENCE_BUCKETS, {conf_bound: ok}, confidence * ok),
    )


def by_gate(spec: GateSpec, cand: CohortStats, base: CohortStats) -> dict[str, GateVerdict]:
    return {v.gate: v for v in evaluate_gates(spec, cand, base)}


BASE = cohort(100, 1.0, confidence=0.9)


# ---------------------------------------------------------------- max_latency_ms


def test_max_latency_passes_when_candidate_p95_is_under() -> None:
    """p95 of 2.5 ms (bucket bound) under a 5 ms gate → pass, observed is the p95."""
    v = by_gate(GateSpec(max_latency_ms=5, min_samples=10), cohort(100, 2.0), BASE)
    assert v["max_latency_ms"].verdict == "pass"
    assert v["max_latency_ms"].observed == 2.5 and v["max_latency_ms"].threshold == 5


def test_max_latency_fails_when_the_tail_is_slow() -> None:
    """90 fast + 10 at 50 ms: p95 lands in the 50 ms bucket → fail against 10 ms."""
    lat = hist(LATENCY_BUCKETS_MS, {1.0: 90, 50.0: 10}, 90 * 1.0 + 10 * 50.0)
    cand = CohortStats(1, 100, 0, lat, hist(CONFIDENCE_BUCKETS, {0.9: 100}, 90.0))
    v = by_gate(GateSpec(max_latency_ms=10, min_samples=10), cand, BASE)["max_latency_ms"]
    assert (v.verdict, v.observed) == ("fail", 50.0)


def test_max_latency_inconclusive_under_min_samples() -> None:
    """A slow candidate with fewer than min_samples inferences is inconclusive, not fail."""
    v = by_gate(GateSpec(max_latency_ms=5, min_samples=50), cohort(49, 900.0), BASE)
    assert v["max_latency_ms"].verdict == "inconclusive"
    assert "49 of 50" in v["max_latency_ms"].detail


def test_min_samples_boundary_is_inclusive() -> None:
    """Exactly min_samples inferences is enough for a verdict."""
    v = by_gate(GateSpec(max_latency_ms=5, min_samples=50), cohort(50, 1.0), BASE)
    assert v["max_latency_ms"].verdict == "pass"


# ---------------------------------------------------------------- max_error_rate


@pytest.mark.parametrize(
    ("errors", "verdict"), [(0, "pass"), (1, "pass"), (2, "fail"), (50, "fail")]
)
def test_max_error_rate(errors: int, verdict: str) -> None:
    """errors/count against max_error_rate=0.01 on 100 inferences: ≤1 passes, 2+ fails."""
    v = by_gate(GateSpec(max_error_rate=0.01, min_samples=10), cohort(100, 1.0, errors), BASE)
    assert v["max_error_rate"].verdict == verdict
    assert v["max_error_rate"].observed == errors / 100


def test_max_error_rate_inconclusive_under_min_samples() -> None:
    """All-error candidate below min_samples is inconclusive."""
    v = by_gate(GateSpec(max_error_rate=0.01, min_samples=20), cohort(5, 1.0, errors=5), BASE)
    assert v["max_error_rate"].verdict == "inconclusive"


# ---------------------------------------------------------------- max_latency_increase


def test_max_latency_increase_pass_and_fail() -> None:
    """p95 10 ms vs 1 ms is +900%: fails 1.0, passes 10.0; same speed passes 0."""
    spec_tight = GateSpec(max_latency_increase=1.0, min_samples=10)
    v = by_gate(spec_tight, cohort(100, 10.0), BASE)["max_latency_increase"]
    assert v.verdict == "fail" and v.observed == pytest.approx(9.0)
    loose = GateSpec(max_latency_increase=10.0, min_samples=10)
    assert by_gate(loose, cohort(100, 10.0), BASE)["max_latency_increase"].verdict == "pass"
    zero = GateSpec(max_latency_increase=0, min_samples=10)
    assert by_gate(zero, cohort(100, 1.0), BASE)["max_latency_increase"].verdict == "pass"


def test_max_latency_increase_inconclusive_with_a_small_baseline() -> None:
    """A baseline under min_samples makes the comparison inconclusive, saying so."""
    spec = GateSpec(max_latency_ms=50, max_latency_increase=0.5, min_samples=50)
    v = by_gate(spec, cohort(100, 10.0), cohort(10, 1.0))
    assert v["max_latency_ms"].verdict == "pass"  # absolute gate needs no baseline
    assert v["max_latency_increase"].verdict == "inconclusive"
    assert "baseline 10 of 50" in v["max_latency_increase"].detail


def test_max_latency_increase_inconclusive_with_a_small_candidate() -> None:
    """A candidate under min_samples is inconclusive even with a big baseline."""
    v = by_gate(GateSpec(max_latency_increase=0.5, min_samples=50), cohort(10, 900.0), BASE)
    assert v["max_latency_increase"].verdict == "inconclusive"


# ---------------------------------------------------------------- max_confidence_drop


def test_max_confidence_drop_pass_and_fail() -> None:
    """Baseline mean 0.9: candidate 0.85 (drop 0.05) passes 0.1, 0.45 (drop 0.45) fails."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=10)
    ok = by_gate(spec, cohort(100, 1.0, confidence=0.85), BASE)["max_confidence_drop"]
    assert ok.verdict == "pass" and ok.observed == pytest.approx(0.05)
    bad = by_gate(spec, cohort(100, 1.0, confidence=0.45), BASE)["max_confidence_drop"]
    assert bad.verdict == "fail" and bad.observed == pytest.approx(0.45)


def test_max_confidence_drop_inconclusive_with_a_small_baseline() -> None:
    """Too few baseline inferences → inconclusive, even for a big drop."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=20)
    v = by_gate(spec, cohort(100, 1.0, confidence=0.2), cohort(5, 1.0, confidence=0.9))
    assert v["max_confidence_drop"].verdict == "inconclusive"
    assert "baseline 5 of 20" in v["max_confidence_drop"].detail


def test_unconfigured_gates_are_left_out() -> None:
    """Only configured gates produce a verdict; none configured → no verdicts, overall pass."""
    assert set(by_gate(GateSpec(max_error_rate=0.1), BASE, BASE)) == {"max_error_rate"}
    assert evaluate_gates(GateSpec(), BASE, BASE) == ()
    assert overall(()) == "pass"


# ---------------------------------------------------------------- overall / describe_failures


def test_overall_all_pass() -> None:
    """Every gate passing on a healthy candidate → overall pass."""
    spec = GateSpec(
        max_latency_ms=5,
        max_error_rate=0.01,
        max_latency_increase=0.5,
        max_confidence_drop=0.05,
        min_samples=10,
    )
    got = evaluate_gates(spec, cohort(100, 1.0), BASE)
    assert len(got) == 4 and overall(got) == "pass"


def test_overall_inconclusive_beats_pass_and_fail_beats_both() -> None:
    """Any inconclusive (no fail) → inconclusive; any fail → fail."""
    spec = GateSpec(max_latency_ms=5, max_latency_increase=0.5, min_samples=50)
    assert overall(evaluate_gates(spec, cohort(100, 1.0), cohort(10, 1.0))) == "inconclusive"
    assert overall(evaluate_gates(spec, cohort(100, 20.0), cohort(10, 1.0))) == "fail"


def test_describe_failures_names_only_the_failing_gates() -> None:
    """The text names each failing gate with observed and threshold, and no passing gate."""
    spec = GateSpec(max_latency_ms=5, max_error_rate=0.5, max_confidence_drop=0.1, min_samples=10)
    got = evaluate_gates(spec, cohort(100, 20.0, confidence=0.3), BASE)
    text = describe_failures(got)
    assert "max_latency_ms: 25 > 5" in text
    assert "max_confidence_drop: 0.6 > 0.1" in text
    assert "max_error_rate" not in text
    assert describe_failures(evaluate_gates(spec, cohort(100, 1.0), BASE)) == ""


# ---------------------------------------------------------------- merging and summaries


def test_merged_adds_devices_counts_errors_and_buckets() -> None:
    """CohortStats.merged adds every count bucket by bucket and the histogram totals."""
    one, two = cohort(90, 1.0, devices=3), cohort(10, 50.0, errors=1, confidence=0.5, devices=2)
    m = one.merged(two)
    assert (m.devices, m.count, m.errors) == (5, 100, 1)
    assert m.latency.counts == tuple(
        x + y for x, y in zip(one.latency.counts, two.latency.counts, strict=True)
    )
    assert m.latency.n == 99 and m.latency.total == pytest.approx(90 * 1.0 + 9 * 50.0)
    assert m.confidence.total == pytest.approx(90 * 0.9 + 9 * 0.5)


def test_merging_with_an_empty_cohort_changes_nothing() -> None:
    """The default CohortStats is the identity of merged."""
    assert CohortStats().merged(BASE) == BASE == BASE.merged(CohortStats())


def test_histograms_with_different_buckets_do_not_merge() -> None:
    """Merging latency counts onto confidence buckets is refused."""
    with pytest.raises(ValueError, match="different buckets"):
        BASE.latency.merged(BASE.confidence)


def test_summary_quantiles_error_rate_and_mean_confidence() -> None:
    """90 at 1 ms + 9 at 50 ms (+1 error): p50 1, p95 50, p99 50; mean confidence from totals."""
    m = cohort(90, 1.0).merged(cohort(10, 50.0, errors=1, confidence=0.5))
    s = m.summary()
    assert (s.devices, s.inferences) == (2, 100)
    assert s.error_rate == pytest.approx(0.01)
    assert (s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms) == (1.0, 50.0, 50.0)
    assert s.mean_confidence == pytest.approx((90 * 0.9 + 9 * 0.5) / 99)


def test_summary_p95_in_the_middle_bucket() -> None:
    """Counts 50/46/4 over 1/5/100 ms: p50 1, p95 5, p99 100 (upper bounds, conservative)."""
    lat = hist(LATENCY_BUCKETS_MS, {1.0: 50, 5.0: 46, 100.0: 4}, 0.0)
    s = CohortStats(1, 100, 0, lat).summary()
    assert (s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms) == (1.0, 5.0, 100.0)


def test_summary_overflow_bucket_reports_the_last_finite_bound() -> None:
    """Latencies past the last finite bound report that bound, never infinity."""
    lat = hist(LATENCY_BUCKETS_MS, {LATENCY_BUCKETS_MS[-1]: 10}, 50_000.0)
    assert CohortStats(1, 10, 0, lat).summary().latency_p95_ms == 1000.0


def test_empty_cohort_summary_has_no_numbers() -> None:
    """No inferences → no error rate, quantiles or mean confidence."""
    s = CohortStats().summary()
    assert s.inferences == 0
    assert s.error_rate is None and s.latency_p95_ms is None and s.mean_confidence is None


# ---------------------------------------------------------------- A/B comparison


def test_ab_latency_b_wins_only_when_better_enough() -> None:
    """B 4x faster (75% better) wins at 20%; equal B keeps A; too few samples → None."""
    a = cohort(100, 10.0)
    fast = compare_ab("latency", 0.2, a, cohort(100, 2.5), 20)
    assert fast.winner == "b" and fast.improvement == pytest.approx(0.75)
    assert compare_ab("latency", 0.2, a, cohort(100, 10.0), 20).winner == "a"
    assert compare_ab("latency", 0.2, a, cohort(5, 1.0), 20).winner is None


def test_ab_errors_and_confidence() -> None:
    """Fewer errors or higher confidence in B beyond min_improvement → B; otherwise A."""
    assert compare_ab("errors", 0.01, cohort(100, 1.0, 10), cohort(100, 1.0), 20).winner == "b"
    assert compare_ab("errors", 0.2, cohort(100, 1.0, 10), cohort(100, 1.0), 20).winner == "a"
    low, high = cohort(100, 1.0, confidence=0.5), cohort(100, 1.0, confidence=0.95)
    assert compare_ab("confidence", 0.1, low, high, 20).winner == "b"
    assert compare_ab("confidence", 0.1, high, low, 20).winner == "a"


def test_thresholds_are_inclusive() -> None:
    """A value exactly at its threshold passes (p95 == max_latency_ms, rate == max_error_rate)."""
    spec = GateSpec(max_latency_ms=5, max_error_rate=0.02, min_samples=10)
    v = by_gate(spec, cohort(100, 5.0, errors=2), BASE)
    assert v["max_latency_ms"].observed == 5.0 and v["max_latency_ms"].verdict == "pass"
    assert v["max_error_rate"].observed == 0.02 and v["max_error_rate"].verdict == "pass"


def test_psi_is_zero_for_the_same_population_and_large_for_a_shifted_one() -> None:
    """Input drift: identical histograms give 0, a population moved two buckets gives > 0.25."""
    from controller.gates import psi
    from shared.messages import INPUT_BUCKETS

    base = Histogram(counts=(0, 5, 15, 15, 15, 15, 15, 15, 5, 0))
    shifted = Histogram(counts=(0, 0, 0, 5, 15, 15, 15, 15, 15, 20))
    assert len(base.counts) == len(INPUT_BUCKETS)
    assert psi(base, base) == 0.0
    drift = psi(shifted, base)
    assert drift is not None and drift > 0.25
    assert psi(Histogram.empty(INPUT_BUCKETS), base) is None


def test_input_psi_gate_fails_on_drift_and_passes_without() -> None:
    """--max-input-psi: the candidate's inputs compared with the baseline's."""
    spec = GateSpec(max_input_psi=0.2, min_samples=10)
    base = CohortStats(1, 100, 0, inputs=Histogram(counts=(0, 5, 15, 15, 15, 15, 15, 15, 5, 0)))
    same = CohortStats(1, 100, 0, inputs=Histogram(counts=(0, 5, 15, 15, 15, 15, 15, 15, 5, 0)))
    moved = CohortStats(1, 100, 0, inputs=Histogram(counts=(0, 0, 0, 5, 15, 15, 15, 15, 15, 20)))
    assert [v.verdict for v in evaluate_gates(spec, same, base)] == ["pass"]
    assert [v.verdict for v in evaluate_gates(spec, moved, base)] == ["fail"]
    assert moved.summary(base).input_psi == evaluate_gates(spec, moved, base)[0].observed
