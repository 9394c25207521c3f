"""Rollout strategies: small functions of one shape, `(targets, spec, rollout_id) -> stages`.

A strategy only decides which devices go in which stage and how long each stage
bakes; the planner decides when a stage starts, what the gates say and when it
ends. Cohorts are chosen by a stable hash of rollout id and device id, so a
restarted controller picks the same devices. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.messages import StartRollout


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


Strategy = Callable[[Sequence[Target], StartRollout, str], list[Stage]]


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


STRATEGIES: dict[str, Strategy] = {
    "direct": direct,
    "canary": canary,
    "progressive": progressive,
    "regional": regional,
    "rolling": rolling,
    "ab": ab,
    "blue-green": blue_green,
    "shadow": shadow,
}
