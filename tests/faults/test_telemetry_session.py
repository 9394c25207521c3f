"""The controller's telemetry and request sessions against real processes.

Telemetry comes in on a session apart from events and states (MQTT 3.1.1, so that
paho builds no MQTT 5 `Properties` for each window), and operator requests on a
third (so that a request does not wait behind every device answer queued before
it). These tests hold them to what the single session did: windows sent while
the controller is down (SIGKILL) are taken when it is back, and a persistent
session kept from a controller that subscribed to telemetry and requests on its
main session does not make every window count, or every request answered, twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import pytest

from broker.launcher import Mosquitto
from shared import topics
from shared.messages import Ping
from shared.mqtt import make_client, publish_properties
from tests.conftest import device_endpoint
from tests.faults.conftest import ControllerProcess, eventually
from tests.faults.test_hostile_input import HOSTILE, valid_window

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WINDOWS = 5


def accepted(controller: ControllerProcess) -> float:
    return controller.metric("hotswap_messages_total", kind="telemetry", outcome="accepted")


async def send_windows(mosquitto: Mosquitto, n: int = WINDOWS) -> None:
    """`n` valid windows from a provisioned device, on its own identity, QoS 1."""
    async with make_client(device_endpoint(mosquitto, HOSTILE), identifier=HOSTILE) as device:
        for _ in range(n):
            payload = json.dumps(valid_window(HOSTILE)).encode()
            await device.publish(topics.device_telemetry(HOSTILE), payload, qos=1)


async def test_windows_sent_while_the_controller_is_killed_are_taken_when_it_is_back(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    await send_windows(mosquitto)
    await eventually(lambda: accepted(controller) >= WINDOWS, within_s=15)
    await controller.kill()
    await send_windows(mosquitto)  # queued by the broker for the telemetry session
    await controller.start()
    await controller.wait_connected(times=2)
    # Each process counts from zero: the second one took what came while it was away.
    await eventually(lambda: accepted(controller) >= WINDOWS, within_s=15)
    await send_windows(mosquitto)
    await eventually(lambda: accepted(controller) >= 2 * WINDOWS, within_s=15)
    assert accepted(controller) == 2 * WINDOWS, controller.metrics_text()


async def answers_to_one_ping(mosquitto: Mosquitto) -> int:
    """How many answers one `Ping` request gets within 2 s of the first."""
    me = f"op-{uuid.uuid4().hex[:8]}"
    answer = topics.response_topic(me)
    correlation = uuid.uuid4().bytes
    seen = 0
    async with make_client(mosquitto.endpoint("operator"), identifier=me) as op:
        await op.subscribe(answer, qos=1)
        props = publish_properties(response_topic=answer, correlation=correlation, expiry_s=10)
        await op.publish(topics.CONTROLLER_REQUESTS, Ping().to_wire(), qos=1, properties=props)
        messages = aiter(op.messages)
        async with asyncio.timeout(15):
            await anext(messages)
            seen = 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for _ in messages:
                    seen += 1
    return seen


async def test_a_kept_session_subscribed_to_telemetry_does_not_count_each_window_twice(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """The main session of a controller from before the telemetry and request sessions
    (same client id, persistent) still holds those subscriptions at the broker."""
    assert await controller.terminate() == 0
    old = make_client(
        mosquitto.endpoint("controller"), identifier="hotswap-controller", persistent_session=True
    )
    async with old:
        await old.subscribe(topics.ALL_DEVICE_TELEMETRY, qos=1)
        await old.subscribe(topics.CONTROLLER_REQUESTS, qos=1)
    await controller.start()
    await controller.wait_connected(times=2)
    await send_windows(mosquitto)
    await eventually(lambda: accepted(controller) >= WINDOWS, within_s=15)
    await send_windows(mosquitto, 1)  # after the others: when it is in, they all are
    await eventually(lambda: accepted(controller) >= WINDOWS + 1, within_s=15)
    assert accepted(controller) == WINDOWS + 1, controller.metrics_text()
    assert await answers_to_one_ping(mosquitto) == 1
