"""Telemetry windows: per model version, what the model did on this device.

`TelemetryRecorder.observe` is called after every inference, from any thread;
it adds to the open window of the model version that served the call (count,
errors, a latency histogram and an output-confidence histogram with the fixed
buckets of `shared.messages`, so windows merge by adding counts; input
mean/std for drift). `drain` closes the windows and returns them as messages.
No I/O.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    ModelRef,
    TelemetryWindow,
)


def confidence_of(output: np.ndarray) -> float:
    """The top class probability: the output itself if it is a distribution, else softmax."""
    flat = output.astype(np.float64, copy=False).ravel()
    if flat.size == 0 or not np.all(np.isfinite(flat)):
        return 0.0
    if flat.min() >= 0.0 and abs(flat.sum() - 1.0) < 1e-3:
        return float(flat.max())
    shifted = np.exp(flat - flat.max())
    return float(shifted.max() / shifted.sum())


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    return min(bisect.bisect_left(bounds, value), len(bounds) - 1)


@dataclass
class _Window:
    start: datetime
    count: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    latency_total: float = 0.0
    confidence: list[int] = field(default_factory=lambda: [0] * len(CONFIDENCE_BUCKETS))
    confidence_total: float = 0.0
    input_n: int = 0
    input_sum: float = 0.0
    input_sumsq: float = 0.0


class TelemetryRecorder:
    def __init__(self, device_id: str, now: datetime) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self._windows: dict[ModelRef, _Window] = {}
        self._since = now

    def observe(
        self, ref: ModelRef, latency_ms: float, output: np.ndarray | None, x: np.ndarray
    ) -> None:
        ok = output is not None and bool(np.all(np.isfinite(output)))
        conf = confidence_of(output) if ok and output is not None else None
        xs = x.astype(np.float64, copy=False)
        n, s, sq = xs.size, float(xs.sum()), float(np.square(xs).sum())
        with self._lock:
            w = self._windows.get(ref)
            if w is None:
                w = self._windows[ref] = _Window(start=self._since)
            w.count += 1
            if not ok:
                w.errors += 1
                return
            w.latency[_bucket(LATENCY_BUCKETS_MS, latency_ms)] += 1
            w.latency_total += latency_ms
            if conf is not None:
                w.confidence[_bucket(CONFIDENCE_BUCKETS, conf)] += 1
                w.confidence_total += conf
            if math.isfinite(s) and math.isfinite(sq):
                w.input_n += n
                w.input_sum += s
                w.input_sumsq += sq

    def drain(self, now: datetime) -> list[TelemetryWindow]:
        with self._lock:
            windows, self._windows, self._since = self._windows, {}, now
        out = []
        for ref, w in windows.items():
            mean = std = None
            if w.input_n:
                mean = w.input_sum / w.input_n
                std = math.sqrt(max(0.0, w.input_sumsq / w.input_n - mean * mean))
            out.append(
                TelemetryWindow(
                    device_id=self.device_id,
                    model=ref,
                    window_start=w.start,
                    window_end=now,
                    count=w.count,
                    errors=w.errors,
                    latency_ms=Histogram(counts=tuple(w.latency), total=w.latency_total),
                    confidence=Histogram(counts=tuple(w.confidence), total=w.confidence_total),
                    input_mean=mean,
                    input_std=std,
                )
            )
        return out
