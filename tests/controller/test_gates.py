"""Telemetry gates on plain numbers: each gate's pass/fail/inconclusive with its interval,
the histogram fallback for agents without sketches, merging, A/B compare."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pytest

from controller.gates import (
    BAKE_ALPHA,
    LEVEL,
    SINGLE,
    CohortStats,
    DeviceSpread,
    Tails,
    TensorInputs,
    compare_ab,
    describe_failures,
    difference_interval,
    epoch_alpha,
    epoch_tail,
    evaluate_gates,
    format_reading,
    look_epoch,
    look_level,
    merge_tensor_inputs,
    overall,
    psi,
    wilson_interval,
)
from controller.live import Rollup, cohort_stats
from edge_agent.telemetry import bucket_counts
from shared.manifest import ModelTask
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    GateSpec,
    GateVerdict,
    Histogram,
)
from shared.sketch import QuantileSketch
from shared.tasks import LEGACY_AGREEMENT_RULE


def hist(bounds: Sequence[float], by_bound: Mapping[float, int], total: float) -> Histogram:
    """A histogram on `bounds` with the given count in the bucket of each upper bound."""
    assert set(by_bound) <= set(bounds)
    return Histogram(counts=tuple(by_bound.get(b, 0) for b in bounds), total=total)


def cohort(
    n: int, latency_ms: float, errors: int = 0, confidence: float = 0.9, devices: int = 1
) -> CohortStats:
    """`n` inferences, `n - errors` successful ones all at `latency_ms` and `confidence`,
    as agents without sketches report them (histograms only)."""
    ok = n - errors
    lat_bound = next(b for b in LATENCY_BUCKETS_MS if latency_ms <= b)
    conf_bound = next(b for b in CONFIDENCE_BUCKETS if confidence <= b)
    return CohortStats(
        devices,
        n,
        errors,
        hist(LATENCY_BUCKETS_MS, {lat_bound: ok}, latency_ms * ok),
        hist(CONFIDENCE_BUCKETS, {conf_bound: ok}, confidence * ok),
        unsketched=n,
    )


def by_gate(spec: GateSpec, cand: CohortStats, base: CohortStats) -> dict[str, GateVerdict]:
    return {v.gate: v for v in evaluate_gates(spec, cand, base)}


BASE = cohort(100, 1.0, confidence=0.9)


def fleet(
    k: int,
    median_ms: float,
    *,
    n: int = 400,
    sigma: float = 0.25,
    spread: float = 0.03,
    confidence: float = 0.9,
    errors: int = 0,
    seed: int = 0,
) -> CohortStats:
    """`k` devices of `n` inferences each (`errors` of them failed): log-normal latencies
    around `median_ms` (device medians spread by `spread` in log), confidences around
    `confidence`; as the agents' windows report them (histograms and sketches)."""
    rng = np.random.default_rng(seed)
    rollups = []
    for _ in range(k):
        ok = n - errors
        lat = rng.lognormal(math.log(median_ms) + rng.normal(0.0, spread), sigma, ok)
        conf = np.clip(rng.normal(confidence + rng.normal(0.0, 0.005), 0.03, ok), 0.0, 1.0)
        ls, cs = QuantileSketch.latency(), QuantileSketch.confidence()
        ls.add(lat)
        cs.add(conf)
        latency = bucket_counts(np.array(LATENCY_BUCKETS_MS), lat)
        conf_h = bucket_counts(np.array(CONFIDENCE_BUCKETS), conf)
        stats = CohortStats(
            0, n, errors,
            Histogram(counts=tuple(int(c) for c in latency), total=float(lat.sum())),
            Histogram(counts=tuple(int(c) for c in conf_h), total=float(conf.sum())),
            latency_sketch=ls, confidence_sketch=cs,
        )  # fmt: skip
        rollups.append(Rollup.of(stats))
    return cohort_stats(rollups)


