"""Settings from HOTSWAP_* variables and broker URLs."""

from __future__ import annotations

import pytest

from shared.settings import Settings, parse_mqtt_url


def test_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOTSWAP_MQTT_URL and friends are read; unset ones keep their defaults."""
    monkeypatch.setenv("HOTSWAP_MQTT_URL", "mqtt://broker.example:1999")
    monkeypatch.setenv("HOTSWAP_S3_BUCKET", "models-prod")
    monkeypatch.setenv("HOTSWAP_TELEMETRY_INTERVAL_S", "2.5")
    s = Settings()
    assert (s.mqtt_url, s.s3_bucket, s.telemetry_interval_s) == (
        "mqtt://broker.example:1999",
        "models-prod",
        2.5,
    )
    assert s.s3_region == "us-east-1"


def test_mqtt_urls_parse_with_default_ports() -> None:
    """mqtt:// defaults to 1883, mqtts:// to 8883 with TLS."""
    assert str(parse_mqtt_url("mqtt://10.0.0.5")) == "mqtt://10.0.0.5:1883"
    tls = parse_mqtt_url("mqtts://broker.example")
    assert (tls.host, tls.port, tls.tls) == ("broker.example", 8883, True)
    assert parse_mqtt_url("mqtt://h:1999").port == 1999


@pytest.mark.parametrize("bad", ["http://h:1883", "mqtt://", "mqtt://h:notaport", "h:1883"])
def test_bad_mqtt_urls_are_refused(bad: str) -> None:
    """Wrong scheme, no host or a bad port: ValueError naming the URL."""
    with pytest.raises(ValueError, match="invalid MQTT URL"):
        parse_mqtt_url(bad)
