"""Prometheus metrics of the controller (prometheus-client), on its own registry.

The registry carries the client library's process, platform and GC collectors
(a custom registry has none of them by default), `hotswap_build_info`, the
controller's counters and histograms, and three collectors that answer from
state kept as things change, never by reading every device at scrape time:

- `FleetVersions`: devices online per region and served model version ("what
  runs where"), followed one state or provisioning record at a time;
- `LiveRollouts`: progress, status and gate verdicts of the rollouts in memory
  (set when their retained status is published, dropped when they leave memory);
- `DeviceInference`: inferences, errors and latency per model version as the
  devices' telemetry windows report them (their fixed latency buckets are the
  histogram's buckets, so `histogram_quantile` works across the fleet).

`serve_metrics(port, host)` starts the HTTP exporter (I/O); the rest only counts.
See docs/observability.md for every metric and the default port's choice.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared import __version__
from shared.messages import (
    LATENCY_BUCKETS_MS,
    DeviceRecord,
    DeviceState,
    RolloutStatus,
    TelemetryWindow,
)

# Outside the 9100-9999 range the Prometheus wiki's "Default port allocations" hands
# out to exporters (9100 is node_exporter's, and the range is taken through 9999);
# the Prometheus docs advise applications' own endpoints to stay out of it.
# 19100: node_exporter's 9100 moved out of that range, easy to remember, no well-known
# service's, below the Linux ephemeral range (32768+). Scraped agents: 19101 by convention.
DEFAULT_PORT = 19100
# Loopback by default: the endpoint has no authentication and names the fleet's
# regions, models and rollouts; serving it to the network is a deliberate choice
# (`--metrics-host 0.0.0.0`, as compose.yaml does for its Prometheus).
DEFAULT_HOST = "127.0.0.1"

REGISTRY = CollectorRegistry()
for _default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    # The same collectors the default registry has (process_*, python_info, python_gc_*).
    REGISTRY.register(_default)

BUILD = Info("hotswap_build", "The running controller's version", registry=REGISTRY)
BUILD.info({"version": __version__, "component": "controller"})

MESSAGES = Counter(
    "hotswap_messages_total",
    "MQTT messages received by the controller, by topic kind and outcome",
    ["kind", "outcome"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "hotswap_commands_sent_total", "Commands published to devices", ["kind"], registry=REGISTRY
)
REQUESTS = Counter(
    "hotswap_requests_total", "Operator requests, by kind and result", ["kind", "ok"],
    registry=REGISTRY,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "hotswap_request_duration_seconds",
    "Time to answer one operator request, by kind",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
DROPPED = Counter(
    "hotswap_device_messages_dropped_total",
    "Device messages dropped, by reason: rate_limited, too_large (before parsing), malformed "
    "(fails the contract), identity_mismatch (payload names another device), identity_claim "
    "(contradicts the provisioned region/type; the rest of the state is kept), db_error "
    "(could not be stored), backlog (telemetry over the ingest queue's limit)",
    ["reason"],
    registry=REGISTRY,
)
INGEST_QUEUE = Gauge(
    "hotswap_ingest_queue", "Device messages checked and waiting to be applied", registry=REGISTRY
)
ROLLOUTS_STARTED = Counter(
    "hotswap_rollouts_started_total", "Rollouts that began, by strategy", ["strategy"],
    registry=REGISTRY,
)  # fmt: skip
ROLLOUTS = Counter(
    "hotswap_rollouts_finished_total",
    "Rollouts that ended, by status (Succeeded, Failed, RolledBack, Aborted: by the operator "
    "or superseded by a newer rollout)",
    ["status"],
    registry=REGISTRY,
)
OPEN_ROLLOUTS = Gauge("hotswap_rollouts_open", "Rollouts pending or in progress", registry=REGISTRY)
ROLLBACKS = Counter(
    "hotswap_rollbacks", "Rollouts that started rolling back (gate or failures)", registry=REGISTRY
)
_LONG = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
ROLLOUT_SECONDS = Histogram(
    "hotswap_rollout_duration_seconds",
    "From a rollout's creation to its end, by strategy and final status",
    ["strategy", "status"],
    buckets=_LONG,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "hotswap_stage_duration_seconds",
    "From a stage's start to the next stage or the rollout's end, by strategy",
    ["strategy"],
    buckets=_LONG,
    registry=REGISTRY,
)


def serve_metrics(port: int, host: str = DEFAULT_HOST) -> int:
    """Serve REGISTRY on http://host:port/metrics from a daemon thread (raises OSError);
    returns the port (port 0: a free one)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)


