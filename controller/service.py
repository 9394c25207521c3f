"""The controller service: MQTT session, message handlers and the rollout executor.

An async service that owns a TaskGroup of named loops (receive, tick) inside a
reconnecting MQTT 5 session. Decisions come from `controller.planner` (pure);
this module loads their inputs from the database, persists each intent before
publishing it, and turns device messages into row updates. Every command is
signed with the controller's key (`shared.command_auth`) when it has one.
Device messages pass a per-device rate limit (`controller.rate_limit`) on
their topic before their payload is read, then a size limit, then validation
and the identity check (the payload's device id is the topic's). Does network
and database I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel
from sqlalchemy.exc import SQLAlchemyError

from controller import metrics
from controller.artifacts import ArtifactStore
from controller.db import AssignmentRow, ModelVersionRow, RolloutRow
from controller.gates import (
    ABReading,
    CohortStats,
    compare_ab,
    describe_failures,
    evaluate_gates,
    overall,
)
from controller.planner import (
    FINAL_DEVICE_STATES,
    ABChoice,
    AdvanceStage,
    AssignmentView,
    BeginRollback,
    DecideWinner,
    FinishRollout,
    GateReading,
    PauseRollout,
    ResendRollback,
    ResendSwitch,
    RetryDevice,
    RolloutView,
    SendDeploy,
    SendRegionDeploy,
    SendRollback,
    SendSwitch,
    SettleStage,
    StartRollout,
    TimeOutDevice,
    TimeOutRollback,
    plan_next_actions,
    plan_resends,
)
from controller.rate_limit import DeviceRateLimiter
from controller.status import build_status
from controller.store import Store, Superseded
from controller.strategies import STRATEGIES, Stage, Target
from shared import __version__, topics
from shared.command_auth import COMMAND_REFUSAL_REASONS, SIGNATURE_PROPERTY, sign_command
from shared.errors import BrokerError, HotswapError, RequestError
from shared.manifest import SignedManifest
from shared.messages import (
    MAX_MESSAGE_BYTES,
    REQUEST,
    ABComparison,
    CancelCommand,
    ControllerState,
    ControlRollout,
    DeployCommand,
    DeviceEvent,
    DeviceRecord,
    DeviceState,
    GetRollout,
    ListDevices,
    ListModels,
    ListRollouts,
    ModelRef,
    Ping,
    RegisterModel,
    Request,
    Response,
    RollbackCommand,
    RolloutStatus,
    Selector,
    SwitchCommand,
    TelemetryWindow,
)
from shared.messages import StartRollout as StartRolloutRequest
from shared.mqtt import (
    backoff_delays,
    connection_error,
    expiry_seconds,
    forget_group_cancellation,
    make_client,
    publish_properties,
    raise_if_cancelled,
    refused_code,
)
from shared.settings import MqttEndpoint

log = structlog.get_logger("hotswap.controller")

_INBOUND: dict[str, type[DeviceState] | type[DeviceEvent] | type[TelemetryWindow]] = {
    "state": DeviceState,
    "events": DeviceEvent,
    "telemetry": TelemetryWindow,
}


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    mqtt: MqttEndpoint
    db_url: str
    s3_endpoint: str | None
    s3_bucket: str
    s3_region: str = "us-east-1"
    presign_ttl_s: int = 3600
    command_ttl_s: int = 3600
    tick_s: float = 0.5
    # Finished rollouts keep their retained status fresh this long, so that
    # avgInferenceLatency reflects the telemetry of the new version once it arrives.
    status_refresh_s: float = 300.0
    client_id: str = "hotswap-controller"
    # The controller's own Ed25519 key: every command it publishes carries its signature
    # over topic + payload (freshness and origin; see shared.command_auth). None: unsigned.
    command_key: Ed25519PrivateKey | None = None
    # Per device (topic's device id): messages admitted per second, and the burst above it.
    device_rate_per_s: float = 100.0
    device_burst: int = 300
    # At start-up, how long to wait for another controller (same credentials) to answer.
    probe_s: float = 3.0
    # Repeated failures (database trouble, a rollout that cannot be stepped) are logged
    # at most once per this interval, with how many happened since.
    error_log_interval_s: float = 30.0


class _Throttle:
    """Counts repeated failures of one kind; says when to log them (at most once per interval)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def due(self, key: str, now: float) -> int | None:
        """Count one failure of `key`; the number to report now, or None to stay quiet."""
        self._count[key] = self._count.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return None
        self._last[key] = now
        return self._count.pop(key)


def database_error_text(exc: SQLAlchemyError) -> str:
    """One line for a database failure: the driver's own words, without SQL or parameters."""
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    return f"controller database: {first}"


def row_to_wire(row: BaseModel, *, exclude: set[str] | None = None) -> dict[str, Any]:
    return {to_camel(k): v for k, v in row.model_dump(exclude=exclude).items()}