FLEET = fleet(30, 1.0, seed=1)


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
    ("n", "errors", "verdict"),
    [
        (10_000, 0, "pass"), (10_000, 50, "pass"), (10_000, 100, "inconclusive"),
        (10_000, 200, "fail"), (100, 0, "inconclusive"), (100, 1, "inconclusive"),
        (100, 10, "fail"),
    ],
)  # fmt: skip
def test_max_error_rate_reads_the_wilson_interval(n: int, errors: int, verdict: str) -> None:
    """max_error_rate=0.01: fails when the whole interval is above 1 %, passes when the
    whole interval is at or below it; 0 errors in 100 calls cannot show a rate under 1 %."""
    v = by_gate(GateSpec(max_error_rate=0.01, min_samples=10), cohort(n, 1.0, errors), BASE)
    g = v["max_error_rate"]
    assert g.verdict == verdict
    assert g.observed == errors / n and g.low is not None and g.high is not None
    assert g.low <= g.observed <= g.high and (g.samples, g.level) == (n, LEVEL)


def test_a_zero_error_tolerance_passes_only_without_errors() -> None:
    """No interval can show a rate of exactly 0: max_error_rate 0 passes on no error."""
    spec = GateSpec(max_error_rate=0.0, min_samples=50)
    assert by_gate(spec, cohort(100, 1.0), BASE)["max_error_rate"].verdict == "pass"
    assert by_gate(spec, cohort(100, 1.0, 1), BASE)["max_error_rate"].verdict == "fail"
    assert by_gate(spec, cohort(10, 1.0), BASE)["max_error_rate"].verdict == "inconclusive"


def test_wilson_interval_covers_the_rate_and_stays_in_0_1() -> None:
    i = wilson_interval(0, 1000)
    assert i is not None and i.low == 0.0 and 0 < i.high < 0.01
    j = wilson_interval(1000, 1000)
    assert j is not None and j.high == 1.0 and 0.99 < j.low < 1.0
    assert wilson_interval(0, 0) is None


def test_max_error_rate_inconclusive_under_min_samples() -> None:
    """All-error candidate below min_samples is inconclusive."""
    v = by_gate(GateSpec(max_error_rate=0.01, min_samples=20), cohort(5, 1.0, errors=5), BASE)
    assert v["max_error_rate"].verdict == "inconclusive"


# ---------------------------------------------------------------- max_latency_increase


def test_histogram_fallback_max_latency_increase_pass_and_fail() -> None:
    """Agents without sketches: p95 10 ms vs 1 ms is +900%: fails 1.0, passes 10.0; same
    speed passes 0 (a point comparison, no interval, and the verdict says so)."""
    spec_tight = GateSpec(max_latency_increase=1.0, min_samples=10)
    v = by_gate(spec_tight, cohort(100, 10.0), BASE)["max_latency_increase"]
    assert v.verdict == "fail" and v.observed == pytest.approx(9.0)
    loose = GateSpec(max_latency_increase=10.0, min_samples=10)
    assert by_gate(loose, cohort(100, 10.0), BASE)["max_latency_increase"].verdict == "pass"
    zero = GateSpec(max_latency_increase=0, min_samples=10)
    same = by_gate(zero, cohort(100, 1.0), BASE)["max_latency_increase"]
    assert same.verdict == "pass" and (same.low, same.high) == (None, None)
    assert same.method is not None and "agents without sketches" in same.method


def test_latency_increase_fails_a_slower_fleet_and_passes_the_same_one() -> None:
    """Sketched devices: +30 % fails a 10 % tolerance with the whole interval above it; a
    candidate with the baseline's distribution passes it; the verdict counts both sides."""
    spec = GateSpec(max_latency_increase=0.1, min_samples=100)
    slow = by_gate(spec, fleet(10, 1.3, seed=2), FLEET)["max_latency_increase"]
    assert slow.verdict == "fail" and slow.low is not None and slow.low > 0.1
    assert slow.observed == pytest.approx(0.3, abs=0.05)
    assert (slow.devices, slow.baseline_devices) == (10, 30)
    assert (slow.samples, slow.baseline_samples) == (4000, 12000)
    same = by_gate(spec, fleet(10, 1.0, seed=3), FLEET)["max_latency_increase"]
    assert same.verdict == "pass" and same.high is not None and same.high <= 0.1
    assert same.low is not None and same.low < 0 < same.high


def test_latency_increase_is_inconclusive_when_the_interval_straddles_the_tolerance() -> None:
    """+10 % against a 10 % tolerance with two candidate devices: neither shown."""
    spec = GateSpec(max_latency_increase=0.1, min_samples=100)
    v = by_gate(spec, fleet(2, 1.1, seed=4), FLEET)["max_latency_increase"]
    assert v.verdict == "inconclusive" and v.low is not None and v.high is not None
    assert v.low < 0.1 < v.high


