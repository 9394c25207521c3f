"""Credentials directories: who a participant is to the broker, and which keys it trusts.

A credentials directory is what `hotswap broker run` writes for the controller,
an operator and the broker's admin, and what `hotswap device provision` writes
for a device; every command that connects takes one with `--credentials DIR`:

    mqtt.json        {"username", "password", "clientId"?}  (clientId: the only
                     client id the broker accepts for this identity)
    ca.crt           the CA the broker's TLS certificate chains to (optional)
    client.crt/.key  a TLS client certificate and its key (optional, together)
    device.json      devices: {"deviceId", "region", "deviceType"}
    trusted/*.pub    devices: operator public keys they accept manifests from
    controller.pub   devices: the controller's command key (public half)
    command.key/.pub controller: its command-signing key pair
    command.pub      admin: the controller's command key, handed to devices

Reading is file I/O only (no network); the serialisers are pure, and the
broker side writes them with `write_secret` (0600 files in 0700 directories).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared import topics
from shared.errors import HotswapError
from shared.keys import write_atomic
from shared.settings import MqttEndpoint

MQTT_FILE = "mqtt.json"
DEVICE_FILE = "device.json"
CA_FILE = "ca.crt"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"
TRUSTED_DIR = "trusted"
CONTROLLER_KEY_FILE = "controller.pub"
COMMAND_KEY_FILE = "command.key"
COMMAND_PUB_FILE = "command.pub"


class CredentialsError(HotswapError):
    """A credentials directory or one of its files is missing or unreadable."""

    reason = "bad_credentials"


@dataclass(frozen=True, slots=True)
class MqttLogin:
    """A broker identity: username, password and the client id it is bound to."""

    username: str
    password: str = field(repr=False)
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    device_id: str
    region: str
    device_type: str

    def __post_init__(self) -> None:
        topics.check_ident(self.device_id, "device id")
        topics.check_ident(self.region, "region")
        topics.check_ident(self.device_type, "device type")


@dataclass(frozen=True, slots=True)
class Credentials:
    """One credentials directory, read and checked; paths point into it."""

    directory: Path
    login: MqttLogin
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    device: DeviceIdentity | None = None
    trusted_keys: tuple[Path, ...] = ()
    controller_key: Path | None = None
    command_key: Path | None = None
    command_pub: Path | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {path} is missing") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise CredentialsError(f"credentials file {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"credentials file {path} is not a JSON object")
    return data


def _text_field(data: dict[str, Any], key: str, path: Path, *, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise CredentialsError(f"credentials file {path} has no valid {key!r}")
    return value


def parse_login(data: dict[str, Any], path: Path) -> MqttLogin:
    """An mqtt.json object → MqttLogin; CredentialsError naming `path` when malformed."""
    return MqttLogin(
        username=_text_field(data, "username", path),
        password=_text_field(data, "password", path),
        client_id=_text_field(data, "clientId", path, optional=True),
    )


def parse_device(data: dict[str, Any], path: Path) -> DeviceIdentity:
    """A device.json object → DeviceIdentity; CredentialsError naming `path` when malformed."""
    values = [_text_field(data, k, path) for k in ("deviceId", "region", "deviceType")]
    try:
        return DeviceIdentity(*values)
    except ValueError as exc:
        raise CredentialsError(f"credentials file {path}: {exc}") from None


def login_json(login: MqttLogin) -> bytes:
    body: dict[str, str] = {"username": login.username, "password": login.password}
    if login.client_id is not None:
        body["clientId"] = login.client_id
    return (json.dumps(body, indent=2) + "\n").encode()


def device_json(device: DeviceIdentity) -> bytes:
    body = {"deviceId": device.device_id, "region": device.region, "deviceType": device.device_type}
    return (json.dumps(body, indent=2) + "\n").encode()


def _optional(directory: Path, name: str) -> Path | None:
    path = directory / name
    return path if path.is_file() else None


def load_credentials(directory: Path) -> Credentials:
    """Read and check a credentials directory (files only; keys are loaded by their users)."""
    if not directory.is_dir():
        raise CredentialsError(f"credentials directory {directory} does not exist")
    mqtt_path = directory / MQTT_FILE
    login = parse_login(_read_json(mqtt_path), mqtt_path)
    cert, key = _optional(directory, CLIENT_CERT_FILE), _optional(directory, CLIENT_KEY_FILE)
    if (cert is None) != (key is None):
        missing = directory / (CLIENT_KEY_FILE if key is None else CLIENT_CERT_FILE)
        raise CredentialsError(f"credentials file {missing} is missing (certificate needs its key)")
    device_path = directory / DEVICE_FILE
    device = parse_device(_read_json(device_path), device_path) if device_path.exists() else None
    trusted_dir = directory / TRUSTED_DIR
    trusted = tuple(sorted(trusted_dir.glob("*.pub"))) if trusted_dir.is_dir() else ()
    return Credentials(
        directory=directory,
        login=login,
        ca_file=_optional(directory, CA_FILE),
        cert_file=cert,
        key_file=key,
        device=device,
        trusted_keys=trusted,
        controller_key=_optional(directory, CONTROLLER_KEY_FILE),
        command_key=_optional(directory, COMMAND_KEY_FILE),
        command_pub=_optional(directory, COMMAND_PUB_FILE),
    )


def apply_credentials(endpoint: MqttEndpoint, credentials: Credentials) -> MqttEndpoint:
    """`endpoint` authenticated as `credentials` (TLS files apply to mqtts:// only)."""
    return replace(
        endpoint,
        username=credentials.login.username,
        password=credentials.login.password,
        ca_file=credentials.ca_file if endpoint.tls else None,
        cert_file=credentials.cert_file if endpoint.tls else None,
        key_file=credentials.key_file if endpoint.tls else None,
    )


def endpoint_for(endpoint: MqttEndpoint, directory: Path | None) -> MqttEndpoint:
    """`endpoint` with the credentials in `directory` applied; unchanged when None."""
    if directory is None:
        return endpoint
    return apply_credentials(endpoint, load_credentials(directory))


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: it holds secrets."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600."""
    write_atomic(path, data, mode=0o600)
