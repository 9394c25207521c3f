"""The fleet benchmark's simulated devices: many light MQTT 5 sessions per worker process.

Each `Device` is one device of the fleet with its own broker login and
session (client id = device id, persistent session, keepalive), speaking the
wire contract as `edge_agent.agent.Agent` does:

* a retained `DeviceState` on its state topic, with a last will saying
  `online: false` (no models named), republished after every change, and
  `online: false` said by itself on a clean stop;
* subscribed to its device cmd topic and its region cmd topic; a command from
  the region topic is taken only if its `selector` matches the device (device
  type, memory, cohort), exactly as the agent's `_selected`; one from its own
  topic always;
* commands parsed with the contract's `COMMAND` adapter (over-large or
  malformed ones ignored), refused with `failed` when outside their validity
  window (`command_expired`, `command_not_yet_valid`, `command_no_expiry`);
  with `verify_signatures` the controller's signature is checked too
  (`command_unsigned`, …);
* one command at a time per device; a duplicate `command_id` is not done
  again: its final answer is sent again (nothing while it is still open);
* deploy: `received` → `downloading` → `verified` → `activated` (the new model
  active, the old one the resident previous); a deploy of the active model
  answers `activated` at once; `activate: false` answers `staged` (shadow too);
  a deploy of a cancelled rollout answers `failed`/`cancelled`;
* switch: the staged model becomes active (`activated`), else `failed`/`not_staged`;
* rollback: back to the resident previous model (or `to`), `rolled_back`,
  else `failed`/`not_resident`;
* cancel: the rollout's later work is refused (`cancelled`);
* a telemetry window (`TelemetryWindow`, QoS 0) of its active model every
  `telemetry_interval_s`: plausible counts, a log-normal latency histogram,
  confidences around 0.8 (or, for a version marked degraded, 8 times the latency
  and errors), with the latency and confidence sketches today's agents send, and
  bursts on request for the ingest benchmark.

What it skips, and says so: the download (no HTTP request to the presigned
URL), the manifest's signature and digest, the anti-rollback and interface
checks, the interpreter, warm-up and health watch, the model store on disk.
By default it also skips the command signature check (`verify_signatures`
turns it on). So it measures the control plane: broker, controller, database.

`worker_main(conn)` is a worker process's entry point: it reads requests
(dicts with an `op`) from a `multiprocessing` connection and answers each with
one dict. Does network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from shared import topics
from shared.command_auth import check_validity, signatures_in, verify_command
from shared.errors import CommandAuthError
from shared.messages import (
    COMMAND,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    MAX_MESSAGE_BYTES,
    CancelCommand,
    Capabilities,
    Command,
    DeployCommand,
    DeviceEvent,
    DeviceState,
    EventPhase,
    Histogram,
    ModelRef,
    RollbackCommand,
    SwitchCommand,
    TelemetryWindow,
)
from shared.mqtt import backoff_delays, make_client, refused_code
from shared.settings import MqttEndpoint
from shared.sketch import QuantileSketch, SketchData

AGENT_VERSION = "fleet-sim-1"
MEMORY_MB = 512


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (every session is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- telemetry data


@dataclass(frozen=True, slots=True)
class WindowShape:
    count: int
    errors: int
    latency: Histogram
    confidence: Histogram
    # The same calls at high resolution, as today's agents send them (`shared.sketch`)
    latency_sketch: SketchData
    confidence_sketch: SketchData

    def window(self, device_id: str, model: ModelRef, seconds: float) -> TelemetryWindow:
        """This shape as a device's window of `model`, ending now."""
        end = datetime.now(UTC)
        return TelemetryWindow(
            device_id=device_id,
            model=model,
            window_start=end - timedelta(seconds=seconds),
            window_end=end,
            count=self.count,
            errors=self.errors,
            latency_ms=self.latency,
            confidence=self.confidence,
            latency_sketch=self.latency_sketch,
            confidence_sketch=self.confidence_sketch,
            task="classifier:output",
        )


def _bucket(value: float, bounds: tuple[float, ...]) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds) - 1