def test_latency_increase_needs_a_device_spread() -> None:
    """One device each side: no spread to judge a ratio by, inconclusive, saying why; the
    absolute gate reads one device's p95 all the same."""
    spec = GateSpec(max_latency_increase=0.1, max_latency_ms=100, min_samples=100)
    v = by_gate(spec, fleet(1, 3.0, seed=5), fleet(1, 1.0, seed=6))
    assert v["max_latency_increase"].verdict == "inconclusive"
    assert "too few devices" in v["max_latency_increase"].detail
    assert v["max_latency_ms"].verdict == "pass"


def test_quantile_interval_covers_the_true_p95() -> None:
    """The order-statistic interval of a log-normal's p95 holds the true value in about
    LEVEL of samples, and a bigger sample narrows it."""
    from controller.gates import quantile_interval

    true = math.exp(1.6448536 * 0.3)
    rng = np.random.default_rng(3)
    hits, widths = 0, []
    for _ in range(300):
        sk = QuantileSketch.latency()
        sk.add(rng.lognormal(0.0, 0.3, 400))
        i = quantile_interval(sk, 0.95)
        assert i is not None
        hits += i.low <= true <= i.high
        widths.append(i.high - i.low)
    assert hits / 300 >= LEVEL - 0.04
    big = QuantileSketch.latency()
    big.add(rng.lognormal(0.0, 0.3, 40_000))
    j = quantile_interval(big, 0.95)
    assert j is not None and j.high - j.low < float(np.median(widths)) / 5
    few = QuantileSketch.latency()
    few.add([1.0, 2.0, 3.0])
    k = quantile_interval(few, 0.95)
    # Of 3 values nothing bounds the p95 from above; below, one of the values does.
    assert k is not None and k.high == math.inf and 1.0 <= k.low <= 2.0 * 1.02


def test_max_latency_ms_reads_the_candidate_devices_p95() -> None:
    """Devices with p95 about 1.5 ms (median 1 ms, sigma 0.25): pass 2 ms, fail 1.2 ms; the
    estimate is the cohort's p95, as the status's summary shows it."""
    cand = fleet(10, 1.0, seed=7)
    ok = by_gate(GateSpec(max_latency_ms=2, min_samples=100), cand, FLEET)["max_latency_ms"]
    assert ok.verdict == "pass" and ok.observed == pytest.approx(1.5, rel=0.05)
    assert ok.observed == cand.summary().latency_p95_ms
    bad = by_gate(GateSpec(max_latency_ms=1.2, min_samples=100), cand, FLEET)["max_latency_ms"]
    assert bad.verdict == "fail" and bad.low is not None and bad.low > 1.2


def test_pooled_t_interval_of_known_values() -> None:
    """Candidate devices 1, 2, 3 and baseline 0, 1, 2: difference 1, pooled s^2 = 1, df 4."""
    from scipy import stats

    i = difference_interval(DeviceSpread.of([1, 2, 3]), DeviceSpread.of([0, 1, 2]))
    assert i is not None
    half = float(stats.t.ppf(0.5 + LEVEL / 2, 4)) * math.sqrt(1 * (1 / 3 + 1 / 3))
    assert (i.estimate, i.low, i.high) == pytest.approx((1.0, 1 - half, 1 + half))
    assert difference_interval(DeviceSpread.of([1]), DeviceSpread.of([0])) is None


