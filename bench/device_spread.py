"""How far apart identical devices' p95 latencies are on this machine.

The latency gate compares devices' p95 with a t interval over devices
(controller.gates): what it can resolve is set by the spread of the devices'
log p95, not by the calls per device. This runs N identical inference loops of
the same model at the same rate, as N agents would (threads of one process, as
tests/test_gates_e2e.py runs its agents, or N processes), and prints each loop's
p95, the standard deviation of their logs, and the smallest increase a canary of
`--side` devices against `--side` could tell from `--tolerance` at the gate's
first-reading fail bound with that spread.

    .venv/bin/python -m bench.device_spread --loops 12 --mode threads
    .venv/bin/python -m bench.device_spread --loops 12 --mode processes --json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
from scipy import stats

from controller.gates import epoch_tail
from shared.model_builder import build_dense_model
from shared.tflite import make_interpreter

HIDDEN = (1024, 1024)  # tests/test_gates_e2e.py's model: about 0.2 ms a call here
WARM_UP = 20


def inference_loop(seconds: float, hz: float) -> float:
    """Calls at `hz` for `seconds`; the p95 of their latencies (ms), warm-up left out."""
    interp = make_interpreter(build_dense_model(hidden=HIDDEN, seed=1))
    inp = interp.get_input_details()[0]
    x = np.ones(inp["shape"], np.float32)
    latencies: list[float] = []
    due = time.monotonic()
    end = due + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        latencies.append((time.perf_counter() - started) * 1000)
        due += 1 / hz
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
    return float(np.percentile(latencies[WARM_UP:], 95))


def _in_process(seconds: float, hz: float, out: Any) -> None:
    out.put(inference_loop(seconds, hz))


def run(mode: str, loops: int, seconds: float, hz: float) -> list[float]:
    if mode == "threads":
        # As the e2e fixture does: a short switch interval keeps one loop's Python out
        # of another's timed call.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        results: list[float] = []
        lock = threading.Lock()

        def one() -> None:
            p95 = inference_loop(seconds, hz)
            with lock:
                results.append(p95)

        threads = [threading.Thread(target=one) for _ in range(loops)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(switch)
        return results
    queue: Any = mp.get_context("spawn").Queue()
    procs = [
        mp.get_context("spawn").Process(target=_in_process, args=(seconds, hz, queue))
        for _ in range(loops)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return results


def resolvable_increase(sd_log: float, side: int, tolerance: float) -> float:
    """The smallest true increase whose estimate clears `tolerance` by the first-reading
    fail bound of a `side`-against-`side` pooled t interval with this spread."""
    df = 2 * side - 2
    half = float(stats.t.ppf(1 - epoch_tail(0), df)) * sd_log * math.sqrt(2 / side)
    return math.exp(math.log1p(tolerance) + half) - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("threads", "processes"), default="threads")
    ap.add_argument("--loops", type=int, default=12, help="identical devices")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--hz", type=float, default=200.0, help="calls a second, each loop")
    ap.add_argument("--side", type=int, default=6, help="devices a side of the canary")
    ap.add_argument("--tolerance", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.loops < 2 or args.side < 2:
        ap.error("--loops and --side must be at least 2")
    p95s = sorted(run(args.mode, args.loops, args.seconds, args.hz))
    sd_log = statistics.stdev(math.log(v) for v in p95s)
    report = {
        "mode": args.mode,
        "loops": args.loops,
        "hz": args.hz,
        "p95_ms": [round(v, 4) for v in p95s],
        "sd_log_p95": round(sd_log, 4),
        "side": args.side,
        "tolerance": args.tolerance,
        "first_fail_level": round(1 - epoch_tail(0), 6),
        "resolvable_increase": round(resolvable_increase(sd_log, args.side, args.tolerance), 4),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.loops} loops ({args.mode}) at {args.hz:g}/s: p95 {report['p95_ms']} ms; "
            f"sd of log p95 {sd_log:.3f}; a {args.side}-against-{args.side} canary fails "
            f"--max-latency-increase {args.tolerance:g} at its first reading only for an "
            f"increase above {report['resolvable_increase']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
