"""Telemetry windows: the batched recorder gives what per-call accounting gives, by task,
per input tensor, under threads."""

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
from shared.manifest import ModelTask, Quantization, TensorSignature, TensorSpec
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    ModelRef,
    TelemetryWindow,
)
from shared.tasks import (
    confidence_of,
    dequantize,
    describe,
    dtype_bounds,
    histogram_counts,
    sigmoid,
)

LEGACY = ModelTask(kind="classifier", output="first")
A = ModelRef(name="m", version="1", sha256="a" * 64)
B = ModelRef(name="m", version="2", sha256="b" * 64)


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    return min(bisect.bisect_left(bounds, value), len(bounds) - 1)


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
    per_input: list[np.ndarray] | None = None
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0


class Reference:
    """Per-call accounting, one call at a time, in float64: what the windows must say.

    The confidence is `shared.tasks.confidence_of` of each call, except that whether
    a model emits probabilities (classifier) or scores (detector) is decided on its
    first output, as the recorder documents.
    """

    def __init__(self) -> None:
        self.windows: dict[str, Expected] = {}
        self.tick = 0
        self.dist: dict[str, bool] = {}
        self.tasks: dict[str, tuple[ModelTask, int, Quantization | None]] = {}

    def register(
        self, ref: ModelRef, task: ModelTask, index: int, q: Quantization | None = None
    ) -> None:
        self.tasks[ref.sha256] = (task, index, q)

    def observe(
        self,
        ref: ModelRef,
        ms: float,
        outs: tuple[np.ndarray, ...] | None,
        xs: tuple[np.ndarray, ...],
        shadow: bool = False,
        agreed: bool | None = None,
    ) -> None:
        self.tick += 1
        w = self.windows.setdefault(("shadow:" if shadow else "") + ref.sha256, Expected())
        w.count += 1
        w.agreements += bool(agreed)
        if outs is None:
            w.errors += 1
            return
        w.latency[_bucket(LATENCY_BUCKETS_MS, ms)] += 1
        w.latency_total += ms
        conf = self.confidence(ref, outs)
        if conf is not None:
            w.confidence[_bucket(CONFIDENCE_BUCKETS, conf)] += 1
            w.confidence_total += conf
        if self.tick % INPUT_SAMPLE_EVERY == 0:  # input statistics: sampled calls only
            if w.per_input is None:
                w.per_input = [np.zeros(len(dtype_bounds(x.dtype.name)), int) for x in xs]
            for i, x in enumerate(xs):
                w.per_input[i] += histogram_counts(x, dtype_bounds(x.dtype.name))
            flat = xs[0].reshape(-1).astype(np.float64)
            s, sq = float(flat.sum()), float((flat * flat).sum())
            if math.isfinite(s) and math.isfinite(sq):
                w.n, w.total, w.total_sq = w.n + flat.size, w.total + s, w.total_sq + sq
            for v in flat:
                w.inputs[next((i for i, b in enumerate(INPUT_BUCKETS) if v <= b), -1)] += 1

    def confidence(self, ref: ModelRef, outs: tuple[np.ndarray, ...]) -> float | None:
        # Unregistered: the first output's top class, as agents read every model before tasks.
        task, index, q = self.tasks.get(ref.sha256, (LEGACY, 0, None))
        if task.kind == "none":
            return None
        real = dequantize(outs[index], q)
        if task.kind == "classifier":
            rows = real.reshape(real.shape[0] if real.ndim > 1 else 1, -1)
            dist = self.dist.setdefault(
                ref.sha256,
                q is not None
                or bool(rows.min() >= 0 and np.abs(rows.sum(axis=1) - 1).max() < 1e-3),
            )
            top = rows.max(axis=1)
            return float(
                top.mean() if dist else (1 / np.exp(rows - top[:, None]).sum(axis=1)).mean()
            )
        probs = self.dist.setdefault(ref.sha256, bool(real.min() >= 0 and real.max() <= 1))
        scores = real.reshape(-1) if probs else sigmoid(real.reshape(-1))
        above = scores[scores > (task.score_threshold or 0.0)]
        return float(above.mean()) if above.size else None


def assert_window_matches(got: TelemetryWindow, want: Expected) -> None:
    assert (got.count, got.errors) == (want.count, want.errors)
    assert list(got.latency_ms.counts) == want.latency
    assert got.latency_ms.total == pytest.approx(want.latency_total)
    assert list(got.confidence.counts) == want.confidence
    assert got.confidence.total == pytest.approx(want.confidence_total)
    assert list(got.inputs.counts if got.inputs else [0] * len(INPUT_BUCKETS)) == want.inputs
    if want.per_input is None:
        assert got.input_histograms is None
    else:
        assert got.input_histograms is not None
        assert [list(h.counts) for h in got.input_histograms] == [list(h) for h in want.per_input]
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
) -> tuple[float, tuple[np.ndarray, ...] | None, tuple[np.ndarray, ...]]:
    x = rng.standard_normal((4, 32)).astype(np.float32)
    if rng.random() < 0.05:
        x[rng.integers(4), rng.integers(32)] = rng.choice([np.nan, np.inf])
    if rng.random() < 0.07:
        return float(rng.exponential(2.0)), None, (x,)
    logits = rng.standard_normal((4, 10)).astype(np.float32) * 3
    out = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) if softmax else logits
    return float(rng.exponential(2.0)), (out.astype(np.float32),), (x,)


