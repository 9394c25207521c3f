"""Telemetry windows: per model version, what the model did on this device.

`TelemetryRecorder.observe` is the runtime's observer (`edge_agent.runtime.Observer`),
called after every inference from any thread with the call's outputs (output
order; None when it failed) and inputs (input order). It only copies what the
window needs into preallocated batches of its model: the latency, the output
the model's task reads (no output for task `none`) and, on one call in
`INPUT_SAMPLE_EVERY`, every input. The numbers are computed per batch,
vectorised over up to `FLUSH_EVERY` calls, by whichever call fills a batch or
by `drain`. So an inference pays a small copy or two instead of a dozen small
numpy operations, and the histogram work runs once per batch.

What the outputs mean comes from the model's task (`shared.tasks`), which the
agent registers with the model's signature when it loads it (`register`):
confidence is the classifier's top class probability, the detector's mean
score above its threshold (a call with none above adds no sample), nothing for
task `none`. A model nobody registered is read as agents read every model
before tasks existed: the top class of its first output, and its windows name
no task (the controller counts that confidence only for a classifier on its
first output). Whether a classifier emits probabilities, or a detector
logits, is learnt from its first output.

Each window counts the calls and errors of one model version and holds a
latency histogram and a confidence histogram with the fixed buckets of
`shared.messages` (windows merge by adding counts) over every call, and the
input statistics for drift over one call in `INPUT_SAMPLE_EVERY`: per input
tensor, a histogram on the buckets of its dtype (`shared.tasks.input_bounds`;
quantized inputs on their raw integers), and for the first input also the
mean, std and INPUT_BUCKETS histogram older controllers read. Drift is a
property of the input population, and a sample of it keeps the cost of each
call flat: an input copied on every call is written to cold cache lines after
each invoke has swept the caches (timed after real invokes on two threads,
`observe` went from 37 to 27 µs a call). 8-bit inputs are counted in one
`bincount` pass that gives their histograms, sum and sum of squares at once.
Measured per call on one thread, without the invoke: 1.9 µs for a float32
[1, 64] -> [1, 10] classifier (1.7 µs before per-input histograms), 1.1 µs for
the same model with task `none` (no output copied), 30 µs for a uint8
[1, 224, 224, 3] image (41 µs before: the bincount, and sampled inputs kept in
batches of sampled calls only); `bench/swap.py`'s throughput ratio did not
move. `drain` closes the windows and returns them as messages, every call
observed before it included. No I/O.

Beside the fixed-bucket histograms, which stay as they were for the
controllers that read them, each window carries a latency sketch and a
confidence sketch (`shared.sketch`: quantiles within 2 %, confidence on a 0.001
grid) of the same calls. They are fed in batches of SKETCH_EVERY values
(`SketchFeed`): a sketch's `add` has a fixed cost of about 13 µs, which over
a batch of 64 calls came to 400 ns a call for the two; over 4,096, 10 to 35 ns
a call (`bench/sketch.py`). A latency that is NaN, infinite or negative (a
clock that failed) is counted as dropped by the sketch and left out of the
histogram and its total, which would otherwise make the window invalid.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from shared.manifest import ModelTask, Quantization, TensorSignature
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    ModelRef,
    TelemetryWindow,
)
from shared.sketch import QuantileSketch
from shared.tasks import (
    classifier_rows,
    dequantize,
    describe,
    dtype_bounds,
    is_distribution,
    sigmoid,
    unit_range,
)


def confidences(outputs: np.ndarray, distribution: bool) -> np.ndarray:
    """Per call, the mean top-class probability over its rows (softmax first if needed).

    `outputs` stacks the calls' outputs: shape (calls, *output shape).
    """
    n = outputs.shape[0]
    rows = outputs.reshape(n, outputs.shape[1] if outputs.ndim > 2 else 1, -1)
    if rows.shape[1] == 0 or rows.shape[2] == 0:
        return np.zeros(n)
    per_call = rows.shape[1]
    # Classes first, (classes, rows of all calls): the reductions over the classes
    # then run along long contiguous rows instead of one short row at a time
    # (1.7x faster for 10 classes); the softmax is in float64 like the rest.
    cols = np.ascontiguousarray(rows.reshape(-1, rows.shape[2]).T, dtype=np.float64)
    top = cols.max(axis=0)
    if distribution:
        out: np.ndarray = top.reshape(n, per_call).mean(axis=1)
        return out
    cols -= top
    np.exp(cols, out=cols)
    probs: np.ndarray = (1.0 / cols.sum(axis=0)).reshape(n, per_call).mean(axis=1)
    return probs


def detections(scores: np.ndarray, threshold: float, probabilities: bool) -> np.ndarray:
    """Per call with a score above `threshold`, the mean of those scores (sigmoid first
    for logits); calls with none above are left out. `scores`: (calls, candidates)."""
    s = scores if probabilities else sigmoid(scores)
    above = s > threshold
    hits = above.sum(axis=1)
    sums = np.where(above, s, 0.0).sum(axis=1)
    found = hits > 0
    out: np.ndarray = sums[found] / hits[found]
    return out


INPUT_SAMPLE_EVERY = 8
# Successful calls are kept in preallocated batches of this many calls (fewer when
# the output they keep is large: at most about BATCH_BYTES per batch); sampled
# inputs in batches of FLUSH_EVERY / INPUT_SAMPLE_EVERY calls (fewer when large).
FLUSH_EVERY = 64
BATCH_BYTES = 2 * 1024 * 1024
_LATENCY_BOUNDS = np.array(LATENCY_BUCKETS_MS)
_CONFIDENCE_BOUNDS = np.array(CONFIDENCE_BUCKETS)
_INPUT_EDGES = INPUT_BUCKETS[:-1]  # the last bucket takes everything above (and NaN)


def bucket_counts(bounds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts per bucket (upper bounds inclusive, the last bucket takes the rest)."""
    idx = np.minimum(np.searchsorted(bounds, values, side="left"), len(bounds) - 1)
    counts: np.ndarray = np.bincount(idx, minlength=len(bounds))
    return counts


