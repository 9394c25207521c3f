"""The gate benchmark runs end to end (few trials) and reports every figure.

Its rates are printed by the benchmark, not asserted here beyond what few trials
can show: a +50 % regression at 20 devices a side fails every trial."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_gate_benchmark_reports_every_condition() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gates.py"), "--json", "--trials", "4",
         "--detection-trials", "4", "--search-trials", "2", "--candidate-devices", "10",
         "--baseline-devices", "20", "--samples", "60", "--looks", "3", "--error-trials", "50", "--min-samples", "600"],
        capture_output=True, text=True, check=True, timeout=110,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert set(report["regressions"]) == {"+5%", "+10%", "+20%", "+50%"}
    for cols in (report["identical"], *report["regressions"].values()):
        for rates in cols.values():
            assert sum(rates.values()) == pytest.approx(1.0)
    assert report["regressions"]["+50%"]["tolerance_0"]["fail"] == 1.0
    assert report["identical"]["tolerance"]["fail"] == 0.0
    # Bakes of three readings: both bounds read the same data, and the sequential fail
    # bound is the wider one, so it never rolls back a bake the fixed one would not.
    assert set(report["bakes"]) == {"identical", "+5%", "+10%", "+20%", "+50%"}
    for condition in report["bakes"].values():
        for tolerance in ("tolerance_0", "tolerance"):
            seq, fixed = condition[tolerance]["sequential"], condition[tolerance]["uncorrected"]
            for rates in (seq, fixed):
                assert rates["first_fail"] <= rates["bake_fail"]
                ends = rates["bake_fail"] + rates["end_pass"] + rates["end_inconclusive"]
                assert ends == pytest.approx(1.0)
            assert seq["bake_fail"] <= fixed["bake_fail"]
    assert report["bakes"]["+50%"]["tolerance_0"]["sequential"]["bake_fail"] == 1.0
    errors = report["error_rate_bakes"]
    assert errors["looks"] > 1 and errors["sequential"] <= errors["uncorrected"]
    five = report["five_percent"]
    assert five["candidate_devices"] >= 10 and five["tried"]
    # Every call went through the agent's recorder: trials x devices x samples.
    assert report["inferences"] >= (4 + 4 * 4 + 4 * 3) * 30 * 60