# ------------------------------------------------------------ what runs where


class StoredDevice(Protocol):
    """What `FleetVersions.load` reads of a device row (controller.db.DeviceRow)."""

    device_id: str
    region: str
    online: bool
    revoked: bool
    provisioned: bool
    active_name: str | None
    active_version: str | None


@dataclass(slots=True)
class _Device:
    region: str
    online: bool = False
    revoked: bool = False
    provisioned: bool = False
    model: str = ""
    version: str = ""

    @property
    def key(self) -> tuple[str, str, str] | None:
        """Where it counts: (region, model, version) while online and not revoked."""
        if not self.online or self.revoked:
            return None
        return (self.region, self.model, self.version)


class FleetVersions(Collector):
    """Devices online per region and active model version, kept change by change.

    Each state or provisioning record moves one device from one count to
    another, by the rules `controller.store.Store.upsert_devices` and
    `apply_records` apply to its row (a revoked device is never online; a last
    will keeps the model the device last said it serves; a provisioned region
    wins over the device's claim). `load` reads the rows once per MQTT session.
    A scrape costs one line per (region, model, version), whatever the fleet.
    """

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}
        self._counts: Tally[tuple[str, str, str]] = Tally()

    def load(self, rows: Iterable[StoredDevice]) -> None:
        self._devices.clear()
        self._counts.clear()
        for r in rows:
            device = _Device(
                r.region, r.online, r.revoked, r.provisioned, r.active_name or "",
                r.active_version or "",
            )  # fmt: skip
            self._devices[r.device_id] = device
            self._count(None, device.key)

    def apply_states(self, states: Iterable[DeviceState]) -> None:
        for st in states:
            device = self._devices.get(st.device_id)
            if device is None:
                device = self._devices[st.device_id] = _Device(st.region)
            before = device.key
            if not device.provisioned:
                device.region = st.region
            device.online = st.online and not device.revoked
            if st.online or st.active is not None:
                device.model = st.active.name if st.active else ""
                device.version = st.active.version if st.active else ""
            self._count(before, device.key)

    def apply_records(self, records: Iterable[DeviceRecord]) -> None:
        for rec in records:
            device = self._devices.get(rec.device_id)
            if device is None:
                if rec.revoked or rec.region is None or rec.device_type is None:
                    continue
                device = self._devices[rec.device_id] = _Device(rec.region)
            before = device.key
            if rec.region is not None and rec.device_type is not None:
                device.region, device.provisioned = rec.region, True
            device.revoked = rec.revoked
            if rec.revoked:
                device.online = False
            self._count(before, device.key)

    def _count(
        self, before: tuple[str, str, str] | None, after: tuple[str, str, str] | None
    ) -> None:
        if before == after:
            return
        if before is not None:
            self._counts[before] -= 1
            if self._counts[before] <= 0:
                del self._counts[before]
        if after is not None:
            self._counts[after] += 1

    @property
    def online(self) -> int:
        return sum(self._counts.values())

    def serving(self) -> dict[tuple[str, str, str], int]:
        """(region, model, version) -> devices online serving it ("" for no model)."""
        return dict(self._counts)

    def collect(self) -> Iterator[Metric]:
        counts = dict(self._counts)  # scrapes run in the exporter's thread
        online = GaugeMetricFamily(
            "hotswap_devices_online", "Devices online (revoked devices never are)"
        )
        online.add_metric([], sum(counts.values()))
        yield online
        serving = GaugeMetricFamily(
            "hotswap_devices_serving",
            "Devices online by region and the model version they serve (model and version "
            "empty: no model yet)",
            labels=["region", "model", "version"],
        )
        for (region, model, version), n in sorted(counts.items()):
            serving.add_metric([region, model, version], n)
        yield serving


# ------------------------------------------------------------ rollouts in memory