def input_histogram(values: np.ndarray, bounds: tuple[float, ...] = INPUT_BUCKETS) -> np.ndarray:
    """Counts of `values` per bucket of `bounds` (upper bounds inclusive; NaN last).

    One vectorised comparison per bound: several times faster than a binary
    search per value (`searchsorted`) for the few bounds there are, same counts.
    Float values compare with the bounds in their own precision.
    """
    kind = values.dtype.type if values.dtype.kind == "f" else np.float64
    at_most = [int(np.count_nonzero(values <= kind(b))) for b in bounds[:-1]]
    return np.diff(np.array([0, *at_most, values.size]))


# The sketches take values in batches of about this many calls: one `add` costs a dozen
# numpy calls whatever its size (13 µs here), and 3 to 4 ns per value on top.
SKETCH_EVERY = 4096


class SketchFeed:
    """A `QuantileSketch` fed in batches of at least SKETCH_EVERY values.

    The recorder's batches hold FLUSH_EVERY calls or fewer; adding each to the sketch
    would cost 400 ns a call for the two sketches (bench/sketch.py); held here, 20 ns.
    """

    __slots__ = ("_held", "_n", "sketch")

    def __init__(self, sketch: QuantileSketch) -> None:
        self.sketch = sketch
        self._held: list[np.ndarray] = []
        self._n = 0

    def extend(self, values: np.ndarray) -> None:
        self._held.append(values)
        self._n += values.size
        if self._n >= SKETCH_EVERY:
            self.flush()

    def flush(self) -> QuantileSketch:
        """Add everything held; the sketch."""
        if self._held:
            held, self._held, self._n = self._held, [], 0
            self.sketch.add(held[0] if len(held) == 1 else np.concatenate(held))
        return self.sketch


@dataclass(frozen=True, slots=True)
class _ByteTables:
    """For an 8-bit dtype: each of the 256 byte values' value and buckets."""

    values: np.ndarray  # float64 value of byte b
    bucket: np.ndarray  # bucket of byte b on the dtype's bounds
    legacy: np.ndarray  # bucket of byte b on INPUT_BUCKETS


def _byte_tables(dtype: np.dtype[np.generic]) -> _ByteTables:
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float64)
    bounds = dtype_bounds(dtype.name)
    return _ByteTables(
        values,
        np.searchsorted(np.array(bounds[:-1]), values, side="left"),
        np.searchsorted(np.array(_INPUT_EDGES), values, side="left"),
    )


