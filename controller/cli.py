"""Controller and operator commands: `controller run`, `model`, `device`, `rollout`.

Thin typer wrappers: parse flags (each with a `HOTSWAP_*` env var), call the
service, the operator client or the artifact store, print a table or `--json`.
Does terminal I/O.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiomqtt
import structlog
import typer
from pydantic import ValidationError

from controller import metrics
from controller.artifacts import ArtifactStore, find_orphans
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.progress import DEVICE_STATES
from shared import topics, tracing
from shared.console import (
    LogJson,
    LogLevel,
    announce,
    cli_errors,
    duration_option,
    emit_json,
    fail,
    iso_time,
    print_table,
    progress,
    run_until_signalled,
    with_iso_times,
)
from shared.credentials import CredentialsError, apply_credentials, endpoint_for, load_credentials
from shared.durations import parse_duration
from shared.errors import BrokerError, HotswapError, StorageError
from shared.keys import load_private_key
from shared.logs import configure_logging
from shared.manifest import ModelTask
from shared.messages import (
    ControllerState,
    ControlRollout,
    GateSpec,
    ListDevices,
    ListModels,
    ListRolloutDevices,
    ListRollouts,
    RolloutAction,
    RolloutDevicesPage,
    RolloutStatus,
    StageSpec,
    StartRollout,
)
from shared.mqtt import connection_error, make_client, subscribe_checked
from shared.settings import MqttEndpoint, parse_mqtt_url, settings_from_env
from shared.tracing import configure_tracing

T = TypeVar("T")
STRATEGY_NAMES = (
    "direct", "canary", "progressive", "regional", "rolling", "ab", "blue-green", "shadow"
)  # fmt: skip
_DEFAULTS = settings_from_env()

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
CredentialsDir = Annotated[
    Path | None,
    typer.Option(
        "--credentials",
        envvar="HOTSWAP_CREDENTIALS",
        help="credentials directory for the broker (mqtt.json, ca.crt, …)",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]
Timeout = Annotated[float, duration_option("--timeout", help="give up after (90, 30s, 5m, 1h)")]
# Wire fields that are times (epoch seconds in the controller's rows) and comma lists:
# `--json` writes every time as ISO 8601 UTC and every list as a list.
_TIME_FIELDS = ("createdAt", "updatedAt", "finishedAt", "lastSeen", "at")
_LIST_FIELDS = ("deviceTypes",)

controller_app = typer.Typer(help="Run the fleet controller.", no_args_is_help=True)
model_app = typer.Typer(help="Push and list signed models.", no_args_is_help=True)
device_app = typer.Typer(
    help="List the devices the controller knows; provision and revoke them.", no_args_is_help=True
)
rollout_app = typer.Typer(help="Start and watch rollouts.", no_args_is_help=True)


@controller_app.command("run")
def controller_run(
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    db_url: Annotated[
        str, typer.Option("--db-url", envvar="HOTSWAP_DB_URL", help="sqlite:///… or postgresql…")
    ] = _DEFAULTS.db_url,
    s3_endpoint: S3Endpoint = _DEFAULTS.s3_endpoint,
    s3_bucket: S3Bucket = _DEFAULTS.s3_bucket,
    s3_region: Annotated[str, typer.Option(envvar="HOTSWAP_S3_REGION")] = _DEFAULTS.s3_region,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, envvar="HOTSWAP_METRICS_PORT", help="Prometheus port; 0 turns it off"
        ),
    ] = metrics.DEFAULT_PORT,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="HOTSWAP_METRICS_HOST",
            help="address the metrics endpoint binds (0.0.0.0: every interface)",
        ),
    ] = metrics.DEFAULT_HOST,
    presign_ttl: Annotated[
        float,
        duration_option(
            "--presign-ttl",
            envvar="HOTSWAP_PRESIGN_TTL_S",
            help="presigned URL lifetime (3600, 30m, 1h)",
        ),
    ] = _DEFAULTS.presign_ttl_s,
    create_bucket: Annotated[
        bool,
        typer.Option(
            "--create-bucket",
            envvar="HOTSWAP_CREATE_BUCKET",
            help="create the S3 bucket if it is missing (a local moto or MinIO; "
            "without it a missing bucket is an error at start)",
        ),
    ] = False,
    s3_wait: Annotated[
        float,
        duration_option(
            "--s3-wait",
            envvar="HOTSWAP_S3_WAIT",
            help="how long to wait at start for S3 to answer (15s)",
        ),
    ] = 15.0,
    log_level: LogLevel = _DEFAULTS.log_level,
    log_json: LogJson = _DEFAULTS.log_json,
) -> None:
    """Run the controller until SIGINT/SIGTERM.

    With --credentials (the broker's `credentials/controller`), it logs in as the
    controller and signs every command with the directory's command.key. At start
    it checks the S3 bucket (waiting up to --s3-wait for S3 to answer).
    """
    configure_logging(log_level, json=log_json, native=True)
    # Imported here: the service pulls in the gates' statistics (scipy) and the store,
    # a second of start-up that no operator command needs.
    from controller.service import Controller, ControllerConfig

    with cli_errors():
        configure_tracing("hotswap-controller")  # only when OTEL_* variables ask
        creds = load_credentials(credentials) if credentials is not None else None
        endpoint = parse_mqtt_url(mqtt_url)
        config = ControllerConfig(
            mqtt=apply_credentials(endpoint, creds) if creds else endpoint,
            db_url=db_url,
            s3_endpoint=s3_endpoint,
            s3_bucket=s3_bucket,
            s3_region=s3_region,
            presign_ttl_s=round(presign_ttl),
            command_ttl_s=max(1, round(_DEFAULTS.command_ttl_s)),  # HOTSWAP_COMMAND_TTL_S
            command_key=(
                load_private_key(creds.command_key) if creds and creds.command_key else None
            ),
        )
        try:
            controller = Controller(config)
        except Exception as exc:  # the database URL is the usual suspect
            fail(f"--db-url: cannot open the database {db_url}: {str(exc).splitlines()[0]}")
        if metrics_port:
            try:
                metrics.serve_metrics(metrics_port, metrics_host)
            except OSError as exc:
                fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror}")
        if check_bucket(controller.artifacts, create=create_bucket, wait_s=s3_wait):
            announce(log_json, "bucket_created", f"created bucket {s3_bucket}", bucket=s3_bucket)
        announce(
            log_json,
            "controller_starting",
            f"controller: broker {config.mqtt}, database {db_url}, bucket {s3_bucket}",
            broker=str(config.mqtt),
            database=db_url,
            bucket=s3_bucket,
        )
        run_until_signalled(controller.run())


def check_bucket(artifacts: ArtifactStore, *, create: bool, wait_s: float) -> bool:
    """The bucket exists (True if just created); S3 that does not answer yet is waited
    for up to `wait_s` (started together with the controller); StorageError otherwise."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return artifacts.check_bucket(create=create)
        except StorageError as exc:
            if exc.reason != "storage_unreachable" or time.monotonic() >= deadline:
                raise
            if not told:
                structlog.get_logger().warning(
                    "s3_not_answering_yet", endpoint=artifacts.endpoint or "AWS", wait_s=wait_s
                )
                told = True
        time.sleep(0.5)


def _endpoint(mqtt_url: str, credentials: Path | None) -> MqttEndpoint:
    return endpoint_for(parse_mqtt_url(mqtt_url), credentials)


async def _request(endpoint: MqttEndpoint, request: Any) -> Any:
    async with OperatorClient(endpoint, timeout=_DEFAULTS.request_timeout_s) as op:
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
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="what the outputs mean: classifier:OUTPUT, detector:OUTPUT:THRESHOLD or "
            "none (default: the agent infers it)",
        ),
    ] = None,
    interface_change: Annotated[
        bool,
        typer.Option(
            "--interface-change",
            help="this version changes the tensor interface on purpose (devices accept it)",
        ),
    ] = False,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    s3_endpoint: S3Endpoint = _DEFAULTS.s3_endpoint,
    s3_bucket: S3Bucket = _DEFAULTS.s3_bucket,
    as_json: Json = False,
) -> None:
    """Sign a .tflite model, upload it to S3 and register it with the controller."""
    with cli_errors():
        configure_tracing("hotswap-cli", short_lived=True)  # only when OTEL_* variables ask
        model_task = parse_task(task) if task is not None else None
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
                endpoint=_endpoint(mqtt_url, credentials),
                artifacts=ArtifactStore(
                    s3_endpoint, s3_bucket, _DEFAULTS.s3_region, upload_progress=UploadMeter()
                ),
                device_types=tuple(device_type or ()),
                task=model_task,
                interface_change=interface_change,
                request_timeout_s=_DEFAULTS.request_timeout_s,
            )
        )
    if as_json:
        emit_json(with_iso_times(result.registered, _TIME_FIELDS, _LIST_FIELDS))
    else:
        print(f"pushed {result.name}@{result.version} sha256={result.sha256} ({result.size} bytes)")


