"""End-to-end tracing: one trace per rollout across the operator, the controller and the
devices, through a real mosquitto, moto's S3 and agents running real interpreters.

The spans go to the OpenTelemetry SDK's in-memory exporter (the exporter stands in
for an OTLP backend; everything that produces and carries the spans is real: the
`traceparent` travels in MQTT 5 user properties through the broker).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from structlog.testing import capture_logs
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto, free_port
from controller.artifacts import ArtifactStore
from controller.db import make_engine
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller
from controller.store import Store
from edge_agent.agent import Agent
from shared import tracing
from shared.messages import ControlRollout, ListDevices, StartRollout
from shared.settings import MqttEndpoint
from tests.conftest import (
    S3,
    KeyPair,
    controller_config,
    fleet_agent_config,
    running_task,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORTER = InMemorySpanExporter()
# Three in one region: the stage after the canary reaches two or three of them with one
# region publish (a selector naming them), which carries one traceparent for all.
DEVICES = (("cam-1", "eu-west"), ("cam-2", "eu-west"), ("cam-3", "eu-west"), ("cam-4", "us-east"))
AGENT_STEPS = {"receive", "verify", "download", "load", "warm-up", "swap", "health confirmation"}


@pytest.fixture
def traced() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into the in-memory exporter, for this test only."""
    assert tracing.configure_tracing("hotswap-tests", exporter=EXPORTER)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        tracing.stop_tracing()
        EXPORTER.clear()


@pytest.fixture
async def fleet(
    traced: InMemorySpanExporter,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
) -> AsyncIterator[Controller]:
    controller = Controller(controller_config(mosquitto, s3, tmp_path))
    agents = [
        Agent(
            fleet_agent_config(
                mosquitto,
                signing_keys,
                tmp_path / device_id,
                device_id,
                region,
                "camera",
                workload_hz=50.0,
                telemetry_interval_s=0.5,
            )
        )
        for device_id, region in DEVICES
    ]
    async with running_task(controller.run(), controller.connected):
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            async with OperatorClient(mosquitto.endpoint("operator"), timeout=15) as op:
                async with asyncio.timeout(20):
                    while sum(d["online"] for d in await op.request(ListDevices())) < 4:
                        await asyncio.sleep(0.2)
            yield controller
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_rollout_is_one_trace_from_the_operator_to_every_device(
    fleet: Controller,
    traced: InMemorySpanExporter,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    model_v1: bytes,
) -> None:
    """push → register_model is one trace; rollout start → rollout → stage canary / rest →
    each device's deploy (receive, verify, download, load, warm-up, swap, health
    confirmation) → the controller's spans of its events are another, one trace id; the
    rollout's span links to the push's."""
    endpoint = mosquitto.endpoint("operator")
    await push_model(
        model_v1, name="clf", version="1.0.0", signing_key=signing_keys.private_path,
        endpoint=endpoint, artifacts=ArtifactStore(s3.endpoint, s3.bucket),
    )  # fmt: skip
    with capture_logs() as logs:
        # The operator's own command, in a thread (it runs its own event loop): its
        # "rollout start" span is where the rollout's trace begins.
        done = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            [
                "rollout", "start", "--model", "clf", "--version", "1.0.0",
                "--devices", ",".join(d for d, _ in DEVICES), "--strategy", "canary",
                "--canary-percent", "25", "--canary-duration", "0.5",
                "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("operator")),
            ],
        )  # fmt: skip
        assert done.exit_code == 0, done.stderr
        rollout_id = done.stdout.strip()
        status = await read_rollout_status(endpoint, rollout_id, wait_s=60)
    assert status.status == "Succeeded", status
    regional = [e for e in logs if e["event"] == "deploy_sent" and e["region"] == "eu-west"]
    assert regional and len(regional[0]["devices"]) >= 2, "no region publish to trace"
    async with asyncio.timeout(10):  # the last events' spans, and the rollout's end
        while len(by_name(traced.get_finished_spans(), "device activated")) < 4 or not by_name(
            traced.get_finished_spans(), "rollout"
        ):
            await asyncio.sleep(0.1)
    spans = traced.get_finished_spans()

    (push,) = by_name(spans, "push")
    (register,) = by_name(spans, "register_model")
    assert register.context.trace_id == push.context.trace_id
    assert register.parent is not None and register.parent.span_id == push.context.span_id

    (operator,) = by_name(spans, "rollout start")
    assert operator.parent is None and operator.attributes is not None
    assert operator.attributes["hotswap.rollout_id"] == rollout_id
    trace_id = operator.context.trace_id
    assert trace_id != push.context.trace_id
    (request,) = by_name(spans, "start_rollout")
    (rollout,) = by_name(spans, "rollout")
    stages = {s.name: s for s in spans if s.name.startswith("stage ")}
    assert set(stages) == {"stage canary", "stage rest"}
    assert request.parent is not None and request.parent.span_id == operator.context.span_id
    assert rollout.parent is not None and rollout.parent.span_id == request.context.span_id
    for stage in stages.values():
        assert stage.parent is not None and stage.parent.span_id == rollout.context.span_id
    assert rollout.attributes is not None and rollout.attributes["hotswap.status"] == "Succeeded"
    # The push is a trace of its own (a version is pushed once, rolled out many times):
    # the rollout's span links to it.
    assert [(k.context.trace_id, k.context.span_id) for k in rollout.links] == [
        (push.context.trace_id, push.context.span_id)
    ]

    deploys = by_name(spans, "deploy")
    devices = {
        str(d.attributes["hotswap.device_id"]): d for d in deploys if d.attributes is not None
    }
    assert set(devices) == {d for d, _ in DEVICES}
    stage_ids = {s.context.span_id for s in stages.values()}
    for device, deploy in devices.items():
        # Every device's deploy is a child of a stage: the traceparent crossed the broker.
        assert deploy.parent is not None and deploy.parent.span_id in stage_ids, device
        steps = {s.name for s in spans if s.parent and s.parent.span_id == deploy.context.span_id}
        assert steps >= AGENT_STEPS, (device, steps)
    canary = [
        d
        for d in deploys
        if d.parent and d.parent.span_id == stages["stage canary"].context.span_id
    ]
    assert 0 < len(canary) < len(DEVICES)  # the canary's part; the rest under `stage rest`
    # The events came back carrying the device's span: the controller's spans of them.
    deploy_ids = {d.context.span_id for d in deploys}
    for phase in ("received", "verified", "activated"):
        answers = by_name(spans, f"device {phase}")
        assert len(answers) == len(DEVICES), phase
        assert all(a.parent is not None and a.parent.span_id in deploy_ids for a in answers)

    rollout_spans = [s for s in spans if s.context.trace_id == trace_id]
    assert {s.name for s in rollout_spans} >= {
        "rollout start", "start_rollout", "rollout", "stage canary", "stage rest", "deploy",
        *AGENT_STEPS, "device activated",
    }  # fmt: skip
    print(f"trace {trace_id:032x}: {len(rollout_spans)} spans")
    for s in sorted(rollout_spans, key=lambda s: s.start_time or 0):
        who = (s.attributes or {}).get("hotswap.device_id", "")
        print(f"  {s.name} {who}")


