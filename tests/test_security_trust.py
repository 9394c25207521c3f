"""Attacks on the artifact and command trust chain, each one a test (issue 5, part B).

A real mosquitto, moto's S3 HTTP API, the controller in-process with its own
command key, and an edge agent that trusts the operator's manifest key and the
controller's command key, running real interpreters. Each attack checks that
the device refuses it with a reason code, keeps serving the old model (real
inference output), leaves no file behind, and that the reason reaches the
controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.launcher import Mosquitto
from controller import metrics
from controller.artifacts import ArtifactStore, artifact_key
from controller.operator import OperatorClient, read_rollout_status
from controller.service import Controller
from edge_agent.agent import Agent
from shared import topics
from shared.command_auth import SIGNATURE_PROPERTY, sign_command
from shared.errors import RequestError
from shared.manifest import SignedManifest, build_manifest, sign_manifest
from shared.messages import (
    COMMAND,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    MAX_MESSAGE_BYTES,
    Command,
    ControlRollout,
    DeployCommand,
    DeviceEvent,
    Histogram,
    ListDevices,
    ModelRef,
    RegisterModel,
    RolloutStatus,
    Selector,
    StartRollout,
    TelemetryWindow,
)
from shared.mqtt import make_client, publish_properties
from shared.settings import MqttEndpoint
from shared.tflite import read_signature
from tests.conftest import (
    S3,
    KeyPair,
    controller_config,
    device_endpoint,
    final_event,
    observer_endpoint,
    running_task,
)
from tests.edge_agent.artifact_server import ArtifactServer
from tests.edge_agent.test_agent import (
    VARIANT,
    X,
    agent_config,
    deploy,
    flip_last_byte,
    reference,
    running,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEVICE = "cam-1"


@dataclass
class Captured:
    """One command exactly as it went over the wire: topic, payload bytes, signatures."""

    topic: str
    payload: bytes
    signatures: tuple[str, ...]

    @property
    def command(self) -> Command:
        return COMMAND.validate_json(self.payload)


@dataclass
class Trust:
    """The controller's and the attacker's view of one device."""

    endpoint: MqttEndpoint  # the operator's login
    agent: Agent
    artifacts: ArtifactStore
    keys: KeyPair  # the operator's manifest key
    command_key: Ed25519PrivateKey  # the controller's command key
    client: aiomqtt.Client  # publishes with the controller's broker identity (not its key)
    events: list[DeviceEvent] = field(default_factory=list)
    captured: list[Captured] = field(default_factory=list)

    # ---- operator

    def manifest(
        self, data: bytes, version: str, *, key: Ed25519PrivateKey | None = None, **kw: Any
    ) -> SignedManifest:
        fields = {"signature": read_signature(data)} | kw
        manifest = build_manifest(name="clf", version=version, data=data, **fields)
        return sign_manifest(manifest, key or self.keys.private)

    async def register(self, signed: SignedManifest, data: bytes) -> None:
        """Upload and register, as `hotswap model push` does (the controller never verifies)."""
        manifest = signed.unverified()
        key = await asyncio.to_thread(
            self.artifacts.put_model, manifest.name, manifest.version, data, signed
        )
        await self.request(RegisterModel(manifest=signed, s3_key=key))

    async def push(self, data: bytes, version: str) -> SignedManifest:
        signed = self.manifest(data, version)
        await self.register(signed, data)
        return signed

    async def request(self, request: Any) -> Any:
        async with OperatorClient(self.endpoint, timeout=15) as op:
            return await op.request(request)

    async def rollout(self, version: str, **spec: Any) -> RolloutStatus:
        started = await self.request(
            StartRollout(model="clf", version=version, devices=(DEVICE,), **spec)
        )
        return await read_rollout_status(self.endpoint, started["rolloutId"], wait_s=60)

    # ---- attacker / wire

    async def publish(
        self, topic: str, payload: bytes, signatures: Iterable[str] = (), qos: int = 1
    ) -> None:
        props = publish_properties()
        if sigs := [(SIGNATURE_PROPERTY, sig) for sig in signatures]:
            props.UserProperty = sigs
        await self.client.publish(topic, payload, qos=qos, properties=props)

    async def send(self, command: Command, *, key: Ed25519PrivateKey | None = None) -> None:
        """Publish `command` on the device's topic signed by `key` (default: the controller's)."""
        topic = topics.device_cmd(DEVICE)
        payload = command.to_wire()
        await self.publish(topic, payload, [sign_command(topic, payload, key or self.command_key)])

    async def replay(self, captured: Captured, topic: str | None = None) -> None:
        await self.publish(topic or captured.topic, captured.payload, captured.signatures)

    async def final_event(self, command_id: str, within_s: float = 30.0) -> DeviceEvent:
        return await final_event(self.events, command_id, within_s)

    async def events_for(self, command_id: str, count: int, within_s: float = 15.0) -> list[str]:
        async with asyncio.timeout(within_s):
            while len(self.phases(command_id)) < count:
                await asyncio.sleep(0.05)
        return self.phases(command_id)

    def phases(self, command_id: str) -> list[str]:
        return [e.phase for e in self.events if e.command_id == command_id]

    def last_event(self, command_id: str) -> DeviceEvent:
        return [e for e in self.events if e.command_id == command_id][-1]

    def deploys(self, version: str) -> list[Captured]:
        """The controller's deploys of `version` to this device, as captured on the wire."""
        return [
            c
            for c in self.captured
            if isinstance(cmd := c.command, DeployCommand)
            and cmd.manifest.unverified().version == version
        ]

    # ---- the device

    def serves(self, model: bytes) -> None:
        np.testing.assert_allclose(self.agent.infer(X), reference(model), atol=1e-6)

    def data_files(self) -> set[str]:
        root = self.agent.config.data_dir
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    def only_files_of(self, *signed: SignedManifest) -> set[str]:
        shas = [s.unverified().sha256 for s in signed]
        models = {f"models/{sha}{ext}" for sha in shas for ext in (".tflite", ".manifest.json")}
        return {"state.json"} | models

    def floor(self) -> dict[str, str]:
        state = json.loads((self.agent.config.data_dir / "state.json").read_text())
        return dict(state["highest"])


