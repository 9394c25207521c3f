"""Telemetry windows carry latency and confidence sketches of every call, beside the unchanged
histograms: the same buckets as sketching the calls one by one, merged across windows and
devices, and a bad clock cannot spoil a window."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime

import numpy as np
import pytest

from edge_agent.telemetry import FLUSH_EVERY, SKETCH_EVERY, TelemetryRecorder
from shared.manifest import ModelTask, TensorSignature, TensorSpec
from shared.messages import ModelRef, TelemetryWindow
from shared.sketch import QuantileSketch
from shared.tasks import confidence_of
from tests.edge_agent.test_telemetry import Reference, assert_window_matches

A = ModelRef(name="m", version="1", sha256="a" * 64)
B = ModelRef(name="m", version="2", sha256="b" * 64)
CLASSIFIER = ModelTask(kind="classifier", output="y")
SIG = TensorSignature(
    inputs=(TensorSpec(name="x", shape=(1, 8), dtype="float32"),),
    outputs=(TensorSpec(name="y", shape=(1, 10), dtype="float32"),),
)
X = (np.zeros((1, 8), np.float32),)


def _probs(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    logits = rng.standard_normal((1, 10)) * 2
    p = np.exp(logits) / np.exp(logits).sum()
    return (p.astype(np.float32),)


def _sketches(w: TelemetryWindow) -> tuple[QuantileSketch, QuantileSketch]:
    assert w.latency_sketch is not None and w.confidence_sketch is not None
    return QuantileSketch.from_data(w.latency_sketch), QuantileSketch.from_data(w.confidence_sketch)


@pytest.mark.parametrize("calls", [1, FLUSH_EVERY + 3, SKETCH_EVERY + 2 * FLUSH_EVERY + 1])
def test_window_sketches_equal_sketching_each_call(calls: int) -> None:
    """Every successful call's latency and confidence is in the window's sketches (none held
    back at drain), bucket for bucket as a sketch of the calls; histograms as before."""
    rng = np.random.default_rng(calls)
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    rec.register(A, SIG, CLASSIFIER)
    ref = Reference()
    ref.register(A, CLASSIFIER, 0)
    lat, conf = QuantileSketch.latency(), QuantileSketch.confidence()
    for _ in range(calls):
        ms = float(rng.lognormal(0.0, 0.4))
        out = None if rng.random() < 0.05 else _probs(rng)
        rec.observe(A, ms, out, X)
        ref.observe(A, ms, out, X)
        if out is not None:
            lat.add([ms])
            c = confidence_of(CLASSIFIER, {"y": out[0]})
            assert c is not None
            conf.add([c])
    (w,) = rec.drain(datetime.now(UTC))
    assert_window_matches(w, ref.windows[A.sha256])
    got_lat, got_conf = _sketches(w)
    assert got_lat.bins() == lat.bins() and got_lat.count == w.count - w.errors
    assert got_lat == lat
    assert got_conf.bins() == conf.bins() and got_conf.count == lat.count
    assert got_conf.sum == pytest.approx(w.confidence.total)
    assert got_lat.sum == pytest.approx(w.latency_ms.total)


def _latencies(rng: np.random.Generator, n: int) -> list[float]:
    return [float(v) for v in rng.lognormal(0.0, 0.4, n)]


def test_window_quantiles_within_two_percent() -> None:
    """A window of 5,000 calls: the latency sketch's p50-p99 within 2 % of numpy's."""
    rng = np.random.default_rng(1)
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    values = _latencies(rng, 5000)
    for ms in values:
        rec.observe(A, ms, _probs(rng), X)
    (w,) = rec.drain(datetime.now(UTC))
    lat, _ = _sketches(w)
    for q in (0.5, 0.9, 0.95, 0.99):
        est, exact = lat.quantile(q), float(np.quantile(values, q))
        assert est is not None and abs(est - exact) / exact <= 0.02


def test_windows_of_devices_merge_into_the_sketch_of_all_calls() -> None:
    """Two devices, two windows each: their sketches merged equal one sketch of every call."""
    rng = np.random.default_rng(2)
    everything = QuantileSketch.latency()
    merged = QuantileSketch.latency()
    for device in ("cam-1", "cam-2"):
        rec = TelemetryRecorder(device, datetime.now(UTC))
        for calls in (700, 3 * SKETCH_EVERY // 2):
            values = _latencies(rng, calls)
            for ms in values:
                rec.observe(A, ms, _probs(rng), X)
            everything.add(values)
            (w,) = rec.drain(datetime.now(UTC))
            merged.merge(_sketches(w)[0])
    assert merged.bins() == everything.bins() and merged == everything


def test_a_failed_clock_leaves_the_window_valid() -> None:
    """NaN, infinite or negative latencies are left out of the histogram, the total and the
    sketch (which counts them as dropped); the window validates and counts the calls."""
    rng = np.random.default_rng(3)
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    good = _latencies(rng, 10)
    for ms in [*good, math.nan, -1.0, math.inf]:
        rec.observe(A, ms, _probs(rng), X)
    (w,) = rec.drain(datetime.now(UTC))
    TelemetryWindow.model_validate_json(w.to_wire())
    lat, conf = _sketches(w)
    assert w.count == 13 and w.latency_ms.n == 10 and lat.count == 10 and lat.dropped == 3
    assert w.latency_ms.total == pytest.approx(sum(good))
    assert conf.count == 13  # the outputs were fine: their confidence counts


def test_task_none_sends_an_empty_confidence_sketch() -> None:
    """A model with no confidence: an empty confidence sketch, the latency sketch full."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    rec.register(A, SIG, ModelTask(kind="none"))
    for ms in (1.0, 2.0, 3.0):
        rec.observe(A, ms, _probs(np.random.default_rng(0)), X)
    (w,) = rec.drain(datetime.now(UTC))
    lat, conf = _sketches(w)
    assert conf.count == 0 and w.confidence_sketch is not None and w.confidence_sketch.mn is None
    assert lat.count == 3 and lat.quantile(0.5) == pytest.approx(2.0, rel=0.02)


def test_threads_lose_no_call_in_the_sketches() -> None:
    """Four threads on two models and a drain in the middle: every call in exactly one window."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    per_thread = 3000
    windows: list[TelemetryWindow] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(per_thread):
            rec.observe(A if seed % 2 else B, float(rng.lognormal()), _probs(rng), X)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    windows += rec.drain(datetime.now(UTC))
    for t in threads:
        t.join()
    windows += rec.drain(datetime.now(UTC))
    total = QuantileSketch.latency()
    for w in windows:
        lat, _ = _sketches(w)
        assert lat.count == w.count == w.latency_ms.n
        total.merge(lat)
    assert total.count == 4 * per_thread
