"""Gate benchmark: how often the latency gate rolls back a healthy candidate, and how often
it catches a slower one, on simulated cohorts run through the real telemetry and gate code.

    python bench/gates.py              # the full report (docs/gates.md has its figures)
    python bench/gates.py --json       # one JSON object on stdout
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
`max_latency_increase` verdict.

Reported, per condition, the share of trials that `fail` (a rollback), `pass`
and stay `inconclusive`:

* identical candidate and baseline (`--trials`, 500 by default): the
  false-rollback rate, at tolerance 0 (any increase we are confident of fails; the
  strictest setting) and at `--tolerance`;
* +5 %, +10 %, +20 %, +50 % regressions (`--detection-trials` each) at tolerance 0
  (the detection rate) and at `--tolerance`;
* an identical candidate read `--looks` times as its windows arrive (`--samples`
  more calls a device each time), rolled back on the first `fail`, as the
  controller does during a bake (`--detection-trials` trials);
* how many candidate devices (at `--samples` each, the baseline three times as
  many) a +5 % regression needs to be detected in 95 % of trials at tolerance 0:
  the device-to-device spread, not the samples per device, is what limits it.

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
from typing import Any

import numpy as np

from controller.gates import DEVICE_MIN_SAMPLES, LEVEL, CohortStats, evaluate_gates
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

    def looked_trial(self, shape: Shape, looks: int, tolerances: tuple[float, ...]) -> list[str]:
        """An identical candidate read `looks` times as its windows arrive (the controller
        re-reads the gates on new telemetry and rolls back on the first `fail`): per
        tolerance, `fail` if any reading failed, else the last reading's verdict."""
        sides = []
        both = ((CANDIDATE, shape.candidate_devices), (BASELINE, shape.baseline_devices))
        for ref, devices in both:
            per_device = []
            for _ in range(devices):
                median = shape.median_ms * math.exp(self.rng.normal(0.0, shape.device_spread))
                sigma = shape.sigma * math.exp(self.rng.normal(0.0, shape.sigma_spread))
                lat = self.rng.lognormal(math.log(median), sigma, shape.samples * looks)
                recorder = TelemetryRecorder("bench-device", self.now)
                recorder.register(ref, SIGNATURE, TASK)
                windows = []
                for chunk in np.array_split(lat, looks):
                    for i, ms in enumerate(chunk.tolist()):
                        recorder.observe(ref, ms, self.outputs[i % 16], self.x)
                    (w,) = recorder.drain(self.now)
                    stats = CohortStats(0, w.count, w.errors, w.latency_ms, w.confidence)
                    windows.append(Rollup.of_window(stats, w))
                self.calls += len(lat)
                per_device.append(windows)
            sides.append(per_device)
        totals = [[Rollup() for _ in side] for side in sides]
        out = ["pass" for _ in tolerances]
        for look in range(looks):
            for side, total in zip(sides, totals, strict=True):
                for windows, t in zip(side, total, strict=True):
                    t.add(windows[look])
            candidate, baseline = (cohort_stats(t) for t in totals)
            for k, tolerance in enumerate(tolerances):
                spec = GateSpec(max_latency_increase=tolerance, min_samples=1)
                (verdict,) = evaluate_gates(spec, candidate, baseline)
                if out[k] != "fail":
                    out[k] = verdict.verdict
        return out

    def trial(self, shape: Shape, regression: float, tolerances: tuple[float, ...]) -> list[str]:
        candidate = self.cohort(CANDIDATE, shape.candidate_devices, shape, 1.0 + regression)
        baseline = self.cohort(BASELINE, shape.baseline_devices, shape, 1.0)
        self.last = (candidate, baseline)
        out = []
        for tolerance in tolerances:
            spec = GateSpec(max_latency_increase=tolerance, min_samples=1)
            (verdict,) = evaluate_gates(spec, candidate, baseline)
            out.append(verdict.verdict)
        return out

    def device_spread_seen(self) -> float:
        """The pooled sd of the devices' log p95 in the last trial's two cohorts."""
        assert self.last is not None
        c, b = (x.device_p95 for x in self.last)
        return math.sqrt((c.squares + b.squares) / (c.devices + b.devices - 2))


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
    tolerance 0, up to MAX_SEARCH_DEVICES candidate devices; past that, the estimate from
    the spread of the devices' log p95 the last step measured (normal approximation)."""
    k = shape.candidate_devices
    tried = []
    while True:
        s = replace(shape, candidate_devices=k, baseline_devices=3 * k)
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
    need = math.ceil(((2.326 + 1.645) * spread / math.log(1.05)) ** 2 * (4 / 3))
    return {
        "candidate_devices": need,
        "candidate_samples": need * shape.samples,
        "baseline_devices": 3 * need,
        "measured": False,
        "device_log_p95_sd": spread,
        "tried": tried,
    }