async def wait_registered(trust: Trust) -> None:
    async with asyncio.timeout(20):
        while True:
            devices = await trust.request(ListDevices())
            if any(d["deviceId"] == DEVICE and d["online"] for d in devices):
                return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def trusted_fleet(
    mosquitto: Mosquitto,
    s3: S3,
    keys: KeyPair,
    tmp_path: Path,
    *,
    with_controller: bool = True,
    command_ttl_s: int = 3600,
    **controller_kw: Any,
) -> AsyncIterator[Trust]:
    """cam-1 trusting the operator's key and the controller's command key; a controller."""
    command_key = Ed25519PrivateKey.generate()
    agent = Agent(
        agent_config(tmp_path, keys, mosquitto, controller_keys=(command_key.public_key(),))
    )
    config = controller_config(
        mosquitto,
        s3,
        tmp_path,
        command_key=command_key,
        command_ttl_s=command_ttl_s,
        **controller_kw,
    )
    controller = Controller(config)
    async with (
        make_client(mosquitto.endpoint("controller"), identifier="test-wire") as client,
        make_client(observer_endpoint(mosquitto), identifier="test-spy") as spy,
    ):
        trust = Trust(
            mosquitto.endpoint("operator"),
            agent,
            ArtifactStore(s3.endpoint, s3.bucket),
            keys,
            command_key,
            client,
        )
        await spy.subscribe(topics.device_events(DEVICE), qos=1)
        await spy.subscribe(topics.device_cmd(DEVICE), qos=1)

        async def record() -> None:
            async for m in spy.messages:
                assert isinstance(m.payload, bytes)
                if m.topic.matches(topics.device_events(DEVICE)):
                    trust.events.append(DeviceEvent.model_validate_json(m.payload))
                else:
                    props = getattr(m.properties, "UserProperty", None) or []
                    sigs = tuple(v for k, v in props if k == SIGNATURE_PROPERTY)
                    trust.captured.append(Captured(m.topic.value, m.payload, sigs))

        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(running_task(record()))
            if with_controller:
                await stack.enter_async_context(
                    running_task(controller.run(), controller.connected)
                )
            await stack.enter_async_context(running(agent))
            if with_controller:
                await wait_registered(trust)
            yield trust


