"""Device provisioning and revocation, through the broker's dynamic-security API or its file.

`DynsecAdmin` sends commands on `$CONTROL/dynamic-security/v1` as the broker's
admin identity and waits for their answers. `provision_devices` (and
`provision_device`, a batch of one) creates each device's role and its
client (a random password, client id bound to the device id, the roles of the
device and of its region, see broker.dynsec) in a few bounded messages,
publishes each device's retained registry record (`hotswap/v1/registry/{id}`:
its region and type, which the controller trusts over what the device says)
and writes each device's credentials directory. The broker applies it without
a restart, but its plugin rewrites its whole file after every command, so a
device costs time in proportion to the devices already there.
`import_devices` writes the same roles and clients into the plugin's file of a
broker that is not running (one write for the whole batch), and
`provision_fleet` does that for a `Mosquitto` it restarts, then publishes the
records: the way to provision thousands (docs/security.md, "Provisioning at
scale"). `revoke_device` marks the record revoked, deletes client and device
role, which disconnects the device at once, and clears its retained state.
Every path first brings the broker's own roles up to date (a broker keeps the
roles its data directory was created with).

Does network (MQTT) and file I/O; the requests and the file's contents are
built in broker.dynsec, and which device gets what is decided by `plan_devices`,
which is pure.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt

from broker import dynsec
from broker.identities import credentials_root, ensure_identities
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
from shared.keys import load_public_key, public_pem
from shared.messages import DeviceRecord
from shared.mqtt import ListeningSession, connection_error, make_client
from shared.settings import MqttEndpoint

if TYPE_CHECKING:
    from broker.launcher import Mosquitto

Outcome = Literal["created", "replaced", "kept"]
ProgressFn = Callable[[str], None]


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
        # Batches publish many registry records at once, on purpose.
        self._client.pending_calls_threshold = 2 * RECORD_WINDOW
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
    outcome: Outcome


# ------------------------------------------------------------------ device lists


def parse_device_list(text: str, source: str) -> list[DeviceIdentity]:
    """Devices from CSV lines `id,region,type` (an `id,region,type` header, blank lines
    and `#` comments allowed); ValueError naming `source` and the line otherwise."""
    devices: list[DeviceIdentity] = []
    seen: dict[str, int] = {}
    header_allowed = True
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in row]
        if not fields or not any(fields) or fields[0].startswith("#"):
            continue
        if header_allowed and fields[0].lower() in ("id", "device_id", "deviceid"):
            header_allowed = False
            continue
        header_allowed = False
        where = f"{source} line {number}"
        if len(fields) != 3:
            raise ValueError(f"{where}: expected id,region,type, got {len(fields)} field(s)")
        try:
            device = DeviceIdentity(*fields)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if device.device_id in seen:
            raise ValueError(
                f"{where}: device {device.device_id} is already on line {seen[device.device_id]}"
            )
        seen[device.device_id] = number
        devices.append(device)
    if not devices:
        raise ValueError(f"{source} lists no devices (one `id,region,type` per line)")
    return devices


# ------------------------------------------------------------------ deciding (pure)


@dataclass(frozen=True, slots=True)
class Target:
    """A device to provision and the credentials directory it gets."""

    device: DeviceIdentity
    out: Path


@dataclass(frozen=True, slots=True)
class Found:
    """What is there already for one target: the broker's client (its role names, None when
    there is none), whether `out` holds credentials, and those credentials when they are
    the device's own (`keep_existing`)."""

    client_roles: frozenset[str] | None
    has_credentials: bool
    kept: Credentials | None = None


@dataclass(frozen=True, slots=True)
class Planned:
    target: Target
    outcome: Outcome
    kept: Credentials | None = None


