"""One trace per rollout: the controller's spans for a rollout and its stages, and the
`traceparent` its commands carry to devices (shared.tracing holds the set-up).

A rollout's trace starts in the operator's `rollout start` (its request's
`traceparent`) or in the controller's request span; the `rollout` span lives
until the rollout ends, with one `stage …` span per stage under it. Every command
a stage publishes (one per region chunk, or per device) carries the stage span
as its parent, so each device's `deploy` span (the agent's) and the events it
sends back are children of that stage. The `rollout` span links to the push of each
version it deploys (a trace of its own). A finished rollout that works again (an
operator's rollback) continues in its trace under `rollout (reopened)`. Spans live
in memory: a controller that restarts mid-rollout continues it in a new
`rollout (resumed)` trace.

No I/O; while tracing is off every method returns after one flag check.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, Status, StatusCode

from shared import tracing
from shared.messages import DeviceEvent

_FAILED = {"Failed", "RolledBack", "Aborted"}
_ENDED_KEPT = 1000  # ended rollouts whose trace a reopening continues


class RolloutTraces:
    def __init__(self) -> None:
        self._rollout: dict[str, Span] = {}
        self._stage: dict[str, Span] = {}
        # The span of each rollout that ended lately: an operator's rollback reopens a
        # finished rollout, and its work continues that rollout's trace. Bounded.
        self._ended: OrderedDict[str, SpanContext] = OrderedDict()

    def begin(self, rollout_id: str, pushed: Sequence[str | None] = (), **attributes: Any) -> None:
        """The rollout was created (inside its request's span, which becomes its parent).

        `pushed`: the `traceparent` each version it deploys was pushed under (the model
        versions' `trace_parent`): the rollout's span links to those pushes, which are
        traces of their own (a version is pushed once and rolled out many times)."""
        if not tracing.enabled():
            return
        self._rollout[rollout_id] = tracing.tracer().start_span(
            "rollout",
            attributes={"hotswap.rollout_id": rollout_id, **_attrs(attributes)},
            links=tracing.links(pushed),
        )

    def stage(self, rollout_id: str, name: str, index: int) -> None:
        """Stage `index` begins (the previous one ends)."""
        if not tracing.enabled():
            return
        self._end_stage(rollout_id)
        parent = self._rollout_span(rollout_id)
        self._stage[rollout_id] = tracing.tracer().start_span(
            f"stage {name}",
            context=trace.set_span_in_context(parent),
            attributes={"hotswap.rollout_id": rollout_id, "hotswap.stage": name,
                        "hotswap.stage_index": index},
        )  # fmt: skip

    def event(self, rollout_id: str, name: str, **attributes: Any) -> None:
        """Something that happened to the rollout now (rolling back, paused, …)."""
        if not tracing.enabled():
            return
        current = self._current(rollout_id)
        if current is not None:
            current.add_event(name, _attrs(attributes))

    def finish(self, rollout_id: str, status: str, reason: str | None = None) -> None:
        if not tracing.enabled():
            return
        self._end_stage(rollout_id)
        rollout = self._rollout.pop(rollout_id, None)
        if rollout is None:
            return
        rollout.set_attribute("hotswap.status", status)
        if status in _FAILED:
            rollout.set_status(Status(StatusCode.ERROR, reason or status))
        rollout.end()
        self._ended[rollout_id] = rollout.get_span_context()
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)

    def headers(self, rollout_id: str | None) -> list[tuple[str, str]]:
        """The `traceparent` a command of this rollout carries: its current stage (or the
        rollout itself before the first stage)."""
        if not tracing.enabled() or rollout_id is None:
            return []
        return tracing.headers_of(self._current(rollout_id))

    def device_event(self, event: DeviceEvent, traceparent: str | None) -> None:
        """A device's event arrived carrying its deploy span: a short span under it."""
        parent = tracing.context_from(traceparent)
        if parent is None:
            return
        with tracing.span(
            f"device {event.phase}",
            context=parent,
            attributes=_attrs(
                {
                    "hotswap.device_id": event.device_id,
                    "hotswap.rollout_id": event.rollout_id,
                    "hotswap.command_id": event.command_id,
                    "hotswap.phase": event.phase,
                    "hotswap.reason": event.reason,
                }
            ),
        ):
            pass

    def _current(self, rollout_id: str) -> Span | None:
        """The span a rollout's work belongs to now: its stage, else itself; a rollout that
        ended here and works again (reopened by a rollback) gets a span in its trace."""
        current = self._stage.get(rollout_id) or self._rollout.get(rollout_id)
        if current is None and rollout_id in self._ended:
            current = self._rollout_span(rollout_id)
        return current

    def _rollout_span(self, rollout_id: str) -> Span:
        span = self._rollout.get(rollout_id)
        if span is None:
            ended = self._ended.pop(rollout_id, None)
            # Reopened (an operator's rollback of a finished rollout): in its own trace,
            # under the span that ended; else started before this controller did.
            parent = trace.NonRecordingSpan(ended) if ended is not None else trace.INVALID_SPAN
            span = self._rollout[rollout_id] = tracing.tracer().start_span(
                "rollout (reopened)" if ended is not None else "rollout (resumed)",
                context=trace.set_span_in_context(parent),
                attributes={"hotswap.rollout_id": rollout_id},
            )
        return span

    def _end_stage(self, rollout_id: str) -> None:
        stage = self._stage.pop(rollout_id, None)
        if stage is not None:
            stage.end()


def _attrs(values: dict[str, Any]) -> dict[str, Any]:
    """Span attributes: None left out (OpenTelemetry refuses it)."""
    return {k: v for k, v in values.items() if v is not None}


ROLLOUTS = RolloutTraces()
