"""The device registry against a real broker: provisioning's retained record, which no device
can overwrite, the revocation record, and the roles that read and write it (items 4 and 7)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from broker import dynsec
from broker.launcher import Mosquitto
from broker.provision import DynsecAdmin, revoke_device
from shared import topics
from shared.messages import DeviceRecord, DeviceState, Ping
from shared.mqtt import make_client, refused_code
from shared.settings import MqttEndpoint
from tests.conftest import device_endpoint, observer_endpoint, provision


async def retained(endpoint: MqttEndpoint, topic: str, within_s: float = 1.5) -> bytes | None:
    """The retained message on `topic` as `endpoint` reads it; None when there is none."""
    async with make_client(endpoint, identifier=f"test-reader-{uuid.uuid4().hex[:8]}") as client:
        assert refused_code(await client.subscribe(topic, qos=1)) is None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes):
                        return message.payload
    return None


async def record(
    mosquitto: Mosquitto, device_id: str, identity: str = "controller"
) -> DeviceRecord:
    payload = await retained(mosquitto.endpoint(identity), topics.device_registry(device_id))
    assert payload is not None, f"no registry record for {device_id}"
    return DeviceRecord.model_validate_json(payload)


async def test_provisioning_publishes_a_retained_record_the_controller_and_operators_read(
    mosquitto: Mosquitto,
) -> None:
    """The record names the provisioned region and type; controller and operator read it."""
    provision(mosquitto, "cam-9", "eu-west", "camera")
    for identity in ("controller", "operator"):
        got = await record(mosquitto, "cam-9", identity)
        assert (got.device_id, got.region, got.device_type, got.revoked) == (
            "cam-9",
            "eu-west",
            "camera",
            False,
        )


async def test_a_device_cannot_overwrite_its_registry_record(mosquitto: Mosquitto) -> None:
    """A device's retained publish of a forged record (its own or another's topic) is dropped."""
    provision(mosquitto, "cam-1", "eu-west", "camera")
    endpoint = device_endpoint(mosquitto, "cam-9", "eu-west", "camera")
    async with make_client(endpoint, identifier="cam-9") as device:
        for victim in ("cam-9", "cam-1"):
            forged = DeviceRecord(device_id=victim, region="us-east", device_type="gateway")
            await device.publish(
                topics.device_registry(victim), forged.to_wire(), qos=1, retain=True
            )
            await device.publish(topics.device_registry(victim), b"", qos=1, retain=True)
    for victim in ("cam-9", "cam-1"):
        got = await record(mosquitto, victim)
        assert (got.region, got.device_type, got.revoked) == ("eu-west", "camera", False)


async def test_revoke_publishes_a_revoked_record_and_clears_the_retained_state(
    mosquitto: Mosquitto,
) -> None:
    """After revoke the registry says revoked and no retained state says the device is online."""
    endpoint = device_endpoint(mosquitto, "cam-9", "eu-west", "camera")
    state = DeviceState(device_id="cam-9", region="eu-west", device_type="camera", online=True)
    operator = mosquitto.endpoint("operator")
    async with make_client(endpoint, identifier="cam-9") as device:
        await device.publish(topics.device_state("cam-9"), state.to_wire(), qos=1, retain=True)
        assert await retained(operator, topics.device_state("cam-9")) == state.to_wire()
        await revoke_device(mosquitto.endpoint("admin"), "cam-9")
    got = await record(mosquitto, "cam-9")
    assert (got.device_id, got.revoked) == ("cam-9", True)
    assert await retained(operator, topics.device_state("cam-9")) is None


def remove_acl(role: str, acl: dynsec.Acl) -> dict[str, Any]:
    return {
        "command": "removeRoleACL",
        "rolename": role,
        "acltype": acl.acltype,
        "topic": acl.topic,
    }


async def test_provisioning_gives_an_older_brokers_roles_the_acls_they_lack(
    mosquitto: Mosquitto,
) -> None:
    """A broker whose roles predate the registry (those ACLs removed here) gets them back on
    the next provisioning, once each, the admin's own included; the record then reaches the
    controller."""
    roles = dynsec.service_roles()
    newer = {
        dynsec.ADMIN: (topics.ALL_DEVICE_REGISTRY, topics.ALL_DEVICE_STATES),
        dynsec.CONTROLLER: (topics.ALL_DEVICE_REGISTRY, f"{topics.RESPONSES_PREFIX}/+"),
        dynsec.OPERATOR: (topics.ALL_DEVICE_REGISTRY,),
    }
    admin = mosquitto.endpoint("admin")
    async with DynsecAdmin(admin) as api:
        answers = await api.run(
            [
                remove_acl(name, acl)
                for name in (dynsec.CONTROLLER, dynsec.OPERATOR)
                for acl in roles[name].acls
                if acl.topic in newer[name]
            ]
        )
        assert answers and all(a.error is None for a in answers), answers
        # Changing its own role disconnects the admin before any answer.
        await api.send(
            [
                remove_acl(dynsec.ADMIN, a)
                for a in roles[dynsec.ADMIN].acls
                if a.topic in newer[dynsec.ADMIN]
            ]
        )
    await asyncio.sleep(0.3)
    async with DynsecAdmin(admin) as api:
        assert set(await api.missing_service_acls()) == set(newer)
    provision(mosquitto, "cam-9", "eu-west", "camera")
    provision(mosquitto, "cam-10", "eu-west", "camera")
    async with DynsecAdmin(admin) as api:
        answers = await api.run([dynsec.get_role(name) for name in roles])
    for role, answer in zip(roles.values(), answers, strict=True):
        stored = [(a["acltype"], a["topic"]) for a in answer.data["role"]["acls"]]
        assert sorted(stored) == sorted((a.acltype, a.topic) for a in role.acls), role.name
    for device_id in ("cam-9", "cam-10"):
        assert (await record(mosquitto, device_id)).region == "eu-west"


async def test_the_controller_may_ping_and_read_the_answer(mosquitto: Mosquitto) -> None:
    """The start-up probe: the controller identity may subscribe to responses/+ and publish a
    request that reaches whoever reads the request topic."""
    observer = observer_endpoint(mosquitto)
    async with make_client(observer, identifier="test-requests-spy") as spy:
        await spy.subscribe(topics.CONTROLLER_REQUESTS, qos=1)
        async with make_client(mosquitto.endpoint("controller"), identifier="probe") as probe:
            granted = await probe.subscribe(f"{topics.RESPONSES_PREFIX}/+", qos=1)
            assert refused_code(granted) is None
            await probe.publish(topics.CONTROLLER_REQUESTS, Ping().to_wire(), qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(spy.messages))
    assert message.payload == Ping().to_wire()
