"""The edge agent: one device's MQTT session, command handling and model lifecycle.

`Agent.run` restores the last active model from the data directory and serves
it before anything touches the network, then keeps an MQTT 5 session (client id
= device id, persistent session, a retained `state` with a last will saying
`online: false`, jittered capped backoff on reconnect). Commands from the
device's and its region's `cmd` topics are queued and handled one at a time:

    deploy:   received → verify manifest → check its interface against the
              active model's → downloading → verify bytes → load into
              standby + warm up → verified → swap → health probes →
              activated (or rolled_back / failed with a reason code)
    rollback: swap back to the resident previous model → rolled_back

With controller keys configured, a command must carry the controller's
signature over its topic and payload (`shared.command_auth`); a command that
is unsigned, badly signed, expired or issued in the future is refused with a
`failed` event naming the reason, before any work. A duplicate `command_id`
does the work once (the final event is sent again, so a restarted controller
gets its answer); ids are remembered until their command expires, so a replay
never runs again. A deploy below the highest version activated for that model
is refused (`downgrade`) unless the signed command allows it; a deploy of the
active model answers `activated` at once. A candidate whose tensor interface
differs from the active model's is refused (`incompatible`, naming the first
differing tensor) before it is downloaded, unless its manifest or the command
allows the interface change.

Telemetry and shadow mode read every input and output of a call
(`runtime.Observer`, `runtime.Mirror`), by the task of each model's manifest
(`shared.tasks.effective_task`), registered with telemetry as the model loads.
Network, disk and thread I/O around the pure checks of `verify`,
`shared.command_auth` and the runtime of `runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import overload

import aiomqtt
import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_agent.faults import crash_point
from edge_agent.fetch import FetchLimits, UrlExpiredError, fetch_artifact
from edge_agent.health import health_problem
from edge_agent.metrics import AgentMetrics
from edge_agent.runtime import (
    DoubleBufferedRuntime,
    HealthSample,
    Inputs,
    ModelSlot,
    NoModelError,
    Outputs,
)
from edge_agent.shadow import ShadowMirror
from edge_agent.store import UNEXPIRING_COMMAND_KEEP_S, CommandRecord, ModelStore, StoreState
from edge_agent.telemetry import TelemetryRecorder
from edge_agent.verify import (
    raised_floor,
    verify_digest,
    verify_interface,
    verify_manifest,
    verify_not_downgrade,
    verify_size,
    verify_tensor_signature,
)
from edge_agent.workload import SyntheticWorkload
from shared import __version__, topics, tracing
from shared.command_auth import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    check_validity,
    signatures_in,
    verify_command,
)
from shared.errors import CommandAuthError, DownloadError, HotswapError
from shared.manifest import Manifest, ModelTask, TensorSignature, trusted_keyring
from shared.messages import (
    COMMAND,
    MAX_MESSAGE_BYTES,
    CancelCommand,
    Capabilities,
    Command,
    DeployCommand,
    DeviceEvent,
    DeviceState,
    EventPhase,
    ModelRef,
    RollbackCommand,
    SwitchCommand,
    utcnow,
)
from shared.mqtt import backoff_delays, make_client, raise_if_cancelled, refused_code
from shared.settings import MqttEndpoint
from shared.tasks import effective_task
from shared.tflite import RUNTIME_NAME, ModelBytes, c_api_loads

log = structlog.get_logger("hotswap.agent")

OUTBOX_LIMIT = 1000


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    region: str
    device_type: str
    data_dir: Path
    trusted_keys: tuple[Ed25519PublicKey, ...]
    mqtt: MqttEndpoint
    workload_hz: float = 0.0  # synthetic inferences per second; 0 = none
    telemetry_interval_s: float = 5.0
    memory_mb: int | None = None
    max_download_bytes: int = 512 * 1024 * 1024
    health_inferences: int = 5  # inferences a new model must serve well before `activated`
    health_window_s: float = 1.0  # how long to wait for live traffic to provide them
    max_latency_factor: float = 20.0  # a new model this much slower than the old is unhealthy
    keep_versions: int = 3  # stored versions per model name
    num_threads: int = 1  # threads inside each interpreter
    interpreters: int = 1  # interpreters per model: how many calls run in parallel
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)
    url_refresh_timeout_s: float = 30.0  # wait for the controller to re-presign an expired URL
    # The controller's command keys: when set, every command must carry a valid signature
    # from one of them (see shared.command_auth); when empty, commands are not authenticated.
    controller_keys: tuple[Ed25519PublicKey, ...] = ()
    # How far ahead of this device's clock a command's issue time may be.
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S

    def __post_init__(self) -> None:
        topics.check_ident(self.device_id, "device id")
        topics.check_ident(self.region, "region")
        topics.check_ident(self.device_type, "device type")
        if not self.trusted_keys:
            raise ValueError("an agent needs at least one trusted public key")
        if self.telemetry_interval_s <= 0:
            raise ValueError("telemetry interval must be positive")
        if self.workload_hz < 0:
            raise ValueError("workload rate must be >= 0")
        if self.interpreters < 1:
            raise ValueError("interpreters per model must be >= 1")
        if self.max_clock_skew_s < 0:
            raise ValueError("clock skew must be >= 0")


class Agent:
    def __init__(self, config: AgentConfig, *, metrics: AgentMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics  # counted only for a scraped agent (`--metrics-port`)
        self.log = log.bind(device_id=config.device_id)
        self._trusted = trusted_keyring(config.trusted_keys)
        self._controller_keys = trusted_keyring(config.controller_keys)
        self.telemetry = TelemetryRecorder(config.device_id, utcnow())
        observe = self.telemetry.observe
        self.runtime = DoubleBufferedRuntime(
            observer=metrics.observing(observe) if metrics else observe
        )
        if metrics is not None:
            metrics.follow(lambda: self.active)
        self.store = ModelStore(config.data_dir)
        self._state = StoreState()
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._outbox: deque[DeviceEvent] = deque(maxlen=OUTBOX_LIMIT)
        self._cancelled_rollouts: set[str] = set()
        self._url_waiters: dict[str, asyncio.Future[str]] = {}
        self._traces: dict[str, tuple[str | None, int | None]] = {}  # command id -> its trace
        self._rng = np.random.default_rng()
        self.connected = asyncio.Event()
        self.serving = asyncio.Event()

    # ------------------------------------------------------------ the application's API

    @overload
    def infer(self, inputs: np.ndarray) -> np.ndarray: ...
    @overload
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    @overload
    def infer(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]: ...
    def infer(self, inputs: Inputs) -> Outputs:
        """Run one inference on the active model (any thread; never blocked by a swap).

        One array for a single-input, single-output model gives one array; a
        sequence in input order gives a tuple in output order; a mapping by input
        name gives a dict by output name (`DoubleBufferedRuntime.infer`).
        """
        return self.runtime.infer(inputs)

    @property
    def active(self) -> ModelRef | None:
        slot = self.runtime.active
        return slot.ref if slot else None

    @property
    def standby(self) -> ModelRef | None:
        slot = self.runtime.standby
        return slot.ref if slot else None

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the stored model, then stay connected and handle commands until cancelled."""
        if not self._controller_keys:
            self.log.warning(
                "commands_not_authenticated",
                detail="no controller key configured: commands are accepted unsigned",
            )
        await asyncio.to_thread(self.restore)
        if self.runtime.active is not None:
            self.serving.set()
        workload = (
            SyntheticWorkload(
                self.runtime, self.infer, hz=self.config.workload_hz, name=self.config.device_id
            ).start()
            if self.config.workload_hz > 0
            else None
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._session_loop(), name=f"{self.config.device_id}-mqtt")
                tg.create_task(self._command_loop(), name=f"{self.config.device_id}-commands")
        finally:
            if workload is not None:
                workload.stop()
            self.connected.clear()

    def restore(self) -> None:
        """Load the stored active model (and the standby: staged, else previous), offline."""
        state = self.store.open()
        self.store.clean_downloads()

        def load(sha: str | None) -> ModelSlot | None:
            if sha is None:
                return None
            try:
                data, signed = self.store.read(sha)
                manifest = signed.unverified()
                slot = ModelSlot.load(_ref(manifest), data, num_threads=self.config.num_threads)
                self.telemetry.register(slot.ref, slot.signature, effective_task(manifest))
                slot.warm_up(self._rng)
                return slot
            except (HotswapError, ValueError, OSError) as exc:
                self.log.error("stored_model_unusable", sha256=sha, error=str(exc))
                return None

        before = (state.active, state.previous, state.staged)
        active = load(state.active)
        previous = load(state.previous)
        if active is None and previous is not None:  # the active file is gone or corrupt
            active, previous = previous, None
        staged = load(state.staged) if state.staged not in (None, state.active) else None
        state.active = active.ref.sha256 if active else None
        state.previous = previous.ref.sha256 if previous else None
        state.staged = staged.ref.sha256 if staged else None
        if active is not None:
            # A staged candidate (blue-green) waits in standby for its switch.
            self.runtime.restore(active, staged or previous)
            active.grow(self.config.interpreters)
            self.log.info("serving_stored_model", model=active.ref.ref)
        if (state.active, state.previous, state.staged) != before:
            self.store.write_state(state)
        self._state = state

    # ------------------------------------------------------------ MQTT session

    def _device_state(self, *, online: bool, with_models: bool = True) -> DeviceState:
        return DeviceState(
            device_id=self.config.device_id,
            region=self.config.region,
            device_type=self.config.device_type,
            capabilities=Capabilities(
                memory_mb=self.config.memory_mb, cpu_count=os.cpu_count(), runtime=RUNTIME_NAME
            ),
            online=online,
            active=self.active if with_models else None,
            standby=self.standby if with_models else None,
            agent_version=__version__,
        )

    async def _session_loop(self) -> None:
        cfg = self.config
        will = aiomqtt.Will(
            topics.device_state(cfg.device_id),
            # Fixed at connect time: it names no model rather than a stale one.
            self._device_state(online=False, with_models=False).to_wire(),
            qos=1,
            retain=True,
        )
        delays = backoff_delays()
        while True:
            try:
                async with make_client(
                    cfg.mqtt, identifier=cfg.device_id, will=will, persistent_session=True
                ) as client:
                    await self._on_connect(client)
                    raise_if_cancelled()  # one aiomqtt swallowed while connecting (see shared.mqtt)
                    delays = backoff_delays()
                    telemetry = asyncio.create_task(self._telemetry_loop(client))
                    try:
                        await self._receive(client)
                    except asyncio.CancelledError:
                        await self._say_goodbye(client)
                        raise
                    finally:
                        self._client = None
                        self.connected.clear()
                        telemetry.cancel()
                        await asyncio.gather(telemetry, return_exceptions=True)
            except aiomqtt.MqttError as exc:
                self._client = None
                self.connected.clear()
                delay = next(delays)
                self.log.warning("mqtt_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        for topic in (topics.device_cmd(cfg.device_id), topics.region_cmd(cfg.region)):
            refused = refused_code(await client.subscribe(topic, qos=1))
            if refused is not None:
                # Reconnecting would not change the broker's ACL: keep serving, say why
                # no command can arrive (a region that differs from the provisioned one?).
                self.log.error("subscription_refused", topic=topic, code=str(refused))
        self._client = client
        await self._publish_state()
        while self._outbox:
            await self._publish_event(client, self._outbox[0])
            self._outbox.popleft()
        self.connected.set()
        self.log.info("connected", broker=str(cfg.mqtt), model=self.active and self.active.ref)

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        """A clean disconnect discards the will, so say `online: false` ourselves."""
        offline = self._device_state(online=False)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(1.0):
                await client.publish(
                    topics.device_state(self.config.device_id),
                    offline.to_wire(),
                    qos=1,
                    retain=True,
                )

    async def _receive(self, client: aiomqtt.Client) -> None:
        own = topics.device_cmd(self.config.device_id)
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes) or len(payload) > MAX_MESSAGE_BYTES:
                self.log.warning("command_rejected", topic=topic, reason="bad_payload")
                continue
            try:
                command = COMMAND.validate_json(payload)
            except ValidationError as exc:
                self.log.warning(
                    "command_rejected", topic=topic, reason="malformed", error=str(exc)
                )
                continue
            if topic != own and not self._selected(command):
                continue
            raise_if_cancelled()
            try:
                self._authenticate(topic, payload, message, command)
            except CommandAuthError as exc:
                await self._refuse(command, exc)
                continue
            # Only an authenticated, fresh command may answer a waiting download.
            waiter = self._url_waiters.get(command.command_id)
            if isinstance(command, DeployCommand) and waiter is not None and not waiter.done():
                waiter.set_result(command.url)  # the answer to our url_expired event
                continue
            if isinstance(command, CancelCommand):
                if command.rollout_id:
                    self._cancelled_rollouts.add(command.rollout_id)
                    self.log.info("rollout_cancelled", rollout_id=command.rollout_id)
                continue
            if tracing.enabled():
                self._traces[command.command_id] = (
                    tracing.traceparent_of(message.properties),
                    time.time_ns(),
                )
            self._queue.put_nowait(command)

    def _authenticate(
        self, topic: str, payload: bytes, message: aiomqtt.Message, command: Command
    ) -> None:
        """The controller's signature over these exact bytes, then the validity window."""
        if self._controller_keys:
            props = getattr(message.properties, "UserProperty", None)
            verify_command(topic, payload, signatures_in(props), self._controller_keys)
        self._check_validity(command)

    def _check_validity(self, command: Command) -> None:
        check_validity(
            command.issued_at,
            command.expires_at,
            utcnow(),
            max_clock_skew_s=self.config.max_clock_skew_s,
            require_expiry=bool(self._controller_keys),
        )

    async def _refuse(self, command: Command, exc: CommandAuthError) -> DeviceEvent:
        """A command refused before any work: a warning, and a `failed` event with the reason."""
        self.log.warning(
            "command_refused",
            command_id=command.command_id,
            rollout_id=command.rollout_id,
            kind=command.kind,
            reason=exc.reason,
            error=str(exc),
        )
        event = self._event(command, "failed", reason=exc.reason, detail=str(exc))
        await self._emit(event)
        return event

    def _selected(self, command: Command) -> bool:
        s = command.selector
        return s is None or s.matches(
            device_id=self.config.device_id,
            device_type=self.config.device_type,
            memory_mb=self.config.memory_mb,
        )

    async def _telemetry_loop(self, client: aiomqtt.Client) -> None:
        topic = topics.device_telemetry(self.config.device_id)
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.config.telemetry_interval_s)
            for window in self.telemetry.drain(utcnow()):
                try:
                    await client.publish(topic, window.to_wire(), qos=0)
                except aiomqtt.MqttError:
                    return  # the session is going down; the receive loop reconnects

    async def _publish_state(self) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                topics.device_state(self.config.device_id),
                self._device_state(online=True).to_wire(),
                qos=1,
                retain=True,
            )

    async def _publish_event(self, client: aiomqtt.Client, event: DeviceEvent) -> None:
        await client.publish(
            topics.device_events(self.config.device_id),
            event.to_wire(),
            qos=1,
            properties=tracing.publish_properties(),  # the span the event belongs to
        )

    async def _emit(self, event: DeviceEvent) -> None:
        """Send an event now, or keep it until the next connection."""
        client = self._client
        if client is not None:
            try:
                await self._publish_event(client, event)
                return
            except aiomqtt.MqttError:
                pass
        self._outbox.append(event)

    # ------------------------------------------------------------ commands

    async def _command_loop(self) -> None:
        while True:
            raise_if_cancelled()
            command = await self._queue.get()
            trace = self._traces.pop(command.command_id, (None, None))
            attributes = {"hotswap.device_id": self.config.device_id,
                          "hotswap.command_id": command.command_id}  # fmt: skip
            try:
                with tracing.continued(command.kind, trace[0], trace[1], attributes):
                    await self.handle(command)
            except Exception:
                # A bug must not take the device down: it keeps serving what it has.
                self.log.exception("command_crashed", command_id=command.command_id)

    def _event(
        self,
        command: Command,
        phase: EventPhase,
        *,
        reason: str | None = None,
        detail: str | None = None,
        model: ModelRef | None = None,
    ) -> DeviceEvent:
        return DeviceEvent.answering(
            command, self.config.device_id, phase, reason=reason, detail=detail, model=model
        )

    async def handle(self, command: Command) -> DeviceEvent | None:
        """Carry out one command as if it came from the broker; the final event, or None.

        Used by the command loop; also the entry point for embedding the agent
        without MQTT (benchmarks, an application's own control channel).
        """
        bound = self.log.bind(command_id=command.command_id, rollout_id=command.rollout_id)
        try:
            self._check_validity(command)  # again: it may have expired while queued
        except CommandAuthError as exc:
            return await self._refuse(command, exc)
        until = (
            command.expires_at.timestamp()
            if command.expires_at is not None
            else time.time() + UNEXPIRING_COMMAND_KEEP_S
        )
        record = self._state.commands.get(command.command_id)
        if record is not None:
            bound.info("command_duplicate", answered=record.answer is not None)
            if until > record.expires_at:  # a controller's re-send: remember it as long
                self._state.commands[command.command_id] = CommandRecord(record.answer, until)
                if record.answer is not None:  # (an open one is written when it ends)
                    await asyncio.to_thread(self.store.write_state, self._state)
            if record.answer is None:
                return None
            event = DeviceEvent.model_validate_json(record.answer)
            await self._emit(event)
            return event
        self._state.commands[command.command_id] = CommandRecord(None, until)
        await self._emit(self._event(command, "received"))
        started = time.perf_counter()
        try:
            if isinstance(command, DeployCommand):
                final = await self._deploy(command, bound)
            elif isinstance(command, RollbackCommand):
                final = await self._rollback(command)
            elif isinstance(command, SwitchCommand):
                final = await self._switch(command)
            else:  # cancel is handled on receipt
                return None
        except HotswapError as exc:
            bound.warning("command_failed", reason=exc.reason, error=str(exc))
            final = self._event(command, "failed", reason=exc.reason, detail=str(exc))
        except Exception as exc:
            bound.exception("command_failed", reason="internal_error")
            final = self._event(command, "failed", reason="internal_error", detail=repr(exc))
        self._state.commands[command.command_id] = CommandRecord(
            final.model_dump_json(by_alias=True), until
        )
        if self.metrics is not None:
            self.metrics.command_done(command.kind, final)
        # Pointers and the answer reach the disk before the controller hears of them.
        await asyncio.to_thread(self.store.write_state, self._state)
        crash_point("committed")
        await self._emit(final)
        await self._publish_state()
        bound.info(
            "command_done",
            phase=final.phase,
            reason=final.reason,
            model=self.active and self.active.ref,
            ms=round((time.perf_counter() - started) * 1e3, 1),
        )
        return final

    async def _deploy(self, command: DeployCommand, bound: structlog.BoundLogger) -> DeviceEvent:
        with tracing.span("verify"):
            manifest = verify_manifest(
                command.manifest, self._trusted, device_type=self.config.device_type
            )
        ref = _ref(manifest)
        self._check_not_cancelled(command)
        active, standby = self.runtime.active, self.runtime.standby
        if active is not None and active.ref.sha256 == manifest.sha256:
            return self._event(command, "activated", model=active.ref, detail="already active")
        # Anti-rollback, before any download: a signed but older manifest is a replay
        # of an outdated model unless the controller's signed command says otherwise.
        verify_not_downgrade(manifest, self._state.highest, allow_downgrade=command.allow_downgrade)
        active_sig = active.signature if active else None
        # The signed interface against the served one, before any download or load.
        allow_change = command.allow_interface_change
        verify_interface(manifest, active_sig, allow_interface_change=allow_change)
        if standby is not None and standby.ref.sha256 == manifest.sha256:
            slot = standby  # still resident: no download, no load
            verify_tensor_signature(
                manifest, slot.signature, active_sig, allow_interface_change=allow_change
            )
        else:
            slot = await self._obtain(command, manifest, active_sig, bound)
        self._check_not_cancelled(command)
        if not command.activate:
            # Blue-green: loaded, warm, resident in standby; a switch makes it active.
            self.runtime.stage(slot)
            if command.shadow_s is None:
                self._state.staged = slot.ref.sha256  # survives a restart, for the switch
            if command.shadow_s is not None:
                self._start_shadow(slot, command.shadow_s, effective_task(manifest))
                return self._event(
                    command, "staged", model=ref, detail=f"shadowing for {command.shadow_s:g}s"
                )
            return self._event(command, "staged", model=ref)
        await self._emit(self._event(command, "verified", model=ref))
        return await self._activate(command, slot, active, standby)

    def _start_shadow(self, slot: ModelSlot, seconds: float, task: ModelTask) -> None:
        """Mirror live inputs to `slot` for `seconds`; its outputs are never served."""
        previous = self.runtime.shadow
        if isinstance(previous, ShadowMirror):
            previous.stop()

        def ended(mirror: ShadowMirror) -> None:
            if self.runtime.shadow is mirror:
                self.runtime.shadow = None
            self.log.info("shadow_ended", model=mirror.slot.ref.ref, skipped=mirror.skipped)

        active = self.runtime.active
        self.runtime.shadow = ShadowMirror(
            slot,
            seconds=seconds,
            observer=self.telemetry.observe_shadow,
            task=task,
            served=active.signature if active is not None else None,
            on_end=ended,
        ).start()
        self.log.info("shadow_started", model=slot.ref.ref, seconds=seconds)

    async def _switch(self, command: SwitchCommand) -> DeviceEvent:
        """Blue-green flip: the staged standby becomes active by one reference swap."""
        active, standby = self.runtime.active, self.runtime.standby
        if active is not None and active.ref.sha256 == command.to.sha256:
            return self._event(command, "activated", model=active.ref, detail="already active")
        if standby is None or standby.ref.sha256 != command.to.sha256:
            raise HotswapError(
                f"{command.to.ref} is not staged on this device", reason="not_staged"
            )
        return await self._activate(command, standby, active, None)

    async def _obtain(
        self,
        command: DeployCommand,
        manifest: Manifest,
        active_sig: TensorSignature | None,
        bound: structlog.BoundLogger,
    ) -> ModelSlot:
        """Bytes from the store or the URL, verified, loaded into a warm standby slot.

        Nothing is stored until every check passed, the tensor signature included.
        """
        if manifest.size > self.config.max_download_bytes:
            raise DownloadError(
                f"{manifest.ref} is {manifest.size} bytes, over this device's limit of "
                f"{self.config.max_download_bytes}",
                reason="too_large",
            )
        if not self.store.has(manifest.sha256):
            await self._emit(self._event(command, "downloading", model=_ref(manifest)))
            dest = self.store.download_path(manifest.sha256)
            started = time.perf_counter()
            try:
                url = command.url
                while True:
                    try:
                        download = fetch_artifact(
                            url,
                            dest,
                            size=manifest.size,
                            sha256=manifest.sha256,
                            limits=download_limits(
                                self.config.fetch_limits, command.expires_at, utcnow()
                            ),
                            logger=bound,
                        )
                        await tracing.timed("download", download, bytes=manifest.size)
                        break
                    except UrlExpiredError:
                        if url != command.url:
                            raise  # a fresh URL refused too: give up
                        url = await self._fresh_url(command)
                crash_point("downloaded")
                # fetch_artifact hashed the file against the signed sha256 (IntegrityError
                # otherwise): hashing the same bytes again would only cost time.
                slot = await asyncio.to_thread(
                    self._load_file, manifest, dest, active_sig, command.allow_interface_change
                )
                crash_point("verified")
                await asyncio.to_thread(self.store.adopt, command.manifest, manifest, dest)
                crash_point("stored")
            finally:
                dest.unlink(missing_ok=True)
            bound.info(
                "downloaded", model=manifest.ref, bytes=manifest.size,
                ms=round((time.perf_counter() - started) * 1e3, 1),
            )  # fmt: skip
            return slot
        # Stored files were verified (sha256) before they entered the store, are only
        # ever written atomically, and are re-hashed when the agent starts; a hot deploy
        # from the store checks the size and skips the digest (16 ms for 10 MB here).
        return await asyncio.to_thread(
            self._load_stored, manifest, active_sig, command.allow_interface_change
        )

    def _load_stored(
        self,
        manifest: Manifest,
        active_sig: TensorSignature | None,
        allow_interface_change: bool = False,
    ) -> ModelSlot:
        path = self.store.model_path(manifest.sha256)
        return self._load_file(manifest, path, active_sig, allow_interface_change)

    def _load_file(
        self,
        manifest: Manifest,
        path: Path,
        active_sig: TensorSignature | None,
        allow_interface_change: bool = False,
    ) -> ModelSlot:
        """Size, load + warm-up, tensor signature: one worker-thread hop for all of it
        (each hop costs milliseconds of hand-over when inference threads keep the cores
        busy). Where the LiteRT C API loads it, the file is mapped, not read: LiteRT reads
        the weights in place, a copy of the whole file less (the mapping stays valid when
        the file is replaced or pruned; the store never writes a model file in place).
        The Python binding takes bytes only and would copy a mapping per interpreter."""
        with path.open("rb") as f:
            verify_size(manifest, os.fstat(f.fileno()).st_size)
            data: ModelBytes = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if c_api_loads(num_threads=self.config.num_threads)
                else f.read()
            )
        slot = self._load(manifest, data)
        verify_tensor_signature(
            manifest, slot.signature, active_sig, allow_interface_change=allow_interface_change
        )
        return slot

    async def _fresh_url(self, command: DeployCommand) -> str:
        """Ask the controller (through the events topic) for a new presigned URL.

        The controller answers with the same command, same id, fresh URL; the
        partial download is kept and resumed from where it stopped.
        """
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._url_waiters[command.command_id] = future
        try:
            await self._emit(self._event(command, "downloading", reason="url_expired"))
            async with asyncio.timeout(self.config.url_refresh_timeout_s):
                return await future
        except TimeoutError:
            raise UrlExpiredError(
                f"the artifact URL expired and no fresh one came within "
                f"{self.config.url_refresh_timeout_s:g}s"
            ) from None
        finally:
            self._url_waiters.pop(command.command_id, None)

    def _load(self, manifest: Manifest, data: ModelBytes) -> ModelSlot:
        with tracing.span("load"):
            slot = ModelSlot.load(_ref(manifest), data, num_threads=self.config.num_threads)
        self.telemetry.register(slot.ref, slot.signature, effective_task(manifest))
        active = self.runtime.active
        # Warmed up on the shapes the application uses (dynamic dimensions), where the
        # interface is the served one: its first interpreter is then sized for them.
        same = active is not None and active.signature.inputs == slot.signature.inputs
        with tracing.span("warm-up"):
            slot.warm_up(self._rng, shapes=active.sample_shapes if active and same else None)
        return slot

    def _check_not_cancelled(self, command: Command) -> None:
        if command.rollout_id and command.rollout_id in self._cancelled_rollouts:
            raise HotswapError("the rollout was cancelled", reason="cancelled")

    async def _activate(
        self,
        command: Command,
        slot: ModelSlot,
        old_active: ModelSlot | None,
        old_standby: ModelSlot | None,
    ) -> DeviceEvent:
        """Swap `slot` in, watch it serve, keep it (activated) or swap back (rolled_back)."""
        before = slot.stats.snapshot()
        baseline = old_active.stats.snapshot() if old_active else None
        with tracing.span("swap"):
            self.runtime.activate(slot)
        crash_point("swapped")
        # More interpreters for parallel callers, built while the new model serves on its
        # first one and is watched: the stretch where every caller waits for that one
        # interpreter (so one slow call pauses them all) ends as early as it can.
        problem, grown = await asyncio.gather(
            tracing.timed("health confirmation", self._watch(slot, before, old_active, baseline)),
            asyncio.to_thread(slot.grow, self.config.interpreters),
            return_exceptions=True,
        )
        if isinstance(problem, BaseException):
            # The watch itself broke: serve what the pointers on disk say, then fail.
            self.runtime.restore(old_active, old_standby)
            raise problem
        if isinstance(grown, BaseException):
            # The new model serves on the interpreters it has; fewer parallel calls only.
            self.log.error("interpreter_pool_not_grown", model=slot.ref.ref, error=repr(grown))
        if problem is not None:
            self.runtime.restore(old_active, old_standby)
            if self._state.staged == slot.ref.sha256:
                self._state.staged = None  # an unhealthy candidate is not kept for later
            phase: EventPhase = "rolled_back" if old_active is not None else "failed"
            return self._event(
                command,
                phase,
                reason="unhealthy",
                detail=problem,
                model=old_active.ref if old_active else None,
            )
        self._set_pointers(slot, old_active)
        await asyncio.to_thread(
            self.store.prune,
            self.config.keep_versions,
            (self._state.active, self._state.previous),
        )
        return self._event(command, "activated", model=slot.ref)

    def _set_pointers(self, active: ModelSlot, previous: ModelSlot | None) -> None:
        self._state.staged = None  # whatever was staged is either active now or replaced
        self._state.active = active.ref.sha256
        self._state.previous = previous.ref.sha256 if previous and previous is not active else None
        self._state.highest = raised_floor(self._state.highest, active.ref.name, active.ref.version)

    async def _watch(
        self,
        slot: ModelSlot,
        before: HealthSample,
        previous: ModelSlot | None,
        baseline: HealthSample | None,
    ) -> str | None:
        """Judge the new model on its first live inferences ("serving confirmed").

        With live traffic (the previous model served within the last few
        seconds) the agent waits up to `health_window_s` for
        `health_inferences` real calls; what traffic does not provide, probe
        inferences on random inputs make up.
        """
        cfg = self.config
        want = max(1, cfg.health_inferences)
        live = baseline is not None and time.monotonic() - baseline.last_at < 5.0
        if live:
            deadline = time.monotonic() + cfg.health_window_s
            # Counts arrive from inference threads: a 5 ms poll beats a wake-up per call.
            while slot.stats.since(before).count < want and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        observed = slot.stats.since(before)
        if observed.count < want:
            observed = await asyncio.to_thread(self._probe, slot, want - observed.count, observed)
        if previous is not None and (baseline is None or len(baseline.latencies_ms) < want):
            baseline = await asyncio.to_thread(self._probe, previous, want, HealthSample())
        return health_problem(observed, baseline, max_latency_factor=cfg.max_latency_factor)

    def _probe(self, slot: ModelSlot, n: int, sample: HealthSample) -> HealthSample:
        """`sample` plus `n` inferences on random inputs run directly on `slot`."""
        errors, nonfinite, malformed = sample.errors, sample.nonfinite, sample.malformed
        latencies, problem = list(sample.latencies_ms), sample.problem
        for _ in range(n):
            xs = slot.sample_inputs(self._rng)
            t0 = time.perf_counter()
            try:
                outs = slot.run(xs)
            except (RuntimeError, ValueError):
                errors += 1
                continue
            bad = slot.output_problem(outs)
            if bad is None:
                latencies.append((time.perf_counter() - t0) * 1e3)
                continue
            problem = bad.detail
            if bad.nonfinite:
                nonfinite += 1
            else:
                malformed += 1
        return HealthSample(
            sample.count + n,
            errors,
            nonfinite,
            tuple(latencies),
            time.monotonic(),
            malformed,
            problem,
        )

    async def _rollback(self, command: RollbackCommand) -> DeviceEvent:
        active, standby = self.runtime.active, self.runtime.standby
        target = command.to
        if active is not None and target is not None and target.sha256 == active.ref.sha256:
            return self._event(command, "rolled_back", model=active.ref, detail="already active")
        if standby is not None and (target is None or target.sha256 == standby.ref.sha256):
            with tracing.span("swap"):  # the resident standby back in: one reference swap
                self.runtime.swap_back()
            self._set_pointers(standby, active)
            return self._event(command, "rolled_back", model=standby.ref)
        if target is not None and self.store.has(target.sha256):
            data, signed = await asyncio.to_thread(self.store.read, target.sha256)
            with tracing.span("verify"):
                # Still signed by a trusted key (a removed key's models are not rolled back to).
                manifest = verify_manifest(
                    signed, self._trusted, device_type=self.config.device_type
                )
                # The file (hashed by read) is the signed one.
                verify_digest(manifest, target.sha256)
            slot = await asyncio.to_thread(self._load, manifest, data)  # load, warm-up spans
            verify_tensor_signature(manifest, slot.signature, active.signature if active else None)
            with tracing.span("swap"):
                self.runtime.activate(slot)
            self._set_pointers(slot, active)
            return self._event(command, "rolled_back", model=slot.ref)
        raise NoModelError(
            "no resident or stored model to roll back to" + (f" ({target.ref})" if target else ""),
            reason="not_resident",
        )


def _ref(manifest: Manifest) -> ModelRef:
    return ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.sha256)


def download_limits(limits: FetchLimits, expires_at: datetime | None, now: datetime) -> FetchLimits:
    """`limits` with the download budget cut to the time the command has left.

    The controller sets a deploy's expiry at about its device timeout; retrying
    past it would only keep a device busy with a command nobody waits for.
    """
    if expires_at is None:
        return limits
    left = (expires_at - now).total_seconds()
    if left <= 0:
        raise DownloadError(
            f"the command expired at {expires_at.isoformat()} before its download was done",
            reason="command_expired",
        )
    return limits.within(left)