def test_tracing_is_off_unless_the_environment_asks() -> None:
    """No OTEL_* variable: off; an OTLP endpoint or an exporter name: on; none/disabled: off."""
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


def test_while_off_nothing_is_recorded_or_carried(traced: InMemorySpanExporter) -> None:
    """Stopped: spans are no-ops, messages carry no traceparent, received ones are ignored."""
    with tracing.span("on"):
        carried = tracing.headers()
    assert [k for k, _ in carried] == ["traceparent"]
    tracing.stop_tracing()
    with tracing.span("off") as off:
        assert off is None
        assert tracing.headers() == []
        assert tracing.publish_properties() is None

    class Props:
        UserProperty = carried

    assert tracing.context_of(Props()) is None and tracing.traceparent_of(Props()) is None
    assert [s.name for s in traced.get_finished_spans()] == ["on"]


def test_console_exporter_writes_one_json_line_a_span_on_stderr(
    tmp_path: Path, signing_keys: KeyPair, model_v1: bytes
) -> None:
    """OTEL_TRACES_EXPORTER=console: spans go to stderr, one JSON object a line, so that
    stdout stays `--json`'s alone and JSON log lines stay JSON lines."""
    model = tmp_path / "m.tflite"
    model.write_bytes(model_v1)
    done = subprocess.run(
        [
            sys.executable, "-m", "broker.cli", "model", "push", str(model), "--name", "clf",
            "--version", "1.0.0", "--signing-key", str(signing_keys.private_path),
            "--mqtt-url", "mqtt://127.0.0.1:1", "--json",
        ],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "console"},
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr)
    error, *spans = done.stderr.splitlines()
    assert error.startswith("error: cannot reach the MQTT broker")
    assert [json.loads(line)["name"] for line in spans] == ["push"], done.stderr


