"""The dynamic-security data: password hashes in the plugin's format, roles, API messages (pure)."""

from __future__ import annotations

import base64
import json

from broker import dynsec
from shared.credentials import MqttLogin


def test_password_hash_matches_what_mosquitto_ctrl_writes() -> None:
    """Known answer: `mosquitto_ctrl dynsec init f.json admin secretpw` (2.0.11) wrote this
    salt and hash; ours is the same PBKDF2-SHA512, 101 iterations, base64."""
    salt = base64.b64decode("YmkY2gyk9W0LpdkJ")
    assert dynsec.hash_password("secretpw", salt) == {
        "password": "pN6zdLSG8wBu7kgFLLvBFjLbANYCnddgK+S0e+GCZ1+84Miq8ol4re8Jf8XXiCo/WR7uE0Vo9ClkjAzSTkUgSA==",
        "salt": "YmkY2gyk9W0LpdkJ",
        "iterations": 101,
    }
    fresh = dynsec.hash_password("secretpw")
    assert len(base64.b64decode(fresh["salt"])) == 12 and fresh["salt"] != "YmkY2gyk9W0LpdkJ"


def test_a_device_role_names_only_its_own_topics_literally() -> None:
    """Publish: own state/events/telemetry; read: own cmd and its region's cmd, no wildcards."""
    role = dynsec.device_role("cam-1", "eu-west")
    assert role.name == "hotswap-device-cam-1"
    by_type: dict[str, set[str]] = {}
    for acl in role.acls:
        assert acl.allow and "+" not in acl.topic and "#" not in acl.topic
        by_type.setdefault(acl.acltype, set()).add(acl.topic)
    assert by_type == {
        "publishClientSend": {
            "hotswap/v1/devices/cam-1/state",
            "hotswap/v1/devices/cam-1/events",
            "hotswap/v1/devices/cam-1/telemetry",
        },
        "subscribeLiteral": {"hotswap/v1/devices/cam-1/cmd", "hotswap/v1/regions/eu-west/cmd"},
        "publishClientReceive": {"hotswap/v1/devices/cam-1/cmd", "hotswap/v1/regions/eu-west/cmd"},
    }


def test_operator_cannot_publish_commands_and_controller_cannot_read_them() -> None:
    """The operator only publishes requests; the controller never reads command topics."""
    operator = {(a.acltype, a.topic) for a in dynsec.operator_role().acls}
    assert {t for kind, t in operator if kind == "publishClientSend"} == {
        "hotswap/v1/controller/requests"
    }
    controller = {(a.acltype, a.topic) for a in dynsec.controller_role().acls}
    assert not any(t.endswith("/cmd") for kind, t in controller if kind != "publishClientSend")


def test_initial_config_denies_by_default_and_binds_no_service_client_id() -> None:
    """Three identities with one role each; defaults deny publish, receive and subscribe."""
    logins = {name: MqttLogin(name, f"pw-{name}") for name in dynsec.SERVICE_IDENTITIES}
    config = json.loads(dynsec.initial_config(logins))
    assert config["defaultACLAccess"] == dynsec.DEFAULT_ACL_ACCESS
    assert not any(
        config["defaultACLAccess"][k]
        for k in ("publishClientSend", "publishClientReceive", "subscribe")
    )
    assert [(c["username"], c["roles"]) for c in config["clients"]] == [
        (name, [{"rolename": name}]) for name in dynsec.SERVICE_IDENTITIES
    ]
    assert all("clientid" not in c and "pw-" not in json.dumps(c) for c in config["clients"])


def test_answers_are_matched_to_their_request_by_correlation() -> None:
    """Each command is tagged `<correlation>:<index>`; other requests' answers are ignored."""
    body = json.loads(
        dynsec.request_body([dynsec.get_client("a"), dynsec.delete_client("a")], "abc")
    )
    assert [c["correlationData"] for c in body["commands"]] == ["abc:0", "abc:1"]
    payload = json.dumps(
        {
            "responses": [
                {
                    "command": "deleteClient",
                    "correlationData": "abc:1",
                    "error": "Client not found",
                },
                {"command": "getClient", "correlationData": "other:0", "data": {}},
                {
                    "command": "getClient",
                    "correlationData": "abc:0",
                    "data": {"client": {"username": "a"}},
                },
            ]
        }
    ).encode()
    answers = dynsec.parse_answers(payload, "abc")
    assert [(a.index, a.command, a.error) for a in answers] == [
        (1, "deleteClient", "Client not found"),
        (0, "getClient", None),
    ]
    assert answers[1].data == {"client": {"username": "a"}}
    assert dynsec.parse_answers(b"not json", "abc") == []