def window_shapes(rng: random.Random, n: int, *, degraded: bool) -> list[WindowShape]:
    """`n` plausible windows: ~50 inferences, latency log-normal around 3 ms (24 ms and
    5% errors when degraded), confidence around 0.8."""
    shapes = []
    median_ms = 24.0 if degraded else 3.0
    for _ in range(n):
        count = rng.randint(40, 60)
        errors = sum(rng.random() < (0.05 if degraded else 0.001) for _ in range(count))
        lat = [0] * len(LATENCY_BUCKETS_MS)
        conf = [0] * len(CONFIDENCE_BUCKETS)
        lat_total = conf_total = 0.0
        lat_values, conf_values = [], []
        for _ in range(count - errors):
            ms = rng.lognormvariate(0.0, 0.35) * median_ms
            lat[_bucket(ms, LATENCY_BUCKETS_MS)] += 1
            lat_total += ms
            lat_values.append(ms)
            c = min(1.0, max(0.0, rng.gauss(0.8, 0.08)))
            conf[_bucket(c, CONFIDENCE_BUCKETS)] += 1
            conf_total += c
            conf_values.append(c)
        lat_sketch, conf_sketch = QuantileSketch.latency(), QuantileSketch.confidence()
        lat_sketch.add(lat_values)
        conf_sketch.add(conf_values)
        shapes.append(
            WindowShape(
                count,
                errors,
                Histogram(counts=tuple(lat), total=lat_total),
                Histogram(counts=tuple(conf), total=conf_total),
                lat_sketch.to_data(),
                conf_sketch.to_data(),
            )
        )
    return shapes


# ---------------------------------------------------------------- one device


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    device_id: str
    region: str
    device_type: str
    username: str
    password: str