@pytest.fixture
async def trust(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> AsyncIterator[Trust]:
    async with trusted_fleet(mosquitto, s3, signing_keys, tmp_path) as t:
        yield t


@pytest.fixture
async def device_only(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> AsyncIterator[Trust]:
    """The device and a wire client playing the controller (commands signed by hand)."""
    async with trusted_fleet(mosquitto, s3, signing_keys, tmp_path, with_controller=False) as t:
        yield t


async def serving_v1(trust: Trust, model_v1: bytes) -> SignedManifest:
    signed = await trust.push(model_v1, "1.0.0")
    status = await trust.rollout("1.0.0")
    assert status.status == "Succeeded", status
    trust.serves(model_v1)
    return signed


# ---------------------------------------------------------------- 5, 8: tampered artifacts


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("flipped_byte", "sha256_mismatch"),
        ("unknown_key", "untrusted_key"),
        ("unsigned_manifest", "untrusted_key"),
        ("wrong_device_type", "incompatible_device_type"),
        ("wrong_tensor_signature", "incompatible_manifest_mismatch"),
        ("artifact_swapped_in_s3", "sha256_mismatch"),
    ],
)
async def test_tampered_artifact_is_refused_the_old_model_serves_and_the_controller_knows(
    trust: Trust, model_v1: bytes, model_v2: bytes, model_other_signature: bytes, attack: str,
    reason: str,
) -> None:  # fmt: skip
    """Refused with its reason, v1 still answers, no file left, the rollout shows the reason."""
    v1 = await serving_v1(trust, model_v1)
    if attack == "flipped_byte":
        signed = await trust.push(VARIANT, "2.0.0")
        # The signed manifest promises one file; S3 now holds it with one byte flipped.
        trust.artifacts.put_model("clf", "2.0.0", flip_last_byte(VARIANT), signed)
    elif attack == "artifact_swapped_in_s3":
        # After signing and registering, S3's object is replaced by another valid model.
        assert len(model_v2) == len(VARIANT)
        signed = await trust.push(VARIANT, "2.0.0")
        trust.artifacts.put_model("clf", "2.0.0", model_v2, signed)
    elif attack == "unknown_key":
        signed = trust.manifest(VARIANT, "2.0.0", key=Ed25519PrivateKey.generate())
        await trust.register(signed, VARIANT)
    elif attack == "unsigned_manifest":
        signed = SignedManifest(signed=trust.manifest(VARIANT, "2.0.0").signed, signatures=())
        await trust.register(signed, VARIANT)
    elif attack == "wrong_device_type":
        signed = trust.manifest(VARIANT, "2.0.0", device_types=("gateway",))
        await trust.register(signed, VARIANT)
    else:  # the file has 5 inputs; the signed manifest promises v1's 4
        signed = trust.manifest(model_other_signature, "2.0.0", signature=read_signature(model_v1))
        await trust.register(signed, model_other_signature)

    if attack == "wrong_device_type":
        # The controller already refuses to target a camera with a gateway model ...
        with pytest.raises(RequestError, match="only for device types"):
            await trust.rollout("2.0.0")
        # ... and the device refuses it too, from a controller that would not.
        url = trust.artifacts.presign_get(
            artifact_key("clf", "2.0.0", signed.unverified().sha256), 600
        )
        command_id = (cmd := deploy(signed, url, expires_at=soon())).command_id
        await trust.send(cmd)
    else:
        status = await trust.rollout("2.0.0")
        assert status.status == "Failed", status
        assert [(d.device_id, d.state, d.reason) for d in status.devices] == [
            (DEVICE, "failed", reason)
        ]
        (captured,) = trust.deploys("2.0.0")
        command_id = captured.command.command_id
    final = await trust.final_event(command_id)
    assert (final.phase, final.reason) == ("failed", reason)
    assert trust.agent.active is not None and trust.agent.active.version == "1.0.0"
    trust.serves(model_v1)
    assert trust.data_files() == trust.only_files_of(v1)


# ---------------------------------------------------------------- 6: anti-rollback


