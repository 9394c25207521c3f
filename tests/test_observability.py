"""Metrics end to end: a real mosquitto, moto's S3, the controller and two agents with
real interpreters under load, a direct rollout and a gated canary; then the
controller's and an agent's endpoints are scraped over HTTP.

Proves: both expositions pass `promtool check metrics`; every metric the Grafana
dashboard (docs/grafana/dashboards/hotswap.json) queries is in the controller's
exposition; "what runs where", rollout progress, gate verdicts and per-version
device latency carry what happened; an agent's `--metrics-port` counts its own
inferences, swaps and active model.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import Mosquitto
from controller import metrics
from controller.artifacts import ArtifactStore
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller
from edge_agent.agent import Agent
from edge_agent.metrics import AgentMetrics
from shared.messages import GateSpec, ListDevices, RolloutStatus, StartRollout
from shared.model_builder import build_dense_model
from tests.conftest import (
    S3,
    KeyPair,
    controller_config,
    fleet_agent_config,
    running_task,
)
from tests.controller.test_metrics import check_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "dashboards" / "hotswap.json"
DEVICES = (("gw-1", "eu-west", "gateway"), ("gw-2", "us-east", "gateway"))
# Series Prometheus itself adds when it scrapes (not in any exposition).
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# PromQL words that look like metric names.
PROMQL = {
    "sum", "by", "on", "rate", "increase", "histogram_quantile", "le", "model", "version",
    "shadow", "kind", "ok", "reason", "status", "strategy", "rollout_id", "outcome",
}  # fmt: skip


@dataclass
class Scraped:
    controller: str
    agent: str
    canary: RolloutStatus  # the gated canary's final status


def dashboard_metrics() -> set[str]:
    """Every metric name a panel of the dashboard queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", target["expr"])  # labels, ranges
            names |= {
                w
                for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
                if w not in PROMQL and not w.startswith("__")
            }
    return names


def declared(text: str) -> set[str]:
    """The sample names each `# TYPE` line of an exposition promises."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names |= {name + suffix for suffix in suffixes}
    return names


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture
async def scraped(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> AsyncIterator[Scraped]:
    endpoint = mosquitto.endpoint("operator")
    controller = Controller(controller_config(mosquitto, s3, tmp_path))
    port = metrics.serve_metrics(0)
    agent_metrics = AgentMetrics("gw-1")
    agent_port = agent_metrics.serve(0, "127.0.0.1")
    agents = [
        Agent(
            fleet_agent_config(
                mosquitto,
                signing_keys,
                tmp_path / device_id,
                device_id,
                region,
                device_type,
                workload_hz=100.0,
                telemetry_interval_s=0.3,
                max_latency_factor=1e6,
            ),
            metrics=agent_metrics if device_id == "gw-1" else None,
        )
        for device_id, region, device_type in DEVICES
    ]
    artifacts = ArtifactStore(s3.endpoint, s3.bucket)
    async with running_task(controller.run(), controller.connected):
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            async with OperatorClient(endpoint, timeout=15) as op:
                async with asyncio.timeout(20):
                    while sum(d["online"] for d in await op.request(ListDevices())) < 2:
                        await asyncio.sleep(0.2)
                for version, data in (("1.0.0", model_v1), ("2.0.0", build_dense_model(seed=9))):
                    await push_model(
                        data, name="clf", version=version, signing_key=signing_keys.private_path,
                        endpoint=endpoint, artifacts=artifacts,
                    )  # fmt: skip
                ids = tuple(d[0] for d in DEVICES)
                first = await op.request(StartRollout(model="clf", version="1.0.0", devices=ids))
                status = await read_rollout_status(endpoint, first["rolloutId"], wait_s=60)
                assert status.status == "Succeeded", status
                second = await op.request(
                    StartRollout(
                        model="clf", version="2.0.0", devices=ids, strategy="canary",
                        canary_percent=50, canary_duration_s=3,
                        gates=GateSpec(max_error_rate=0.5, min_samples=5),
                    )
                )  # fmt: skip
                canary = await read_rollout_status(endpoint, second["rolloutId"], wait_s=60)
                assert canary.status == "Succeeded", canary
            async with httpx.AsyncClient() as http:
                async with asyncio.timeout(10):  # v2's first telemetry windows
                    while not any(
                        labels.get("version") == "2.0.0"
                        for labels, _ in samples(
                            (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                        ).get("hotswap_device_inferences_total", [])
                    ):
                        await asyncio.sleep(0.2)
                yield Scraped(
                    (await http.get(f"http://127.0.0.1:{port}/metrics")).text,
                    (await http.get(f"http://127.0.0.1:{agent_port}/metrics")).text,
                    canary,
                )
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_metrics_of_a_real_rollout_pass_promtool_and_feed_the_dashboard(
    scraped: Scraped,
) -> None:
    """Both endpoints pass promtool; each metric the dashboard queries is exposed; the
    fleet, rollout, gate and latency series say what happened; the agent counts its own."""
    for text in (scraped.controller, scraped.agent):
        result = check_metrics(text.encode())
        assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    exposed = samples(scraped.controller)
    wanted = dashboard_metrics() - PROMETHEUS_OWN
    assert len(wanted) >= 20, sorted(wanted)
    assert sorted(wanted - declared(scraped.controller)) == []
    # With samples too, but for drops: none happen here (an earlier test in this process
    # may have dropped some; the family is declared either way).
    assert wanted - exposed.keys() <= {"hotswap_device_messages_dropped_total"}

    serving = {
        (labels["region"], labels["version"]): v for labels, v in exposed["hotswap_devices_serving"]
    }
    assert serving == {("eu-west", "2.0.0"): 1, ("us-east", "2.0.0"): 1}
    assert exposed["hotswap_devices_online"] == [({}, 2.0)]
    gates = {
        (labels["rollout_id"], labels["gate"], labels["verdict"])
        for labels, _ in exposed["hotswap_rollout_gate"]
    }
    said = {(scraped.canary.rollout_id, g.gate, g.verdict) for g in scraped.canary.gates}
    assert gates == said and {g for _, g, _ in said} == {"max_error_rate"}
    updated = {labels["rollout_id"]: v for labels, v in exposed["hotswap_rollout_devices_updated"]}
    assert sorted(updated.values()) == [2.0, 2.0]
    stages = [v for labels, v in exposed["hotswap_stage_duration_seconds_count"]]
    assert sum(stages) >= 2  # the canary's stage, then the rest of the fleet
    latency = {
        labels["version"]: v
        for labels, v in exposed["hotswap_device_inference_latency_seconds_count"]
    }
    assert latency.get("2.0.0", 0) > 0
    build = exposed["hotswap_build_info"][0][0]
    assert build["component"] == "controller"

    # gw-1's own endpoint: inferences on both versions, two swaps to a candidate, v2 active.
    exposed = samples(scraped.agent)
    counts = {labels["version"]: v for labels, v in exposed["hotswap_agent_inferences_total"]}
    assert counts.get("1.0.0", 0) > 0 and counts.get("2.0.0", 0) > 0
    assert exposed["hotswap_agent_swaps_total"] == [({"to": "candidate"}, 2.0)]
    active = exposed["hotswap_agent_active_model"]
    assert [(labels["model"], labels["version"]) for labels, _ in active] == [("clf", "2.0.0")]
    assert "process_resident_memory_bytes" in exposed
