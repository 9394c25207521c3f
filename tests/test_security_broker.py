"""Attacks on the broker's identities and ACLs, each one a test (issue 5, part A).

A real, secure mosquitto (no anonymous access, dynamic-security roles that
deny everything a role does not allow), devices provisioned through its API
while it runs, the controller in-process with its own command key, and real
edge agents. The attacker is a compromised device B: a plain MQTT client with
B's genuine credentials, free to send whatever it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from broker.launcher import Mosquitto
from broker.provision import provision_devices, provision_fleet
from controller.artifacts import ArtifactStore
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller
from edge_agent.agent import Agent, AgentConfig
from shared import topics
from shared.credentials import COMMAND_KEY_FILE, Credentials, DeviceIdentity, apply_credentials
from shared.keys import load_private_key, load_public_key
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    DeviceEvent,
    DeviceState,
    Histogram,
    ModelRef,
    StartRollout,
    TelemetryWindow,
)
from shared.mqtt import make_client
from shared.settings import MqttEndpoint, parse_mqtt_url
from tests.conftest import S3, KeyPair, controller_config, device_endpoint, provision, running_task

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NOT_AUTHORIZED = 0x87


async def cli(*args: str) -> tuple[int, str, str]:
    """`hotswap …` as a real process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def eventually(check: object, within_s: float = 20.0) -> None:
    async with asyncio.timeout(within_s):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def controller_running(
    mosquitto: Mosquitto, s3: S3, tmp_path: Path
) -> AsyncIterator[Controller]:
    """The controller as `controller run --credentials credentials/controller` sets it up."""
    key = load_private_key(mosquitto.credentials("controller") / COMMAND_KEY_FILE)
    controller = Controller(controller_config(mosquitto, s3, tmp_path, command_key=key))
    async with running_task(controller.run(), controller.connected):
        yield controller