async def wait_final(endpoint: MqttEndpoint, rollout_id: str) -> str:
    return (await read_rollout_status(endpoint, rollout_id, wait_s=60)).status


def rollout_span(spans: tuple[ReadableSpan, ...], rollout_id: str) -> ReadableSpan:
    (span,) = [
        s
        for s in by_name(spans, "rollout")
        if s.attributes and s.attributes["hotswap.rollout_id"] == rollout_id
    ]
    return span


def device_spans(
    spans: tuple[ReadableSpan, ...], name: str, trace_id: int
) -> dict[str, ReadableSpan]:
    """Each device's `name` span (a command's) in trace `trace_id`."""
    return {
        str(s.attributes["hotswap.device_id"]): s
        for s in by_name(spans, name)
        if s.attributes is not None and s.context.trace_id == trace_id
    }


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> set[str]:
    return {s.name for s in spans if s.parent and s.parent.span_id == parent.context.span_id}


async def test_a_switch_and_a_rollback_join_the_rollout_trace_and_an_ab_test_links_both_pushes(
    fleet: Controller,
    traced: InMemorySpanExporter,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """v1 everywhere; v2 blue-green: each device's `switch` (receive, swap, health
    confirmation) is in v2's rollout trace; the operator's rollback of the finished v2
    rollout reopens it in the same trace, and each device's `rollback` (receive, swap)
    joins it; an A/B rollout of both links to both pushes."""
    endpoint = mosquitto.endpoint("operator")
    store = ArtifactStore(s3.endpoint, s3.bucket)
    for data, version in ((model_v1, "1.0.0"), (model_v2, "2.0.0")):
        await push_model(
            data, name="clf", version=version, signing_key=signing_keys.private_path,
            endpoint=endpoint, artifacts=store,
        )  # fmt: skip
    pushes = {
        str(s.attributes["hotswap.version"]): s
        for s in by_name(traced.get_finished_spans(), "push")
        if s.attributes is not None
    }
    assert set(pushes) == {"1.0.0", "2.0.0"}
    devices = tuple(d for d, _ in DEVICES)
    async with OperatorClient(endpoint, timeout=15) as op:

        async def start(**spec: object) -> str:
            spec = {"model": "clf", "devices": devices, **spec}
            return str((await op.request(StartRollout.model_validate(spec)))["rolloutId"])

        first = await start(version="1.0.0")
        assert await wait_final(endpoint, first) == "Succeeded"
        blue_green = await start(version="2.0.0", strategy="blue-green")
        assert await wait_final(endpoint, blue_green) == "Succeeded"
        await op.request(ControlRollout(rollout_id=blue_green, action="rollback"))
        assert await wait_final(endpoint, blue_green) == "RolledBack"
        ab = await start(version="1.0.0", version_b="2.0.0", strategy="ab")
        await op.request(ControlRollout(rollout_id=ab, action="abort"))
    async with asyncio.timeout(10):  # the reopened rollout's span ends with it
        while not by_name(traced.get_finished_spans(), "rollout (reopened)"):
            await asyncio.sleep(0.1)
    spans = traced.get_finished_spans()

    pushed = rollout_span(spans, blue_green)
    trace_id = pushed.context.trace_id
    assert [k.context.span_id for k in pushed.links] == [pushes["2.0.0"].context.span_id]
    switches = device_spans(spans, "switch", trace_id)
    assert set(switches) == set(devices)
    for device, switch in switches.items():
        assert children(spans, switch) >= {"receive", "swap", "health confirmation"}, device

    (reopened,) = by_name(spans, "rollout (reopened)")
    assert reopened.context.trace_id == trace_id
    assert reopened.parent is not None and reopened.parent.span_id == pushed.context.span_id
    rollbacks = device_spans(spans, "rollback", trace_id)
    assert set(rollbacks) == set(devices)
    for device, rollback in rollbacks.items():
        assert rollback.parent is not None, device
        assert rollback.parent.span_id == reopened.context.span_id, device
        assert children(spans, rollback) >= {"receive", "swap"}, device
    answers = [s for s in by_name(spans, "device rolled_back") if s.context.trace_id == trace_id]
    assert len(answers) == len(devices)

    both = rollout_span(spans, ab)
    assert {(k.context.trace_id, k.context.span_id) for k in both.links} == {
        (p.context.trace_id, p.context.span_id) for p in pushes.values()
    }


def test_a_database_from_before_the_push_trace_column_gains_it(tmp_path: Path) -> None:
    """A model_versions table without `trace_parent` (an older controller's) gets the
    column at start-up; its rows read None and rollouts of them carry no link."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE model_versions DROP COLUMN trace_parent"))
        conn.execute(
            text(
                "INSERT INTO model_versions (name, version, sha256, size, signature, "
                "device_types, signed_manifest, s3_key, created_at) "
                "VALUES ('m', '1.0', 'ab', 1, '()', '', '{}', 'm/1', 0)"
            )
        )
    engine.dispose()
    store = Store(url)
    assert store.get_model("m", "1.0").trace_parent is None
    assert "trace_parent" not in store.get_model("m", "1.0").model_dump()  # not on the wire


class OtlpReceiver:
    """A small OTLP/HTTP trace receiver on a free local port: POST /v1/traces bodies,
    decoded with opentelemetry-proto; answers `status` (503 is one the SDK retries)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(receiver.status if self.path == "/v1/traces" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received."""
        out = []
        for request in self.requests:
            for resource in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                )
                out += [(service, s.name) for scope in resource.scope_spans for s in scope.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


def push_unreachable(
    tmp_path: Path, signing_keys: KeyPair, model_v1: bytes, **env: str
) -> subprocess.CompletedProcess[str]:
    """`hotswap model push` in its own process, at a broker that is not there."""
    model = tmp_path / "m.tflite"
    model.write_bytes(model_v1)
    return subprocess.run(
        [
            sys.executable, "-m", "broker.cli", "model", "push", str(model), "--name", "clf",
            "--version", "1.0.0", "--signing-key", str(signing_keys.private_path),
            "--mqtt-url", "mqtt://127.0.0.1:1",
        ],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, **env},
    )  # fmt: skip


def test_the_otlp_exporter_delivers_a_command_s_spans(
    receiver: OtlpReceiver, tmp_path: Path, signing_keys: KeyPair, model_v1: bytes
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT: the real OTLP/HTTP exporter sends the command's spans
    to it (protobuf, /v1/traces) before the process exits; nothing else is printed."""
    done = push_unreachable(
        tmp_path, signing_keys, model_v1, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: cannot reach the MQTT broker at mqtt://127.0.0.1:1: [Errno 111] Connection refused"
    ]
    assert receiver.spans() == [("hotswap-cli", "push")]


def test_a_backend_that_does_not_answer_costs_a_command_one_try_and_one_line(
    receiver: OtlpReceiver, tmp_path: Path, signing_keys: KeyPair, model_v1: bytes
) -> None:
    """A backend answering 503 (the SDK retries it for 10 s by default): an operator's
    command tries about a second's worth (one or two sends), then says so in one
    `warning:` line, not the SDK's retry lines; OTEL_EXPORTER_OTLP_TIMEOUT, when set,
    is honoured (4 s: the SDK's 1 s and 2 s back-offs fit, three sends or more)."""
    receiver.status = 503
    done = push_unreachable(
        tmp_path, signing_keys, model_v1, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
    )
    error, warning = done.stderr.splitlines()
    assert error.startswith("error: cannot reach the MQTT broker")
    assert warning.startswith(f"warning: traces not exported to {receiver.url}/v1/traces: ")
    assert 1 <= len(receiver.requests) <= 2, len(receiver.requests)

    receiver.requests.clear()
    done = push_unreachable(
        tmp_path, signing_keys, model_v1,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_EXPORTER_OTLP_TIMEOUT="4",
    )  # fmt: skip
    assert len(done.stderr.splitlines()) == 2, done.stderr
    assert len(receiver.requests) >= 3, len(receiver.requests)


def test_export_failures_under_log_json_are_json_lines(tmp_path: Path) -> None:
    """A service with --log-json (its logging configured as JSON) whose OTLP endpoint is
    closed: what the SDK says of it is one JSON event; stderr stays JSON lines."""
    script = (
        "from shared.logs import configure_logging\n"
        "from shared import tracing\n"
        "configure_logging('info', json=True)\n"
        "assert tracing.configure_tracing('svc', short_lived=True)\n"
        "with tracing.span('work'):\n"
        "    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
        env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "traces_not_exported" and event["level"] == "warning", event
    assert event["endpoint"].endswith("/v1/traces")
