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


def confidence_of(output: np.ndarray, distribution: bool) -> float:
    """Mean top-class probability over the batch rows (softmax first if needed)."""
    rows = output.reshape(output.shape[0] if output.ndim > 1 else 1, -1)
    if rows.size == 0:
        return 0.0
    top = rows.max(axis=1)
    if distribution:
        return float(top.mean())
    shifted = np.exp(rows - top[:, None])
    return float((1.0 / shifted.sum(axis=1)).mean())


INPUT_SAMPLE_EVERY = 8
# searchsorted over the finite upper bounds; the last bucket takes everything above.
_INPUT_EDGES = np.array(INPUT_BUCKETS[:-1], dtype=np.float32)


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    return min(bisect.bisect_left(bounds, value), len(bounds) - 1)


@dataclass
class _Window:
    ref: ModelRef
    start: datetime
    shadow: bool = False
    agreements: int = 0
    count: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    latency_total: float = 0.0
    confidence: list[int] = field(default_factory=lambda: [0] * len(CONFIDENCE_BUCKETS))
    confidence_total: float = 0.0
    inputs: list[int] = field(default_factory=lambda: [0] * len(INPUT_BUCKETS))
    input_n: int = 0
    input_sum: float = 0.0
    input_sumsq: float = 0.0


class TelemetryRecorder:
    def __init__(self, device_id: str, now: datetime) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        # Keyed by sha256: a str hashes once, a frozen pydantic model on every lookup.
        self._windows: dict[str, _Window] = {}
        self._since = now
        self._distribution: dict[str, bool] = {}
        self._tick = 0

    def observe(
        self,
        ref: ModelRef,
        latency_ms: float,
        output: np.ndarray | None,
        x: np.ndarray,
        *,
        shadow: bool = False,
    ) -> None:
        """Account one inference; `output` is None when it failed or was not finite.

        Runs on every inference, so it is a handful of vectorised operations;
        whether a model emits probabilities is learnt from its first output.
        """
        conf = None
        if output is not None:
            dist = self._distribution.get(ref.sha256)
            if dist is None:
                dist = self._distribution[ref.sha256] = is_distribution(output)
            conf = confidence_of(output, dist)
        flat = x.reshape(-1)
        n = flat.size
        self._tick += 1
        # The input histogram reads one inference in INPUT_SAMPLE_EVERY: drift is a
        # property of the population, and this keeps the per-call cost flat.
        hist = (
            np.bincount(np.searchsorted(_INPUT_EDGES, flat), minlength=len(INPUT_BUCKETS))
            if self._tick % INPUT_SAMPLE_EVERY == 0
            else None
        )
        s = float(flat.sum())
        sq = (
            float(np.dot(flat, flat))
            if flat.dtype.kind == "f"
            else float(np.square(flat, dtype=np.float64).sum())
        )
        ok = output is not None
        with self._lock:
            key = "shadow:" + ref.sha256 if shadow else ref.sha256
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(ref=ref, start=self._since, shadow=shadow)
            w.count += 1
            if not ok:
                w.errors += 1
                return
            w.latency[_bucket(LATENCY_BUCKETS_MS, latency_ms)] += 1
            w.latency_total += latency_ms
            if conf is not None:
                w.confidence[_bucket(CONFIDENCE_BUCKETS, conf)] += 1
                w.confidence_total += conf
            if hist is not None:
                for i, c in enumerate(hist.tolist()):
                    w.inputs[i] += c
            if math.isfinite(s) and math.isfinite(sq):
                w.input_n += n
                w.input_sum += s
                w.input_sumsq += sq

    def observe_shadow(
        self,
        ref: ModelRef,
        latency_ms: float,
        output: np.ndarray | None,
        x: np.ndarray,
        agreed: bool | None,
    ) -> None:
        """Account one mirrored inference of a shadow model (its own window)."""
        self.observe(ref, latency_ms, output, x, shadow=True)
        if agreed:
            with self._lock:
                self._windows["shadow:" + ref.sha256].agreements += 1

    def drain(self, now: datetime) -> list[TelemetryWindow]:
        with self._lock:
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
                    latency_ms=Histogram(counts=tuple(w.latency), total=w.latency_total),
                    confidence=Histogram(counts=tuple(w.confidence), total=w.confidence_total),
                    input_mean=mean,
                    input_std=std,
                    inputs=Histogram(counts=tuple(w.inputs)) if any(w.inputs) else None,
                    shadow=w.shadow,
                    agreements=w.agreements if w.shadow else None,
                )
            )
        return out