MAX_SEARCH_DEVICES = 80  # 80 + 240 devices a trial: the machine is shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--trials", type=int, default=500, help="trials, identical distributions")
    p.add_argument("--detection-trials", type=int, default=200, help="trials per regression")
    p.add_argument("--search-trials", type=int, default=100, help="trials per +5%% step")
    p.add_argument("--candidate-devices", type=int, default=20)
    p.add_argument("--baseline-devices", type=int, default=60)
    p.add_argument("--samples", type=int, default=100, help="inferences per device")
    p.add_argument("--median-ms", type=float, default=2.0)
    p.add_argument("--sigma", type=float, default=0.2, help="log-sd of a device's latencies")
    p.add_argument("--sigma-spread", type=float, default=0.1, help="log-sd of devices' sigma")
    p.add_argument("--device-spread", type=float, default=0.05, help="log-sd of device medians")
    p.add_argument("--tolerance", type=float, default=0.05, help="an operator's tolerance")
    p.add_argument("--looks", type=int, default=5, help="readings of a bake (identical)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if min(a.trials, a.detection_trials, a.search_trials) < 1:
        p.error("trials must be at least 1")
    if a.samples < DEVICE_MIN_SAMPLES:
        p.error(f"--samples must be at least {DEVICE_MIN_SAMPLES} (a device's p95 counts from)")
    shape = Shape(
        a.candidate_devices, a.baseline_devices, a.samples, a.median_ms, a.sigma,
        a.sigma_spread, a.device_spread,
    )  # fmt: skip
    sim = Simulator(a.seed)
    tolerances = (0.0, a.tolerance)
    keys = ("tolerance_0", "tolerance")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "shape": asdict(shape),
        "default_min_samples": GateSpec().min_samples,
        "level": LEVEL,
        "tolerance": a.tolerance,
        "trials": a.trials,
        "detection_trials": a.detection_trials,
        "search_trials": a.search_trials,
    }
    got = rates(sim, shape, 0.0, tolerances, a.trials, "identical")
    report["identical"] = dict(zip(keys, got, strict=True))
    report["regressions"] = {}
    for r in REGRESSIONS:
        got = rates(sim, shape, r, tolerances, a.detection_trials, f"+{r:.0%}")
        report["regressions"][f"+{r:.0%}"] = dict(zip(keys, got, strict=True))
    counts = [Counter[str]() for _ in tolerances]
    for t in range(a.detection_trials):
        for c, verdict in zip(counts, sim.looked_trial(shape, a.looks, tolerances), strict=True):
            c[verdict] += 1
        if (t + 1) % 50 == 0:
            print(f"  identical, {a.looks} looks: {t + 1}/{a.detection_trials}", file=sys.stderr)
    report["looks"] = a.looks
    n = a.detection_trials
    looked = [{k: c[k] / n for k in ("fail", "pass", "inconclusive")} for c in counts]
    report["identical_looked"] = dict(zip(keys, looked, strict=True))
    report["five_percent"] = devices_for_five_percent(sim, shape, a.search_trials)
    report["inferences"] = sim.calls
    report["seconds"] = round(time.perf_counter() - started, 1)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{shape.candidate_devices} candidate + {shape.baseline_devices} baseline devices, "
        f"{shape.samples} inferences each ({shape.candidate_devices * shape.samples} a "
        f"candidate cohort; default --min-samples {GateSpec().min_samples}); log-normal "
        f"median {shape.median_ms} ms x exp(N(0, {shape.device_spread})) a device, sigma "
        f"{shape.sigma} x exp(N(0, {shape.sigma_spread})) a device; {LEVEL:.0%} intervals"
    )
    print(
        f"{'':<24}{'tolerance 0':<30}tolerance {a.tolerance:g}\n"
        f"{'condition (trials)':<24}{'fail / pass / inconclusive':<30}fail / pass / inconclusive"
    )

    def row(name: str, cols: dict[str, dict[str, float]]) -> None:
        z, t = cols["tolerance_0"], cols["tolerance"]
        print(
            f"{name:<24}{z['fail']:>6.1%} / {z['pass']:>6.1%} / {z['inconclusive']:>6.1%}"
            f"{'':<6}{t['fail']:>6.1%} / {t['pass']:>6.1%} / {t['inconclusive']:>6.1%}"
        )

    row(f"identical ({a.trials})", report["identical"])
    row(f"identical x{a.looks} ({a.detection_trials})", report["identical_looked"])
    for name, cols in report["regressions"].items():
        row(f"{name} ({a.detection_trials})", cols)
    five = report["five_percent"]
    steps = ", ".join(f"{s['candidate_devices']}: {s['detection']:.1%}" for s in five["tried"])
    how = "measured" if five["measured"] else "estimated from the devices' spread"
    print(
        f"+5% detected in 95% of trials (tolerance 0) with {five['candidate_devices']} "
        f"candidate devices, {five['candidate_samples']} inferences, against "
        f"{five['baseline_devices']} ({how}; detection by candidate devices: {steps})"
    )
    print(f"{sim.calls} inferences through the agent's recorder in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
