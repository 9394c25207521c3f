"""The controller's per-device token buckets, on plain device ids and times."""

from __future__ import annotations

import pytest

from controller.rate_limit import DeviceRateLimiter


def test_a_burst_is_admitted_then_the_rate_refills() -> None:
    """`burst` messages pass at once, the next is dropped; 1/rate seconds later one more passes."""
    limiter = DeviceRateLimiter(rate_per_s=10, burst=5)
    assert [limiter.admit("d", 0.0).allowed for _ in range(6)] == [True] * 5 + [False]
    assert not limiter.admit("d", 0.05).allowed  # half a token
    assert limiter.admit("d", 0.15).allowed  # 1.5 tokens by now
    assert not limiter.admit("d", 0.15).allowed
    assert all(limiter.admit("d", 100.0).allowed for _ in range(5))  # refilled, capped at burst
    assert not limiter.admit("d", 100.0).allowed


def test_one_flooding_device_does_not_use_another_devices_tokens() -> None:
    """Device a spends its bucket ten times over; device b still gets its full burst."""
    limiter = DeviceRateLimiter(rate_per_s=1, burst=3)
    admitted = sum(limiter.admit("a", 0.0).allowed for _ in range(30))
    assert admitted == 3
    assert [limiter.admit("b", 0.0).allowed for _ in range(3)] == [True, True, True]


def test_drops_are_reported_at_most_once_per_interval_with_their_count() -> None:
    """The first drop reports 1; drops within the next second are counted, reported after it."""
    limiter = DeviceRateLimiter(rate_per_s=0.001, burst=1, report_every_s=1.0)
    assert limiter.admit("d", 0.0).allowed
    first = limiter.admit("d", 0.0)
    assert (first.allowed, first.report) == (False, 1)
    reports = [limiter.admit("d", 0.1 * i).report for i in range(1, 10)]
    assert reports == [0] * 9
    later = limiter.admit("d", 1.0)
    assert (later.allowed, later.report) == (False, 10)


def test_idle_buckets_are_forgotten_when_the_table_is_full() -> None:
    """At max_devices, refilled buckets are dropped; a busy one keeps its (empty) state."""
    limiter = DeviceRateLimiter(rate_per_s=1, burst=2, max_devices=3)
    for device in ("a", "b"):
        limiter.admit(device, 0.0)
    limiter.admit("busy", 10.0)
    limiter.admit("busy", 10.0)
    assert len(limiter) == 3
    limiter.admit("new", 10.0)  # a and b have refilled by now: forgotten
    assert len(limiter) == 2
    assert not limiter.admit("busy", 10.0).allowed


def test_nonsense_limits_are_refused() -> None:
    """A zero rate or a burst below one message would drop everything."""
    with pytest.raises(ValueError, match="rate"):
        DeviceRateLimiter(rate_per_s=0, burst=10)
    with pytest.raises(ValueError, match="burst"):
        DeviceRateLimiter(rate_per_s=1, burst=0)
