"""Controller and operator commands: `controller run`, `model`, `device`, `rollout`.

Thin typer wrappers: parse flags (each with a `HOTSWAP_*` env var), call the
service or the operator client, print a table or `--json`. Does terminal I/O.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from controller.artifacts import ArtifactStore
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller, ControllerConfig
from shared.console import cli_errors, emit_json, fail, print_table, progress, run_until_signalled
from shared.errors import HotswapError
from shared.logs import configure_logging
from shared.messages import ListDevices, ListModels, ListRollouts, RolloutStatus, StartRollout
from shared.settings import Settings, parse_mqtt_url

T = TypeVar("T")
_DEFAULTS = Settings()

MqttUrl = Annotated[
    str, typer.Option("--mqtt-url", envvar="HOTSWAP_MQTT_URL", help="broker, mqtt://host:port")
]
S3Endpoint = Annotated[
    str | None,
    typer.Option("--s3-endpoint", envvar="HOTSWAP_S3_ENDPOINT", help="S3 endpoint URL"),
]
S3Bucket = Annotated[
    str, typer.Option("--s3-bucket", envvar="HOTSWAP_S3_BUCKET", help="artifact bucket")
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]
LogLevel = Annotated[str, typer.Option("--log-level", envvar="HOTSWAP_LOG_LEVEL")]
LogJson = Annotated[bool, typer.Option("--log-json", envvar="HOTSWAP_LOG_JSON")]

controller_app = typer.Typer(help="Run the fleet controller.", no_args_is_help=True)
model_app = typer.Typer(help="Push and list signed models.", no_args_is_help=True)
device_app = typer.Typer(help="List the devices the controller knows.", no_args_is_help=True)
rollout_app = typer.Typer(help="Start and watch rollouts.", no_args_is_help=True)


@controller_app.command("run")
def controller_run(
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    db_url: Annotated[
        str, typer.Option("--db-url", envvar="HOTSWAP_DB_URL", help="sqlite:///… or postgresql…")
    ] = _DEFAULTS.db_url,
    s3_endpoint: S3Endpoint = _DEFAULTS.s3_endpoint,
    s3_bucket: S3Bucket = _DEFAULTS.s3_bucket,
    s3_region: Annotated[str, typer.Option(envvar="HOTSWAP_S3_REGION")] = _DEFAULTS.s3_region,
    metrics_port: Annotated[
        int, typer.Option(envvar="HOTSWAP_METRICS_PORT", help="Prometheus port; 0 turns it off")
    ] = 9100,
    presign_ttl: Annotated[
        int, typer.Option(envvar="HOTSWAP_PRESIGN_TTL_S", help="presigned URL lifetime, s")
    ] = _DEFAULTS.presign_ttl_s,
    log_level: LogLevel = _DEFAULTS.log_level,
    log_json: LogJson = _DEFAULTS.log_json,
) -> None:
    """Run the controller until SIGINT/SIGTERM."""
    configure_logging(log_level, json=log_json)
    with cli_errors():
        config = ControllerConfig(
            mqtt=parse_mqtt_url(mqtt_url),
            db_url=db_url,
            s3_endpoint=s3_endpoint,
            s3_bucket=s3_bucket,
            s3_region=s3_region,
            presign_ttl_s=presign_ttl,
        )
        try:
            controller = Controller(config)
        except Exception as exc:  # the database URL is the usual suspect
            fail(f"cannot open the database {db_url}: {str(exc).splitlines()[0]}")
        if metrics_port:
            from controller.metrics import serve_metrics

            try:
                serve_metrics(metrics_port)
            except OSError as exc:
                fail(f"cannot serve metrics on port {metrics_port}: {exc.strerror}")
        progress(f"controller: broker {config.mqtt}, database {db_url}, bucket {s3_bucket}")
        run_until_signalled(controller.run())


async def _request(mqtt_url: str, request: Any) -> Any:
    async with OperatorClient(parse_mqtt_url(mqtt_url), timeout=_DEFAULTS.request_timeout_s) as op:
        return await op.request(request)


@model_app.command("push")
def model_push(
    file: Annotated[Path, typer.Argument(help="the .tflite file")],
    name: Annotated[str, typer.Option("--name", help="model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    signing_key: Annotated[
        Path, typer.Option("--signing-key", envvar="HOTSWAP_SIGNING_KEY", help="Ed25519 key")
    ],
    device_type: Annotated[
        list[str] | None,
        typer.Option("--device-type", help="compatible device type (repeat; default: any)"),
    ] = None,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    s3_endpoint: S3Endpoint = _DEFAULTS.s3_endpoint,
    s3_bucket: S3Bucket = _DEFAULTS.s3_bucket,
    as_json: Json = False,
) -> None:
    """Sign a .tflite model, upload it to S3 and register it with the controller."""
    with cli_errors():
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise HotswapError(f"cannot read {file}: {exc.strerror}", reason="bad_file") from exc
        result = asyncio.run(
            push_model(
                data,
                name=name,
                version=version,
                signing_key=signing_key,
                endpoint=parse_mqtt_url(mqtt_url),
                artifacts=ArtifactStore(s3_endpoint, s3_bucket, _DEFAULTS.s3_region),
                device_types=tuple(device_type or ()),
            )
        )
    if as_json:
        emit_json(result.registered)
    else:
        print(f"pushed {result.name}@{result.version} sha256={result.sha256} ({result.size} bytes)")


@model_app.command("list")
def model_list(mqtt_url: MqttUrl = _DEFAULTS.mqtt_url, as_json: Json = False) -> None:
    """List registered models."""
    with cli_errors():
        rows = asyncio.run(_request(mqtt_url, ListModels()))
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["sha"] = r["sha256"][:12]
    print_table(
        rows,
        [
            ("NAME", "name"),
            ("VERSION", "version"),
            ("SHA256", "sha"),
            ("SIZE", "size"),
            ("SIGNATURE", "signature"),
            ("DEVICE TYPES", "deviceTypes"),
        ],
    )


@device_app.command("list")
def device_list(mqtt_url: MqttUrl = _DEFAULTS.mqtt_url, as_json: Json = False) -> None:
    """List devices with what they serve."""
    with cli_errors():
        rows = asyncio.run(_request(mqtt_url, ListDevices()))
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["serving"] = f"{r['activeName']}@{r['activeVersion']}" if r.get("activeName") else "-"
        r["status"] = "online" if r["online"] else "offline"
    print_table(
        rows,
        [
            ("DEVICE", "deviceId"),
            ("REGION", "region"),
            ("TYPE", "deviceType"),
            ("STATUS", "status"),
            ("SERVING", "serving"),
            ("STANDBY", "standbyRef"),
        ],
    )


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Option("--model", help="model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    strategy: Annotated[str, typer.Option("--strategy", help="direct")] = "direct",
    devices: Annotated[
        str | None, typer.Option("--devices", help="comma-separated device ids")
    ] = None,
    region: Annotated[str | None, typer.Option("--region", help="every device of a region")] = None,
    device_type: Annotated[
        str | None, typer.Option("--device-type", help="every device of a type")
    ] = None,
    device_timeout: Annotated[
        float, typer.Option("--device-timeout", help="seconds a device may take")
    ] = 600.0,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    as_json: Json = False,
) -> None:
    """Start a rollout; prints its id."""
    if strategy != "direct":
        fail(f"unknown strategy {strategy!r} (available: direct)", 2)
    ids = tuple(d.strip() for d in (devices or "").split(",") if d.strip())
    if devices is not None and not ids:
        fail("--devices names no device", 2)
    if ids and (region or device_type):
        fail("--devices cannot be combined with --region or --device-type", 2)
    with cli_errors():
        request = StartRollout(
            model=model,
            version=version,
            strategy="direct",
            devices=ids,
            region=region,
            device_type=device_type,
            device_timeout_s=device_timeout,
        )
        result = asyncio.run(_request(mqtt_url, request))
    if as_json:
        emit_json(result)
    else:
        print(result["rolloutId"])


def _print_status(status: RolloutStatus) -> None:
    latency = (
        f"{status.avg_inference_latency:.3f} ms"
        if status.avg_inference_latency is not None
        else "-"
    )
    print(f"rollout   {status.rollout_id}")
    print(f"model     {status.model}@{status.version} ({status.strategy})")
    print(f"status    {status.status}" + (f": {status.reason}" if status.reason else ""))
    print(
        f"devices   {status.devices_updated}/{status.devices_targeted} updated, "
        f"{status.devices_failed} failed, {status.devices_pending} pending "
        f"(success {status.success_rate:g}%)"
    )
    print(f"latency   {latency}")
    print_table(
        [d.model_dump() for d in status.devices],
        [("DEVICE", "device_id"), ("STATE", "state"), ("REASON", "reason")],
    )


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="the rollout id")],
    wait: Annotated[
        float | None, typer.Option("--wait", help="block up to SECONDS for a final status")
    ] = None,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    as_json: Json = False,
) -> None:
    """Show a rollout's retained status (no controller needed)."""
    with cli_errors():
        status = asyncio.run(read_rollout_status(parse_mqtt_url(mqtt_url), rollout_id, wait_s=wait))
    if as_json:
        emit_json(status.model_dump(mode="json", by_alias=True))
    else:
        _print_status(status)
    if wait is not None and status.status != "Succeeded":
        raise typer.Exit(1)


@rollout_app.command("list")
def rollout_list(mqtt_url: MqttUrl = _DEFAULTS.mqtt_url, as_json: Json = False) -> None:
    """List rollouts, oldest first."""
    with cli_errors():
        rows = asyncio.run(_request(mqtt_url, ListRollouts()))
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["target"] = f"{r['model']}@{r['version']}"
        r["progress"] = f"{r['devicesUpdated']}/{r['devicesTargeted']}"
    print_table(
        rows,
        [
            ("ROLLOUT", "rolloutId"),
            ("MODEL", "target"),
            ("STRATEGY", "strategy"),
            ("STATUS", "status"),
            ("UPDATED", "progress"),
        ],
    )
