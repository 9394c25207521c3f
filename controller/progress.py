"""What the planner reads of a rollout's devices: counts and small indexes, kept in step.

A planner step used to take every `AssignmentView` of a rollout and walk the list
several times: O(N) for each step of a rollout whose devices changed, which at
10,000 devices was the tail of the controller's tick. `Progress` holds what a
step reads instead:

- counts by state, over the rollout and per stage (settled or not is a sum over
  the stages so far);
- the devices waiting for a command per stage (`pending`), the staged ones per
  stage (a blue-green switch), the ones to retry;
- the devices with a command out, ordered by when it went out (`_ByTime`), so the
  timed-out ones are the oldest few, found without looking at the others;
- the failures and the rollback's own bookkeeping.

`update(view)` follows one device's change: set and counter updates, and a
bisect into the time-ordered list (its memmove is the one part that grows with N:
about 15 µs at 100,000 devices, `bench/planner.py`). A step costs O(stages + what
it decides), whatever N is.
`Progress.of(stages, views, retries)` builds one from a list (a reload, tests);
built change by change it is the same (tested). Pure: no I/O.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from controller.strategies import Stage

# Device progress within a rollout, in the order it normally advances.
DEVICE_STATES = (
    "pending",
    "sent",
    "received",
    "downloading",
    "verified",
    "staged",  # blue-green: loaded in standby, waiting for the switch
    "switching",  # blue-green: the switch command is out
    "activated",
    "failed",
    "rolled_back",
    "timed_out",
    "cancelled",  # taken out of the rollout: superseded by another one, or revoked
)
FINAL_DEVICE_STATES = frozenset({"activated", "failed", "rolled_back", "timed_out", "cancelled"})
FINAL_ROLLBACK_STATES = frozenset({"rolled_back", "failed", "timed_out"})
# Final, but neither a success nor a failure: the device left the rollout.
LEFT_STATES = frozenset({"cancelled"})
# A command is out and the device has not finished it.
IN_FLIGHT_STATES = frozenset({"sent", "received", "downloading", "verified", "switching"})
RETRYABLE_STATES = frozenset({"failed", "timed_out"})


@dataclass(frozen=True, slots=True)
class AssignmentView:
    """One device's part in a rollout, as the planner reads it (a row, as plain data)."""

    device_id: str
    state: str
    sent_at: float | None
    reason: str | None = None
    rollback_state: str | None = None
    rollback_sent_at: float | None = None
    attempts: int = 0
    command_id: str | None = None
    rollback_command_id: str | None = None
    version: str = ""  # A/B: the side this device is to run ("" means the rollout's)


