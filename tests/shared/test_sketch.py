"""The quantile sketch: within 2 % of numpy's exact quantiles, merges exactly, bounded, on the
wire and back, and inside TelemetryWindow without breaking older windows."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pytest
from pydantic import ValidationError

from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    ModelRef,
    TelemetryWindow,
    WireModel,
)
from shared.sketch import (
    CONFIDENCE_MAPPING,
    LATENCY_GAMMA,
    LATENCY_MAPPING,
    MAX_BUCKETS,
    MIN_INDEXABLE,
    Mapping,
    QuantileSketch,
    SketchData,
    SketchMismatchError,
    decode_counts,
    encode_counts,
)

QS = (0.5, 0.9, 0.95, 0.99)
N = 20_000


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "lognormal": rng.lognormal(0.0, 0.6, N),
        "lognormal-narrow": rng.lognormal(np.log(0.3), 0.05, N),
        "bimodal": np.concatenate([rng.normal(1.0, 0.05, N // 2), rng.normal(9.0, 0.5, N // 2)]),
        "uniform": rng.uniform(0.1, 50.0, N),
        "constant": np.full(N, 2.5),
        "pareto": (rng.pareto(2.0, N) + 1.0) * 0.2,
        "small": rng.lognormal(0.0, 0.6, 7),
    }


def _sketch(values: np.ndarray, mapping: Mapping = LATENCY_MAPPING) -> QuantileSketch:
    s = QuantileSketch(mapping)
    s.add(values)
    return s


@pytest.mark.parametrize("name", sorted(_distributions()))
def test_quantiles_within_two_percent_of_numpy(name: str) -> None:
    """p50/p90/p95/p99, interpolated and at bucket midpoints, within 2 % of the exact values."""
    x = _distributions()[name]
    s = _sketch(x)
    exact = np.quantile(x, QS)
    for interpolate in (True, False):
        est = s.quantiles(QS, interpolate=interpolate)
        for q, e, t in zip(QS, est, exact, strict=True):
            assert e is not None
            assert abs(e - t) / t <= 0.02, (name, q, interpolate, e, t)
    # The midpoint bound (sqrt(gamma) - 1) and min/max/mean exact.
    mids = s.quantiles(QS, interpolate=False)
    assert all(abs(m - t) / t <= math.sqrt(LATENCY_GAMMA) - 1 + 1e-9
               for m, t in zip(mids, exact, strict=True) if m is not None)  # fmt: skip
    assert s.count == len(x) and s.min == x.min() and s.max == x.max()
    assert s.quantile(0.0) == x.min() and s.quantile(1.0) == x.max()
    mean = s.mean()
    assert mean is not None and math.isclose(mean, float(x.mean()), rel_tol=1e-9)


def test_interpolation_beats_midpoints_on_smooth_data() -> None:
    """Interpolating inside a bucket reads a smooth distribution's quantiles far below 1 %."""
    x = _distributions()["lognormal"]
    s = _sketch(x)
    exact = np.quantile(x, QS)
    est = s.quantiles(QS)
    assert max(abs(e - t) / t for e, t in zip(est, exact, strict=True) if e) < 0.002


def test_confidence_grid_within_a_bin_width() -> None:
    """Confidence on the 0.001 grid: quantiles within 0.001 of numpy's, the mean exact."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.beta(20, 2, N), [0.0, 1.0]])
    s = _sketch(x, CONFIDENCE_MAPPING)
    for q in (0.01, *QS):
        e = s.quantile(q)
        assert e is not None and abs(e - float(np.quantile(x, q))) <= CONFIDENCE_MAPPING.param
    assert s.span <= 1001 and s.bins()[0] == 1  # exactly 0 has its own bucket
    mean = s.mean()
    assert mean is not None and math.isclose(mean, float(x.mean()), rel_tol=1e-12)


def test_log_mapping_puts_values_in_their_bucket() -> None:
    """Bucket i holds (gamma^(i-1), gamma^i]: the index is ceil(log_gamma(x))."""
    g = LATENCY_GAMMA
    x = np.array([1.0, g**0.5, g**3.5, g**-2.5, 1000.0])
    idx = LATENCY_MAPPING.index(x)
    assert idx.tolist() == [0, 1, 4, -2, math.ceil(math.log(1000.0) / math.log(g))]
    for v, i in zip(x, idx, strict=True):
        assert g ** (int(i) - 1) < v <= g ** int(i) * (1 + 1e-12)


def test_merge_equals_the_sketch_of_the_union() -> None:
    """Bucket counts of merged parts equal the union's exactly, in any order and grouping."""
    rng = np.random.default_rng(11)
    parts = [rng.lognormal(m, 0.3, 3000) for m in (-1.0, 0.0, 0.5, 2.0)]
    parts.append(np.array([0.0, 1e-9, 5e-7]))  # zero bucket too
    union = _sketch(np.concatenate(parts))
    sketches = [_sketch(p) for p in parts]
    left = sketches[0].copy()
    for s in sketches[1:]:
        left.merge(s)
    right = sketches[-1].copy()
    for s in reversed(sketches[:-1]):
        right.merge(s)
    grouped = (
        sketches[0].merged(sketches[3]).merged(sketches[1].merged(sketches[2].merged(sketches[4])))
    )
    for m in (left, right, grouped):
        assert m.bins() == union.bins()
        assert m.zero_count == union.zero_count == 3
        assert m == union
        assert m.quantiles(QS) == union.quantiles(QS)


