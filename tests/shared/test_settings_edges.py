"""Settings edge cases: typed env parsing and the precise MQTT URL errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import DEFAULT_MQTT_URL, Settings, parse_mqtt_url


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no HOTSWAP_* variables the documented defaults apply."""
    monkeypatch.delenv("HOTSWAP_MQTT_URL", raising=False)
    monkeypatch.delenv("HOTSWAP_LOG_JSON", raising=False)
    s = Settings()
    assert s.mqtt_url == DEFAULT_MQTT_URL and s.log_json is False


def test_env_values_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Booleans, ints, paths and optional strings are converted from env text."""
    monkeypatch.setenv("HOTSWAP_LOG_JSON", "true")
    monkeypatch.setenv("HOTSWAP_PRESIGN_TTL_S", "120")
    monkeypatch.setenv("HOTSWAP_DATA_DIR", "/var/lib/hotswap")
    monkeypatch.setenv("HOTSWAP_S3_ENDPOINT", "http://s3.local:9000")
    s = Settings()
    assert s.log_json is True and s.presign_ttl_s == 120
    assert s.data_dir == Path("/var/lib/hotswap") and s.s3_endpoint == "http://s3.local:9000"


def test_invalid_env_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-numeric HOTSWAP_COMMAND_TTL_S fails validation instead of being ignored."""
    monkeypatch.setenv("HOTSWAP_COMMAND_TTL_S", "soon")
    with pytest.raises(ValidationError):
        Settings()


def test_unprefixed_variables_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the HOTSWAP_ prefix counts: a bare MQTT_URL does not change the setting."""
    monkeypatch.delenv("HOTSWAP_MQTT_URL", raising=False)
    monkeypatch.setenv("MQTT_URL", "mqtt://elsewhere:1")
    assert Settings().mqtt_url == DEFAULT_MQTT_URL


def test_mqtts_explicit_port_and_tcp_scheme() -> None:
    """mqtts keeps an explicit port with TLS on; tcp:// is plain MQTT on 1883."""
    e = parse_mqtt_url("mqtts://b.example:8884")
    assert (e.host, e.port, e.tls, str(e)) == ("b.example", 8884, True, "mqtts://b.example:8884")
    t = parse_mqtt_url("tcp://b.example")
    assert (t.port, t.tls) == (1883, False)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ws://h:80", "expected mqtt://host:port"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:99999", "bad port"),
        ("mqtts://h:x", "bad port"),
    ],
)
def test_bad_urls_say_why(url: str, why: str) -> None:
    """Each kind of bad URL gets its own explanation after the URL."""
    with pytest.raises(ValueError, match=why):
        parse_mqtt_url(url)