@dataclass(slots=True)
class _ByTime:
    """Devices ordered by a time (when their command went out): the oldest first."""

    keys: list[tuple[float, str]] = field(default_factory=list)
    at: dict[str, float] = field(default_factory=dict)

    def put(self, device_id: str, t: float) -> None:
        self.drop(device_id)
        insort(self.keys, (t, device_id))  # almost always at the end: t is now
        self.at[device_id] = t

    def drop(self, device_id: str) -> None:
        t = self.at.pop(device_id, None)
        if t is not None:
            del self.keys[bisect_left(self.keys, (t, device_id))]

    def expired(self, now: float, timeout_s: float) -> Iterator[str]:
        """The devices whose time is `timeout_s` or more before `now`, oldest first."""
        for t, device_id in self.keys:
            if now - t < timeout_s:
                return
            yield device_id

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(slots=True)
class Progress:
    """A rollout's devices as the planner reads them (see the module docstring)."""

    stages: tuple[Stage, ...]
    retries: int = 0
    views: dict[str, AssignmentView] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    rollback_counts: Counter[str] = field(default_factory=Counter)
    stage_of: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stage_counts: list[Counter[str]] = field(default_factory=list)
    pending: list[set[str]] = field(default_factory=list)
    staged: list[set[str]] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    sent: _ByTime = field(default_factory=_ByTime)  # in flight, by when it was sent
    retryable: set[str] = field(default_factory=set)
    failures: set[str] = field(default_factory=set)  # final, not activated, not left
    left: set[str] = field(default_factory=set)
    rollback_todo: set[str] = field(default_factory=set)  # activated, no rollback yet
    rollback_open: set[str] = field(default_factory=set)  # rollback sent, no answer
    rollback_sent: _ByTime = field(default_factory=_ByTime)
    rollback_problems: set[str] = field(default_factory=set)  # refused or unanswered
    activated_rolled: int = 0  # activated with a final rollback state

    def __post_init__(self) -> None:
        n = len(self.stages)
        self.stage_counts = [Counter() for _ in range(n)]
        self.pending = [set() for _ in range(n)]
        self.staged = [set() for _ in range(n)]
        members: dict[str, list[int]] = {}
        for i, stage in enumerate(self.stages):
            for d in stage.devices:
                members.setdefault(d, []).append(i)
        self.stage_of = {d: tuple(ix) for d, ix in members.items()}

    @classmethod
    def of(
        cls, stages: Sequence[Stage], views: Iterable[AssignmentView], retries: int = 0
    ) -> Progress:
        progress = cls(tuple(stages), retries)
        for v in views:
            progress.update(v)
        return progress

    @property
    def total(self) -> int:
        return len(self.views)

    def update(self, view: AssignmentView) -> None:
        """One device's assignment is now `view` (a new device, or a change)."""
        old = self.views.get(view.device_id)
        if old is not None:
            self._account(old, -1)
        self.views[view.device_id] = view
        self._account(view, 1)

    def _account(self, v: AssignmentView, sign: int) -> None:
        d, state, rb = v.device_id, v.state, v.rollback_state
        add = sign > 0
        for i in self.stage_of.get(d, ()):
            self.stage_counts[i][state] += sign
            if state == "pending":
                _toggle(self.pending[i], d, add)
            elif state == "staged":
                _toggle(self.staged[i], d, add)
        self.counts[state] += sign
        if state in IN_FLIGHT_STATES:
            _toggle(self.in_flight, d, add)
            if v.sent_at is not None:
                self.sent.put(d, v.sent_at) if add else self.sent.drop(d)
        if state in RETRYABLE_STATES and self.retries and v.attempts <= self.retries:
            _toggle(self.retryable, d, add)
        if state in FINAL_DEVICE_STATES and state != "activated" and state not in LEFT_STATES:
            _toggle(self.failures, d, add)
        if state in LEFT_STATES:
            _toggle(self.left, d, add)
        if rb is not None:
            self.rollback_counts[rb] += sign
        if state == "activated":
            if rb is None:
                _toggle(self.rollback_todo, d, add)
            elif rb in FINAL_ROLLBACK_STATES:
                self.activated_rolled += sign
        if rb == "sent":
            _toggle(self.rollback_open, d, add)
            if v.rollback_sent_at is not None:
                if add:
                    self.rollback_sent.put(d, v.rollback_sent_at)
                else:
                    self.rollback_sent.drop(d)
        elif rb in ("failed", "timed_out"):
            _toggle(self.rollback_problems, d, add)

    # ------------------------------------------------------------ reading

    def first_stage(self, device_id: str) -> int | None:
        stages = self.stage_of.get(device_id)
        return stages[0] if stages else None

    def not_done(self, upto: int, *, staged_is_done: bool) -> int:
        """Devices of stages 0..`upto` not final (nor staged, when that is done)."""
        waiting = 0
        for i in range(upto + 1):
            counts = self.stage_counts[i]
            done = sum(counts[s] for s in FINAL_DEVICE_STATES)
            if staged_is_done:
                done += counts["staged"]
            waiting += sum(counts.values()) - done
        return waiting

    def timed_out(self, upto: int, now: float, timeout_s: float) -> list[str]:
        """Devices of stages 0..`upto` whose command is out `timeout_s` or longer.

        A staged device is not among them: it answered its command and waits for ours
        (a blue-green switch); its clock starts again when the switch goes out."""
        return sorted(d for d in self.sent.expired(now, timeout_s) if self._upto(d, upto))

    def _upto(self, device_id: str, upto: int) -> bool:
        first = self.first_stage(device_id)
        return first is not None and first <= upto

    def finished(self) -> int:
        """Devices final and still in the rollout (not left)."""
        return sum(self.counts[s] for s in FINAL_DEVICE_STATES if s not in LEFT_STATES)

    def open_views(self) -> list[AssignmentView]:
        """Devices with a command out and no answer yet (deploy, switch or rollback)."""
        return [self.views[d] for d in sorted(self.in_flight | self.rollback_open)]

    def smallest(self, devices: Iterable[str], n: int = 5) -> list[AssignmentView]:
        """The first `n` of `devices` by id, as views (for a message naming a few)."""
        return [self.views[d] for d in heapq.nsmallest(n, devices)]


def _toggle(s: set[str], item: str, add: bool) -> None:
    if add:
        s.add(item)
    else:
        s.discard(item)
