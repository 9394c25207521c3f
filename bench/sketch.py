"""Sketch benchmark: what the latency/confidence sketches cost the agent, and weigh on the wire.

    python bench/sketch.py            # all three parts, a summary
    python bench/sketch.py --json     # one JSON object on stdout

In one run it measures:

* **cost per inference** in the agent's hot path, two ways, each as old vs new
  in the same run (paired rounds, order alternating; the fastest round of each
  side, the least disturbed on a shared machine, with the medians beside it;
  timed in the thread's CPU time, so that being preempted is not counted):
  the accounting of one batch of `FLUSH_EVERY` calls (old: the fixed-bucket
  histograms and sums of latency and confidence; new: the same plus both
  sketches' `add`), in ns per inference; and `TelemetryRecorder.observe` end to
  end for a float32 [1, 64] -> [1, 10] classifier on one thread (the recorder
  with its sketches' `add` disabled vs as it ships), in ns per call;
* **accuracy**: the sketch's relative error on p50/p90/p95/p99 against numpy's
  exact quantiles, for log-normal, bimodal, uniform and heavy-tailed latencies;
* **wire size** of a typical window's sketches (log-normal latencies with 0.5 %
  stalls up to 50x, softmax confidences) in the encoding `SketchData` uses
  (contiguous counts, empty runs as -k) against the plain contiguous run and
  sparse [index, count] pairs, and the whole `TelemetryWindow` with and without
  the sketches. No I/O beyond stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from edge_agent.telemetry import (
    _CONFIDENCE_BOUNDS,
    _LATENCY_BOUNDS,
    FLUSH_EVERY,
    SketchFeed,
    TelemetryRecorder,
    bucket_counts,
)
from shared.manifest import ModelTask, TensorSignature, TensorSpec
from shared.messages import ModelRef
from shared.sketch import QuantileSketch, encode_counts

QS = (0.5, 0.9, 0.95, 0.99)
REF = ModelRef(name="bench", version="1", sha256="c" * 64)


def latencies(rng: np.random.Generator, n: int, median_ms: float = 1.2) -> np.ndarray:
    """A typical window: log-normal (sigma 0.2) with 0.5 % stalls of 2x to 50x."""
    x = rng.lognormal(np.log(median_ms), 0.2, n)
    stalls = rng.random(n) < 0.005
    x[stalls] *= rng.uniform(2.0, 50.0, int(stalls.sum()))
    return x


def softmax_confidences(rng: np.random.Generator, n: int) -> np.ndarray:
    logits = rng.normal(0.0, 1.0, (n, 10))
    logits[:, 0] += 4.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    return out


# ---------------------------------------------------------------- cost


def _paired(old: Callable[[], float], new: Callable[[], float], rounds: int) -> dict[str, Any]:
    olds, news, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            o, n = old(), new()
        else:
            n, o = new(), old()
        olds.append(o)
        news.append(n)
        ratios.append(n / o)
    # The fastest round of each side is the least disturbed by other processes: the figure
    # to read on a shared machine; the medians beside it.
    return {
        "old_ns": round(min(olds), 1),
        "new_ns": round(min(news), 1),
        "added_ns": round(min(news) - min(olds), 1),
        "ratio": round(min(news) / min(olds), 3),
        "old_ns_median": round(statistics.median(olds), 1),
        "new_ns_median": round(statistics.median(news), 1),
        "ratio_median_of_rounds": round(statistics.median(ratios), 3),
    }


def batch_cost(rounds: int, batches: int) -> dict[str, Any]:
    """ns per inference of accounting batches of FLUSH_EVERY calls, old vs with sketches."""
    rng = np.random.default_rng(1)
    lat = [latencies(rng, FLUSH_EVERY).tolist() for _ in range(64)]
    conf = [softmax_confidences(rng, FLUSH_EVERY) for _ in range(64)]

    def old_one(lat_list: list[float], c: np.ndarray, state: list[Any]) -> np.ndarray:
        x = np.array(lat_list)
        state[0] += bucket_counts(_LATENCY_BOUNDS, x)
        state[1] += float(x.sum())
        state[2] += bucket_counts(_CONFIDENCE_BOUNDS, c)
        state[3] += float(c.sum())
        return x

    def run(with_sketch: bool) -> float:
        state: list[Any] = [np.zeros(len(_LATENCY_BOUNDS), int), 0.0,
                            np.zeros(len(_CONFIDENCE_BOUNDS), int), 0.0]  # fmt: skip
        ls, cs = SketchFeed(QuantileSketch.latency()), SketchFeed(QuantileSketch.confidence())
        t0 = time.thread_time_ns()
        for i in range(batches):
            lat_list, c = lat[i % 64], conf[i % 64]
            x = old_one(lat_list, c, state)
            if with_sketch:
                ls.extend(x)
                cs.extend(c)
        ls.flush()
        cs.flush()
        return (time.thread_time_ns() - t0) / (batches * FLUSH_EVERY)

    run(True)  # warm up
    return _paired(lambda: run(False), lambda: run(True), rounds)


def _no_extend(self: SketchFeed, values: object) -> None:
    """`SketchFeed.extend` for the recorder as it was before sketches."""


def observe_cost(rounds: int, calls: int) -> dict[str, Any]:
    """ns per `TelemetryRecorder.observe` call, classifier [1, 64] -> [1, 10], one thread."""
    signature = TensorSignature(
        inputs=(TensorSpec(name="x", dtype="float32", shape=(1, 64)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 10)),),
    )
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 64)).astype(np.float32),)
    ys = [(rng.standard_normal((1, 10)).astype(np.float32),) for _ in range(64)]
    lat = latencies(rng, 64).tolist()
    now = datetime.now(UTC)

    def run(with_sketch: bool) -> float:
        saved = SketchFeed.extend
        if not with_sketch:
            SketchFeed.extend = _no_extend  # type: ignore[method-assign]
        try:
            rec = TelemetryRecorder("bench", now)
            rec.register(REF, signature, ModelTask(kind="classifier", output="y"))
            t0 = time.thread_time_ns()
            for i in range(calls):
                rec.observe(REF, lat[i % 64], ys[i % 64], x)
            ns = (time.thread_time_ns() - t0) / calls
            (w,) = rec.drain(now)
            assert w.latency_sketch is not None
            assert (w.latency_sketch.n == w.count) == with_sketch
            return ns
        finally:
            SketchFeed.extend = saved  # type: ignore[method-assign]

    run(True)
    return _paired(lambda: run(False), lambda: run(True), rounds)


# ---------------------------------------------------------------- accuracy and size


def accuracy(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    dists = {
        "lognormal": rng.lognormal(0.0, 0.5, n),
        "bimodal": np.concatenate([rng.normal(1.0, 0.05, n // 2), rng.normal(8.0, 0.4, n // 2)]),
        "uniform": rng.uniform(0.5, 20.0, n),
        "pareto": (rng.pareto(2.5, n) + 1.0) * 0.3,
        "typical": latencies(rng, n),
    }
    out: dict[str, Any] = {}
    for name, x in dists.items():
        s = QuantileSketch.latency()
        s.add(x)
        exact = np.quantile(x, QS)
        est = s.quantiles(QS)
        mid = s.quantiles(QS, interpolate=False)
        out[name] = {
            "max_rel_err_interpolated": round(
                max(abs(e - t) / t for e, t in zip(est, exact, strict=True) if e is not None), 5
            ),
            "max_rel_err_midpoint": round(
                max(abs(e - t) / t for e, t in zip(mid, exact, strict=True) if e is not None), 5
            ),
            "buckets": s.span,
        }
    return out


def _json_len(obj: object) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def wire(n: int, windows: int) -> dict[str, Any]:
    """Sizes in bytes of compact JSON, the median over `windows` windows of `n` calls."""
    rng = np.random.default_rng(4)
    sizes: dict[str, list[int]] = {
        k: []
        for k in ("rle", "contiguous", "sparse_pairs", "confidence_rle",
                  "confidence_contiguous", "confidence_sparse_pairs", "legacy_histograms",
                  "window_without_sketches", "window_with_sketches")
    }  # fmt: skip
    for _ in range(windows):
        now = datetime.now(UTC)
        rec = TelemetryRecorder("device-0001", now)
        signature = TensorSignature(
            inputs=(TensorSpec(name="x", dtype="float32", shape=(1, 4)),),
            outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 10)),),
        )
        rec.register(REF, signature, ModelTask(kind="classifier", output="y"))
        x = (np.zeros((1, 4), np.float32),)
        logits = rng.normal(0.0, 1.0, (n, 10)).astype(np.float32)
        logits[:, 0] += 4.0
        for lat, y in zip(latencies(rng, n), logits, strict=True):
            rec.observe(REF, float(lat), (y.reshape(1, 10),), x)
        (w,) = rec.drain(now)
        assert w.latency_sketch is not None and w.confidence_sketch is not None
        for prefix, data in (("", w.latency_sketch), ("confidence_", w.confidence_sketch)):
            counts = data.counts()
            base = data.model_dump(exclude={"c"})
            sizes[prefix + "rle"].append(_json_len(data.model_dump()))
            sizes[prefix + "contiguous"].append(_json_len({**base, "c": counts}))
            pairs = [[data.o + i, c] for i, c in enumerate(counts) if c]
            sizes[prefix + "sparse_pairs"].append(_json_len({**base, "c": pairs}))
            assert list(encode_counts(counts)) == list(data.c)
        sizes["legacy_histograms"].append(
            _json_len(w.latency_ms.model_dump(by_alias=True))
            + _json_len(w.confidence.model_dump(by_alias=True))
        )
        sizes["window_with_sketches"].append(len(w.to_wire()))
        bare = w.model_copy(update={"latency_sketch": None, "confidence_sketch": None})
        sizes["window_without_sketches"].append(len(bare.to_wire()))
    return {k: int(statistics.median(v)) for k, v in sizes.items()} | {"calls_per_window": n}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=31, help="paired old/new rounds per figure")
    p.add_argument("--batches", type=int, default=512, help="batches per batch-cost round")
    p.add_argument("--calls", type=int, default=8192, help="observe calls per round")
    p.add_argument("--window", type=int, default=6000, help="calls in a wire-size window")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    result = {
        "batch_accounting_ns_per_inference": batch_cost(args.rounds, args.batches),
        "observe_ns_per_call": observe_cost(args.rounds, args.calls),
        "accuracy_p50_p90_p95_p99": accuracy(100_000),
        "wire_bytes": wire(args.window, 5),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {json.dumps(v)}")
    return result


if __name__ == "__main__":
    main()
