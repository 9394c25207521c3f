"""Hostile device input and a corrupt rollout row (issue 10, item 2), against real processes.

A provisioned device (its own broker identity, its own telemetry topic)
publishes telemetry windows that are valid JSON but break the contract in one
field; a real agent sends a histogram with the wrong number of buckets in the
middle of a gated canary; a test edits an open rollout's row in the
controller's SQLite file. The controller is a real `hotswap controller run`
process; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import Mosquitto
from edge_agent.agent import Agent
from shared import topics
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    Histogram,
    ModelRef,
    TelemetryWindow,
)
from shared.mqtt import make_client
from tests.conftest import KeyPair, device_endpoint
from tests.faults.conftest import (
    ControllerProcess,
    devices_online,
    eventually,
    final_rollout,
    make_agents,
    push,
    start_rollout,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEVICES = (
    ("cam-1", "eu-west", "camera"),
    ("cam-2", "eu-west", "camera"),
    ("gw-1", "us-east", "gateway"),
)
IDS = tuple(d[0] for d in DEVICES)
HOSTILE = "cam-9"  # provisioned, but no agent: the test speaks for it
MODEL = ModelRef(name="clf", version="1.0.0", sha256="0" * 64)


def valid_window(device_id: str, model: ModelRef = MODEL) -> dict[str, Any]:
    """A telemetry window as an agent sends it (camelCase JSON), fit for every check."""
    end = datetime.now(UTC)
    window = TelemetryWindow(
        device_id=device_id,
        model=model,
        window_start=end - timedelta(seconds=1),
        window_end=end,
        count=100,
        errors=0,
        latency_ms=Histogram(
            counts=(0,) * 4 + (100,) + (0,) * (len(LATENCY_BUCKETS_MS) - 5), total=80.0
        ),
        confidence=Histogram(counts=(0,) * (len(CONFIDENCE_BUCKETS) - 1) + (100,), total=95.0),
    )
    return dict(json.loads(window.to_wire()))


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def breaks(window: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = window
        for key in parents:
            target = target[key]
        target[leaf] = value

    return breaks


def _negative_bucket(window: dict[str, Any]) -> None:
    window["latencyMs"]["counts"][4] = -5


# One broken field each; json.dumps writes inf and nan as the raw tokens Infinity and NaN.
BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "latency_counts_of_three_buckets": _set("latencyMs.counts", [5, 5, 5]),
    "latency_total_infinity": _set("latencyMs.total", math.inf),
    "latency_total_negative": _set("latencyMs.total", -1.0),
    "latency_total_nan": _set("latencyMs.total", math.nan),
    "negative_bucket_count": _negative_bucket,
    "count_of_10_to_the_30": _set("count", 10**30),
}


def hostile_payload(device_id: str, breakage: str, model: ModelRef = MODEL) -> bytes:
    window = valid_window(device_id, model)
    BREAKAGES[breakage](window)
    return json.dumps(window).encode()


def sql(controller: ControllerProcess, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on the controller's SQLite file (committed), its rows."""
    with contextlib.closing(sqlite3.connect(controller.db_path, timeout=10)) as db, db:
        return db.execute(statement, params).fetchall()


def telemetry_rows(controller: ControllerProcess, device_id: str) -> int:
    """What was stored of the hostile window, read straight from the SQLite file: the
    fleet's minutes of its model version, and any rollup of the device."""
    (minutes,) = sql(
        controller,
        "SELECT count(*) FROM telemetry_minutes WHERE model = ? AND version = ?",
        MODEL.name,
        MODEL.version,
    )
    (rollups,) = sql(
        controller, "SELECT count(*) FROM telemetry_rollups WHERE device_id = ?", device_id
    )
    return int(minutes[0]) + int(rollups[0])


def malformed_dropped(controller: ControllerProcess) -> float:
    return controller.metric("hotswap_device_messages_dropped_total", reason="malformed")


def tracebacks(controller: ControllerProcess) -> int:
    return controller.log_text().count("Traceback")


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
async def test_hostile_telemetry_window_is_refused_counted_and_never_stored(
    controller: ControllerProcess, mosquitto: Mosquitto, breakage: str
) -> None:
    """A window that breaks one field of the contract: counted as malformed, no row, no
    traceback, the controller keeps answering."""
    endpoint = device_endpoint(mosquitto, HOSTILE)
    async with make_client(endpoint, identifier=HOSTILE) as device:
        await device.publish(
            topics.device_telemetry(HOSTILE), hostile_payload(HOSTILE, breakage), qos=1
        )

    def handled() -> bool:
        # Whatever today's controller does with it, we wait until it has done it.
        return (
            not controller.alive()
            or malformed_dropped(controller) >= 1
            or telemetry_rows(controller, HOSTILE) > 0
            or tracebacks(controller) > 0
        )

    await eventually(handled, within_s=10)
    await asyncio.sleep(0.5)
    assert controller.alive(), controller.log_text()[-3000:]
    assert telemetry_rows(controller, HOSTILE) == 0, "the hostile window was stored"
    assert tracebacks(controller) == 0, controller.log_text()[-3000:]
    assert malformed_dropped(controller) == 1, controller.metrics_text()
    r = await controller.cli("device", "list", "--json")
    assert r.code == 0, r.err