_BYTES = {name: _byte_tables(np.dtype(name)) for name in ("uint8", "int8", "bool")}


def _regroup(bucket_of_byte: np.ndarray, per_byte: np.ndarray, buckets: int) -> np.ndarray:
    """Counts per byte value summed into the buckets of the byte values."""
    out: np.ndarray = np.bincount(bucket_of_byte, weights=per_byte, minlength=buckets)
    return out.astype(np.int64)


def _row_sums(rows: np.ndarray) -> np.ndarray:
    # einsum's own loop, as fast here as a BLAS matrix-vector product; BLAS would
    # wake OpenBLAS's helper threads, which then spin on the cores the inference
    # threads need (measured: the agent's throughput fell to 0.69 of bare with a
    # 64 KiB input; 0.96-1.01 with einsum).
    sums: np.ndarray = np.einsum("ij->i", rows)
    return sums


@dataclass(frozen=True, slots=True)
class _Reading:
    """How to read one model's outputs: which one, and what its confidence is."""

    task: ModelTask | None  # None: unregistered, read as before tasks (first output)
    index: int  # of the output the confidence reads; -1: no confidence
    quantization: Quantization | None = None
    unit: bool = False  # a quantized output whose whole range lies in [0, 1]

    @classmethod
    def of(cls, signature: TensorSignature, task: ModelTask) -> _Reading:
        names = [o.name for o in signature.outputs]
        if task.kind == "none" or task.output not in names:
            index = -1
            quant, unit = None, False
        else:
            index = names.index(task.output)
            spec = signature.outputs[index]
            quant = spec.quantization
            unit = quant is not None and unit_range(quant, np.dtype(spec.dtype))
        return cls(task, index, quant, unit)


_UNREGISTERED = _Reading(None, 0)


class _Outputs:
    """Successful calls of one model version with one layout of the output read:
    their latencies and copies of that output (rows = calls) in a preallocated array."""

    def __init__(self, rows: int, output: np.ndarray | None) -> None:
        self.layout = None if output is None else (output.shape, output.dtype)
        self.out = None if output is None else np.empty((rows, *output.shape), output.dtype)
        self.rows = rows
        self.latency: list[float] = []  # a list: appending beats a numpy item write
        self.n = 0

    def add(self, latency_ms: float, output: np.ndarray | None) -> bool:
        """Copy one call in; True when the batch is full."""
        i = self.n
        if self.out is not None:
            self.out[i] = output
        self.latency.append(latency_ms)
        self.n = i + 1
        return self.n == self.rows


class _Inputs:
    """Sampled calls' inputs of one model version with one input layout (rows = calls)."""

    def __init__(self, rows: int, inputs: tuple[np.ndarray, ...]) -> None:
        self.layout = tuple((x.shape, x.dtype) for x in inputs)
        self.xs = [np.empty((rows, *x.shape), x.dtype) for x in inputs]
        self.rows = rows
        self.n = 0

    def add(self, inputs: tuple[np.ndarray, ...]) -> bool:
        i = self.n
        for dest, x in zip(self.xs, inputs, strict=True):
            dest[i] = x
        self.n = i + 1
        return self.n == self.rows


@dataclass
class _Pending:
    """What one model version did since the last flush."""

    ref: ModelRef
    shadow: bool
    reading: _Reading
    index: int  # of the output the confidence reads; -1: none
    errors: int = 0
    agreements: int = 0
    rule: str | None = None  # shadow: how the mirror counted agreements
    outs: dict[object, _Outputs] = field(default_factory=dict)  # filling, by layout
    ins: dict[object, _Inputs] = field(default_factory=dict)
    full_outs: list[_Outputs] = field(default_factory=list)
    full_ins: list[_Inputs] = field(default_factory=list)


@dataclass
class _Window:
    ref: ModelRef
    start: datetime
    reading: _Reading
    shadow: bool = False
    agreements: int = 0
    rule: str | None = None
    count: int = 0
    errors: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_BUCKETS_MS), int))
    latency_total: float = 0.0
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(len(CONFIDENCE_BUCKETS), int))
    confidence_total: float = 0.0
    # The same values at high resolution (`shared.sketch`).
    latency_sketch: SketchFeed = field(default_factory=lambda: SketchFeed(QuantileSketch.latency()))
    confidence_sketch: SketchFeed = field(
        default_factory=lambda: SketchFeed(QuantileSketch.confidence())
    )
    inputs: np.ndarray = field(default_factory=lambda: np.zeros(len(INPUT_BUCKETS), int))
    per_input: list[np.ndarray] | None = None  # per input tensor, on its dtype's buckets
    input_n: int = 0
    input_sum: float = 0.0
    input_sumsq: float = 0.0


