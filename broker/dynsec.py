"""mosquitto's dynamic-security plugin, as data: identities, ACL roles and API requests.

The broker is secure by default: no anonymous clients, every identity has a
password (or a client certificate), and every topic is denied unless a role
allows it (publish, receive and subscribe default to deny). This module holds
the roles (the ACL table of docs/security.md), the plugin's initial JSON
configuration with PBKDF2-SHA512 password hashes in the plugin's own format,
and the request/response bodies of its `$CONTROL/dynamic-security/v1` API.

A device holds two roles: its own (`hotswap-device-<id>`: its state, events
and telemetry, its cmd topic) and its region's (`hotswap-region-<r>`: the
region's cmd topic, shared by every device of the region). mosquitto 2.0's
dynsec ACLs take no `%c`/`%u` patterns, so the device role names its topics
literally. Devices provisioned before region roles existed hold one role with
both cmd topics in it; they keep working, and revoking them is the same.
`add_devices` merges devices into the plugin's config file for a broker that
is not running (bulk import, docs/security.md "Provisioning at scale").

Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from shared import topics
from shared.credentials import MqttLogin

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"

ADMIN = "hotswap-admin"
CONTROLLER = "hotswap-controller"
OPERATOR = "hotswap-operator"
SERVICE_IDENTITIES = (ADMIN, CONTROLLER, OPERATOR)
DEVICE_ROLE_PREFIX = "hotswap-device-"
REGION_ROLE_PREFIX = "hotswap-region-"

# mosquitto_ctrl's own choices: 12 bytes of salt, 101 PBKDF2-SHA512 iterations.
SALT_BYTES = 12
ITERATIONS = 101

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]

# Nothing is allowed unless a role says so, retained messages included.
DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


@dataclass(frozen=True, slots=True)
class Acl:
    acltype: AclType
    topic: str
    allow: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "allow": self.allow, "priority": 0}


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    acls: tuple[Acl, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rolename": self.name, "acls": [a.to_json() for a in self.acls]}


def _read(topic: str, *, pattern: bool = True) -> tuple[Acl, Acl]:
    """Subscribe to `topic` and receive what is published there."""
    kind: AclType = "subscribePattern" if pattern else "subscribeLiteral"
    return Acl(kind, topic), Acl("publishClientReceive", topic)


def admin_role() -> Role:
    """The dynamic-security API; the device registry; clearing a revoked device's state."""
    control = "$CONTROL/dynamic-security/#"
    return Role(
        ADMIN,
        (
            Acl("publishClientSend", control),
            *_read(control),
            Acl("publishClientSend", topics.ALL_DEVICE_REGISTRY),
            Acl("publishClientSend", topics.ALL_DEVICE_STATES),
        ),
    )


def controller_role() -> Role:
    acls: list[Acl] = []
    for topic in (
        topics.ALL_DEVICE_STATES,
        topics.ALL_DEVICE_EVENTS,
        topics.ALL_DEVICE_TELEMETRY,
        topics.ALL_DEVICE_REGISTRY,
        topics.CONTROLLER_REQUESTS,
        # Its start-up probe (is another controller answering?) reads the retained
        # controller state and the answer to its ping.
        topics.CONTROLLER_STATE,
        f"{topics.RESPONSES_PREFIX}/+",
    ):
        acls += _read(topic)
    for topic in (
        topics.ALL_DEVICE_CMDS,
        topics.ALL_REGION_CMDS,
        topics.ALL_ROLLOUT_STATUS,
        topics.CONTROLLER_STATE,
        f"{topics.RESPONSES_PREFIX}/+",
        topics.CONTROLLER_REQUESTS,  # the start-up probe's ping
    ):
        acls.append(Acl("publishClientSend", topic))
    return Role(CONTROLLER, tuple(acls))


def operator_role() -> Role:
    acls: list[Acl] = [Acl("publishClientSend", topics.CONTROLLER_REQUESTS)]
    for topic in (
        f"{topics.RESPONSES_PREFIX}/+",
        topics.ALL_ROLLOUT_STATUS,
        topics.ALL_DEVICE_STATES,
        topics.ALL_DEVICE_REGISTRY,
        topics.CONTROLLER_STATE,
    ):
        acls += _read(topic)
    return Role(OPERATOR, tuple(acls))


