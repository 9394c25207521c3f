"""Crash safety: the agent process killed at each point of a deploy restarts with one valid model.

A real `hotswap agent run --credentials DIR` process (a provisioned device:
its broker login, trusted key and the controller's command key all from DIR)
dies (`os._exit`, like a power cut) at a named point of fetch → verify → store
→ swap → commit; the restarted agent must serve exactly one valid model, report
it in its retained state, hold no temp file, and finish the deploy when the
command comes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from broker.launcher import Mosquitto
from edge_agent.agent import Agent
from edge_agent.faults import CRASH_EXIT_CODE, CRASH_POINTS
from shared import topics
from shared.command_auth import SIGNATURE_PROPERTY, sign_command
from shared.credentials import COMMAND_KEY_FILE
from shared.keys import load_private_key
from shared.messages import DeployCommand, DeviceEvent
from shared.mqtt import publish_properties
from tests.conftest import S3, KeyPair, provision
from tests.edge_agent.test_agent import (
    Harness,
    X,
    agent_config,
    deploy,
    reference,
    running,
    watching,
)

pytestmark = pytest.mark.timeout(90)


async def run_until_final(h: Harness, command_id: str) -> DeviceEvent:
    return await h.final_event(command_id, within_s=30)


async def send_signed(h: Harness, command: DeployCommand, broker: Mosquitto) -> None:
    """Publish like the controller does: signed with its command key over topic + payload."""
    key = load_private_key(broker.credentials("controller") / COMMAND_KEY_FILE)
    topic, payload = topics.device_cmd("cam-1"), command.to_wire()
    properties = publish_properties()
    properties.UserProperty = [(SIGNATURE_PROPERTY, sign_command(topic, payload, key))]
    await h.client.publish(topic, payload, qos=1, properties=properties)


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_agent_killed_during_a_deploy_restarts_with_one_valid_model(
    point: str,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Killed at `point`, the agent comes back serving v1 (or v2 once committed), and completes."""
    # Provisioned with the trusted key first: agent_config reuses this identity.
    credentials = provision(mosquitto, "cam-1", trusted_keys=[signing_keys.public_path]).directory
    first = Agent(agent_config(tmp_path, signing_keys, mosquitto))
    async with watching(first, mosquitto, s3, signing_keys) as h:
        # v1 installed by an in-process agent.
        async with running(first):
            signed1, url1 = h.upload(model_v1, "1.0.0")
            await h.send(deploy_v1 := deploy(signed1, url1))
            assert (await run_until_final(h, deploy_v1.command_id)).phase == "activated"

        # v2 sent to a real agent process that dies at `point`.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", "agent", "run", "--credentials", str(credentials),
            "--data-dir", str(tmp_path / "agent"), "--mqtt-url", mosquitto.url,
            "--log-level", "warning",
            env=os.environ | {"HOTSWAP_CRASH_AT": point},
        )  # fmt: skip
        signed2, url2 = h.upload(model_v2, "2.0.0")
        # The process checks the controller's signature and requires an expiry.
        second = deploy(signed2, url2, expires_at=datetime.now(UTC) + timedelta(minutes=10))
        await send_signed(h, second, mosquitto)
        assert await asyncio.wait_for(proc.wait(), 30) == CRASH_EXIT_CODE

        # Restarted: exactly one valid model, consistent state, no leftovers.
        restarted = Agent(agent_config(tmp_path, signing_keys, mosquitto))
        async with running(restarted, wait_connected=False):
            await asyncio.wait_for(restarted.serving.wait(), 10)
            expected = ("2.0.0", model_v2) if point == "committed" else ("1.0.0", model_v1)
            assert restarted.active is not None and restarted.active.version == expected[0]
            np.testing.assert_allclose(restarted.infer(X), reference(expected[1]), atol=1e-6)
            data_dir = tmp_path / "agent"
            assert [p.name for p in data_dir.rglob("*") if p.name.endswith((".tmp", ".part"))] == []
            assert list((data_dir / "downloads").iterdir()) == []
            for model_file in (data_dir / "models").glob("*.tflite"):
                assert hashlib.sha256(model_file.read_bytes()).hexdigest() == model_file.stem
            await asyncio.wait_for(restarted.connected.wait(), 10)

            # The same command again (a controller resending it) completes the deploy.
            await send_signed(h, second, mosquitto)
            async with asyncio.timeout(30):
                while not (restarted.active and restarted.active.version == "2.0.0"):
                    await asyncio.sleep(0.05)
            final = await run_until_final(h, second.command_id)
            assert final.phase == "activated"
            np.testing.assert_allclose(restarted.infer(X), reference(model_v2), atol=1e-6)
