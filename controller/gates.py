"""Telemetry gates: candidate cohort vs baseline cohort, over the same window. Pure.

Cohort statistics merge the devices' telemetry windows by adding counts (the
histograms share fixed buckets, the sketches a fixed mapping). A gate's verdict is
`pass`, `fail`, `inconclusive` or `not_applicable`, with the estimate, its
interval, the samples and devices each side counted (`GateVerdict`):

- the latency-increase gate compares each device's own p95 (read from its sketch,
  log scale) across the two cohorts with a pooled two-sample t interval: the devices
  are the unit, so device-to-device spread and per-device sampling noise are both in
  the interval (docs/gates.md says why this and not a rank test or a bootstrap);
- the absolute latency gate reads the candidate cohort's p95 from its merged sketch,
  with the distribution-free order-statistic interval of a quantile;
- the confidence gate does the same with each device's mean confidence;
- error-rate and agreement gates use a Wilson score interval of the proportion;
- a gate **fails** when its whole interval lies beyond the threshold (we are
  confident it is exceeded), **passes** when its whole interval lies within it,
  and is **inconclusive** otherwise, or with fewer than `min_samples` inferences,
  or too few devices for a spread: too little evidence never passes.

The controller reads the gates on every tick of a bake and rolls back on the first
`fail`, so the bound a `fail` is decided on is **sequential** (`look_level`): a
reading's information epoch is how many times its samples doubled past
`min_samples`; epoch k spends BAKE_ALPHA / 2**(k + 1) of the bake's false-rollback
budget (the sum over all epochs is BAKE_ALPHA), and any number of readings within
an epoch share it (`epoch_tail`: the continuous-monitoring crossing rate of a score
statistic over one doubling of its information). It needs nothing but the reading's
own counts: no state across ticks. The other bound, the one a `pass` is decided on,
stays at the single-reading LEVEL: the planner takes a `pass` once, at the bake's
end (docs/gates.md, "Repeated looks").

Cohorts from agents without sketches (any inference counted without one) fall back
to the fixed histograms and a point comparison, and the verdict says so. Input
drift (PSI) stays a point reading. `not_applicable`: the gate reads something the
model does not have, e.g. the confidence of a model whose task is `none` (see
`shared.tasks`). `overall` treats `not_applicable` as absent: it never fails a
rollout and never counts as evidence for it.

Which confidence, input layout and agreement rule a cohort's numbers mean
comes with them (`CohortStats.tasks`, `input_tensors`, `agreement_rules`), so
the gates can tell comparable numbers from numbers that only look alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

from scipy import optimize as scipy_optimize
from scipy import stats as scipy_stats

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
from shared.sketch import QuantileSketch
from shared.tasks import LEGACY_AGREEMENT_RULE, describe, has_confidence

Verdict = Literal["pass", "fail", "inconclusive"]

# Two-sided level of a single reading's interval: each bound is a one-sided 99.5 % bound.
# The bound a `pass` is decided on stays there (a pass is taken once, at a bake's end).
LEVEL = 0.99
# One gate's false-rollback budget over a whole bake (one stage, any number of readings):
# what one reading at LEVEL spent before. Epochs of evidence share it (`look_level`), so
# a gate with a zero tolerance fails a candidate identical to its baseline at most this
# often over the bake (bench/gates.py measures it; the target is at most 1 %).
BAKE_ALPHA = (1 - LEVEL) / 2
# A device's own p95 (or mean confidence) counts once it has this many samples in the
# window: fewer make its p95 little more than its maximum.
DEVICE_MIN_SAMPLES = 50
GATE_QUANTILE = 0.95


@dataclass(frozen=True, slots=True)
class DeviceSpread:
    """One statistic of each device of a cohort, as sums: devices, sum, sum of squares.

    Sums add and subtract as devices join and leave a cohort, so the cohort's mean and
    spread cost the same at any fleet size. Latency: the log of each device's p95 (ms);
    confidence: each device's mean confidence.
    """

    devices: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> DeviceSpread:
        out = cls()
        for v in values:
            out = out.plus(v)
        return out

    def plus(self, value: float, sign: int = 1) -> DeviceSpread:
        n = self.devices + sign
        if n <= 0:
            return DeviceSpread()
        return DeviceSpread(n, self.total + sign * value, self.total_sq + sign * value * value)

    def merged(self, other: DeviceSpread) -> DeviceSpread:
        return DeviceSpread(
            self.devices + other.devices,
            self.total + other.total,
            self.total_sq + other.total_sq,
        )

    @property
    def mean(self) -> float | None:
        return self.total / self.devices if self.devices else None

    @property
    def squares(self) -> float:
        """Sum of squared deviations from the mean (never negative)."""
        if not self.devices:
            return 0.0
        return max(0.0, self.total_sq - self.total * self.total / self.devices)


def device_p95(sketch: QuantileSketch | None) -> float | None:
    """The log of a device's p95 (ms), once its sketch holds DEVICE_MIN_SAMPLES."""
    if sketch is None or sketch.count < DEVICE_MIN_SAMPLES:
        return None
    p95 = sketch.quantile(GATE_QUANTILE)
    return math.log(max(p95, 1e-6)) if p95 is not None else None


