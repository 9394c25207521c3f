"""What the controller keeps in memory of each open rollout, updated by what changed.

The database stays the source of truth (every change is persisted before it is
applied here), but a tick must not re-read and re-summarise every row of every
open rollout: at 10,000 devices that was the controller's whole cost. A
`LiveRollout` is loaded once (on start, on reconnect, when a rollout opens) and
then follows the changes:

- `views`: each device's `AssignmentView` (what the planner reads), and
  `counts`, the number of devices per state, kept in step on every change;
- telemetry: each device's windows of the current stage, merged by addition into
  one `Rollup` per (version, served-or-mirrored), and the *cohort* totals the
  gates compare (`candidate`/`baseline`, or the sides `a`/`b` of an A/B test).
  Which cohort a device's windows count for follows its state (`cohort_of`):
  when a device moves (a baseline device activates the candidate), its rollups
  move from one total to the other by subtraction and addition. Each cohort also
  keeps its devices' own p95 and mean confidence as sums (`DeviceSpread`), updated
  for the one device a window or a move touches. So a gate reading costs the
  same at any N, and telemetry costs O(1) per window.

The comparison window (docs/gates.md): a device's first window of a version in a
stage holds its swap (the first calls on a new interpreter: cold caches, lazy
allocation), so it never counts, nor any window that starts less than
`GateSpec.settle_s` after that first window ended (the device's own clock, so no
skew between devices matters). The baseline side counts only windows that end
after the first settled window of the candidate side began: both sides cover the
same time. After a controller restart the rule starts over (a device's next window
is its first): more is left out, never less.

Pure: no I/O. The executor (controller.service) persists, then applies here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from controller.db import RolloutRow
from controller.gates import (
    CohortStats,
    DeviceSpread,
    TensorInputs,
    device_confidence,
    device_p95,
)
from controller.progress import AssignmentView, Progress
from controller.strategies import Cohort, Stage, strategy
from shared.manifest import ModelTask
from shared.messages import Histogram, StartRollout, TelemetryWindow
from shared.sketch import QuantileSketch, SketchData

# The side that swapped and the side it is compared with (A/B: B, then A).
CANDIDATE_SIDES: frozenset[str] = frozenset({"candidate", "b"})
BASELINE_SIDES: frozenset[str] = frozenset({"baseline", "a"})


@dataclass(slots=True)
class Rollup:
    """Telemetry merged by addition and taken apart by subtraction (counts exactly,
    sums to floating-point rounding).

    The histograms share fixed buckets and the sketches a fixed mapping, so every field
    adds; the tasks and the agreement rules a cohort's numbers mean are multisets for
    the same reason. `unsketched`: inferences of windows without a latency sketch
    (older agents).
    """

    count: int = 0
    errors: int = 0
    agreements: int = 0
    latency: list[int] = field(default_factory=list)
    latency_total: float = 0.0
    confidence: list[int] = field(default_factory=list)
    confidence_total: float = 0.0
    inputs: list[int] = field(default_factory=list)
    inputs_total: float = 0.0
    # (tensor name, layout) -> counts, with the plain sum as the last element
    tensors: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    tasks: Counter[str] = field(default_factory=Counter)  # ModelTask JSON -> windows
    rules: Counter[str] = field(default_factory=Counter)
    latency_sketch: QuantileSketch | None = None
    confidence_sketch: QuantileSketch | None = None
    unsketched: int = 0

    @classmethod
    def of_window(cls, stats: CohortStats, window: TelemetryWindow) -> Rollup:
        """One window as read by `stats` (the store's `window_stats`), with its sketches.

        A confidence the store did not count (computed by another rule than the
        version's task) is left out of the sketch too.
        """
        latency = QuantileSketch.from_data(window.latency_sketch) if window.latency_sketch else None
        confidence = None
        if window.confidence_sketch is not None and stats.confidence.n:
            confidence = QuantileSketch.from_data(window.confidence_sketch)
        return cls.of(
            replace(
                stats,
                latency_sketch=latency,
                confidence_sketch=confidence,
                unsketched=0 if latency is not None else stats.count,
            )
        )

    @classmethod
    def of(cls, stats: CohortStats) -> Rollup:
        """A rollup of `stats` (its sketches are taken, not copied)."""
        return cls(
            count=stats.count,
            errors=stats.errors,
            agreements=stats.agreements,
            latency=list(stats.latency.counts),
            latency_total=stats.latency.total,
            confidence=list(stats.confidence.counts),
            confidence_total=stats.confidence.total,
            inputs=list(stats.inputs.counts),
            inputs_total=stats.inputs.total,
            tensors={
                t.key: [*map(float, t.histogram.counts), t.histogram.total]
                for t in stats.input_tensors
            },
            tasks=Counter(t.model_dump_json() for t in stats.tasks),
            rules=Counter(stats.agreement_rules),
            latency_sketch=stats.latency_sketch,
            confidence_sketch=stats.confidence_sketch,
            # A CohortStats built from histograms alone (no sketch) counts as unsketched.
            unsketched=stats.unsketched
            if stats.latency_sketch is not None or stats.unsketched
            else stats.count,
        )

    @property
    def empty(self) -> bool:
        return self.count == 0 and not self.latency

    @property
    def confidence_n(self) -> int:
        return sum(self.confidence)

    def device_values(self) -> tuple[float | None, float | None]:
        """This rollup as one device's: the log of its p95 and its mean confidence."""
        p95 = device_p95(self.latency_sketch) if self.unsketched == 0 else None
        return p95, device_confidence(self.confidence_n, self.confidence_total)

    def add(self, other: Rollup, sign: int = 1) -> None:
        """self += other (sign 1) or self -= other (sign -1)."""
        self.count += sign * other.count
        self.errors += sign * other.errors
        self.agreements += sign * other.agreements
        self.latency = _added(self.latency, other.latency, sign)
        self.latency_total += sign * other.latency_total
        self.confidence = _added(self.confidence, other.confidence, sign)
        self.confidence_total += sign * other.confidence_total
        self.inputs = _added(self.inputs, other.inputs, sign)
        self.inputs_total += sign * other.inputs_total
        for key, counts in other.tensors.items():
            mine = self.tensors.get(key)
            if mine is None:
                self.tensors[key] = [sign * c for c in counts]
            elif len(mine) == len(counts):
                self.tensors[key] = [a + sign * b for a, b in zip(mine, counts, strict=True)]
        for tasks, theirs in ((self.tasks, other.tasks), (self.rules, other.rules)):
            for k, n in theirs.items():
                tasks[k] += sign * n
                if tasks[k] <= 0:
                    del tasks[k]
        # What a subtraction leaves at zero is as good as never seen.
        self.tensors = {k: v for k, v in self.tensors.items() if any(v[:-1])}
        self.unsketched += sign * other.unsketched
        self.latency_sketch = _sketch_added(self.latency_sketch, other.latency_sketch, sign)
        self.confidence_sketch = _sketch_added(
            self.confidence_sketch, other.confidence_sketch, sign
        )

    def stats(self, devices: int) -> CohortStats:
        base = CohortStats(devices=devices, count=self.count, errors=self.errors)
        return replace(
            base,
            latency=_hist(self.latency, self.latency_total, base.latency),
            confidence=_hist(self.confidence, self.confidence_total, base.confidence),
            inputs=_hist(self.inputs, self.inputs_total, base.inputs),
            agreements=self.agreements,
            input_tensors=tuple(
                TensorInputs(
                    name,
                    layout,
                    Histogram(counts=tuple(int(c) for c in v[:-1]), total=v[-1]),
                )
                for (name, layout), v in self.tensors.items()
            ),
            tasks=frozenset(ModelTask.model_validate_json(t) for t in self.tasks),
            agreement_rules=frozenset(self.rules),
            latency_sketch=self.latency_sketch.copy() if self.latency_sketch else None,
            confidence_sketch=self.confidence_sketch.copy() if self.confidence_sketch else None,
            unsketched=self.unsketched,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "n": self.count,
                "e": self.errors,
                "a": self.agreements,
                "l": self.latency,
                "lt": self.latency_total,
                "c": self.confidence,
                "ct": self.confidence_total,
                "i": self.inputs,
                "it": self.inputs_total,
                "t": [[k[0], k[1], v] for k, v in self.tensors.items()],
                "tasks": dict(self.tasks),
                "rules": dict(self.rules),
                "ls": _sketch_json(self.latency_sketch),
                "cs": _sketch_json(self.confidence_sketch),
                "u": self.unsketched,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Rollup:
        d: dict[str, Any] = json.loads(text)
        return cls(
            count=int(d["n"]),
            errors=int(d["e"]),
            agreements=int(d["a"]),
            latency=[int(x) for x in d["l"]],
            latency_total=float(d["lt"]),
            confidence=[int(x) for x in d["c"]],
            confidence_total=float(d["ct"]),
            inputs=[int(x) for x in d["i"]],
            inputs_total=float(d["it"]),
            tensors={(str(n), str(lay)): [float(x) for x in v] for n, lay, v in d["t"]},
            tasks=Counter({str(k): int(v) for k, v in d["tasks"].items()}),
            rules=Counter({str(k): int(v) for k, v in d["rules"].items()}),
            latency_sketch=_sketch_of(d.get("ls")),
            confidence_sketch=_sketch_of(d.get("cs")),
            # Rollups written before sketches: all their inferences are unsketched.
            unsketched=int(d["u"]) if "u" in d else int(d["n"]),
        )


def cohort_stats(devices: Iterable[Rollup]) -> CohortStats:
    """The cohort of these rollups, one a device, with their devices' spreads: what
    `LiveRollout.cohort` keeps up to date window by window, built at once."""
    total, latency, confidence, n = Rollup(), DeviceSpread(), DeviceSpread(), 0
    for r in devices:
        n += 1
        total.add(r)
        p95, mean_confidence = r.device_values()
        if p95 is not None:
            latency = latency.plus(p95)
        if mean_confidence is not None:
            confidence = confidence.plus(mean_confidence)
    return replace(total.stats(n), device_p95=latency, device_confidence=confidence)


def _sketch_added(
    mine: QuantileSketch | None, theirs: QuantileSketch | None, sign: int
) -> QuantileSketch | None:
    if theirs is None or not theirs.count:
        return mine
    if sign > 0:
        if mine is None:
            return theirs.copy()
        mine.merge(theirs)
        return mine
    if mine is not None:
        mine.subtract(theirs)
    return mine


def _sketch_json(sketch: QuantileSketch | None) -> dict[str, Any] | None:
    return sketch.to_data().model_dump() if sketch is not None else None


def _sketch_of(data: dict[str, Any] | None) -> QuantileSketch | None:
    return QuantileSketch.from_data(SketchData.model_validate(data)) if data else None


def _added(mine: list[int], theirs: list[int], sign: int) -> list[int]:
    if not theirs:
        return mine
    if not mine:
        return [sign * c for c in theirs]
    if len(mine) != len(theirs):
        return mine  # another bucket layout: not comparable, not merged
    return [a + sign * b for a, b in zip(mine, theirs, strict=True)]


def _hist(counts: list[int], total: float, default: Histogram) -> Histogram:
    if len(counts) != len(default.counts):
        return default
    return Histogram(counts=tuple(counts), total=total)


def cohort_of(
    strategy_of: str,
    view: AssignmentView,
    version: str,
    version_b: str | None,
    window_version: str,
    shadow: bool,
) -> Cohort | None:
    """Which cohort a device's windows of `window_version` count for, in its state now
    (the strategy's `cohort` rule)."""
    rule = strategy(strategy_of).cohort
    return rule(view.state, view.version, version, version_b, window_version, shadow)


RollupKey = tuple[str, bool]  # (version, shadow)


@dataclass
class LiveRollout:
    """One open rollout's assignments and telemetry, in memory (see the module docstring)."""

    row: RolloutRow  # as last persisted
    spec: StartRollout
    stages: list[Stage]
    progress: Progress  # the devices' assignments, as the planner reads them
    regions: dict[str, str] = field(default_factory=dict)  # device -> region
    # device -> (version, shadow) -> what it reported this stage
    rollups: dict[str, dict[RollupKey, Rollup]] = field(default_factory=dict)
    cohorts: dict[Cohort, Rollup] = field(default_factory=dict)
    # cohort -> device -> how many of its rollups count there (a device counts once)
    members: dict[Cohort, Counter[str]] = field(default_factory=dict)
    # Served inferences of the candidate on devices that activated it, the whole rollout
    served_latency_total_ms: float = 0.0
    served_count: int = 0
    dirty_rollups: set[str] = field(default_factory=set)  # devices whose rollups changed
    stage_index: int = 0
    stage_started_at: float = 0.0
    # The comparison window (see the module docstring): the end of each (device, version,
    # shadow)'s first window this stage, and when the candidate side's first settled
    # window began (None: none yet, the baseline side counts nothing).
    first_window_end: dict[tuple[str, str, bool], float] = field(default_factory=dict)
    compare_from: float | None = None
    # cohort -> device -> (log p95, mean confidence) it adds to `spreads` (None: too few)
    device_values: dict[Cohort, dict[str, tuple[float | None, float | None]]] = field(
        default_factory=dict
    )
    spreads: dict[Cohort, tuple[DeviceSpread, DeviceSpread]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        row: RolloutRow,
        spec: StartRollout,
        stages: list[Stage],
        views: list[AssignmentView],
        regions: dict[str, str],
    ) -> LiveRollout:
        live = cls(row, spec, stages, Progress.of(stages, views, spec.retries))
        live.stage_index = row.stage_index
        live.stage_started_at = row.stage_started_at or row.created_at
        live.served_latency_total_ms = row.served_latency_total_ms
        live.served_count = row.served_count
        live.regions = dict(regions)
        return live

    @property
    def views(self) -> dict[str, AssignmentView]:
        """Each device's assignment (read only: changes go through `set_view`)."""
        return self.progress.views

    @property
    def counts(self) -> Counter[str]:
        return self.progress.counts

    @property
    def rollback_counts(self) -> Counter[str]:
        return self.progress.rollback_counts

    @property
    def rollout_id(self) -> str:
        return self.row.rollout_id

    @property
    def strategy(self) -> str:
        return self.row.strategy

    @property
    def version(self) -> str:
        return self.row.version

    @property
    def version_b(self) -> str | None:
        return self.row.version_b

    # ------------------------------------------------------------ assignments

    def set_view(self, view: AssignmentView) -> None:
        """A device's assignment changed (already persisted): counts and cohorts follow."""
        old = self.views.get(view.device_id)
        self.progress.update(view)
        for (wv, shadow), rollup in self.rollups.get(view.device_id, {}).items():
            before = (
                cohort_of(self.strategy, old, self.version, self.version_b, wv, shadow)
                if old is not None
                else None
            )
            after = cohort_of(self.strategy, view, self.version, self.version_b, wv, shadow)
            if before != after:
                if before is not None:
                    self._count(before, view.device_id, rollup, -1)
                if after is not None:
                    self._count(after, view.device_id, rollup, 1)

    # ------------------------------------------------------------ telemetry

    def add_window(
        self,
        device_id: str,
        version: str,
        shadow: bool,
        rollup: Rollup,
        window_end: float,
        window_start: float | None = None,
    ) -> bool:
        """One telemetry window of a device of this rollout; False when nothing changed
        (another device, or a window before the stage, before its device settled or
        before the comparison window, that served nothing counted). Times are the
        device's (`window_start` None: taken as `window_end`)."""
        view = self.views.get(device_id)
        if view is None:
            return False
        served = self.add_served(device_id, version, shadow, rollup)
        if window_end < self.stage_started_at:
            return served
        start = window_end if window_start is None else window_start
        first_end = self.first_window_end.setdefault((device_id, version, shadow), window_end)
        if first_end == window_end or start < first_end + self.spec.gates.settle_s:
            return served  # the swap's window, or still settling
        cohort = cohort_of(self.strategy, view, self.version, self.version_b, version, shadow)
        if cohort in CANDIDATE_SIDES and self.compare_from is None:
            self.compare_from = start
        elif cohort in BASELINE_SIDES and (
            self.compare_from is None or window_end <= self.compare_from
        ):
            return served  # before the candidate side's comparison window

        mine = self.rollups.setdefault(device_id, {})
        new_key = (version, shadow) not in mine
        mine.setdefault((version, shadow), Rollup()).add(rollup)
        self.dirty_rollups.add(device_id)
        if cohort is not None:
            self._count(cohort, device_id, rollup, 1, new_key=new_key)
        return True

    def add_served(self, device_id: str, version: str, shadow: bool, rollup: Rollup) -> bool:
        """Count a window for the candidate's served latency (the status's average) if it
        is one: served, of the candidate, by a device that activated it."""
        view = self.views.get(device_id)
        if (
            view is None
            or shadow
            or version != self.version
            or view.state != "activated"
            or strategy(self.strategy).mirrors
        ):
            return False
        self.served_latency_total_ms += rollup.latency_total
        self.served_count += rollup.count
        return True

    def restore_rollup(self, device_id: str, version: str, shadow: bool, rollup: Rollup) -> None:
        """A persisted rollup of the current stage (after a restart)."""
        view = self.views.get(device_id)
        if view is None:
            return
        self.rollups.setdefault(device_id, {})[(version, shadow)] = rollup
        cohort = cohort_of(self.strategy, view, self.version, self.version_b, version, shadow)
        if cohort is not None:
            self._count(cohort, device_id, rollup, 1)

    def _count(
        self, cohort: Cohort, device_id: str, rollup: Rollup, sign: int, *, new_key: bool = True
    ) -> None:
        self.cohorts.setdefault(cohort, Rollup()).add(rollup, sign)
        members = self.members.setdefault(cohort, Counter())
        if sign > 0 and new_key:
            members[device_id] += 1
        elif sign < 0:
            members[device_id] -= 1
            if members[device_id] <= 0:
                del members[device_id]
        self._refresh_device(cohort, device_id)

    def _refresh_device(self, cohort: Cohort, device_id: str) -> None:
        """Re-read one device's own p95 and mean confidence in `cohort` (from its rollups
        counting there now) into the cohort's spreads: O(one device)."""
        view = self.views.get(device_id)
        parts = [
            r
            for (wv, shadow), r in self.rollups.get(device_id, {}).items()
            if view is not None
            and cohort_of(self.strategy, view, self.version, self.version_b, wv, shadow) == cohort
        ]
        if not parts:
            new: tuple[float | None, float | None] = (None, None)
        elif len(parts) == 1:
            new = parts[0].device_values()
        else:
            merged = Rollup()
            for r in parts:
                merged.add(r)
            new = merged.device_values()
        values = self.device_values.setdefault(cohort, {})
        old = values.pop(device_id, (None, None))
        if new != (None, None):
            values[device_id] = new
        latency, confidence = self.spreads.get(cohort, (DeviceSpread(), DeviceSpread()))
        if old[0] is not None:
            latency = latency.plus(old[0], -1)
        if old[1] is not None:
            confidence = confidence.plus(old[1], -1)
        if new[0] is not None:
            latency = latency.plus(new[0])
        if new[1] is not None:
            confidence = confidence.plus(new[1])
        self.spreads[cohort] = (latency, confidence)

    def cohort(self, name: Cohort) -> CohortStats:
        rollup = self.cohorts.get(name)
        devices = len(self.members.get(name, ()))
        stats = rollup.stats(devices) if rollup is not None else CohortStats(devices=devices)
        latency, confidence = self.spreads.get(name, (DeviceSpread(), DeviceSpread()))
        return replace(
            stats,
            device_p95=latency,
            device_confidence=confidence,
            window_start=self.compare_from,
            settle=self.settle_rule(),
        )

    def settle_rule(self) -> str:
        """The settle rule as the status states it."""
        return (
            "each device's first window of a version in the stage (it holds the swap) and "
            f"windows starting within {self.spec.gates.settle_s:g} s after it are left out; "
            "the baseline counts from the candidate's first window left in"
        )

    def new_stage(self, index: int, started_at: float) -> None:
        """The gates read the new stage's windows only."""
        self.stage_index, self.stage_started_at = index, started_at
        self.rollups.clear()
        self.cohorts.clear()
        self.members.clear()
        self.dirty_rollups.clear()
        self.first_window_end.clear()
        self.compare_from = None
        self.device_values.clear()
        self.spreads.clear()

    def avg_served_latency_ms(self) -> float | None:
        return self.served_latency_total_ms / self.served_count if self.served_count else None
