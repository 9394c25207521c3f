"""Gate benchmark: how often the latency gate rolls back a healthy candidate, and how often
it catches a slower one, on simulated cohorts run through the real telemetry and gate code.

    python bench/gates.py              # the full report (docs/gates.md has its figures)
    python bench/gates.py --json       # one JSON object on stdout
    python bench/gates.py --parts bakes      # one part (single, bakes, detection, search)
    python bench/gates.py --trials 50 --detection-trials 50 --search-trials 20  # a quick look

Each trial simulates a canary: `--candidate-devices` devices on the candidate and
`--baseline-devices` on the baseline, `--samples` inferences each. Every device
has its own latency distribution, log-normal: its median is the fleet's median
times exp(N(0, `--device-spread`)) (hardware, thermal state, neighbours) and its
sigma `--sigma` times exp(N(0, `--sigma-spread`)) (per-device noise); a candidate with a
regression of +x multiplies every latency by 1 + x, so its p95 (every quantile)
is x higher. Each device's calls go one by one through the agent's
`TelemetryRecorder.observe` (with a softmax output, so the confidence path runs
too), its window comes out of `drain` as the `TelemetryWindow` an agent sends;
the controller side makes each window a `Rollup` (`Rollup.of_window`), builds
the two cohorts (`controller.live.cohort_stats`, what `LiveRollout` keeps window
by window) and asks `controller.gates.evaluate_gates` for the
`max_latency_increase` verdict, with `--min-samples` (the default 2,000: the
candidate cohort of 20 devices x 100 holds it, so a reading is the first of a bake).

Reported, per condition, the share of trials that `fail` (a rollback), `pass`
and stay `inconclusive`, at tolerance 0 (any increase we are confident of fails;
the strictest setting) and at `--tolerance`. Parts (`--parts`, all by default):

* `single`: one reading. Identical candidate and baseline (`--trials`, 500 by
  default): the false-rollback rate; +5 %, +10 %, +20 %, +50 % regressions
  (`--detection-trials` each): the detection rate at the default minimum samples;
* `bakes` (identical) and `detection` (each regression): a whole bake read
  `--looks` times as its windows arrive (the first
  reading at `--samples` calls a device, the last at `--growth` times as many,
  each device's windows accumulating in its rollup as in the controller), rolled
  back on the first `fail`, as the controller does: identical (`--trials`) and
  each regression (`--detection-trials`). Per condition: the share failed at the
  first reading, failed at any reading (the whole bake: a rollback), and the last
  reading's verdict; the same readings without the sequential correction (every
  reading at LEVEL, as before it) beside them; and the error-rate gate
  (`--error-trials` bakes, an error rate exactly at the tolerance, read
  `--error-looks` times while its inferences grow 64-fold: the i.i.d. case the
  correction's within-epoch term is derived for);
* `search`: how many candidate devices (at `--samples` each, the baseline three
  times as many) a +5 % regression needs to be detected in 95 % of trials at
  tolerance 0, with `--min-samples` at the candidate cohort's size: the
  device-to-device spread, not the samples per device, is what limits it.

No I/O beyond stdout. Trials are seeded (`--seed`): a run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Any

import numpy as np

from controller.gates import (
    BAKE_ALPHA,
    DEVICE_MIN_SAMPLES,
    LEVEL,
    CohortStats,
    Interval,
    decide,
    difference_interval,
    epoch_tail,
    evaluate_gates,
    look_epoch,
    wilson_interval,
)
from controller.live import Rollup, cohort_stats
from edge_agent.telemetry import TelemetryRecorder
from shared.manifest import ModelTask, TensorSignature, TensorSpec
from shared.messages import GateSpec, ModelRef, TelemetryWindow

SIGNATURE = TensorSignature(
    inputs=(TensorSpec(name="x", dtype="float32", shape=(1, 8)),),
    outputs=(TensorSpec(name="y", dtype="float32", shape=(1, 10)),),
)
TASK = ModelTask(kind="classifier", output="y")
BASELINE = ModelRef(name="bench", version="1", sha256="b" * 64)
CANDIDATE = ModelRef(name="bench", version="2", sha256="c" * 64)
REGRESSIONS = (0.05, 0.10, 0.20, 0.50)


@dataclass(frozen=True)
class Shape:
    """One canary's shape: devices each side, inferences per device, the distributions."""

    candidate_devices: int
    baseline_devices: int
    samples: int
    median_ms: float
    sigma: float
    sigma_spread: float
    device_spread: float
    min_samples: int


