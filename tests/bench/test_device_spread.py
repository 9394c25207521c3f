"""bench/device_spread.py: a short run reports every loop's p95 and what it resolves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.device_spread import resolvable_increase

ROOT = Path(__file__).resolve().parents[2]


def test_resolvable_increase_is_the_tolerance_without_spread_and_grows_with_it() -> None:
    assert resolvable_increase(0.0, 6, 0.1) == pytest.approx(0.1)
    wider = [resolvable_increase(sd, 6, 0.1) for sd in (0.01, 0.05, 0.1)]
    assert wider == sorted(wider) and wider[0] > 0.1
    assert resolvable_increase(0.05, 20, 0.1) < resolvable_increase(0.05, 6, 0.1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_short_run_reports_each_loop(mode: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.device_spread", "--mode", mode, "--loops", "2",
         "--seconds", "1", "--hz", "100", "--side", "3", "--json"],
        capture_output=True, text=True, check=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["mode"] == mode and len(report["p95_ms"]) == 2
    assert all(v > 0 for v in report["p95_ms"]) and report["sd_log_p95"] >= 0
    assert report["resolvable_increase"] >= 0.1
