"""Launcher edge cases: binary and plugin lookup, config rendering, start failures, sessions."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from broker import launcher
from broker.launcher import (
    Mosquitto,
    TlsListeners,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
    port_is_free,
    render_config,
)
from shared import topics
from shared.errors import BrokerError
from shared.mqtt import make_client
from tests.conftest import device_endpoint


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_missing_binary_via_path_and_search_dirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With PATH and the sbin fallbacks empty, the error names Debian's `mosquitto` package."""
    monkeypatch.delenv("HOTSWAP_MOSQUITTO", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launcher, "_SEARCH_PATH", (str(tmp_path),))
    with pytest.raises(BrokerError, match=r"apt-get install -y mosquitto") as err:
        find_mosquitto()
    assert err.value.reason == "broker_unavailable"


def test_hotswap_mosquitto_to_a_missing_path_names_the_variable_and_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wrong HOTSWAP_MOSQUITTO is reported with its value and the install hint."""
    missing = tmp_path / "no" / "mosquitto"
    monkeypatch.setenv("HOTSWAP_MOSQUITTO", str(missing))
    with pytest.raises(
        BrokerError, match=re.escape(f"HOTSWAP_MOSQUITTO={missing}") + ".*install -y mosquitto"
    ):
        find_mosquitto()


def test_hotswap_mosquitto_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An existing but non-executable file is refused rather than run."""
    f = tmp_path / "mosquitto"
    f.write_text("")
    f.chmod(0o644)
    monkeypatch.setenv("HOTSWAP_MOSQUITTO", str(f))
    with pytest.raises(BrokerError, match="not an executable"):
        find_mosquitto()


def test_lookup_order_env_then_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HOTSWAP_MOSQUITTO wins; without it the first `mosquitto` on PATH is used."""
    on_path = _script(tmp_path / "mosquitto", "exit 0")
    explicit = _script(tmp_path / "my-mosquitto", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOTSWAP_MOSQUITTO", str(explicit))
    assert find_mosquitto() == explicit
    monkeypatch.delenv("HOTSWAP_MOSQUITTO")
    assert find_mosquitto() == on_path


def test_binary_that_exits_at_once_is_a_broker_error_with_its_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mosquitto that dies on start raises BrokerError with the exit code and last stderr line."""
    fake = _script(tmp_path / "fake", "echo 'first' >&2; echo 'Error: boom' >&2; exit 3")
    monkeypatch.setenv("HOTSWAP_MOSQUITTO", str(fake))
    broker = Mosquitto(tmp_path / "data")
    with pytest.raises(BrokerError, match=r"exited with code 3 .*Error: boom"):
        broker.start(timeout=5)
    assert broker.process is not None  # the dead process is kept; stop() must cope
    broker.stop()
    assert broker.process is None


TEMPLATE = """listener 1883
allow_anonymous false

listener 8883
cafile x
certfile y
keyfile z
# a comment
log_dest stdout
listener 8884
cafile x
require_certificate true
use_identity_as_username true
"""


def test_render_config_without_tls_drops_the_tls_listeners_with_their_options(
    tmp_path: Path,
) -> None:
    """`user` first; the 2nd and 3rd listeners go with their options; global lines stay."""
    lines = render_config(TEMPLATE, port=2000, data_dir=tmp_path, bind="10.0.0.7", user="me")
    out = lines.splitlines()
    assert out[0] == "user me"
    assert [ln for ln in out if ln.startswith("listener")] == ["listener 2000 10.0.0.7"]
    assert "allow_anonymous false" in out and "" in out
    assert not any(ln.startswith(("cafile", "certfile", "keyfile", "require_")) for ln in out)
    assert f"log_dest file {tmp_path / 'mosquitto.log'}" in out  # a global option after them
    assert lines.endswith("\n")