class Simulator:
    """Devices' calls through the agent's recorder, windows into the controller's rollups."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.x = (self.rng.standard_normal((1, 8)).astype(np.float32),)
        # A few softmax outputs to cycle through: the confidence path runs on each call.
        logits = self.rng.standard_normal((16, 1, 10)).astype(np.float32) * 2
        probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        self.outputs = [(p.astype(np.float32),) for p in probs]
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.calls = 0
        self.last: tuple[CohortStats, CohortStats] | None = None

    def device_window(self, ref: ModelRef, latencies: np.ndarray) -> TelemetryWindow:
        recorder = TelemetryRecorder("bench-device", self.now)
        recorder.register(ref, SIGNATURE, TASK)
        outputs, x = self.outputs, self.x
        for i, ms in enumerate(latencies.tolist()):
            recorder.observe(ref, ms, outputs[i % 16], x)
        self.calls += len(latencies)
        (window,) = recorder.drain(self.now)
        return window

    def cohort(self, ref: ModelRef, devices: int, shape: Shape, factor: float) -> CohortStats:
        rollups = []
        for _ in range(devices):
            median = shape.median_ms * math.exp(self.rng.normal(0.0, shape.device_spread))
            sigma = shape.sigma * math.exp(self.rng.normal(0.0, shape.sigma_spread))
            lat = self.rng.lognormal(math.log(median), sigma, shape.samples) * factor
            w = self.device_window(ref, lat)
            # What the store reads of a window of a registered classifier (`window_stats`).
            stats = CohortStats(0, w.count, w.errors, w.latency_ms, w.confidence)
            rollups.append(Rollup.of_window(stats, w))
        return cohort_stats(rollups)

    def looked_trial(
        self,
        shape: Shape,
        regression: float,
        looks: int,
        growth: float,
        tolerances: tuple[float, ...],
    ) -> list[tuple[Reading, Reading]]:
        """One bake read `looks` times as its windows arrive (the controller re-reads the
        gates on new telemetry and rolls back on the first `fail`): each device's first
        window holds `shape.samples` calls, the others together (growth - 1) times as
        many. Per tolerance: the readings with the sequential correction and without."""
        per_look = [shape.samples, *_split(round(shape.samples * (growth - 1)), looks - 1)]
        sides = []
        both = (
            (CANDIDATE, shape.candidate_devices, 1.0 + regression),
            (BASELINE, shape.baseline_devices, 1.0),
        )
        for ref, devices, factor in both:
            per_device = []
            for _ in range(devices):
                median = shape.median_ms * math.exp(self.rng.normal(0.0, shape.device_spread))
                sigma = shape.sigma * math.exp(self.rng.normal(0.0, shape.sigma_spread))
                lat = self.rng.lognormal(math.log(median), sigma, sum(per_look)) * factor
                recorder = TelemetryRecorder("bench-device", self.now)
                recorder.register(ref, SIGNATURE, TASK)
                windows = []
                for chunk in np.split(lat, np.cumsum(per_look)[:-1]):
                    for i, ms in enumerate(chunk.tolist()):
                        recorder.observe(ref, ms, self.outputs[i % 16], self.x)
                    (w,) = recorder.drain(self.now)
                    stats = CohortStats(0, w.count, w.errors, w.latency_ms, w.confidence)
                    windows.append(Rollup.of_window(stats, w))
                self.calls += len(lat)
                per_device.append(windows)
            sides.append(per_device)
        totals = [[Rollup() for _ in side] for side in sides]
        out = [(Reading(), Reading()) for _ in tolerances]
        for look in range(looks):
            for side, total in zip(sides, totals, strict=True):
                for windows, t in zip(side, total, strict=True):
                    t.add(windows[look])
            candidate, baseline = (cohort_stats(t) for t in totals)
            uncorrected = _exp(difference_interval(candidate.device_p95, baseline.device_p95))
            for (seq, fixed), tolerance in zip(out, tolerances, strict=True):
                spec = GateSpec(max_latency_increase=tolerance, min_samples=shape.min_samples)
                (verdict,) = evaluate_gates(spec, candidate, baseline)
                seq.read(verdict.verdict)
                if verdict.verdict == "inconclusive" and verdict.low is None:
                    fixed.read("inconclusive")  # too few samples or devices: both alike
                elif uncorrected is not None:
                    fixed.read(decide(uncorrected, tolerance, lower_is_better=True))
        return out

    def trial(self, shape: Shape, regression: float, tolerances: tuple[float, ...]) -> list[str]:
        candidate = self.cohort(CANDIDATE, shape.candidate_devices, shape, 1.0 + regression)
        baseline = self.cohort(BASELINE, shape.baseline_devices, shape, 1.0)
        self.last = (candidate, baseline)
        out = []
        for tolerance in tolerances:
            spec = GateSpec(max_latency_increase=tolerance, min_samples=shape.min_samples)
            (verdict,) = evaluate_gates(spec, candidate, baseline)
            out.append(verdict.verdict)
        return out

    def device_spread_seen(self) -> float:
        """The pooled sd of the devices' log p95 in the last trial's two cohorts."""
        assert self.last is not None
        c, b = (x.device_p95 for x in self.last)
        return math.sqrt((c.squares + b.squares) / (c.devices + b.devices - 2))


@dataclass
class Reading:
    """What a bake's readings said: the first, whether any failed, the last."""

    first: str | None = None
    failed_at: int | None = None  # the reading (1-based) that failed first
    last: str = "inconclusive"
    reads: int = 0

    def read(self, verdict: str) -> None:
        self.reads += 1
        if self.first is None:
            self.first = verdict
        if verdict == "fail" and self.failed_at is None:
            self.failed_at = self.reads
        self.last = verdict


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal integer shares."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _exp(i: Interval | None) -> Interval | None:
    """A log-ratio interval as an increase (ratio - 1)."""
    if i is None:
        return None
    return Interval(math.exp(i.estimate) - 1, math.exp(i.low) - 1, math.exp(i.high) - 1)