def test_windows_equal_per_call_accounting_across_batches_models_shadows_and_drains() -> None:
    """Random calls of two unregistered models (one emits logits, one probabilities), shadow
    calls with agreement, failures and NaN/inf inputs, drained at odd points: every window
    equals what accounting each call on its own gives."""
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
            assert got[key].task is None  # unregistered: read as before tasks


# ---------------------------------------------------------------- by task


def sig(*outputs: TensorSpec, inputs: tuple[TensorSpec, ...] | None = None) -> TensorSignature:
    return TensorSignature(
        inputs=inputs or (TensorSpec(name="x", shape=(4, 32), dtype="float32"),), outputs=outputs
    )


DETECTOR = ModelTask(kind="detector", output="scores", score_threshold=0.5)


@pytest.mark.parametrize("logits", [False, True])
def test_detector_confidence_is_the_mean_score_above_the_threshold_per_call(logits: bool) -> None:
    """BlazeFace-like: box regressors and per-anchor scores (probabilities or logits).
    Calls with a score above 0.5 add the mean of those; calls with none add no sample."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    signature = sig(
        TensorSpec(name="boxes", shape=(1, 6, 4), dtype="float32"),
        TensorSpec(name="scores", shape=(1, 6, 1), dtype="float32"),
    )
    rec.register(A, signature, DETECTOR)
    rng = np.random.default_rng(1)
    want: list[float] = []
    calls = 3 * FLUSH_EVERY + 7
    for i in range(calls):
        p = rng.random((1, 6, 1)) * (0.55 if i % 3 == 0 else 1.0)  # every third: rarely any
        scores = np.log(p / (1 - p)) if logits else p
        got = confidence_of(DETECTOR, {"scores": p})
        if got is not None:
            want.append(got)
        boxes = rng.standard_normal((1, 6, 4))
        x = rng.standard_normal((4, 32))
        rec.observe(
            A, 1.0, (boxes.astype(np.float32), scores.astype(np.float32)), (x.astype(np.float32),)
        )
    (w,) = rec.drain(datetime.now(UTC))
    assert w.count == w.latency_ms.n == calls
    assert 0 < w.confidence.n == len(want) < calls
    assert w.confidence.total == pytest.approx(sum(want), rel=1e-5)
    assert w.task == "detector on 'scores' (threshold 0.5)"


def test_detector_logits_far_out_of_range_do_not_overflow() -> None:
    """BlazeFace's background anchors sit at logits of -100 and below: no overflow warning
    (warnings are errors here), and the one confident anchor is the call's confidence."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    rec.register(A, sig(TensorSpec(name="scores", shape=(1, 4, 1), dtype="float32")), DETECTOR)
    logits = np.array([[[-1000.0], [-120.0], [800.0], [-3.0]]], np.float32)
    for _ in range(3):
        rec.observe(A, 1.0, (logits,), (np.zeros((4, 32), np.float32),))
    (w,) = rec.drain(datetime.now(UTC))
    assert w.confidence.n == 3 and w.confidence.mean() == pytest.approx(1.0)


def test_task_none_reports_no_confidence_and_copies_no_output() -> None:
    """Landmarks: counts, latency and inputs as usual; an empty confidence; task "none"."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    rec.register(
        A, sig(TensorSpec(name="lm", shape=(1, 63), dtype="float32")), ModelTask(kind="none")
    )
    x = (np.zeros((4, 32), np.float32),)
    for _ in range(2 * FLUSH_EVERY + 1):
        rec.observe(A, 2.0, (np.ones((1, 63), np.float32),), x)
    (w,) = rec.drain(datetime.now(UTC))
    assert (w.count, w.latency_ms.n, w.confidence.n) == (
        2 * FLUSH_EVERY + 1,
        2 * FLUSH_EVERY + 1,
        0,
    )
    assert w.task == "none" and w.inputs is not None
    assert w.confidence.counts == (0,) * len(CONFIDENCE_BUCKETS)


def test_a_quantized_softmax_is_read_on_its_real_values() -> None:
    """uint8 output, scale 1/256: raw 192 is a probability of 0.75, no softmax of 192."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    q = Quantization(scale=(1 / 256,), zero_point=(0,))
    clf = ModelTask(kind="classifier", output="probs")
    rec.register(A, sig(TensorSpec(name="probs", shape=(1, 4), dtype="uint8", quantization=q)), clf)
    out = np.array([[192, 40, 20, 4]], np.uint8)
    for _ in range(10):
        rec.observe(A, 1.0, (out,), (np.zeros((4, 32), np.float32),))
    (w,) = rec.drain(datetime.now(UTC))
    assert w.confidence.mean() == pytest.approx(0.75)
    assert w.task == describe(clf)


