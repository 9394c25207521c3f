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
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TRACEPARENT = "traceparent"
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
    service: str, *, environ: Mapping[str, str] = os.environ, exporter: Any = None
) -> bool:
    """Install a tracer provider when the environment asks (or `exporter` is given:
    tests pass the SDK's in-memory exporter); True when traces are now recorded.

    `service` is the default `service.name` (`OTEL_SERVICE_NAME` and
    `OTEL_RESOURCE_ATTRIBUTES` win). Calling it again changes nothing: a process
    has one provider.
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

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
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
