"""The operator's side of the controller API: request/response over MQTT 5, and push.

`OperatorClient` sends a request on `hotswap/v1/controller/requests` with a
response topic and correlation data, and waits for the matching answer.
`push_model` checks and signs a model, asks the controller whether its version
is taken, uploads it under content-addressed keys, then registers it
(`registered_key` is the pure decision). Does network and file I/O; used by
the CLI, the demo and tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from pydantic import ValidationError

from controller.artifacts import ArtifactStore
from shared import topics, tracing
from shared.errors import BrokerError, RequestError
from shared.keys import load_private_key
from shared.manifest import ModelTask, TensorSignature, build_manifest, sign_manifest
from shared.messages import ListModels, RegisterModel, Request, Response, RolloutStatus
from shared.mqtt import (
    ListeningSession,
    connection_error,
    make_client,
    publish_properties,
    subscribe_checked,
)
from shared.settings import MqttEndpoint
from shared.tasks import task_problem
from shared.tflite_schema import read_signature

RETAINED_GRACE_S = 3.0


def broker_error(endpoint: MqttEndpoint, exc: aiomqtt.MqttError) -> BrokerError:
    return connection_error(endpoint, exc)


class OperatorClient(ListeningSession):
    """`async with OperatorClient(endpoint) as op: await op.request(ListDevices())`."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.client_id = f"hotswap-cli-{uuid.uuid4().hex[:12]}"
        self._client = make_client(endpoint, identifier=self.client_id, timeout=timeout)
        self._pending: dict[bytes, asyncio.Future[Response]] = {}

    def _listen_topic(self) -> str:
        return topics.response_topic(self.client_id)

    def _on_message(self, message: aiomqtt.Message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        future = self._pending.pop(bytes(correlation or b""), None)
        if future is None or future.done():
            return
        try:
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            future.set_result(Response.model_validate_json(raw))
        except ValueError as exc:
            future.set_exception(RequestError(f"unreadable answer from the controller: {exc}"))

    async def request(self, request: Request) -> Any:
        """Send `request`; return the result or raise RequestError with the controller's words."""
        correlation = uuid.uuid4().bytes
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        try:
            properties = publish_properties(
                response_topic=topics.response_topic(self.client_id),
                correlation=correlation,
                expiry_s=int(self.timeout) + 1,
            )
            if trace := tracing.headers():  # the controller's span joins the caller's trace
                properties.UserProperty = trace
            await self._client.publish(
                topics.CONTROLLER_REQUESTS, request.to_wire(), qos=1, properties=properties
            )
            response = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise RequestError(
                f"no answer from the controller within {self.timeout:g}s "
                f"(is `hotswap controller run` connected to {self.endpoint}?)",
                reason="controller_unavailable",
            ) from None
        except aiomqtt.MqttError as exc:
            raise broker_error(self.endpoint, exc) from exc
        finally:
            self._pending.pop(correlation, None)
        if not response.ok:
            raise RequestError(response.error or "request refused", reason=response.reason)
        return response.result


async def read_rollout_status(
    endpoint: MqttEndpoint, rollout_id: str, *, wait_s: float | None = None
) -> RolloutStatus:
    """The retained status of a rollout; with `wait_s`, the first final one within it.

    Reads the retained topic only, so it works without a running controller.
    Raises RequestError when no status exists, or none is final in time.
    """
    topic = topics.rollout_status(rollout_id)
    client = make_client(endpoint, identifier=f"hotswap-cli-{uuid.uuid4().hex[:12]}")
    latest: RolloutStatus | None = None
    loop = asyncio.get_running_loop()
    # A retained status arrives right after subscribing; silence means there is none.
    first_by = loop.time() + RETAINED_GRACE_S
    final_by = loop.time() + (wait_s or 0.0)
    try:
        async with client:
            await subscribe_checked(client, endpoint, topic)
            messages = aiter(client.messages)
            while latest is None or (wait_s and not latest.final):
                remaining = (first_by if latest is None else final_by) - loop.time()
                if remaining <= 0:
                    break
                try:
                    message = await asyncio.wait_for(anext(messages), remaining)
                except TimeoutError:
                    break
                if isinstance(message.payload, bytes | bytearray) and message.payload:
                    latest = RolloutStatus.model_validate_json(message.payload)
    except aiomqtt.MqttError as exc:
        raise broker_error(endpoint, exc) from exc
    if latest is None:
        raise RequestError(f"unknown rollout {rollout_id!r} (no status published)")
    if wait_s and not latest.final:
        raise RequestError(
            f"rollout {rollout_id} is still {latest.status} after {wait_s:g}s "
            f"({latest.devices_updated}/{latest.devices_targeted} devices updated)",
            reason="timeout",
        )
    return latest


@dataclass(frozen=True, slots=True)
class PushResult:
    name: str
    version: str
    sha256: str
    size: int
    s3_key: str
    registered: dict[str, Any]


def registered_key(
    rows: Sequence[dict[str, Any]], name: str, version: str, sha256: str
) -> str | None:
    """The S3 key of `name@version` if the controller's `rows` hold it with these bytes.

    None when the version is not registered; RequestError when it is, with other
    bytes: a registered version never changes.
    """
    for row in rows:
        if row.get("name") != name or row.get("version") != version:
            continue
        if row.get("sha256") != sha256:
            raise RequestError(
                f"model {name}@{version} is already registered with another sha256 "
                f"({str(row.get('sha256'))[:12]}…); push a new version instead",
                reason="bad_request",
            )
        return str(row["s3Key"])
    return None


def check_task(task: ModelTask, signature: TensorSignature) -> None:
    """RequestError unless the task can be read from the model's outputs (shared.tasks)."""
    problem = task_problem(task, signature)
    if problem is not None:
        raise RequestError(f"--task: {problem}", reason="bad_request")


@tracing.traced("push")
async def push_model(
    data: bytes,
    *,
    name: str,
    version: str,
    signing_key: Path,
    endpoint: MqttEndpoint,
    artifacts: ArtifactStore,
    device_types: tuple[str, ...] = (),
    task: ModelTask | None = None,
    interface_change: bool = False,
    request_timeout_s: float = 10.0,
) -> PushResult:
    """Check the file is a TFLite model, sign its manifest, upload both, register.

    The tensor signature is read from the file itself (no interpreter needed
    here); `task` says what the outputs mean (None: the agent infers it) and
    must name one of them; `interface_change` marks a version meant to change
    the tensor interface of the one it replaces.

    Everything local (file, model, key) is checked before anything is uploaded,
    and so is the controller's answer: a version registered with other bytes is
    refused with S3 untouched, the same bytes again upload nothing. Uploads go to
    content-addressed keys, which no other bytes can overwrite; a push that
    stops between upload and registration leaves objects that nothing serves
    (`hotswap model orphans` lists and deletes them).
    """
    tracing.annotate({"hotswap.model": name, "hotswap.version": version})
    signature = read_signature(data)
    if task is not None:
        check_task(task, signature)
    key = load_private_key(signing_key)
    try:
        manifest = build_manifest(
            name=name,
            version=version,
            data=data,
            signature=signature,
            device_types=device_types,
            task=task,
            interface_change=interface_change,
        )
    except ValidationError:
        raise  # names the field (the CLI: its flag), not pydantic's report
    except ValueError as exc:
        raise RequestError(str(exc).splitlines()[-1].strip()) from exc
    signed = sign_manifest(manifest, key)
    async with OperatorClient(endpoint, timeout=request_timeout_s) as op:
        try:
            rows = await op.request(ListModels())
        except RequestError as exc:
            if exc.reason != "controller_unavailable":
                raise
            raise RequestError(f"{exc}; nothing was uploaded", reason=exc.reason) from None
        s3_key = registered_key(rows, name, version, manifest.sha256)
        uploaded = s3_key is None
        if s3_key is None:
            s3_key = await asyncio.to_thread(artifacts.put_model, name, version, data, signed)
        try:
            registered = await op.request(RegisterModel(manifest=signed, s3_key=s3_key))
        except RequestError as exc:
            if exc.reason != "controller_unavailable" or not uploaded:
                raise
            raise RequestError(
                f"{exc}; {s3_key} was uploaded but not registered: push again once the "
                "controller answers (nothing serves it meanwhile; `hotswap model orphans` "
                "lists it)",
                reason=exc.reason,
            ) from None
    return PushResult(name, version, manifest.sha256, manifest.size, s3_key, registered)