def test_merge_refuses_another_mapping() -> None:
    """Buckets of different mappings do not line up: the merge says so."""
    with pytest.raises(SketchMismatchError) as err:
        QuantileSketch.latency().merge(QuantileSketch.confidence())
    assert err.value.theirs == CONFIDENCE_MAPPING and err.value.reason == "sketch_mismatch"


def test_size_is_bounded_by_collapsing_the_lowest() -> None:
    """Past max_buckets the lowest buckets fold into the lowest kept; high quantiles hold."""
    rng = np.random.default_rng(5)
    x = np.exp(rng.uniform(-10, 30, 50_000))  # a ratio of e^40: about 2000 buckets
    s = _sketch(x)
    assert s.span == MAX_BUCKETS and s.count == len(x)
    for q in (0.9, 0.99):
        e = s.quantile(q)
        t = float(np.quantile(x, q))
        assert e is not None and abs(e - t) / t <= 0.02
    low = s.quantile(0.01)
    assert low is not None and low > float(np.quantile(x, 0.01))  # the fold reads high
    # Collapsing commutes with merging: parts merged equal the union, collapsed.
    small = QuantileSketch(LATENCY_MAPPING, max_buckets=50)
    small.add(x[:20_000])
    other = QuantileSketch(LATENCY_MAPPING, max_buckets=50)
    other.add(x[20_000:])
    small.merge(other)
    union = QuantileSketch(LATENCY_MAPPING, max_buckets=50)
    union.add(x)
    assert small.span == 50 and small == union


def test_wire_round_trip() -> None:
    """to_data -> JSON -> from_data gives the same sketch; the counts encode empty runs."""
    x = np.concatenate([_distributions()["bimodal"], [0.0, 2e-7, 400.0]])
    s = _sketch(x)
    s.add([math.nan, -1.0])
    data = s.to_data()
    raw = data.model_dump_json()
    back = QuantileSketch.from_data(SketchData.model_validate_json(raw))
    assert back == s and back.dropped == 2 and back.quantiles(QS) == s.quantiles(QS)
    assert any(c < 0 for c in data.c)  # the gap between the modes is a run, not zeros
    assert decode_counts(data.c) == s.to_data().counts()
    assert set(json.loads(raw)) == {"m", "p", "o", "c", "z", "s", "mn", "mx", "d"}
    assert (
        SketchData.model_validate_json(QuantileSketch.latency().to_data().model_dump_json()).n == 0
    )


def test_encode_counts_runs() -> None:
    """Runs of empty buckets are one negative number; decoding inverts it."""
    counts = [3, 0, 0, 0, 7, 1, 0, 2, 0, 0]
    assert encode_counts(counts) == (3, -3, 7, 1, -1, 2, -2)
    assert decode_counts(encode_counts(counts)) == counts
    assert encode_counts([]) == ()


def test_nan_infinite_negative_are_dropped_and_zero_is_counted() -> None:
    """NaN, inf and negative values are counted in `dropped` only; 0 and tiny values land in the
    zero bucket, read as the minimum."""
    s = QuantileSketch.latency()
    s.add([math.nan, math.inf, -math.inf, -0.5])
    assert s.count == 0 and s.dropped == 4 and s.quantile(0.5) is None and s.mean() is None
    assert s.min is None and s.to_data().n == 0
    s.add([0.0, MIN_INDEXABLE, 1.0, 2.0, math.nan])
    assert s.count == 4 and s.zero_count == 2 and s.dropped == 5
    assert s.sum == 3.0 + MIN_INDEXABLE and s.min == 0.0 and s.max == 2.0
    # Ranks 0 and 1 are zero-bucket values (read as the minimum), ranks 2 and 3 are 1 and 2.
    assert s.quantile(0.0) == 0.0 and s.quantile(1 / 3) == 0.0
    mid = s.quantile(0.5)
    assert mid is not None and mid == pytest.approx(0.5, rel=0.02)
    assert s.quantile(1.0) == 2.0


def test_wire_validation_refuses_inconsistent_sketches() -> None:
    """Negative sum, min above max, counts with no min, an oversize span: refused."""
    good = _sketch(np.array([1.0, 2.0])).to_data().model_dump()
    bad: list[dict[str, Any]] = [
        {"s": -1.0},
        {"mn": 3.0},
        {"mn": None},
        {"c": (-MAX_BUCKETS, 1)},
        {"c": (10**13,)},
        {"z": 1, "m": "lin", "p": 0.001},
        {"p": 0.9},
        {"m": "cubic"},
        {"s": math.nan},
    ]
    SketchData.model_validate(good)
    for change in bad:
        with pytest.raises(ValidationError):
            SketchData.model_validate({**good, **change})


# ---------------------------------------------------------------- in TelemetryWindow