async def test_signed_older_version_is_refused_before_download_even_after_a_restart(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """v2 activated: a validly signed v1 is `downgrade`, with no download; the floor is on disk,
    so a restarted agent (and controller) refuses it the same way."""
    for run in ("first", "restarted"):
        # The second time: a new agent and controller on the same data directory and database.
        async with trusted_fleet(mosquitto, s3, signing_keys, tmp_path) as trust:
            if run == "first":
                await trust.push(model_v1, "1.0.0")
                v2 = await trust.push(model_v2, "2.0.0")
                assert (await trust.rollout("2.0.0")).status == "Succeeded"
            status = await trust.rollout("1.0.0")
            assert status.status == "Failed", (run, status)
            assert [(d.state, d.reason) for d in status.devices] == [("failed", "downgrade")]
            (refused,) = trust.deploys("1.0.0")
            assert trust.phases(refused.command.command_id) == ["received", "failed"]  # no fetch
            trust.serves(model_v2)
            assert trust.data_files() == trust.only_files_of(v2)
            assert trust.floor() == {"clf": "2.0.0"}


async def test_operator_approved_downgrade_and_rollback_to_a_held_version_are_allowed(
    trust: Trust, model_v1: bytes, model_v2: bytes
) -> None:
    """The operator's rollback of a v2 rollout returns to the held v1; v1 by deploy is refused
    until the operator starts the rollout with allow_downgrade. The floor stays 2.0.0."""
    await serving_v1(trust, model_v1)
    await trust.push(model_v2, "2.0.0")
    up = await trust.request(StartRollout(model="clf", version="2.0.0", devices=(DEVICE,)))
    done = await read_rollout_status(trust.endpoint, up["rolloutId"], wait_s=60)
    assert done.status == "Succeeded", done
    trust.serves(model_v2)
    # Operator rollback of the v2 rollout: a reference swap to the resident v1.
    await trust.request(ControlRollout(rollout_id=up["rolloutId"], action="rollback"))
    back = await read_rollout_status(trust.endpoint, up["rolloutId"], wait_s=60)
    assert back.status == "RolledBack", back
    trust.serves(model_v1)
    assert trust.floor() == {"clf": "2.0.0"}
    # v2 again (not lower than the floor), then v1 by deploy: refused, unless allowed.
    assert (await trust.rollout("2.0.0")).status == "Succeeded"
    refused = await trust.rollout("1.0.0")
    assert [(d.state, d.reason) for d in refused.devices] == [("failed", "downgrade")]
    allowed = await trust.rollout("1.0.0", allow_downgrade=True)
    assert allowed.status == "Succeeded", allowed
    trust.serves(model_v1)
    assert trust.floor() == {"clf": "2.0.0"}


# ---------------------------------------------------------------- 7: replay and freshness


async def test_replayed_deploy_after_the_device_moved_on_does_no_work(
    trust: Trust, model_v1: bytes, model_v2: bytes
) -> None:
    """The controller's exact v1 deploy (bytes + signature) re-published once v2 serves:
    answered from the record, never run; on another topic its signature no longer holds."""
    await serving_v1(trust, model_v1)
    await trust.push(model_v2, "2.0.0")
    assert (await trust.rollout("2.0.0")).status == "Succeeded"
    (old,) = trust.deploys("1.0.0")
    assert old.signatures, "the controller signs its commands"
    before = trust.phases(old.command.command_id)
    assert before == ["received", "downloading", "verified", "activated"]

    await trust.replay(old)
    after = await trust.events_for(old.command.command_id, len(before) + 1)
    assert after == [*before, "activated"]  # the recorded answer, no `received`, no work
    trust.serves(model_v2)

    # The same bytes and signature on the region's topic: the topic is part of what is signed.
    await trust.replay(old, topics.region_cmd("eu-west"))
    got = await trust.events_for(old.command.command_id, len(after) + 1)
    assert got[-1] == "failed"
    assert trust.last_event(old.command.command_id).reason == "command_signature_invalid"
    trust.serves(model_v2)


async def test_replayed_deploy_after_its_expiry_is_refused(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Commands live 4 s here: the captured v1 deploy replayed after that is `command_expired`."""
    async with trusted_fleet(mosquitto, s3, signing_keys, tmp_path, command_ttl_s=4) as trust:
        await serving_v1(trust, model_v1)
        await trust.push(model_v2, "2.0.0")
        assert (await trust.rollout("2.0.0")).status == "Succeeded"
        (old,) = trust.deploys("1.0.0")
        expires_at = old.command.expires_at
        assert expires_at is not None
        await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
        seen = len(trust.phases(old.command.command_id))
        await trust.replay(old)
        got = await trust.events_for(old.command.command_id, seen + 1)
        assert got[-1] == "failed"
        assert trust.last_event(old.command.command_id).reason == "command_expired"
        trust.serves(model_v2)
        assert trust.agent.active is not None and trust.agent.active.version == "2.0.0"


@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        ("unsigned", "command_unsigned"),
        ("unknown_key", "command_untrusted_key"),
        ("tampered_payload", "command_signature_invalid"),
        ("expired", "command_expired"),
        ("issued_in_the_future", "command_not_yet_valid"),
        ("no_expiry", "command_no_expiry"),
    ],
)
async def test_forged_or_stale_commands_are_refused_before_any_work(
    device_only: Trust, model_v1: bytes, forgery: str, reason: str
) -> None:
    """Each gets one `failed` event with its reason; nothing is fetched; v1 keeps serving."""
    trust = device_only
    signed_v1, url_v1 = upload(trust, model_v1, "1.0.0")
    good = deploy(signed_v1, url_v1, expires_at=soon())
    await trust.send(good)
    assert (await trust.final_event(good.command_id)).phase == "activated"

    signed_v2 = trust.manifest(VARIANT, "2.0.0")
    now = datetime.now(UTC)
    with ArtifactServer(VARIANT) as attacker:
        cmd = deploy(signed_v2, attacker.url, expires_at=now + timedelta(minutes=5))
        topic = topics.device_cmd(DEVICE)
        if forgery == "unsigned":
            await trust.publish(topic, cmd.to_wire())
        elif forgery == "unknown_key":
            await trust.send(cmd, key=Ed25519PrivateKey.generate())
        elif forgery == "tampered_payload":
            # A genuine signature over the command, then the URL redirected to the attacker.
            honest = cmd.model_copy(update={"url": url_v1})
            sig = sign_command(topic, honest.to_wire(), trust.command_key)
            await trust.publish(topic, cmd.to_wire(), [sig])
        elif forgery == "expired":
            await trust.send(cmd.model_copy(update={"expires_at": now - timedelta(seconds=1)}))
        elif forgery == "issued_in_the_future":
            future = now + timedelta(minutes=10)
            await trust.send(
                cmd.model_copy(
                    update={"issued_at": future, "expires_at": future + timedelta(hours=1)}
                )
            )
        else:
            await trust.send(cmd.model_copy(update={"expires_at": None}))
        final = await trust.final_event(cmd.command_id)
        assert (final.phase, final.reason) == ("failed", reason), final
        assert trust.phases(cmd.command_id) == ["failed"]
        assert attacker.requests == []
    trust.serves(model_v1)
    assert trust.data_files() == trust.only_files_of(signed_v1)


async def test_a_region_command_is_signed_for_its_region_topic(
    device_only: Trust, model_v1: bytes
) -> None:
    """Signed for `regions/eu-west/cmd` it is carried out; the same bytes and signature on the
    device's own topic are `command_signature_invalid` (the topic is inside the signature)."""
    trust = device_only
    signed_v1, url_v1 = upload(trust, model_v1, "1.0.0")
    region = topics.region_cmd("eu-west")
    cmd = deploy(signed_v1, url_v1, expires_at=soon(), selector=Selector(cohort=(DEVICE,)))
    sig = sign_command(region, cmd.to_wire(), trust.command_key)
    await trust.publish(topics.device_cmd(DEVICE), cmd.to_wire(), [sig])
    refused = await trust.final_event(cmd.command_id)
    assert (refused.phase, refused.reason) == ("failed", "command_signature_invalid")
    assert trust.agent.active is None
    await trust.publish(region, cmd.to_wire(), [sig])
    async with asyncio.timeout(20):
        while "activated" not in trust.phases(cmd.command_id):
            await asyncio.sleep(0.05)
    trust.serves(model_v1)


async def test_a_url_refresh_only_comes_from_a_signed_command(
    device_only: Trust, model_v1: bytes
) -> None:
    """While a download waits for a fresh URL, an unsigned re-send pointing elsewhere is refused
    and not followed; the controller's signed re-send completes the deploy."""
    trust = device_only
    signed_v1, url_v1 = upload(trust, model_v1, "1.0.0")
    with ArtifactServer(model_v1, "expired") as expired, ArtifactServer(VARIANT) as attacker:
        cmd = deploy(signed_v1, expired.url, expires_at=soon())
        await trust.send(cmd)
        async with asyncio.timeout(10):
            while not any(e.reason == "url_expired" for e in trust.events):
                await asyncio.sleep(0.05)
        forged = cmd.model_copy(update={"url": attacker.url})
        await trust.publish(topics.device_cmd(DEVICE), forged.to_wire())
        async with asyncio.timeout(10):
            while not any(e.reason == "command_unsigned" for e in trust.events):
                await asyncio.sleep(0.05)
        assert attacker.requests == []
        await trust.send(cmd.model_copy(update={"url": url_v1}))
        async with asyncio.timeout(20):
            while "activated" not in trust.phases(cmd.command_id):
                await asyncio.sleep(0.05)
    assert attacker.requests == []
    trust.serves(model_v1)


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


def upload(trust: Trust, data: bytes, version: str) -> tuple[SignedManifest, str]:
    signed = trust.manifest(data, version)
    key = trust.artifacts.put_model("clf", version, data, signed)
    return signed, trust.artifacts.presign_get(key, 600)


# ---------------------------------------------------------------- 9: controller input hygiene


def dropped(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "hotswap_device_messages_dropped_total", {"reason": reason}
    )
    return value or 0.0


async def test_oversize_payload_and_flood_from_one_device_do_not_stop_the_controller(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> None:
    """A device floods its own topics with thousands of valid telemetry messages after one
    oversize payload: another device's rollout still succeeds, the flood is dropped and
    counted, and the warning is logged at most once a second."""
    rate, burst = 100.0, 300
    too_large0, limited0 = dropped("too_large"), dropped("rate_limited")
    async with trusted_fleet(
        mosquitto, s3, signing_keys, tmp_path, device_rate_per_s=rate, device_burst=burst
    ) as trust:
        await trust.push(model_v1, "1.0.0")
        evil = "evil-1"
        window = TelemetryWindow(
            device_id=evil,
            model=ModelRef(name="clf", version="1.0.0", sha256="0" * 64),
            window_start=datetime.now(UTC),
            window_end=datetime.now(UTC),
            count=1,
            errors=0,
            latency_ms=Histogram.empty(LATENCY_BUCKETS_MS),
            confidence=Histogram.empty(CONFIDENCE_BUCKETS),
        ).to_wire()
        evil_login = device_endpoint(mosquitto, evil, "eu-west", "camera")
        async with make_client(evil_login, identifier=evil) as attacker:
            oversize = b"{" + b" " * (MAX_MESSAGE_BYTES + 10) + b"}"
            await attacker.publish(topics.device_events(evil), oversize, qos=1)
            async with asyncio.timeout(10):
                while dropped("too_large") < too_large0 + 1:
                    await asyncio.sleep(0.05)

            sent = 0
            stop = asyncio.Event()

            async def flood() -> None:
                nonlocal sent
                while not stop.is_set() or sent < 5000:
                    for _ in range(250):
                        await attacker.publish(topics.device_telemetry(evil), window, qos=0)
                        sent += 1
                    await asyncio.sleep(0.005)

            with structlog.testing.capture_logs() as logs:
                started = time.monotonic()
                flooding = asyncio.create_task(flood())
                try:
                    async with asyncio.timeout(60):
                        while sent < 1000:
                            await asyncio.sleep(0.01)
                    status = await trust.rollout("1.0.0")
                finally:
                    stop.set()
                    await flooding
                # Let the controller drain what the broker still holds: until the count settles.
                settled = -1.0
                async with asyncio.timeout(20):
                    while settled != dropped("rate_limited"):
                        settled = dropped("rate_limited")
                        await asyncio.sleep(0.5)
                span = time.monotonic() - started  # every flood message was handled within it
        assert status.status == "Succeeded", status
        trust.serves(model_v1)
    assert sent >= 5000
    admitted_at_most = burst + rate * span
    assert dropped("rate_limited") - limited0 >= sent - admitted_at_most
    warnings = [e for e in logs if e["event"] == "device_rate_limited" and e["device_id"] == evil]
    assert 1 <= len(warnings) <= span + 1
    assert sum(e["dropped"] for e in warnings) <= dropped("rate_limited") - limited0
    assert not any(e["event"] == "device_rate_limited" and e["device_id"] == DEVICE for e in logs)