@dataclass
class Device:
    spec: DeviceSpec
    worker: Worker
    active: ModelRef | None
    previous: ModelRef | None = None
    staged: ModelRef | None = None
    client: aiomqtt.Client | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    answers: dict[str, DeviceEvent] = field(default_factory=dict)
    open_commands: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)
    stopping: bool = False

    # ------------------------------------------------------------ session

    def state(self, *, online: bool, with_models: bool = True) -> DeviceState:
        return DeviceState(
            device_id=self.spec.device_id,
            region=self.spec.region,
            device_type=self.spec.device_type,
            capabilities=Capabilities(memory_mb=MEMORY_MB, cpu_count=1, runtime="fleet-sim"),
            online=online,
            active=self.active if with_models else None,
            standby=(self.staged or self.previous) if with_models else None,
            agent_version=AGENT_VERSION,
        )

    def endpoint(self) -> MqttEndpoint:
        w = self.worker
        return MqttEndpoint(w.host, w.port, False, self.spec.username, self.spec.password)

    async def run(self) -> None:
        """Stay connected (reconnecting with jittered backoff) until `stopping`."""
        spec = self.spec
        will = aiomqtt.Will(
            topics.device_state(spec.device_id),
            self.state(online=False, with_models=False).to_wire(),
            qos=1,
            retain=True,
        )
        delays = backoff_delays()
        first = True  # no connection yet: a failure is a connect failure, not a disconnect
        while not self.stopping:
            was_connected = False
            client = make_client(
                self.endpoint(),
                identifier=spec.device_id,
                will=will,
                persistent_session=True,
                timeout=60.0,
                max_queued_incoming=None,
            )
            try:
                async with self.worker.connecting:
                    await client.__aenter__()
                was_connected = True
                try:
                    cmds = (topics.device_cmd(spec.device_id), topics.region_cmd(spec.region))
                    for topic in cmds:
                        if refused_code(await client.subscribe(topic, qos=1)) is not None:
                            self.worker.stats["subscription_refused"] += 1
                    self.client = client
                    await self.publish_state()
                    self.connected.set()
                    self.worker.stats["connects"] += 1
                    if not first:
                        self.worker.stats["reconnects"] += 1
                    first = False
                    delays = backoff_delays()
                    await self._read(client)
                finally:
                    self.client = None
                    self.connected.clear()
                    if self.stopping:
                        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                            async with asyncio.timeout(5):
                                await client.publish(
                                    topics.device_state(spec.device_id),
                                    self.state(online=False).to_wire(),
                                    qos=1,
                                    retain=True,
                                )
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.__aexit__(None, None, None)
            except aiomqtt.MqttError as exc:
                if self.stopping:
                    return
                if was_connected:
                    self.worker.stats["unplanned_disconnects"] += 1
                else:
                    self.worker.stats["connect_failures"] += 1
                self.worker.last_error = f"{spec.device_id}: {exc}"
                await asyncio.sleep(next(delays))

    async def publish_state(self) -> None:
        client = self.client
        if client is not None:
            await client.publish(
                topics.device_state(self.spec.device_id),
                self.state(online=True).to_wire(),
                qos=1,
                retain=True,
            )

    # ------------------------------------------------------------ commands

    async def _read(self, client: aiomqtt.Client) -> None:
        own = topics.device_cmd(self.spec.device_id)
        async for message in client.messages:
            if self.stopping:
                return
            payload = message.payload
            if not isinstance(payload, bytes) or len(payload) > MAX_MESSAGE_BYTES:
                self.worker.stats["commands_rejected"] += 1
                continue
            try:
                command = COMMAND.validate_json(payload)
            except ValidationError:
                self.worker.stats["commands_rejected"] += 1
                continue
            topic = message.topic.value
            via = "device" if topic == own else "region"
            selector = command.selector
            if via == "region" and not (
                selector is None
                or selector.matches(
                    device_id=self.spec.device_id,
                    device_type=self.spec.device_type,
                    memory_mb=MEMORY_MB,
                )
            ):
                self.worker.stats["region_commands_not_selected"] += 1
                continue
            self.worker.commands[(command.kind, via)] += 1
            try:
                self._authenticate(topic, payload, message, command)
            except CommandAuthError as exc:
                self.worker.stats["commands_refused"] += 1
                await self._emit(self._event(command, "failed", reason=exc.reason))
                continue
            await self._handle(command)

    def _authenticate(
        self, topic: str, payload: bytes, message: aiomqtt.Message, command: Command
    ) -> None:
        keys = self.worker.controller_keys
        if keys:
            props = getattr(message.properties, "UserProperty", None)
            verify_command(topic, payload, signatures_in(props), keys)
        check_validity(
            command.issued_at, command.expires_at, datetime.now(UTC), require_expiry=bool(keys)
        )

    async def _handle(self, command: Command) -> None:
        if isinstance(command, CancelCommand):
            if command.rollout_id:
                self.cancelled.add(command.rollout_id)
            return
        cid = command.command_id
        answered = self.answers.get(cid)
        if answered is not None or cid in self.open_commands:
            self.worker.stats["duplicate_commands"] += 1
            if answered is not None:  # the same answer again, the work once
                self.worker.stats["answers_resent"] += 1
                await self._emit(answered)
            return
        self.open_commands.add(cid)
        await self._emit(self._event(command, "received"))
        if isinstance(command, DeployCommand):
            final = await self._deploy(command)
        elif isinstance(command, SwitchCommand):
            final = self._switch(command)
        else:
            final = self._rollback(command)
        self.open_commands.discard(cid)
        self.answers[cid] = final
        self.worker.final(final)
        await self._emit(final)
        await self.publish_state()

    def _cancelled(self, command: Command) -> bool:
        return bool(command.rollout_id and command.rollout_id in self.cancelled)

    async def _deploy(self, command: DeployCommand) -> DeviceEvent:
        m = command.manifest.unverified()
        ref = ModelRef(name=m.name, version=m.version, sha256=m.sha256)
        if self._cancelled(command):
            return self._event(command, "failed", reason="cancelled")
        if self.active is not None and self.active.sha256 == ref.sha256:
            return self._event(command, "activated", model=ref, detail="already active")
        resident = ref in (self.previous, self.staged)
        if not resident:  # the agent reports the download; the simulation skips it
            await self._emit(self._event(command, "downloading", model=ref))
        if self.worker.activate_delay_s > 0:
            await asyncio.sleep(self.worker.activate_delay_s)
        if self._cancelled(command):
            return self._event(command, "failed", reason="cancelled")
        if not command.activate:
            self.staged = ref
            return self._event(command, "staged", model=ref)
        await self._emit(self._event(command, "verified", model=ref))
        self.previous, self.active, self.staged = self.active, ref, None
        return self._event(command, "activated", model=ref)

    def _switch(self, command: SwitchCommand) -> DeviceEvent:
        if self.active is not None and self.active.sha256 == command.to.sha256:
            return self._event(command, "activated", model=self.active, detail="already active")
        if self.staged is None or self.staged.sha256 != command.to.sha256:
            return self._event(command, "failed", reason="not_staged")
        self.previous, self.active, self.staged = self.active, self.staged, None
        return self._event(command, "activated", model=self.active)

    def _rollback(self, command: RollbackCommand) -> DeviceEvent:
        target = command.to
        if self.active is not None and target is not None and target.sha256 == self.active.sha256:
            return self._event(command, "rolled_back", model=self.active, detail="already active")
        if self.previous is not None and (target is None or target.sha256 == self.previous.sha256):
            self.previous, self.active = self.active, self.previous
            return self._event(command, "rolled_back", model=self.active)
        return self._event(command, "failed", reason="not_resident")

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
            command, self.spec.device_id, phase, reason=reason, detail=detail, model=model
        )

    async def _emit(self, event: DeviceEvent) -> None:
        client = self.client
        if client is None:
            self.worker.stats["events_unsent"] += 1
            return
        try:
            await client.publish(topics.device_events(self.spec.device_id), event.to_wire(), qos=1)
        except aiomqtt.MqttError:
            self.worker.stats["events_unsent"] += 1
            return
        self.worker.events[event.phase] += 1

    # ------------------------------------------------------------ telemetry

    async def send_window(self, seconds: float) -> bool:
        client, active = self.client, self.active
        if client is None or active is None:
            return False
        w = self.worker
        shapes = w.degraded_shapes if active.version in w.degraded else w.shapes
        window = shapes[w.rng.randrange(len(shapes))].window(self.spec.device_id, active, seconds)
        try:
            await client.publish(topics.device_telemetry(self.spec.device_id), window.to_wire())
        except aiomqtt.MqttError:
            w.stats["telemetry_unsent"] += 1
            return False
        w.stats["telemetry_sent"] += 1
        return True