REF = ModelRef(name="m", version="1", sha256="a" * 64)


def _window(**extra: object) -> dict[str, object]:
    start = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    return {
        "v": 1,
        "kind": "telemetry",
        "deviceId": "dev-1",
        "model": REF.model_dump(by_alias=True),
        "windowStart": start,
        "windowEnd": start,
        "count": 3,
        "errors": 0,
        "latencyMs": {"counts": [0] * 6 + [3] + [0] * 8, "total": 12.0},
        "confidence": {"counts": [0] * 9 + [3], "total": 2.85},
        **extra,
    }


def test_window_without_sketches_validates() -> None:
    """An older agent's window (no sketch fields) parses; its sketches are None."""
    w = TelemetryWindow.model_validate_json(json.dumps(_window()))
    assert w.latency_sketch is None and w.confidence_sketch is None
    assert w.latency_ms.n == 3


def test_window_with_sketches_validates_and_keeps_the_old_fields() -> None:
    """A new window carries both: old controllers read the histograms, new ones the sketches."""
    lat = _sketch(np.array([4.0, 4.0, 4.0])).to_data()
    conf = _sketch(np.array([0.95, 0.95, 0.95]), CONFIDENCE_MAPPING).to_data()
    raw = json.dumps(_window(latencySketch=lat.model_dump(), confidenceSketch=conf.model_dump()))
    w = TelemetryWindow.model_validate_json(raw)
    assert w.latency_sketch == lat and w.confidence_sketch == conf
    assert w.latency_ms.counts[LATENCY_BUCKETS_MS.index(5.0)] == 3
    assert w.confidence.counts[len(CONFIDENCE_BUCKETS) - 1] == 3
    again = TelemetryWindow.model_validate_json(w.to_wire())
    assert again == w
    assert QuantileSketch.from_data(again.latency_sketch or lat).quantile(0.5) == 4.0


class _WindowBeforeSketches(WireModel):
    """TelemetryWindow's required fields as a controller of before the sketches has them."""

    kind: Literal["telemetry"] = "telemetry"
    device_id: str
    model: ModelRef
    window_start: datetime
    window_end: datetime
    count: int
    errors: int
    latency_ms: Histogram
    confidence: Histogram


def test_old_controllers_ignore_the_sketch_fields() -> None:
    """WireModel ignores unknown keys: a model without the sketch fields parses a new window."""
    lat = _sketch(np.array([4.0, 4.0, 4.0])).to_data()
    new = TelemetryWindow.model_validate_json(json.dumps(_window(latencySketch=lat.model_dump())))
    assert b"latencySketch" in new.to_wire()
    old = _WindowBeforeSketches.model_validate_json(new.to_wire())
    assert old.latency_ms == new.latency_ms and old.confidence == new.confidence
    assert "latency_sketch" not in old.model_dump()


def test_window_refuses_a_sketch_off_contract() -> None:
    """A sketch on another mapping, or counting more than the window, is refused."""
    other = _sketch(np.array([4.0]), Mapping("log", 1.05)).to_data()
    too_many = _sketch(np.array([4.0] * 4)).to_data()
    swapped = _sketch(np.array([0.5]), CONFIDENCE_MAPPING).to_data()
    for extra in (
        {"latencySketch": other.model_dump()},
        {"latencySketch": too_many.model_dump()},
        {"latencySketch": swapped.model_dump()},
        {"confidenceSketch": too_many.model_dump()},
    ):
        with pytest.raises(ValidationError):
            TelemetryWindow.model_validate_json(json.dumps(_window(**extra)))


def test_subtract_undoes_a_merge_of_counts_and_keeps_min_max_as_bounds() -> None:
    """A device leaving a cohort: counts and sum come back exactly; min/max stay bounds
    that hold every value left, narrowed to the buckets still counted."""
    rng = np.random.default_rng(11)
    kept, leaving = rng.lognormal(0.0, 0.3, 2000), rng.lognormal(1.5, 0.3, 500)
    a, b = QuantileSketch.latency(), QuantileSketch.latency()
    a.add(kept)
    b.add(leaving)
    total = a.merged(b)
    total.subtract(b)
    assert total.bins() == a.bins() and total.count == a.count
    assert total.sum == pytest.approx(a.sum)
    lo, hi = total.min, total.max
    assert lo is not None and hi is not None
    assert lo <= kept.min() and hi >= kept.max()
    assert hi <= kept.max() * LATENCY_MAPPING.param  # narrowed to the last bucket kept
    assert total.quantile(0.95) == pytest.approx(float(np.quantile(kept, 0.95)), rel=0.02)
    total.subtract(a)
    assert total.count == 0 and total.min is None and total.sum == 0.0


def test_subtract_refuses_counts_it_does_not_hold() -> None:
    a, b = QuantileSketch.latency(), QuantileSketch.latency()
    a.add([1.0, 2.0])
    b.add([1.0, 50.0])
    with pytest.raises(ValueError, match="does not hold"):
        a.subtract(b)
    with pytest.raises(SketchMismatchError):
        a.subtract(QuantileSketch.confidence())
