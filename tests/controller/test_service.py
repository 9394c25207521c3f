"""The controller service over a real broker and moto's S3, with a scripted device.

The device here is a plain MQTT client that plays a device's part of the
protocol (a test double for the device side only); the controller, broker and
S3 API are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest

from broker.launcher import Mosquitto
from controller.artifacts import ArtifactStore
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller
from shared import topics
from shared.command_auth import COMMAND_REFUSAL_REASONS
from shared.messages import (
    COMMAND,
    DeployCommand,
    DeviceEvent,
    DeviceState,
    ListDevices,
    StartRollout,
)
from shared.mqtt import make_client
from tests.conftest import S3, KeyPair, controller_config, device_endpoint, running_task


@pytest.fixture
async def controller(mosquitto: Mosquitto, s3: S3, tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(controller_config(mosquitto, s3, tmp_path))
    async with running_task(c.run(), c.connected):
        yield c


@contextlib.asynccontextmanager
async def scripted_rollout(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, model_v1: bytes
) -> AsyncIterator[tuple[aiomqtt.Client, str, Callable[[], Awaitable[DeployCommand]]]]:
    """A registered scripted device `dev-1`, `clf@1` pushed and rolled out to it: yields
    the device's client, the rollout id and a function that reads its next deploy."""
    endpoint = mosquitto.endpoint("operator")
    async with make_client(
        device_endpoint(mosquitto, "dev-1", "r1", "t"), identifier="dev-1"
    ) as device:
        await device.subscribe(topics.device_cmd("dev-1"), qos=1)
        state = DeviceState(device_id="dev-1", region="r1", device_type="t", online=True)
        await device.publish(topics.device_state("dev-1"), state.to_wire(), qos=1, retain=True)
        artifacts = ArtifactStore(s3.endpoint, s3.bucket)
        await push_model(
            model_v1, name="clf", version="1", signing_key=signing_keys.private_path,
            endpoint=endpoint, artifacts=artifacts,
        )  # fmt: skip
        async with OperatorClient(endpoint) as op:
            for _ in range(50):  # the retained state reaches the registry asynchronously
                if any(d["deviceId"] == "dev-1" for d in await op.request(ListDevices())):
                    break
                await asyncio.sleep(0.1)
            started = await op.request(StartRollout(model="clf", version="1", devices=("dev-1",)))
        commands = device.messages.__aiter__()

        async def next_deploy() -> DeployCommand:
            async with asyncio.timeout(10):
                while True:
                    message = await commands.__anext__()
                    assert isinstance(message.payload, bytes)
                    command = COMMAND.validate_json(message.payload)
                    if isinstance(command, DeployCommand):
                        return command

        yield device, started["rolloutId"], next_deploy


async def test_expired_url_gets_the_same_command_with_a_fresh_url(
    controller: Controller, mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, model_v1: bytes
) -> None:
    """A device's `downloading`/`url_expired` event is answered with the same command id, new URL."""
    async with scripted_rollout(mosquitto, s3, signing_keys, model_v1) as (
        device, rollout_id, next_deploy,
    ):  # fmt: skip
        first = await next_deploy()
        assert first.rollout_id == rollout_id
        await asyncio.sleep(1.1)  # presigned URLs carry a per-second timestamp
        expired = DeviceEvent(
            device_id="dev-1", command_id=first.command_id, rollout_id=first.rollout_id,
            phase="downloading", reason="url_expired",
        )  # fmt: skip
        await device.publish(topics.device_events("dev-1"), expired.to_wire(), qos=1)
        second = await next_deploy()
        assert second.command_id == first.command_id
        assert second.url != first.url
        assert json.loads(second.manifest.signed) == json.loads(first.manifest.signed)


@pytest.mark.parametrize("reason", sorted(COMMAND_REFUSAL_REASONS))
async def test_a_refused_copy_of_a_command_does_not_fail_the_device(
    controller: Controller,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    model_v1: bytes,
    reason: str,
) -> None:
    """A device refusing a forged or replayed copy of an in-flight command id says `failed`
    with a command-refusal reason: the controller ignores it, and the real answer counts."""
    async with scripted_rollout(mosquitto, s3, signing_keys, model_v1) as (
        device, rollout_id, next_deploy,
    ):  # fmt: skip
        command = await next_deploy()
        for phase, why in (("failed", reason), ("activated", None)):
            event = DeviceEvent(
                device_id="dev-1", command_id=command.command_id, rollout_id=rollout_id,
                phase=phase, reason=why,
            )  # fmt: skip
            await device.publish(topics.device_events("dev-1"), event.to_wire(), qos=1)
        status = await read_rollout_status(mosquitto.endpoint("operator"), rollout_id, wait_s=20)
        assert status.status == "Succeeded", status.reason
