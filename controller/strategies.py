"""Rollout strategies: each one its stages and the few things that make it itself.

A strategy's stages come from a small function of one shape,
`(targets, spec, rollout_id) -> stages`: which devices go in which stage, how long
each stage bakes, what its command does (deploy, stage in standby, switch,
shadow). Cohorts are chosen by a stable hash of rollout id and device id, so a
restarted controller picks the same devices.

Everything else a strategy does differently is said once, here, in its
`Strategy` entry of `STRATEGIES`, and read from there by the planner, the
controller and its in-memory rollouts, instead of `if strategy == …` checks
spread over them: which cohort a device's telemetry counts for (`cohort`), whether
failed devices count against the abort threshold, whether deploys activate or
only load in standby, whether they mirror live inputs (shadow), whether two
versions run side by side and a winner is decided (A/B). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from shared.messages import StartRollout, StrategyName


@dataclass(frozen=True, slots=True)
class Target:
    device_id: str
    region: str


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    devices: tuple[str, ...]
    bake_s: float = 0.0  # after its devices are done, gates watch the stage this long
    region: str | None = None  # set: one publish on the region's topic reaches the stage
    # deploy; stage (load into standby only); switch (flip to it); shadow (stage + mirror)
    action: str = "deploy"


StageFn = Callable[[Sequence[Target], StartRollout, str], list[Stage]]


def stable_order(targets: Sequence[Target], rollout_id: str) -> list[Target]:
    """Targets shuffled deterministically per rollout (same input, same order)."""

    def key(t: Target) -> str:
        return hashlib.sha256(f"{rollout_id}/{t.device_id}".encode()).hexdigest()

    return sorted(targets, key=key)


def _ids(targets: Sequence[Target]) -> tuple[str, ...]:
    return tuple(sorted(t.device_id for t in targets))


def direct(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Every target at once, in one stage."""
    return [Stage("all", _ids(targets))] if targets else []


