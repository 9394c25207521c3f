"""A simulated device for the fault tests: a real MQTT 5 client speaking the wire contract.

`SimDevice` logs in to the real broker with a device's own provisioned
credentials (client id = device id, persistent session), keeps a retained
`DeviceState` on its state topic with a last will saying `online: false`,
subscribes to its device and region cmd topics, records every command it
receives (cancels included) and answers as its `Behaviour` says: a deploy with
`received` then `activated` (or silence, a late answer, a failure with a
reason), a rollback with `rolled_back`, or `failed`/`not_resident` when it has
no previous model.

It is a test device speaking the contract, not a fake of a component under
test: it verifies no signature, downloads nothing and loads no model. Tests of
what a real agent does use `edge_agent.agent.Agent`. Does network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt

from broker.launcher import Mosquitto
from shared import topics
from shared.messages import (
    COMMAND,
    CancelCommand,
    Capabilities,
    Command,
    DeployCommand,
    DeviceEvent,
    DeviceState,
    EventPhase,
    ModelRef,
    RollbackCommand,
)
from shared.mqtt import make_client, refused_code
from shared.settings import MqttEndpoint
from tests.conftest import device_endpoint

DeployAnswer = Literal["activate", "silent", "fail"]


@dataclass(frozen=True)
class Behaviour:
    """How a SimDevice answers the commands it receives."""

    deploy: DeployAnswer = "activate"
    answer_after_s: float = 0.0  # between `received` and the final answer (a late answer)
    fail_reason: str = "incompatible"
    honour_cancel: bool = True  # a cancel of the rollout drops a final answer not yet sent


@dataclass
class SimDevice:
    """`async with SimDevice(endpoint, "cam-1", "eu-west", "camera") as device: ...`.

    `claim_region` / `claim_device_type` make the device say something else about
    itself in its state than what it was provisioned as (its subscriptions stay
    those of its provisioned region).
    """

    endpoint: MqttEndpoint
    device_id: str
    region: str
    device_type: str
    behaviour: Behaviour = Behaviour()
    active: ModelRef | None = None
    previous: ModelRef | None = None
    memory_mb: int | None = 256
    agent_version: str = "sim-1"
    claim_region: str | None = None
    claim_device_type: str | None = None
    commands: list[Command] = field(default_factory=list)
    sent: list[DeviceEvent] = field(default_factory=list)
    refused_topics: list[str] = field(default_factory=list)
    connection_lost: asyncio.Event = field(default_factory=asyncio.Event)
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None
    _later: set[asyncio.Task[None]] = field(default_factory=set)
    _answers: dict[str, DeviceEvent] = field(default_factory=dict)
    _cancelled: set[str] = field(default_factory=set)

    # ------------------------------------------------------------ what it received

    @property
    def deploys(self) -> list[DeployCommand]:
        return [c for c in self.commands if isinstance(c, DeployCommand)]

    @property
    def cancels(self) -> list[CancelCommand]:
        return [c for c in self.commands if isinstance(c, CancelCommand)]

    @property
    def connected(self) -> bool:
        return self._client is not None and not self.connection_lost.is_set()

    # ------------------------------------------------------------ session

    def state(self, *, online: bool, with_models: bool = True) -> DeviceState:
        return DeviceState(
            device_id=self.device_id,
            region=self.claim_region or self.region,
            device_type=self.claim_device_type or self.device_type,
            capabilities=Capabilities(memory_mb=self.memory_mb, cpu_count=1, runtime="sim"),
            online=online,
            active=self.active if with_models else None,
            standby=self.previous if with_models else None,
            agent_version=self.agent_version,
        )

    async def start(self) -> SimDevice:
        """Connect (resuming the broker session if there is one), subscribe, say online."""
        will = aiomqtt.Will(
            topics.device_state(self.device_id),
            self.state(online=False, with_models=False).to_wire(),
            qos=1,
            retain=True,
        )
        client = make_client(
            self.endpoint, identifier=self.device_id, will=will, persistent_session=True
        )
        await client.__aenter__()
        self._client = client
        self.connection_lost.clear()
        # Queued commands of a resumed session may arrive before these subscribe calls return.
        self._reader = asyncio.create_task(self._read(client), name=f"sim-{self.device_id}")
        for topic in (topics.device_cmd(self.device_id), topics.region_cmd(self.region)):
            if refused_code(await client.subscribe(topic, qos=1)) is not None:
                self.refused_topics.append(topic)
        await self.publish_state()
        return self

    async def go_offline(self, *, say_goodbye: bool = True) -> None:
        """Leave the broker, keeping the session (queued QoS 1 commands wait for us)."""
        for task in self._later:
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)
        self._later.clear()
        client, self._client = self._client, None
        if client is None:
            return
        if say_goodbye and not self.connection_lost.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2):
                    await client.publish(
                        topics.device_state(self.device_id),
                        self.state(online=False).to_wire(),
                        qos=1,
                        retain=True,
                    )
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)

    async def come_back(self) -> SimDevice:
        """Reconnect with the same client id and no clean start."""
        await self.go_offline()
        return await self.start()

    async def __aenter__(self) -> SimDevice:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.go_offline()

    async def publish_state(self) -> None:
        client = self._client
        if client is not None:
            await client.publish(
                topics.device_state(self.device_id),
                self.state(online=True).to_wire(),
                qos=1,
                retain=True,
            )

    async def wait_for(self, kind: str, within_s: float = 15.0, count: int = 1) -> list[Command]:
        """Until `count` commands of `kind` have arrived; those commands."""
        async with asyncio.timeout(within_s):
            while len(got := [c for c in self.commands if c.kind == kind]) < count:
                await asyncio.sleep(0.05)
        return got

    # ------------------------------------------------------------ commands

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                if not isinstance(message.payload, bytes):
                    continue
                try:
                    command = COMMAND.validate_json(message.payload)
                except ValueError:
                    continue
                selector = command.selector
                if message.topic.value != topics.device_cmd(self.device_id) and not (
                    selector is None
                    or selector.matches(
                        device_id=self.device_id,
                        device_type=self.device_type,
                        memory_mb=self.memory_mb,
                    )
                ):
                    continue
                self.commands.append(command)
                await self._handle(command)
        except aiomqtt.MqttError:
            self.connection_lost.set()

    async def _handle(self, command: Command) -> None:
        if isinstance(command, CancelCommand):
            if command.rollout_id:
                self._cancelled.add(command.rollout_id)
            return
        answered = self._answers.get(command.command_id)
        if answered is not None:  # a re-send: the same answer again, the work once
            await self._emit(answered)
            return
        if isinstance(command, DeployCommand):
            if self.behaviour.deploy == "silent":
                return
            await self._emit(self._event(command, "received"))
            if self.behaviour.deploy == "fail":
                final = self._event(command, "failed", reason=self.behaviour.fail_reason)
                await self._finish(command, final, None)
            else:
                m = command.manifest.unverified()
                ref = ModelRef(name=m.name, version=m.version, sha256=m.sha256)
                await self._finish(command, self._event(command, "activated", model=ref), ref)
        elif isinstance(command, RollbackCommand):
            await self._emit(self._event(command, "received"))
            if self.previous is None:
                final = self._event(command, "failed", reason="not_resident")
                await self._finish(command, final, None)
            else:
                back = self.previous
                await self._finish(command, self._event(command, "rolled_back", model=back), back)

    async def _finish(self, command: Command, final: DeviceEvent, runs: ModelRef | None) -> None:
        """Send the final answer now, or `answer_after_s` later (in the background)."""
        if self.behaviour.answer_after_s <= 0:
            await self._conclude(command, final, runs)
            return

        async def later() -> None:
            await asyncio.sleep(self.behaviour.answer_after_s)
            await self._conclude(command, final, runs)

        task = asyncio.create_task(later())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _conclude(self, command: Command, final: DeviceEvent, runs: ModelRef | None) -> None:
        if (
            self.behaviour.honour_cancel
            and command.rollout_id in self._cancelled
            and not isinstance(command, RollbackCommand)
        ):
            final = self._event(command, "failed", reason="cancelled")
            runs = None
        if runs is not None and runs != self.active:
            self.previous, self.active = self.active, runs
        self._answers[command.command_id] = final
        await self._emit(final)
        await self.publish_state()

    def _event(
        self,
        command: Command,
        phase: EventPhase,
        *,
        reason: str | None = None,
        model: ModelRef | None = None,
    ) -> DeviceEvent:
        return DeviceEvent(
            device_id=self.device_id,
            command_id=command.command_id,
            rollout_id=command.rollout_id,
            phase=phase,
            reason=reason,
            model=model,
        )

    async def _emit(self, event: DeviceEvent) -> None:
        client = self._client
        if client is not None:
            await client.publish(topics.device_events(self.device_id), event.to_wire(), qos=1)
            self.sent.append(event)


def sim_device(
    broker: Mosquitto,
    device_id: str,
    region: str = "eu-west",
    device_type: str = "camera",
    **kw: Any,
) -> SimDevice:
    """A SimDevice logged in with `device_id`'s own credentials (provisioned on first use)."""
    endpoint = device_endpoint(broker, device_id, region, device_type)
    return SimDevice(endpoint, device_id, region, device_type, **kw)


@contextlib.asynccontextmanager
async def sim_fleet(
    broker: Mosquitto, devices: Sequence[tuple[str, str, str]], **kw: Any
) -> AsyncIterator[list[SimDevice]]:
    """Every `(id, region, type)` as a connected SimDevice (same options) for the block."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(sim_device(broker, d, r, t, **kw))
            for d, r, t in devices
        ]