def bake_rates(readings: list[Reading]) -> dict[str, float]:
    """Shares of bakes: failed at the first reading, at any (a rollback), the last verdict
    of those never failed (pass: only ever taken at the bake's end)."""
    n = len(readings)
    return {
        "first_fail": sum(r.first == "fail" for r in readings) / n,
        "bake_fail": sum(r.failed_at is not None for r in readings) / n,
        "end_pass": sum(r.failed_at is None and r.last == "pass" for r in readings) / n,
        "end_inconclusive": sum(
            r.failed_at is None and r.last == "inconclusive" for r in readings
        ) / n,
    }  # fmt: skip


def looked_rates(
    sim: Simulator,
    shape: Shape,
    regression: float,
    looks: int,
    growth: float,
    tolerances: tuple[float, ...],
    trials: int,
    label: str,
) -> list[dict[str, dict[str, float]]]:
    """Per tolerance, `bake_rates` of the corrected and the uncorrected readings."""
    got: list[tuple[list[Reading], list[Reading]]] = [([], []) for _ in tolerances]
    for t in range(trials):
        trial = sim.looked_trial(shape, regression, looks, growth, tolerances)
        for (seq, fixed), (a, b) in zip(got, trial, strict=True):
            seq.append(a)
            fixed.append(b)
        if (t + 1) % 50 == 0 or t + 1 == trials:
            print(f"  {label}, {looks} looks: {t + 1}/{trials}", file=sys.stderr, flush=True)
    return [{"sequential": bake_rates(seq), "uncorrected": bake_rates(fixed)} for seq, fixed in got]


