"""Telemetry windows: per model version, what the model did on this device.

`TelemetryRecorder.observe` is called after every inference, from any thread.
It only copies what the call produced (latency, output; the input of one call
in `INPUT_SAMPLE_EVERY`) into a preallocated batch of its model; the numbers
are computed per batch, vectorised over up to `FLUSH_EVERY` calls, by
whichever call fills a batch or by `drain`. So an inference pays a small copy
or two instead of a dozen small numpy operations, and the histogram work runs
once per batch.

Each window counts the calls and errors of one model version and holds a
latency histogram and an output-confidence histogram with the fixed buckets of
`shared.messages` (windows merge by adding counts) over every call, and the
input statistics for drift (mean, std and a histogram of the values) over one
call in `INPUT_SAMPLE_EVERY`. Drift is a property of the input population, and
a sample of it keeps the cost of each call flat: an input copied on every call
is written to cold cache lines after each invoke has swept the caches (timed
after real invokes on two threads, `observe` went from 37 to 27 µs a call).
`drain` closes the windows and returns them as messages, every call observed
before it included. No I/O.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    ModelRef,
    TelemetryWindow,
)


def is_distribution(output: np.ndarray) -> bool:
    """Whether each row of the output already is a probability distribution."""
    rows = output.reshape(output.shape[0] if output.ndim > 1 else 1, -1)
    return bool(rows.min() >= 0.0 and np.abs(rows.sum(axis=1) - 1.0).max() < 1e-3)


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


INPUT_SAMPLE_EVERY = 8
# Successful calls are kept in preallocated batches of this many calls (fewer when
# their inputs are large: at most about BATCH_BYTES of input per batch).
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


def input_histogram(values: np.ndarray) -> np.ndarray:
    """Counts of `values` per INPUT_BUCKETS bucket (upper bounds inclusive; NaN last).

    One vectorised comparison per bound: several times faster than a binary
    search per value (`searchsorted`) for the few bounds there are, same counts.
    """
    at_most = [int(np.count_nonzero(values <= np.float32(b))) for b in _INPUT_EDGES]
    return np.diff(np.array([0, *at_most, values.size]))


def _row_sums(rows: np.ndarray) -> np.ndarray:
    # einsum's own loop, as fast here as a BLAS matrix-vector product; BLAS would
    # wake OpenBLAS's helper threads, which then spin on the cores the inference
    # threads need (measured: the agent's throughput fell to 0.69 of bare with a
    # 64 KiB input; 0.96-1.01 with einsum).
    sums: np.ndarray = np.einsum("ij->i", rows)
    return sums


class _Batch:
    """Successful calls of one model version with one input and output layout,
    copied into preallocated arrays (rows = calls; inputs: the sampled calls')."""

    def __init__(self, rows: int, x: np.ndarray, output: np.ndarray) -> None:
        self.layout = (x.shape, x.dtype, output.shape, output.dtype)
        self.x = np.empty((rows, *x.shape), x.dtype)
        self.out = np.empty((rows, *output.shape), output.dtype)
        self.rows = rows
        self.latency: list[float] = []  # a list: appending beats a numpy item write
        self.n = 0
        self.nx = 0  # inputs copied (sampled calls)

    def add(self, latency_ms: float, output: np.ndarray, x: np.ndarray, sampled: bool) -> bool:
        """Copy one call in (its input if `sampled`); True when the batch is full."""
        i = self.n
        if sampled:
            self.x[self.nx] = x
            self.nx += 1
        self.out[i] = output
        self.latency.append(latency_ms)
        self.n = i + 1
        return self.n == self.rows


@dataclass
class _Pending:
    """What one model version did since the last flush."""

    ref: ModelRef
    shadow: bool
    errors: int = 0
    agreements: int = 0
    open: dict[tuple[object, ...], _Batch] = field(default_factory=dict)  # filling
    full: list[_Batch] = field(default_factory=list)


@dataclass
class _Window:
    ref: ModelRef
    start: datetime
    shadow: bool = False
    agreements: int = 0
    count: int = 0
    errors: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_BUCKETS_MS), int))
    latency_total: float = 0.0
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(len(CONFIDENCE_BUCKETS), int))
    confidence_total: float = 0.0
    inputs: np.ndarray = field(default_factory=lambda: np.zeros(len(INPUT_BUCKETS), int))
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
        self._spare: dict[tuple[object, ...], list[_Batch]] = {}  # processed, reusable
        self._tick = 0
        self._windows: dict[str, _Window] = {}  # only touched with `_flushing` held
        self._since = now
        self._distribution: dict[str, bool] = {}

    def observe(
        self,
        ref: ModelRef,
        latency_ms: float,
        output: np.ndarray | None,
        x: np.ndarray,
        *,
        shadow: bool = False,
        agreed: bool | None = None,
    ) -> None:
        """Account one inference; `output` is None when it failed or was not finite.

        Runs on every inference: the output and the input are copied into the
        open batch of their model (the caller may reuse both arrays once the
        call returns); a call that fills a batch then processes the pending
        batches, unless another thread is at it. Whether a model emits
        probabilities is learnt from its first output.
        """
        key = "shadow:" + ref.sha256 if shadow else ref.sha256
        with self._lock:
            # The input statistics read one inference in INPUT_SAMPLE_EVERY (a failed one
            # is skipped): see the module's doc.
            self._tick += 1
            p = self._pending.get(key)
            if p is None:
                p = self._pending[key] = _Pending(ref, shadow)
            if agreed:
                p.agreements += 1
            if output is None:
                p.errors += 1
                return
            layout = (x.shape, x.dtype, output.shape, output.dtype)
            batch = p.open.get(layout)
            if batch is None:
                batch = p.open[layout] = self._new_batch(layout, x, output)
            full = batch.add(latency_ms, output, x, self._tick % INPUT_SAMPLE_EVERY == 0)
            if full:
                p.full.append(p.open.pop(layout))
        if full and self._flushing.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._flushing.release()

    def _new_batch(self, layout: tuple[object, ...], x: np.ndarray, output: np.ndarray) -> _Batch:
        spare = self._spare.get(layout)
        if spare:
            return spare.pop()
        # Each row keeps the call's output as well as its input: both count toward the cap.
        rows = max(1, min(FLUSH_EVERY, BATCH_BYTES // max(1, x.nbytes + output.nbytes)))
        return _Batch(rows, x, output)

    def observe_shadow(
        self,
        ref: ModelRef,
        latency_ms: float,
        output: np.ndarray | None,
        x: np.ndarray,
        agreed: bool | None,
    ) -> None:
        """Account one mirrored inference of a shadow model (its own window)."""
        self.observe(ref, latency_ms, output, x, shadow=True, agreed=agreed)

    def _flush(self) -> None:
        """Turn every pending call into window counts (`_flushing` held)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        done: list[_Batch] = []
        for key, p in pending.items():
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(ref=p.ref, start=self._since, shadow=p.shadow)
            w.errors += p.errors
            w.count += p.errors
            w.agreements += p.agreements
            for batch in [*p.full, *p.open.values()]:
                if batch.n:
                    self._account(w, batch)
                batch.n = batch.nx = 0
                batch.latency.clear()
                done.append(batch)
        with self._lock:
            for batch in done:
                spare = self._spare.setdefault(batch.layout, [])
                if len(spare) < 2:
                    spare.append(batch)

    def _account(self, w: _Window, batch: _Batch) -> None:
        """Add one batch of successful calls to `w`, vectorised over the calls."""
        n = batch.n
        w.count += n
        latencies = np.array(batch.latency)
        w.latency += bucket_counts(_LATENCY_BOUNDS, latencies)
        w.latency_total += float(latencies.sum())
        outs = batch.out[:n]
        dist = self._distribution.get(w.ref.sha256)
        if dist is None:
            dist = self._distribution[w.ref.sha256] = is_distribution(outs[0])
        conf = confidences(outs, dist)
        w.confidence += bucket_counts(_CONFIDENCE_BOUNDS, conf)
        w.confidence_total += float(conf.sum())
        nx = batch.nx
        if nx == 0 or batch.x[0].size == 0:
            return
        xs = batch.x[:nx].reshape(nx, -1)
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
        w.inputs += input_histogram(xs)

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
                    shadow=w.shadow,
                    agreements=w.agreements if w.shadow else None,
                )
            )
        return out
