"""How a rollout's gates read for operators (`rollout status`, `--watch`): each gate's
estimate with its interval, what each side counted, and the comparison window."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from datetime import UTC, datetime

from controller.cli import _print_status
from controller.status import cohort_window, gate_line
from shared.messages import CohortSummary, GateVerdict, RolloutStatus

FAILING = GateVerdict(
    gate="max_latency_increase", verdict="fail", observed=0.312, threshold=0.1,
    detail="devices' p95, candidate / baseline - 1 (geometric means), t interval",
    low=0.24, high=0.389, level=0.99, samples=4162, baseline_samples=3644, devices=6,
    baseline_devices=6,
    method="devices' p95, candidate / baseline - 1 (geometric means), t interval",
)  # fmt: skip


def test_a_gate_line_shows_estimate_interval_and_both_sides() -> None:
    line = gate_line(FAILING)
    assert line.startswith("max_latency_increase: fail, 0.312 [0.24, 0.389] (99% interval) vs 0.1")
    assert "candidate 4162 samples, 6 devices; baseline 3644 samples, 6 devices" in line
    assert line.endswith("t interval")


def test_a_gate_line_without_interval_or_verdict_says_why() -> None:
    short = GateVerdict(
        gate="max_latency_increase", verdict="inconclusive", threshold=0.1,
        detail="baseline 10 of 2000 samples", samples=2400, baseline_samples=10,
        devices=4, baseline_devices=0, method="devices' p95 ... t interval",
    )  # fmt: skip
    line = gate_line(short)
    assert "inconclusive, - vs 0.1" in line
    assert line.endswith("baseline 10 of 2000 samples (devices' p95 ... t interval)")
    unbounded = FAILING.model_copy(update={"verdict": "inconclusive", "high": None})
    assert "0.312 [0.24, unbounded] (99% interval)" in gate_line(unbounded)
    point = GateVerdict(gate="max_input_psi", verdict="pass", observed=0.02, threshold=0.2)
    assert gate_line(point) == "max_input_psi: pass, 0.02 vs 0.2"


def test_rollout_status_prints_the_window_and_each_gate() -> None:
    """What `hotswap rollout status` (and each `--watch` refresh) prints for the gates."""
    window = CohortSummary(
        devices=6, inferences=4162, quantiles="sketch",
        window_start=datetime(2026, 12, 7, 16, 18, 7, tzinfo=UTC),
        settle="each device's first window of a version in the stage ... left out",
    )  # fmt: skip
    assert cohort_window(window) == (
        "quantiles from sketch; compared from 16:18:07 UTC; "
        "settle: each device's first window of a version in the stage ... left out"
    )
    status = RolloutStatus(
        rollout_id="r-1", model="clf", version="2.0.0", strategy="canary", status="RolledBack",
        devices_targeted=12, devices_updated=6, gates=(FAILING,), candidate=window,
    )  # fmt: skip
    out = io.StringIO()
    with redirect_stdout(out):
        _print_status(status)
    text = out.getvalue()
    assert f"gate      {gate_line(FAILING)}" in text
    assert "window    quantiles from sketch; compared from 16:18:07 UTC" in text


def test_a_sequential_reading_states_each_bound_level() -> None:
    """A reading with a sequential fail bound names both one-sided levels: the fail bound's
    (low of a max_ gate, high of min_agreement) and the pass bound's; an older controller's
    verdict without `fail_level` still parses and prints as one interval."""
    seq = FAILING.model_copy(update={"fail_level": 0.9995060602662325})
    assert "[0.24, 0.389] (low 99.951%, high 99.5% one-sided) vs 0.1" in gate_line(seq)
    agree = GateVerdict(
        gate="min_agreement", verdict="fail", observed=0.86, threshold=0.9, low=0.83,
        high=0.888, level=0.99, fail_level=0.99999773,
    )  # fmt: skip
    assert "(low 99.5%, high 99.99977% one-sided)" in gate_line(agree)
    old = GateVerdict.model_validate_json(FAILING.model_dump_json(exclude={"fail_level"}))
    assert old.fail_level is None and "(99% interval)" in gate_line(old)
