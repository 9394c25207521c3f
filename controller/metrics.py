"""Prometheus metrics of the controller (prometheus-client), on its own registry.

`serve_metrics(port)` starts the HTTP exporter (I/O); the rest only counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()

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
DEVICES_ONLINE = Gauge("hotswap_devices_online", "Devices online", registry=REGISTRY)
ROLLOUTS = Counter(
    "hotswap_rollouts_finished_total", "Rollouts that ended, by status", ["status"],
    registry=REGISTRY,
)  # fmt: skip
OPEN_ROLLOUTS = Gauge("hotswap_rollouts_open", "Rollouts pending or in progress", registry=REGISTRY)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped by Prometheus
    start_http_server(port, addr=addr, registry=REGISTRY)


ROLLBACKS = Counter(
    "hotswap_rollbacks", "Rollouts that started rolling back (gate or failures)", registry=REGISTRY
)