class TelemetryRecorder:
    def __init__(self, device_id: str, now: datetime) -> None:
        self.device_id = device_id
        # Guards `_pending`, `_spare` and the tick; held for a copy or two per call.
        self._lock = threading.Lock()
        # Held while pending calls are turned into window counts: one flush at a time,
        # and drain waits for a flush in progress so that it lands in the right window.
        self._flushing = threading.Lock()
        # Keyed by sha256 (a str hashes once, a frozen pydantic model on every lookup).
        self._pending: dict[str, _Pending] = {}
        # Processed batches, reusable, by layout (two at most of each).
        self._spare_outs: dict[object, list[_Outputs]] = {}
        self._spare_ins: dict[object, list[_Inputs]] = {}
        self._tick = 0
        self._windows: dict[str, _Window] = {}  # only touched with `_flushing` held
        self._since = now
        self._readings: dict[str, _Reading] = {}  # by sha256: registered models
        self._probabilities: dict[str, bool] = {}  # learnt from each model's first output

    def register(self, ref: ModelRef, signature: TensorSignature, task: ModelTask) -> None:
        """What `ref`'s outputs mean: its signature (quantization) and task (`shared.tasks`).

        The agent calls it when it loads a model, before the model serves.
        """
        reading = _Reading.of(signature, task)
        with self._lock:
            self._readings[ref.sha256] = reading

    def observe(
        self,
        ref: ModelRef,
        latency_ms: float,
        outputs: tuple[np.ndarray, ...] | None,
        inputs: tuple[np.ndarray, ...],
        *,
        shadow: bool = False,
        agreed: bool | None = None,
        rule: str | None = None,
    ) -> None:
        """Account one inference; `outputs` is None when it failed or was not sound.

        Shadow calls: `agreed` says whether the outputs agreed with the served ones
        by `rule` (`shared.tasks.agreement_rule`), which the window reports.

        Runs on every inference: the output the task reads is copied, and on a
        sampled call every input (the caller may reuse all arrays once the call
        returns); a call that fills a batch then processes the pending batches,
        unless another thread is at it.
        """
        key = "shadow:" + ref.sha256 if shadow else ref.sha256
        with self._lock:
            # The input statistics read one inference in INPUT_SAMPLE_EVERY (a failed one
            # is skipped): see the module's doc.
            self._tick += 1
            p = self._pending.get(key)
            if p is None:
                reading = self._readings.get(ref.sha256, _UNREGISTERED)
                p = self._pending[key] = _Pending(ref, shadow, reading, reading.index)
            if agreed:
                p.agreements += 1
            if rule is not None:
                p.rule = rule
            if outputs is None:
                p.errors += 1
                return
            out: np.ndarray | None = None
            layout: object = None
            if p.index >= 0:
                try:
                    out = outputs[p.index]
                except IndexError:  # fewer outputs than the model's signature: none read
                    out = None
                else:
                    layout = (out.shape, out.dtype)
            batch = p.outs.get(layout)
            if batch is None:
                batch = p.outs[layout] = self._new_outputs(layout, out)
            full = batch.add(latency_ms, out)
            if full:
                p.full_outs.append(p.outs.pop(layout))
            if self._tick % INPUT_SAMPLE_EVERY == 0 and inputs:
                in_layout = tuple([(x.shape, x.dtype) for x in inputs])
                sampled = p.ins.get(in_layout)
                if sampled is None:
                    sampled = p.ins[in_layout] = self._new_inputs(in_layout, inputs)
                if sampled.add(inputs):
                    p.full_ins.append(p.ins.pop(in_layout))
                    full = True
        if full and self._flushing.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._flushing.release()

    def observe_shadow(
        self,
        ref: ModelRef,
        latency_ms: float,
        outputs: tuple[np.ndarray, ...] | None,
        inputs: tuple[np.ndarray, ...],
        agreed: bool | None,
        rule: str | None = None,
    ) -> None:
        """Account one mirrored inference of a shadow model (its own window)."""
        self.observe(ref, latency_ms, outputs, inputs, shadow=True, agreed=agreed, rule=rule)

    def _new_outputs(self, layout: object, out: np.ndarray | None) -> _Outputs:
        spare = self._spare_outs.get(layout)
        if spare:
            return spare.pop()
        rows = FLUSH_EVERY
        if out is not None:
            rows = max(1, min(FLUSH_EVERY, BATCH_BYTES // max(1, out.nbytes)))
        return _Outputs(rows, out)

    def _new_inputs(self, layout: object, inputs: tuple[np.ndarray, ...]) -> _Inputs:
        spare = self._spare_ins.get(layout)
        if spare:
            return spare.pop()
        size = sum(x.nbytes for x in inputs)
        rows = max(1, min(FLUSH_EVERY // INPUT_SAMPLE_EVERY, BATCH_BYTES // max(1, size)))
        return _Inputs(rows, inputs)

    def _flush(self) -> None:
        """Turn every pending call into window counts (`_flushing` held)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        done_outs: list[_Outputs] = []
        done_ins: list[_Inputs] = []
        for key, p in pending.items():
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(
                    ref=p.ref, start=self._since, reading=p.reading, shadow=p.shadow
                )
            w.errors += p.errors
            w.count += p.errors
            w.agreements += p.agreements
            w.rule = p.rule or w.rule
            for batch in [*p.full_outs, *p.outs.values()]:
                if batch.n:
                    self._account_outputs(w, batch)
                batch.n = 0
                batch.latency.clear()
                done_outs.append(batch)
            for sampled in [*p.full_ins, *p.ins.values()]:
                if sampled.n:
                    self._account_inputs(w, sampled)
                sampled.n = 0
                done_ins.append(sampled)
        with self._lock:
            for batch in done_outs:
                spare_outs = self._spare_outs.setdefault(batch.layout, [])
                if len(spare_outs) < 2:
                    spare_outs.append(batch)
            for sampled in done_ins:
                spare_ins = self._spare_ins.setdefault(sampled.layout, [])
                if len(spare_ins) < 2:
                    spare_ins.append(sampled)

    def _account_outputs(self, w: _Window, batch: _Outputs) -> None:
        """Add one batch of successful calls to `w`, vectorised over the calls."""
        n = batch.n
        w.count += n
        latencies = np.array(batch.latency)
        w.latency_sketch.extend(latencies)  # counts NaN, infinite, negative ones as dropped
        total = float(latencies.sum())
        if not (math.isfinite(total) and float(latencies.min()) >= 0.0):  # min: NaN if any
            # A clock that failed: such a latency would make the window's total invalid
            # and the window unsendable. Left out, as the sketch leaves it out.
            latencies = latencies[np.isfinite(latencies) & (latencies >= 0.0)]
            total = float(latencies.sum())
        w.latency += bucket_counts(_LATENCY_BOUNDS, latencies)
        w.latency_total += total
        if batch.out is None:
            return
        reading = w.reading
        outs = batch.out[:n]
        if reading.quantization is not None:
            outs = dequantize(outs, reading.quantization, leading=1)
        sha = w.ref.sha256
        probabilities = self._probabilities.get(sha)
        if reading.task is not None and reading.task.kind == "detector":
            scores = outs.reshape(n, -1)
            if probabilities is None:
                first = scores[0]
                probabilities = reading.unit or bool(
                    first.size and first.min() >= 0.0 and first.max() <= 1.0
                )
                self._probabilities[sha] = probabilities
            conf = detections(scores, reading.task.score_threshold or 0.0, probabilities)
        else:
            if probabilities is None:
                probabilities = self._probabilities[sha] = reading.unit or is_distribution(
                    classifier_rows(outs[0])
                )
            conf = confidences(outs, probabilities)
        if conf.size:
            w.confidence += bucket_counts(_CONFIDENCE_BOUNDS, conf)
            w.confidence_total += float(conf.sum())
            w.confidence_sketch.extend(conf)

    def _account_inputs(self, w: _Window, sampled: _Inputs) -> None:
        """Add one batch of sampled calls' inputs to `w`: per-tensor histograms, and the
        first input's INPUT_BUCKETS histogram, sum and sum of squares."""
        nx = sampled.n
        if w.per_input is None:
            w.per_input = [np.zeros(len(dtype_bounds(x.dtype.name)), int) for x in sampled.xs]
        per_input = w.per_input
        if len(per_input) != len(sampled.xs):
            return  # another number of inputs than this model's first calls: not its own
        for i, x in enumerate(sampled.xs):
            xs = x[:nx].reshape(nx, -1)
            first = i == 0
            if xs.shape[1] == 0:
                continue
            tables = _BYTES.get(xs.dtype.name)
            if tables is not None:
                # 8-bit values: one bincount over the 256 byte values gives everything.
                per_byte = np.bincount(xs.reshape(-1).view(np.uint8), minlength=256)
                per_input[i] += _regroup(tables.bucket, per_byte, len(per_input[i]))
                if first:
                    w.inputs += _regroup(tables.legacy, per_byte, len(INPUT_BUCKETS))
                    w.input_n += xs.size
                    w.input_sum += float(per_byte @ tables.values)
                    w.input_sumsq += float(per_byte @ (tables.values * tables.values))
            elif xs.dtype.kind == "f":
                h = self._account_first(w, xs) if first else input_histogram(xs)
                per_input[i] += h
            else:
                bounds = dtype_bounds(xs.dtype.name)
                if bounds:
                    per_input[i] += input_histogram(xs, bounds)
                if first:
                    self._account_first(w, xs.astype(np.float64))

    @staticmethod
    def _account_first(w: _Window, xs: np.ndarray) -> np.ndarray:
        """The first input's mean/std sums and INPUT_BUCKETS histogram (returned too)."""
        if xs.dtype not in (np.float32, np.float64):
            xs = xs.astype(np.float64)
        # A call with a non-finite input sum or sum of squares is left out of mean/std.
        sums = _row_sums(xs)
        flat = xs.reshape(-1)
        # Squares are >= 0: finite total, finite rows. (Not np.dot: no BLAS, see _row_sums.)
        total_sq = float(np.einsum("i,i->", flat, flat))
        if np.isfinite(sums).all() and math.isfinite(total_sq):
            w.input_n += xs.size
            w.input_sum += float(sums.sum(dtype=np.float64))
            w.input_sumsq += total_sq
        else:
            sumsq = np.einsum("ij,ij->i", xs, xs)
            ok = np.isfinite(sums) & np.isfinite(sumsq)
            w.input_n += int(ok.sum()) * xs.shape[1]
            w.input_sum += float(sums[ok].sum(dtype=np.float64))
            w.input_sumsq += float(sumsq[ok].sum(dtype=np.float64))
        h = input_histogram(xs)
        w.inputs += h
        return h

    def drain(self, now: datetime) -> list[TelemetryWindow]:
        """Close the windows (every call observed so far included) and start new ones."""
        with self._flushing:
            self._flush()
            windows, self._windows, self._since = self._windows, {}, now
        out = []
        for w in windows.values():
            mean = std = None
            if w.input_n:
                mean = w.input_sum / w.input_n
                std = math.sqrt(max(0.0, w.input_sumsq / w.input_n - mean * mean))
            task = w.reading.task
            out.append(
                TelemetryWindow(
                    device_id=self.device_id,
                    model=w.ref,
                    window_start=w.start,
                    window_end=now,
                    count=w.count,
                    errors=w.errors,
                    latency_ms=Histogram(
                        counts=tuple(int(c) for c in w.latency), total=w.latency_total
                    ),
                    confidence=Histogram(
                        counts=tuple(int(c) for c in w.confidence), total=w.confidence_total
                    ),
                    input_mean=mean,
                    input_std=std,
                    inputs=Histogram(counts=tuple(int(c) for c in w.inputs))
                    if w.inputs.any()
                    else None,
                    input_histograms=tuple(
                        Histogram(counts=tuple(int(c) for c in h)) for h in w.per_input
                    )
                    if w.per_input is not None
                    else None,
                    task=describe(task) if task is not None else None,
                    shadow=w.shadow,
                    agreements=w.agreements if w.shadow else None,
                    agreement_rule=w.rule if w.shadow else None,
                    latency_sketch=w.latency_sketch.flush().to_data(),
                    confidence_sketch=w.confidence_sketch.flush().to_data(),
                )
            )
        return out
