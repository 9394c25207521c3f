"""The mosquitto launcher: a real, secure broker on a free port, persistence, clear errors."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import aiomqtt
import pytest

from broker.launcher import Mosquitto, find_mosquitto, project_config, render_config
from shared import topics
from shared.credentials import load_credentials
from shared.errors import BrokerError
from shared.keys import load_private_key, load_public_key
from shared.mqtt import make_client
from shared.settings import parse_mqtt_url

STATUS = topics.rollout_status("r-launcher")


async def test_broker_carries_messages_between_its_identities(mosquitto: Mosquitto) -> None:
    """The controller publishes a rollout status; an operator subscribed to it receives it."""
    async with make_client(mosquitto.endpoint("operator"), identifier="t-op") as operator:
        await operator.subscribe(STATUS, qos=1)
        async with make_client(mosquitto.endpoint("controller"), identifier="t-ctl") as ctl:
            await ctl.publish(STATUS, b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(operator.messages))
    assert message.payload == b"hello"


async def test_anonymous_clients_are_refused(mosquitto: Mosquitto) -> None:
    """allow_anonymous false: a client with no credentials gets CONNACK 'not authorized'."""
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with make_client(parse_mqtt_url(mosquitto.url), identifier="t-anon"):
            pass


async def test_retained_messages_and_identities_survive_a_restart(mosquitto: Mosquitto) -> None:
    """Persistence: a retained status published before restart() is there after it, and the
    credentials written on the first start still log in (they are not regenerated)."""
    before = (mosquitto.credentials("operator") / "mqtt.json").read_bytes()
    async with make_client(mosquitto.endpoint("controller"), identifier="t-2") as client:
        await client.publish(STATUS, b"kept", qos=1, retain=True)
    mosquitto.restart()
    assert (mosquitto.credentials("operator") / "mqtt.json").read_bytes() == before
    async with make_client(mosquitto.endpoint("operator"), identifier="t-3") as client:
        await client.subscribe(STATUS, qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert message.payload == b"kept" and message.retain


def test_first_start_writes_private_credentials_and_the_command_key(
    mosquitto: Mosquitto,
) -> None:
    """admin/controller/operator dirs are 0700 with 0600 secrets; the controller's command
    key pair exists and its public half is handed to the admin (for provisioning)."""
    root = mosquitto.credentials_dir
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    users = set()
    for name in ("admin", "controller", "operator"):
        directory = root / name
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / "mqtt.json").stat().st_mode) == 0o600
        users.add(load_credentials(directory).login.username)
    assert users == {"hotswap-admin", "hotswap-controller", "hotswap-operator"}
    key_file = root / "controller" / "command.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = load_private_key(key_file).public_key()
    assert load_public_key(root / "controller" / "command.pub") == public
    assert load_public_key(root / "admin" / "command.pub") == public
    dynsec = mosquitto.data_dir / "dynamic-security.json"
    assert stat.S_IMODE(dynsec.stat().st_mode) == 0o600
    assert json.loads(dynsec.read_text())["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


def test_rendered_config_uses_the_given_port_directory_and_plugin(tmp_path: Path) -> None:
    """Our listener, persistence location, log file, plugin and its config file; no TLS."""
    plugin = tmp_path / "dynsec.so"
    text = render_config(
        project_config().read_text(),
        port=18830,
        data_dir=tmp_path,
        plugin=plugin,
        dynsec_config=tmp_path / "ds.json",
    )
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("listener")] == ["listener 18830 127.0.0.1"]
    assert f"persistence_location {tmp_path}/" in lines
    assert f"log_dest file {tmp_path / 'mosquitto.log'}" in lines
    assert "persistence true" in lines
    assert "allow_anonymous false" in lines
    assert f"plugin {plugin}" in lines
    assert f"plugin_opt_config_file {tmp_path / 'ds.json'}" in lines
    assert not any(ln.startswith(("cafile", "certfile", "require_certificate")) for ln in lines)


def test_missing_binary_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mosquitto on PATH or in sbin: BrokerError telling to install Debian's package."""
    monkeypatch.delenv("HOTSWAP_MOSQUITTO", raising=False)
    monkeypatch.setattr("broker.launcher.shutil.which", lambda *a, **k: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        find_mosquitto()
    monkeypatch.setenv("HOTSWAP_MOSQUITTO", "/nonexistent/mosquitto")
    with pytest.raises(BrokerError, match="not an executable"):
        find_mosquitto()


def test_port_in_use_is_a_clear_error(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A second broker on a taken port fails with BrokerError, not a hang."""
    port = int(mosquitto.url.rsplit(":", 1)[1])
    with pytest.raises(BrokerError):
        Mosquitto(tmp_path / "second", port=port).start(timeout=3)