class UploadMeter:
    """Upload progress on stderr for models above a few MB: a line per 10 % (stdout is
    for `--json`); smaller uploads are over before anyone could read it."""

    MIN_BYTES = 8 * 1024 * 1024

    def __init__(self) -> None:
        self._shown = -1

    def __call__(self, sent: int, total: int) -> None:
        if total <= self.MIN_BYTES:
            return
        tenth = min(10, sent * 10 // total)
        if tenth > self._shown:
            self._shown = tenth
            progress(f"uploading {sent / 2**20:.1f}/{total / 2**20:.1f} MiB ({tenth * 10}%)")


@model_app.command("list")
def model_list(
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """List registered models."""
    with cli_errors():
        raw = asyncio.run(_request(_endpoint(mqtt_url, credentials), ListModels()))
    rows = [with_iso_times(r, _TIME_FIELDS, _LIST_FIELDS) for r in raw]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["sha"] = r["sha256"][:12]
        r["types"] = ",".join(r["deviceTypes"]) or "any"
    print_table(
        rows,
        [
            ("NAME", "name"),
            ("VERSION", "version"),
            ("SHA256", "sha"),
            ("SIZE", "size"),
            ("SIGNATURE", "signature"),
            ("DEVICE TYPES", "types"),
        ],
    )


@model_app.command("orphans")
def model_orphans(
    delete: Annotated[bool, typer.Option("--delete", help="delete the orphans listed")] = False,
    older_than: Annotated[
        float,
        duration_option(
            "--older-than",
            help="only objects older than this (90, 30s, 5m, 1h): a push in flight "
            "between upload and registration is not an orphan",
        ),
    ] = 600.0,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    s3_endpoint: S3Endpoint = _DEFAULTS.s3_endpoint,
    s3_bucket: S3Bucket = _DEFAULTS.s3_bucket,
    as_json: Json = False,
) -> None:
    """List (or --delete) objects under models/ that no registered version refers to.

    They are left by pushes that stopped between upload and registration, or
    were refused after uploading. Nothing serves them: the controller presigns
    only the key of a registered version. Needs the controller (it says what is
    registered); the bucket is listed before asking it, so that nothing
    registered meanwhile is taken for an orphan.
    """
    with cli_errors():
        min_age = older_than
        artifacts = ArtifactStore(s3_endpoint, s3_bucket, _DEFAULTS.s3_region)
        objects = artifacts.list_objects()
        rows = asyncio.run(_request(_endpoint(mqtt_url, credentials), ListModels()))
        before = datetime.now(UTC) - timedelta(seconds=min_age)
        orphans = find_orphans(objects, (str(r["s3Key"]) for r in rows), before=before)
        if delete and orphans:
            artifacts.delete_objects([o.key for o in orphans])
    if as_json:
        emit_json(
            [
                {
                    "key": o.key,
                    "size": o.size,
                    "lastModified": iso_time(o.last_modified),
                    "deleted": delete,
                }
                for o in orphans
            ]
        )
        return
    if delete:
        for o in orphans:
            print(f"deleted {o.key} ({o.size} bytes)")
        print(f"deleted {len(orphans)} orphaned objects from bucket {s3_bucket}")
        return
    print_table(
        [
            {
                "key": o.key,
                "size": o.size,
                "modified": o.last_modified.isoformat(timespec="seconds"),
            }
            for o in orphans
        ],
        [("KEY", "key"), ("SIZE", "size"), ("LAST MODIFIED", "modified")],
    )
    if orphans:
        progress(f"{len(orphans)} orphaned objects; `hotswap model orphans --delete` removes them")


async def _all_devices(endpoint: MqttEndpoint, page: int = 1000) -> list[dict[str, Any]]:
    """Every device, a page per request (one session)."""
    rows: list[dict[str, Any]] = []
    async with OperatorClient(endpoint, timeout=_DEFAULTS.request_timeout_s) as op:
        while True:
            got = await op.request(ListDevices(offset=len(rows), limit=page))
            rows += got
            if len(got) < page:
                return rows
            if len(rows) >= 10_000:
                progress(f"{len(rows)} devices…")


@device_app.command("list")
def device_list(
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """List devices with what they serve."""
    with cli_errors():
        raw = asyncio.run(_all_devices(_endpoint(mqtt_url, credentials)))
    rows = [with_iso_times(r, _TIME_FIELDS, _LIST_FIELDS) for r in raw]
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


def parse_stages(text: str) -> tuple[StageSpec, ...]:
    """`10:5m,25:5m,100:0` → cumulative percent and bake time per stage; a ValueError
    naming `--stages` and the stage at fault else."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        percent, sep, duration = part.partition(":")
        try:
            if not sep:
                raise ValueError("use PERCENT:DURATION, e.g. 10:5m")
            try:
                share = float(percent.rstrip("%"))
            except ValueError:
                raise ValueError(f"{percent!r} is not a percentage") from None
            stages.append(StageSpec(percent=share, duration_s=parse_duration(duration)))
        except ValidationError as exc:  # out of range: percent in (0, 100], duration >= 0
            first = exc.errors()[0]
            field = "percent" if first["loc"][:1] == ("percent",) else "duration"
            why = str(first["msg"]).lower()
            raise ValueError(f"--stages: invalid stage {part!r}: {field} {why}") from None
        except ValueError as exc:
            raise ValueError(f"--stages: invalid stage {part!r}: {exc}") from None
    return tuple(stages)


_TASK_FORMS = "use classifier:OUTPUT, detector:OUTPUT:THRESHOLD or none"


def parse_task(text: str) -> ModelTask:
    """`classifier:OUTPUT`, `detector:OUTPUT:THRESHOLD` or `none` -> ModelTask; ValueError else.

    OUTPUT is a tensor name and may itself hold colons (`StatefulPartitionedCall:0`):
    a classifier's is everything after the first colon, a detector's everything
    up to the last one.
    """
    kind, _, rest = text.strip().partition(":")
    if kind == "none":
        if rest:
            raise ValueError(f"invalid --task {text!r}: none names no output")
        return ModelTask(kind="none")
    if kind == "classifier" and rest:
        return ModelTask(kind="classifier", output=rest)
    if kind == "detector":
        output, _, threshold = rest.rpartition(":")
        if output and threshold:
            try:
                score = float(threshold)
            except ValueError:
                score = -1.0
            if not 0.0 <= score <= 1.0:
                raise ValueError(
                    f"invalid --task {text!r}: the score threshold {threshold!r} is not a "
                    "number from 0 to 1"
                )
            return ModelTask(kind="detector", output=output, score_threshold=score)
    raise ValueError(f"invalid --task {text!r}: {_TASK_FORMS}")


def _ids(text: str | None) -> tuple[str, ...]:
    return tuple(d.strip() for d in (text or "").split(",") if d.strip())


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Option("--model", help="model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    strategy: Annotated[
        str,
        typer.Option("--strategy", help="one of: " + ", ".join(STRATEGY_NAMES)),
    ] = "direct",
    devices: Annotated[
        str | None, typer.Option("--devices", help="comma-separated device ids")
    ] = None,
    region: Annotated[str | None, typer.Option("--region", help="every device of a region")] = None,
    device_type: Annotated[
        str | None, typer.Option("--device-type", help="every device of a type")
    ] = None,
    all_devices: Annotated[
        bool, typer.Option("--all", help="the whole fleet (instead of a selector)")
    ] = False,
    supersede: Annotated[
        bool,
        typer.Option(
            "--supersede",
            help="cancel older active rollouts on the devices this one shares with them",
        ),
    ] = False,
    device_timeout: Annotated[
        float, duration_option("--device-timeout", help="how long a device may take (600, 10m)")
    ] = 600.0,
    retries: Annotated[
        int, typer.Option("--retries", min=0, max=10, help="re-sends to a failed device")
    ] = 0,
    canary_percent: Annotated[
        float, typer.Option("--canary-percent", help="canary: share of the targets")
    ] = 10.0,
    canary_duration: Annotated[
        float, duration_option("--canary-duration", help="canary: bake time (30s, 5m)")
    ] = 300.0,
    stages: Annotated[
        str | None, typer.Option("--stages", help="progressive: 10:5m,25:5m,50:10m,100:0")
    ] = None,
    regions: Annotated[
        str | None, typer.Option("--regions", help="regional: a,b,c in this order")
    ] = None,
    region_delay: Annotated[
        float, duration_option("--region-delay", help="regional: bake time per region")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="rolling: batch")] = 1,
    batch_delay: Annotated[
        float, duration_option("--batch-delay", help="rolling: pause between batches")
    ] = 0.0,
    version_b: Annotated[
        str | None, typer.Option("--version-b", help="ab: the version tested against --version")
    ] = None,
    test_duration: Annotated[
        float, duration_option("--test-duration", help="ab: how long both versions run")
    ] = 300.0,
    winner_metric: Annotated[
        str, typer.Option("--winner-metric", help="ab: latency, errors or confidence")
    ] = "latency",
    min_improvement: Annotated[
        float, typer.Option("--min-improvement", help="ab: share by which B must beat A")
    ] = 0.05,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="gate: candidate p95, ms")
    ] = None,
    max_error_rate: Annotated[
        float | None, typer.Option("--max-error-rate", help="gate: errors per inference")
    ] = None,
    max_latency_increase: Annotated[
        float | None,
        typer.Option(
            "--max-latency-increase",
            help="gate: fails when confident the p95 rose more than this (0.05: +5 %)",
        ),
    ] = None,
    max_confidence_drop: Annotated[
        float | None, typer.Option("--max-confidence-drop", help="gate: mean confidence drop")
    ] = None,
    min_agreement: Annotated[
        float | None, typer.Option("--min-agreement", help="gate (shadow): same top class share")
    ] = None,
    shadow_duration: Annotated[
        float, duration_option("--shadow-duration", help="shadow: how long inputs are mirrored")
    ] = 300.0,
    max_input_psi: Annotated[
        float | None, typer.Option("--max-input-psi", help="gate: input drift (PSI) vs baseline")
    ] = None,
    min_samples: Annotated[
        int, typer.Option("--min-samples", min=1, help="gate: inferences per cohort")
    ] = GateSpec().min_samples,
    manual_approval: Annotated[
        bool, typer.Option("--manual-approval", help="wait for approve at every stage")
    ] = False,
    allow_downgrade: Annotated[
        bool,
        typer.Option(
            "--allow-downgrade", help="devices may go below the version they have activated"
        ),
    ] = False,
    allow_interface_change: Annotated[
        bool,
        typer.Option(
            "--allow-interface-change",
            help="devices may take a model whose tensor interface differs from the one they serve",
        ),
    ] = False,
    max_failure_percent: Annotated[
        float, typer.Option("--max-failure-percent", help="abort: failed devices, percent")
    ] = 0.0,
    min_executed: Annotated[
        int, typer.Option("--min-executed", min=1, help="abort: after this many devices")
    ] = 1,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """Start a rollout on the devices named (--devices, --region, --device-type, or --all).

    Prints its id.
    """
    if strategy not in STRATEGY_NAMES:
        fail(f"unknown strategy {strategy!r} (available: {', '.join(STRATEGY_NAMES)})", 2)
    ids = _ids(devices)
    if devices is not None and not ids:
        fail("--devices names no device", 2)
    if ids and (region or device_type):
        fail("--devices cannot be combined with --region or --device-type", 2)
    if all_devices and (devices is not None or region or device_type):
        fail("--all cannot be combined with --devices, --region or --device-type", 2)
    if not (all_devices or ids or region or device_type):
        fail(
            "name the devices: --devices, --region or --device-type, or --all for the whole fleet",
            2,
        )
    with cli_errors():
        configure_tracing("hotswap-cli", short_lived=True)  # only when OTEL_* variables ask
        request = StartRollout.model_validate(
            {
                "model": model,
                "version": version,
                "strategy": strategy,
                "devices": ids,
                "region": region,
                "device_type": device_type,
                "all_devices": all_devices,
                "supersede": supersede,
                "device_timeout_s": device_timeout,
                "retries": retries,
                "canary_percent": canary_percent,
                "canary_duration_s": canary_duration,
                "stages": parse_stages(stages or ""),
                "regions": _ids(regions),
                "region_delay_s": region_delay,
                "batch_size": batch_size,
                "batch_delay_s": batch_delay,
                "version_b": version_b,
                "test_duration_s": test_duration,
                "winner_metric": winner_metric,
                "min_improvement": min_improvement,
                "shadow_duration_s": shadow_duration,
                "gates": GateSpec(
                    max_latency_ms=max_latency_ms,
                    max_error_rate=max_error_rate,
                    max_latency_increase=max_latency_increase,
                    max_confidence_drop=max_confidence_drop,
                    max_input_psi=max_input_psi,
                    min_agreement=min_agreement,
                    min_samples=min_samples,
                ),
                "manual_approval": manual_approval,
                "allow_downgrade": allow_downgrade,
                "allow_interface_change": allow_interface_change,
                "max_failure_percent": max_failure_percent,
                "min_executed": min_executed,
            }
        )
        # The rollout's trace starts here: the controller's spans and every device's
        # deploy join it through the request's traceparent.
        with tracing.span(
            "rollout start", attributes={"hotswap.model": model, "hotswap.version": version}
        ) as started:
            result = asyncio.run(_request(_endpoint(mqtt_url, credentials), request))
            if started is not None:
                started.set_attribute("hotswap.rollout_id", str(result["rolloutId"]))
    if as_json:
        emit_json(result)
    else:
        print(result["rolloutId"])


def _control(action: RolloutAction) -> Any:
    def command(
        rollout_id: Annotated[str, typer.Argument(help="the rollout id")],
        mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
        credentials: CredentialsDir = None,
        as_json: Json = False,
    ) -> None:
        with cli_errors():
            result = asyncio.run(
                _request(
                    _endpoint(mqtt_url, credentials),
                    ControlRollout(rollout_id=rollout_id, action=action),
                )
            )
        if as_json:
            emit_json(result)
        else:
            print(f"{result['rolloutId']} {result['status']}")

    command.__doc__ = {
        "approve": "Approve the next stage (or continue past inconclusive gates).",
        "pause": "Pause a rollout: nothing more is sent until resume or approve.",
        "resume": "Resume a paused rollout (its gates are read again).",
        "abort": "Stop a rollout where it is; devices keep what they run.",
        "rollback": "Roll every device that took the candidate back to its previous model.",
    }[action]
    return command


for _action in ("approve", "pause", "resume", "abort", "rollback"):
    rollout_app.command(_action)(_control(_action))


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
    if status.stage:
        print(f"stage     {status.stage}")
    if status.task:
        print(f"task      {status.task}")
    if status.agreement_rule:
        print(f"agreement {status.agreement_rule}")
    from controller.status import cohort_window, gate_line

    for label, cohort in (("candidate", status.candidate), ("baseline", status.baseline)):
        if cohort is not None and cohort.inferences:
            by_tensor = cohort.input_psi_by_tensor or {}
            psi = ", ".join(f"{name} {value:.3f}" for name, value in by_tensor.items())
            if not psi and cohort.input_psi is not None:
                psi = f"{cohort.input_psi:.3f}"
            confidence = (
                "n/a" if cohort.mean_confidence is None else f"{cohort.mean_confidence:.3f}"
            )
            print(
                f"{label:<9} {cohort.devices} devices, {cohort.inferences} inferences, "
                f"errors {cohort.error_rate or 0:.2%}, p95 {cohort.latency_p95_ms} ms, "
                f"confidence {confidence}" + (f", input PSI {psi}" if psi else "")
            )
    if status.ab is not None:
        ab = status.ab
        print(
            f"a/b       {ab.metric}: A {ab.version_a} {ab.value_a}, B {ab.version_b} {ab.value_b}"
            f" -> winner {ab.winner or '-'} ({ab.detail})"
        )
    if status.candidate is not None and (window := cohort_window(status.candidate)):
        print(f"window    {window}")
    for gate in status.gates:
        print(f"gate      {gate_line(gate)}")
    if status.device_states:
        states = ", ".join(f"{n} {state}" for state, n in sorted(status.device_states.items()))
        print(f"states    {states}")
    if status.devices or status.devices_targeted == 0:
        print_table(
            [d.model_dump() for d in status.devices],
            [("DEVICE", "device_id"), ("STATE", "state"), ("REASON", "reason")],
        )
    else:
        print(f"devices   hotswap rollout devices {status.rollout_id} [--state STATE]")


# What `rollout devices --state` can name: the states a device passes through in a
# rollout and, once it answered a rollback, the status's `rollback_failed`.
LISTED_STATES = (*DEVICE_STATES, "rollback_failed")


@rollout_app.command("devices")
def rollout_devices(
    rollout_id: Annotated[str, typer.Argument(help="the rollout id")],
    state: Annotated[
        str | None, typer.Option("--state", help="only devices in this state (e.g. failed)")
    ] = None,
    offset: Annotated[int, typer.Option("--offset", min=0, help="skip this many devices")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, max=5000, help="devices per page")] = 500,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """List a rollout's devices and their state, a page at a time (by device id)."""
    if state is not None and state not in LISTED_STATES:
        fail(f"--state {state!r}: not a device state (one of: {', '.join(LISTED_STATES)})", 2)
    request = ListRolloutDevices(rollout_id=rollout_id, state=state, offset=offset, limit=limit)
    with cli_errors():
        raw = asyncio.run(_request(_endpoint(mqtt_url, credentials), request))
    page = RolloutDevicesPage.model_validate(raw)
    if as_json:
        emit_json(page.model_dump(mode="json", by_alias=True))
        return
    print_table(
        [d.model_dump() for d in page.devices],
        [("DEVICE", "device_id"), ("STATE", "state"), ("REASON", "reason")],
    )
    shown = f"{page.offset + 1}-{page.offset + len(page.devices)}" if page.devices else "none"
    more = page.offset + len(page.devices) < page.total
    hint = f"; next: --offset {page.offset + len(page.devices)}" if more else ""
    print(f"devices {shown} of {page.total}{hint}", file=sys.stderr)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="the rollout id")],
    wait: Annotated[
        float | None,
        duration_option("--wait", help="block up to this long for a final status (120, 2m)"),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="redraw the status every second until it ends")
    ] = False,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """Show a rollout's retained status (no controller needed)."""
    if watch:
        with cli_errors():
            final = asyncio.run(_watch(_endpoint(mqtt_url, credentials), rollout_id, as_json))
        raise typer.Exit(0 if final.status == "Succeeded" else 1)
    with cli_errors():
        endpoint = _endpoint(mqtt_url, credentials)
        status = asyncio.run(read_rollout_status(endpoint, rollout_id, wait_s=wait))
    if as_json:
        emit_json(status.model_dump(mode="json", by_alias=True))
    else:
        _print_status(status)
    if wait is not None and status.status != "Succeeded":
        raise typer.Exit(1)