# ---------------------------------------------------------------- one worker process


@dataclass
class Worker:
    host: str
    port: int
    telemetry_interval_s: float
    activate_delay_s: float
    controller_keys: dict[str, Ed25519PublicKey]
    connect_concurrency: int = 64
    devices: list[Device] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    commands: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    # rollout id -> phase -> device ids with that final answer (first answers only)
    finals: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    final_answers: Counter[str] = field(default_factory=Counter)  # 'rollout/phase' -> n
    degraded: set[str] = field(default_factory=set)
    telemetry_on: bool = True
    last_error: str = ""
    rng: random.Random = field(default_factory=random.Random)
    connecting: asyncio.Semaphore = field(init=False)
    shapes: list[WindowShape] = field(init=False)
    degraded_shapes: list[WindowShape] = field(init=False)

    def __post_init__(self) -> None:
        self.connecting = asyncio.Semaphore(self.connect_concurrency)
        self.shapes = window_shapes(self.rng, 64, degraded=False)
        self.degraded_shapes = window_shapes(self.rng, 64, degraded=True)

    def final(self, event: DeviceEvent) -> None:
        rid = event.rollout_id or "-"
        self.final_answers[f"{rid}/{event.phase}"] += 1
        phases = self.finals.setdefault(rid, {})
        phases.setdefault(event.phase, set()).add(event.device_id)

    async def start(self, specs: list[DeviceSpec], active: ModelRef | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        for spec in specs:
            device = Device(spec, self, active)
            self.devices.append(device)
            self.tasks.append(asyncio.create_task(device.run(), name=spec.device_id))
        self.tasks.append(asyncio.create_task(self._telemetry_loop(), name="telemetry"))
        while sum(d.connected.is_set() for d in self.devices) < len(self.devices):
            if self.stats["connect_failures"] > 10 * len(self.devices):
                break
            await asyncio.sleep(0.05)
        return {"connected": self.connected(), "seconds": time.perf_counter() - t0}

    def connected(self) -> int:
        return sum(d.connected.is_set() for d in self.devices)

    async def _telemetry_loop(self) -> None:
        """Every device one window per interval, spread evenly over the interval."""
        interval = self.telemetry_interval_s
        if interval <= 0:
            return
        await asyncio.sleep(self.rng.uniform(0, interval))
        while True:
            n = len(self.devices)
            step = interval / max(1, n)
            start = time.monotonic()
            for i, device in enumerate(self.devices):
                if self.telemetry_on:
                    await device.send_window(interval)
                delay = start + (i + 1) * step - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.sleep(max(0.0, start + interval - time.monotonic()))

    async def burst(self, rate: float, seconds: float) -> dict[str, Any]:
        """Windows at `rate` per second (round-robin over the devices) for `seconds`."""
        before = self.stats["telemetry_sent"]
        t0 = time.monotonic()
        sent = i = 0
        tick = 0.01
        while (now := time.monotonic()) - t0 < seconds:
            due = int((now - t0) * rate) - sent
            for _ in range(max(0, due)):
                if await self.devices[i % len(self.devices)].send_window(1.0):
                    sent += 1
                else:
                    self.stats["burst_skipped"] += 1
                    sent += 1  # counted as attempted; `telemetry_sent` has what went out
                i += 1
            await asyncio.sleep(tick)
        return {
            "sent": self.stats["telemetry_sent"] - before,
            "seconds": time.monotonic() - t0,
        }

    def report(self) -> dict[str, Any]:
        versions = Counter(d.active.version if d.active else "-" for d in self.devices)
        return {
            "devices": len(self.devices),
            "connected": self.connected(),
            "stats": dict(self.stats),
            "commands": {f"{k}/{v}": n for (k, v), n in self.commands.items()},
            "events": dict(self.events),
            "finals": {
                rid: {phase: sorted(ids) for phase, ids in phases.items()}
                for rid, phases in self.finals.items()
            },
            "final_answers": dict(self.final_answers),
            "versions": dict(versions),
            "last_error": self.last_error,
        }

    async def stop(self) -> dict[str, Any]:
        _quiet_teardown(asyncio.get_running_loop())
        for device in self.devices:
            device.stopping = True
        for task in self.tasks:
            if task.get_name() == "telemetry":
                task.cancel()
        # Cancelled readers say `online: false` themselves on the way out (Device.run).
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return self.report()


def _quiet_teardown(loop: asyncio.AbstractEventLoop) -> None:
    """While thousands of sessions close, paho still asks the loop to watch sockets it
    has just closed (a callback already scheduled), and aiomqtt leaves the sessions'
    pending futures failed with the disconnection: asyncio reports each as an error
    with a traceback. Those are expected here and left out; anything else is not."""
    default = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError | KeyError) and "add_" in repr(context.get("handle")):
            return
        if isinstance(exc, aiomqtt.MqttError) and "never retrieved" in context.get("message", ""):
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