def agent_from(creds: Credentials, broker: Mosquitto, data_dir: Path) -> Agent:
    """A real agent configured from its provisioned credentials directory."""
    assert creds.device is not None and creds.controller_key is not None
    return Agent(
        AgentConfig(
            device_id=creds.device.device_id,
            region=creds.device.region,
            device_type=creds.device.device_type,
            data_dir=data_dir,
            trusted_keys=tuple(load_public_key(k) for k in creds.trusted_keys),
            controller_keys=(load_public_key(creds.controller_key),),
            mqtt=device_endpoint(broker, creds.device.device_id),
            telemetry_interval_s=0.3,
        )
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with running_task(agent.run(), agent.connected):
        yield agent


def granted(codes: object) -> int:
    (code,) = codes  # type: ignore[misc]
    return int(getattr(code, "value", code))


async def test_anonymous_and_wrong_password_connections_are_refused(mosquitto: Mosquitto) -> None:
    """No credentials, or a device's username with a guessed password: CONNACK 'not authorized'."""
    device = device_endpoint(mosquitto, "cam-a")
    for endpoint in (parse_mqtt_url(mosquitto.url), replace(device, password="guess")):
        with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
            async with make_client(endpoint, identifier="cam-a"):
                pass


async def test_device_cannot_fake_another_devices_events_telemetry_or_state(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> None:
    """B publishes a fake `activated` for A's real command, fake telemetry and a fake state on
    A's topics: the broker drops them (a controller-identity spy sees none of them), the
    controller's record of A, its telemetry and the rollout's counts stay put; when the real
    A comes back it completes the rollout."""
    a_creds = provision(mosquitto, "cam-a", trusted_keys=[signing_keys.public_path])
    attacker_login = device_endpoint(mosquitto, "cam-b", "eu-west", "camera")
    operator = mosquitto.endpoint("operator")
    async with controller_running(mosquitto, s3, tmp_path) as controller:
        # A registers itself, then goes offline: its deploy waits in its session.
        async with running(agent_from(a_creds, mosquitto, tmp_path / "a")):
            await eventually(lambda: any(d.online for d in controller.store.list_devices()))
        await eventually(lambda: not any(d.online for d in controller.store.list_devices()))
        await push_model(
            model_v1, name="clf", version="1.0.0", signing_key=signing_keys.private_path,
            endpoint=operator, artifacts=ArtifactStore(s3.endpoint, s3.bucket),
        )  # fmt: skip
        async with OperatorClient(operator) as op:
            started = await op.request(
                StartRollout(model="clf", version="1.0.0", devices=("cam-a",))
            )
        rollout_id = started["rolloutId"]

        def command_id() -> str | None:
            (assignment,) = controller.store.assignments(rollout_id)
            return assignment.command_id

        await eventually(lambda: command_id() is not None)
        record_before = controller.store.list_devices()[0].model_dump(exclude={"last_seen"})

        model = ModelRef(name="clf", version="1.0.0", sha256="0" * 64)
        now = datetime.now(UTC)
        fakes = {
            topics.device_events("cam-a"): DeviceEvent(
                device_id="cam-a", command_id=str(command_id()), rollout_id=rollout_id,
                phase="activated", model=model,
            ).to_wire(),
            topics.device_telemetry("cam-a"): TelemetryWindow(
                device_id="cam-a", model=model, window_start=now - timedelta(seconds=1),
                window_end=now, count=1000, errors=0,
                latency_ms=Histogram(counts=(1000,) + (0,) * (len(LATENCY_BUCKETS_MS) - 1), total=1.0),
                confidence=Histogram.empty(CONFIDENCE_BUCKETS),
            ).to_wire(),
            topics.device_state("cam-a"): DeviceState(
                device_id="cam-a", region="eu-west", device_type="camera", online=True,
                active=ModelRef(name="evil", version="6.6.6", sha256="f" * 64),
            ).to_wire(),
        }  # fmt: skip
        barrier = DeviceState(
            device_id="cam-b", region="eu-west", device_type="camera", online=True
        )
        seen: list[aiomqtt.Message] = []
        async with (
            make_client(mosquitto.endpoint("controller"), identifier="test-spy") as spy,
            make_client(attacker_login, identifier="cam-b") as attacker,
        ):
            for topic in [*fakes, topics.device_state("cam-b")]:
                assert granted(await spy.subscribe(topic, qos=1)) == 1
            for topic, payload in fakes.items():
                await attacker.publish(topic, payload, qos=1, retain=topic.endswith("/state"))
            # One client's publishes are delivered in order: once B's own state is through,
            # anything B sent before it would have been too.
            await attacker.publish(topics.device_state("cam-b"), barrier.to_wire(), qos=1)
            async with asyncio.timeout(10):
                async for message in spy.messages:
                    seen.append(message)
                    if message.topic.matches(topics.device_state("cam-b")):
                        break
        on_a = [m for m in seen if not m.topic.matches(topics.device_state("cam-b"))]
        # Only A's own retained last word reaches the spy: nothing B sent.
        assert [(m.topic.value, m.retain) for m in on_a] == [(topics.device_state("cam-a"), True)]
        assert isinstance(on_a[0].payload, bytes)
        assert DeviceState.model_validate_json(on_a[0].payload).active != fakes_model(fakes)
        await asyncio.sleep(0.5)  # a few controller ticks
        after = [d for d in controller.store.list_devices() if d.device_id == "cam-a"]
        assert after[0].model_dump(exclude={"last_seen"}) == record_before
        assert controller.store.load_rollups(rollout_id, 0) == []  # no telemetry taken
        status = await read_rollout_status(operator, rollout_id)
        assert (status.status, status.devices_updated) == ("InProgress", 0)
        assert [a.state for a in controller.store.assignments(rollout_id)] != ["activated"]

        # The real A comes back, gets its queued (signed) deploy and completes the rollout.
        async with running(agent_from(a_creds, mosquitto, tmp_path / "a")):
            final = await read_rollout_status(operator, rollout_id, wait_s=30)
        assert (final.status, final.devices_updated) == ("Succeeded", 1)


def fakes_model(fakes: dict[str, bytes]) -> ModelRef | None:
    return DeviceState.model_validate_json(fakes[topics.device_state("cam-a")]).active


async def test_device_cannot_read_other_devices_commands_retained_or_live(
    mosquitto: Mosquitto,
) -> None:
    """B's subscriptions to `devices/+/cmd`, `#` and other devices' or regions' topics are
    refused; retained commands published before and live ones after never reach it."""
    device_endpoint(mosquitto, "cam-a", "us-east", "camera")
    attacker_login = device_endpoint(mosquitto, "cam-b", "eu-west", "camera")
    controller = mosquitto.endpoint("controller")
    async with make_client(controller, identifier="test-ctl-retained") as ctl:
        await ctl.publish(topics.device_cmd("cam-a"), b"retained-for-a", qos=1, retain=True)
        await ctl.publish(topics.region_cmd("us-east"), b"retained-region", qos=1, retain=True)
        await ctl.publish(topics.rollout_status("r-1"), b"retained-status", qos=1, retain=True)
    stolen = (
        "#",
        topics.ALL_DEVICE_CMDS,
        topics.ALL_REGION_CMDS,
        topics.device_cmd("cam-a"),
        topics.region_cmd("us-east"),
        f"{topics.ROOT}/#",
        "+/+/devices/+/cmd",
        topics.ALL_DEVICE_EVENTS,
        topics.ALL_ROLLOUT_STATUS,
        topics.CONTROLLER_REQUESTS,
        "$SYS/#",
        "$CONTROL/dynamic-security/#",
    )
    received: list[bytes] = []
    async with make_client(attacker_login, identifier="cam-b") as attacker:
        for topic in stolen:
            assert granted(await attacker.subscribe(topic, qos=1)) == NOT_AUTHORIZED, topic
        assert granted(await attacker.subscribe(topics.device_cmd("cam-b"), qos=1)) == 1
        async with make_client(controller, identifier="test-ctl-live") as ctl:
            await ctl.publish(topics.device_cmd("cam-a"), b"live-for-a", qos=1)
            await ctl.publish(topics.region_cmd("us-east"), b"live-region", qos=1)
            await ctl.publish(topics.device_cmd("cam-b"), b"barrier", qos=1)
        async with asyncio.timeout(10):
            async for message in attacker.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload)
                if message.payload == b"barrier":
                    break
    assert received == [b"barrier"]


async def test_device_cannot_connect_with_another_devices_client_id(
    mosquitto: Mosquitto,
) -> None:
    """B (its own valid login) asking for A's client id is refused, so it cannot take over A's
    session; A stays connected and still receives its next command."""
    victim_login = device_endpoint(mosquitto, "cam-a")
    attacker_login = device_endpoint(mosquitto, "cam-b")
    async with make_client(victim_login, identifier="cam-a", persistent_session=True) as victim:
        assert granted(await victim.subscribe(topics.device_cmd("cam-a"), qos=1)) == 1
        for persistent in (False, True):
            with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
                async with make_client(
                    attacker_login, identifier="cam-a", persistent_session=persistent
                ):
                    pass
        async with make_client(mosquitto.endpoint("controller"), identifier="test-ctl") as ctl:
            await ctl.publish(topics.device_cmd("cam-a"), b"still-yours", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(victim.messages))  # raises if A had been kicked
        assert message.payload == b"still-yours"


async def test_revoked_device_is_disconnected_at_once_and_cannot_connect_again(
    mosquitto: Mosquitto, signing_keys: KeyPair, tmp_path: Path
) -> None:
    """`hotswap device revoke` kicks a connected real agent within a second (not at its 30 s
    keepalive); its retries are refused from then on, with its own credentials."""
    creds = provision(mosquitto, "cam-a", trusted_keys=[signing_keys.public_path])
    agent = agent_from(creds, mosquitto, tmp_path / "a")
    async with running(agent):
        code, _, err = await cli(
            "device", "revoke", "cam-a", "--mqtt-url", mosquitto.url,
            "--credentials", str(mosquitto.credentials("admin")),
        )  # fmt: skip
        assert code == 0, err
        revoked_at = asyncio.get_running_loop().time()
        await eventually(lambda: not agent.connected.is_set(), within_s=5)
        assert asyncio.get_running_loop().time() - revoked_at < 1.0
        await asyncio.sleep(2.0)  # the agent keeps retrying with backoff meanwhile
        assert not agent.connected.is_set()
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with make_client(device_endpoint(mosquitto, "cam-a"), identifier="cam-a"):
            pass
    assert "cam-a been disconnected by administrative action" in mosquitto.log_path.read_text()


async def test_device_provisioned_while_the_broker_runs_connects_and_gets_a_deploy(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> None:
    """`device provision` on the running broker (same process, no restart), then
    `agent run --credentials DIR` as a real process: it registers, and a rollout reaches it
    through signed commands."""
    broker_pid = mosquitto.process.pid if mosquitto.process else None
    operator = mosquitto.endpoint("operator")
    async with controller_running(mosquitto, s3, tmp_path) as controller:
        out = tmp_path / "cam-new"
        code, _, err = await cli(
            "device", "provision", "--device-id", "cam-new", "--region", "eu-west",
            "--device-type", "camera", "--out", str(out), "--trusted-key",
            str(signing_keys.public_path), "--mqtt-url", mosquitto.url,
            "--credentials", str(mosquitto.credentials("admin")), "--json",
        )  # fmt: skip
        assert code == 0, err
        log = (tmp_path / "agent.log").open("wb")
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", "agent", "run", "--credentials", str(out),
            "--data-dir", str(tmp_path / "agent"), "--mqtt-url", mosquitto.url,
            "--workload-hz", "5", "--telemetry-interval", "0.5",
            stdout=log, stderr=log, env=os.environ.copy(),
        )  # fmt: skip
        try:
            await eventually(
                lambda: any(
                    d.device_id == "cam-new" and d.online for d in controller.store.list_devices()
                )
            )
            await push_model(
                model_v1, name="clf", version="1.0.0", signing_key=signing_keys.private_path,
                endpoint=operator, artifacts=ArtifactStore(s3.endpoint, s3.bucket),
            )  # fmt: skip
            async with OperatorClient(operator) as op:
                started = await op.request(
                    StartRollout(model="clf", version="1.0.0", devices=("cam-new",))
                )
            final = await read_rollout_status(operator, started["rolloutId"], wait_s=60)
            assert (final.status, final.devices_updated) == ("Succeeded", 1), final.reason
        finally:
            agent.terminate()
            await agent.wait()
            log.close()
    assert mosquitto.process is not None and mosquitto.process.pid == broker_pid


async def test_controller_answers_requests_only_under_the_responses_prefix(
    mosquitto: Mosquitto, s3: S3, tmp_path: Path
) -> None:
    """A request naming a device's cmd topic as its response topic gets no answer there
    (the controller may publish on cmd topics); a proper response topic is answered."""
    from shared.messages import ListDevices
    from shared.mqtt import publish_properties
    from tests.conftest import observer_endpoint

    async with (
        controller_running(mosquitto, s3, tmp_path),
        make_client(observer_endpoint(mosquitto), identifier="test-spy-cmd") as spy,
        make_client(mosquitto.endpoint("operator"), identifier="test-op-raw") as op,
    ):
        await spy.subscribe(topics.device_cmd("cam-a"), qos=1)
        own = topics.response_topic("test-op-raw")
        await op.subscribe(own, qos=1)
        request = ListDevices().to_wire()
        for answer_to, corr in ((topics.device_cmd("cam-a"), b"evil"), (own, b"fine")):
            await op.publish(
                topics.CONTROLLER_REQUESTS, request, qos=1,
                properties=publish_properties(response_topic=answer_to, correlation=corr),
            )  # fmt: skip
        async with asyncio.timeout(10):
            async for message in op.messages:
                assert getattr(message.properties, "CorrelationData", None) == b"fine"
                break
        # Requests are handled in order: the refused one came first, so nothing follows.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for message in spy.messages:
                    raise AssertionError(f"controller answered on a cmd topic: {message.topic}")


async def test_agent_claiming_another_region_is_told_its_subscription_was_refused(
    mosquitto: Mosquitto, signing_keys: KeyPair, tmp_path: Path
) -> None:
    """A device provisioned for eu-west that starts as us-east may not read us-east's
    commands: the broker refuses, and the agent says so instead of waiting silently."""
    import structlog

    creds = provision(
        mosquitto, "cam-r", "eu-west", "camera", trusted_keys=[signing_keys.public_path]
    )
    agent = agent_from(creds, mosquitto, tmp_path / "cam-r")
    agent = Agent(replace(agent.config, region="us-east"))
    with structlog.testing.capture_logs() as logs:
        async with running(agent):
            await eventually(lambda: any(e["event"] == "subscription_refused" for e in logs))
    refused = [e for e in logs if e["event"] == "subscription_refused"]
    assert [e["topic"] for e in refused] == [topics.region_cmd("us-east")]


async def _what_a_device_may_do(broker: Mosquitto, creds: Credentials) -> dict[str, object]:
    """Everything a device tries against the others: subscription codes, what it receives,
    and which of its publishes reach a controller-identity spy."""
    assert creds.device is not None
    me, region = creds.device.device_id, creds.device.region
    endpoint = apply_credentials(parse_mqtt_url(broker.url), creds)
    tries = {
        "own cmd": topics.device_cmd(me),
        "own region": topics.region_cmd(region),
        "other device cmd": topics.device_cmd("cam-victim"),
        "other region": topics.region_cmd("ap-other"),
        "all device cmds": topics.ALL_DEVICE_CMDS,
        "all regions": topics.ALL_REGION_CMDS,
        "everything": "#",
        "registry": topics.ALL_DEVICE_REGISTRY,
    }
    codes: dict[str, object] = {}
    received: list[str] = []
    reached: list[str] = []
    async with (
        make_client(mosquitto_spy(broker), identifier=f"spy-{me}") as spy,
        make_client(endpoint, identifier=me) as device,
    ):
        for name, topic in tries.items():
            codes[name] = granted(await device.subscribe(topic, qos=1))
        for topic in (
            topics.device_state("cam-victim"), topics.device_events("cam-victim"),
            topics.device_telemetry("cam-victim"), topics.device_registry(me),
            topics.device_state(me),
        ):  # fmt: skip
            assert granted(await spy.subscribe(topic, qos=1)) == 1
        async with make_client(broker.endpoint("controller"), identifier=f"ctl-{me}") as ctl:
            await ctl.publish(topics.device_cmd("cam-victim"), b"for-victim", qos=1)
            await ctl.publish(topics.region_cmd("ap-other"), b"for-other-region", qos=1)
            await ctl.publish(topics.region_cmd(region), b"for-my-region", qos=1)
            await ctl.publish(topics.device_cmd(me), b"barrier", qos=1)
        async with asyncio.timeout(10):
            async for message in device.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload.decode())
                if message.payload == b"barrier":
                    break
        for topic in (
            topics.device_state("cam-victim"), topics.device_events("cam-victim"),
            topics.device_telemetry("cam-victim"), topics.device_registry(me),
        ):  # fmt: skip
            await device.publish(topic, b"forged", qos=1)
        await device.publish(topics.device_state(me), b"own-state", qos=1)  # the barrier
        async with asyncio.timeout(10):
            async for message in spy.messages:
                if message.retain:  # what was there before (its record): not this device's doing
                    continue
                reached.append(message.topic.value.replace(me, "<me>"))
                if message.topic.matches(topics.device_state(me)):
                    break
    return {"codes": codes, "received": received, "reached": reached}


