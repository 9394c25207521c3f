"""The agent's command record and validity checks through `Agent.handle`, with no broker.

The model is put in the agent's store beforehand, so nothing is downloaded; the
agent is never connected (its events wait in the outbox).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import Agent, AgentConfig
from shared.manifest import SignedManifest, build_manifest, sign_manifest
from shared.messages import DeployCommand
from shared.settings import parse_mqtt_url
from shared.tflite import read_signature

KEY = Ed25519PrivateKey.generate()


def offline_agent(tmp_path: Path, **kw: object) -> Agent:
    return Agent(
        AgentConfig(
            device_id="cam-1",
            region="eu-west",
            device_type="camera",
            data_dir=tmp_path / "agent",
            trusted_keys=(KEY.public_key(),),
            mqtt=parse_mqtt_url("mqtt://127.0.0.1:1"),  # never reached
            **kw,
        )
    )


def stored(agent: Agent, data: bytes, version: str) -> SignedManifest:
    manifest = build_manifest(
        name="clf", version=version, data=data, signature=read_signature(data)
    )
    signed = sign_manifest(manifest, KEY)
    dest = agent.store.download_path(manifest.sha256)
    dest.write_bytes(data)
    agent.store.adopt(signed, manifest, dest)
    return signed


def command(signed: SignedManifest, expires_in_s: float | None, **kw: object) -> DeployCommand:
    now = datetime.now(UTC)
    return DeployCommand(
        command_id=kw.pop("command_id", f"c-{uuid.uuid4().hex}"),
        manifest=signed,
        url="http://127.0.0.1:9/never-fetched",
        issued_at=now,
        expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s is not None else None,
        **kw,
    )


def recorded(agent: Agent) -> dict[str, dict[str, object]]:
    return dict(json.loads(agent.store.state_path.read_text())["commands"])


async def test_answered_ids_are_remembered_until_the_latest_expiry_they_were_sent_with(
    tmp_path: Path, model_v1: bytes
) -> None:
    """A controller's re-send (same id, later expiry) is answered from the record and
    extends how long the id is remembered; the record is on disk."""
    agent = offline_agent(tmp_path)
    await asyncio.to_thread(agent.restore)
    signed = stored(agent, model_v1, "1.0.0")
    first = command(signed, 60)
    done = await agent.handle(first)
    assert done is not None and done.phase == "activated"
    assert first.expires_at is not None
    assert recorded(agent)[first.command_id]["expires_at"] == first.expires_at.timestamp()

    resent = command(signed, 3600, command_id=first.command_id)
    again = await agent.handle(resent)
    assert again == done  # the recorded answer, not a new one
    assert resent.expires_at is not None
    assert recorded(agent)[first.command_id]["expires_at"] == resent.expires_at.timestamp()


async def test_refused_commands_leave_no_record(tmp_path: Path, model_v1: bytes) -> None:
    """An expired command is answered `failed`/`command_expired` and its id stays unknown."""
    agent = offline_agent(tmp_path)
    await asyncio.to_thread(agent.restore)
    signed = stored(agent, model_v1, "1.0.0")
    stale = command(signed, -1)
    refused = await agent.handle(stale)
    assert refused is not None and (refused.phase, refused.reason) == (
        "failed",
        "command_expired",
    )
    assert stale.command_id not in agent._state.commands
    assert agent.active is None


async def test_with_controller_keys_a_command_must_carry_an_expiry(
    tmp_path: Path, model_v1: bytes
) -> None:
    """Authenticated mode: a command valid forever could be replayed forever, so it is refused."""
    agent = offline_agent(tmp_path, controller_keys=(Ed25519PrivateKey.generate().public_key(),))
    await asyncio.to_thread(agent.restore)
    signed = stored(agent, model_v1, "1.0.0")
    refused = await agent.handle(command(signed, None))
    assert refused is not None and refused.reason == "command_no_expiry"
    accepted = await agent.handle(command(signed, 60))
    assert accepted is not None and accepted.phase == "activated"


async def test_an_agent_without_controller_keys_warns_once_at_start(tmp_path: Path) -> None:
    """No controller key: one `commands_not_authenticated` warning; with a key: none."""
    for keys in ((), (Ed25519PrivateKey.generate().public_key(),)):
        agent = offline_agent(tmp_path / str(len(keys)), controller_keys=keys)
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(agent.run())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        warned = [e for e in logs if e["event"] == "commands_not_authenticated"]
        assert len(warned) == (0 if keys else 1), logs