def error_rate_bakes(
    rng: np.random.Generator, trials: int, looks: int, min_samples: int, rate: float
) -> dict[str, Any]:
    """The error-rate gate (Wilson interval) over bakes of independent inferences whose
    error rate is exactly the tolerance: read `looks` times as the inferences grow from
    `min_samples` to 64 times as many (geometric steps: every epoch read as densely).
    The share of bakes that ever fail, with the sequential correction and without."""
    ns = np.unique(np.round(min_samples * 64.0 ** (np.arange(looks) / (looks - 1))))
    steps = np.diff(np.concatenate([[0], ns])).astype(np.int64)
    seq = fixed = 0
    for _ in range(trials):
        errors = np.cumsum(rng.binomial(steps, rate))
        failed_seq = failed_fixed = False
        for n, e in zip(ns.tolist(), errors.tolist(), strict=True):
            n = int(n)
            if not failed_seq:
                spec = GateSpec(max_error_rate=rate, min_samples=min_samples)
                (v,) = evaluate_gates(spec, CohortStats(1, n, int(e)), CohortStats())
                failed_seq = v.verdict == "fail"
            if not failed_fixed:
                i = wilson_interval(int(e), n)
                failed_fixed = i is not None and decide(i, rate, lower_is_better=True) == "fail"
        seq += failed_seq
        fixed += failed_fixed
    return {
        "trials": trials,
        "looks": len(ns),
        "rate": rate,
        "sequential": seq / trials,
        "uncorrected": fixed / trials,
    }


def rates(
    sim: Simulator,
    shape: Shape,
    regression: float,
    tolerances: tuple[float, ...],
    trials: int,
    label: str,
) -> list[dict[str, float]]:
    """Per tolerance, the share of trials that fail, pass and stay inconclusive."""
    counts = [Counter[str]() for _ in tolerances]
    for t in range(trials):
        for c, verdict in zip(counts, sim.trial(shape, regression, tolerances), strict=True):
            c[verdict] += 1
        if (t + 1) % 100 == 0 or t + 1 == trials:
            print(f"  {label}: {t + 1}/{trials} trials", file=sys.stderr, flush=True)
    return [{k: c[k] / trials for k in ("fail", "pass", "inconclusive")} for c in counts]


def devices_for_five_percent(sim: Simulator, shape: Shape, trials: int) -> dict[str, Any]:
    """Double the candidate devices (baseline 3x) until +5 % fails in >= 95 % of trials at
    tolerance 0, up to MAX_SEARCH_DEVICES candidate devices, `--min-samples` at the candidate
    cohort's size (the reading is a bake's first: epoch 0); past that, the estimate from
    the spread of the devices' log p95 the last step measured (normal approximation)."""
    k = shape.candidate_devices
    tried = []
    while True:
        s = replace(
            shape, candidate_devices=k, baseline_devices=3 * k, min_samples=k * shape.samples
        )
        (r,) = rates(sim, s, 0.05, (0.0,), trials, f"+5% at {k} candidate devices")
        tried.append({"candidate_devices": k, "detection": r["fail"]})
        if r["fail"] >= 0.95:
            return {
                "candidate_devices": k,
                "candidate_samples": k * shape.samples,
                "baseline_devices": 3 * k,
                "measured": True,
                "tried": tried,
            }
        if 2 * k > MAX_SEARCH_DEVICES:
            break
        k *= 2
    # (t + z) * s * sqrt(1/k + 1/(3k)) <= log 1.05, t and z near their normal values.
    spread = sim.device_spread_seen()
    t = NormalDist().inv_cdf(1 - epoch_tail(0)) + NormalDist().inv_cdf(0.95)
    need = math.ceil((t * spread / math.log(1.05)) ** 2 * (4 / 3))
    return {
        "candidate_devices": need,
        "candidate_samples": need * shape.samples,
        "baseline_devices": 3 * need,
        "measured": False,
        "device_log_p95_sd": spread,
        "tried": tried,
    }