def mosquitto_spy(broker: Mosquitto) -> MqttEndpoint:
    """The controller's identity: it reads every device's state, events, telemetry, record."""
    return broker.endpoint("controller")


@pytest.mark.parametrize("path", ["api", "import"])
async def test_a_batch_provisioned_device_is_isolated_exactly_like_one_provisioned_alone(
    mosquitto: Mosquitto, tmp_path: Path, path: str
) -> None:
    """Batch-provisioned (through the API, or imported into a stopped broker's file) devices
    subscribe, receive and publish exactly what a device provisioned alone may: their own and
    their region's cmd topics, their own topics; nothing of another device or region."""
    alone = provision(mosquitto, "cam-solo", "eu-west", "camera")
    provision(mosquitto, "cam-victim", "us-east", "camera")
    batch = [DeviceIdentity(f"cam-b{i}", r, "camera") for i, r in enumerate(("eu-west", "sa-x"))]
    if path == "api":
        done = await provision_devices(
            mosquitto.endpoint("admin"), mosquitto.credentials("admin"), batch, tmp_path / "b"
        )
    else:
        done = await provision_fleet(mosquitto, batch, tmp_path / "b")
    expected = await _what_a_device_may_do(mosquitto, alone)
    assert expected == {
        "codes": {
            "own cmd": 1, "own region": 1, "other device cmd": NOT_AUTHORIZED,
            "other region": NOT_AUTHORIZED, "all device cmds": NOT_AUTHORIZED,
            "all regions": NOT_AUTHORIZED, "everything": NOT_AUTHORIZED,
            "registry": NOT_AUTHORIZED,
        },
        "received": ["for-my-region", "barrier"],
        "reached": [f"{topics.ROOT}/devices/<me>/state"],
    }  # fmt: skip
    for provisioned in done:
        assert provisioned.outcome == "created"
        assert await _what_a_device_may_do(mosquitto, provisioned.credentials) == expected
