"""The fleet benchmark's observers and raw baselines: plain MQTT clients, no controller.

`RawClient` is one plain paho client (its own network thread) logged in as the
bench's raw identity. It timestamps every device event and telemetry window it
receives, and publishes signed commands straight to the devices' cmd topics:
the raw baselines of P1 (deploy → `activated`), P4 (rollback → `rolled_back`)
and P5 (receiving the same telemetry stream as the controller).

`flood` is the ingest benchmark's raw source: one plain paho client sending
prebuilt telemetry windows (`telemetry_messages`: every device's, with the
simulator's shapes and sketches) at a set rate, past what the simulated devices
can send on this machine.

`Requester` is the operator request API as the CLI speaks it (MQTT 5
request/response on `hotswap/v1/controller/requests`, a response topic and
correlation data), timed per request. `StatusWatcher` follows every retained
rollout status. Does network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from bench.fleet_sim import window_shapes
from shared import topics
from shared.command_auth import SIGNATURE_PROPERTY, sign_command
from shared.credentials import DeviceIdentity
from shared.messages import ModelRef
from shared.mqtt import make_client, publish_properties
from shared.settings import MqttEndpoint


@dataclass
class EventLog:
    """Per command id: the devices that answered each final phase, first answer times."""

    first: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (cmd, dev, phase)
    by_command: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    by_rollout: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    rollout_last: dict[tuple[str, str], float] = field(default_factory=dict)
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rollout, phase)


class RawClient:
    """A plain paho MQTT 5 client on its own thread (`start()`, `stop()`)."""

    def __init__(self, endpoint: MqttEndpoint, *, telemetry: bool = True) -> None:
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.events = EventLog()
        self.telemetry = 0
        self.telemetry_last = 0.0
        self.subscribed = threading.Event()
        self._topics = [topics.ALL_DEVICE_EVENTS] + ([topics.ALL_DEVICE_TELEMETRY] * telemetry)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"hotswap-bench-raw-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(endpoint.username, endpoint.password)
        self.client.max_inflight_messages_set(65535)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._pending_subs = 0

    def start(self, timeout: float = 15.0) -> RawClient:
        self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise RuntimeError("the raw client could not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        self._pending_subs = len(self._topics)
        for topic in self._topics:
            client.subscribe(topic, qos=1)

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, _codes: Any, _p: Any) -> None:
        self._pending_subs -= 1
        if self._pending_subs <= 0:
            self.subscribed.set()

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        now = time.monotonic()
        topic = message.topic
        if topic.endswith("/telemetry"):
            with self.lock:
                self.telemetry += 1
                self.telemetry_last = now
            return
        try:
            body = json.loads(message.payload)
            phase, device, command = body["phase"], body["deviceId"], body["commandId"]
            rollout = body.get("rolloutId") or "-"
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            log = self.events
            key = (command, device, phase)
            if key not in log.first:
                log.first[key] = now
                log.by_command[command][phase].add(device)
                if rollout != "-":
                    log.by_rollout[rollout][phase].add(device)
                    log.rollout_last[(rollout, phase)] = now
            log.answers[(rollout, phase)] += 1

    # ------------------------------------------------------------ reading the log

    def devices_with(
        self, *, command_ids: set[str] | None = None, rollout: str | None = None, phase: str
    ) -> set[str]:
        with self.lock:
            if rollout is not None:
                return set(self.events.by_rollout.get(rollout, {}).get(phase, set()))
            out: set[str] = set()
            for cid in command_ids or ():
                out |= self.events.by_command.get(cid, {}).get(phase, set())
            return out

    def last_time(self, command_ids: set[str], phase: str) -> float:
        with self.lock:
            return max(
                (
                    t
                    for (c, _d, p), t in self.events.first.items()
                    if p == phase and c in command_ids
                ),
                default=0.0,
            )

    def rollout_last(self, rollout: str, phase: str) -> float:
        with self.lock:
            return self.events.rollout_last.get((rollout, phase), 0.0)

    def answers(self, rollout: str, phase: str) -> int:
        with self.lock:
            return self.events.answers[(rollout, phase)]

    def telemetry_count(self) -> tuple[int, float]:
        with self.lock:
            return self.telemetry, self.telemetry_last

    # ------------------------------------------------------------ publishing

    def publish_command(
        self, topic: str, payload: bytes, key: Ed25519PrivateKey, expiry_s: int
    ) -> paho.MQTTMessageInfo:
        """One command, signed as the controller signs it, at QoS 1."""
        props: Properties = publish_properties(expiry_s=expiry_s)
        props.UserProperty = [(SIGNATURE_PROPERTY, sign_command(topic, payload, key))]
        return self.client.publish(topic, payload, qos=1, properties=props)


# ---------------------------------------------------------------- raw telemetry source


def telemetry_messages(
    devices: Sequence[DeviceIdentity], active: dict[str, Any], seed: int = 5
) -> list[tuple[str, bytes]]:
    """One telemetry window per device (topic, payload) of its active model, ending now."""
    rng = random.Random(seed)
    shapes = window_shapes(rng, 50, degraded=False)
    ref = ModelRef.model_validate(active)
    out = []
    for d in devices:
        window = shapes[rng.randrange(len(shapes))].window(d.device_id, ref, 1.0)
        out.append((topics.device_telemetry(d.device_id), window.to_wire()))
    return out


def flood(
    endpoint: MqttEndpoint, messages: Sequence[tuple[str, bytes]], rate: float, seconds: float
) -> tuple[int, float]:
    """`messages` round-robin at `rate` per second for `seconds`, QoS 0, from one plain
    paho client (blocking: run it in a thread); (sent, seconds it took)."""
    connected = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"hotswap-bench-flood-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.username_pw_set(endpoint.username, endpoint.password)
    client.max_queued_messages_set(0)
    client.on_connect = lambda _c, _u, _f, rc, _p: None if rc.is_failure else connected.set()
    client.connect(endpoint.host, endpoint.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(15):
            raise RuntimeError("the raw telemetry source could not connect")
        t0 = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - t0 < seconds:
            for _ in range(int((now - t0) * rate) - sent):
                topic, payload = messages[sent % len(messages)]
                client.publish(topic, payload, qos=0)
                sent += 1
            time.sleep(0.002)
        return sent, time.monotonic() - t0
    finally:
        client.disconnect()
        client.loop_stop()


# ---------------------------------------------------------------- operator side


@dataclass
class Sample:
    kind: str
    phase: str
    seconds: float | None  # None: no answer in time
    ok: bool


class Requester:
    """The operator request API (as `hotswap` CLI commands send it), timed."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.client_id = f"hotswap-cli-bench-{uuid.uuid4().hex[:8]}"
        self.client = make_client(endpoint, identifier=self.client_id, timeout=timeout)
        self.pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self.samples: list[Sample] = []
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Requester:
        await self.client.__aenter__()
        await self.client.subscribe(topics.response_topic(self.client_id), qos=1)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.client.messages:
            correlation = bytes(getattr(message.properties, "CorrelationData", b"") or b"")
            future = self.pending.pop(correlation, None)
            if future is not None and not future.done() and isinstance(message.payload, bytes):
                future.set_result(json.loads(message.payload))

    async def request(
        self,
        body: dict[str, Any],
        *,
        phase: str = "",
        record: bool = True,
        wait_s: float | None = None,
    ) -> dict[str, Any] | None:
        """The answer (`ok`, `result`, `error`), None when none came in time."""
        correlation = uuid.uuid4().bytes
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[correlation] = future
        wait = wait_s or self.timeout
        t0 = time.perf_counter()
        await self.client.publish(
            topics.CONTROLLER_REQUESTS,
            json.dumps({"v": 1, **body}).encode(),
            qos=1,
            properties=publish_properties(
                response_topic=topics.response_topic(self.client_id),
                correlation=correlation,
                expiry_s=int(wait) + 1,
            ),
        )
        try:
            answer: dict[str, Any] | None = await asyncio.wait_for(future, wait)
        except TimeoutError:
            answer = None
        finally:
            self.pending.pop(correlation, None)
        elapsed = time.perf_counter() - t0
        if record:
            ok = answer is not None and bool(answer.get("ok"))
            self.samples.append(
                Sample(body["kind"], phase, elapsed if answer is not None else None, ok)
            )
        return answer

    async def result(self, body: dict[str, Any], *, wait_s: float | None = None) -> Any:
        """The request's result; RuntimeError with the controller's words when refused."""
        answer = await self.request(body, record=False, wait_s=wait_s)
        if answer is None:
            raise RuntimeError(f"no answer from the controller to {body['kind']}")
        if not answer.get("ok"):
            raise RuntimeError(f"{body['kind']} refused: {answer.get('error')}")
        return answer.get("result")