MAX_SEARCH_DEVICES = 80  # 80 + 240 devices a trial: the machine is shared


PARTS = ("single", "bakes", "detection", "search")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    p.add_argument("--trials", type=int, default=500, help="trials, identical distributions")
    p.add_argument("--detection-trials", type=int, default=200, help="trials per regression")
    p.add_argument("--search-trials", type=int, default=100, help="trials per +5%% step")
    p.add_argument("--candidate-devices", type=int, default=20)
    p.add_argument("--baseline-devices", type=int, default=60)
    p.add_argument("--samples", type=int, default=100, help="inferences per device")
    p.add_argument("--min-samples", type=int, default=GateSpec().min_samples)
    p.add_argument("--median-ms", type=float, default=2.0)
    p.add_argument("--sigma", type=float, default=0.2, help="log-sd of a device's latencies")
    p.add_argument("--sigma-spread", type=float, default=0.1, help="log-sd of devices' sigma")
    p.add_argument("--device-spread", type=float, default=0.05, help="log-sd of device medians")
    p.add_argument("--tolerance", type=float, default=0.05, help="an operator's tolerance")
    p.add_argument("--looks", type=int, default=20, help="readings of a bake")
    p.add_argument("--growth", type=float, default=4.0, help="last reading's data / first's")
    p.add_argument("--error-trials", type=int, default=2000, help="error-rate gate bakes")
    p.add_argument("--error-looks", type=int, default=120, help="readings of each")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts takes some of {','.join(PARTS)}")
    if min(a.trials, a.detection_trials, a.search_trials, a.error_trials) < 1:
        p.error("trials must be at least 1")
    if a.samples < DEVICE_MIN_SAMPLES:
        p.error(f"--samples must be at least {DEVICE_MIN_SAMPLES} (a device's p95 counts from)")
    if a.looks < 2 or a.error_looks < 2 or a.growth <= 1:
        p.error("--looks and --error-looks must be at least 2, --growth over 1")
    shape = Shape(
        a.candidate_devices, a.baseline_devices, a.samples, a.median_ms, a.sigma,
        a.sigma_spread, a.device_spread, a.min_samples,
    )  # fmt: skip
    sim = Simulator(a.seed)
    tolerances = (0.0, a.tolerance)
    keys = ("tolerance_0", "tolerance")
    started = time.perf_counter()
    first = min(shape.candidate_devices, shape.baseline_devices) * shape.samples
    last = round(first * a.growth)
    report: dict[str, Any] = {
        "shape": asdict(shape),
        "default_min_samples": GateSpec().min_samples,
        "level": LEVEL,
        "bake_alpha": BAKE_ALPHA,
        "fail_level_first_reading": 1 - epoch_tail(look_epoch(first, shape.min_samples)),
        "tolerance": a.tolerance,
        "trials": a.trials,
        "detection_trials": a.detection_trials,
        "search_trials": a.search_trials,
        "looks": a.looks,
        "growth": a.growth,
        "epochs_of_a_bake": [
            look_epoch(first, shape.min_samples), look_epoch(last, shape.min_samples)
        ],
    }  # fmt: skip
    if "single" in parts:
        got = rates(sim, shape, 0.0, tolerances, a.trials, "identical")
        report["identical"] = dict(zip(keys, got, strict=True))
        report["regressions"] = {}
        for r in REGRESSIONS:
            got = rates(sim, shape, r, tolerances, a.detection_trials, f"+{r:.0%}")
            report["regressions"][f"+{r:.0%}"] = dict(zip(keys, got, strict=True))
    bakes = ((0.0,) if "bakes" in parts else ()) + (REGRESSIONS if "detection" in parts else ())
    if bakes:
        report["bakes"] = {}
        for r in bakes:
            name = "identical" if r == 0 else f"+{r:.0%}"
            n = a.trials if r == 0 else a.detection_trials
            got_looked = looked_rates(sim, shape, r, a.looks, a.growth, tolerances, n, name)
            report["bakes"][name] = {"trials": n, **dict(zip(keys, got_looked, strict=True))}
    if "bakes" in parts:
        report["error_rate_bakes"] = error_rate_bakes(
            sim.rng, a.error_trials, a.error_looks, shape.min_samples, 0.01
        )
    if "search" in parts:
        report["five_percent"] = devices_for_five_percent(sim, shape, a.search_trials)
    report["inferences"] = sim.calls
    report["seconds"] = round(time.perf_counter() - started, 1)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print_report(report, shape, a.tolerance)
    return 0