def test_device_spread_takes_devices_out_exactly() -> None:
    d = DeviceSpread.of([0.1, 0.5, 0.9]).plus(0.5, -1)
    assert d.devices == 2 and d.mean == pytest.approx(0.5)
    assert d.squares == pytest.approx(0.32)
    assert DeviceSpread.of([0.3]).plus(0.3, -1) == DeviceSpread()


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
    """Devices' mean confidence 0.9: candidate 0.85 (drop 0.05) passes 0.1, 0.45 fails."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=10)
    ok = by_gate(spec, fleet(5, 1.0, confidence=0.85), FLEET)["max_confidence_drop"]
    assert ok.verdict == "pass" and ok.observed == pytest.approx(0.05, abs=0.01)
    bad = by_gate(spec, fleet(5, 1.0, confidence=0.45), FLEET)["max_confidence_drop"]
    assert bad.verdict == "fail" and bad.observed == pytest.approx(0.45, abs=0.01)
    assert bad.low is not None and bad.low > 0.1 and bad.devices == 5


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
    got = evaluate_gates(spec, fleet(10, 1.0, seed=8), FLEET)
    assert len(got) == 4 and overall(got) == "pass", got


def test_overall_inconclusive_beats_pass_and_fail_beats_both() -> None:
    """Any inconclusive (no fail) → inconclusive; any fail → fail."""
    spec = GateSpec(max_latency_ms=5, max_latency_increase=0.5, min_samples=50)
    assert overall(evaluate_gates(spec, cohort(100, 1.0), cohort(10, 1.0))) == "inconclusive"
    assert overall(evaluate_gates(spec, cohort(100, 20.0), cohort(10, 1.0))) == "fail"


def test_describe_failures_names_only_the_failing_gates() -> None:
    """The text names each failing gate with observed and threshold, and no passing gate."""
    spec = GateSpec(max_latency_ms=5, max_error_rate=0.5, max_confidence_drop=0.1, min_samples=10)
    got = evaluate_gates(spec, fleet(5, 20.0, confidence=0.3), FLEET)
    text = describe_failures(got)
    by = {v.gate: v for v in got}
    assert f"max_latency_ms: {format_reading(by['max_latency_ms'])} > 5" in text
    assert f"max_confidence_drop: {format_reading(by['max_confidence_drop'])} > 0.1" in text
    assert "max_error_rate" not in text
    assert describe_failures(evaluate_gates(spec, fleet(5, 1.0), FLEET)) == ""
    v = by["max_latency_ms"]
    assert format_reading(v) == f"{v.observed:.4g} [{v.low:.4g}, {v.high:.4g}]"


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
    # The rate's interval: 2 % exactly at the tolerance is not shown to exceed it.
    assert v["max_error_rate"].observed == 0.02 and v["max_error_rate"].verdict != "fail"


def test_psi_is_zero_for_the_same_population_and_large_for_a_shifted_one() -> None:
    """Input drift: identical histograms give 0, a population moved two buckets gives > 0.25."""
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


# ---------------------------------------------------------------- tasks: not applicable

CLF = ModelTask(kind="classifier", output="out")
DET = ModelTask(kind="detector", output="scores", score_threshold=0.5)
NONE = ModelTask(kind="none")


def with_task(stats: CohortStats, *tasks: ModelTask, rules: tuple[str, ...] = ()) -> CohortStats:
    return replace(stats, tasks=frozenset(tasks), agreement_rules=frozenset(rules))


def test_confidence_gate_is_not_applicable_for_a_model_without_confidence() -> None:
    """Task none on either side: not_applicable, no observed number, the reason in detail."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=10)
    cand = with_task(cohort(100, 1.0, confidence=0.1), NONE)
    v = by_gate(spec, cand, with_task(BASE, NONE))["max_confidence_drop"]
    assert (v.verdict, v.observed) == ("not_applicable", None)
    assert "candidate model has no confidence (task none)" in v.detail
    v = by_gate(spec, with_task(cohort(100, 1.0), CLF), with_task(BASE, NONE))
    assert v["max_confidence_drop"].verdict == "not_applicable"
    assert "baseline model has no confidence" in v["max_confidence_drop"].detail