def canary(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """`canary_percent` of the targets (at least one), bake, then all the others."""
    ordered = stable_order(targets, rollout_id)
    if not ordered:
        return []
    n = min(len(ordered), max(1, math.ceil(len(ordered) * spec.canary_percent / 100)))
    stages = [Stage("canary", _ids(ordered[:n]), spec.canary_duration_s)]
    if ordered[n:]:
        stages.append(Stage("rest", _ids(ordered[n:])))
    return stages


def progressive(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Cumulative shares (`10:5m,25:5m,100:0`), each stage baking its duration."""
    ordered = stable_order(targets, rollout_id)
    stages: list[Stage] = []
    done = 0
    for s in spec.stages:
        upto = (
            len(ordered)
            if s.percent >= 100
            else max(done + 1, math.ceil(len(ordered) * s.percent / 100))
        )
        upto = min(upto, len(ordered))
        if upto > done:
            stages.append(Stage(f"{s.percent:g}%", _ids(ordered[done:upto]), s.duration_s))
            done = upto
    return stages


def regional(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Region by region in the order given; targets of unnamed regions go last."""
    stages = []
    named = set(spec.regions)
    for region in dict.fromkeys(spec.regions):  # a region named twice still runs once
        members = [t for t in targets if t.region == region]
        if members:
            stages.append(Stage(region, _ids(members), spec.region_delay_s, region=region))
    rest = sorted({t.region for t in targets if t.region not in named})
    for region in rest:
        members = [t for t in targets if t.region == region]
        stages.append(Stage(region, _ids(members), spec.region_delay_s, region=region))
    if stages:
        stages[-1] = Stage(stages[-1].name, stages[-1].devices, 0.0, stages[-1].region)
    return stages


def rolling(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Batches of `batch_size`, `batch_delay` apart."""
    ordered = stable_order(targets, rollout_id)
    size = spec.batch_size
    batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    return [
        Stage(
            f"batch {i + 1}/{len(batches)}",
            _ids(b),
            spec.batch_delay_s if i < len(batches) - 1 else 0.0,
        )
        for i, b in enumerate(batches)
    ]


def ab_split(targets: Sequence[str], rollout_id: str) -> tuple[list[str], list[str]]:
    """A/B cohorts: the stable order's first half runs A, the rest B."""
    ordered = [t.device_id for t in stable_order([Target(d, "") for d in targets], rollout_id)]
    half = (len(ordered) + 1) // 2
    return sorted(ordered[:half]), sorted(ordered[half:])


def ab(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Both versions side by side for `test_duration`, then the winner everywhere."""
    everyone = _ids(targets)
    if not everyone:
        return []
    return [Stage("a/b test", everyone, spec.test_duration_s), Stage("winner", everyone)]


def blue_green(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Every device stages the candidate in standby; then one switch per region flips them."""
    everyone = _ids(targets)
    if not everyone:
        return []
    return [Stage("stage", everyone, action="stage"), Stage("switch", everyone, action="switch")]


def shadow(targets: Sequence[Target], spec: StartRollout, rollout_id: str) -> list[Stage]:
    """Every device mirrors live inputs to the candidate; the gates read what it would do."""
    everyone = _ids(targets)
    if not everyone:
        return []
    return [Stage("shadow", everyone, spec.shadow_duration_s, action="shadow")]


# ------------------------------------------------------------ cohorts

# The telemetry the gates compare: the candidate with the baseline, or the two sides
# of an A/B test.
Cohort = Literal["candidate", "baseline", "a", "b"]

# (device state, the device's side ("" = the rollout's version), the rollout's
# version, its B version, the window's version, mirrored or served) -> cohort
CohortRule = Callable[[str, str, str, str | None, str, bool], Cohort | None]


def served_cohort(
    state: str, side: str, version: str, version_b: str | None, window: str, mirrored: bool
) -> Cohort | None:
    """Devices that activated the candidate against those not yet touched, as served."""
    if mirrored:
        return None
    if state == "activated":
        return "candidate" if window == version else None
    if state == "pending":
        return "baseline" if window != version else None
    return None


def shadow_cohort(
    state: str, side: str, version: str, version_b: str | None, window: str, mirrored: bool
) -> Cohort | None:
    """What the staged devices mirrored to the candidate against what they served."""
    if state != "staged":
        return None
    if mirrored:
        return "candidate" if window == version else None
    return "baseline" if window != version else None


def ab_cohort(
    state: str, side: str, version: str, version_b: str | None, window: str, mirrored: bool
) -> Cohort | None:
    """The two sides of an A/B test, each as served by the devices running it."""
    if mirrored or state != "activated" or window != (side or version):
        return None
    if window == version:
        return "a"
    return "b" if window == version_b else None


@dataclass(frozen=True, slots=True)
class Strategy:
    """A strategy: its stages, and how it differs from a plain deploy."""

    name: StrategyName
    stages: StageFn
    cohort: CohortRule = served_cohort
    # Failed devices count against `max_failure_percent` (a direct rollout has no
    # threshold: it deploys everywhere and reports what failed).
    failure_threshold: bool = True
    # Two versions served side by side; after the first stage a winner is decided
    # from their comparison (not from the gates) and goes everywhere.
    two_versions: bool = False
    # Deploys only load the candidate in standby (a later switch, or never).
    standby: bool = False
    # Deploys mirror live inputs to the standby candidate: nothing of it is served.
    mirrors: bool = False


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("direct", direct, failure_threshold=False),
        Strategy("canary", canary),
        Strategy("progressive", progressive),
        Strategy("regional", regional),
        Strategy("rolling", rolling),
        Strategy("ab", ab, cohort=ab_cohort, two_versions=True),
        Strategy("blue-green", blue_green, standby=True),
        Strategy("shadow", shadow, cohort=shadow_cohort, standby=True, mirrors=True),
    )
}


def strategy(name: str) -> Strategy:
    """The strategy of that name; ValueError for one this controller does not know."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}") from None