def service_roles() -> dict[str, Role]:
    """The broker's own roles by name (SERVICE_IDENTITIES' order)."""
    roles = (admin_role(), controller_role(), operator_role())
    return {role.name: role for role in roles}


def device_role_name(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + topics.check_ident(device_id, "device id")


def device_role(device_id: str) -> Role:
    """Publish its own state/events/telemetry; read its own cmd topic (literally)."""
    return Role(
        device_role_name(device_id),
        (
            Acl("publishClientSend", topics.device_state(device_id)),
            Acl("publishClientSend", topics.device_events(device_id)),
            Acl("publishClientSend", topics.device_telemetry(device_id)),
            *_read(topics.device_cmd(device_id), pattern=False),
        ),
    )


def region_role_name(region: str) -> str:
    return REGION_ROLE_PREFIX + topics.check_ident(region, "region")


def region_role(region: str) -> Role:
    """Read the region's cmd topic (literally): every device of the region holds it."""
    return Role(region_role_name(region), _read(topics.region_cmd(region), pattern=False))


def device_role_names(device_id: str, region: str) -> tuple[str, str]:
    """The roles a device's client holds: its own, then its region's."""
    return device_role_name(device_id), region_role_name(region)


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's stored form of a password: base64 PBKDF2-SHA512 hash, salt, iterations."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def client_json(login: MqttLogin, roles: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "username": login.username,
        "roles": [{"rolename": r} for r in roles],
        **hash_password(login.password),
    }
    if login.client_id is not None:
        body["clientid"] = login.client_id
    return body


def initial_config(logins: dict[str, MqttLogin]) -> bytes:
    """The plugin's config file for a fresh broker: admin, controller and operator.

    `logins` maps each of SERVICE_IDENTITIES to its login.
    """
    roles = service_roles()
    config = {
        "defaultACLAccess": DEFAULT_ACL_ACCESS,
        "clients": [client_json(logins[name], (name,)) for name in SERVICE_IDENTITIES],
        "groups": [],
        "roles": [roles[name].to_json() for name in SERVICE_IDENTITIES],
    }
    return (json.dumps(config, indent=2) + "\n").encode()


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device client to add to the plugin's config: its login and region."""

    login: MqttLogin
    device_id: str
    region: str


def config_clients(config: dict[str, Any]) -> dict[str, set[str]]:
    """Usernames in a plugin config (its JSON object) and the role names each holds."""
    clients: dict[str, set[str]] = {}
    for client in config.get("clients", []):
        if isinstance(client, dict) and isinstance(client.get("username"), str):
            roles = client.get("roles", [])
            clients[client["username"]] = {
                str(r.get("rolename")) for r in roles if isinstance(r, dict)
            }
    return clients


