"""Telemetry gates: candidate cohort vs baseline cohort, over the same window. Pure.

Cohort statistics merge the devices' telemetry windows by adding counts (the
histograms share fixed buckets). A gate's verdict is `pass`, `fail`,
`inconclusive` (fewer than `min_samples` inferences in a cohort it needs) or
`not_applicable`: the gate reads something the model does not have, e.g. the
confidence of a model whose task is `none` (see `shared.tasks`). `overall`
treats `not_applicable` as absent: it never fails a rollout and never counts as
evidence for it.

Which confidence, input layout and agreement rule a cohort's numbers mean
comes with them (`CohortStats.tasks`, `input_tensors`, `agreement_rules`), so
the gates can tell comparable numbers from numbers that only look alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.manifest import ModelTask
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    CohortSummary,
    GateOutcome,
    GateSpec,
    GateVerdict,
    Histogram,
)
from shared.tasks import LEGACY_AGREEMENT_RULE, describe, has_confidence

Verdict = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True, slots=True)
class TensorInputs:
    """The merged value histogram of one input tensor (`shared.tasks.input_bounds`).

    `layout` (dtype and quantization, `shared.tasks.input_layout`) says what the
    buckets count: histograms of a tensor compare only within one layout.
    """

    name: str
    layout: str
    histogram: Histogram

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.layout)


def merge_tensor_inputs(
    a: Iterable[TensorInputs], b: Iterable[TensorInputs]
) -> tuple[TensorInputs, ...]:
    """Per (name, layout), the histograms of both added; first-seen order."""
    merged: dict[tuple[str, str], TensorInputs] = {}
    for t in (*a, *b):
        seen = merged.get(t.key)
        if seen is None:
            merged[t.key] = t
        elif len(seen.histogram.counts) == len(t.histogram.counts):
            merged[t.key] = TensorInputs(t.name, t.layout, seen.histogram.merged(t.histogram))
    return tuple(merged.values())


@dataclass(frozen=True, slots=True)
class CohortStats:
    devices: int = 0
    count: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS_MS))
    confidence: Histogram = field(default_factory=lambda: Histogram.empty(CONFIDENCE_BUCKETS))
    # The first input's values on INPUT_BUCKETS (agents before per-input histograms).
    inputs: Histogram = field(default_factory=lambda: Histogram.empty(INPUT_BUCKETS))
    agreements: int = 0  # shadow cohorts: inferences agreeing with the served model
    input_tensors: tuple[TensorInputs, ...] = ()  # per input tensor, on its dtype's buckets
    # The tasks (by the registered manifests) of the versions merged in: what the
    # confidence means. Empty: unknown, the confidence is taken as comparable.
    tasks: frozenset[ModelTask] = frozenset()
    agreement_rules: frozenset[str] = frozenset()  # shadow: how `agreements` were counted

    def merged(self, other: CohortStats) -> CohortStats:
        return CohortStats(
            self.devices + other.devices,
            self.count + other.count,
            self.errors + other.errors,
            self.latency.merged(other.latency),
            self.confidence.merged(other.confidence),
            self.inputs.merged(other.inputs),
            self.agreements + other.agreements,
            merge_tensor_inputs(self.input_tensors, other.input_tensors),
            self.tasks | other.tasks,
            self.agreement_rules | other.agreement_rules,
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

    def task_text(self) -> str | None:
        return "; ".join(sorted(describe(t) for t in self.tasks)) or None

    def summary(self, baseline: CohortStats | None = None) -> CohortSummary:
        drift = input_drift(self, baseline) if baseline is not None else None
        return CohortSummary(
            input_psi=drift.worst if drift is not None else None,
            input_psi_by_tensor=dict(drift.by_tensor) if drift and drift.by_tensor else None,
            devices=self.devices,
            inferences=self.count,
            error_rate=self.error_rate,
            latency_p50_ms=self.p(0.5),
            latency_p95_ms=self.p(0.95),
            latency_p99_ms=self.p(0.99),
            mean_confidence=self.confidence.mean(),
            agreement=self.agreement if self.agreements else None,
            task=self.task_text(),
            agreement_rule="; ".join(sorted(self.agreement_rules)) or None,
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


@dataclass(frozen=True, slots=True)
class InputDrift:
    """Input PSI of a candidate cohort against a baseline: per tensor, the worst, how."""

    worst: float | None
    by_tensor: tuple[tuple[str, float], ...]  # input order; tensors both cohorts measured
    measure: str


def input_drift(candidate: CohortStats, baseline: CohortStats) -> InputDrift:
    """PSI per input tensor present in both cohorts with the same layout; the worst counts.

    Cohorts with no such tensor (agents without per-input histograms) fall back to
    the first input's INPUT_BUCKETS histogram.
    """
    theirs = {t.key: t.histogram for t in baseline.input_tensors}
    by_tensor: list[tuple[str, float]] = []
    for t in candidate.input_tensors:
        base = theirs.get(t.key)
        if base is not None and len(base.counts) == len(t.histogram.counts):
            value = psi(t.histogram, base)
            if value is not None:
                by_tensor.append((t.name, value))
    if not by_tensor:
        return InputDrift(
            psi(candidate.inputs, baseline.inputs), (), "input PSI of the first input"
        )
    name, worst = max(by_tensor, key=lambda item: item[1])
    if len(by_tensor) == 1:
        return InputDrift(worst, tuple(by_tensor), f"input PSI of {name!r}")
    others = ", ".join(f"{n!r} {v:.3g}" for n, v in by_tensor if n != name)
    return InputDrift(
        worst, tuple(by_tensor), f"input PSI of {name!r}, the worst of {len(by_tensor)} ({others})"
    )


def confidence_problem(a: CohortStats, b: CohortStats, names: tuple[str, str]) -> str | None:
    """Why the mean confidences of two cohorts do not compare, or None if they do.

    A side whose model has no confidence (task `none`), or sides whose confidence
    means different things (classifier vs detector, another score threshold).
    """
    for name, stats in zip(names, (a, b), strict=True):
        for task in sorted(stats.tasks, key=describe):
            if not has_confidence(task):
                return f"the {name} model has no confidence (task {describe(task)})"
    kinds_a = {(t.kind, t.score_threshold) for t in a.tasks}
    kinds_b = {(t.kind, t.score_threshold) for t in b.tasks}
    if kinds_a and kinds_b and kinds_a != kinds_b:
        return (
            f"{names[0]} ({a.task_text()}) and {names[1]} ({b.task_text()}) "
            "confidence mean different things"
        )
    return None


def agreement_problem(candidate: CohortStats) -> str | None:
    """Why a shadow cohort's agreements say nothing, or None.

    Agents before per-task telemetry counted the first output's top class: for a
    model that is no classifier that is noise.
    """
    if (
        candidate.tasks
        and LEGACY_AGREEMENT_RULE in candidate.agreement_rules
        and all(t.kind != "classifier" for t in candidate.tasks)
    ):
        return (
            f"agents compared the {LEGACY_AGREEMENT_RULE.removeprefix('same ')}, "
            f"but the model is no classifier (task {candidate.task_text()})"
        )
    return None


def _verdict(
    gate: str,
    threshold: float,
    observed: float | None,
    *,
    lower_is_better: bool,
    measure: str,
    short: str | None,
) -> GateVerdict:
    """`short`: why there are too few samples for a verdict (None: enough)."""
    outcome: GateOutcome = "inconclusive"
    if short is None and observed is not None:
        ok = observed <= threshold if lower_is_better else observed >= threshold
        outcome = "pass" if ok else "fail"
    return GateVerdict(
        gate=gate, verdict=outcome, observed=observed, threshold=threshold,
        detail=short if short is not None else measure,
    )  # fmt: skip


def evaluate_gates(
    spec: GateSpec, candidate: CohortStats, baseline: CohortStats
) -> tuple[GateVerdict, ...]:
    """One verdict per configured gate."""
    n = spec.min_samples

    def short(needs_base: bool, cand_n: int | None = None, base_n: int | None = None) -> str | None:
        cn = candidate.count if cand_n is None else cand_n
        bn = baseline.count if base_n is None else base_n
        what = " confidence" if cand_n is not None else ""
        if cn < n:
            return f"{cn} of {n}{what} samples"
        if needs_base and bn < n:
            return f"baseline {bn} of {n}{what} samples"
        return None

    out: list[GateVerdict] = []
    p95, base95 = candidate.p(0.95), baseline.p(0.95)
    if spec.max_latency_ms is not None:
        out.append(
            _verdict(
                "max_latency_ms", spec.max_latency_ms, p95,
                lower_is_better=True, measure="candidate p95", short=short(False),
            )
        )  # fmt: skip
    if spec.max_error_rate is not None:
        out.append(
            _verdict(
                "max_error_rate", spec.max_error_rate, candidate.error_rate,
                lower_is_better=True, measure="candidate errors/inferences", short=short(False),
            )
        )  # fmt: skip
    if spec.max_latency_increase is not None:
        out.append(
            _verdict(
                "max_latency_increase", spec.max_latency_increase,
                p95 / base95 - 1 if p95 is not None and base95 else None,
                lower_is_better=True, measure="candidate p95 / baseline p95 - 1",
                short=short(True),
            )
        )  # fmt: skip
    if spec.max_confidence_drop is not None:
        problem = confidence_problem(candidate, baseline, ("candidate", "baseline"))
        if problem is not None:
            out.append(_not_applicable("max_confidence_drop", spec.max_confidence_drop, problem))
        else:
            cand, base = candidate.confidence.mean(), baseline.confidence.mean()
            out.append(
                _verdict(
                    "max_confidence_drop", spec.max_confidence_drop,
                    base - cand if cand is not None and base is not None else None,
                    lower_is_better=True, measure="baseline mean confidence - candidate's",
                    # A detector's inferences with nothing above its threshold have no
                    # confidence: the samples that count are those with one.
                    short=short(True, candidate.confidence.n, baseline.confidence.n),
                )
            )  # fmt: skip
    if spec.min_agreement is not None:
        problem = agreement_problem(candidate)
        rules = "; ".join(sorted(candidate.agreement_rules))
        if problem is not None:
            out.append(_not_applicable("min_agreement", spec.min_agreement, problem))
        else:
            out.append(
                _verdict(
                    "min_agreement", spec.min_agreement, candidate.agreement,
                    lower_is_better=False,
                    measure=f"shadow agreement: {rules}" if rules else "shadow agreement",
                    short=short(False),
                )
            )  # fmt: skip
    if spec.max_input_psi is not None:
        drift = input_drift(candidate, baseline)
        out.append(
            _verdict(
                "max_input_psi", spec.max_input_psi, drift.worst,
                lower_is_better=True, measure=f"{drift.measure}, candidate vs baseline",
                short=short(True),
            )
        )  # fmt: skip
    return tuple(out)


def _not_applicable(gate: str, threshold: float, why: str) -> GateVerdict:
    return GateVerdict(gate=gate, verdict="not_applicable", threshold=threshold, detail=why)


def overall(verdicts: Sequence[GateVerdict]) -> Verdict:
    """fail if any gate fails, else inconclusive if any is; `not_applicable` ones do not count."""
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
    confidence: mean confidence, higher is better (never decided for models whose
    confidence does not compare: `confidence_problem`).
    """
    if metric == "confidence":
        problem = confidence_problem(a, b, ("A", "B"))
        if problem is not None:
            return ABReading(None, None, None, None, f"confidence is not applicable: {problem}")
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