async def _watch(endpoint: MqttEndpoint, rollout_id: str, as_json: bool) -> RolloutStatus:
    """Print the status whenever it changes (a JSON line each with --json) until final."""
    last = ""
    stages = StageProgress()
    while True:
        status = await read_rollout_status(endpoint, rollout_id)
        stages.update(status)
        shown = status.model_dump_json(exclude={"updated_at"})
        if shown != last:
            last = shown
            if as_json:
                print(status.model_dump_json(by_alias=True), flush=True)
            else:
                print("\x1b[2J\x1b[H" if sys.stdout.isatty() else "", end="")
                _print_status(status)
                for line in stages.lines():
                    print(line)
                print(flush=True)
        if status.final:
            return status
        await asyncio.sleep(1.0)


class StageProgress:
    """What `rollout status --watch` shows of each stage it saw: devices done (activated
    or finished otherwise) of those targeted, as a bar; a stage's line freezes when the
    next one begins. Counts are the rollout's own (the retained status has no per-stage
    targets), so a stage's line shows how far the whole rollout had come by its end."""

    WIDTH = 20

    def __init__(self) -> None:
        self._stages: dict[str, tuple[int, int]] = {}  # stage -> (done, targeted), in order

    def update(self, status: RolloutStatus) -> None:
        if status.stage:
            done = status.devices_targeted - status.devices_pending
            self._stages[status.stage] = (done, status.devices_targeted)

    def lines(self) -> list[str]:
        out = []
        for stage, (done, targeted) in self._stages.items():
            filled = self.WIDTH * done // targeted if targeted else 0
            bar = "#" * filled + "." * (self.WIDTH - filled)
            out.append(f"progress  {stage:<16} [{bar}] {done}/{targeted} devices done")
        return out