def plan_devices(
    targets: Sequence[Target], found: Mapping[str, Found], *, force: bool, keep_existing: bool
) -> list[Planned]:
    """What happens to each target, or ProvisionError for the first that may not proceed.

    An existing device is refused unless `force` (replaced: a new password) or
    `keep_existing` with its own credentials in `out` (kept: nothing changes but
    its record, published again); a directory holding credentials is never
    overwritten without `force`; the broker's own identities are never devices.
    """
    planned: list[Planned] = []
    seen: set[str] = set()
    for target in targets:
        device_id = target.device.device_id
        if device_id in dynsec.SERVICE_IDENTITIES:
            raise ProvisionError(f"device id {device_id!r} is reserved for a broker identity")
        if device_id in seen:
            raise ProvisionError(f"device {device_id} is listed twice")
        seen.add(device_id)
        there = found[device_id]
        kept = there.kept if keep_existing else None
        if there.has_credentials and not force and kept is None:
            raise ProvisionError(
                f"{target.out} already holds credentials (pass --force to replace them)"
            )
        if there.client_roles is None:
            planned.append(Planned(target, "created"))
        elif dynsec.device_role_name(device_id) not in there.client_roles:
            raise ProvisionError(f"{device_id!r} is a broker identity, not a device")
        elif kept is not None:
            # Devices provisioned before the registry existed get their record here.
            planned.append(Planned(target, "kept", kept))
        elif not force:
            raise ProvisionError(
                f"device {device_id} is already provisioned "
                "(pass --force to replace its credentials)"
            )
        else:
            planned.append(Planned(target, "replaced"))
    return planned


def device_commands(
    device: DeviceIdentity, login: MqttLogin, *, client_exists: bool, role_exists: bool
) -> list[dict[str, Any]]:
    """The API commands that (re)create one device: two for a new one."""
    role = dynsec.device_role(device.device_id)
    commands = [dynsec.delete_client(device.device_id)] if client_exists else []
    if role_exists:  # the old one, or a leftover of an interrupted provisioning
        commands.append(dynsec.delete_role(role.name))
    return [
        *commands,
        dynsec.create_role(role),
        dynsec.create_client(login, dynsec.device_role_names(device.device_id, device.region)),
    ]


# ------------------------------------------------------------------ credentials directories


@dataclass(frozen=True, slots=True)
class _DirSources:
    """The bytes every device directory of a batch shares, read once."""

    controller_pub: bytes
    ca: bytes | None
    trusted: dict[str, bytes]

    @classmethod
    def read(cls, admin_dir: Path, trusted_keys: Sequence[Path]) -> _DirSources:
        command_pub = admin_dir / COMMAND_PUB_FILE
        if not command_pub.is_file():
            raise CredentialsError(f"credentials file {command_pub} is missing")
        trusted = {key_file_name(k): k.read_bytes() for k in trusted_keys}  # loads (checks) each
        ca = admin_dir / CA_FILE
        return cls(command_pub.read_bytes(), ca.read_bytes() if ca.is_file() else None, trusted)