class StatusWatcher:
    """Every retained rollout status as it changes: the latest body, its size, times."""

    def __init__(self, endpoint: MqttEndpoint) -> None:
        self.client = make_client(
            endpoint,
            identifier=f"hotswap-cli-bench-status-{uuid.uuid4().hex[:8]}",
            max_queued_incoming=None,
        )
        self.latest: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[tuple[float, str]]] = {}  # rollout -> (monotonic, status)
        self.max_bytes = 0
        self.messages = 0
        self.changed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatusWatcher:
        await self.client.__aenter__()
        await self.client.subscribe(topics.ALL_ROLLOUT_STATUS, qos=1)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            if not isinstance(payload, bytes) or not payload:
                continue
            now = time.monotonic()
            body = json.loads(payload)
            rid = topics.parse_rollout_status_topic(message.topic.value)
            self.latest[rid] = body
            self.history.setdefault(rid, []).append((now, str(body.get("status"))))
            self.max_bytes = max(self.max_bytes, len(payload))
            self.messages += 1
            self.changed.set()

    async def wait_status(
        self, rollout_id: str, wanted: set[str], within_s: float, *, after: float = 0.0
    ) -> float:
        """Until the rollout's retained status, received at or after `after` (monotonic),
        is one of `wanted`: when it first was."""
        deadline = time.monotonic() + within_s
        while True:
            for at, status in self.history.get(rollout_id, []):
                if at >= after and status in wanted:
                    return at
            left = deadline - time.monotonic()
            if left <= 0:
                body = self.latest.get(rollout_id, {})
                keys = (
                    "status",
                    "reason",
                    "devicesTargeted",
                    "devicesUpdated",
                    "devicesFailed",
                    "devicesPending",
                )
                raise TimeoutError(
                    f"rollout {rollout_id} not {'/'.join(sorted(wanted))} within {within_s:g}s: "
                    f"{ {k: body.get(k) for k in keys} }"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