def device_confidence(n: int, total: float) -> float | None:
    """A device's mean confidence, once it has DEVICE_MIN_SAMPLES confidence values."""
    return total / n if n >= DEVICE_MIN_SAMPLES else None


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
    # The same latencies and confidences at high resolution (`shared.sketch`); None when
    # nothing was sketched. `unsketched`: inferences of windows that came without a
    # sketch (older agents): any makes the latency gates fall back to the histograms.
    latency_sketch: QuantileSketch | None = None
    confidence_sketch: QuantileSketch | None = None
    unsketched: int = 0
    # Per device of the cohort: the log of its p95 and its mean confidence (`DeviceSpread`).
    device_p95: DeviceSpread = DeviceSpread()
    device_confidence: DeviceSpread = DeviceSpread()
    # The comparison window the cohort covers (epoch seconds, devices' clocks) and the
    # settle rule that shaped it (`controller.live`); None when not known.
    window_start: float | None = None
    settle: str | None = None

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
            _merged_sketch(self.latency_sketch, other.latency_sketch),
            _merged_sketch(self.confidence_sketch, other.confidence_sketch),
            self.unsketched + other.unsketched,
            self.device_p95.merged(other.device_p95),
            self.device_confidence.merged(other.device_confidence),
            _earliest(self.window_start, other.window_start),
            self.settle or other.settle,
        )

    @property
    def sketched(self) -> bool:
        """Every inference's latency is in the sketch (no window came without one; a
        cohort with histogram latencies and no sketch at all is not sketched either)."""
        return self.unsketched == 0 and (self.latency_sketch is not None or not self.latency.n)

    @property
    def quantiles(self) -> str:
        return "sketch" if self.sketched else "histograms"

    @property
    def agreement(self) -> float | None:
        ok = self.count - self.errors
        return self.agreements / ok if ok > 0 else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.count if self.count else None

    def p(self, q: float) -> float | None:
        """The cohort's q-quantile of latency (ms): from the sketch, interpolated, when
        every inference was sketched; else the histogram's bucket upper bound."""
        if self.sketched:
            return self.latency_sketch.quantile(q) if self.latency_sketch is not None else None
        return self.latency.quantile(q, LATENCY_BUCKETS_MS)

    def mean_confidence(self) -> float | None:
        return self.confidence.mean()

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
            quantiles=self.quantiles if self.count else None,
            window_start=datetime.fromtimestamp(self.window_start, UTC)
            if self.window_start is not None
            else None,
            settle=self.settle,
        )


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _merged_sketch(a: QuantileSketch | None, b: QuantileSketch | None) -> QuantileSketch | None:
    if a is None:
        return b.copy() if b is not None else None
    return a.merged(b) if b is not None else a.copy()


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


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate and its interval (each bound at its own one-sided level: `Tails`)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Tails:
    """The one-sided error probability of each bound of an interval."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (0 < self.low < 0.5 and 0 < self.high < 0.5):
            raise ValueError(f"tails must lie in (0, 0.5): {self.low}, {self.high}")


SINGLE = Tails((1 - LEVEL) / 2, (1 - LEVEL) / 2)  # one reading: both bounds at LEVEL


def look_epoch(samples: int, min_samples: int) -> int:
    """How many times a reading's samples doubled past `min_samples` (0 below 2x)."""
    return max(0, (samples // max(min_samples, 1)).bit_length() - 1)


def epoch_alpha(epoch: int) -> float:
    """What epoch k may spend of a bake's false-rollback budget: BAKE_ALPHA / 2**(k+1)."""
    return float(BAKE_ALPHA / 2 ** (epoch + 1))


def _crossing(z: float) -> float:
    """P(a score statistic crosses z at some reading while its information doubles),
    continuous monitoring: P(Z > z) at the epoch's first reading plus the expected
    upcrossings after it, (ln 2 / 2) z phi(z) (the statistic over log-information is an
    Ornstein-Uhlenbeck process with correlation exp(-|s|/2); Siegmund's approximation)."""
    normal = NormalDist()
    return (1 - normal.cdf(z)) + math.log(2) / 2 * z * normal.pdf(z)


@lru_cache(maxsize=64)
def epoch_tail(epoch: int) -> float:
    """The one-sided tail of each reading's fail bound in `epoch`: any number of readings
    of the epoch together cross it with probability `epoch_alpha(epoch)` at most
    (bench/gates.py measures 20 readings of a bake, and ticks as dense as you like)."""
    alpha = epoch_alpha(epoch)
    z = float(scipy_optimize.brentq(lambda z: _crossing(z) - alpha, 1.0, 40.0, xtol=1e-10))
    return 1 - NormalDist().cdf(z)


@dataclass(frozen=True, slots=True)
class Look:
    """The level a reading of a gate uses: its epoch and the tails of its two bounds."""

    epoch: int
    tails: Tails
    fail_tail: float  # the tail of the bound a `fail` is decided on

    @property
    def fail_level(self) -> float:
        """The one-sided level of the fail bound."""
        return 1 - self.fail_tail


def look_level(samples: int, min_samples: int, *, lower_is_better: bool) -> Look:
    """The sequential level of one reading (pure: nothing remembered between readings).

    The bound a `fail` is decided on (`low` for a `max_` gate, `high` for a `min_` one)
    takes `epoch_tail` of the reading's epoch; the other, read for a `pass` once at a
    bake's end, stays at the single-reading LEVEL.
    """
    epoch = look_epoch(samples, min_samples)
    fail = epoch_tail(epoch)
    single = SINGLE.low
    tails = Tails(fail, single) if lower_is_better else Tails(single, fail)
    return Look(epoch, tails, fail)


def t_quantile(df: int, tail: float = SINGLE.high) -> float:
    """The one-sided (1 - tail) quantile of Student's t with `df` degrees of freedom (by
    default the two-sided LEVEL one)."""
    return float(scipy_stats.t.ppf(1 - tail, df))


def difference_interval(
    candidate: DeviceSpread, baseline: DeviceSpread, tails: Tails = SINGLE
) -> Interval | None:
    """mean(candidate) - mean(baseline) of per-device values: pooled two-sample t interval.

    One variance for both sides (the devices of a fleet, a random share of which run the
    candidate) estimated from both, so a canary of one device still has an interval
    when the baseline has two or more. None with fewer than three devices in all.
    """
    k1, k2 = candidate.devices, baseline.devices
    df = k1 + k2 - 2
    if k1 < 1 or k2 < 1 or df < 1:
        return None
    mean1, mean2 = candidate.mean, baseline.mean
    assert mean1 is not None and mean2 is not None
    s2 = (candidate.squares + baseline.squares) / df
    se = math.sqrt(s2 * (1 / k1 + 1 / k2))
    d = mean1 - mean2
    return Interval(d, d - t_quantile(df, tails.low) * se, d + t_quantile(df, tails.high) * se)


def quantile_interval(
    sketch: QuantileSketch | None, q: float, tails: Tails = SINGLE
) -> Interval | None:
    """The q-quantile of a sketch's values and its distribution-free interval: the
    values at the order-statistic ranks the binomial distribution gives (ranks are exact
    in a sketch, values within its 2 %). Treats the values as independent draws."""
    if sketch is None or not sketch.count:
        return None
    n = sketch.count
    estimate = sketch.quantile(q)
    lo_rank = int(scipy_stats.binom.ppf(tails.low, n, q)) - 1
    hi_rank = int(scipy_stats.binom.ppf(1 - tails.high, n, q))
    low, high = sketch.at_rank(lo_rank), sketch.at_rank(hi_rank)
    if estimate is None or low is None or high is None:
        return None
    if lo_rank < 0:
        low = 0.0  # too few values below the quantile to bound it
    if hi_rank > n - 1:
        high = math.inf  # too few values above the quantile to bound it
    return Interval(estimate, min(low, estimate), max(high, estimate))


def _wilson_bound(p: float, n: int, z: float, sign: int) -> float:
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre + sign * half


def wilson_interval(successes: int, n: int, tails: Tails = SINGLE) -> Interval | None:
    """A proportion and its Wilson score interval (sound at 0 and near 0)."""
    if n <= 0:
        return None
    normal = NormalDist()
    p = successes / n
    low = _wilson_bound(p, n, normal.inv_cdf(1 - tails.low), -1)
    high = _wilson_bound(p, n, normal.inv_cdf(1 - tails.high), 1)
    low = 0.0 if successes == 0 else max(0.0, low)
    high = 1.0 if successes == n else min(1.0, high)
    return Interval(p, low, high)


def decide(interval: Interval, threshold: float, *, lower_is_better: bool) -> GateOutcome:
    """fail: the whole interval is beyond the threshold; pass: the whole of it within;
    else inconclusive (the evidence does not settle it)."""
    if lower_is_better:
        if interval.low > threshold:
            return "fail"
        return "pass" if interval.high <= threshold else "inconclusive"
    if interval.high < threshold:
        return "fail"
    return "pass" if interval.low >= threshold else "inconclusive"


@dataclass(frozen=True, slots=True)
class _Counted:
    """What a verdict counted on each side."""

    samples: int
    baseline_samples: int | None = None
    devices: int | None = None
    baseline_devices: int | None = None


def _reading(
    gate: str,
    threshold: float,
    interval: Interval | None,
    counted: _Counted,
    *,
    look: Look,
    lower_is_better: bool,
    method: str,
    short: str | None,
    why_no_interval: str = "",
) -> GateVerdict:
    """A statistical verdict: inconclusive while `short` (too few samples) or without an
    interval; else `decide`. `look`: the levels `interval` was computed at."""
    outcome: GateOutcome = "inconclusive"
    if short is None and interval is not None:
        outcome = decide(interval, threshold, lower_is_better=lower_is_better)
    if short is not None:
        detail = short
    elif interval is None:
        detail = why_no_interval
    else:
        detail = method
    return GateVerdict(
        gate=gate, verdict=outcome, threshold=threshold, detail=detail,
        observed=interval.estimate if interval is not None else None,
        low=interval.low if interval is not None else None,
        high=interval.high if interval is not None else None,
        level=LEVEL if interval is not None else None,
        fail_level=look.fail_level if interval is not None else None,
        samples=counted.samples, baseline_samples=counted.baseline_samples,
        devices=counted.devices, baseline_devices=counted.baseline_devices, method=method,
    )  # fmt: skip


def _point(
    gate: str,
    threshold: float,
    observed: float | None,
    counted: _Counted,
    *,
    lower_is_better: bool,
    method: str,
    short: str | None,
) -> GateVerdict:
    """A point comparison (no interval): input PSI, and cohorts without sketches."""
    outcome: GateOutcome = "inconclusive"
    if short is None and observed is not None:
        ok = observed <= threshold if lower_is_better else observed >= threshold
        outcome = "pass" if ok else "fail"
    return GateVerdict(
        gate=gate, verdict=outcome, observed=observed, threshold=threshold,
        detail=short if short is not None else method,
        samples=counted.samples, baseline_samples=counted.baseline_samples,
        devices=counted.devices, baseline_devices=counted.baseline_devices, method=method,
    )  # fmt: skip


HISTOGRAM_FALLBACK = "agents without sketches: fixed histogram buckets, point comparison"


def _exp_interval(i: Interval | None, minus_one: bool = False) -> Interval | None:
    """A log-scale interval back on the ratio scale (minus 1: an increase)."""
    if i is None:
        return None
    k = 1.0 if minus_one else 0.0
    return Interval(math.exp(i.estimate) - k, math.exp(i.low) - k, math.exp(i.high) - k)


def evaluate_gates(
    spec: GateSpec, candidate: CohortStats, baseline: CohortStats
) -> tuple[GateVerdict, ...]:
    """One verdict per configured gate (see the module docstring for the rules)."""
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

    def look(samples: int, *, lower_is_better: bool = True) -> Look:
        return look_level(samples, n, lower_is_better=lower_is_better)

    def devices_short(needs_base: bool, what: str) -> str:
        k1, k2 = candidate.device_p95.devices, baseline.device_p95.devices
        if what == "confidence":
            k1, k2 = candidate.device_confidence.devices, baseline.device_confidence.devices
        side = f"{k1} candidate" + (f" and {k2} baseline" if needs_base else "")
        return (
            f"too few devices with {DEVICE_MIN_SAMPLES}+ {what} samples for a spread "
            f"({side}; 3 in all needed)"
        )

    sketched = candidate.sketched and baseline.sketched
    latency_counted = _Counted(
        candidate.count, baseline.count, candidate.device_p95.devices, baseline.device_p95.devices
    )
    out: list[GateVerdict] = []
    # The fallback compares like with like: both sides' histograms, even if one has sketches.
    p95 = candidate.latency.quantile(0.95, LATENCY_BUCKETS_MS)
    base95 = baseline.latency.quantile(0.95, LATENCY_BUCKETS_MS)
    if spec.max_latency_ms is not None:
        if sketched:
            at = look(candidate.count)
            i = quantile_interval(candidate.latency_sketch, GATE_QUANTILE, at.tails)
            out.append(
                _reading(
                    "max_latency_ms", spec.max_latency_ms, i, latency_counted,
                    look=at, lower_is_better=True,
                    method="candidate p95, order-statistic interval",
                    short=short(False), why_no_interval="no latencies",
                )
            )  # fmt: skip
        else:
            out.append(
                _point(
                    "max_latency_ms", spec.max_latency_ms, p95, latency_counted,
                    lower_is_better=True, method=f"candidate p95; {HISTOGRAM_FALLBACK}",
                    short=short(False),
                )
            )  # fmt: skip
    if spec.max_error_rate is not None:
        at = look(candidate.count)
        i = wilson_interval(candidate.errors, candidate.count, at.tails)
        verdict = _reading(
            "max_error_rate", spec.max_error_rate, i,
            _Counted(candidate.count, None, candidate.devices, None),
            look=at, lower_is_better=True, method="candidate errors/inferences, Wilson interval",
            short=short(False), why_no_interval="no inferences",
        )  # fmt: skip
        if (
            spec.max_error_rate == 0
            and verdict.verdict == "inconclusive"
            and short(False) is None
            and candidate.errors == 0
        ):
            # No interval can show a rate of exactly 0: a zero tolerance means "no error".
            verdict = verdict.model_copy(
                update={"verdict": "pass", "detail": "no error (zero tolerance)"}
            )
        out.append(verdict)
    if spec.max_latency_increase is not None:
        if sketched:
            at = look(min(candidate.count, baseline.count))
            i = _exp_interval(
                difference_interval(candidate.device_p95, baseline.device_p95, at.tails),
                minus_one=True,
            )
            out.append(
                _reading(
                    "max_latency_increase", spec.max_latency_increase, i, latency_counted,
                    look=at, lower_is_better=True,
                    method="devices' p95, candidate / baseline - 1 (geometric means), t interval",
                    short=short(True), why_no_interval=devices_short(True, "latency"),
                )
            )  # fmt: skip
        else:
            out.append(
                _point(
                    "max_latency_increase", spec.max_latency_increase,
                    p95 / base95 - 1 if p95 is not None and base95 else None, latency_counted,
                    lower_is_better=True,
                    method=f"candidate p95 / baseline p95 - 1; {HISTOGRAM_FALLBACK}",
                    short=short(True),
                )
            )  # fmt: skip
    if spec.max_confidence_drop is not None:
        problem = confidence_problem(candidate, baseline, ("candidate", "baseline"))
        if problem is not None:
            out.append(_not_applicable("max_confidence_drop", spec.max_confidence_drop, problem))
        else:
            at = look(min(candidate.confidence.n, baseline.confidence.n))
            diff = difference_interval(
                baseline.device_confidence, candidate.device_confidence, at.tails
            )
            out.append(
                _reading(
                    "max_confidence_drop", spec.max_confidence_drop, diff,
                    _Counted(
                        candidate.confidence.n, baseline.confidence.n,
                        candidate.device_confidence.devices, baseline.device_confidence.devices,
                    ),
                    look=at, lower_is_better=True,
                    method="devices' mean confidence, baseline - candidate, t interval",
                    # A detector's inferences with nothing above its threshold have no
                    # confidence: the samples that count are those with one.
                    short=short(True, candidate.confidence.n, baseline.confidence.n),
                    why_no_interval=devices_short(True, "confidence"),
                )
            )  # fmt: skip
    if spec.min_agreement is not None:
        problem = agreement_problem(candidate)
        rules = "; ".join(sorted(candidate.agreement_rules))
        if problem is not None:
            out.append(_not_applicable("min_agreement", spec.min_agreement, problem))
        else:
            ok = candidate.count - candidate.errors
            at = look(ok, lower_is_better=False)
            i = wilson_interval(candidate.agreements, ok, at.tails)
            what = f"shadow agreement: {rules}" if rules else "shadow agreement"
            out.append(
                _reading(
                    "min_agreement", spec.min_agreement, i,
                    _Counted(ok, None, candidate.devices, None),
                    look=at, lower_is_better=False, method=f"{what}, Wilson interval",
                    short=short(False), why_no_interval="no successful inferences",
                )
            )  # fmt: skip
    if spec.max_input_psi is not None:
        drift = input_drift(candidate, baseline)
        out.append(
            _point(
                "max_input_psi", spec.max_input_psi, drift.worst,
                _Counted(candidate.count, baseline.count, candidate.devices, baseline.devices),
                lower_is_better=True,
                method=f"{drift.measure}, candidate vs baseline",
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


def format_reading(v: GateVerdict) -> str:
    """`0.312 [0.24, 0.389]` (estimate and interval), or the estimate alone, or `-`."""
    if v.observed is None:
        return "-"
    if v.low is None or v.high is None:
        return f"{v.observed:.4g}"
    return f"{v.observed:.4g} [{v.low:.4g}, {v.high:.4g}]"


def describe_failures(verdicts: Sequence[GateVerdict]) -> str:
    parts = []
    for v in verdicts:
        if v.verdict == "fail":
            relation = "<" if v.gate.startswith("min_") else ">"
            parts.append(f"{v.gate}: {format_reading(v)} {relation} {v.threshold:g} ({v.detail})")
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
