"""Telemetry gates: candidate cohort vs baseline cohort, over the same window. Pure.

Cohort statistics merge the devices' telemetry windows by adding counts (the
histograms share fixed buckets). A gate's verdict is `pass`, `fail` or
`inconclusive` (fewer than `min_samples` inferences in a cohort it needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    CohortSummary,
    GateSpec,
    GateVerdict,
    Histogram,
)

Verdict = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True, slots=True)
class CohortStats:
    devices: int = 0
    count: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS_MS))
    confidence: Histogram = field(default_factory=lambda: Histogram.empty(CONFIDENCE_BUCKETS))
    inputs: Histogram = field(default_factory=lambda: Histogram.empty(INPUT_BUCKETS))
    agreements: int = 0  # shadow cohorts: inferences with the served model's top class

    def merged(self, other: CohortStats) -> CohortStats:
        return CohortStats(
            self.devices + other.devices,
            self.count + other.count,
            self.errors + other.errors,
            self.latency.merged(other.latency),
            self.confidence.merged(other.confidence),
            self.inputs.merged(other.inputs),
            self.agreements + other.agreements,
        )

    @property
    def agreement(self) -> float | None:
        ok = self.count - self.errors
        return self.agreements / ok if ok > 0 else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.count if self.count else None

    def p(self, q: float) -> float | None:
        return self.latency.quantile(q, LATENCY_BUCKETS_MS)

    def summary(self, baseline: CohortStats | None = None) -> CohortSummary:
        return CohortSummary(
            input_psi=psi(self.inputs, baseline.inputs) if baseline is not None else None,
            devices=self.devices,
            inferences=self.count,
            error_rate=self.error_rate,
            latency_p50_ms=self.p(0.5),
            latency_p95_ms=self.p(0.95),
            latency_p99_ms=self.p(0.99),
            mean_confidence=self.confidence.mean(),
            agreement=self.agreement if self.agreements else None,
        )


PSI_FLOOR = 1e-4  # empty buckets count as this share, so the index stays finite


def psi(actual: Histogram, expected: Histogram) -> float | None:
    """Population stability index of `actual` against `expected` (same buckets).

    sum((a - e) * ln(a / e)) over bucket shares; about 0.1 is a moderate shift,
    over 0.25 a large one. None when either side has no samples.
    """
    na, ne = actual.n, expected.n
    if not na or not ne:
        return None
    total = 0.0
    for ca, ce in zip(actual.counts, expected.counts, strict=True):
        a, e = max(ca / na, PSI_FLOOR), max(ce / ne, PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def evaluate_gates(
    spec: GateSpec, candidate: CohortStats, baseline: CohortStats
) -> tuple[GateVerdict, ...]:
    """One verdict per configured gate."""
    p95 = candidate.p(0.95)
    base95 = baseline.p(0.95)
    cand_conf, base_conf = candidate.confidence.mean(), baseline.confidence.mean()
    # gate: (threshold, observed, lower is better, needs the baseline too, what it measures)
    table: dict[str, tuple[float | None, float | None, bool, bool, str]] = {
        "max_latency_ms": (spec.max_latency_ms, p95, True, False, "candidate p95"),
        "max_error_rate": (
            spec.max_error_rate, candidate.error_rate, True, False, "candidate errors/inferences"
        ),
        "max_latency_increase": (
            spec.max_latency_increase,
            p95 / base95 - 1 if p95 is not None and base95 else None,
            True, True, "candidate p95 / baseline p95 - 1",
        ),
        "max_confidence_drop": (
            spec.max_confidence_drop,
            base_conf - cand_conf if cand_conf is not None and base_conf is not None else None,
            True, True, "baseline mean confidence - candidate's",
        ),
        "min_agreement": (
            spec.min_agreement, candidate.agreement, False, False, "shadow top class = served"
        ),
        "max_input_psi": (
            spec.max_input_psi, psi(candidate.inputs, baseline.inputs),
            True, True, "input PSI, candidate vs baseline",
        ),
    }  # fmt: skip
    out: list[GateVerdict] = []
    for gate, (threshold, observed, lower_is_better, needs_base, measure) in table.items():
        if threshold is None:
            continue
        if candidate.count < spec.min_samples:
            detail = f"{candidate.count} of {spec.min_samples} samples"
        elif needs_base and baseline.count < spec.min_samples:
            detail = f"baseline {baseline.count} of {spec.min_samples} samples"
        else:
            detail = measure
        verdict: Verdict = "inconclusive"
        if detail == measure and observed is not None:
            ok = observed <= threshold if lower_is_better else observed >= threshold
            verdict = "pass" if ok else "fail"
        out.append(
            GateVerdict(
                gate=gate, verdict=verdict, observed=observed, threshold=threshold, detail=detail
            )
        )
    return tuple(out)


def overall(verdicts: Sequence[GateVerdict]) -> Verdict:
    if any(v.verdict == "fail" for v in verdicts):
        return "fail"
    if any(v.verdict == "inconclusive" for v in verdicts):
        return "inconclusive"
    return "pass"


def describe_failures(verdicts: Sequence[GateVerdict]) -> str:
    parts = []
    for v in verdicts:
        if v.verdict == "fail":
            observed = "-" if v.observed is None else f"{v.observed:.4g}"
            relation = "<" if v.gate.startswith("min_") else ">"
            parts.append(f"{v.gate}: {observed} {relation} {v.threshold:g} ({v.detail})")
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class ABReading:
    """Which side of an A/B test wins on its metric, or None while inconclusive."""

    winner: Literal["a", "b"] | None
    value_a: float | None
    value_b: float | None
    improvement: float | None
    detail: str


def compare_ab(
    metric: str, min_improvement: float, a: CohortStats, b: CohortStats, min_samples: int
) -> ABReading:
    """B wins when it beats A by at least `min_improvement` (a share); otherwise A stays.

    latency: p95, lower is better; errors: error rate, lower is better;
    confidence: mean top-class probability, higher is better.
    """
    if metric == "latency":
        va, vb = a.p(0.95), b.p(0.95)
        better = (va - vb) / va if va and vb is not None else None
    elif metric == "errors":
        va, vb = a.error_rate, b.error_rate
        better = va - vb if va is not None and vb is not None else None
    else:
        va, vb = a.confidence.mean(), b.confidence.mean()
        better = (vb - va) / va if va and vb is not None else None
    if a.count < min_samples or b.count < min_samples or better is None:
        return ABReading(
            None, va, vb, better,
            f"A {a.count}, B {b.count} of {min_samples} samples",
        )  # fmt: skip
    winner: Literal["a", "b"] = "b" if better >= min_improvement else "a"
    return ABReading(
        winner, va, vb, better,
        f"{metric}: B is {better:+.1%} vs A (needs {min_improvement:+.1%})",
    )  # fmt: skip