class LiveRollouts(Collector):
    """The last published status of each rollout the controller holds in memory:
    progress, status, stage and gate verdicts, labelled by rollout id. Bounded by
    what is in memory (open rollouts and those finished within the status refresh)."""

    def __init__(self) -> None:
        self._status: dict[str, RolloutStatus] = {}

    def update(self, status: RolloutStatus) -> None:
        self._status[status.rollout_id] = status

    def forget(self, rollout_id: str) -> None:
        self._status.pop(rollout_id, None)

    def clear(self) -> None:
        self._status.clear()

    def collect(self) -> Iterator[Metric]:
        statuses = list(self._status.values())
        info = GaugeMetricFamily(
            "hotswap_rollout_info",
            "1 per rollout in memory, naming its model version, strategy, status and stage",
            labels=["rollout_id", "model", "version", "strategy", "status", "stage"],
        )
        targeted = GaugeMetricFamily(
            "hotswap_rollout_devices_targeted", "Devices a rollout targets", labels=["rollout_id"]
        )
        updated = GaugeMetricFamily(
            "hotswap_rollout_devices_updated",
            "Devices of a rollout that activated its version",
            labels=["rollout_id"],
        )
        states = GaugeMetricFamily(
            "hotswap_rollout_devices",
            "Devices of a rollout per state (pending, sent, activated, failed, timed_out, …)",
            labels=["rollout_id", "state"],
        )
        gates = GaugeMetricFamily(
            "hotswap_rollout_gate",
            "1 per gate of a rollout's current stage, labelled with its verdict (pass, fail, "
            "inconclusive, not_applicable)",
            labels=["rollout_id", "gate", "verdict"],
        )
        for s in statuses:
            rid = s.rollout_id
            info.add_metric([rid, s.model, s.version, s.strategy, s.status, s.stage], 1)
            targeted.add_metric([rid], s.devices_targeted)
            updated.add_metric([rid], s.devices_updated)
            for state, n in sorted(s.device_states.items()):
                states.add_metric([rid, state], n)
            for g in s.gates:
                gates.add_metric([rid, g.gate, g.verdict], 1)
        yield from (info, targeted, updated, states, gates)


# ------------------------------------------------------------ inference, per model version


@dataclass(slots=True)
class _Served:
    count: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    latency_ms_total: float = 0.0


class DeviceInference(Collector):
    """Inferences, errors and latency per model version, summed from the devices'
    telemetry windows as they arrive (one window: a few additions)."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, str, bool], _Served] = {}

    def add(self, window: TelemetryWindow) -> None:
        key = (window.model.name, window.model.version, window.shadow)
        served = self._by_version.get(key)
        if served is None:
            served = self._by_version[key] = _Served()
        served.count += window.count
        served.errors += window.errors
        for i, n in enumerate(window.latency_ms.counts):
            served.latency[i] += n
        served.latency_ms_total += window.latency_ms.total

    def collect(self) -> Iterator[Metric]:
        items = sorted(self._by_version.items())
        labels = ["model", "version", "shadow"]
        count = _counter(
            "hotswap_device_inferences", "Inferences the devices reported, per model version "
            "(shadow: mirrored to a candidate, not served)", labels,
        )  # fmt: skip
        errors = _counter(
            "hotswap_device_inference_errors", "Failed inferences the devices reported", labels
        )
        latency = HistogramMetricFamily(
            "hotswap_device_inference_latency_seconds",
            "Inference latency the devices reported (their telemetry's fixed buckets)",
            labels=labels,
        )
        for (model, version, shadow), s in items:
            values = [model, version, str(shadow).lower()]
            count.add_metric(values, s.count)
            errors.add_metric(values, s.errors)
            buckets, seen = [], 0
            for bound, n in zip(LATENCY_BUCKETS_MS, s.latency, strict=True):
                seen += n
                le = "+Inf" if math.isinf(bound) else repr(bound / 1000)
                buckets.append((le, float(seen)))
            latency.add_metric(values, buckets, s.latency_ms_total / 1000)
        yield from (count, errors, latency)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


FLEET = FleetVersions()
LIVE_ROLLOUTS = LiveRollouts()
INFERENCE = DeviceInference()
for _collector in (FLEET, LIVE_ROLLOUTS, INFERENCE):
    REGISTRY.register(_collector)


# ------------------------------------------------------------ rollout lifetimes


class RolloutTimes(Protocol):
    """What the lifetime metrics read of a rollout row (controller.db.RolloutRow)."""

    strategy: str
    created_at: float
    stage_started_at: float | None


def rollout_started(rollout: RolloutTimes) -> None:
    ROLLOUTS_STARTED.labels(rollout.strategy).inc()


def stage_ended(rollout: RolloutTimes, now: float) -> None:
    """The current stage ends now (the next begins, or the rollout ends)."""
    if rollout.stage_started_at is not None:
        STAGE_SECONDS.labels(rollout.strategy).observe(max(0.0, now - rollout.stage_started_at))


def rollout_finished(rollout: RolloutTimes, status: str, now: float) -> None:
    """A rollout ended with `status` (`rollout` as it was before it ended)."""
    ROLLOUTS.labels(status).inc()
    ROLLOUT_SECONDS.labels(rollout.strategy, status).observe(max(0.0, now - rollout.created_at))
    stage_ended(rollout, now)
