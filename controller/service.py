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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel
from sqlalchemy.exc import SQLAlchemyError

from controller import metrics
from controller.artifacts import ArtifactStore
from controller.db import AssignmentRow, ModelVersionRow, RolloutRow
from controller.fanout import COHORT_BUDGET_BYTES, plan_fanout
from controller.gates import (
    CohortStats,
    compare_ab,
    describe_failures,
    evaluate_gates,
    overall,
)
from controller.live import LiveRollout, Rollup
from controller.planner import (
    FINAL_DEVICE_STATES,
    ABChoice,
    Action,
    AdvanceStage,
    AssignmentView,
    BeginRollback,
    ControlRefused,
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
    plan_control,
    plan_next_actions,
    plan_resends,
    rollout_state,
    strategy_name,
)
from controller.rate_limit import DeviceRateLimiter
from controller.status import build_status, progress
from controller.store import Assignment, RolloutRollups, Store, Superseded
from controller.strategies import Target, strategy
from controller.tracing import ROLLOUTS as TRACES
from shared import __version__, topics, tracing
from shared.command_auth import COMMAND_REFUSAL_REASONS, SIGNATURE_PROPERTY, sign_command
from shared.errors import BrokerError, HotswapError, RequestError
from shared.manifest import SignedManifest
from shared.messages import (
    MAX_MESSAGE_BYTES,
    REQUEST,
    STATUS_DEVICE_LINES,
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
    ListRolloutDevices,
    ListRollouts,
    ModelRef,
    Ping,
    RegisterModel,
    Request,
    Response,
    RollbackCommand,
    RolloutDevicesPage,
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
# Answers stay well below the broker's max_packet_size (1 MiB in mosquitto.conf).
MAX_RESPONSE_BYTES = 768 * 1024

_INBOUND: dict[str, type[DeviceState] | type[DeviceEvent] | type[TelemetryWindow]] = {
    "state": DeviceState,
    "events": DeviceEvent,
    "telemetry": TelemetryWindow,
}


class _Lanes:
    """Two FIFO lanes behind one queue: operator requests, then everything else."""

    __slots__ = ("devices", "requests")

    def __init__(self) -> None:
        self.requests: deque[aiomqtt.Message] = deque()
        self.devices: deque[aiomqtt.Message] = deque()

    def append(self, item: aiomqtt.Message) -> None:
        lane = self.requests if item.topic.value == topics.CONTROLLER_REQUESTS else self.devices
        lane.append(item)

    def popleft(self) -> aiomqtt.Message:
        return self.requests.popleft() if self.requests else self.devices.popleft()

    def __len__(self) -> int:
        return len(self.requests) + len(self.devices)


class _IncomingQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue for the controller: never full for events, states and
    requests; telemetry beyond `limit` waiting messages is dropped and counted
    (reason `backlog`), where aiomqtt's own bounded queue discarded anything, silently.

    Operator requests are taken before the device messages queued ahead of them: a
    burst of 10,000 device answers must not make `rollout status` wait until each of
    them has been checked."""

    limit = 50_000

    def _init(self, maxsize: int) -> None:
        self._queue = _Lanes()

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.qsize() >= self.limit and item.topic.value.endswith("/telemetry"):
            metrics.DROPPED.labels("backlog").inc()
            return
        super().put_nowait(item)


class Publisher(Protocol):
    """What the controller publishes through: aiomqtt's client, or a recorder in tests."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class _Received:
    """A device message handed in directly (Controller.ingest), shaped like aiomqtt's."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class _TelemetryWrite:
    fleet: dict[tuple[str, str, bool, int], tuple[int, Rollup]]
    rollouts: list[RolloutRollups]


@dataclass(frozen=True, slots=True)
class _Inbound:
    """A checked device message (or a registry record) waiting for the ingest loop."""

    kind: str  # state, events, telemetry, registry
    msg: DeviceState | DeviceEvent | TelemetryWindow | None
    payload: bytes  # registry records: read when applied
    topic: str
    retain: bool  # delivered from the broker's retained store (on subscribe)
    trace: str | None = None  # an event's `traceparent` (while tracing is on)


# Intents after which the planner has more to say at once.
# What reading a rollout whose rows are damaged raises (a spec or stage that no longer
# parses): the rollout is marked, the controller goes on.
_DAMAGED = (ValidationError, ValueError, KeyError, TypeError)
_MOVES = (StartRollout, SettleStage, AdvanceStage, BeginRollback, DecideWinner)
# Device intents the executor applies a run at a time (one transaction, few publishes).


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
    # Ingest: device messages applied per transaction, and the queue length beyond which
    # telemetry is dropped (counted, reason `backlog`) so that events are never late.
    ingest_batch: int = 2000
    ingest_backlog: int = 50_000
    # Ticks: a pause after each so events gather; an open rollout nothing happened to is
    # planned again this often (timeouts, bakes); a running one's status at most this often.
    tick_gap_s: float = 0.02
    step_interval_s: float = 1.0
    step_gap_s: float = 0.2  # between steps of a rollout its devices' events move
    status_interval_s: float = 0.5
    # The bytes of device ids one region command's selector may carry (a larger stage
    # takes several), and how often the registered devices per region are counted:
    # both decide between region and device topics (`controller.fanout`).
    cohort_budget_bytes: int = COHORT_BUDGET_BYTES
    region_sizes_s: float = 10.0
    # Telemetry rollups of finished rollouts are kept this long; pruned this often.
    telemetry_retention_s: float = 7 * 24 * 3600.0
    # Merged telemetry reaches the database this often (a crash loses at most this much).
    telemetry_flush_s: float = 1.0
    prune_interval_s: float = 3600.0


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
        self._client: Publisher | None = None
        self._limiter = DeviceRateLimiter(config.device_rate_per_s, config.device_burst)
        self._throttle = _Throttle(config.error_log_interval_s)
        self._step_errors: dict[str, str] = {}  # rollout id -> the error last logged for it
        # In memory, rebuilt from the rows on every (re)connect (controller.live):
        self._live: dict[str, LiveRollout] = {}  # open (and just finished) rollouts
        self._rollout_of: dict[str, str] = {}  # device -> the open rollout that has it
        self._finished_of: dict[str, str] = {}  # device -> the rollout it just finished
        self._dirty: set[str] = set()  # rollouts something happened to since their step
        self._next_step: dict[str, float] = {}  # rollout -> when to step it regardless
        self._moved: set[str] = set()  # rollouts to step at once (they just moved on)
        self._status_at: dict[str, float] = {}  # rollout -> when its status last went out
        self._status_names: dict[str, str] = {}  # rollout -> the status it last said
        self._urls: dict[tuple[str, str], tuple[SignedManifest, str, float]] = {}
        self._inbox: asyncio.Queue[_Inbound] = asyncio.Queue()
        # Ingest, ticks and operator changes take turns: rows and memory change together.
        self._lock = asyncio.Lock()
        self._requests: set[asyncio.Task[None]] = set()
        self._pruned_at = 0.0
        self._region_sizes_cache: dict[str, int] = {}
        self._region_sizes_at = -1e9
        self._runner: asyncio.Task[None] | None = None
        # Telemetry merged in memory, written every telemetry_flush_s (one transaction)
        self._fleet_pending: dict[tuple[str, str, bool, int], tuple[int, Rollup]] = {}
        self._rollups_pending: set[str] = set()
        self._telemetry_flushed_at = 0.0
        self.instance = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Controller:
        """Start serving (`run` as a named task); returns once connected the first time.

        Raises what stopped it when it stops before that (a fatal BrokerError)."""
        self._runner = asyncio.create_task(self.run(), name="controller")
        ready = asyncio.create_task(self.connected.wait(), name="controller-connected")
        try:
            await asyncio.wait({self._runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._runner.done():
            self._runner.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # The engine without a session (tests, embedding): a publisher in place of the MQTT
    # client, messages handed in, ticks on demand. `run` drives the same methods.

    async def attach(self, publisher: Publisher) -> None:
        """Serve through `publisher` (anything with aiomqtt's `publish`), rows loaded."""
        self._client = publisher
        async with self._lock:
            await self._load_live()

    def receive(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """One device message as if received: checked and queued (see `flush`)."""
        self._admit(topic, _Received(topic, payload, retain))

    async def flush(self) -> None:
        """Apply what is queued, in batches as the ingest loop does."""
        while not self._inbox.empty():
            batch: list[_Inbound] = []
            while len(batch) < self.config.ingest_batch and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            async with self._lock:
                await self._apply(batch)
        self._write_telemetry(self._telemetry_due(force=True), self.clock())

    async def request(self, request: Request) -> Any:
        """An operator request, answered (raises what its error response would say)."""
        return await self._handle(request)

    async def tick(self) -> None:
        """Step every rollout that changed or is due, now."""
        async with self._lock:
            await self._tick()

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
        backlog = self.config.ingest_backlog
        delays = backoff_delays()
        task = asyncio.current_task()
        sessions = 0
        queue_type = type("IncomingQueue", (_IncomingQueue,), {"limit": backlog})
        while True:
            client, telemetry, requests = self._sessions(will, queue_type)
            # A failed TaskGroup leaves its parent marked as cancelling on 3.11: only a
            # count above this one is a request to stop.
            baseline = task.cancelling() if task is not None else 0
            try:
                async with contextlib.AsyncExitStack() as stack:
                    for session in dict.fromkeys((client, telemetry, requests)):
                        await stack.enter_async_context(session)
                    self._client = client
                    delays = backoff_delays()
                    await self._on_connect(client, telemetry, requests)
                    sessions += 1
                    if sessions > 1:
                        log.warning("controller_reconnected", broker=str(self.config.mqtt))
                    # Connecting and publishing go through aiomqtt's wait_for: a cancellation
                    # it swallowed must stop us here, not after the TaskGroup never ends.
                    raise_if_cancelled(baseline)
                    try:
                        async with asyncio.TaskGroup() as tg:
                            for session in dict.fromkeys((client, telemetry, requests)):
                                tg.create_task(self._receive_loop(session), name="receive")
                            tg.create_task(self._ingest_loop(), name="ingest")
                            tg.create_task(self._tick_loop(), name="tick")
                    except asyncio.CancelledError:
                        with contextlib.suppress(SQLAlchemyError):
                            self._write_telemetry(self._telemetry_due(force=True), self.clock())
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

    def _sessions(
        self, will: aiomqtt.Will, queue_type: type[_IncomingQueue]
    ) -> tuple[aiomqtt.Client, aiomqtt.Client, aiomqtt.Client]:
        """The main session (events, states, registry; commands and statuses go out on
        it), the telemetry session and the request session.

        Telemetry, the bulk of what devices send, comes in on a session of its own that
        speaks MQTT 3.1.1: it needs no MQTT 5 feature, and paho then builds no
        `Properties` for each window (a sixth of the controller's time at 6,000/s).
        Operator requests come in and are answered on a third: on the main session a
        request waited behind every device answer the broker had queued before it (p99
        2 s during a 10,000-device rollout, for an answer made in 2 ms). With a client
        certificate the broker makes its CN the client id of every session (the
        certificate listener), so three would take each other over: one does it all.
        """
        mqtt = self.config.mqtt
        main = make_client(
            mqtt,
            identifier=self.config.client_id,
            will=will,
            persistent_session=True,
            max_queued_incoming=0,
            queue_type=queue_type,
        )
        if mqtt.cert_file is not None:
            return main, main, main
        telemetry = make_client(
            mqtt,
            identifier=f"{self.config.client_id}-telemetry",
            persistent_session=True,
            max_queued_incoming=0,
            queue_type=queue_type,
            protocol=aiomqtt.ProtocolVersion.V311,
        )
        requests = make_client(
            mqtt,
            identifier=f"{self.config.client_id}-requests",
            persistent_session=True,
            max_queued_incoming=0,
        )
        return main, telemetry, requests

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

    async def _on_connect(
        self, client: aiomqtt.Client, telemetry: aiomqtt.Client, requests: aiomqtt.Client
    ) -> None:
        # A main session kept from a controller before telemetry and requests had their
        # own sessions still holds those subscriptions: each would come twice.
        moved = [
            t
            for t, s in (
                (topics.ALL_DEVICE_TELEMETRY, telemetry),
                (topics.CONTROLLER_REQUESTS, requests),
            )
            if s is not client
        ]
        if moved:
            await client.unsubscribe(moved)
        for session, topic in (
            (client, topics.ALL_DEVICE_REGISTRY),
            (client, topics.ALL_DEVICE_STATES),
            (client, topics.ALL_DEVICE_EVENTS),
            (telemetry, topics.ALL_DEVICE_TELEMETRY),
            (requests, topics.CONTROLLER_REQUESTS),
        ):
            refused = refused_code(await session.subscribe(topic, qos=1))
            if refused is not None:
                log.error("subscription_refused", topic=topic, code=str(refused))
        await client.publish(
            topics.CONTROLLER_STATE,
            ControllerState(online=True, version=__version__).to_wire(),
            qos=1,
            retain=True,
        )
        async with self._lock:
            # The rows are the truth: what is in memory is rebuilt from them once per
            # session, then follows the changes (what was merged but not written, first).
            self._write_telemetry(self._telemetry_due(force=True), self.clock())
            await self._load_live()
            self._published.clear()
            # Resume: re-send every command whose outcome is still open. The command id
            # is unchanged, so a device that already has it answers without redoing work.
            for live in list(self._live.values()):
                if live.row.finished_at is None:
                    await self._resend(live, live.progress.open_views())
                await self._publish_status(live, force=True)
        self.connected.set()
        self._wake.set()
        log.info("controller_connected", broker=str(self.config.mqtt))

    async def _load_live(self) -> None:
        """Every open rollout (and those finished within the status refresh) into memory."""
        self._live.clear()
        self._rollout_of.clear()
        self._finished_of.clear()
        metrics.LIVE_ROLLOUTS.clear()
        # The fleet's versions are read once per session, then follow each change.
        metrics.FLEET.load(await asyncio.to_thread(self.store.list_devices))
        since = self.clock() - self.config.status_refresh_s
        for row in self.store.recently_finished(since) + self.store.open_rollouts():
            try:
                self._track(await self._loaded(row))
            except _DAMAGED as exc:
                # A damaged row: said on that rollout; every other one is served.
                self._step_failed(row, exc)

    async def _loaded(self, row: RolloutRow) -> LiveRollout:
        """A rollout's rows into memory (read in a worker thread: at 10,000 devices the
        event loop must not stop answering meanwhile)."""
        assignments = await asyncio.to_thread(self.store.assignment_states, row.rollout_id)
        rollups = await asyncio.to_thread(self.store.load_rollups, row.rollout_id, row.stage_index)
        spec = StartRolloutRequest.model_validate_json(row.spec)
        targets = [Target(a.device_id, a.region) for a in assignments]
        live = LiveRollout.start(
            row,
            spec,
            strategy(row.strategy).stages(targets, spec, row.rollout_id),
            [assignment_view(a) for a in assignments],
            {a.device_id: a.region for a in assignments},
        )
        for r in rollups:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                live.restore_rollup(r.device_id, r.version, r.shadow, Rollup.from_json(r.data))
        return live

    def _track(self, live: LiveRollout) -> None:
        """Keep a rollout in memory; an open one is where its devices' messages go."""
        rid = live.rollout_id
        self._live[rid] = live
        if live.row.finished_at is None:
            for device_id, view in live.views.items():
                if view.state != "cancelled":
                    self._rollout_of[device_id] = rid
        else:
            self._untrack_devices(rid)

    def _untrack_devices(self, rollout_id: str) -> None:
        """The rollout ended: its devices' telemetry still feeds its last stage's cohorts
        and served latency while its status is kept fresh (`status_refresh_s`)."""
        live = self._live.get(rollout_id)
        for device_id in live.views if live is not None else ():
            if self._rollout_of.get(device_id) == rollout_id:
                del self._rollout_of[device_id]
                self._finished_of[device_id] = rollout_id

    def _forget(self, rollout_id: str) -> None:
        """A finished rollout's status refresh is over: out of memory."""
        live = self._live.pop(rollout_id, None)
        metrics.LIVE_ROLLOUTS.forget(rollout_id)
        for memo in (self._published, self._status_at, self._status_names, self._step_errors):
            memo.pop(rollout_id, None)
        for device_id in live.views if live is not None else ():
            if self._finished_of.get(device_id) == rollout_id:
                del self._finished_of[device_id]

    async def _reload(self, rollout_id: str) -> LiveRollout | None:
        """Rebuild one rollout from its rows (after a change made outside the planner);
        None when its rows are damaged (said on the rollout, which is not served)."""
        # What is merged in memory only would be lost with the old copy: written first.
        self._write_telemetry(self._telemetry_due(force=True), self.clock())
        row = self.store.get_rollout(rollout_id)
        try:
            live = await self._loaded(row)
        except _DAMAGED as exc:
            self._untrack_devices(rollout_id)
            self._forget(rollout_id)
            self._step_failed(row, exc)
            return None
        self._track(live)
        self._dirty.add(rollout_id)
        return live

    # ------------------------------------------------------------ inbound

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        """Read, check and queue; the ingest loop applies in batches, requests run apart."""
        async for message in client.messages:
            topic = str(message.topic)
            try:
                if topic == topics.CONTROLLER_REQUESTS:
                    task = asyncio.create_task(self._on_request(client, message), name="request")
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)
                else:
                    self._admit(topic, message)
            except HotswapError as exc:
                log.warning("message_rejected", topic=topic, reason=exc.reason, error=str(exc))
            except Exception:
                # One bad message must never stop the controller serving the fleet.
                log.exception("message_handler_failed", topic=topic)
            raise_if_cancelled()

    def _admit(self, topic: str, message: aiomqtt.Message | _Received) -> None:
        """Check a device message (rate, size, shape, identity) and queue it for ingest."""
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload or "").encode()
        if topic.startswith(topics.ALL_DEVICE_REGISTRY.removesuffix("+")):
            self._queue(_Inbound("registry", None, bytes(payload), topic, message.retain))
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
        if kind == "telemetry" and self._inbox.qsize() >= self.config.ingest_backlog:
            # Telemetry yields to events and states when ingest falls behind: counted.
            metrics.DROPPED.labels("backlog").inc()
            self._log_throttled("telemetry_backlog", queued=self._inbox.qsize())
            return
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
        metrics.MESSAGES.labels(kind, "accepted").inc()
        trace = tracing.traceparent_of(getattr(message, "properties", None))
        self._queue(_Inbound(kind, msg, b"", topic, message.retain, trace))

    def _queue(self, item: _Inbound) -> None:
        self._inbox.put_nowait(item)
        metrics.INGEST_QUEUE.set(self._inbox.qsize())

    async def _ingest_loop(self) -> None:
        """Apply queued device messages in batches: one transaction per kind and batch."""
        while True:
            batch = [await self._inbox.get()]
            while len(batch) < self.config.ingest_batch and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            metrics.INGEST_QUEUE.set(self._inbox.qsize())
            try:
                async with self._lock:
                    await self._apply(batch)
            except aiomqtt.MqttError:
                raise  # the session is gone: reconnect
            except SQLAlchemyError as exc:
                # Counted, and logged once per interval: a full disk must not flood the log.
                metrics.DROPPED.labels("db_error").inc(len(batch))
                kinds = {i.kind for i in batch}
                self._log_throttled(
                    "telemetry_store_failed" if kinds == {"telemetry"} else "message_store_failed",
                    error=database_error_text(exc),
                    messages=len(batch),
                )
            except Exception:
                log.exception("ingest_failed", messages=len(batch))
            raise_if_cancelled()

    async def _apply(self, batch: Sequence[_Inbound]) -> None:
        now = self.clock()
        records = [
            record
            for item in batch
            if item.kind == "registry"
            and (record := self._record_of(item.topic, item.payload)) is not None
        ]
        if records:
            await self._apply_records(records, now)
        states = [i.msg for i in batch if isinstance(i.msg, DeviceState)]
        if states:
            refused = await asyncio.to_thread(self.store.upsert_devices, states, now)
            metrics.FLEET.apply_states(states)
            for device_id, detail in refused.items():
                # Provisioning fixed who it is; the rest of its state is still taken.
                metrics.DROPPED.labels("identity_claim").inc()
                log.warning("device_identity_refused", device_id=device_id, detail=detail)
            for st in states:
                log.info(
                    "device_state",
                    device_id=st.device_id,
                    online=st.online,
                    active=st.active.ref if st.active else None,
                )
        if tracing.enabled():
            for i in batch:
                if isinstance(i.msg, DeviceEvent):
                    TRACES.device_event(i.msg, i.trace)
        await self._apply_events([i.msg for i in batch if isinstance(i.msg, DeviceEvent)], now)
        self._apply_telemetry([i.msg for i in batch if isinstance(i.msg, TelemetryWindow)])
        due = self._telemetry_due()
        if due is not None:
            await asyncio.to_thread(self._write_telemetry, due, now)
        # A live (not retained) online state: the device has just (re)connected or changed
        # model. Retained copies come on our own reconnect, which resends everything.
        back = {
            i.msg.device_id
            for i in batch
            if isinstance(i.msg, DeviceState) and i.msg.online and not i.retain
        }
        for device_id in sorted(back):
            await self._device_back(device_id)

    async def _apply_events(self, events: Sequence[DeviceEvent], now: float) -> None:
        plain = []
        for e in events:
            if e.phase == "downloading" and e.reason == "url_expired":
                await self._represign(e)
            elif e.phase == "failed" and e.reason in COMMAND_REFUSAL_REASONS:
                # A forged or replayed copy refused by the device: our own command with
                # that id is still valid and still in flight; its timeout covers the rest.
                log.warning(
                    "device_refused_command_copy",
                    device_id=e.device_id,
                    rollout_id=e.rollout_id,
                    command_id=e.command_id,
                    reason=e.reason,
                    detail=e.detail,
                )
            else:
                plain.append(e)
        if not plain:
            return
        rows = await asyncio.to_thread(self.store.apply_events, plain, now)
        changed = {(r.rollout_id, r.device_id) for r in rows}
        for e in plain:
            log.info(
                "device_event",
                device_id=e.device_id,
                rollout_id=e.rollout_id,
                command_id=e.command_id,
                phase=e.phase,
                reason=e.reason,
                applied=(e.rollout_id, e.device_id) in changed,
            )
        for row in rows:
            live = self._live.get(row.rollout_id)
            if live is not None:
                live.set_view(assignment_view(row))
            # (A late answer to a rollout no longer in memory still changes its record:
            # the tick republishes its status from the rows.)
            self._dirty.add(row.rollout_id)
        if rows:
            self._wake.set()

    def _apply_telemetry(self, windows: Sequence[TelemetryWindow]) -> None:
        """Merge windows into the fleet's minutes and their rollout's cohorts (in memory;
        written every `telemetry_flush_s`, see `_telemetry_due`)."""
        for w in windows:
            metrics.INFERENCE.add(w)
            rollup = Rollup.of_window(self.store.window_stats(w), w)
            end, start = w.window_end.timestamp(), w.window_start.timestamp()
            key = (w.model.name, w.model.version, w.shadow, int(end // 60))
            n, total = self._fleet_pending.get(key, (0, Rollup()))
            total.add(rollup)
            self._fleet_pending[key] = (n + 1, total)
            rid = self._rollout_of.get(w.device_id)
            live = self._live.get(rid) if rid is not None else None
            if (
                live is not None
                and w.model.name == live.row.model
                and live.add_window(w.device_id, w.model.version, w.shadow, rollup, end, start)
            ):
                self._rollups_pending.add(live.rollout_id)
            done = self._live.get(self._finished_of.get(w.device_id, ""))
            if (
                done is not None
                and done is not live
                and w.model.name == done.row.model
                and done.add_window(w.device_id, w.model.version, w.shadow, rollup, end, start)
            ):
                self._rollups_pending.add(done.rollout_id)

    def _telemetry_due(self, *, force: bool = False) -> _TelemetryWrite | None:
        """What is to be written of the telemetry merged since the last write, once
        `telemetry_flush_s` has passed (or `force`): taken out of memory as it is."""
        now = time.monotonic()
        if not (self._fleet_pending or self._rollups_pending):
            return None
        if not force and now - self._telemetry_flushed_at < self.config.telemetry_flush_s:
            return None
        self._telemetry_flushed_at = now
        fleet, self._fleet_pending = self._fleet_pending, {}
        rollouts = []
        for rid in sorted(self._rollups_pending):
            live = self._live.get(rid)
            if live is None:
                continue
            # A finished rollout's cohorts only refresh its status: its served totals
            # are kept, its per-device rollups (gate evidence no longer acted on) not.
            dirty = sorted(live.dirty_rollups) if live.row.finished_at is None else []
            rollouts.append(
                RolloutRollups(
                    rid,
                    live.stage_index,
                    [
                        (device_id, version, shadow, rollup.to_json())
                        for device_id in dirty
                        for (version, shadow), rollup in live.rollups.get(device_id, {}).items()
                    ],
                    (live.served_latency_total_ms, live.served_count),
                )
            )
            live.dirty_rollups.clear()
            self._dirty.add(rid)
        self._rollups_pending.clear()
        return _TelemetryWrite(fleet, rollouts)

    def _write_telemetry(self, due: _TelemetryWrite | None, now: float) -> None:
        """Write merged telemetry; on a database failure its windows are dropped, counted
        (reason `db_error`) and logged at most once per interval."""
        if due is None:
            return
        try:
            self.store.save_telemetry(due.fleet, due.rollouts, now)
        except SQLAlchemyError as exc:
            windows = sum(n for n, _ in due.fleet.values())
            metrics.DROPPED.labels("db_error").inc(windows)
            self._log_throttled(
                "telemetry_store_failed", error=database_error_text(exc), windows=windows
            )

    def _record_of(self, topic: str, payload: bytes) -> DeviceRecord | None:
        """A provisioning record (the broker's admin writes these; devices cannot)."""
        try:
            device_id = topics.parse_registry_topic(topic)
        except topics.TopicError:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            return None
        if not payload:
            return None  # a cleared record
        try:
            record = DeviceRecord.model_validate_json(payload)
        except ValidationError as exc:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            log.warning("registry_record_malformed", topic=topic, error=_first_error(exc))
            return None
        if record.device_id != device_id:
            metrics.MESSAGES.labels("registry", "rejected").inc()
            return None
        metrics.MESSAGES.labels("registry", "accepted").inc()
        return record

    async def _apply_records(self, records: Sequence[DeviceRecord], now: float) -> None:
        touched = await asyncio.to_thread(self.store.apply_records, records, now)
        metrics.FLEET.apply_records(records)
        for record in records:
            if record.revoked:
                log.warning("device_revoked", device_id=record.device_id)
            else:
                log.info(
                    "device_provisioned",
                    device_id=record.device_id,
                    region=record.region,
                    device_type=record.device_type,
                )
        for rollout_id in sorted(set(touched)):
            log.info("revocation_closed_assignments", rollout_id=rollout_id)
            await self._publish_status(await self._reload(rollout_id), force=True)
        if touched:
            self._wake.set()

    def _log_throttled(self, event: str, **facts: Any) -> None:
        """Log a repeated failure at most once per interval, with how many happened."""
        count = self._throttle.due(event, time.monotonic())
        if count is not None:
            log.error(event, failures=count, per_s=self.config.error_log_interval_s, **facts)

    async def _on_request(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Answer one operator request (its own task: ingest never waits for it)."""
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload or "").encode()
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        kind = "invalid"
        started = time.perf_counter()
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
            with tracing.span(kind, context=tracing.context_of(props)):
                result = await self._handle(request)
            response = Response(ok=True, result=result)
        except HotswapError as exc:
            response = Response(ok=False, error=str(exc), reason=exc.reason)
        except aiomqtt.MqttError as exc:
            log.warning("request_publish_failed", kind=kind, error=str(exc))
            return
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
        metrics.REQUEST_SECONDS.labels(kind).observe(time.perf_counter() - started)
        log.info(
            "request",
            kind=kind,
            ok=response.ok,
            error=response.error,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if response_topic and not str(response_topic).startswith(f"{topics.RESPONSES_PREFIX}/"):
            # Answers go under the responses prefix only: a request must not make the
            # controller publish on a device's cmd topic or any other topic it may write.
            log.warning("response_topic_refused", kind=kind, response_topic=response_topic)
        elif response_topic:
            wire = response.to_wire()
            if len(wire) > MAX_RESPONSE_BYTES:
                # Past the broker's packet limit it would cost us the session: say so.
                wire = Response(
                    ok=False,
                    error=f"the answer is too large ({len(wire)} bytes): ask for a smaller page",
                    reason="too_large",
                ).to_wire()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    response_topic,
                    wire,
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
            # On the loop, not in a worker thread: sqlite3 lets the GIL go at every row
            # it steps, and a thread beside a busy loop waited for it back each time
            # (p99 1 s for a 1,000-device page that takes 10 ms read here).
            return self._device_page(request.offset, request.limit)
        if isinstance(request, Ping):
            return {
                "clientId": self.config.client_id,
                "version": __version__,
                "instance": self.instance,
            }
        if isinstance(request, StartRolloutRequest):
            async with self._lock:
                return await self._start(request, now)
        if isinstance(request, ControlRollout):
            async with self._lock:
                return await self._control(request, now)
        if isinstance(request, GetRollout):
            return self._status(await self._view_of(request.rollout_id)).model_dump(
                mode="json", by_alias=True
            )
        if isinstance(request, ListRolloutDevices):
            self.store.get_rollout(request.rollout_id)  # unknown ids are refused
            total, rows = self.store.assignments_page(
                request.rollout_id, request.state, request.offset, request.limit
            )
            return RolloutDevicesPage(
                rollout_id=request.rollout_id,
                total=total,
                offset=request.offset,
                devices=tuple(progress(assignment_view(a)) for a in rows),
            ).model_dump(mode="json", by_alias=True)
        if isinstance(request, ListRollouts):
            return [self._listed(r) for r in self.store.list_rollouts()]
        raise RequestError(f"unsupported request {request.kind!r}")

    def _device_page(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """A page of `device list`: plain column dicts, camelCase keys."""
        rows = self.store.device_page(offset, limit)
        return [{to_camel(k): v for k, v in r.items()} for r in rows]

    async def _start(self, request: StartRolloutRequest, now: float) -> dict[str, Any]:
        if not (request.devices or request.region or request.device_type or request.all_devices):
            raise RequestError(
                "name the devices: --devices, --region or --device-type, "
                "or --all for the whole fleet",
                reason="bad_request",
            )
        model = self.store.get_model(request.model, request.version)
        pushed = [model.trace_parent]  # the rollout's span links to each version's push
        if strategy(request.strategy).two_versions and request.version_b:
            other = self.store.get_model(request.model, request.version_b)
            pushed.append(other.trace_parent)
            if other.signature != model.signature:
                raise RequestError(
                    f"A/B versions must share a tensor signature: {model.version} is "
                    f"{model.signature}, {other.version} is {other.signature}",
                    reason="bad_request",
                )
        targets = await asyncio.to_thread(self.store.resolve_targets, request, model)
        created = await asyncio.to_thread(self.store.create_rollout, request, model, targets, now)
        rollout = created.rollout
        log.info(
            "rollout_created",
            rollout_id=rollout.rollout_id,
            model=f"{model.name}@{model.version}",
            strategy=rollout.strategy,
            devices=len(targets),
            superseded=[x.rollout_id for x in created.superseded],
        )
        TRACES.begin(
            rollout.rollout_id, pushed, model=model.name, version=model.version,
            strategy=rollout.strategy, devices=len(targets),
        )  # fmt: skip
        for older in created.superseded:
            await self._cancel_superseded(older, rollout.rollout_id)
        await self._publish_status(await self._reload(rollout.rollout_id), force=True)
        self._wake.set()
        return {
            "rolloutId": rollout.rollout_id,
            "devicesTargeted": len(targets),
            "superseded": {x.rollout_id: len(x.devices) for x in created.superseded},
        }

    async def _view_of(self, rollout_id: str) -> LiveRollout:
        """The rollout as in memory; one long finished is read from its rows (not kept)."""
        live = self._live.get(rollout_id)
        return live if live is not None else await self._loaded(self.store.get_rollout(rollout_id))

    def _listed(self, rollout: RolloutRow) -> dict[str, Any]:
        """One row of `rollout list`; a rollout whose status cannot be built still shows."""
        try:
            live = self._live.get(rollout.rollout_id)
            if live is not None:
                status = self._status(live)
            else:  # counts only: a list must not read every device of every rollout
                counts, rollbacks = self.store.state_counts(rollout.rollout_id)
                status = build_status(rollout, counts, rollbacks, (), None, self.clock())
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
            metrics.rollout_finished(rollout, "Aborted", rollout.finished_at or self.clock())
            TRACES.finish(older.rollout_id, "Aborted", f"superseded by {newer_id}")
        log.warning(
            "rollout_superseded",
            rollout_id=older.rollout_id,
            by=newer_id,
            devices=len(older.devices),
            ended=older.ended,
        )
        await self._publish_status(await self._reload(older.rollout_id), force=True)

    async def _register(self, request: RegisterModel, now: float) -> dict[str, Any]:
        manifest = request.manifest.unverified()
        size = await asyncio.to_thread(self.artifacts.object_size, request.s3_key)
        if size != manifest.size:
            raise RequestError(
                f"artifact {request.s3_key} is {size} bytes in S3, the manifest says "
                f"{manifest.size}",
                reason="artifact_mismatch",
            )
        row = self.store.register_model(
            request.manifest, request.s3_key, now, trace_parent=tracing.origin()
        )
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
                async with self._lock:
                    await self._tick()
            except aiomqtt.MqttError:
                raise  # the session is gone: reconnect
            except SQLAlchemyError as exc:
                self._log_throttled("tick_database_error", error=database_error_text(exc))
            # Events keep coming while a rollout runs: let a batch of them gather.
            await asyncio.sleep(self.config.tick_gap_s)

    async def _tick(self) -> None:
        """Step the rollouts that changed or are due; one that cannot be stepped does not
        stop the others. Work is per rollout that changed, not per device of the fleet."""
        now = self.clock()
        dirty, self._dirty = self._dirty, set()
        for rid in sorted(dirty - self._live.keys()):
            # Not in memory (finished long ago, or its rows are damaged): a late answer
            # changed its record.
            with contextlib.suppress(RequestError):
                row = self.store.get_rollout(rid)
                try:
                    loaded = await self._loaded(row)
                except _DAMAGED as exc:
                    self._step_failed(row, exc)  # said on the rollout (once); not served
                    continue
                await self._publish_status(loaded)
        open_count = 0
        for rid, live in list(self._live.items()):
            if live.row.finished_at is not None:
                if now - live.row.finished_at > self.config.status_refresh_s:
                    self._forget(rid)  # its retained status stays as last published
                elif rid in dirty:
                    await self._publish_status(live)
                continue
            open_count += 1
            if rid not in dirty and now < self._next_step.get(rid, 0.0):
                continue
            if (
                rid in dirty
                and rid not in self._moved
                and now
                < self._next_step.get(rid, 0.0)
                - (self.config.step_interval_s - self.config.step_gap_s)
            ):
                # Stepped a moment ago: the events of a big stage are taken together (a
                # step reads every assignment of the rollout in memory).
                self._dirty.add(rid)
                continue
            self._moved.discard(rid)
            self._next_step[rid] = now + self.config.step_interval_s
            try:
                await self._step(live, now)
                self._step_errors.pop(rid, None)
            except (aiomqtt.MqttError, SQLAlchemyError):
                self._dirty.add(rid)  # stepped again after the trouble
                raise
            except HotswapError as exc:
                log.warning(
                    "rollout_step_failed", rollout_id=rid, reason=exc.reason, error=str(exc)
                )
            except Exception as exc:
                self._step_failed(live.row, exc)
        metrics.OPEN_ROLLOUTS.set(open_count)
        for rid in list(self._next_step):
            if rid not in self._live or self._live[rid].row.finished_at is not None:
                del self._next_step[rid]
        due = self._telemetry_due()
        if due is not None:
            await asyncio.to_thread(self._write_telemetry, due, now)
        if now - self._pruned_at >= self.config.prune_interval_s:
            self._pruned_at = now
            pruned = self.store.prune_telemetry(now - self.config.telemetry_retention_s)
            if pruned:
                log.info("telemetry_pruned", rollups=pruned)

    def _step_failed(self, rollout: RolloutRow, exc: Exception) -> None:
        """A bug or a damaged row: say so on the rollout (once per new error), go on."""
        words = (str(exc).strip().splitlines() or [""])[0]
        reason = f"controller error: {type(exc).__name__}: {words}"[:500]
        if self._step_errors.get(rollout.rollout_id) == reason:
            return
        self._step_errors[rollout.rollout_id] = reason
        log.exception("rollout_step_failed", rollout_id=rollout.rollout_id, error=reason)
        self.store.mark_step_failed(rollout.rollout_id, reason, self.clock())
        live = self._live.get(rollout.rollout_id)
        if live is not None:
            live.row = self.store.get_rollout(rollout.rollout_id)

    def _candidate(self, live: LiveRollout) -> CohortStats:
        """The candidate cohort, knowing its registered task before its first window:
        a gate the model cannot have (confidence of a task `none`) is `not_applicable`
        with or without samples."""
        stats = live.cohort("candidate")
        if stats.tasks:
            return stats
        task = self.store.registered_task(live.row.model, live.version)
        return replace(stats, tasks=frozenset({task})) if task is not None else stats

    def _shadow_seconds(self, live: LiveRollout) -> float:
        # Mirror through the whole bake, with room for devices that start late.
        return live.spec.shadow_duration_s + live.row.device_timeout_s

    def _readings(self, live: LiveRollout) -> tuple[GateReading | None, ABChoice | None]:
        """What the gates (or an A/B test's comparison) say of the current stage."""
        spec = live.spec
        if strategy(live.strategy).two_versions:
            ab = compare_ab(
                spec.winner_metric,
                spec.min_improvement,
                live.cohort("a"),
                live.cohort("b"),
                spec.gates.min_samples,
            )
            return None, ABChoice(ab.winner, ab.detail)
        if not spec.gates.any:
            return None, None
        verdicts = evaluate_gates(spec.gates, self._candidate(live), live.cohort("baseline"))
        verdict = overall(verdicts)
        detail = (
            describe_failures(verdicts)
            if verdict == "fail"
            else ", ".join(
                f"{v.gate} {v.verdict} ({v.detail})" for v in verdicts if v.verdict != "pass"
            )
        )
        return GateReading(verdict, detail), None

    async def _step(self, live: LiveRollout, now: float) -> None:
        row, spec = live.row, live.spec
        reading, ab_choice = self._readings(live)
        actions = plan_next_actions(
            RolloutView(
                row.rollout_id,
                strategy_name(row.strategy),
                rollout_state(row.status),
                row.device_timeout_s,
                stage_index=row.stage_index,
                stage_settled_at=row.stage_settled_at,
                approved_stage=row.approved_stage,
                rolling_back=row.rolling_back,
                manual_approval=spec.manual_approval,
                has_gates=spec.gates.any,
                max_failure_percent=spec.max_failure_percent,
                min_executed=spec.min_executed,
                retries=spec.retries,
                version=row.version,
                version_b=row.version_b,
                winner=row.winner,
            ),
            live.stages,
            live.progress,
            reading,
            now,
            ab_choice,
        )
        await self._execute(live, actions, now)
        if any(isinstance(a, _MOVES) for a in actions):
            # The rollout moved on (started, settled, a new stage, rolling back): what
            # follows is planned at once, not at the next periodic step.
            self._dirty.add(row.rollout_id)
            self._moved.add(row.rollout_id)
            self._wake.set()
        await self._publish_status(self._live.get(row.rollout_id, live))

    async def _execute(self, live: LiveRollout, actions: Sequence[Action], now: float) -> None:
        """Each intent by its effect (`_EFFECTS`, one small method per intent type):
        persist it, apply what was persisted in memory, then publish.

        Runs of device intents of one kind (deploys, timeouts, retries, rollbacks) are
        one effect (`_RUN_EFFECTS`): one transaction per chunk and as few publishes as
        the contract allows (`controller.fanout`), per-device commands concurrently.
        """
        i = 0
        while i < len(actions):
            kind, j = type(actions[i]), i + 1
            run_effect = _RUN_EFFECTS.get(kind)
            if run_effect is not None:
                while j < len(actions) and type(actions[j]) is kind:
                    j += 1
                await run_effect(self, live, actions[i:j], now)
            else:
                moved = await _EFFECTS[kind](self, live, actions[i], now)
                if moved is None:
                    return  # its rows could not be read again: nothing more to do now
                live = moved
            i = j

    # -------------------------------------------------- effects of single intents

    async def _on_start(self, live: LiveRollout, _: StartRollout, now: float) -> LiveRollout:
        rid = live.rollout_id
        metrics.rollout_started(live.row)
        live.row = self.store.update_rollout(rid, now, status="InProgress", stage_started_at=now)
        live.new_stage(live.row.stage_index, now)
        log.info("rollout_started", rollout_id=rid, strategy=live.strategy, stages=len(live.stages))
        index = live.row.stage_index
        TRACES.stage(rid, live.stages[index].name if live.stages else "all", index)
        return live

    async def _on_region_deploy(
        self, live: LiveRollout, action: SendRegionDeploy, now: float
    ) -> LiveRollout:
        await self._deploy(live, action.devices, activate=action.activate, now=now)
        return live

    async def _on_switch(self, live: LiveRollout, action: SendSwitch, now: float) -> LiveRollout:
        await self._switch(live, action.devices, now)
        return live

    async def _on_winner(
        self, live: LiveRollout, action: DecideWinner, now: float
    ) -> LiveRollout | None:
        rid = live.rollout_id
        # Read before the devices move: the comparison the decision was made on.
        decided = self._comparison(live)
        moved = self.store.decide_winner(rid, action.version, now)
        if decided is not None:
            decided = decided.model_copy(update={"winner": action.version})
            self.store.update_rollout(rid, now, ab_result=decided.model_dump_json())
        log.info(
            "ab_winner", rollout_id=rid, version=action.version, detail=action.detail, moved=moved
        )
        return await self._reload(rid)

    async def _on_settle(self, live: LiveRollout, action: SettleStage, now: float) -> LiveRollout:
        live.row = self.store.update_rollout(live.rollout_id, now, stage_settled_at=now)
        log.info("stage_settled", rollout_id=live.rollout_id, stage=live.stages[action.index].name)
        return live

    async def _on_advance(self, live: LiveRollout, action: AdvanceStage, now: float) -> LiveRollout:
        rid, index = live.rollout_id, action.index
        metrics.stage_ended(live.row, now)
        live.row = self.store.update_rollout(
            rid, now, stage_index=index, stage_started_at=now, stage_settled_at=None
        )
        live.new_stage(index, now)
        TRACES.stage(rid, live.stages[index].name, index)
        log.info("stage_started", rollout_id=rid, stage=live.stages[index].name, index=index)
        return live

    async def _on_pause(self, live: LiveRollout, action: PauseRollout, now: float) -> LiveRollout:
        live.row = self.store.update_rollout(
            live.rollout_id, now, status="Paused", reason=action.reason
        )
        log.info("rollout_paused", rollout_id=live.rollout_id, reason=action.reason)
        return live

    async def _on_begin_rollback(
        self, live: LiveRollout, action: BeginRollback, now: float
    ) -> LiveRollout:
        rid = live.rollout_id
        live.row = self.store.update_rollout(rid, now, rolling_back=True, reason=action.reason)
        metrics.ROLLBACKS.inc()
        TRACES.event(rid, "rolling back", reason=action.reason)
        log.warning("rollout_rolling_back", rollout_id=rid, reason=action.reason)
        return live

    async def _on_finish(self, live: LiveRollout, action: FinishRollout, now: float) -> LiveRollout:
        rid = live.rollout_id
        reason = action.reason or live.row.reason
        self.store.set_rollout_status(rid, action.status, reason, now, final=True)
        metrics.rollout_finished(live.row, action.status, now)
        TRACES.finish(rid, action.status, action.reason)
        live.row = self.store.get_rollout(rid)
        self._untrack_devices(rid)
        log.info("rollout_finished", rollout_id=rid, status=action.status, reason=action.reason)
        return live

    # -------------------------------------------------- effects of runs of device intents

    async def _on_deploys(self, live: LiveRollout, run: Sequence[SendDeploy], now: float) -> None:
        groups: dict[tuple[bool, bool], list[str]] = {}
        for a in run:
            groups.setdefault((a.activate, a.shadow), []).append(a.device_id)
        for (activate, shadow), members in groups.items():
            await self._deploy(live, members, activate=activate, shadow=shadow, now=now)

    async def _on_retries(self, live: LiveRollout, run: Sequence[RetryDevice], now: float) -> None:
        await self._mark(live, run, self.store.reset_for_retry, log.info, "device_retry", now)

    async def _on_timeouts(
        self, live: LiveRollout, run: Sequence[TimeOutDevice], now: float
    ) -> None:
        await self._mark(live, run, self.store.mark_timed_out, log.warning, "device_timed_out", now)

    async def _on_rollback_timeouts(
        self, live: LiveRollout, run: Sequence[TimeOutRollback], now: float
    ) -> None:
        await self._mark(
            live, run, self.store.mark_rollback_timed_out, log.warning, "rollback_timed_out", now
        )

    async def _mark(
        self,
        live: LiveRollout,
        run: Sequence[RetryDevice | TimeOutDevice | TimeOutRollback],
        persist: Callable[[str, Sequence[str], float], list[AssignmentRow]],
        say: Callable[..., Any],
        event: str,
        now: float,
    ) -> None:
        """Persist a run's change to its devices' rows (one transaction), then follow it
        in memory and `say` the event for each device."""
        devices = [a.device_id for a in run]
        rows = await asyncio.to_thread(persist, live.rollout_id, devices, now)
        for row in rows:
            live.set_view(assignment_view(row))
            say(event, rollout_id=live.rollout_id, device_id=row.device_id)

    async def _on_rollbacks(
        self, live: LiveRollout, run: Sequence[SendRollback], now: float
    ) -> None:
        async def rollback(command_id: str, region: str | None, to: tuple[str, ...]) -> None:
            await self._publish_rollback(live.row, command_id, region=region, devices=to)

        devices = [a.device_id for a in run]
        await self._in_chunks(live, devices, self.store.mark_rollback_sent, rollback, now)

    def _region_sizes(self) -> dict[str, int]:
        """Devices registered per region (each subscribed to its region's topic), read
        at most every `region_sizes_s`: what a region command costs the broker."""
        now = time.monotonic()
        if now - self._region_sizes_at >= self.config.region_sizes_s:
            self._region_sizes_cache = self.store.region_sizes()
            self._region_sizes_at = now
        return self._region_sizes_cache

    async def _in_chunks(
        self,
        live: LiveRollout,
        devices: Sequence[str],
        persist: Callable[[str, Sequence[str], str, float], list[AssignmentRow]],
        publish: Callable[[str, str | None, tuple[str, ...]], Awaitable[None]],
        now: float,
    ) -> None:
        """One command per region chunk or device (`plan_fanout`): its intent persisted
        for the devices it still applies to (`persist` returns those rows), then
        published to just them; the publishes run concurrently."""
        sizes = await asyncio.to_thread(self._region_sizes)
        sends = []
        plan = plan_fanout(
            ((d, live.regions.get(d, "")) for d in devices),
            sizes,
            budget_bytes=self.config.cohort_budget_bytes,
        )
        for region, chunk in plan:
            command_id = f"c-{uuid.uuid4().hex}"
            rows = await asyncio.to_thread(persist, live.rollout_id, chunk, command_id, now)
            for row in rows:
                live.set_view(assignment_view(row))
            if rows:
                sends.append(publish(command_id, region, tuple(r.device_id for r in rows)))
        await asyncio.gather(*sends)

    async def _deploy(
        self,
        live: LiveRollout,
        devices: Sequence[str],
        *,
        activate: bool,
        now: float,
        shadow: bool = False,
    ) -> None:
        """Deploy to pending devices: persisted per chunk, published concurrently."""
        by_version: dict[str, list[str]] = {}
        for d in devices:
            view = live.views.get(d)
            by_version.setdefault(view.version if view is not None else "", []).append(d)
        shadow_s = self._shadow_seconds(live) if shadow else None
        for version, members in by_version.items():

            async def deploy(
                command_id: str, region: str | None, to: tuple[str, ...], version: str = version
            ) -> None:
                await self._publish_deploy(
                    live.row,
                    to[0] if region is None else None,
                    command_id,
                    region=region,
                    cohort=to if region is not None else (),
                    activate=activate,
                    shadow_s=shadow_s,
                    version=version or None,
                )

            await self._in_chunks(live, members, self.store.mark_sent, deploy, now)

    async def _switch(self, live: LiveRollout, devices: Sequence[str], now: float) -> None:
        async def switch(command_id: str, region: str | None, to: tuple[str, ...]) -> None:
            await self._publish_switch(live.row, command_id, region=region, devices=to)

        await self._in_chunks(live, devices, self.store.mark_switching, switch, now)

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
        trace = TRACES.headers(command.rollout_id)  # devices' spans join the rollout's
        for topic in targets:
            await self._publish(topic, payload, expiry_s=expiry, signed=True, trace=trace)
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
        action = request.action
        plan = plan_control(
            action,
            rollout.status,
            rolling_back=rollout.rolling_back,
            stage_index=rollout.stage_index,
            approved_stage=rollout.approved_stage,
        )
        if isinstance(plan, ControlRefused):
            raise RequestError(
                f"cannot {action} rollout {rollout.rollout_id}: {plan.reason}", reason="bad_request"
            )
        if plan.reclaim:  # it reopens: its devices must not be another rollout's meanwhile
            await asyncio.to_thread(self.store.reclaim, rollout.rollout_id, now)
        if plan.changes:
            self.store.update_rollout(rollout.rollout_id, now, **dict(plan.changes))
        if plan.finish is not None:
            self.store.set_rollout_status(rollout.rollout_id, *plan.finish, now, final=True)
            metrics.rollout_finished(rollout, plan.finish[0], now)
            TRACES.finish(rollout.rollout_id, *plan.finish)
        log.info("rollout_control", rollout_id=rollout.rollout_id, action=action)
        live = await self._reload(rollout.rollout_id)
        self._moved.add(rollout.rollout_id)  # the operator's word is acted on at once
        self._wake.set()
        await self._publish_status(live, force=True)
        return {
            "rolloutId": rollout.rollout_id,
            "status": self.store.get_rollout(rollout.rollout_id).status,
        }

    async def _represign(self, event: DeviceEvent) -> None:
        """A device's presigned URL expired mid-download: send the same command, new URL."""
        live = self._live.get(event.rollout_id or "")
        view = live.views.get(event.device_id) if live is not None else None
        if live is None or view is None:
            return
        if view.command_id == event.command_id and view.state not in FINAL_DEVICE_STATES:
            log.info(
                "url_represigned",
                rollout_id=live.rollout_id,
                device_id=event.device_id,
                command_id=event.command_id,
            )
            self._urls.pop(self._model_key(live.row, view.version or None), None)
            await self._publish_deploy(
                live.row,
                view.device_id,
                event.command_id,
                since=view.sent_at,
                version=view.version or None,
            )

    async def _resend(self, live: LiveRollout, views: Sequence[AssignmentView]) -> None:
        """Publish again what `plan_resends` says is still open for these devices."""
        shadow_s = self._shadow_seconds(live) if strategy(live.strategy).mirrors else None
        sends = []
        for resend in plan_resends(live.strategy, views):
            devices = (resend.device_id,)
            if isinstance(resend, ResendSwitch | ResendRollback):
                publish = (
                    self._publish_switch
                    if isinstance(resend, ResendSwitch)
                    else self._publish_rollback
                )
                sends.append(
                    publish(
                        live.row,
                        resend.command_id,
                        region=None,
                        devices=devices,
                        since=resend.since,
                    )
                )
            else:
                view = live.views.get(resend.device_id)
                sends.append(
                    self._publish_deploy(
                        live.row,
                        resend.device_id,
                        resend.command_id,
                        activate=resend.activate,
                        shadow_s=shadow_s if resend.shadow else None,
                        since=resend.since,
                        version=(view.version or None) if view is not None else None,
                    )
                )
        await asyncio.gather(*sends)

    async def _device_back(self, device_id: str) -> None:
        """A device (re)connected: its session, with the commands queued in it, may be
        new (a broker restarted without them), so what is open for it goes again."""
        live = self._live.get(self._rollout_of.get(device_id, ""))
        view = live.views.get(device_id) if live is not None else None
        if live is not None and view is not None and live.row.finished_at is None:
            await self._resend(live, [view])

    def _model_key(self, rollout: RolloutRow, version: str | None) -> tuple[str, str]:
        return (rollout.model, version or rollout.version)

    async def _model_and_url(
        self, rollout: RolloutRow, version: str | None
    ) -> tuple[SignedManifest, str]:
        """The version's signed manifest and a presigned URL for it, reused while the URL
        has most of its life left: one read and one presign per version, not per device."""
        key = self._model_key(rollout, version)
        cached = self._urls.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[2] < self.config.presign_ttl_s / 2:
            return cached[0], cached[1]
        model = self.store.get_model(*key)
        manifest = SignedManifest.model_validate_json(model.signed_manifest)
        url = await asyncio.to_thread(
            self.artifacts.presign_get, model.s3_key, self.config.presign_ttl_s
        )
        self._urls[key] = (manifest, url, now)
        return manifest, url

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
        version: str | None = None,
    ) -> None:
        """One device's command, or one publish on a region's topic for a cohort of it.

        `version`: the device's own side of an A/B test (or its winner); the rollout's
        version when None.
        """
        manifest, url = await self._model_and_url(rollout, version)
        devices = cohort if region is not None else (str(device_id),)
        live = self._live.get(rollout.rollout_id)
        spec = (
            live.spec if live is not None else StartRolloutRequest.model_validate_json(rollout.spec)
        )
        command = DeployCommand(
            **self._envelope(rollout, command_id, region, devices, since=since),
            manifest=manifest,
            url=url,
            activate=activate,
            shadow_s=shadow_s,
            # Anti-rollback override: an A/B winner may be the lower version; otherwise
            # only when the operator started the rollout with allow_downgrade.
            allow_downgrade=strategy(rollout.strategy).two_versions or spec.allow_downgrade,
            allow_interface_change=spec.allow_interface_change,
        )
        await self._send(command, region=region, devices=devices)

    def _comparison(self, live: LiveRollout) -> ABComparison | None:
        """An A/B test's comparison: as decided once there is a winner, else live."""
        row, spec = live.row, live.spec
        if not strategy(row.strategy).two_versions or not row.version_b:
            return None
        if row.ab_result is not None:
            return ABComparison.model_validate_json(row.ab_result)
        r = compare_ab(
            spec.winner_metric,
            spec.min_improvement,
            live.cohort("a"),
            live.cohort("b"),
            spec.gates.min_samples,
        )
        return ABComparison(
            metric=spec.winner_metric,
            version_a=row.version,
            version_b=row.version_b,
            value_a=r.value_a,
            value_b=r.value_b,
            improvement=r.improvement,
            winner=row.winner,
            detail=r.detail,
        )

    def _status(self, live: LiveRollout) -> RolloutStatus:
        row, spec, stages = live.row, live.spec, live.stages
        lines = (
            [progress(v) for _, v in sorted(live.views.items())]
            if len(live.views) <= STATUS_DEVICE_LINES
            else []
        )
        status = build_status(
            row,
            live.counts,
            live.rollback_counts,
            lines,
            live.avg_served_latency_ms(),
            self.clock(),
        )
        two_versions = strategy(row.strategy).two_versions
        if two_versions:
            candidate, baseline = live.cohort("a"), live.cohort("b")
        else:
            candidate, baseline = self._candidate(live), live.cohort("baseline")
        gates = (
            evaluate_gates(spec.gates, candidate, baseline)
            if spec.gates.any and not two_versions
            else ()
        )
        stage = ""
        if stages and row.status != "Pending":
            i = min(row.stage_index, len(stages) - 1)
            stage = f"{stages[i].name} ({i + 1}/{len(stages)})"
        if row.rolling_back:
            stage = f"rollback ({stage})" if stage else "rollback"
        summary = candidate.summary(baseline)
        return status.model_copy(
            update={
                "stage": stage,
                "gates": gates,
                "candidate": summary,
                "baseline": baseline.summary(),
                "ab": self._comparison(live),
                "task": self._task_text(row),
                "agreement_rule": summary.agreement_rule,
            }
        )

    def _task_text(self, rollout: RolloutRow) -> str | None:
        """The candidate's task as the telemetry reads it (both sides' in an A/B test)."""
        task = self.store.model_task(rollout.model, rollout.version)
        if strategy(rollout.strategy).two_versions and rollout.version_b:
            task_b = self.store.model_task(rollout.model, rollout.version_b)
            if task_b != task:
                return f"A: {task or '-'}; B: {task_b or '-'}"
        return task

    async def _publish_status(self, live: LiveRollout | None, *, force: bool = False) -> None:
        """Publish the retained status when it changed, at most every status interval
        while the rollout runs (a final status goes out at once). None: a rollout whose
        rows could not be read, which has no status to say."""
        if live is None:
            return
        rid = live.rollout_id
        now = time.monotonic()
        moved = self._status_names.get(rid) != live.row.status  # e.g. it just finished
        if (
            not force
            and not moved
            and now - self._status_at.get(rid, -1e9) < (self.config.status_interval_s)
        ):
            self._dirty.add(rid)  # published by a later tick
            return
        status = self._status(live)
        fingerprint = status.model_dump_json(exclude={"updated_at"})
        if self._published.get(rid) == fingerprint:
            return
        await self._publish(topics.rollout_status(rid), status.to_wire(), retain=True)
        self._published[rid] = fingerprint
        self._status_at[rid] = now
        if rid in self._live:
            metrics.LIVE_ROLLOUTS.update(status)
        self._status_names[rid] = live.row.status

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        expiry_s: int | None = None,
        signed: bool = False,
        trace: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Publish at QoS 1; with `signed`, over the exact bytes sent (topic + payload);
        `trace`: a `traceparent` user property (not signed: it decides nothing)."""
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        properties = publish_properties(expiry_s=expiry_s)
        if signed and self.config.command_key is not None:
            signature = sign_command(topic, payload, self.config.command_key)
            properties.UserProperty = [(SIGNATURE_PROPERTY, signature)]
        if trace:
            properties.UserProperty = list(trace)  # paho appends to what is there
        await self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)


# Each intent type's effect (Controller._execute). A single intent's effect returns the
# rollout as it is afterwards (None: its rows could not be read again).
_Effect = Callable[[Controller, LiveRollout, Any, float], Awaitable[LiveRollout | None]]
_EFFECTS: dict[type[Action], _Effect] = {
    StartRollout: Controller._on_start,
    SendRegionDeploy: Controller._on_region_deploy,
    SendSwitch: Controller._on_switch,
    DecideWinner: Controller._on_winner,
    SettleStage: Controller._on_settle,
    AdvanceStage: Controller._on_advance,
    PauseRollout: Controller._on_pause,
    BeginRollback: Controller._on_begin_rollback,
    FinishRollout: Controller._on_finish,
}
# Runs of device intents of one kind: one effect for the run.
_RunEffect = Callable[[Controller, LiveRollout, Any, float], Awaitable[None]]
_RUN_EFFECTS: dict[type[Action], _RunEffect] = {
    SendDeploy: Controller._on_deploys,
    RetryDevice: Controller._on_retries,
    TimeOutDevice: Controller._on_timeouts,
    TimeOutRollback: Controller._on_rollback_timeouts,
    SendRollback: Controller._on_rollbacks,
}


def assignment_view(a: AssignmentRow | Assignment) -> AssignmentView:
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
        a.version,
    )


def model_summary(row: ModelVersionRow) -> dict[str, Any]:
    return row_to_wire(row, exclude={"signed_manifest", "id"})


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