def test_confidence_gate_does_not_compare_confidences_that_mean_different_things() -> None:
    """A classifier's top score vs a detector's mean detection score: not applicable;
    the same kind on another output name still compares."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=10)
    v = by_gate(spec, with_task(cohort(100, 1.0), DET), with_task(BASE, CLF))
    assert v["max_confidence_drop"].verdict == "not_applicable"
    assert "mean different things" in v["max_confidence_drop"].detail
    renamed = ModelTask(kind="classifier", output="probs")
    v = by_gate(spec, with_task(fleet(5, 1.0), renamed), with_task(FLEET, CLF))
    assert v["max_confidence_drop"].verdict == "pass"


def test_detector_confidence_gate_counts_the_inferences_that_have_a_confidence() -> None:
    """100 inferences of which 5 detected something: 5 of 10 confidence samples."""
    spec = GateSpec(max_confidence_drop=0.1, min_samples=10)
    few = CohortStats(
        1, 100, 0, hist(LATENCY_BUCKETS_MS, {1.0: 100}, 100.0),
        hist(CONFIDENCE_BUCKETS, {0.9: 5}, 4.5), tasks=frozenset({DET}),
    )  # fmt: skip
    v = by_gate(spec, few, with_task(BASE, DET))["max_confidence_drop"]
    assert v.verdict == "inconclusive" and v.detail == "5 of 10 confidence samples"


def test_overall_treats_not_applicable_as_absent() -> None:
    """not_applicable never fails, never makes an inconclusive reading pass; alone it is
    what no gate at all is."""
    na = GateVerdict(gate="max_confidence_drop", verdict="not_applicable")
    ok = GateVerdict(gate="max_latency_ms", verdict="pass")
    unsure = GateVerdict(gate="max_error_rate", verdict="inconclusive")
    bad = GateVerdict(gate="max_error_rate", verdict="fail")
    assert overall([na]) == overall([]) == "pass"
    assert overall([na, ok]) == "pass"
    assert overall([na, unsure]) == "inconclusive"
    assert overall([na, bad]) == "fail"
    assert describe_failures([na, ok]) == ""


def test_status_summary_names_the_task_and_the_agreement_rule() -> None:
    s = with_task(cohort(10, 1.0), DET, rules=("all outputs within rtol=0.01, atol=0.001",))
    summary = s.summary()
    assert summary.task == "detector on 'scores' (threshold 0.5)"
    assert summary.agreement_rule == "all outputs within rtol=0.01, atol=0.001"
    assert CohortStats().summary().task is None


def test_ab_on_confidence_is_not_decided_for_models_without_one() -> None:
    """winner_metric confidence with task none: no winner, the reading says why."""
    a, b = with_task(cohort(100, 1.0), NONE), with_task(cohort(100, 1.0, confidence=0.99), NONE)
    r = compare_ab("confidence", 0.1, a, b, 20)
    assert r.winner is None and "not applicable" in r.detail


# ---------------------------------------------------------------- shadow agreement rules


def shadow(agreements: int, *tasks: ModelTask, rule: str, n: int = 1000) -> CohortStats:
    return replace(cohort(n, 1.0), agreements=agreements, tasks=frozenset(tasks),
                   agreement_rules=frozenset({rule}))  # fmt: skip


def test_min_agreement_names_the_rule_it_read() -> None:
    spec = GateSpec(min_agreement=0.9, min_samples=10)
    numeric = "all outputs within rtol=0.01, atol=0.001"
    v = by_gate(spec, shadow(950, NONE, rule=numeric), BASE)["min_agreement"]
    assert v.verdict == "pass" and v.detail == f"shadow agreement: {numeric}, Wilson interval"
    v = by_gate(spec, shadow(500, CLF, rule="same top class of 'out'"), BASE)["min_agreement"]
    assert v.verdict == "fail" and "same top class of 'out'" in v.detail
    # 95 of 100 cannot show 90 % or more: inconclusive.
    few = by_gate(spec, shadow(95, NONE, rule=numeric, n=100), BASE)["min_agreement"]
    assert few.verdict == "inconclusive" and few.low is not None and few.low < 0.9


def test_top_class_agreement_of_a_non_classifier_is_not_applicable() -> None:
    """Older agents compared the first output's top class: for landmarks that is noise."""
    spec = GateSpec(min_agreement=0.9, min_samples=10)
    v = by_gate(spec, shadow(10, NONE, rule=LEGACY_AGREEMENT_RULE), BASE)["min_agreement"]
    assert v.verdict == "not_applicable" and "no classifier" in v.detail
    ok = by_gate(spec, shadow(950, CLF, rule=LEGACY_AGREEMENT_RULE), BASE)["min_agreement"]
    assert ok.verdict == "pass"


# ---------------------------------------------------------------- input PSI per tensor

SPREAD = Histogram(counts=(0, 5, 15, 15, 15, 15, 15, 15, 5, 0))
MOVED = Histogram(counts=(0, 0, 0, 5, 15, 15, 15, 15, 15, 20))
U8 = Histogram(counts=(10, 10, 10, 10, 10, 10, 10, 10))
U8_DARK = Histogram(counts=(70, 10, 0, 0, 0, 0, 0, 0))