def test_the_classifier_reads_its_declared_output_among_several() -> None:
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    clf = ModelTask(kind="classifier", output="probs")
    rec.register(
        A,
        sig(TensorSpec(name="emb", shape=(1, 8), dtype="float32"),
            TensorSpec(name="probs", shape=(1, 2), dtype="float32")),
        clf,
    )  # fmt: skip
    for _ in range(5):
        rec.observe(
            A, 1.0, (np.full((1, 8), 5.0, np.float32), np.array([[0.2, 0.8]], np.float32)),
            (np.zeros((4, 32), np.float32),),
        )  # fmt: skip
    (w,) = rec.drain(datetime.now(UTC))
    assert w.confidence.mean() == pytest.approx(0.8)


# ---------------------------------------------------------------- per input tensor


def input_set(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Four inputs of four dtypes: an image, audio features, token ids and a mask."""
    return (
        rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8),
        rng.integers(-128, 128, (1, 3, 40), dtype=np.int8),
        rng.integers(0, 30000, (1, 16), dtype=np.int64),
        rng.random((1, 16)) < 0.5,
    )


def test_every_input_tensor_gets_a_histogram_on_its_dtypes_buckets() -> None:
    """Four inputs, sampled calls only: each tensor's counts equal a plain searchsorted on
    its dtype's bounds; the first (uint8) also gives INPUT_BUCKETS counts, mean and std as
    an older controller reads them."""
    rng = np.random.default_rng(5)
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    ref_impl = Reference()
    rec.register(
        A, sig(TensorSpec(name="out", shape=(1, 3), dtype="float32")), ModelTask(kind="none")
    )
    ref_impl.register(A, ModelTask(kind="none"), 0)
    out = (np.zeros((1, 3), np.float32),)
    for _ in range(5 * FLUSH_EVERY + 3):
        xs = input_set(rng)
        rec.observe(A, 1.0, out, xs)
        ref_impl.observe(A, 1.0, out, xs)
    (w,) = rec.drain(datetime.now(UTC))
    assert_window_matches(w, ref_impl.windows[A.sha256])
    assert w.input_histograms is not None
    assert [len(h.counts) for h in w.input_histograms] == [8, 8, len(dtype_bounds("int64")), 2]
    sampled = (5 * FLUSH_EVERY + 3) // INPUT_SAMPLE_EVERY
    assert w.input_histograms[0].n == sampled * 8 * 8 * 3


@pytest.mark.parametrize("dtype", ["uint8", "int8", "bool", "int16", "int32", "float16"])
def test_one_input_of_each_dtype_matches_the_reference(dtype: str) -> None:
    rng = np.random.default_rng(9)
    rec, ref_impl = TelemetryRecorder("cam-1", datetime.now(UTC)), Reference()
    for _ in range(3 * FLUSH_EVERY):
        if dtype == "bool":
            x = rng.random((2, 10)) < 0.3
        elif dtype.startswith("float"):
            x = (rng.standard_normal((2, 10)) * 2).astype(dtype)
        else:
            info = np.iinfo(dtype)
            x = rng.integers(max(info.min, -300), min(info.max, 300), (2, 10)).astype(dtype)
        out = (np.array([[0.3, 0.7]], np.float32),)
        rec.observe(A, 1.0, out, (x,))
        ref_impl.observe(A, 1.0, out, (x,))
    (w,) = rec.drain(datetime.now(UTC))
    assert_window_matches(w, ref_impl.windows[A.sha256])


def test_shadow_windows_report_the_rule_the_mirror_used() -> None:
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    x, out = (np.zeros((4, 32), np.float32),), (np.array([[0.3, 0.7]], np.float32),)
    for i in range(10):
        rec.observe_shadow(A, 1.0, out, x, i % 2 == 0, "all outputs within rtol=0.01, atol=0.001")
    rec.observe(A, 1.0, out, x)
    windows = {w.shadow: w for w in rec.drain(datetime.now(UTC))}
    assert windows[True].agreement_rule == "all outputs within rtol=0.01, atol=0.001"
    assert windows[True].agreements == 5
    assert windows[False].agreement_rule is None and windows[False].agreements is None


# ---------------------------------------------------------------- copies, sizes, threads


def test_observe_copies_what_the_caller_may_reuse() -> None:
    """An application that refills its input/output buffers after the call changes nothing."""
    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    x = np.full((2, 8), 0.25, np.float32)
    out = np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)
    for _ in range(INPUT_SAMPLE_EVERY):
        rec.observe(A, 1.0, (out,), (x,))
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
        rec.observe(A, 3.0, (np.array([[1.0, 0.0]], np.float32),), (x,))
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
    x = (np.zeros((1, 16), np.float32), np.zeros((1, 4), np.uint8))
    out = (np.array([[0.25, 0.75]], np.float32),)
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
        sampled = sum(h.n for w in mine for h in (w.input_histograms or ())[1:])
        assert sampled == 4 * sum(h.n for w in mine for h in (w.input_histograms or ())[:1]) / 16


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
