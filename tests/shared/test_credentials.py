"""Credentials directories and the broker login they give an endpoint (files only, no broker)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from broker.tls import init_tls
from shared.credentials import (
    CredentialsError,
    DeviceIdentity,
    MqttLogin,
    apply_credentials,
    device_json,
    endpoint_for,
    load_credentials,
    login_json,
)
from shared.mqtt import tls_context
from shared.settings import parse_mqtt_url


def write_dir(path: Path, **files: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name.replace("_", ".", 1)).write_bytes(data)
    return path


def test_a_device_directory_round_trips(tmp_path: Path) -> None:
    """What provisioning writes is what `load_credentials` reads back."""
    login = MqttLogin("cam-1", "s3cret", client_id="cam-1")
    device = DeviceIdentity("cam-1", "eu-west", "camera")
    d = write_dir(tmp_path / "cam-1", mqtt_json=login_json(login), device_json=device_json(device))
    (d / "trusted").mkdir()
    (d / "trusted" / "b.pub").write_text("b")
    (d / "trusted" / "a.pub").write_text("a")
    (d / "controller.pub").write_text("c")
    creds = load_credentials(d)
    assert (creds.login, creds.device) == (login, device)
    assert [p.name for p in creds.trusted_keys] == ["a.pub", "b.pub"]
    assert creds.controller_key == d / "controller.pub"
    assert creds.ca_file is None and creds.cert_file is None and creds.command_key is None


def test_the_password_never_shows_in_text(tmp_path: Path) -> None:
    """Neither the endpoint's str() nor any repr() of login, credentials or endpoint has it."""
    d = write_dir(tmp_path, mqtt_json=login_json(MqttLogin("op", "hunter2-very-secret")))
    creds = load_credentials(d)
    endpoint = apply_credentials(parse_mqtt_url("mqtt://h:1883"), creds)
    assert str(endpoint) == "mqtt://op@h:1883"
    for text in (str(endpoint), repr(endpoint), repr(creds), repr(creds.login)):
        assert "hunter2" not in text


def test_tls_files_apply_to_mqtts_only(tmp_path: Path) -> None:
    """The CA and client certificate reach an mqtts:// endpoint, never a plain one."""
    d = write_dir(
        tmp_path,
        mqtt_json=login_json(MqttLogin("u", "p")),
        ca_crt=b"ca",
        client_crt=b"crt",
        client_key=b"key",
    )
    plain = endpoint_for(parse_mqtt_url("mqtt://h"), d)
    tls = endpoint_for(parse_mqtt_url("mqtts://h"), d)
    assert (plain.username, plain.password, plain.ca_file, plain.cert_file) == (
        "u",
        "p",
        None,
        None,
    )
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (
        d / "ca.crt",
        d / "client.crt",
        d / "client.key",
    )
    assert endpoint_for(parse_mqtt_url("mqtt://h"), None) == parse_mqtt_url("mqtt://h")


def test_tls_context_verifies_against_the_ca_and_presents_the_client_certificate(
    tmp_path: Path,
) -> None:
    """mqtts:// with a credentials dir: hostname and chain checked against its CA; the client
    certificate is loaded (a mismatched key is refused when the context is built)."""
    files = init_tls(tmp_path / "tls", clients=["cam-1"])
    cam = files.client("cam-1")
    d = write_dir(
        tmp_path / "creds",
        mqtt_json=login_json(MqttLogin("cam-1", "p")),
        ca_crt=files.ca_cert.read_bytes(),
        client_crt=cam.cert.read_bytes(),
        client_key=cam.key.read_bytes(),
    )
    context = tls_context(endpoint_for(parse_mqtt_url("mqtts://localhost"), d))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    (ca,) = context.get_ca_certs()
    assert dict(pair for rdn in ca["subject"] for pair in rdn)["commonName"] == "hotswap CA"
    (d / "client.key").write_bytes(files.server_key.read_bytes())
    with pytest.raises(ssl.SSLError):
        tls_context(endpoint_for(parse_mqtt_url("mqtts://localhost"), d))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"mqtt\.json is missing"),
        ({"mqtt_json": b"[1]"}, r"mqtt\.json is not a JSON object"),
        ({"mqtt_json": json.dumps({"username": "", "password": "p"}).encode()}, "no valid 'username'"),
        ({"mqtt_json": json.dumps({"username": "u", "password": "p", "clientId": 5}).encode()}, "no valid 'clientId'"),
        ({"mqtt_json": login_json(MqttLogin("u", "p")), "device_json": b"{}"}, r"device\.json has no valid 'deviceId'"),
        ({"mqtt_json": login_json(MqttLogin("u", "p")), "client_key": b"k"}, r"client\.crt is missing"),
    ],
)  # fmt: skip
def test_missing_or_garbled_files_are_named(
    tmp_path: Path, files: dict[str, bytes], message: str
) -> None:
    """Each problem is one CredentialsError (exit 2 in the CLI) naming the file."""
    d = write_dir(tmp_path / "c", **files)
    with pytest.raises(CredentialsError, match=message) as err:
        load_credentials(d)
    assert err.value.reason == "bad_credentials" and len(str(err.value).splitlines()) == 1


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"credentials directory .*nowhere does not exist"):
        load_credentials(tmp_path / "nowhere")