def tensors(**by_name: Histogram) -> tuple[TensorInputs, ...]:
    layouts = {8: "uint8, no quantization", 10: "float32, no quantization"}
    return tuple(TensorInputs(n, layouts[len(h.counts)], h) for n, h in by_name.items())


def with_inputs(*items: TensorInputs) -> CohortStats:
    return CohortStats(1, 100, 0, input_tensors=items)


def test_input_psi_gate_fails_when_any_tensor_drifts_and_names_it() -> None:
    """Two inputs: the image drifted, the features did not → fail on the image's PSI."""
    spec = GateSpec(max_input_psi=0.2, min_samples=10)
    base = with_inputs(*tensors(image=U8, features=SPREAD))
    cand = with_inputs(*tensors(image=U8_DARK, features=SPREAD))
    (v,) = evaluate_gates(spec, cand, base)
    assert v.verdict == "fail" and v.observed == psi(U8_DARK, U8)
    assert v.detail.startswith("input PSI of 'image', the worst of 2 ('features' 0")
    summary = cand.summary(base)
    assert summary.input_psi == v.observed
    assert summary.input_psi_by_tensor == {"image": psi(U8_DARK, U8), "features": 0.0}
    (ok,) = evaluate_gates(spec, with_inputs(*tensors(image=U8, features=SPREAD)), base)
    assert ok.verdict == "pass" and ok.observed == 0.0


def test_input_psi_compares_a_tensor_only_within_one_layout() -> None:
    """A candidate whose input quantizes differently has nothing to compare per tensor: the
    first-input histogram of older agents is the fallback, and says so."""
    spec = GateSpec(max_input_psi=0.2, min_samples=10)
    base = replace(with_inputs(*tensors(image=U8)), inputs=SPREAD)
    other = TensorInputs("image", "uint8, q(scale=0.5, zero_point=0)", U8_DARK)
    cand = replace(with_inputs(other), inputs=MOVED)
    (v,) = evaluate_gates(spec, cand, base)
    assert v.observed == psi(MOVED, SPREAD) and v.verdict == "fail"
    assert v.detail == "input PSI of the first input, candidate vs baseline"
    assert cand.summary(base).input_psi_by_tensor is None


def test_tensor_inputs_merge_by_name_and_layout() -> None:
    a = with_inputs(*tensors(image=U8, features=SPREAD))
    b = with_inputs(*tensors(image=U8_DARK))
    m = a.merged(b)
    assert [t.name for t in m.input_tensors] == ["image", "features"]
    assert m.input_tensors[0].histogram.counts == (80, 20, 10, 10, 10, 10, 10, 10)
    assert merge_tensor_inputs((), m.input_tensors) == m.input_tensors


# ---------------------------------------------------------------- repeated looks


def test_epochs_count_doublings_of_the_evidence_and_share_the_bake_budget() -> None:
    """Epoch k starts at min_samples * 2**k; the epochs' shares sum to the bake's budget,
    and each reading's fail tail shrinks by epoch, below what its epoch may spend."""
    assert [look_epoch(n, 2000) for n in (0, 1999, 2000, 3999, 4000, 8000, 64_000)] == [
        0, 0, 0, 0, 1, 2, 5,
    ]  # fmt: skip
    assert sum(epoch_alpha(k) for k in range(60)) == pytest.approx(BAKE_ALPHA)
    tails = [epoch_tail(k) for k in range(8)]
    assert all(a > b for a, b in itertools.pairwise(tails))
    assert all(epoch_tail(k) < epoch_alpha(k) / 3 for k in range(8))  # many readings share it
    assert tails[0] < SINGLE.low  # even the first reading is stricter than one at LEVEL


def test_look_level_tightens_only_the_bound_a_fail_is_decided_on() -> None:
    """A max_ gate fails on its low bound, min_agreement on its high one: that bound takes
    the epoch's tail, the other (read for a pass, once, at the bake's end) stays at LEVEL."""
    up = look_level(9000, 2000, lower_is_better=True)
    assert up.epoch == 2 and up.tails == Tails(epoch_tail(2), SINGLE.high)
    assert up.fail_level == 1 - epoch_tail(2)
    down = look_level(9000, 2000, lower_is_better=False)
    assert down.tails == Tails(SINGLE.low, epoch_tail(2))


