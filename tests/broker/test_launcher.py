"""The mosquitto launcher: a real broker on a free port, persistence, clear errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.launcher import Mosquitto, find_mosquitto, project_config, render_config
from shared.errors import BrokerError
from shared.mqtt import make_client
from shared.settings import parse_mqtt_url


async def test_broker_accepts_mqtt5_clients(mosquitto: Mosquitto) -> None:
    """A client connects, subscribes and receives its own publish through the broker."""
    async with make_client(parse_mqtt_url(mosquitto.url), identifier="t-1") as client:
        await client.subscribe("t/x", qos=1)
        await client.publish("t/x", b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert message.payload == b"hello"


async def test_retained_messages_survive_a_restart(mosquitto: Mosquitto) -> None:
    """Persistence: a retained state published before restart() is there after it."""
    endpoint = parse_mqtt_url(mosquitto.url)
    async with make_client(endpoint, identifier="t-2") as client:
        await client.publish("t/retained", b"kept", qos=1, retain=True)
    mosquitto.restart()
    async with make_client(endpoint, identifier="t-3") as client:
        await client.subscribe("t/retained", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert message.payload == b"kept" and message.retain


def test_rendered_config_uses_the_given_port_and_directory(tmp_path: Path) -> None:
    """The project's config with our listener, persistence location and log file."""
    text = render_config(project_config().read_text(), port=18830, data_dir=tmp_path)
    lines = text.splitlines()
    assert "listener 18830 127.0.0.1" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert f"log_dest file {tmp_path / 'mosquitto.log'}" in lines
    assert "persistence true" in lines


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
