"""Device provisioning and revocation through the running broker's dynamic-security API.

`DynsecAdmin` sends commands on `$CONTROL/dynamic-security/v1` as the broker's
admin identity and waits for their answers. `provision_device` creates a
device's role (its ACLs, see broker.dynsec) and its client (a random
password, client id bound to the device id), publishes the device's retained
registry record (`hotswap/v1/registry/{id}`: its region and type, which the
controller trusts over what the device says) and writes the device's
credentials directory; `revoke_device` marks the record revoked, deletes
client and role, which disconnects the device at once, and clears its
retained state. The broker applies all of it without a restart. Both first
bring the broker's own roles up to date (a broker keeps the roles its data
directory was created with).

Does network (MQTT) and file I/O; the requests themselves are built in
broker.dynsec.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt

from broker import dynsec
from broker.tls import add_client_cert
from shared import topics
from shared.credentials import (
    CA_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    COMMAND_PUB_FILE,
    CONTROLLER_KEY_FILE,
    DEVICE_FILE,
    MQTT_FILE,
    TRUSTED_DIR,
    Credentials,
    CredentialsError,
    DeviceIdentity,
    MqttLogin,
    device_json,
    load_credentials,
    login_json,
    private_dir,
    write_secret,
)
from shared.errors import BrokerError, HotswapError
from shared.keys import load_public_key, public_pem, write_atomic
from shared.messages import DeviceRecord
from shared.mqtt import ListeningSession, connection_error, make_client
from shared.settings import MqttEndpoint


class ProvisionError(HotswapError):
    """The broker refused a provisioning request (unknown or existing device, bad input)."""

    reason = "bad_request"


class DynsecAdmin(ListeningSession):
    """`async with DynsecAdmin(endpoint) as admin: answers = await admin.run([...])`."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._client = make_client(
            endpoint, identifier=f"hotswap-admin-{uuid.uuid4().hex[:12]}", timeout=timeout
        )
        self._waiting: dict[str, asyncio.Future[list[dynsec.Answer]]] = {}
        self._expected: dict[str, int] = {}
        self._collected: dict[str, list[dynsec.Answer]] = {}

    def _listen_topic(self) -> str:
        return dynsec.RESPONSE_TOPIC

    def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        for correlation, future in list(self._waiting.items()):
            got = self._collected.setdefault(correlation, [])
            got += dynsec.parse_answers(bytes(payload), correlation)
            if len(got) >= self._expected[correlation] and not future.done():
                future.set_result(sorted(got, key=lambda a: a.index))

    async def run(self, commands: list[dict[str, Any]]) -> list[dynsec.Answer]:
        """Send `commands` in one message; their answers, in order."""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[list[dynsec.Answer]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        self._expected[correlation] = len(commands)
        try:
            await self._client.publish(
                dynsec.CONTROL_TOPIC, dynsec.request_body(commands, correlation), qos=1
            )
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise BrokerError(
                f"the broker at {self.endpoint} did not answer dynamic-security commands "
                f"within {self.timeout:g}s (is its dynamic-security plugin loaded, and is "
                f"{self.endpoint.username!r} its admin?)"
            ) from None
        except aiomqtt.MqttError as exc:
            raise connection_error(self.endpoint, exc) from exc
        finally:
            for table in (self._waiting, self._expected, self._collected):
                table.pop(correlation, None)

    async def get_client(self, username: str) -> dict[str, Any] | None:
        """The plugin's record of a client, or None when there is none."""
        (answer,) = await self.run([dynsec.get_client(username)])
        if answer.error is not None:
            if "not found" in answer.error.lower():
                return None
            raise BrokerError(f"getClient {username}: {answer.error}")
        client = answer.data.get("client")
        return client if isinstance(client, dict) else {}

    async def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish `payload` retained at QoS 1 (an empty payload clears the topic)."""
        try:
            await self._client.publish(topic, payload, qos=1, retain=True, timeout=self.timeout)
        except aiomqtt.MqttError as exc:
            raise connection_error(self.endpoint, exc) from exc

    async def missing_service_acls(self) -> dict[str, list[dynsec.Acl]]:
        """The ACLs each of the broker's own roles lacks (roles with none left out)."""
        roles = dynsec.service_roles()
        answers = await self.run([dynsec.get_role(name) for name in roles])
        missing: dict[str, list[dynsec.Acl]] = {}
        for role, answer in zip(roles.values(), answers, strict=True):
            stored = answer.data.get("role")
            if answer.error is not None or not isinstance(stored, dict):
                raise BrokerError(f"getRole {role.name}: {answer.error or 'no role in the answer'}")
            if lacking := dynsec.missing_acls(role, stored):
                missing[role.name] = lacking
        return missing

    async def send(self, commands: list[dict[str, Any]]) -> None:
        """Send `commands` without waiting for answers (QoS 0: nor for the broker's ack)."""
        try:
            await self._client.publish(
                dynsec.CONTROL_TOPIC, dynsec.request_body(commands, uuid.uuid4().hex), qos=0
            )
        except aiomqtt.MqttError as exc:
            raise connection_error(self.endpoint, exc) from exc


async def update_service_roles(admin: MqttEndpoint) -> None:
    """Add the ACLs the broker's own roles gained since its data directory was created.

    mosquitto disconnects every client of a role whose ACLs change (the
    controller and operators reconnect with the new ACLs), the admin included,
    and then sends it no answer: the admin role's additions go last, unanswered,
    and a new session checks that they took.
    """
    async with DynsecAdmin(admin) as api:
        missing = await api.missing_service_acls()
        others = [
            dynsec.add_role_acl(name, acl)
            for name, acls in missing.items()
            if name != dynsec.ADMIN
            for acl in acls
        ]
        if others:
            _check_answers(await api.run(others))
        if dynsec.ADMIN not in missing:
            return
        await api.send([dynsec.add_role_acl(dynsec.ADMIN, a) for a in missing[dynsec.ADMIN]])
    for delay in (0.0, 0.2, 0.5, 1.0):
        await asyncio.sleep(delay)
        async with DynsecAdmin(admin) as api:
            if dynsec.ADMIN not in await api.missing_service_acls():
                return
    raise BrokerError(f"the broker at {admin} did not add the admin role's new ACLs")


def _role_names(client: dict[str, Any]) -> set[str]:
    roles = client.get("roles", [])
    return {str(r.get("rolename")) for r in roles if isinstance(r, dict)}


def _check_answers(answers: list[dynsec.Answer], *, tolerated: tuple[str, ...] = ()) -> None:
    for answer in answers:
        if answer.error is None:
            continue
        if answer.command in tolerated and "not found" in answer.error.lower():
            continue
        raise ProvisionError(f"the broker refused {answer.command}: {answer.error}")


def key_file_name(key_path: Path) -> str:
    """A trusted key's name in `trusted/`: its fingerprint, so equal keys collapse."""
    return hashlib.sha256(public_pem(load_public_key(key_path))).hexdigest()[:16] + ".pub"


@dataclass(frozen=True, slots=True)
class Provisioned:
    credentials: Credentials
    outcome: Literal["created", "replaced", "kept"]


async def provision_device(
    admin: MqttEndpoint,
    admin_dir: Path,
    device: DeviceIdentity,
    out: Path,
    *,
    trusted_keys: Sequence[Path] = (),
    force: bool = False,
    keep_existing: bool = False,
    tls_dir: Path | None = None,
) -> Provisioned:
    """Create `device` on the broker and write its credentials directory `out`.

    `admin_dir` is the broker's admin credentials directory: its command.pub
    becomes the device's controller.pub, its ca.crt (if any) the device's.
    Refuses an existing device unless `force` (which replaces its password) or
    `keep_existing` (the broker has the device and `out` holds its credentials:
    nothing changes; for set-ups that run provisioning on every start).
    With `tls_dir` (the broker's, with its CA key) the device also gets a client
    certificate whose CN is its id: its identity on the client-certificate listener.
    """
    if device.device_id in dynsec.SERVICE_IDENTITIES:
        raise ProvisionError(f"device id {device.device_id!r} is reserved for a broker identity")
    command_pub = admin_dir / COMMAND_PUB_FILE
    if not command_pub.is_file():
        raise CredentialsError(f"credentials file {command_pub} is missing")
    names = {key_file_name(k): k for k in trusted_keys}  # loads (checks) every key first
    kept = _kept_credentials(out, device) if keep_existing else None
    if (out / MQTT_FILE).exists() and not force and kept is None:
        raise ProvisionError(f"{out} already holds credentials (pass --force to replace them)")
    login = MqttLogin(device.device_id, dynsec.new_password(), client_id=device.device_id)
    role = dynsec.device_role(device.device_id, device.region)
    await update_service_roles(admin)
    async with DynsecAdmin(admin) as api:
        existing = await api.get_client(device.device_id)
        if existing is not None:
            if role.name not in _role_names(existing):
                raise ProvisionError(f"{device.device_id!r} is a broker identity, not a device")
            if kept is not None:
                # Devices provisioned before the registry existed get their record here.
                await _publish_record(api, device)
                return Provisioned(kept, "kept")
            if not force:
                raise ProvisionError(
                    f"device {device.device_id} is already provisioned "
                    "(pass --force to replace its credentials)"
                )
        commands = [dynsec.delete_client(device.device_id)] if existing is not None else []
        commands += [
            dynsec.delete_role(role.name),  # a leftover of an interrupted provisioning
            dynsec.create_role(role),
            dynsec.create_client(login, (role.name,)),
        ]
        _check_answers(await api.run(commands), tolerated=("deleteRole",))
        await _publish_record(api, device)
    _write_device_dir(out, device, login, admin_dir, names)
    if tls_dir is not None:
        issued = add_client_cert(tls_dir, device.device_id, force=True)
        write_atomic(out / CA_FILE, (tls_dir / CA_FILE).read_bytes())
        write_atomic(out / CLIENT_CERT_FILE, issued.cert.read_bytes())
        write_secret(out / CLIENT_KEY_FILE, issued.key.read_bytes())
    return Provisioned(load_credentials(out), "created" if existing is None else "replaced")


def _kept_credentials(out: Path, device: DeviceIdentity) -> Credentials | None:
    """`out`'s credentials if they are this device's (same identity), else None."""
    if not (out / MQTT_FILE).exists():
        return None
    creds = load_credentials(out)
    if creds.login.username != device.device_id or creds.device != device:
        raise ProvisionError(f"{out} holds the credentials of another identity")
    return creds


def _write_device_dir(
    out: Path,
    device: DeviceIdentity,
    login: MqttLogin,
    admin_dir: Path,
    trusted: dict[str, Path],
) -> None:
    private_dir(out)
    write_secret(out / MQTT_FILE, login_json(login))
    write_atomic(out / DEVICE_FILE, device_json(device))
    write_atomic(out / CONTROLLER_KEY_FILE, (admin_dir / COMMAND_PUB_FILE).read_bytes())
    if (admin_dir / CA_FILE).is_file():
        write_atomic(out / CA_FILE, (admin_dir / CA_FILE).read_bytes())
    trusted_dir = out / TRUSTED_DIR
    if trusted_dir.is_dir():  # --force: the keys given now replace the old ones
        shutil.rmtree(trusted_dir)
    for name, source in trusted.items():
        write_atomic(trusted_dir / name, source.read_bytes())


async def _publish_record(api: DynsecAdmin, device: DeviceIdentity) -> None:
    record = DeviceRecord(
        device_id=device.device_id, region=device.region, device_type=device.device_type
    )
    await api.publish_retained(topics.device_registry(device.device_id), record.to_wire())


async def revoke_device(admin: MqttEndpoint, device_id: str) -> None:
    """Mark the device revoked, delete its client and role, clear its retained state.

    The device is disconnected and cannot log in again; the controller reads the
    revocation from the registry. The record is written first, so that a revoke
    interrupted before the deletion leaves the device refused by the controller,
    and `revoke` again completes it. The state is cleared last, once the device
    can no longer publish it (its last will went out as it was disconnected).
    """
    role = dynsec.device_role_name(device_id)
    await update_service_roles(admin)
    async with DynsecAdmin(admin) as api:
        existing = await api.get_client(device_id)
        if existing is None:
            raise ProvisionError(f"unknown device {device_id!r}", reason="unknown_device")
        if role not in _role_names(existing):
            raise ProvisionError(f"{device_id!r} is a broker identity, not a device")
        revoked = DeviceRecord(device_id=device_id, revoked=True)
        await api.publish_retained(topics.device_registry(device_id), revoked.to_wire())
        answers = await api.run([dynsec.delete_client(device_id), dynsec.delete_role(role)])
        _check_answers(answers, tolerated=("deleteRole",))
        await api.publish_retained(topics.device_state(device_id), b"")
