"""Prometheus metrics of one edge agent, for gateways that are scraped (`--metrics-port`).

Off by default: a device reports to the controller through its telemetry
windows, and most devices are not reachable by a Prometheus. When on, the
agent counts its own inferences, errors and latency (each call, on the
runtime's observer: a counter and a histogram, a few microseconds), the
commands it carried out, its model swaps, and exposes the active model as an
info-style gauge. Its own registry, with the process and platform collectors
and `hotswap_build_info`. `serve(port, host)` starts the HTTP exporter (I/O).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import __version__
from shared.messages import LATENCY_BUCKETS_MS, DeviceEvent, ModelRef

# By convention next to the controller's 19100 (controller.metrics.DEFAULT_PORT): a
# gateway that runs both serves both.
SUGGESTED_PORT = 19101
_BUCKETS_S = tuple(b / 1000 if math.isfinite(b) else math.inf for b in LATENCY_BUCKETS_MS)

Observer = Callable[[ModelRef, float, tuple[np.ndarray, ...] | None, tuple[np.ndarray, ...]], None]


class _ActiveModel(Collector):
    def __init__(self, active: Callable[[], ModelRef | None]) -> None:
        self._active = active

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "hotswap_agent_active_model",
            "1 for the model version this agent serves (none while it has no model)",
            labels=["model", "version", "sha256"],
        )
        ref = self._active()
        if ref is not None:
            family.add_metric([ref.name, ref.version, ref.sha256], 1)
        yield family


class AgentMetrics:
    """One agent's metrics on a registry of their own (several agents may share a
    process in tests and simulations)."""

    def __init__(self, device_id: str) -> None:
        self.registry = CollectorRegistry()
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(default)
        Info("hotswap_build", "The running agent's version", registry=self.registry).info(
            {"version": __version__, "component": "agent", "device_id": device_id}
        )
        labels = ["model", "version"]
        self.inferences = Counter(
            "hotswap_agent_inferences", "Inferences served, per model version", labels,
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "hotswap_agent_inference_errors",
            "Inferences that failed or gave unsound outputs, per model version",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "hotswap_agent_inference_latency_seconds",
            "Inference latency, per model version (the telemetry windows' buckets)",
            labels,
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.commands = Counter(
            "hotswap_agent_commands",
            "Commands carried out, by kind and final phase (activated, rolled_back, failed)",
            ["kind", "phase"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "hotswap_agent_swaps",
            "Active-model swaps: to a candidate, or back to the previous model",
            ["to"],
            registry=self.registry,
        )
        self._active: Callable[[], ModelRef | None] = lambda: None
        self.registry.register(_ActiveModel(lambda: self._active()))

    def follow(self, active: Callable[[], ModelRef | None]) -> None:
        """Where the active model is read at scrape time."""
        self._active = active

    def observing(self, inner: Observer) -> Observer:
        """The runtime's observer, counting each call before `inner` sees it."""
        inferences, errors, latency = self.inferences, self.errors, self.latency

        def observe(
            ref: ModelRef,
            latency_ms: float,
            outputs: tuple[np.ndarray, ...] | None,
            inputs: tuple[np.ndarray, ...],
        ) -> None:
            inferences.labels(ref.name, ref.version).inc()
            if outputs is None:
                errors.labels(ref.name, ref.version).inc()
            else:
                latency.labels(ref.name, ref.version).observe(latency_ms / 1000)
            inner(ref, latency_ms, outputs, inputs)

        return observe

    def command_done(self, kind: str, final: DeviceEvent) -> None:
        """A command's final event: counted, and the swaps it made."""
        self.commands.labels(kind, final.phase).inc()
        if final.detail == "already active":
            return
        if final.phase == "activated":
            self.swaps.labels("candidate").inc()
        elif final.phase == "rolled_back":
            if final.reason == "unhealthy":  # swapped in, judged, swapped back
                self.swaps.labels("candidate").inc()
            self.swaps.labels("previous").inc()

    def serve(self, port: int, host: str) -> int:
        """Serve the registry on http://host:port/metrics (daemon thread; raises OSError);
        returns the port (port 0: a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
