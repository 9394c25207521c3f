"""Is a freshly swapped-in model fit to serve? A pure judgement on plain numbers.

The agent watches the new model's first live inferences (topped up with probe
inferences when traffic is thin) and compares them with the previous model's
recent ones: any error, any output (of all a model has) with a NaN/inf or of
another shape than its signature's, or a median latency many times the
previous model's, means swap back. No I/O.
"""

from __future__ import annotations

import statistics

from edge_agent.runtime import HealthSample

# Sub-millisecond medians are mostly Python overhead and scheduler noise.
MIN_JUDGED_LATENCY_MS = 1.0


def health_problem(
    new: HealthSample, old: HealthSample | None, *, max_latency_factor: float
) -> str | None:
    """Why `new` is unhealthy, or None when it may be confirmed."""
    if new.errors:
        return f"{new.errors} of {new.count} inferences failed"
    where = f" ({new.problem})" if new.problem else ""
    if new.nonfinite:
        return f"{new.nonfinite} of {new.count} inferences produced non-finite outputs{where}"
    if new.malformed:
        return (
            f"{new.malformed} of {new.count} inferences produced outputs of the wrong shape{where}"
        )
    if not new.latencies_ms or old is None or not old.latencies_ms:
        return None
    new_p50 = statistics.median(new.latencies_ms)
    old_p50 = statistics.median(old.latencies_ms)
    if new_p50 > MIN_JUDGED_LATENCY_MS and new_p50 > max_latency_factor * old_p50:
        return (
            f"median latency {new_p50:.2f} ms is over {max_latency_factor:g}x "
            f"the previous model's {old_p50:.2f} ms"
        )
    return None