class Controller:
    """Run with `await Controller(config).run()`; cancel the task to stop."""

    def __init__(self, config: ControllerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(config.db_url)
        self.artifacts = ArtifactStore(config.s3_endpoint, config.s3_bucket, config.s3_region)
        self.connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._published: dict[str, str] = {}  # rollout id -> fingerprint of last status
        self._client: aiomqtt.Client | None = None
        self._limiter = DeviceRateLimiter(config.device_rate_per_s, config.device_burst)
        self._throttle = _Throttle(config.error_log_interval_s)
        self._step_errors: dict[str, str] = {}  # rollout id -> the error last logged for it
        self.instance = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------ session

    async def run(self) -> None:
        """Serve until cancelled, reconnecting for ever with jittered, capped backoff.

        Ends early only on a fatal error: the broker refuses our credentials, or
        another controller already answers with them (BrokerError).
        """
        will = aiomqtt.Will(
            topics.CONTROLLER_STATE,
            ControllerState(online=False, version=__version__).to_wire(),
            qos=1,
            retain=True,
        )
        await self._refuse_if_not_alone()
        delays = backoff_delays()
        task = asyncio.current_task()
        sessions = 0
        while True:
            client = make_client(
                self.config.mqtt,
                identifier=self.config.client_id,
                will=will,
                persistent_session=True,
            )
            # A failed TaskGroup leaves its parent marked as cancelling on 3.11: only a
            # count above this one is a request to stop.
            baseline = task.cancelling() if task is not None else 0
            try:
                async with client:
                    self._client = client
                    delays = backoff_delays()
                    await self._on_connect(client)
                    sessions += 1
                    if sessions > 1:
                        log.warning("controller_reconnected", broker=str(self.config.mqtt))
                    # Connecting and publishing go through aiomqtt's wait_for: a cancellation
                    # it swallowed must stop us here, not after the TaskGroup never ends.
                    raise_if_cancelled(baseline)
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._receive_loop(client), name="receive")
                            tg.create_task(self._tick_loop(), name="tick")
                    except asyncio.CancelledError:
                        await self._say_offline(client)
                        raise
            except* aiomqtt.MqttError as group:
                forget_group_cancellation(baseline)
                error = cast(aiomqtt.MqttError, group.exceptions[0])
                refused = connection_error(self.config.mqtt, error)
                if refused.reason == "not_authorized":
                    raise refused from None  # reconnecting would not change the broker's mind
                delay = next(delays)
                log.warning(
                    "mqtt_disconnected",
                    broker=str(self.config.mqtt),
                    error=str(error) or type(error).__name__,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
            except* (SQLAlchemyError, HotswapError) as group:
                # The database was unreachable while (re)connecting: try the session again.
                forget_group_cancellation(baseline)
                delay = next(delays)
                log.error(
                    "controller_session_failed",
                    error=str(group.exceptions[0]).splitlines()[0],
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
            finally:
                self._client = None
                self.connected.clear()

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """On the way out (SIGTERM): the retained controller state says offline."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2.0):
                await client.publish(
                    topics.CONTROLLER_STATE,
                    ControllerState(online=False, version=__version__).to_wire(),
                    qos=1,
                    retain=True,
                )
                log.info("controller_offline", broker=str(self.config.mqtt))

    async def _refuse_if_not_alone(self) -> None:
        """Raise BrokerError when another controller answers with our credentials.

        Connecting with our client id would take its session over (MQTT lets the
        newer client win), so first look, under a probe id: the retained state
        says whether one was online; if so, a ping with a response topic tells a
        live one from a stale record. An unreachable broker is the session loop's
        business, not a reason to refuse.
        """
        probe_id = f"{self.config.client_id}-probe-{uuid.uuid4().hex[:8]}"
        client = make_client(self.config.mqtt, identifier=probe_id, timeout=5.0)
        try:
            async with client:
                await client.subscribe(topics.CONTROLLER_STATE, qos=1)
                answer = topics.response_topic(probe_id)
                can_ping = refused_code(await client.subscribe(answer, qos=1)) is None
                messages = aiter(client.messages)
                online = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        message = await anext(messages)
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray) and payload:
                            online = ControllerState.model_validate_json(payload).online
                if not online or not can_ping:
                    return
                correlation = uuid.uuid4().bytes
                await client.publish(
                    topics.CONTROLLER_REQUESTS,
                    Ping().to_wire(),
                    qos=1,
                    properties=publish_properties(
                        response_topic=answer, correlation=correlation, expiry_s=5
                    ),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.probe_s):
                        async for message in messages:
                            props = message.properties
                            if getattr(props, "CorrelationData", None) == correlation:
                                raise BrokerError(
                                    f"another controller is connected to {self.config.mqtt} "
                                    f"with these credentials (client id "
                                    f"{self.config.client_id!r}); stop it first, or give this "
                                    "one its own credentials",
                                    reason="controller_running",
                                )
        except (aiomqtt.MqttError, ValidationError):
            return

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        for topic in (
            topics.ALL_DEVICE_REGISTRY,
            topics.ALL_DEVICE_STATES,
            topics.ALL_DEVICE_EVENTS,
            topics.ALL_DEVICE_TELEMETRY,
            topics.CONTROLLER_REQUESTS,
        ):
            refused = refused_code(await client.subscribe(topic, qos=1))
            if refused is not None:
                log.error("subscription_refused", topic=topic, code=str(refused))
        await client.publish(
            topics.CONTROLLER_STATE,
            ControllerState(online=True, version=__version__).to_wire(),
            qos=1,
            retain=True,
        )
        # Resume: re-send every command whose outcome is still open. The command id
        # is unchanged, so a device that already has it answers without redoing work.
        for rollout in self.store.open_rollouts():
            await self._resend(rollout, self.store.assignments(rollout.rollout_id))
        self._published.clear()
        self.connected.set()
        self._wake.set()
        log.info("controller_connected", broker=str(self.config.mqtt))

    # ------------------------------------------------------------ inbound

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            try:
                await self._dispatch(client, topic, message)
            except HotswapError as exc:
                log.warning("message_rejected", topic=topic, reason=exc.reason, error=str(exc))
            except aiomqtt.MqttError:
                raise  # the session is gone: reconnect
            except SQLAlchemyError as exc:
                # Counted, and logged once per interval: a full disk must not flood the log.
                kind = topic.rsplit("/", 1)[-1]
                metrics.DROPPED.labels("db_error").inc()
                self._log_throttled(
                    "telemetry_store_failed" if kind == "telemetry" else "message_store_failed",
                    error=database_error_text(exc),
                )
            except Exception:
                # One bad message must never stop the controller serving the fleet.
                log.exception("message_handler_failed", topic=topic)
            # Checked after the work: a cancellation a publish swallowed stops us now,
            # not whenever the next message happens to arrive.
            raise_if_cancelled()

    async def _dispatch(self, client: aiomqtt.Client, topic: str, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload or "").encode()
        if topic == topics.CONTROLLER_REQUESTS:
            await self._on_request(client, bytes(payload), message)
            return
        if topic.startswith(topics.ALL_DEVICE_REGISTRY.removesuffix("+")):
            await self._on_record(topic, bytes(payload))
            return
        try:
            where = topics.parse_device_topic(topic)
        except topics.TopicError:
            metrics.MESSAGES.labels("unknown", "rejected").inc()
            return
        kind = where.leaf
        if kind == "cmd":
            return  # our own commands
        # Before anything reads the payload: one device's flood must not starve the others.
        admission = self._limiter.admit(where.device_id, time.monotonic())
        if not admission.allowed:
            metrics.DROPPED.labels("rate_limited").inc()
            if admission.report:
                log.warning(
                    "device_rate_limited",
                    device_id=where.device_id,
                    dropped=admission.report,
                    rate_per_s=self.config.device_rate_per_s,
                )
            return
        if len(payload) > MAX_MESSAGE_BYTES:
            metrics.MESSAGES.labels(kind, "rejected").inc()
            metrics.DROPPED.labels("too_large").inc()
            log.warning(
                "message_too_large", device_id=where.device_id, topic=topic, size=len(payload)
            )
            return
        if kind == "state" and not payload:
            return  # a cleared retained state
        model = _INBOUND[kind]
        try:
            msg = model.model_validate_json(payload)
        except ValidationError as exc:
            metrics.MESSAGES.labels(kind, "rejected").inc()
            metrics.DROPPED.labels("malformed").inc()
            log.warning(
                "message_malformed",
                device_id=where.device_id,
                topic=topic,
                error=_first_error(exc),
            )
            return
        if msg.device_id != where.device_id:
            metrics.MESSAGES.labels(kind, "rejected").inc()
            metrics.DROPPED.labels("identity_mismatch").inc()
            log.warning(
                "message_identity_mismatch",
                topic=topic,
                topic_device=where.device_id,
                payload_device=msg.device_id,
            )
            return
        now = self.clock()
        metrics.MESSAGES.labels(kind, "accepted").inc()
        if isinstance(msg, DeviceState):
            refused = self.store.upsert_device(msg, now)
            if refused is not None:
                # Provisioning fixed who it is; the rest of its state is still taken.
                metrics.DROPPED.labels("identity_claim").inc()
                log.warning("device_identity_refused", device_id=msg.device_id, detail=refused)
            metrics.DEVICES_ONLINE.set(self.store.devices_online())
            log.info(
                "device_state",
                device_id=msg.device_id,
                online=msg.online,
                active=msg.active.ref if msg.active else None,
            )
            # A live (not retained) online state: the device has just (re)connected or
            # changed model. Retained copies come on our own reconnect, which resends.
            if msg.online and not message.retain:
                await self._device_back(msg.device_id)
        elif isinstance(msg, DeviceEvent):
            if msg.phase == "downloading" and msg.reason == "url_expired":
                await self._represign(msg)
                return
            if msg.phase == "failed" and msg.reason in COMMAND_REFUSAL_REASONS:
                # A forged or replayed copy refused by the device: our own command with
                # that id is still valid and still in flight; its timeout covers the rest.
                log.warning(
                    "device_refused_command_copy",
                    device_id=msg.device_id,
                    rollout_id=msg.rollout_id,
                    command_id=msg.command_id,
                    reason=msg.reason,
                    detail=msg.detail,
                )
                return
            row = self.store.apply_event(msg, now)
            log.info(
                "device_event",
                device_id=msg.device_id,
                rollout_id=msg.rollout_id,
                command_id=msg.command_id,
                phase=msg.phase,
                reason=msg.reason,
                applied=row is not None,
            )
            if row is not None:
                self._wake.set()
        else:
            self.store.record_telemetry(msg)

    async def _on_record(self, topic: str, payload: bytes) -> None:
        """A provisioning record (the broker's admin writes these; devices cannot)."""
        try:
            device_id = topics.parse_registry_topic(topic)
        except topics.TopicError:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            return
        if not payload:
            return  # a cleared record
        try:
            record = DeviceRecord.model_validate_json(payload)
        except ValidationError as exc:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            log.warning("registry_record_malformed", topic=topic, error=_first_error(exc))
            return
        if record.device_id != device_id:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            return
        metrics.MESSAGES.labels("registry", "accepted").inc()
        touched = self.store.apply_record(record, self.clock())
        metrics.DEVICES_ONLINE.set(self.store.devices_online())
        if record.revoked:
            log.warning("device_revoked", device_id=device_id, assignments_closed=len(touched))
        else:
            log.info(
                "device_provisioned",
                device_id=device_id,
                region=record.region,
                device_type=record.device_type,
            )
        for rollout_id in sorted(set(touched)):
            await self._publish_status(self.store.get_rollout(rollout_id))
        if touched:
            self._wake.set()

    def _log_throttled(self, event: str, **facts: Any) -> None:
        """Log a repeated failure at most once per interval, with how many happened."""
        count = self._throttle.due(event, time.monotonic())
        if count is not None:
            log.error(event, failures=count, per_s=self.config.error_log_interval_s, **facts)

    async def _on_request(
        self, client: aiomqtt.Client, payload: bytes, message: aiomqtt.Message
    ) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        kind = "invalid"
        try:
            if len(payload) > MAX_MESSAGE_BYTES:
                raise RequestError(f"request too large ({len(payload)} bytes)")
            try:
                request = REQUEST.validate_json(payload)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(map(str, first["loc"]))
                raise RequestError(f"malformed request: {where}: {first['msg']}") from exc
            kind = request.kind
            result = await self._handle(request)
            response = Response(ok=True, result=result)
        except HotswapError as exc:
            response = Response(ok=False, error=str(exc), reason=exc.reason)
        except aiomqtt.MqttError:
            raise
        except SQLAlchemyError as exc:
            # Answered at once: the operator must not wait out a timeout and blame the broker.
            response = Response(ok=False, error=database_error_text(exc), reason="database_error")
            self._log_throttled("request_database_error", kind=kind, error=response.error)
        except Exception as exc:
            log.exception("request_failed", kind=kind)
            response = Response(
                ok=False, error=f"controller error: {type(exc).__name__}: {exc}", reason="internal"
            )
        metrics.REQUESTS.labels(kind, str(response.ok).lower()).inc()
        log.info("request", kind=kind, ok=response.ok, error=response.error)
        if response_topic and not str(response_topic).startswith(f"{topics.RESPONSES_PREFIX}/"):
            # Answers go under the responses prefix only: a request must not make the
            # controller publish on a device's cmd topic or any other topic it may write.
            log.warning("response_topic_refused", kind=kind, response_topic=response_topic)
        elif response_topic:
            await client.publish(
                response_topic,
                response.to_wire(),
                qos=1,
                properties=publish_properties(correlation=correlation, expiry_s=60),
            )

    async def _handle(self, request: Request) -> Any:
        now = self.clock()
        if isinstance(request, RegisterModel):
            return await self._register(request, now)
        if isinstance(request, ListModels):
            return [
                row_to_wire(r, exclude={"signed_manifest", "id"}) for r in self.store.list_models()
            ]
        if isinstance(request, ListDevices):
            return [row_to_wire(r) for r in self.store.list_devices()]
        if isinstance(request, Ping):
            return {
                "clientId": self.config.client_id,
                "version": __version__,
                "instance": self.instance,
            }
        if isinstance(request, StartRolloutRequest):
            if not (
                request.devices or request.region or request.device_type or request.all_devices
            ):
                raise RequestError(
                    "name the devices: --devices, --region or --device-type, "
                    "or --all for the whole fleet",
                    reason="bad_request",
                )
            model = self.store.get_model(request.model, request.version)
            if request.strategy == "ab" and request.version_b:
                other = self.store.get_model(request.model, request.version_b)
                if other.signature != model.signature:
                    raise RequestError(
                        f"A/B versions must share a tensor signature: {model.version} is "
                        f"{model.signature}, {other.version} is {other.signature}",
                        reason="bad_request",
                    )
            targets = self.store.resolve_targets(request, model)
            created = self.store.create_rollout(request, model, targets, now)
            rollout = created.rollout
            log.info(
                "rollout_created",
                rollout_id=rollout.rollout_id,
                model=f"{model.name}@{model.version}",
                strategy=rollout.strategy,
                devices=len(targets),
                superseded=[x.rollout_id for x in created.superseded],
            )
            for older in created.superseded:
                await self._cancel_superseded(older, rollout.rollout_id)
            await self._publish_status(rollout)
            self._wake.set()
            return {
                "rolloutId": rollout.rollout_id,
                "devicesTargeted": len(targets),
                "superseded": {x.rollout_id: len(x.devices) for x in created.superseded},
            }
        if isinstance(request, ControlRollout):
            return await self._control(request, now)
        if isinstance(request, GetRollout):
            rollout = self.store.get_rollout(request.rollout_id)
            return self._status(rollout).model_dump(mode="json", by_alias=True)
        if isinstance(request, ListRollouts):
            return [self._listed(r) for r in self.store.list_rollouts()]
        raise RequestError(f"unsupported request {request.kind!r}")

    def _listed(self, rollout: RolloutRow) -> dict[str, Any]:
        """One row of `rollout list`; a rollout whose status cannot be built still shows."""
        try:
            status = self._status(rollout)
        except (ValidationError, ValueError, KeyError) as exc:
            log.warning("rollout_status_failed", rollout_id=rollout.rollout_id, error=str(exc))
            return {
                "rolloutId": rollout.rollout_id,
                "model": rollout.model,
                "version": rollout.version,
                "strategy": rollout.strategy,
                "status": rollout.status,
                "reason": rollout.reason,
                "devicesTargeted": 0,
                "devicesUpdated": 0,
            }
        return status.model_dump(mode="json", by_alias=True, exclude={"devices"})

    async def _cancel_superseded(self, older: Superseded, newer_id: str) -> None:
        """Tell the devices an older rollout lost to drop its work, and republish its status."""
        rollout = self.store.get_rollout(older.rollout_id)
        command_id = f"c-{uuid.uuid4().hex}"
        command = CancelCommand(**self._envelope(rollout, command_id, None, older.devices))
        await self._send(command, region=None, devices=older.devices)
        if older.ended:
            metrics.ROLLOUTS.labels("Aborted").inc()
        log.warning(
            "rollout_superseded",
            rollout_id=older.rollout_id,
            by=newer_id,
            devices=len(older.devices),
            ended=older.ended,
        )
        await self._publish_status(rollout)

    async def _register(self, request: RegisterModel, now: float) -> dict[str, Any]:
        manifest = request.manifest.unverified()
        size = await asyncio.to_thread(self.artifacts.object_size, request.s3_key)
        if size != manifest.size:
            raise RequestError(
                f"artifact {request.s3_key} is {size} bytes in S3, the manifest says "
                f"{manifest.size}",
                reason="artifact_mismatch",
            )
        row = self.store.register_model(request.manifest, request.s3_key, now)
        log.info("model_registered", model=manifest.ref, sha256=manifest.sha256)
        return row_to_wire(row, exclude={"signed_manifest", "id"})

    # ------------------------------------------------------------ executor

    async def _tick_loop(self) -> None:
        while True:
            raise_if_cancelled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._tick()
            except aiomqtt.MqttError:
                raise  # the session is gone: reconnect
            except SQLAlchemyError as exc:
                self._log_throttled("tick_database_error", error=database_error_text(exc))

    async def _tick(self) -> None:
        """Step every open rollout; one that cannot be stepped does not stop the others."""
        open_rollouts = self.store.open_rollouts()
        metrics.OPEN_ROLLOUTS.set(len(open_rollouts))
        for rollout in open_rollouts:
            try:
                await self._step(rollout)
                self._step_errors.pop(rollout.rollout_id, None)
            except (aiomqtt.MqttError, SQLAlchemyError):
                raise
            except HotswapError as exc:
                log.warning(
                    "rollout_step_failed",
                    rollout_id=rollout.rollout_id,
                    reason=exc.reason,
                    error=str(exc),
                )
            except Exception as exc:
                self._step_failed(rollout, exc)
        finished = self.store.recently_finished(self.clock() - self.config.status_refresh_s)
        for rollout in finished:
            try:
                await self._publish_status(rollout)
            except (aiomqtt.MqttError, SQLAlchemyError):
                raise
            except Exception as exc:
                self._step_failed(rollout, exc)
        # Fingerprints only matter while a status may still change: keep memory flat.
        live = {r.rollout_id for r in open_rollouts} | {r.rollout_id for r in finished}
        for rollout_id in self._published.keys() - live:
            del self._published[rollout_id]

    def _step_failed(self, rollout: RolloutRow, exc: Exception) -> None:
        """A bug or a damaged row: say so on the rollout (once per new error), go on."""
        words = (str(exc).strip().splitlines() or [""])[0]
        reason = f"controller error: {type(exc).__name__}: {words}"[:500]
        if self._step_errors.get(rollout.rollout_id) == reason:
            return
        self._step_errors[rollout.rollout_id] = reason
        log.exception("rollout_step_failed", rollout_id=rollout.rollout_id, error=reason)
        self.store.mark_step_failed(rollout.rollout_id, reason, self.clock())

    def _spec(self, rollout: RolloutRow) -> StartRolloutRequest:
        return StartRolloutRequest.model_validate_json(rollout.spec)

    def _stages(
        self, rollout: RolloutRow, assignments: list[AssignmentRow]
    ) -> tuple[StartRolloutRequest, list[Stage]]:
        spec = self._spec(rollout)
        targets = [Target(a.device_id, a.region) for a in assignments]
        return spec, STRATEGIES[rollout.strategy](targets, spec, rollout.rollout_id)

    def _shadow_seconds(self, rollout: RolloutRow) -> float:
        # Mirror through the whole bake, with room for devices that start late.
        return self._spec(rollout).shadow_duration_s + rollout.device_timeout_s

    def _cohorts(
        self, rollout: RolloutRow, assignments: list[AssignmentRow]
    ) -> tuple[CohortStats, CohortStats]:
        """Candidate (activated the new version) vs baseline (untouched), this stage.

        Shadow rollouts: the candidate's mirrored inferences vs what the same devices
        served over the same window.
        """
        since = rollout.stage_started_at or rollout.created_at
        if rollout.strategy == "shadow":
            staged = [a.device_id for a in assignments if a.state == "staged"]
            return (
                self.store.cohort_stats(
                    rollout.model, staged, since, version=rollout.version, shadow=True
                ),
                self.store.cohort_stats(rollout.model, staged, since, not_version=rollout.version),
            )
        candidate = self.store.cohort_stats(
            rollout.model,
            [a.device_id for a in assignments if a.state == "activated"],
            since,
            version=rollout.version,
        )
        baseline = self.store.cohort_stats(
            rollout.model,
            [a.device_id for a in assignments if a.state == "pending"],
            since,
            not_version=rollout.version,
        )
        return candidate, baseline

    def _ab_reading(
        self, rollout: RolloutRow, spec: StartRolloutRequest, assignments: list[AssignmentRow]
    ) -> ABReading:
        since = rollout.stage_started_at or rollout.created_at
        sides = []
        for version in (rollout.version, rollout.version_b or ""):
            devices = [
                a.device_id
                for a in assignments
                if a.state == "activated" and (a.version or rollout.version) == version
            ]
            sides.append(self.store.cohort_stats(rollout.model, devices, since, version=version))
        return compare_ab(
            spec.winner_metric, spec.min_improvement, sides[0], sides[1], spec.gates.min_samples
        )

    async def _step(self, rollout: RolloutRow) -> None:
        now = self.clock()
        assignments = self.store.assignments(rollout.rollout_id)
        spec, stages = self._stages(rollout, assignments)
        reading = None
        ab_choice = None
        if rollout.strategy == "ab":
            ab = self._ab_reading(rollout, spec, assignments)
            ab_choice = ABChoice(ab.winner, ab.detail)
        elif spec.gates.any:
            verdicts = evaluate_gates(spec.gates, *self._cohorts(rollout, assignments))
            verdict = overall(verdicts)
            detail = (
                describe_failures(verdicts)
                if verdict == "fail"
                else ", ".join(
                    f"{v.gate} {v.verdict} ({v.detail})" for v in verdicts if v.verdict != "pass"
                )
            )
            reading = GateReading(verdict, detail)
        actions = plan_next_actions(
            RolloutView(
                rollout.rollout_id,
                rollout.strategy,
                rollout.status,
                rollout.device_timeout_s,
                stage_index=rollout.stage_index,
                stage_settled_at=rollout.stage_settled_at,
                approved_stage=rollout.approved_stage,
                rolling_back=rollout.rolling_back,
                manual_approval=spec.manual_approval,
                has_gates=spec.gates.any,
                max_failure_percent=spec.max_failure_percent,
                min_executed=spec.min_executed,
                retries=spec.retries,
                version=rollout.version,
                version_b=rollout.version_b,
                winner=rollout.winner,
            ),
            stages,
            [assignment_view(a) for a in assignments],
            reading,
            now,
            ab_choice,
        )
        bound = log.bind(rollout_id=rollout.rollout_id)
        rid = rollout.rollout_id
        for action in actions:
            if isinstance(action, StartRollout):
                self.store.update_rollout(rid, now, status="InProgress", stage_started_at=now)
                bound.info("rollout_started", strategy=rollout.strategy, stages=len(stages))
            elif isinstance(action, SendDeploy):
                command_id = f"c-{uuid.uuid4().hex}"
                self.store.mark_sent(rid, action.device_id, command_id, now)
                await self._publish_deploy(
                    rollout,
                    action.device_id,
                    command_id,
                    activate=action.activate,
                    shadow_s=self._shadow_seconds(rollout) if action.shadow else None,
                )
            elif isinstance(action, SendRegionDeploy):
                command_id = f"c-{uuid.uuid4().hex}"
                for device_id in action.devices:
                    self.store.mark_sent(rid, device_id, command_id, now)
                await self._publish_deploy(
                    rollout,
                    None,
                    command_id,
                    region=action.region,
                    cohort=action.devices,
                    activate=action.activate,
                )
            elif isinstance(action, SendSwitch):
                regions: dict[str, list[str]] = {}
                for a in assignments:
                    if a.device_id in action.devices:
                        regions.setdefault(a.region, []).append(a.device_id)
                for region, members in sorted(regions.items()):
                    command_id = f"c-{uuid.uuid4().hex}"
                    self.store.mark_switching(rid, members, command_id, now)
                    await self._publish_switch(
                        rollout, command_id, region=region or None, devices=tuple(members)
                    )
            elif isinstance(action, RetryDevice):
                if self.store.reset_for_retry(rid, action.device_id, now):
                    bound.info("device_retry", device_id=action.device_id)
            elif isinstance(action, TimeOutDevice):
                if self.store.mark_timed_out(rid, action.device_id, now):
                    bound.warning("device_timed_out", device_id=action.device_id)
            elif isinstance(action, DecideWinner):
                moved = self.store.decide_winner(rid, action.version, now)
                decided = self._comparison(self.store.get_rollout(rid), spec, assignments)
                if decided is not None:
                    self.store.update_rollout(rid, now, ab_result=decided.model_dump_json())
                bound.info("ab_winner", version=action.version, detail=action.detail, moved=moved)
            elif isinstance(action, SettleStage):
                self.store.update_rollout(rid, now, stage_settled_at=now)
                bound.info("stage_settled", stage=stages[action.index].name)
            elif isinstance(action, AdvanceStage):
                self.store.update_rollout(
                    rid, now, stage_index=action.index, stage_started_at=now, stage_settled_at=None
                )
                bound.info("stage_started", stage=stages[action.index].name, index=action.index)
            elif isinstance(action, PauseRollout):
                self.store.update_rollout(rid, now, status="Paused", reason=action.reason)
                bound.info("rollout_paused", reason=action.reason)
            elif isinstance(action, BeginRollback):
                self.store.update_rollout(rid, now, rolling_back=True, reason=action.reason)
                metrics.ROLLBACKS.inc()
                bound.warning("rollout_rolling_back", reason=action.reason)
            elif isinstance(action, SendRollback):
                continue  # grouped per region below: one command flips a region back
            elif isinstance(action, TimeOutRollback):
                self.store.mark_rollback_timed_out(rid, action.device_id, now)
                bound.warning("rollback_timed_out", device_id=action.device_id)
            elif isinstance(action, FinishRollout):
                current = self.store.get_rollout(rid)
                self.store.set_rollout_status(
                    rid, action.status, action.reason or current.reason, now, final=True
                )
                metrics.ROLLOUTS.labels(action.status).inc()
                bound.info("rollout_finished", status=action.status, reason=action.reason)
        reverting = {a.device_id for a in actions if isinstance(a, SendRollback)}
        by_region: dict[str, list[str]] = {}
        for a in assignments:
            if a.device_id in reverting:
                by_region.setdefault(a.region, []).append(a.device_id)
        for region, members in sorted(by_region.items()):
            command_id = f"c-{uuid.uuid4().hex}"
            sent = [d for d in members if self.store.mark_rollback_sent(rid, d, command_id, now)]
            if sent:
                await self._publish_rollback(
                    rollout, command_id, region=region or None, devices=sent
                )
        await self._publish_status(self.store.get_rollout(rid))

    def _envelope(
        self,
        rollout: RolloutRow,
        command_id: str,
        region: str | None,
        devices: Sequence[str],
        *,
        since: float | None = None,
    ) -> dict[str, Any]:
        """What every command carries: ids, issue and expiry times, a region's selector.

        A command expires when the device's time for it is up (`since`, when it was
        first sent, plus the rollout's device timeout): the broker drops it from an
        offline device's session then, and agents refuse it, so a device that timed
        out cannot change version behind the record.
        """
        issued = datetime.now(UTC)
        ttl = min(float(self.config.command_ttl_s), rollout.device_timeout_s)
        expires = max(issued.timestamp() + 1.0, (since or issued.timestamp()) + ttl)
        return {
            "command_id": command_id,
            "rollout_id": rollout.rollout_id,
            "issued_at": issued,
            "expires_at": datetime.fromtimestamp(expires, UTC),
            "selector": Selector(cohort=tuple(devices)) if region is not None else None,
        }

    async def _send(
        self,
        command: DeployCommand | SwitchCommand | RollbackCommand | CancelCommand,
        *,
        region: str | None,
        devices: Sequence[str],
    ) -> None:
        """One publish on the region's topic (its selector names the devices), or one each."""
        expiry = expiry_seconds(command.expires_at, command.issued_at)
        if region is not None:
            targets = [topics.region_cmd(region)]
        else:
            targets = [topics.device_cmd(d) for d in devices]
        payload = command.to_wire()
        for topic in targets:
            await self._publish(topic, payload, expiry_s=expiry, signed=True)
        metrics.COMMANDS.labels(command.kind).inc()
        log.info(
            f"{command.kind}_sent",
            rollout_id=command.rollout_id,
            command_id=command.command_id,
            region=region,
            devices=list(devices),
        )

    async def _publish_switch(
        self,
        rollout: RolloutRow,
        command_id: str,
        *,
        region: str | None,
        devices: tuple[str, ...],
        since: float | None = None,
    ) -> None:
        """Blue-green flip: make the staged candidate active."""
        to = ModelRef(name=rollout.model, version=rollout.version, sha256=rollout.sha256)
        envelope = self._envelope(rollout, command_id, region, devices, since=since)
        command = SwitchCommand(**envelope, to=to)
        await self._send(command, region=region, devices=devices)

    async def _publish_rollback(
        self,
        rollout: RolloutRow,
        command_id: str,
        *,
        region: str | None,
        devices: Sequence[str],
        since: float | None = None,
    ) -> None:
        """Swap back to the resident previous model."""
        command = RollbackCommand(
            **self._envelope(rollout, command_id, region, devices, since=since)
        )
        await self._send(command, region=region, devices=devices)

    async def _control(self, request: ControlRollout, now: float) -> dict[str, Any]:
        rollout = self.store.get_rollout(request.rollout_id)
        status, action = rollout.status, request.action
        final = status in ("Succeeded", "Failed", "RolledBack", "Aborted")
        refused = RequestError(
            f"cannot {action} rollout {rollout.rollout_id}: it is {status}", reason="bad_request"
        )
        if action == "approve":
            if final:
                raise refused
            self.store.update_rollout(
                rollout.rollout_id,
                now,
                status="InProgress" if status == "Paused" else status,
                approved_stage=max(rollout.approved_stage, rollout.stage_index + 1),
                reason=None,
            )
        elif action == "pause":
            if status not in ("Pending", "InProgress"):
                raise refused
            self.store.update_rollout(
                rollout.rollout_id, now, status="Paused", reason="paused by the operator"
            )
        elif action == "resume":
            if status != "Paused":
                raise refused
            self.store.update_rollout(rollout.rollout_id, now, status="InProgress", reason=None)
        elif action == "abort":
            if final:
                raise refused
            self.store.set_rollout_status(
                rollout.rollout_id, "Aborted", "aborted by the operator", now, final=True
            )
        else:  # rollback
            if status in ("RolledBack",) or rollout.rolling_back:
                raise refused
            if final:  # it reopens: its devices must not be another rollout's meanwhile
                self.store.reclaim(rollout.rollout_id, now)
            self.store.update_rollout(
                rollout.rollout_id,
                now,
                status="InProgress",
                rolling_back=True,
                finished_at=None,
                reason="rolled back by the operator",
            )
        log.info("rollout_control", rollout_id=rollout.rollout_id, action=action)
        self._wake.set()
        updated = self.store.get_rollout(rollout.rollout_id)
        await self._publish_status(updated)
        return {"rolloutId": updated.rollout_id, "status": updated.status}

    async def _represign(self, event: DeviceEvent) -> None:
        """A device's presigned URL expired mid-download: send the same command, new URL."""
        if not event.rollout_id:
            return
        rollout = self.store.get_rollout(event.rollout_id)
        for a in self.store.assignments(rollout.rollout_id):
            if (
                a.device_id == event.device_id
                and a.command_id == event.command_id
                and a.state not in FINAL_DEVICE_STATES
            ):
                log.info(
                    "url_represigned",
                    rollout_id=rollout.rollout_id,
                    device_id=event.device_id,
                    command_id=event.command_id,
                )
                await self._publish_deploy(rollout, a.device_id, a.command_id, since=a.sent_at)

    async def _resend(self, rollout: RolloutRow, assignments: Sequence[AssignmentRow]) -> None:
        """Publish again what `plan_resends` says is still open for these devices."""
        shadow_s = self._shadow_seconds(rollout) if rollout.strategy == "shadow" else None
        for resend in plan_resends(rollout.strategy, [assignment_view(a) for a in assignments]):
            devices = (resend.device_id,)
            if isinstance(resend, ResendSwitch):
                await self._publish_switch(
                    rollout, resend.command_id, region=None, devices=devices, since=resend.since
                )
            elif isinstance(resend, ResendRollback):
                await self._publish_rollback(
                    rollout, resend.command_id, region=None, devices=devices, since=resend.since
                )
            else:
                await self._publish_deploy(
                    rollout,
                    resend.device_id,
                    resend.command_id,
                    activate=resend.activate,
                    shadow_s=shadow_s if resend.shadow else None,
                    since=resend.since,
                )

    async def _device_back(self, device_id: str) -> None:
        """A device (re)connected: its session, with the commands queued in it, may be
        new (a broker restarted without them), so what is open for it goes again."""
        found = self.store.open_assignment(device_id)
        if found is not None:
            await self._resend(*found)

    async def _publish_deploy(
        self,
        rollout: RolloutRow,
        device_id: str | None,
        command_id: str,
        *,
        region: str | None = None,
        cohort: tuple[str, ...] = (),
        activate: bool = True,
        shadow_s: float | None = None,
        since: float | None = None,
    ) -> None:
        """One device's command, or one publish on a region's topic for a cohort of it."""
        version = rollout.version
        if rollout.version_b is not None:  # A/B: each device has its side (or the winner)
            wanted = {a.version for a in self.store.assignments(rollout.rollout_id)
                      if a.device_id == device_id or a.device_id in cohort}  # fmt: skip
            version = next(iter(wanted - {""}), rollout.version)
        model = self.store.get_model(rollout.model, version)
        url = await asyncio.to_thread(
            self.artifacts.presign_get, model.s3_key, self.config.presign_ttl_s
        )
        devices = cohort if region is not None else (str(device_id),)
        spec = self._spec(rollout)
        command = DeployCommand(
            **self._envelope(rollout, command_id, region, devices, since=since),
            manifest=SignedManifest.model_validate_json(model.signed_manifest),
            url=url,
            activate=activate,
            shadow_s=shadow_s,
            # Anti-rollback override: an A/B winner may be the lower version; otherwise
            # only when the operator started the rollout with allow_downgrade.
            allow_downgrade=rollout.strategy == "ab" or spec.allow_downgrade,
            allow_interface_change=spec.allow_interface_change,
        )
        await self._send(command, region=region, devices=devices)

    def _comparison(
        self, rollout: RolloutRow, spec: StartRolloutRequest, assignments: list[AssignmentRow]
    ) -> ABComparison | None:
        """An A/B test's comparison: as decided once there is a winner, else live."""
        if rollout.strategy != "ab" or not rollout.version_b:
            return None
        if rollout.ab_result is not None:
            return ABComparison.model_validate_json(rollout.ab_result)
        r = self._ab_reading(rollout, spec, assignments)
        return ABComparison(
            metric=spec.winner_metric,
            version_a=rollout.version,
            version_b=rollout.version_b,
            value_a=r.value_a,
            value_b=r.value_b,
            improvement=r.improvement,
            winner=rollout.winner,
            detail=r.detail,
        )

    def _status(self, rollout: RolloutRow) -> RolloutStatus:
        assignments: list[AssignmentRow] = self.store.assignments(rollout.rollout_id)
        latency = self.store.avg_latency_ms(
            rollout.model,
            rollout.version,
            [a.device_id for a in assignments if a.state == "activated"],
            rollout.created_at,
        )
        spec, stages = self._stages(rollout, assignments)
        candidate, baseline = self._cohorts(rollout, assignments)
        gates = evaluate_gates(spec.gates, candidate, baseline) if spec.gates.any else ()
        status = build_status(rollout, assignments, latency, self.clock())
        stage = ""
        if stages and rollout.status != "Pending":
            i = min(rollout.stage_index, len(stages) - 1)
            stage = f"{stages[i].name} ({i + 1}/{len(stages)})"
        if rollout.rolling_back:
            stage = f"rollback ({stage})" if stage else "rollback"
        comparison = self._comparison(rollout, spec, assignments)
        summary = candidate.summary(baseline)
        return status.model_copy(
            update={
                "stage": stage,
                "gates": gates,
                "candidate": summary,
                "baseline": baseline.summary(),
                "ab": comparison,
                "task": self._task_text(rollout),
                "agreement_rule": summary.agreement_rule,
            }
        )

    def _task_text(self, rollout: RolloutRow) -> str | None:
        """The candidate's task as the telemetry reads it (both sides' in an A/B test)."""
        task = self.store.model_task(rollout.model, rollout.version)
        if rollout.strategy == "ab" and rollout.version_b:
            task_b = self.store.model_task(rollout.model, rollout.version_b)
            if task_b != task:
                return f"A: {task or '-'}; B: {task_b or '-'}"
        return task

    async def _publish_status(self, rollout: RolloutRow) -> None:
        status = self._status(rollout)
        fingerprint = status.model_dump_json(exclude={"updated_at"})
        if self._published.get(rollout.rollout_id) == fingerprint:
            return
        await self._publish(
            topics.rollout_status(rollout.rollout_id), status.to_wire(), retain=True
        )
        self._published[rollout.rollout_id] = fingerprint

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        expiry_s: int | None = None,
        signed: bool = False,
    ) -> None:
        """Publish at QoS 1; with `signed`, over the exact bytes sent (topic + payload)."""
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        properties = publish_properties(expiry_s=expiry_s)
        if signed and self.config.command_key is not None:
            signature = sign_command(topic, payload, self.config.command_key)
            properties.UserProperty = [(SIGNATURE_PROPERTY, signature)]
        await self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)


def assignment_view(a: AssignmentRow) -> AssignmentView:
    return AssignmentView(
        a.device_id,
        a.state,
        a.sent_at,
        a.reason,
        a.rollback_state,
        a.rollback_sent_at,
        a.attempts,
        a.command_id,
        a.rollback_command_id,
    )


def model_summary(row: ModelVersionRow) -> dict[str, Any]:
    return row_to_wire(row, exclude={"signed_manifest", "id"})


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
