"""Telemetry windows: the batched recorder gives what per-call accounting gives, under threads."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest

from edge_agent.telemetry import (
    FLUSH_EVERY,
    INPUT_SAMPLE_EVERY,
    TelemetryRecorder,
    input_histogram,
)
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    ModelRef,
    TelemetryWindow,
)

A = ModelRef(name="m", version="1", sha256="a" * 64)
B = ModelRef(name="m", version="2", sha256="b" * 64)


@dataclass
class Expected:
    """One window as plain per-call accounting computes it (the reference)."""

    count: int = 0
    errors: int = 0
    agreements: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    latency_total: float = 0.0
    confidence: list[int] = field(default_factory=lambda: [0] * len(CONFIDENCE_BUCKETS))
    confidence_total: float = 0.0
    inputs: list[int] = field(default_factory=lambda: [0] * len(INPUT_BUCKETS))
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0


class Reference:
    """Per-call accounting, one call at a time, in float64: what the windows must say."""

    def __init__(self) -> None:
        self.windows: dict[str, Expected] = {}
        self.tick = 0
        self.dist: dict[str, bool] = {}

    def observe(
        self,
        ref: ModelRef,
        ms: float,
        out: np.ndarray | None,
        x: np.ndarray,
        shadow: bool = False,
        agreed: bool | None = None,
    ) -> None:
        self.tick += 1
        w = self.windows.setdefault(("shadow:" if shadow else "") + ref.sha256, Expected())
        w.count += 1
        w.agreements += bool(agreed)
        if out is None:
            w.errors += 1
            return
        w.latency[min(bisect.bisect_left(LATENCY_BUCKETS_MS, ms), len(LATENCY_BUCKETS_MS) - 1)] += 1
        w.latency_total += ms
        rows = out.reshape(out.shape[0], -1).astype(np.float64)
        dist = self.dist.setdefault(
            ref.sha256, bool(rows.min() >= 0 and np.abs(rows.sum(axis=1) - 1).max() < 1e-3)
        )
        top = rows.max(axis=1)
        conf = float(top.mean() if dist else (1 / np.exp(rows - top[:, None]).sum(axis=1)).mean())
        w.confidence[
            min(bisect.bisect_left(CONFIDENCE_BUCKETS, conf), len(CONFIDENCE_BUCKETS) - 1)
        ] += 1
        w.confidence_total += conf
        if self.tick % INPUT_SAMPLE_EVERY == 0:  # input statistics: sampled calls only
            flat = x.reshape(-1).astype(np.float64)
            s, sq = float(flat.sum()), float((flat * flat).sum())
            if math.isfinite(s) and math.isfinite(sq):
                w.n, w.total, w.total_sq = w.n + flat.size, w.total + s, w.total_sq + sq
            for v in flat:
                w.inputs[next((i for i, b in enumerate(INPUT_BUCKETS) if v <= b), -1)] += 1


def assert_window_matches(got: TelemetryWindow, want: Expected) -> None:
    assert (got.count, got.errors) == (want.count, want.errors)
    assert list(got.latency_ms.counts) == want.latency
    assert got.latency_ms.total == pytest.approx(want.latency_total)
    assert list(got.confidence.counts) == want.confidence
    assert got.confidence.total == pytest.approx(want.confidence_total)
    assert list(got.inputs.counts if got.inputs else [0] * len(INPUT_BUCKETS)) == want.inputs
    if want.n:
        mean = want.total / want.n
        std = math.sqrt(max(0.0, want.total_sq / want.n - mean * mean))
        assert got.input_mean == pytest.approx(mean, rel=1e-4, abs=1e-6)
        assert got.input_std == pytest.approx(std, rel=1e-4)
    else:
        assert got.input_mean is None and got.input_std is None
    assert got.agreements == (want.agreements if got.shadow else None)


def random_call(
    rng: np.random.Generator, softmax: bool
) -> tuple[float, np.ndarray | None, np.ndarray]:
    x = rng.standard_normal((4, 32)).astype(np.float32)
    if rng.random() < 0.05:
        x[rng.integers(4), rng.integers(32)] = rng.choice([np.nan, np.inf])
    if rng.random() < 0.07:
        return float(rng.exponential(2.0)), None, x
    logits = rng.standard_normal((4, 10)).astype(np.float32) * 3
    out = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) if softmax else logits
    return float(rng.exponential(2.0)), out.astype(np.float32), x


def test_windows_equal_per_call_accounting_across_batches_models_shadows_and_drains() -> None:
    """Random calls of two models (one emits logits, one probabilities), shadow calls with
    agreement, failures and NaN/inf inputs, drained at odd points: every window equals
    what accounting each call on its own gives."""
    rng = np.random.default_rng(7)
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    ref_impl = Reference()
    for chunk in (1, FLUSH_EVERY - 1, 3 * FLUSH_EVERY + 5, 2 * FLUSH_EVERY):
        ref_impl.windows = {}  # drained: new windows, same sampling phase
        for _ in range(chunk):
            model, shadow = (A, False) if rng.random() < 0.6 else (B, bool(rng.random() < 0.5))
            ms, out, x = random_call(rng, softmax=model is B)
            agreed = bool(rng.random() < 0.7) if shadow and out is not None else None
            rec.observe(model, ms, out, x, shadow=shadow, agreed=agreed)
            ref_impl.observe(model, ms, out, x, shadow, agreed)
        windows = rec.drain(datetime.now(UTC))
        got = {("shadow:" if w.shadow else "") + w.model.sha256: w for w in windows}
        assert got.keys() == ref_impl.windows.keys()
        for key, want in ref_impl.windows.items():
            assert_window_matches(got[key], want)


def test_observe_copies_what_the_caller_may_reuse() -> None:
    """An application that refills its input/output buffers after the call changes nothing."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    x = np.full((2, 8), 0.25, np.float32)
    out = np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)
    for _ in range(INPUT_SAMPLE_EVERY):
        rec.observe(A, 1.0, out, x)
        x[:] = 100.0  # reused by the caller for its next frame
        out[:] = 0.5
        x[:], out[:] = 0.25, np.array([[0.9, 0.1], [0.8, 0.2]])
    (w,) = rec.drain(datetime.now(UTC))
    assert w.input_mean == pytest.approx(0.25) and w.input_std == pytest.approx(0.0, abs=1e-6)
    assert w.confidence.mean() == pytest.approx(0.85)
    assert w.inputs is not None and w.inputs.counts[INPUT_BUCKETS.index(0.5)] == x.size


