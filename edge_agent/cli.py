"""`hotswap agent run`: the edge agent as a long-running process.

Parses flags (each with a `HOTSWAP_*` env var), reads the device's credentials
directory (`--credentials`: identity, broker login, trusted keys, the
controller's command key; flags win), loads the keys and runs `Agent` until
SIGINT/SIGTERM. Does terminal and file I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent.agent import Agent, AgentConfig
from edge_agent.fetch import FetchLimits
from edge_agent.metrics import AgentMetrics
from shared.console import (
    LogJson,
    LogLevel,
    announce,
    cli_errors,
    duration_option,
    fail,
    parse_duration_flag,
    run_until_signalled,
)
from shared.credentials import apply_credentials, load_credentials
from shared.keys import load_public_key, load_public_keys
from shared.logs import configure_logging
from shared.settings import parse_mqtt_url, settings_from_env
from shared.tracing import configure_tracing

_DEFAULTS = settings_from_env()

app = typer.Typer(help="Run an edge agent (one device).", no_args_is_help=True)


def _split_keys(values: list[str]) -> list[Path]:
    # --trusted-key may repeat; HOTSWAP_TRUSTED_KEYS is one comma-separated list.
    return [Path(p.strip()) for v in values for p in v.split(",") if p.strip()]


@app.command("run")
def agent_run(
    credentials: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            envvar="HOTSWAP_CREDENTIALS",
            help="the device's credentials directory (from `hotswap device provision`)",
        ),
    ] = None,
    device_id: Annotated[
        str | None,
        typer.Option("--device-id", envvar="HOTSWAP_DEVICE_ID", help="default: --credentials"),
    ] = None,
    region: Annotated[
        str | None, typer.Option("--region", envvar="HOTSWAP_REGION", help="default: --credentials")
    ] = None,
    device_type: Annotated[
        str | None,
        typer.Option("--device-type", envvar="HOTSWAP_DEVICE_TYPE", help="default: --credentials"),
    ] = None,
    trusted_key: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-key",
            envvar="HOTSWAP_TRUSTED_KEYS",
            help="operator public key (PEM); repeat for key rotation; default: --credentials",
        ),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", envvar="HOTSWAP_DATA_DIR", help="models and state"),
    ] = _DEFAULTS.data_dir / "agent",
    mqtt_url: Annotated[
        str, typer.Option("--mqtt-url", envvar="HOTSWAP_MQTT_URL", help="broker, mqtt://host:port")
    ] = _DEFAULTS.mqtt_url,
    workload_hz: Annotated[
        float,
        typer.Option("--workload-hz", min=0, envvar="HOTSWAP_WORKLOAD_HZ", help="synthetic load"),
    ] = 0.0,
    telemetry_interval: Annotated[
        float,
        duration_option(
            "--telemetry-interval",
            envvar="HOTSWAP_TELEMETRY_INTERVAL_S",
            at_least=0.1,
            help="telemetry window length, at least 0.1 s (5, 5s, 1m)",
        ),
    ] = _DEFAULTS.telemetry_interval_s,
    memory_mb: Annotated[
        int | None, typer.Option("--memory-mb", envvar="HOTSWAP_MEMORY_MB", help="advertised")
    ] = None,
    interpreters: Annotated[
        int,
        typer.Option(
            "--interpreters",
            min=1,
            envvar="HOTSWAP_INTERPRETERS",
            help="interpreters per model (parallel inference calls)",
        ),
    ] = 1,
    keep_versions: Annotated[
        int, typer.Option("--keep-versions", min=2, help="stored versions per model")
    ] = 3,
    max_download_mb: Annotated[
        int, typer.Option("--max-download-mb", min=1, help="largest model accepted")
    ] = 512,
    download_budget: Annotated[
        float,
        duration_option(
            "--download-budget",
            envvar="HOTSWAP_DOWNLOAD_BUDGET",
            help="time one download may take, retries included (300, 30s, 5m, 1h); "
            "never past the deploy command's expiry",
        ),
    ] = _DEFAULTS.download_budget,
    download_timeout: Annotated[
        float | None,
        typer.Option(
            "--download-timeout",
            parser=parse_duration_flag,
            metavar="DURATION",
            hidden=True,
            help="old --download-budget",
        ),
    ] = None,
    metrics_port: Annotated[
        int,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            envvar="HOTSWAP_METRICS_PORT",
            help="serve this agent's Prometheus metrics on this port (0: off; 19101 usual)",
        ),
    ] = 0,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host",
            envvar="HOTSWAP_METRICS_HOST",
            help="address the metrics endpoint binds (0.0.0.0: every interface)",
        ),
    ] = "127.0.0.1",
    log_level: LogLevel = _DEFAULTS.log_level,
    log_json: LogJson = _DEFAULTS.log_json,
) -> None:
    """Serve the stored model at once, then follow the controller's commands."""
    configure_logging(log_level, json=log_json, native=True)
    with cli_errors():
        configure_tracing("hotswap-agent")  # only when OTEL_* variables ask
        creds = load_credentials(credentials) if credentials is not None else None
        own = creds.device if creds else None
        device_id = device_id or (own.device_id if own else None)
        region = region or (own.region if own else None)
        device_type = device_type or (own.device_type if own else None)
        if not (device_id and region and device_type):
            missing = [
                flag
                for value, flag in (
                    (device_id, "--device-id"),
                    (region, "--region"),
                    (device_type, "--device-type"),
                )
                if not value
            ]
            fail(f"give {', '.join(missing)} (or --credentials DIR with a device.json)", 2)
        bound = creds.login.client_id if creds else None
        if bound is not None and bound != device_id:
            fail(f"--device-id {device_id}: the credentials in {credentials} are for {bound}", 2)
        paths = _split_keys(trusted_key or []) or list(creds.trusted_keys if creds else ())
        if not paths:
            fail("give at least one --trusted-key (or --credentials DIR with trusted/*.pub)", 2)
        endpoint = parse_mqtt_url(mqtt_url)
        config = AgentConfig(
            device_id=device_id,
            region=region,
            device_type=device_type,
            data_dir=data_dir,
            trusted_keys=tuple(load_public_keys(paths)),
            controller_keys=(
                (load_public_key(creds.controller_key),) if creds and creds.controller_key else ()
            ),
            mqtt=apply_credentials(endpoint, creds) if creds else endpoint,
            workload_hz=workload_hz,
            telemetry_interval_s=telemetry_interval,
            memory_mb=memory_mb,
            keep_versions=keep_versions,
            interpreters=interpreters,
            max_download_bytes=max_download_mb * 1024 * 1024,
            fetch_limits=FetchLimits(
                budget_s=download_budget if download_timeout is None else download_timeout
            ),
        )
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"cannot use data directory {data_dir}: {exc.strerror}")
        announce(
            log_json,
            "agent_starting",
            f"agent {device_id} ({region}/{device_type}): broker {config.mqtt}, data {data_dir}",
            device_id=device_id,
            region=region,
            device_type=device_type,
            broker=str(config.mqtt),
            data_dir=str(data_dir),
        )
        metrics = AgentMetrics(device_id) if metrics_port else None
        if metrics is not None:
            try:
                metrics.serve(metrics_port, metrics_host)
            except OSError as exc:
                fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror}")
        run_until_signalled(Agent(config, metrics=metrics).run())