def test_render_config_with_tls_renders_both_tls_listeners_with_our_files(tmp_path: Path) -> None:
    """TLS on its port with our CA/cert/key; the client-certificate listener keeps its options."""
    tls = TlsListeners(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key", 9001, 9002)
    out = render_config(TEMPLATE, port=2000, data_dir=tmp_path, tls=tls).splitlines()
    assert [ln for ln in out if ln.startswith("listener")] == [
        "listener 2000 127.0.0.1",
        "listener 9001 127.0.0.1",
        "listener 9002 127.0.0.1",
    ]
    assert out.count(f"cafile {tmp_path / 'ca.crt'}") == 2
    assert f"certfile {tmp_path / 's.crt'}" in out and f"keyfile {tmp_path / 's.key'}" in out
    third = out[out.index("listener 9002 127.0.0.1") :]
    assert "require_certificate true" in third and "use_identity_as_username true" in third
    without_cert_listener = TlsListeners(tls.ca_file, tls.cert_file, tls.key_file, 9001)
    out = render_config(TEMPLATE, port=2000, data_dir=tmp_path, tls=without_cert_listener)
    assert "listener 9002" not in out and "require_certificate" not in out


def test_dynsec_plugin_lookup_env_then_lib_dirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HOTSWAP_MOSQUITTO_DYNSEC wins (and must exist); else the lib dirs; else a clear error."""
    plugin = tmp_path / "lib" / "mosquitto_dynamic_security.so"
    plugin.parent.mkdir()
    plugin.write_bytes(b"")
    monkeypatch.setenv("HOTSWAP_MOSQUITTO_DYNSEC", str(plugin))
    assert find_dynsec_plugin() == plugin
    monkeypatch.setenv("HOTSWAP_MOSQUITTO_DYNSEC", str(tmp_path / "missing.so"))
    with pytest.raises(BrokerError, match=r"HOTSWAP_MOSQUITTO_DYNSEC=.*missing\.so is not a file"):
        find_dynsec_plugin()
    monkeypatch.delenv("HOTSWAP_MOSQUITTO_DYNSEC")
    monkeypatch.setattr(launcher, "_PLUGIN_DIRS", (str(tmp_path / "lib"),))
    assert find_dynsec_plugin() == plugin
    monkeypatch.setattr(launcher, "_PLUGIN_DIRS", (str(tmp_path / "nothing"),))
    monkeypatch.setattr(launcher, "_MULTIARCH_ROOT", str(tmp_path / "nothing"))
    with pytest.raises(BrokerError, match=r"dynamic-security plugin .* not found") as err:
        find_dynsec_plugin()
    assert len(str(err.value).splitlines()) == 1


def test_render_config_without_user_has_no_user_line(tmp_path: Path) -> None:
    """Without a user the config does not switch users."""
    text = render_config("listener 1\n", port=5, data_dir=tmp_path)
    assert not any(ln.startswith("user ") for ln in text.splitlines())
    assert "listener 5 127.0.0.1" in text.splitlines()


def test_free_port_is_free_and_a_listening_port_is_not() -> None:
    """free_port gives a bindable port; port_is_free is False while something listens."""
    port = free_port()
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_is_free("127.0.0.1", port)


def test_stop_twice_is_harmless(mosquitto: Mosquitto) -> None:
    """stop() on a stopped broker does nothing, and the port becomes free again."""
    mosquitto.stop()
    mosquitto.stop()
    assert mosquitto.process is None
    assert port_is_free(mosquitto.host, mosquitto.port)


def test_started_broker_writes_config_and_log_in_its_data_dir(mosquitto: Mosquitto) -> None:
    """The rendered mosquitto.conf and the log file live under data_dir."""
    conf = (mosquitto.data_dir / "mosquitto.conf").read_text()
    assert f"listener {mosquitto.port} 127.0.0.1" in conf
    assert f"plugin_opt_config_file {mosquitto.data_dir / 'dynamic-security.json'}" in conf
    assert f"persistence_location {mosquitto.data_dir}/" in conf
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"


async def test_persistent_session_gets_qos1_messages_queued_across_a_restart(
    mosquitto: Mosquitto,
) -> None:
    """A device's persistent session and a command queued for it survive restart()."""
    device = device_endpoint(mosquitto, "sess-1")
    async with make_client(device, identifier="sess-1", persistent_session=True) as client:
        await client.subscribe(topics.device_cmd("sess-1"), qos=1)
    async with make_client(mosquitto.endpoint("controller"), identifier="pub-1") as pub:
        await pub.publish(topics.device_cmd("sess-1"), b"queued", qos=1)
    mosquitto.restart()
    async with make_client(device, identifier="sess-1", persistent_session=True) as client:
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert message.payload == b"queued"
