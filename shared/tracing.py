"""OpenTelemetry tracing for controller, agents and the operator's CLI: set-up from the
standard `OTEL_*` variables, and W3C trace context over MQTT 5 user properties.

Off unless the environment asks for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, or `OTEL_TRACES_EXPORTER` naming an
exporter (`otlp`, `console`); `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` keeps it off. While off, every helper here returns
at once after one flag check (no span objects, no context switches), so the
hooks cost nothing measurable on hot paths. The OTLP exporter (HTTP/protobuf)
reads its own `OTEL_EXPORTER_OTLP_*` settings (endpoint, headers, timeout).

A message carries its trace in one user property, `traceparent` (W3C Trace
Context), beside the command signature; it is not signed and never decides
anything: a forged one only misfiles spans. Does no I/O itself (the exporter
sends spans from its own thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, ParamSpec, TypeVar

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TRACEPARENT = "traceparent"
SHORT_EXPORT_TIMEOUT_S = 1.0  # an operator's command waits this long for a backend at exit
_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
_PROPAGATOR = TraceContextTextMapPropagator()
_state = {"enabled": False}
_provider: dict[str, Any] = {}  # the SDK's TracerProvider once installed
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()
P = ParamSpec("P")
T = TypeVar("T")


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(
    service: str,
    *,
    environ: Mapping[str, str] = os.environ,
    exporter: Any = None,
    short_lived: bool = False,
) -> bool:
    """Install a tracer provider when the environment asks (or `exporter` is given:
    tests pass the SDK's in-memory exporter); True when traces are now recorded.

    `service` is the default `service.name` (`OTEL_SERVICE_NAME` and
    `OTEL_RESOURCE_ATTRIBUTES` win). Calling it again changes nothing: a process
    has one provider. `short_lived` (an operator's command): the OTLP export at exit
    gives up after `SHORT_EXPORT_TIMEOUT_S` unless `OTEL_EXPORTER_OTLP_TIMEOUT` (or
    its `_TRACES_` form) says otherwise, so that an unreachable backend costs a
    command about a second, not the SDK's 10 s of retries. The SDK's own log lines
    (export failures) go through our logger, one line each.
    """
    if _state["enabled"]:
        return True
    if exporter is None and not wanted(environ):
        return False
    installed = _provider.get("provider")
    if installed is not None:  # stopped earlier (tests): recording again
        if exporter is not None and exporter not in _provider["exporters"]:
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor

            installed.add_span_processor(SimpleSpanProcessor(exporter))
            _provider["exporters"].append(exporter)
        _state["enabled"] = True
        return True
    # The SDK is imported only here: a process that does not trace never loads it.
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or service})
    resource = resource.merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
        for name in names:
            if name == "console":  # on stderr, one JSON object a line: stdout is `--json`'s
                console = ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
                provider.add_span_processor(BatchSpanProcessor(console))
            elif name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                timeout = _export_timeout(environ, short_lived)
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=timeout)))
                _route_sdk_logs(_otlp_endpoint(environ))
            elif name:
                raise ValueError(
                    f"OTEL_TRACES_EXPORTER={name!r}: hotswap exports traces with otlp "
                    "(HTTP/protobuf) or console"
                )
    trace.set_tracer_provider(provider)
    _provider["provider"] = provider
    _provider["exporters"] = [exporter] if exporter is not None else []
    _state["enabled"] = True
    return True


def _export_timeout(environ: Mapping[str, str], short_lived: bool) -> float | None:
    """The OTLP exporter's timeout in seconds: None (the SDK reads its variables, 10 s by
    default) unless a short-lived command runs and the user set none."""
    if not short_lived or any(environ.get(v) for v in _TIMEOUT_VARIABLES):
        return None
    return SHORT_EXPORT_TIMEOUT_S


def _otlp_endpoint(environ: Mapping[str, str]) -> str:
    """Where the OTLP/HTTP exporter sends spans (as the SDK resolves it), for log lines."""
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


# The SDK says each retry before its final word; only the final word is worth a line.
_RETRY_NOISE = ("Transient error", "Shutdown in progress")


class _SdkLogLines(logging.Handler):
    """The OpenTelemetry SDK's own log records as our log lines: a structlog event when
    logging is configured (a JSON line under --log-json), else one `warning: …` line on
    stderr (an operator's command), never the SDK's bare multi-line messages."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(logging.WARNING)
        self.endpoint = endpoint

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(record.getMessage().split())
            if message.startswith(_RETRY_NOISE):
                return
            if structlog.is_configured():
                structlog.get_logger("opentelemetry").warning(
                    "traces_not_exported", endpoint=self.endpoint, detail=message
                )
            else:
                print(
                    f"warning: traces not exported to {self.endpoint}: {message}",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception:  # a log line must never break the exporter's thread
            self.handleError(record)


def _route_sdk_logs(endpoint: str) -> None:
    sdk = logging.getLogger("opentelemetry")
    sdk.handlers = [_SdkLogLines(endpoint)]
    sdk.propagate = False


def _one_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


def stop_tracing() -> None:
    """Stop recording (the helpers are no-ops again). The provider stays installed:
    OpenTelemetry allows one per process; `configure_tracing` turns recording back on."""
    _state["enabled"] = False


def enabled() -> bool:
    return _state["enabled"]


def tracer() -> trace.Tracer:
    return trace.get_tracer("hotswap")


def span(
    name: str, *, context: Context | None = None, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around the block, current inside it (child of `context` or of the current
    span); None and nothing else while tracing is off (one shared null context)."""
    if not _state["enabled"]:
        return _OFF
    return tracer().start_as_current_span(name, context=context, attributes=dict(attributes or {}))


async def timed(name: str, awaitable: Awaitable[T], **attributes: Any) -> T:
    """Await `awaitable` inside a span `name` (a coroutine runs when awaited: the span
    times its body)."""
    if not _state["enabled"]:
        return await awaitable
    with span(name, attributes=attributes):
        return await awaitable


def traced(
    name: str,
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorator: the coroutine function runs inside a span `name`."""

    def wrap(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            if not _state["enabled"]:
                return await fn(*args, **kwargs)
            with span(name):
                return await fn(*args, **kwargs)

        return run

    return wrap


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (nothing while tracing is off)."""
    if _state["enabled"]:
        trace.get_current_span().set_attributes(dict(attributes))


def headers(context: Context | None = None) -> list[tuple[str, str]]:
    """The `traceparent` user property of `context` (default: the current one); none while
    tracing is off or no span is recording."""
    if not _state["enabled"]:
        return []
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    value = carrier.get(TRACEPARENT)
    return [(TRACEPARENT, value)] if value else []


def headers_of(current: Span | None) -> list[tuple[str, str]]:
    """The `traceparent` user property naming `current` as the parent."""
    if current is None or not _state["enabled"]:
        return []
    return headers(trace.set_span_in_context(current))


def context_of(properties: object) -> Context | None:
    """The trace context a received MQTT 5 message carries (its `traceparent` user
    property), or None (none, malformed, or tracing off)."""
    if not _state["enabled"]:
        return None
    pairs: Sequence[tuple[str, str]] = getattr(properties, "UserProperty", None) or ()
    value = next((v for k, v in pairs if k == TRACEPARENT), None)
    if not value:
        return None
    extracted = _PROPAGATOR.extract({TRACEPARENT: value})
    parent = trace.get_current_span(extracted).get_span_context()
    return extracted if parent.is_valid else None


def traceparent_of(properties: object) -> str | None:
    """The raw `traceparent` a received message carries, kept to re-read later (None while
    tracing is off)."""
    if not _state["enabled"]:
        return None
    pairs: Sequence[tuple[str, str]] = getattr(properties, "UserProperty", None) or ()
    return next((v for k, v in pairs if k == TRACEPARENT), None)


def origin() -> str | None:
    """The `traceparent` of the operator's action the current span serves: the span the
    current one continues when it came from a message (a request's `traceparent`: the
    operator's `push`), else the current span itself; None while tracing is off.

    Kept with what the action made (a model version), so that later work on it (a
    rollout) can link back to it."""
    if not _state["enabled"]:
        return None
    current = trace.get_current_span()
    # The SDK's spans know their parent; a remote one is the caller's span.
    parent = getattr(current, "parent", None)
    if isinstance(parent, trace.SpanContext) and parent.is_valid and parent.is_remote:
        current = trace.NonRecordingSpan(parent)
    pairs = headers_of(current) if current.get_span_context().is_valid else []
    return pairs[0][1] if pairs else None


def links(traceparents: Iterable[str | None]) -> list[trace.Link]:
    """Span links to each valid `traceparent` (None and malformed ones left out)."""
    if not _state["enabled"]:
        return []
    out = []
    for value in traceparents:
        if not value:
            continue
        extracted = _PROPAGATOR.extract({TRACEPARENT: value})
        linked = trace.get_current_span(extracted).get_span_context()
        if linked.is_valid:
            out.append(trace.Link(linked))
    return out


def context_from(traceparent: str | None) -> Context | None:
    """`traceparent_of`'s value as a parent context."""
    if not traceparent or not _state["enabled"]:
        return None
    extracted = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    valid = trace.get_current_span(extracted).get_span_context().is_valid
    return extracted if valid else None


@contextlib.contextmanager
def continued(
    name: str,
    traceparent: str | None,
    received_ns: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """A span `name` continuing the trace a received message carried (a new trace when it
    carried none), with a `receive` child at the time it arrived (`received_ns`, from
    `time.time_ns()`): a device's part of a deploy, queued before it is carried out."""
    if not _state["enabled"]:
        yield
        return
    with span(name, context=context_from(traceparent), attributes=attributes):
        if received_ns is not None:
            tracer().start_span("receive", start_time=received_ns).end()
        yield


def publish_properties() -> Properties | None:
    """MQTT 5 publish properties carrying the current span as `traceparent` (None while
    tracing is off or nothing is recording)."""
    pairs = headers()
    if not pairs:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = pairs
    return properties