def test_large_inputs_still_land_in_the_window() -> None:
    """Inputs of a megabyte each (a batch holds only a couple): every call is counted."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    x = np.ones((512, 512), np.float32)
    for _ in range(9):
        rec.observe(A, 3.0, np.array([[1.0, 0.0]], np.float32), x)
    (w,) = rec.drain(datetime.now(UTC))
    assert w.count == w.latency_ms.n == 9
    assert w.input_mean == pytest.approx(1.0)
    assert w.inputs is not None and w.inputs.n == x.size  # the 8th call was sampled


@pytest.mark.timeout(60)
def test_threads_observing_while_another_drains_lose_and_double_count_nothing() -> None:
    """Four threads observe (filling and processing batches) while the main thread drains
    over and over: the drained windows add up to exactly the calls made."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    per_thread = 20 * FLUSH_EVERY + 3
    x = np.zeros((1, 16), np.float32)
    out = np.array([[0.25, 0.75]], np.float32)
    start = threading.Barrier(5)

    def work(i: int) -> None:
        start.wait()
        for j in range(per_thread):
            rec.observe(A if i % 2 else B, 1.0, None if j % 11 == 0 else out, x)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    start.wait()
    windows: list[TelemetryWindow] = []
    while any(t.is_alive() for t in threads):
        windows += rec.drain(datetime.now(UTC))
    for t in threads:
        t.join()
    windows += rec.drain(datetime.now(UTC))
    failed = sum(1 for j in range(per_thread) if j % 11 == 0)
    for model in (A, B):
        mine = [w for w in windows if w.model == model]
        assert sum(w.count for w in mine) == 2 * per_thread
        assert sum(w.errors for w in mine) == 2 * failed
        assert sum(w.latency_ms.n for w in mine) == sum(w.confidence.n for w in mine)
        assert sum(w.latency_ms.n for w in mine) == 2 * (per_thread - failed)


@pytest.mark.parametrize(
    "values",
    [
        np.array([-5.0, -3.0, -2.5, -0.5, 0.0, 1e-9, 0.5, 2.0, 3.0, 3.5, np.inf, np.nan]),
        np.random.default_rng(3).standard_normal(1000).astype(np.float32),
        np.arange(-4, 5, dtype=np.float64),
    ],
)
def test_input_histogram_counts_like_a_binary_search(values: np.ndarray) -> None:
    """Upper bounds inclusive, everything above the last bound (NaN too) in the last bucket."""
    edges = np.array(INPUT_BUCKETS[:-1], dtype=np.float32)
    want = np.bincount(np.searchsorted(edges, values), minlength=len(INPUT_BUCKETS))
    np.testing.assert_array_equal(input_histogram(values), want)
