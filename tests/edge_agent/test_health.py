"""The health judge on plain numbers: errors, non-finite outputs, slowdowns."""

from __future__ import annotations

from edge_agent.health import health_problem
from edge_agent.runtime import HealthSample

OLD = HealthSample(count=5, latencies_ms=(2.0, 2.1, 1.9, 2.0, 2.2))


def test_healthy_model_is_confirmed() -> None:
    """Similar latency, no errors: no problem."""
    new = HealthSample(count=5, latencies_ms=(2.5, 2.4, 2.6, 2.5, 2.3))
    assert health_problem(new, OLD, max_latency_factor=3) is None


def test_any_error_or_nonfinite_output_is_a_problem() -> None:
    """One failed call or one NaN output is enough to swap back."""
    assert "failed" in (
        health_problem(HealthSample(count=5, errors=1), OLD, max_latency_factor=3) or ""
    )
    assert "non-finite" in (
        health_problem(HealthSample(count=5, nonfinite=2), OLD, max_latency_factor=3) or ""
    )


def test_much_slower_model_is_a_problem_but_tiny_timings_are_not_judged() -> None:
    """Over the factor and above 1 ms is unhealthy; sub-millisecond noise is not."""
    slow = HealthSample(count=5, latencies_ms=(9.0, 9.5, 10.0, 9.8, 9.1))
    assert "median latency" in (health_problem(slow, OLD, max_latency_factor=3) or "")
    tiny_old = HealthSample(count=3, latencies_ms=(0.01, 0.01, 0.01))
    tiny_new = HealthSample(count=3, latencies_ms=(0.5, 0.5, 0.5))
    assert health_problem(tiny_new, tiny_old, max_latency_factor=3) is None


def test_first_model_has_no_baseline_to_compare() -> None:
    """Without a previous model only errors count."""
    slow = HealthSample(count=5, latencies_ms=(50.0,) * 5)
    assert health_problem(slow, None, max_latency_factor=3) is None
