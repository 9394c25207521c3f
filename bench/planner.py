"""Planner step cost against rollout size: a step costs what changed, not N.

For N devices with their deploys out, each round applies one device's answer
(`Progress.update`) and plans a step (`plan_next_actions`), as the controller
does per rollout that changed. Printed per N: microseconds per round and the
ratio to the smallest N (flat: about 1), and, as the baseline measured in the
same run, the cost of what a step did before `controller.progress`: reading the
rollout's N assignments again (`Progress.of` over all views, the same walk the
list-based planner made). No I/O but the printout.

    .venv/bin/python -m bench.planner [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from controller.planner import RolloutView, plan_next_actions
from controller.progress import AssignmentView, Progress
from controller.strategies import Stage

SIZES = (1_000, 10_000, 100_000)


def _rollout(n: int) -> tuple[list[Stage], Progress]:
    devices = tuple(f"d{i:06d}" for i in range(n))
    stages = [Stage("canary", devices[: n // 10], bake_s=60), Stage("rest", devices[n // 10 :])]
    views = [AssignmentView(d, "sent", 1_000.0 + i * 1e-3) for i, d in enumerate(devices)]
    return stages, Progress.of(stages, views)


def measure(n: int, rounds: int) -> dict[str, float]:
    stages, progress = _rollout(n)
    rollout = RolloutView("r-bench", "canary", "InProgress", device_timeout_s=600.0)
    canary = stages[0].devices
    t0 = time.perf_counter()
    for i in range(rounds):
        progress.update(AssignmentView(canary[i % len(canary)], "activated", 1_000.0))
        plan_next_actions(rollout, stages, progress, None, 1_001.0)
    step_us = (time.perf_counter() - t0) / rounds * 1e6
    views = list(progress.views.values())
    walks = max(3, rounds // (n // 1_000) // 20)
    t0 = time.perf_counter()
    for _ in range(walks):
        Progress.of(stages, views)
    walk_us = (time.perf_counter() - t0) / walks * 1e6
    return {"devices": n, "step_us": step_us, "walk_us": walk_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(n, args.rounds) for n in SIZES]
    base = rows[0]["step_us"]
    for r in rows:
        r["step_ratio_to_smallest"] = r["step_us"] / base
        r["walk_over_step"] = r["walk_us"] / r["step_us"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("devices   step (µs)  x smallest   re-read all (µs)  re-read/step")
    for r in rows:
        print(
            f"{r['devices']:>7,}  {r['step_us']:>10.1f}  {r['step_ratio_to_smallest']:>9.2f}"
            f"   {r['walk_us']:>16,.0f}  {r['walk_over_step']:>12,.0f}"
        )


if __name__ == "__main__":
    main()