def print_report(report: dict[str, Any], shape: Shape, tolerance: float) -> None:
    print(
        f"{shape.candidate_devices} candidate + {shape.baseline_devices} baseline devices, "
        f"{shape.samples} inferences each ({shape.candidate_devices * shape.samples} a "
        f"candidate cohort; --min-samples {shape.min_samples}); log-normal "
        f"median {shape.median_ms} ms x exp(N(0, {shape.device_spread})) a device, sigma "
        f"{shape.sigma} x exp(N(0, {shape.sigma_spread})) a device; false-rollback budget "
        f"{BAKE_ALPHA:.2%} a bake, the first reading's fail bound one-sided "
        f"{report['fail_level_first_reading']:.3%}, the pass bound {(1 + LEVEL) / 2:.1%}"
    )

    def rate3(r: dict[str, float]) -> str:
        return f"{r['fail']:>6.1%} / {r['pass']:>6.1%} / {r['inconclusive']:>6.1%}"

    if "identical" in report:
        print(
            f"\none reading\n{'':<24}{'tolerance 0':<30}tolerance {tolerance:g}\n"
            f"{'condition (trials)':<24}{'fail / pass / inconclusive':<30}"
            "fail / pass / inconclusive"
        )
        rows = {f"identical ({report['trials']})": report["identical"]}
        for name, cols in report["regressions"].items():
            rows[f"{name} ({report['detection_trials']})"] = cols
        for name, cols in rows.items():
            print(f"{name:<24}{rate3(cols['tolerance_0'])}{'':<6}{rate3(cols['tolerance'])}")
    if "bakes" in report:
        e0, e1 = report["epochs_of_a_bake"]
        print(
            f"\na bake read {report['looks']} times, its data growing {report['growth']:g}-fold "
            f"(epochs {e0} to {e1}); rolled back on the first fail.\n"
            "first-reading fail / any-reading fail (rollback) / end pass / end inconclusive; "
            "[uncorrected: any-reading fail]"
        )
        for name, cols in report["bakes"].items():
            line = f"{name + ' (' + str(cols['trials']) + ')':<18}"
            for key, label in (("tolerance_0", "tol 0"), ("tolerance", f"tol {tolerance:g}")):
                s, u = cols[key]["sequential"], cols[key]["uncorrected"]
                line += (
                    f"  {label}: {s['first_fail']:>6.1%} / {s['bake_fail']:>6.1%} / "
                    f"{s['end_pass']:>6.1%} / {s['end_inconclusive']:>6.1%} "
                    f"[{u['bake_fail']:>6.1%}]"
                )
            print(line)
    if "error_rate_bakes" in report:
        e = report["error_rate_bakes"]
        print(
            f"error-rate gate, error rate at the tolerance ({e['rate']:g}), {e['looks']} "
            f"readings from --min-samples to 64x ({e['trials']} bakes): a bake fails "
            f"{e['sequential']:.2%} (uncorrected {e['uncorrected']:.2%})"
        )
    if "five_percent" in report:
        five = report["five_percent"]
        steps = ", ".join(f"{s['candidate_devices']}: {s['detection']:.1%}" for s in five["tried"])
        how = "measured" if five["measured"] else "estimated from the devices' spread"
        print(
            f"\n+5% detected in 95% of trials (tolerance 0, first reading) with "
            f"{five['candidate_devices']} candidate devices, {five['candidate_samples']} "
            f"inferences, against {five['baseline_devices']} ({how}; detection by "
            f"candidate devices: {steps})"
        )
    print(
        f"{report['inferences']} inferences through the agent's recorder in {report['seconds']} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