async def _serve(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            requests.put_nowait(conn.recv())
        except EOFError:
            loop.remove_reader(conn.fileno())
            requests.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    worker: Worker | None = None
    while True:
        request = await requests.get()
        if request is None:  # the parent is gone
            if worker is not None:
                await worker.stop()
            return
        op = request["op"]
        try:
            if op == "init":
                keys = {
                    k: Ed25519PublicKey.from_public_bytes(bytes.fromhex(v))
                    for k, v in request.get("controller_keys", {}).items()
                }
                worker = Worker(
                    request["host"],
                    request["port"],
                    request["telemetry_interval_s"],
                    request["activate_delay_s"],
                    keys,
                )
                answer: dict[str, Any] = {"nofile": raise_nofile_limit()}
            elif worker is None:
                raise RuntimeError("init first")
            elif op == "start":
                specs = [DeviceSpec(*row) for row in request["devices"]]
                active = request.get("active")
                ref = ModelRef.model_validate(active) if active else None
                answer = await worker.start(specs, ref)
            elif op == "telemetry":
                worker.telemetry_on = bool(request["on"])
                answer = {"on": worker.telemetry_on}
            elif op == "degrade":
                worker.degraded = set(request["versions"])
                answer = {"degraded": sorted(worker.degraded)}
            elif op == "burst":
                answer = await worker.burst(float(request["rate"]), float(request["seconds"]))
            elif op == "report":
                answer = worker.report()
            elif op == "stop":
                answer = await worker.stop()
                conn.send({"ok": True, **answer})
                return
            else:
                raise ValueError(f"unknown op {op!r}")
            conn.send({"ok": True, **answer})
        except Exception as exc:  # the parent reports it; the worker stays up
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def worker_main(conn: Connection) -> None:
    """A worker process: serve the parent's requests until `stop` or the parent leaves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, also on Ctrl-C
    asyncio.run(_serve(conn))