async def publish_as(agent: Agent, payload: bytes) -> None:
    """Publish on the agent's own telemetry topic through its own live MQTT session."""
    # The device itself says it, on its own connection (a private attribute of the agent).
    client = agent._client
    assert client is not None, f"{agent.config.device_id} is not connected"
    await client.publish(topics.device_telemetry(agent.config.device_id), payload, qos=1)


async def test_histogram_with_wrong_bucket_count_during_a_gated_canary_cannot_crash_the_controller(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Every device sends `latencyMs.counts=[5,5,5]` mid-canary: not stored, the canary
    succeeds, and the controller survives a restart."""
    for name, data in (("v1", model_v1), ("v2", model_v2)):
        (tmp_path / f"{name}.tflite").write_bytes(data)
    async with make_agents(mosquitto, tmp_path, signing_keys, DEVICES) as agents:
        await devices_online(controller, len(DEVICES))
        await push(controller.cli, tmp_path / "v1.tflite", "clf", "1.0.0")
        await push(controller.cli, tmp_path / "v2.tflite", "clf", "2.0.0")
        devices = ",".join(IDS)
        first = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", devices
        )
        assert (await final_rollout(controller, first))["status"] == "Succeeded"

        canary = await start_rollout(
            controller, "--model", "clf", "--version", "2.0.0", "--strategy", "canary",
            "--canary-percent", "34", "--canary-duration", "3s",
            # Zero tolerance: passes on no error in 20 calls (1 % needs some 700 to show).
            "--max-error-rate", "0", "--min-samples", "20", "--devices", devices,
        )  # fmt: skip
        # From every device, for the version it serves: whichever cohort it is in merges it.
        for agent in agents:
            assert agent.active is not None
            bad = hostile_payload(
                agent.config.device_id, "latency_counts_of_three_buckets", agent.active
            )
            await publish_as(agent, bad)
        status = await final_rollout(controller, canary)
        assert status["status"] == "Succeeded", status
        assert status["devicesUpdated"] == len(DEVICES), status

    three_buckets = '%"l":[5,5,5]%'
    for query in (
        "SELECT count(*) FROM telemetry_minutes WHERE data LIKE ?",
        "SELECT count(*) FROM telemetry_rollups WHERE data LIKE ?",
    ):
        assert sql(controller, query, three_buckets) == [(0,)], query
    assert malformed_dropped(controller) >= len(DEVICES), controller.metrics_text()

    assert await controller.terminate() == 0
    await controller.start()
    await controller.wait_connected(times=2)
    await asyncio.sleep(3)
    assert controller.alive(), controller.log_text()[-3000:]
    assert (await controller.cli("device", "list", "--json")).code == 0


async def test_corrupt_open_rollout_row_is_marked_and_every_other_rollout_keeps_going(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model_v1: bytes,
) -> None:
    """An open rollout's spec broken in the database, found when the controller starts:
    that rollout is marked `controller error`, a new rollout still succeeds and requests
    are answered."""
    path = tmp_path / "v1.tflite"
    path.write_bytes(model_v1)
    async with make_agents(mosquitto, tmp_path, signing_keys, DEVICES) as agents:
        await devices_online(controller, len(DEVICES))
        await push(controller.cli, path, "clf", "1.0.0")
        # A canary that stays open: its bake outlasts the test.
        broken = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--strategy", "canary",
            "--canary-percent", "50", "--canary-duration", "10m", "--devices", "cam-1,cam-2",
        )  # fmt: skip
        sql(controller, "UPDATE rollouts SET spec = '{broken' WHERE rollout_id = ?", broken)
        # The controller reads a rollout's rows when it (re)loads them: on start.
        assert await controller.terminate() == 0
        await controller.start()
        await controller.wait_connected(times=2)

        def marked() -> bool:
            assert controller.alive(), controller.log_text()[-3000:]
            [(reason,)] = sql(
                controller, "SELECT reason FROM rollouts WHERE rollout_id = ?", broken
            )
            return bool(reason) and str(reason).startswith("controller error")

        await eventually(marked, within_s=15)
        failures = [e for e in controller.events("rollout_step_failed") if e.get("rollout_id")]
        assert broken in {e["rollout_id"] for e in failures}, controller.log_text()[-3000:]

        other = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", "gw-1"
        )
        status = await final_rollout(controller, other)
        assert status["status"] == "Succeeded", status
        assert agents[2].active is not None and agents[2].active.version == "1.0.0"
    assert controller.alive(), controller.log_text()[-3000:]
    assert (await controller.cli("device", "list", "--json")).code == 0
