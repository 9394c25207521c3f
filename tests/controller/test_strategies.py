"""Strategies on plain data: who goes in which stage, deterministically."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.strategies import STRATEGIES, Target, ab_split
from shared.messages import StageSpec, StartRollout

TARGETS = [Target(f"dev-{i:02d}", "eu" if i % 3 else "us") for i in range(50)]


def spec(**kw: object) -> StartRollout:
    return StartRollout(model="m", version="1", **kw)  # type: ignore[arg-type]


def flat(stages) -> list[str]:
    return [d for s in stages for d in s.devices]


def test_canary_takes_the_percentage_deterministically_per_rollout() -> None:
    """ceil(10% of 50) = 5 canaries; same rollout → same ones; another rollout → others."""
    one = STRATEGIES["canary"](TARGETS, spec(strategy="canary", canary_percent=10), "r-1")
    again = STRATEGIES["canary"](TARGETS, spec(strategy="canary", canary_percent=10), "r-1")
    other = STRATEGIES["canary"](TARGETS, spec(strategy="canary", canary_percent=10), "r-2")
    assert len(one[0].devices) == 5 and one == again
    assert one[0].devices != other[0].devices
    assert sorted(flat(one)) == sorted(t.device_id for t in TARGETS)
    assert one[0].bake_s == 300 and one[1].bake_s == 0


def test_canary_of_one_device_is_a_single_stage() -> None:
    """At least one canary; nothing left means no second stage."""
    stages = STRATEGIES["canary"](TARGETS[:1], spec(strategy="canary"), "r")
    assert [s.devices for s in stages] == [("dev-00",)]


def test_progressive_stages_are_cumulative_shares_with_their_durations() -> None:
    """10/50/100% of 50 devices → 5, 20, 25 new devices; each device exactly once."""
    s = spec(strategy="progressive", stages=(StageSpec(percent=10, duration_s=60),
             StageSpec(percent=50, duration_s=120), StageSpec(percent=100, duration_s=0)))  # fmt: skip
    stages = STRATEGIES["progressive"](TARGETS, s, "r")
    assert [len(x.devices) for x in stages] == [5, 20, 25]
    assert [x.bake_s for x in stages] == [60, 120, 0]
    assert len(set(flat(stages))) == 50


def test_regional_follows_the_given_order_and_puts_unnamed_regions_last() -> None:
    """Named regions first in order, others after; each stage carries its region."""
    targets = [*TARGETS, Target("x-1", "ap")]
    stages = STRATEGIES["regional"](
        targets, spec(strategy="regional", regions=("us", "eu"), region_delay_s=30), "r"
    )
    assert [s.region for s in stages] == ["us", "eu", "ap"]
    assert [s.bake_s for s in stages] == [30, 30, 0]
    assert len(flat(stages)) == 51


def test_rolling_makes_batches_of_the_size() -> None:
    """50 devices in batches of 20 → 20, 20, 10; the last batch does not wait."""
    stages = STRATEGIES["rolling"](
        TARGETS, spec(strategy="rolling", batch_size=20, batch_delay_s=5), "r"
    )
    assert [len(s.devices) for s in stages] == [20, 20, 10]
    assert [s.bake_s for s in stages] == [5, 5, 0]


def test_direct_is_one_stage_and_ab_splits_in_halves() -> None:
    """Direct: everything at once. A/B: a test stage and a winner stage; halves are stable."""
    assert len(STRATEGIES["direct"](TARGETS, spec(), "r")) == 1
    ab = STRATEGIES["ab"](TARGETS, spec(strategy="ab", version_b="2", test_duration_s=9), "r")
    assert [s.name for s in ab] == ["a/b test", "winner"] and ab[0].bake_s == 9
    a_side, b_side = ab_split([t.device_id for t in TARGETS], "r")
    assert len(a_side) == 25 and len(b_side) == 25 and not set(a_side) & set(b_side)
    assert ab_split([t.device_id for t in TARGETS], "r") == (a_side, b_side)


@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "progressive"},
        {
            "strategy": "progressive",
            "stages": (StageSpec(percent=50, duration_s=0), StageSpec(percent=20, duration_s=0)),
        },
        {"strategy": "progressive", "stages": (StageSpec(percent=50, duration_s=0),)},
        {"strategy": "regional"},
        {"strategy": "ab"},
        {"strategy": "ab", "version_b": "1"},
        {"strategy": "regional", "regions": ("bad/region",)},
    ],
)
def test_invalid_strategy_settings_are_refused(bad: dict[str, object]) -> None:
    """Requests that cannot make a rollout fail validation with a message."""
    with pytest.raises(ValidationError):
        spec(**bad)
