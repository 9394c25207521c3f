"""Provisioning for the fleet benchmark: device identities and the bench's own raw client.

`provision_fleet` gives every simulated device its own broker login (client id
= device id, its own dynamic-security role), its retained registry record
(what the controller trusts) and its credentials directory, with
`broker.provision`'s batch API: through the running broker's
dynamic-security API (`provision_devices`), or, with `how="import"`, written
into the plugin's file of the stopped broker (`provision_fleet`).

`create_raw_identity` adds the login the raw baselines use (plain paho, no
controller): it may publish on every device and region cmd topic and every
device's telemetry topic (P5's raw source), and read every device's state,
events and telemetry. Does network (MQTT) and file I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from broker import dynsec, provision
from broker.launcher import Mosquitto
from broker.provision import DynsecAdmin, ProvisionError
from shared import topics
from shared.credentials import DeviceIdentity, MqttLogin

RAW_IDENTITY = "hotswap-bench-raw"


async def provision_fleet(
    broker: Mosquitto, devices: Sequence[DeviceIdentity], out: Path, *, how: str = "api"
) -> dict[str, MqttLogin]:
    """Provision `devices` (credentials directories under `out`); each device's login.

    `how`: "api" through the running broker's dynamic-security API
    (`broker.provision.provision_devices`, batched messages), "import" into the
    plugin's file of the broker, restarted (`broker.provision.provision_fleet`).
    """
    if how == "import":
        done = await provision.provision_fleet(broker, devices, out)
    else:
        admin, admin_dir = broker.endpoint("admin"), broker.credentials("admin")
        done = await provision.provision_devices(admin, admin_dir, devices, out)
    return {d.device_id: p.credentials.login for d, p in zip(devices, done, strict=True)}


def raw_role() -> dynsec.Role:
    acls: list[dynsec.Acl] = [
        dynsec.Acl("publishClientSend", topics.ALL_DEVICE_CMDS),
        dynsec.Acl("publishClientSend", topics.ALL_REGION_CMDS),
        # The ingest benchmark's raw source sends windows in every device's name.
        dynsec.Acl("publishClientSend", topics.ALL_DEVICE_TELEMETRY),
    ]
    for topic in (topics.ALL_DEVICE_EVENTS, topics.ALL_DEVICE_TELEMETRY, topics.ALL_DEVICE_STATES):
        acls += [dynsec.Acl("subscribePattern", topic), dynsec.Acl("publishClientReceive", topic)]
    return dynsec.Role(RAW_IDENTITY, tuple(acls))


async def create_raw_identity(broker: Mosquitto) -> MqttLogin:
    """The raw baseline's login (not bound to a client id: it runs several clients)."""
    login = MqttLogin(RAW_IDENTITY, dynsec.new_password())
    role = raw_role()
    async with DynsecAdmin(broker.endpoint("admin")) as api:
        answers = await api.run(
            [dynsec.create_role(role), dynsec.create_client(login, (role.name,))]
        )
    for answer in answers:
        if answer.error is not None:
            raise ProvisionError(f"the broker refused {answer.command}: {answer.error}")
    return login