@rollout_app.command("list")
def rollout_list(
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
    as_json: Json = False,
) -> None:
    """List rollouts, oldest first."""
    with cli_errors():
        raw = asyncio.run(_request(_endpoint(mqtt_url, credentials), ListRollouts()))
    rows = [with_iso_times(r, _TIME_FIELDS) for r in raw]
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


# ------------------------------------------------------------------ waiting for readiness

_POLL_S = 0.5


async def wait_until(probe: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    """Call `probe` until it returns True; a broker that does not answer yet (or a
    credentials directory not written yet) is retried, anything else raises. After
    `timeout_s`: BrokerError naming `what` and the last reason."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            if await probe():
                return
        except HotswapError as exc:
            retried = isinstance(exc, BrokerError | CredentialsError) or (
                exc.reason == "controller_unavailable"
            )
            if not retried or exc.reason == "not_authorized":
                raise  # waiting would not change the broker's (or the request's) mind
            last = str(exc)
        if time.monotonic() >= deadline:
            raise BrokerError(f"{what} not ready after {timeout_s:g}s: {last}", reason="timeout")
        await asyncio.sleep(_POLL_S)


async def _controller_online(endpoint: MqttEndpoint) -> bool:
    """Whether the controller's retained state says online (read from the broker)."""
    client = make_client(endpoint, identifier=f"hotswap-cli-{uuid.uuid4().hex[:12]}")
    try:
        async with client:
            await subscribe_checked(client, endpoint, topics.CONTROLLER_STATE)
            try:
                async with asyncio.timeout(1.0):  # a retained state comes right away
                    async for message in client.messages:
                        if isinstance(message.payload, bytes | bytearray) and message.payload:
                            return ControllerState.model_validate_json(message.payload).online
            except TimeoutError:
                return False
    except aiomqtt.MqttError as exc:
        raise connection_error(endpoint, exc) from exc
    return False


@controller_app.command("wait")
def controller_wait(
    timeout: Timeout = 30.0,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
) -> None:
    """Wait until the controller is online (its retained state says so); exit 1 after --timeout.

    For scripts that start `controller run` in the background. The broker may
    still be starting: it is retried too.
    """
    with cli_errors():
        parsed = parse_mqtt_url(mqtt_url)

        async def online() -> bool:
            return await _controller_online(endpoint_for(parsed, credentials))

        asyncio.run(wait_until(online, timeout_s=timeout, what="the controller"))
    progress("controller online")


@device_app.command("wait")
def device_wait(
    device_ids: Annotated[list[str], typer.Argument(help="device ids")],
    timeout: Timeout = 30.0,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    credentials: CredentialsDir = None,
) -> None:
    """Wait until the controller lists every DEVICE_ID online (so a rollout can target them).

    Asks the controller (`device list`'s pages) every half second; exit 1 after --timeout.
    """
    wanted = set(device_ids)
    with cli_errors():
        parsed = parse_mqtt_url(mqtt_url)

        async def online() -> bool:
            rows = await _all_devices(endpoint_for(parsed, credentials))
            return wanted <= {r["deviceId"] for r in rows if r.get("online")}

        asyncio.run(wait_until(online, timeout_s=timeout, what=", ".join(sorted(wanted))))
    progress(f"online: {', '.join(sorted(wanted))}")