def add_devices(
    config: dict[str, Any], devices: list[NewDevice], *, replace: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """`config` (the plugin's file, parsed) with `devices`' roles and clients added.

    The clients named in `replace` are removed first, with their device roles;
    region roles are added once each (or given the ACLs they lack). What the
    plugin would do through its API, at the cost of one write of the file
    instead of one per command. Raises ValueError for a device that exists
    and is not in `replace`.
    """
    drop = {device_role_name(name) for name in replace}
    clients = [
        c
        for c in config.get("clients", [])
        if not (isinstance(c, dict) and c.get("username") in replace)
    ]
    roles = [
        r
        for r in config.get("roles", [])
        if not (isinstance(r, dict) and r.get("rolename") in drop)
    ]
    have = {str(c.get("username")) for c in clients if isinstance(c, dict)}
    by_name = {str(r.get("rolename")): r for r in roles if isinstance(r, dict)}
    for device in devices:
        if device.login.username in have:
            raise ValueError(f"device {device.login.username} is already provisioned")
        have.add(device.login.username)
        region = region_role(device.region)
        stored = by_name.get(region.name)
        if stored is None:
            by_name[region.name] = region.to_json()
            roles.append(by_name[region.name])
        else:
            stored.setdefault("acls", []).extend(a.to_json() for a in missing_acls(region, stored))
        own = device_role(device.device_id)
        if own.name in by_name:  # a leftover of an interrupted provisioning
            roles.remove(by_name[own.name])
        by_name[own.name] = own.to_json()
        roles.append(by_name[own.name])
        clients.append(
            client_json(device.login, device_role_names(device.device_id, device.region))
        )
    return {**config, "clients": clients, "roles": roles}


def batches(
    units: list[list[dict[str, Any]]], *, max_commands: int, max_bytes: int
) -> list[list[int]]:
    """Indices of `units` (each a list of commands kept together, e.g. one device's)
    grouped into API messages of at most `max_commands` commands and about `max_bytes`.

    A message is what the plugin answers in one response; a bounded one keeps
    request and response under the broker's packet limit, and the broker, which
    handles a message in one go, free to serve its other clients in between. A
    unit larger than the limits gets a message of its own.
    """
    out: list[list[int]] = []
    current: list[int] = []
    count = size = 0
    for index, unit in enumerate(units):
        cost = sum(len(json.dumps(c)) + 40 for c in unit)  # + correlation data, separators
        if current and (count + len(unit) > max_commands or size + cost > max_bytes):
            out.append(current)
            current, count, size = [], 0, 0
        current.append(index)
        count += len(unit)
        size += cost
    if current:
        out.append(current)
    return out


# ------------------------------------------------------------------ API requests


def create_role(role: Role) -> dict[str, Any]:
    return {"command": "createRole", **role.to_json()}


def delete_role(name: str) -> dict[str, Any]:
    return {"command": "deleteRole", "rolename": name}


def get_role(name: str) -> dict[str, Any]:
    return {"command": "getRole", "rolename": name}


def add_role_acl(role: str, acl: Acl) -> dict[str, Any]:
    return {"command": "addRoleACL", "rolename": role, **acl.to_json()}


def missing_acls(role: Role, stored: dict[str, Any]) -> list[Acl]:
    """The ACLs of `role` that `stored` (the plugin's getRole `role` object) lacks.

    A broker keeps the roles its data directory was created with; roles that
    gained ACLs since are brought up to date with these.
    """
    have = {
        (str(a.get("acltype")), str(a.get("topic")), bool(a.get("allow")))
        for a in stored.get("acls", [])
        if isinstance(a, dict)
    }
    return [a for a in role.acls if (a.acltype, a.topic, a.allow) not in have]


def create_client(login: MqttLogin, roles: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command": "createClient",
        "username": login.username,
        "password": login.password,
        "roles": [{"rolename": r} for r in roles],
    }
    if login.client_id is not None:
        body["clientid"] = login.client_id
    return body


def delete_client(username: str) -> dict[str, Any]:
    return {"command": "deleteClient", "username": username}


def get_client(username: str) -> dict[str, Any]:
    return {"command": "getClient", "username": username}


def request_body(commands: list[dict[str, Any]], correlation: str) -> bytes:
    """One API message; each command carries `correlation` plus its index."""
    tagged = [{**c, "correlationData": f"{correlation}:{i}"} for i, c in enumerate(commands)]
    return json.dumps({"commands": tagged}).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    """The plugin's answer to one command: `error` None on success, `data` its payload."""

    command: str
    index: int
    error: str | None
    data: dict[str, Any]


def parse_answers(payload: bytes, correlation: str) -> list[Answer]:
    """Answers in `payload` that belong to the request tagged `correlation`."""
    try:
        body = json.loads(payload)
    except ValueError:
        return []
    answers = []
    for item in body.get("responses", []) if isinstance(body, dict) else []:
        if not isinstance(item, dict):
            continue
        tag = str(item.get("correlationData", ""))
        owner, _, index = tag.rpartition(":")
        if owner != correlation or not index.isdigit():
            continue
        error = item.get("error")
        data = item.get("data")
        answers.append(
            Answer(
                command=str(item.get("command", "")),
                index=int(index),
                error=str(error) if error else None,
                data=data if isinstance(data, dict) else {},
            )
        )
    return answers
