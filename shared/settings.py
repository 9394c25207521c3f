"""Typed settings, read from `HOTSWAP_*` environment variables; CLI flags override.

One place documents every knob (the README's configuration table mirrors it).
Reads the environment only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.durations import parse_duration

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"

# Seconds, written as `300`, `30s`, `5m` or `1h` in the environment.
Duration = Annotated[float, BeforeValidator(parse_duration)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSWAP_", extra="ignore")

    mqtt_url: str = Field(DEFAULT_MQTT_URL, description="broker URL: mqtt://host:port")
    credentials: Path | None = Field(
        None, description="credentials directory (mqtt.json, TLS files, keys) for the broker"
    )
    db_url: str = Field(
        "sqlite:///hotswap-data/controller.db",
        description="controller database: sqlite:///path or postgresql+psycopg://...",
    )
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL (None: AWS default)")
    s3_bucket: str = Field("hotswap-models", description="bucket holding artifacts")
    s3_region: str = Field("us-east-1", description="S3 region for signing requests")
    presign_ttl_s: Duration = Field(3600.0, description="lifetime of presigned artifact URLs")
    data_dir: Path = Field(Path("hotswap-data"), description="agent/broker data directory")
    telemetry_interval_s: Duration = Field(5.0, description="agent telemetry window length")
    download_budget: Duration = Field(
        300.0,
        gt=0,
        description="agent: time one download may take, retries and their backoff included "
        "(never past the deploy command's expiry)",
    )
    command_ttl_s: Duration = Field(
        3600.0, gt=0, description="controller: expiry of the commands it sends devices"
    )
    request_timeout_s: Duration = Field(10.0, description="CLI wait for a controller answer")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_json: bool = Field(False, description="JSON logs (one event per line)")


# What `settings_from_env` refused, one line per variable: the CLI reports it (exit 2)
# before running any command, instead of a traceback while its modules are imported.
env_errors: list[str] = []


def settings_from_env() -> Settings:
    """Settings from the environment; a variable that does not parse is noted in
    `env_errors` and the defaults are used (the CLI then refuses to run)."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            field_name = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            line = f"HOTSWAP_{field_name.upper()}: {message}"
            if line not in env_errors:
                env_errors.append(line)
        return Settings.model_construct()


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the broker is and who we are to it.

    `username`/`password` authenticate us (the password never appears in `str()`
    or `repr()`); with `tls`, `ca_file` is the CA the broker's certificate must
    chain to (None: the system's CAs) and `cert_file`/`key_file` an optional
    client certificate. `shared.credentials.apply_credentials` fills these from
    a credentials directory.
    """

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        who = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{who}{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """`mqtt://host[:port]` or `mqtts://host[:port]`; ValueError on anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp"):
        raise ValueError(f"invalid MQTT URL {url!r}: expected mqtt://host:port")
    if not parts.hostname:
        raise ValueError(f"invalid MQTT URL {url!r}: no host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port if parts.port is not None else (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"invalid MQTT URL {url!r}: bad port") from exc
    if port == 0:
        raise ValueError(f"invalid MQTT URL {url!r}: bad port")
    return MqttEndpoint(parts.hostname, port, tls)
