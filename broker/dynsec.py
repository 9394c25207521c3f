"""mosquitto's dynamic-security plugin, as data: identities, ACL roles and API requests.

The broker is secure by default: no anonymous clients, every identity has a
password (or a client certificate), and every topic is denied unless a role
allows it (publish, receive and subscribe default to deny). This module holds
the roles (the ACL table of docs/security.md), the plugin's initial JSON
configuration with PBKDF2-SHA512 password hashes in the plugin's own format,
and the request/response bodies of its `$CONTROL/dynamic-security/v1` API.

Pure: no I/O. (mosquitto 2.0's dynsec ACLs take no `%c`/`%u` patterns, so each
device gets a role of its own naming its topics literally.)
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


def device_role(device_id: str, region: str) -> Role:
    """Publish its own state/events/telemetry; read its own and its region's cmd topics."""
    return Role(
        device_role_name(device_id),
        (
            Acl("publishClientSend", topics.device_state(device_id)),
            Acl("publishClientSend", topics.device_events(device_id)),
            Acl("publishClientSend", topics.device_telemetry(device_id)),
            *_read(topics.device_cmd(device_id), pattern=False),
            *_read(topics.region_cmd(region), pattern=False),
        ),
    )


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