def _spread(mean: float, sd: float, k: int) -> DeviceSpread:
    """k device values with exactly this mean and (sample) sd."""
    z = np.linspace(-1.0, 1.0, k)
    z = (z - z.mean()) / z.std(ddof=1)
    return DeviceSpread.of((mean + sd * z).tolist())


def test_a_reading_the_single_level_would_fail_is_inconclusive_at_its_epoch() -> None:
    """Devices' log p95 +0.04 apart with sd 0.05 (20 vs 60 devices): a t of 3.1, beyond the
    99.5 % bound one reading used (2.64) but not beyond the sequential one of its epoch;
    the verdict states both levels, and its pass-side bound is the single-reading one."""
    cand, base = _spread(0.04, 0.05, 20), _spread(0.0, 0.05, 60)
    fixed = difference_interval(cand, base)
    assert fixed is not None and fixed.low > 0  # what every reading did before
    spec = GateSpec(max_latency_increase=0.0)
    v = by_gate(
        spec,
        CohortStats(20, 2000, device_p95=cand),
        CohortStats(60, 6000, device_p95=base),
    )["max_latency_increase"]
    assert v.verdict == "inconclusive" and v.low is not None and v.low < 0
    assert (v.level, v.fail_level) == (LEVEL, pytest.approx(1 - epoch_tail(0)))
    assert v.high == pytest.approx(math.exp(fixed.high) - 1)
    # Twice the evidence is the next epoch: a stricter fail bound still.
    w = by_gate(
        spec,
        CohortStats(20, 4000, device_p95=cand),
        CohortStats(60, 12000, device_p95=base),
    )["max_latency_increase"]
    assert w.fail_level == pytest.approx(1 - epoch_tail(1)) and w.low is not None
    assert w.low < v.low


def test_a_clear_regression_still_fails_at_the_first_reading() -> None:
    """+30 % on 20 devices against 30, read once the cohort reaches min_samples: fail."""
    spec = GateSpec(max_latency_increase=0.1, min_samples=8000)
    v = by_gate(spec, fleet(20, 1.3, seed=21), FLEET)["max_latency_increase"]
    assert v.verdict == "fail" and v.fail_level == pytest.approx(1 - epoch_tail(0))


def test_a_healthy_bake_read_many_times_is_not_rolled_back() -> None:
    """Error rate exactly at the tolerance, 200 bakes each read 100 times while the
    inferences grow 32-fold: every reading at LEVEL rolls back many bakes, the sequential
    readings at most 1 % of them (seeded: the same bakes every run)."""
    rng = np.random.default_rng(13)
    ns = np.unique(np.round(2000 * 32.0 ** (np.arange(100) / 99))).astype(np.int64)
    steps = np.diff(np.concatenate([[0], ns]))
    spec = GateSpec(max_error_rate=0.01)
    fixed = sequential = 0
    for _ in range(200):
        errors = np.cumsum(rng.binomial(steps, 0.01)).tolist()
        readings = [
            (n, e, by_gate(spec, CohortStats(5, n, e), CohortStats())["max_error_rate"])
            for n, e in zip(ns.tolist(), errors, strict=True)
        ]
        fixed += any(
            (i := wilson_interval(e, n)) is not None and i.low > 0.01 for n, e, _ in readings
        )
        sequential += any(v.verdict == "fail" for _, _, v in readings)
    assert fixed >= 8  # what repeated readings at LEVEL did: over 4 % of healthy bakes
    assert sequential <= 2


def test_min_agreement_fails_on_its_high_bound_at_the_sequential_level() -> None:
    """min_agreement fails when the interval's high end is under the threshold: that end
    is the sequential one (wider than a single reading's), the low end stays at LEVEL."""
    spec = GateSpec(min_agreement=0.9, min_samples=1000)
    v = by_gate(spec, shadow(860, NONE, rule="same top class of 'out'"), BASE)["min_agreement"]
    single = wilson_interval(860, 1000)
    assert single is not None and v.low is not None and v.high is not None
    assert v.low == pytest.approx(single.low) and v.high > single.high
    assert v.verdict == "fail" and v.fail_level == pytest.approx(1 - epoch_tail(0))
