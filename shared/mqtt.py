"""MQTT 5 client construction and reconnect backoff, shared by every participant.

Builds aiomqtt clients (it does not connect: `async with` does) and yields
jittered, capped reconnect delays. The only network-facing module of `shared`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
import ssl
from collections.abc import Iterable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Self

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.errors import BrokerError
from shared.settings import MqttEndpoint

# CONNACK reason codes that mean "who you are was refused", not "the broker is down".
_REFUSED = {134: "bad user name or password", 135: "not authorized"}


def make_client(
    endpoint: MqttEndpoint,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    persistent_session: bool = False,
    session_expiry_s: int = 3600,
    keepalive: int = 30,
    timeout: float = 10.0,
    max_queued_incoming: int | None = 10_000,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
) -> aiomqtt.Client:
    """An MQTT 5 client for `endpoint`, authenticated with its username/password or certificate.

    With `persistent_session` the broker keeps the subscriptions and queued QoS 1
    messages for `session_expiry_s` while the client is away (clean start off).
    `queue_type`: the incoming queue's class (one that decides what to drop, and
    counts it, instead of aiomqtt's silent discard when full). `protocol` V311: a
    session that needs no MQTT 5 feature (paho then builds no `Properties` for each
    message it receives); its persistent session lasts as long as the broker keeps
    such sessions, not `session_expiry_s`.
    """
    v5 = protocol == aiomqtt.ProtocolVersion.V5
    props: Properties | None = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s if persistent_session else 0
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier,
        protocol=protocol,
        will=will,
        clean_start=not persistent_session if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        clean_session=None if v5 else not persistent_session,
        properties=props,
        keepalive=keepalive,
        timeout=timeout,
        username=endpoint.username,
        password=endpoint.password,
        tls_context=tls_context(endpoint) if endpoint.tls else None,
        max_queued_incoming_messages=max_queued_incoming,
        queue_type=queue_type,
    )


def tls_context(endpoint: MqttEndpoint) -> ssl.SSLContext:
    """Verify the broker against `endpoint.ca_file` (else the system CAs); present
    `cert_file`/`key_file` as our identity when given. Reads those files."""
    context = ssl.create_default_context(
        cafile=str(endpoint.ca_file) if endpoint.ca_file is not None else None
    )
    if endpoint.cert_file is not None:
        context.load_cert_chain(
            str(endpoint.cert_file),
            str(endpoint.key_file) if endpoint.key_file is not None else None,
        )
    return context


def connection_error(endpoint: MqttEndpoint, exc: aiomqtt.MqttError) -> BrokerError:
    """One line for a failed connection: refused credentials told apart from an outage."""
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(code, int) and code in _REFUSED:
        who = repr(endpoint.username) if endpoint.username else "anonymous clients"
        return BrokerError(
            f"the MQTT broker at {endpoint} refused {who} ({_REFUSED[code]}): "
            "check --credentials / HOTSWAP_CREDENTIALS",
            reason="not_authorized",
        )
    return BrokerError(f"cannot reach the MQTT broker at {endpoint}: {exc}")


def refused_code(granted: Iterable[object]) -> object | None:
    """The first refusal (a SUBACK reason code of 0x80 or more) in `granted`, else None."""
    for code in granted:
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= 0x80:
            return code
    return None


async def subscribe_checked(
    client: aiomqtt.Client, endpoint: MqttEndpoint, topic: str, *, qos: int = 1
) -> None:
    """Subscribe, and raise BrokerError when the broker refuses (its ACL says no)."""
    code = refused_code(await client.subscribe(topic, qos=qos))
    if code is not None:
        who = repr(endpoint.username) if endpoint.username else "anonymous clients"
        raise BrokerError(
            f"the MQTT broker at {endpoint} does not let {who} subscribe to {topic} "
            f"({code}): check --credentials / HOTSWAP_CREDENTIALS",
            reason="not_authorized",
        )


class ListeningSession(abc.ABC):
    """Base of the request/response clients (operator CLI, broker admin).

    Inside `async with` the client is connected, subscribed to `_listen_topic()`
    and a task feeds every message to `_on_message`. A refused login or
    subscription raises BrokerError with the client disconnected. A subclass sets
    `endpoint` and `_client` in its constructor.
    """

    endpoint: MqttEndpoint
    _client: aiomqtt.Client
    _reader: asyncio.Task[None] | None = None

    @abc.abstractmethod
    def _listen_topic(self) -> str:
        """The topic whose messages this session reads."""

    @abc.abstractmethod
    def _on_message(self, message: aiomqtt.Message) -> None:
        """One message of the listened topic (called from the reader task)."""

    async def __aenter__(self) -> Self:
        client, endpoint = self._client, self.endpoint
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise connection_error(endpoint, exc) from exc
        try:
            await subscribe_checked(client, endpoint, self._listen_topic())
        except (aiomqtt.MqttError, BrokerError) as exc:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            if isinstance(exc, aiomqtt.MqttError):
                raise connection_error(endpoint, exc) from exc
            raise

        async def read() -> None:
            async for message in client.messages:
                self._on_message(message)

        self._reader = asyncio.create_task(read(), name=f"{type(self).__name__}-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the reader, then leave the broker."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)


def publish_properties(
    *,
    expiry_s: int | None = None,
    response_topic: str | None = None,
    correlation: bytes | None = None,
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.PayloadFormatIndicator = 1  # UTF-8 JSON
    props.ContentType = "application/json"
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, int(expiry_s))
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def expiry_seconds(expires_at: datetime | None, now: datetime) -> int | None:
    if expires_at is None:
        return None
    return max(1, int((expires_at - now).total_seconds()))


def backoff_delays(
    *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Endless 'full jitter' delays: uniform(0, min(cap, base * 2**attempt))."""
    r = rng or random.Random()
    attempt = 0
    while True:
        yield r.uniform(base / 2, min(cap, base * 2**attempt))
        attempt = min(attempt + 1, 30)


def raise_if_cancelled(baseline: int = 0) -> None:
    """Honour a cancellation that an aiomqtt call swallowed.

    aiomqtt waits through `asyncio.wait_for`, which on Python 3.11 returns the
    result and drops the cancellation when both happen at once (CPython
    gh-86296). A loop that published calls this before waiting again, so that
    cancelling it always stops it. `baseline` is the task's `cancelling()`
    count that is not a request to stop (see `forget_group_cancellation`).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > baseline:
        raise asyncio.CancelledError


def forget_group_cancellation(baseline: int) -> None:
    """Undo the cancel request a failed TaskGroup left on the current task.

    When a child of an `asyncio.TaskGroup` fails while its parent already waits
    in `__aexit__`, Python 3.11 cancels the parent and never uncancels it, so
    `cancelling()` stays raised after the group's error was handled: a
    reconnect loop would then take its own disconnect for a shutdown. Call it
    in the handler with the count read before entering the group.
    """
    task = asyncio.current_task()
    while task is not None and task.cancelling() > baseline:
        task.uncancel()
