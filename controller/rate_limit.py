"""Per-device admission of inbound messages: a token bucket per device id. Pure, no I/O.

The controller reads every device's messages in one receive loop; one device
flooding its own topics (a bug, or a compromised device within its ACL) must
not starve the others. Each device id taken from the topic has a bucket of
`burst` tokens refilled at `rate_per_s`; a message without a token is dropped
before its payload is even parsed. Drops are reported at most once per
`report_every_s` per device, with the count since the last report, so a flood
cannot flood the log either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


class Admission(NamedTuple):
    allowed: bool
    report: int  # drops to log now (since the last report); 0: nothing to log


@dataclass
class _Bucket:
    tokens: float
    updated: float
    dropped: int = 0  # since the last report
    reported_at: float = -math.inf


class DeviceRateLimiter:
    """`admit(device_id, now)` for each inbound message; `now` is a monotonic clock."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        report_every_s: float = 1.0,
        max_devices: int = 100_000,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a device rate limit needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.report_every_s = report_every_s
        self.max_devices = max_devices
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, device_id: str, now: float) -> Admission:
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._forget_idle(now)
            bucket = self._buckets[device_id] = _Bucket(self.burst, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Admission(True, 0)
        bucket.dropped += 1
        if now - bucket.reported_at >= self.report_every_s:
            report, bucket.dropped, bucket.reported_at = bucket.dropped, 0, now
            return Admission(False, report)
        return Admission(False, 0)

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes no decision."""
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate_per_s >= self.burst
        ]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