def _put(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` through a temp file and a rename (never half-written); no fsync here:
    a batch syncs once at its end (`_sync`)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sync() -> None:
    """Flush what a batch wrote to disk, once for all its files."""
    os.sync()


def _write_device_dir(
    out: Path, device: DeviceIdentity, login: MqttLogin, sources: _DirSources
) -> Credentials:
    private_dir(out)
    _put(out / MQTT_FILE, login_json(login), 0o600)
    _put(out / DEVICE_FILE, device_json(device))
    _put(out / CONTROLLER_KEY_FILE, sources.controller_pub)
    if sources.ca is not None:
        _put(out / CA_FILE, sources.ca)
    trusted_dir = out / TRUSTED_DIR
    if trusted_dir.is_dir():  # --force: the keys given now replace the old ones
        shutil.rmtree(trusted_dir)
    if sources.trusted:
        trusted_dir.mkdir()
    for name, data in sources.trusted.items():
        _put(trusted_dir / name, data)
    return Credentials(
        directory=out,
        login=login,
        ca_file=out / CA_FILE if sources.ca is not None else None,
        device=device,
        trusted_keys=tuple(sorted(trusted_dir / name for name in sources.trusted)),
        controller_key=out / CONTROLLER_KEY_FILE,
    )


def _add_client_cert(tls_dir: Path, out: Path, creds: Credentials) -> Credentials:
    """A client certificate whose CN is the device id: its identity on the certificate listener."""
    issued = add_client_cert(tls_dir, creds.login.username, force=True)
    _put(out / CA_FILE, (tls_dir / CA_FILE).read_bytes())
    _put(out / CLIENT_CERT_FILE, issued.cert.read_bytes())
    _put(out / CLIENT_KEY_FILE, issued.key.read_bytes(), 0o600)
    return load_credentials(out)


def _kept_credentials(out: Path, device: DeviceIdentity) -> Credentials | None:
    """`out`'s credentials if they are this device's (same identity), else None."""
    if not (out / MQTT_FILE).exists():
        return None
    creds = load_credentials(out)
    if creds.login.username != device.device_id or creds.device != device:
        raise ProvisionError(f"{out} holds the credentials of another identity")
    return creds


def _local_findings(
    targets: Sequence[Target], clients: Mapping[str, frozenset[str] | None], keep_existing: bool
) -> dict[str, Found]:
    return {
        t.device.device_id: Found(
            client_roles=clients.get(t.device.device_id),
            has_credentials=(t.out / MQTT_FILE).exists(),
            kept=_kept_credentials(t.out, t.device) if keep_existing else None,
        )
        for t in targets
    }


def _check_targets(targets: Sequence[Target]) -> None:
    """Refusals that need no broker, before anything is asked of it."""
    plan_devices(
        targets,
        {t.device.device_id: Found(None, False) for t in targets},
        force=True,
        keep_existing=False,
    )


class _Reporter:
    """Progress lines at about every tenth of a phase (and its end)."""

    def __init__(self, progress: ProgressFn | None, what: str, total: int) -> None:
        self.progress, self.what, self.total = progress, what, total
        self.step = max(1, total // 10)
        self.next = self.step

    def done(self, count: int) -> None:
        if self.progress is not None and self.total and (count >= self.next or count == self.total):
            self.progress(f"{self.what}: {count}/{self.total}")
            while self.next <= count:
                self.next += self.step


# ------------------------------------------------------------------ through the API


MAX_COMMANDS = 50  # per API message: the broker answers each message in one go
MAX_MESSAGE_BYTES = 256 * 1024  # well under the broker's 1 MiB packet limit
RECORD_WINDOW = 500  # registry records in flight at once
READ_CHUNK = 100  # devices per read message (two reads each)


@dataclass(frozen=True, slots=True)
class _BrokerView:
    """What the broker holds for a batch: each device's client roles (None: no client),
    the device roles that exist, and the stored region roles by name."""

    clients: dict[str, frozenset[str] | None]
    device_roles: frozenset[str]
    region_roles: dict[str, dict[str, Any]]


async def _read_broker(
    api: DynsecAdmin, device_ids: Sequence[str], regions: Sequence[str]
) -> _BrokerView:
    """Reads only (the plugin writes nothing for them): a device's client and role, two
    commands per device in messages of READ_CHUNK devices, the regions' roles in the first."""
    clients: dict[str, frozenset[str] | None] = {}
    device_roles: set[str] = set()
    region_roles: dict[str, dict[str, Any]] = {}
    region_names = [dynsec.region_role_name(r) for r in regions]
    for index, chunk in enumerate(_chunks(list(device_ids), READ_CHUNK) or [[]]):
        commands = [
            c
            for d in chunk
            for c in (dynsec.get_client(d), dynsec.get_role(dynsec.device_role_name(d)))
        ]
        extra = region_names if index == 0 else []
        answers = await api.run(commands + [dynsec.get_role(n) for n in extra])
        for i, device_id in enumerate(chunk):
            client = _stored(answers[2 * i], "client", f"getClient {device_id}")
            clients[device_id] = None if client is None else frozenset(_role_names(client))
            if _stored(answers[2 * i + 1], "role", f"getRole for {device_id}") is not None:
                device_roles.add(dynsec.device_role_name(device_id))
        for name, answer in zip(extra, answers[len(commands) :], strict=True):
            if (stored := _stored(answer, "role", f"getRole {name}")) is not None:
                region_roles[name] = stored
    return _BrokerView(clients, frozenset(device_roles), region_roles)


def _stored(answer: dynsec.Answer, key: str, what: str) -> dict[str, Any] | None:
    """The client or role a read answered with; None when the plugin has none."""
    if answer.error is not None:
        if "not found" in answer.error.lower():
            return None
        raise BrokerError(f"{what}: {answer.error}")
    item = answer.data.get(key)
    return item if isinstance(item, dict) else {}


def region_commands(
    regions: set[str], stored: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Create the regions' roles the broker lacks, add the ACLs a stored one lacks."""
    commands: list[dict[str, Any]] = []
    for role in (dynsec.region_role(r) for r in sorted(regions)):
        if role.name not in stored:
            commands.append(dynsec.create_role(role))
        else:
            missing = dynsec.missing_acls(role, stored[role.name])
            commands += [dynsec.add_role_acl(role.name, a) for a in missing]
    return commands


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def publish_records(
    admin: MqttEndpoint, devices: Sequence[DeviceIdentity], *, progress: ProgressFn | None = None
) -> None:
    """Publish the devices' retained registry records (e.g. after `import_devices`)."""
    async with DynsecAdmin(admin) as api:
        await _publish_records(api, devices, progress)


async def _publish_records(
    api: DynsecAdmin, devices: Sequence[DeviceIdentity], progress: ProgressFn | None = None
) -> None:
    """Every device's record, up to RECORD_WINDOW of them awaiting their PUBACK at once."""
    report = _Reporter(progress, "registry records", len(devices))
    for start in range(0, len(devices), RECORD_WINDOW):
        window = devices[start : start + RECORD_WINDOW]
        await asyncio.gather(*(_publish_record(api, d) for d in window))
        report.done(start + len(window))


async def _publish_record(api: DynsecAdmin, device: DeviceIdentity) -> None:
    record = DeviceRecord(
        device_id=device.device_id, region=device.region, device_type=device.device_type
    )
    await api.publish_retained(topics.device_registry(device.device_id), record.to_wire())


async def provision_devices(
    admin: MqttEndpoint,
    admin_dir: Path,
    devices: Sequence[DeviceIdentity],
    out_dir: Path,
    *,
    trusted_keys: Sequence[Path] = (),
    force: bool = False,
    keep_existing: bool = False,
    tls_dir: Path | None = None,
    progress: ProgressFn | None = None,
    answer_timeout_s: float = 60.0,
) -> list[Provisioned]:
    """Create `devices` on the running broker; each gets the directory `out_dir/<device id>`.

    The batch form of `provision_device` (same arguments, same refusals, checked
    for every device before the broker changes): reads in messages of 200
    commands, then two commands per new device in messages of at most
    MAX_COMMANDS, then the registry records without waiting for them one by
    one. Each message's devices get their directories as soon as the broker has
    answered it, so an interrupted batch leaves devices either complete or
    absent; run it again with `keep_existing`. `answer_timeout_s` bounds each message's
    answer. Progress lines go to `progress`.
    """
    targets = [Target(d, out_dir / d.device_id) for d in devices]
    return await _provision(
        admin, admin_dir, targets, trusted_keys=trusted_keys, force=force,
        keep_existing=keep_existing, tls_dir=tls_dir, progress=progress,
        answer_timeout_s=answer_timeout_s,
    )  # fmt: skip


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
    (done,) = await _provision(
        admin, admin_dir, [Target(device, out)], trusted_keys=trusted_keys, force=force,
        keep_existing=keep_existing, tls_dir=tls_dir, progress=None, answer_timeout_s=10.0,
    )  # fmt: skip
    return done


async def _provision(
    admin: MqttEndpoint,
    admin_dir: Path,
    targets: Sequence[Target],
    *,
    trusted_keys: Sequence[Path],
    force: bool,
    keep_existing: bool,
    tls_dir: Path | None,
    progress: ProgressFn | None,
    answer_timeout_s: float,
) -> list[Provisioned]:
    _check_targets(targets)
    sources = _DirSources.read(admin_dir, trusted_keys)
    await update_service_roles(admin)
    async with DynsecAdmin(admin, timeout=answer_timeout_s) as api:
        view = await _read_broker(
            api,
            [t.device.device_id for t in targets],
            sorted({t.device.region for t in targets}),
        )
        found = _local_findings(targets, view.clients, keep_existing)
        plan = plan_devices(targets, found, force=force, keep_existing=keep_existing)
        making = [p for p in plan if p.outcome != "kept"]
        regions = region_commands({p.target.device.region for p in making}, view.region_roles)
        done: dict[str, Provisioned] = {
            p.target.device.device_id: Provisioned(p.kept, "kept")
            for p in plan
            if p.kept is not None
        }
        logins = {
            p.target.device.device_id: MqttLogin(
                p.target.device.device_id,
                dynsec.new_password(),
                client_id=p.target.device.device_id,
            )
            for p in making
        }
        units = [
            device_commands(
                p.target.device,
                logins[p.target.device.device_id],
                client_exists=p.outcome == "replaced",
                role_exists=dynsec.device_role_name(p.target.device.device_id) in view.device_roles,
            )
            for p in making
        ]
        report = _Reporter(progress, "devices on the broker", len(making))
        created = 0
        # The regions' roles are the first unit (they come before the devices that hold
        # them); a message never splits a unit, so each message's devices are complete.
        units = [regions, *units] if regions else units
        offset = 1 if regions else 0
        for group in dynsec.batches(units, max_commands=MAX_COMMANDS, max_bytes=MAX_MESSAGE_BYTES):
            answers = await api.run([command for i in group for command in units[i]])
            first = len(regions) if group[0] == 0 and offset else 0
            # Another provisioning may have created the same region's role meanwhile.
            _check_answers([a for a in answers[:first] if "exists" not in (a.error or "")])
            _check_answers(answers[first:], tolerated=("deleteRole",))
            for p in (making[i - offset] for i in group if i >= offset):
                device = p.target.device
                creds = _write_device_dir(p.target.out, device, logins[device.device_id], sources)
                if tls_dir is not None:
                    creds = _add_client_cert(tls_dir, p.target.out, creds)
                done[device.device_id] = Provisioned(creds, p.outcome)
                created += 1
            report.done(created)
        _sync()
        await _publish_records(api, [p.target.device for p in plan], progress)
    return [done[t.device.device_id] for t in targets]


# ------------------------------------------------------------------ into the plugin's file


def broker_is_running(data_dir: Path) -> bool:
    """Whether a broker started for `data_dir` (its rendered mosquitto.conf) accepts connections."""
    conf = data_dir / "mosquitto.conf"
    if not conf.is_file():
        return False
    for line in conf.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "listener" and parts[1].isdigit():
            host = parts[2] if len(parts) > 2 else "127.0.0.1"
            try:
                with socket.create_connection((host, int(parts[1])), timeout=0.5):
                    return True
            except OSError:
                continue
    return False


def import_devices(
    data_dir: Path,
    devices: Sequence[DeviceIdentity],
    out_dir: Path,
    *,
    trusted_keys: Sequence[Path] = (),
    force: bool = False,
    keep_existing: bool = False,
    tls_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[Provisioned]:
    """Write `devices` into the plugin's file of the broker of `data_dir`, which must not run.

    The same roles, clients, refusals and directories (`out_dir/<device id>`) as
    `provision_devices`, at the cost of one write of the plugin's file for the
    whole batch: the broker loads them when it starts. Creates the broker's
    identities first if `data_dir` has none. Publishes no registry records (the
    broker is not running): `publish_records`, or `provision_devices` with
    `keep_existing`, does once it runs.
    """
    if broker_is_running(data_dir):
        raise ProvisionError(
            f"the broker of {data_dir} is running: stop it first, or provision through it "
            "(`hotswap device provision --from-file`)"
        )
    targets = [Target(d, out_dir / d.device_id) for d in devices]
    _check_targets(targets)
    config_path = ensure_identities(data_dir)
    sources = _DirSources.read(credentials_root(data_dir) / "admin", trusted_keys)
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ProvisionError(f"{config_path} is not the plugin's JSON: {exc}") from None
    clients = {name: frozenset(roles) for name, roles in dynsec.config_clients(config).items()}
    plan = plan_devices(
        targets, _local_findings(targets, clients, keep_existing),
        force=force, keep_existing=keep_existing,
    )  # fmt: skip
    making = [p for p in plan if p.outcome != "kept"]
    logins = {
        p.target.device.device_id: MqttLogin(
            p.target.device.device_id, dynsec.new_password(), client_id=p.target.device.device_id
        )
        for p in making
    }
    merged = dynsec.add_devices(
        config,
        [
            dynsec.NewDevice(
                logins[p.target.device.device_id], p.target.device.device_id, p.target.device.region
            )
            for p in making
        ],
        replace=frozenset(p.target.device.device_id for p in making if p.outcome == "replaced"),
    )
    # Compact (the C encoder; the plugin writes it indented again at its next change).
    write_secret(config_path, (json.dumps(merged) + "\n").encode())
    if progress is not None:
        progress(f"wrote {len(making)} devices into {config_path}")
    done: dict[str, Provisioned] = {
        p.target.device.device_id: Provisioned(p.kept, "kept") for p in plan if p.kept is not None
    }
    report = _Reporter(progress, "credentials directories", len(making))
    for count, p in enumerate(making, start=1):
        device = p.target.device
        creds = _write_device_dir(p.target.out, device, logins[device.device_id], sources)
        if tls_dir is not None:
            creds = _add_client_cert(tls_dir, p.target.out, creds)
        done[device.device_id] = Provisioned(creds, p.outcome)
        report.done(count)
    _sync()
    return [done[t.device.device_id] for t in targets]


async def provision_fleet(
    broker: Mosquitto,
    devices: Sequence[DeviceIdentity],
    out_dir: Path,
    *,
    trusted_keys: Sequence[Path] = (),
    force: bool = False,
    keep_existing: bool = False,
    tls_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[Provisioned]:
    """Provision many devices on a broker this process runs: stop, import, start, records.

    `import_devices` into `broker`'s data directory (stopped first if it runs:
    its clients are disconnected once, and persistent sessions and retained
    messages survive), then start it, bring its service roles up to date and
    publish every device's registry record. The broker runs afterwards.
    """
    if broker.process is not None:
        broker.stop()
    done = await asyncio.to_thread(
        import_devices, broker.data_dir, devices, out_dir, trusted_keys=trusted_keys,
        force=force, keep_existing=keep_existing, tls_dir=tls_dir, progress=progress,
    )  # fmt: skip
    await asyncio.to_thread(broker.start)
    admin = broker.endpoint("admin")
    await update_service_roles(admin)
    await publish_records(admin, devices, progress=progress)
    return done


# ------------------------------------------------------------------ revocation


async def revoke_device(admin: MqttEndpoint, device_id: str) -> None:
    """Mark the device revoked, delete its client and role, clear its retained state.

    The device is disconnected and cannot log in again; the controller reads the
    revocation from the registry. The record is written first, so that a revoke
    interrupted before the deletion leaves the device refused by the controller,
    and `revoke` again completes it. The state is cleared last, once the device
    can no longer publish it (its last will went out as it was disconnected).
    Devices of either layout (a role of their own with both cmd topics, or
    their own role plus their region's) are revoked alike: the region's role
    stays, for the region's other devices. A constant number of commands,
    whatever the size of the fleet.
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
