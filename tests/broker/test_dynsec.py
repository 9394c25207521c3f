"""The dynamic-security data: password hashes in the plugin's format, roles, API messages (pure)."""

from __future__ import annotations

import base64
import json

import pytest

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
    """Publish: own state/events/telemetry; read: own cmd only, no wildcards; the region's cmd
    topic is its region role's, which every device of the region holds."""
    role = dynsec.device_role("cam-1")
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
        "subscribeLiteral": {"hotswap/v1/devices/cam-1/cmd"},
        "publishClientReceive": {"hotswap/v1/devices/cam-1/cmd"},
    }
    region = dynsec.region_role("eu-west")
    assert (region.name, {(a.acltype, a.topic, a.allow) for a in region.acls}) == (
        "hotswap-region-eu-west",
        {
            ("subscribeLiteral", "hotswap/v1/regions/eu-west/cmd", True),
            ("publishClientReceive", "hotswap/v1/regions/eu-west/cmd", True),
        },
    )
    assert dynsec.device_role_names("cam-1", "eu-west") == (role.name, region.name)


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


def test_batches_keep_each_device_whole_and_within_the_bounds() -> None:
    """Units (one device's commands) are never split; a message holds at most max_commands
    commands and about max_bytes; a unit larger than the bounds travels alone."""
    units = [[dynsec.get_client(f"d{i}")] * (1 + i % 3) for i in range(40)]
    groups = dynsec.batches(units, max_commands=7, max_bytes=10_000)
    assert [i for g in groups for i in g] == list(range(40))
    assert all(sum(len(units[i]) for i in g) <= 7 for g in groups)
    big = [[dynsec.get_client("x" * 60)] * 3, [dynsec.get_client("y")]]
    assert dynsec.batches(big, max_commands=2, max_bytes=50) == [[0], [1]]


def test_add_devices_writes_what_the_api_would_and_refuses_duplicates() -> None:
    """Each device: its own role and a client holding it and its region's role (created once);
    a replaced device loses its old client and role; an existing one is refused."""
    logins = {name: MqttLogin(name, f"pw-{name}") for name in dynsec.SERVICE_IDENTITIES}
    config = json.loads(dynsec.initial_config(logins))
    new = [
        dynsec.NewDevice(MqttLogin(d, "pw", client_id=d), d, r)
        for d, r in (("cam-1", "eu-west"), ("cam-2", "eu-west"), ("cam-3", "us-east"))
    ]
    merged = dynsec.add_devices(config, new)
    assert dynsec.config_clients(merged)["cam-2"] == {
        "hotswap-device-cam-2",
        "hotswap-region-eu-west",
    }
    roles = [r["rolename"] for r in merged["roles"]]
    assert roles.count("hotswap-region-eu-west") == 1 and "hotswap-region-us-east" in roles
    cam1 = next(c for c in merged["clients"] if c["username"] == "cam-1")
    assert cam1["clientid"] == "cam-1" and "pw" not in json.dumps(cam1)
    with pytest.raises(ValueError, match="cam-1 is already provisioned"):
        dynsec.add_devices(merged, new[:1])
    moved = dynsec.NewDevice(MqttLogin("cam-1", "pw2", client_id="cam-1"), "cam-1", "ap-south")
    again = dynsec.add_devices(merged, [moved], replace=frozenset({"cam-1"}))
    assert dynsec.config_clients(again)["cam-1"] == {
        "hotswap-device-cam-1",
        "hotswap-region-ap-south",
    }
    assert [c["username"] for c in again["clients"]].count("cam-1") == 1
    assert [r["rolename"] for r in again["roles"]].count("hotswap-device-cam-1") == 1
