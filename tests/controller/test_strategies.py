"""Rollout strategies on plain data: who goes in which stage, and how long each stage bakes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from controller.strategies import (
    STRATEGIES,
    Stage,
    Target,
    ab,
    ab_split,
    canary,
    direct,
    progressive,
    regional,
    rolling,
    stable_order,
)
from shared.messages import StageSpec, StartRollout

REGIONS = ("eu", "us", "ap")
FLEET = [Target(f"dev-{i:02d}", REGIONS[i % 3]) for i in range(50)]
IDS = sorted(t.device_id for t in FLEET)


def spec(**kw: object) -> StartRollout:
    return StartRollout(model="m", version="1", **kw)


def stages_spec(*pairs: tuple[float, float]) -> StartRollout:
    return spec(
        strategy="progressive",
        stages=tuple(StageSpec(percent=p, duration_s=d) for p, d in pairs),
    )


def flat(stages: Sequence[Stage]) -> list[str]:
    return [d for s in stages for d in s.devices]


def assert_partition(stages: Sequence[Stage], targets: Sequence[Target]) -> None:
    devices = flat(stages)
    assert len(devices) == len(set(devices)), "a device is in two stages"
    assert sorted(devices) == sorted(t.device_id for t in targets)


# ---------------------------------------------------------------- direct


def test_direct_is_one_stage_with_every_target_and_no_bake() -> None:
    """direct → a single stage holding all targets, no bake, no region."""
    (stage,) = direct(FLEET, spec(), "r-1")
    assert sorted(stage.devices) == IDS
    assert stage.bake_s == 0.0 and stage.region is None


# ---------------------------------------------------------------- canary


@pytest.mark.parametrize(
    ("n", "percent", "expected"),
    [(50, 10, 5), (50, 5, 3), (50, 1, 1), (10, 25, 3), (3, 10, 1), (1, 50, 1), (50, 99, 50)],
)
def test_canary_picks_ceil_percent_devices_at_least_one(
    n: int, percent: float, expected: int
) -> None:
    """The canary cohort is ceil(n * percent / 100) devices, never fewer than one."""
    stages = canary(FLEET[:n], spec(strategy="canary", canary_percent=percent), "r-1")
    assert len(stages[0].devices) == expected
    assert_partition(stages, FLEET[:n])


def test_canary_stages_bake_and_names() -> None:
    """Canary bakes canary_duration_s, the rest stage does not bake."""
    first, rest = canary(FLEET, spec(strategy="canary", canary_duration_s=120), "r-1")
    assert (first.name, first.bake_s) == ("canary", 120)
    assert (rest.name, rest.bake_s) == ("rest", 0.0)


def test_canary_single_device_has_no_rest_stage() -> None:
    """With one target the canary is everything and no empty 'rest' stage is produced."""
    stages = canary(FLEET[:1], spec(strategy="canary"), "r-1")
    assert [s.devices for s in stages] == [(FLEET[0].device_id,)]


def test_canary_is_deterministic_for_the_same_rollout_id() -> None:
    """The same rollout id picks the same cohort, whatever the input order."""
    s = spec(strategy="canary", canary_percent=20)
    assert canary(FLEET, s, "r-1") == canary(list(reversed(FLEET)), s, "r-1")


def test_canary_cohort_differs_between_rollouts() -> None:
    """Another rollout id picks another cohort of the same size (~50 devices)."""
    s = spec(strategy="canary", canary_percent=20)
    one, two = canary(FLEET, s, "r-1")[0], canary(FLEET, s, "r-2")[0]
    assert len(one.devices) == len(two.devices) == 10
    assert set(one.devices) != set(two.devices)


def test_stable_order_is_a_permutation() -> None:
    """stable_order returns every target once and depends on the rollout id only."""
    order = stable_order(FLEET, "r-9")
    assert sorted(order, key=lambda t: t.device_id) == sorted(FLEET, key=lambda t: t.device_id)
    assert order == stable_order(list(reversed(FLEET)), "r-9")


# ---------------------------------------------------------------- progressive


def test_progressive_cumulative_shares_and_durations() -> None:
    """10:60,25:120,100:0 on 50 devices → stages of 5, 8, 37 with those bake times."""
    stages = progressive(FLEET, stages_spec((10, 60), (25, 120), (100, 0)), "r-1")
    assert [len(s.devices) for s in stages] == [5, 8, 37]
    assert [s.bake_s for s in stages] == [60, 120, 0]
    assert [s.name for s in stages] == ["10%", "25%", "100%"]
    assert_partition(stages, FLEET)


def test_progressive_covers_every_device_exactly_once_for_any_size() -> None:
    """For any fleet size each device lands in exactly one stage, each stage non-empty."""
    s = stages_spec((1, 10), (5, 10), (33.3, 10), (50, 10), (100, 0))
    for n in range(1, 51):
        stages = progressive(FLEET[:n], s, "r-1")
        assert_partition(stages, FLEET[:n])
        assert all(st.devices for st in stages), n


def test_progressive_small_fleet_gives_each_stage_at_least_one_device() -> None:
    """3 devices at 10/20/100 → one device per stage, not empty stages."""
    stages = progressive(FLEET[:3], stages_spec((10, 5), (20, 5), (100, 0)), "r-1")
    assert [len(s.devices) for s in stages] == [1, 1, 1]


def test_progressive_is_deterministic() -> None:
    """Same targets and rollout id → same stages."""
    s = stages_spec((20, 5), (100, 0))
    assert progressive(FLEET, s, "r-7") == progressive(list(reversed(FLEET)), s, "r-7")


# ---------------------------------------------------------------- regional


def test_regional_follows_spec_order_with_unnamed_regions_last() -> None:
    """Stages go in spec.regions order, then unnamed regions (sorted); stage.region is set."""
    targets = [*FLEET, Target("x-1", "af"), Target("x-2", "af")]
    stages = regional(
        targets, spec(strategy="regional", regions=("us", "eu"), region_delay_s=30), "r"
    )
    assert [s.region for s in stages] == ["us", "eu", "af", "ap"]
    assert [s.name for s in stages] == ["us", "eu", "af", "ap"]
    by_region = {t.device_id: t.region for t in targets}
    for st in stages:
        assert st.devices and all(by_region[d] == st.region for d in st.devices)
    assert_partition(stages, targets)


def test_regional_bakes_between_regions_and_not_after_the_last() -> None:
    """Each region bakes region_delay_s except the last stage, which bakes 0."""
    stages = regional(FLEET, spec(strategy="regional", regions=REGIONS, region_delay_s=45), "r")
    assert [s.bake_s for s in stages] == [45, 45, 0.0]
    assert stages[-1].region == "ap"


def test_regional_skips_named_regions_without_targets() -> None:
    """A named region with no targets yields no empty stage."""
    stages = regional(FLEET, spec(strategy="regional", regions=("mars", "eu")), "r")
    assert [s.region for s in stages] == ["eu", "ap", "us"]


def test_regional_duplicate_region_names_do_not_duplicate_devices() -> None:
    """regions=('eu','eu') runs eu once: no device lands in two stages."""
    stages = regional(FLEET, spec(strategy="regional", regions=("eu", "eu")), "r")
    assert [s.region for s in stages] == ["eu", "ap", "us"]
    assert_partition(stages, FLEET)


# ---------------------------------------------------------------- rolling


@pytest.mark.parametrize(
    ("n", "size", "sizes"),
    [(50, 20, [20, 20, 10]), (50, 50, [50]), (5, 1, [1, 1, 1, 1, 1]), (7, 3, [3, 3, 1])],
)
def test_rolling_batch_sizes(n: int, size: int, sizes: list[int]) -> None:
    """Batches of batch_size, the last one holding the remainder; names count the batches."""
    stages = rolling(FLEET[:n], spec(strategy="rolling", batch_size=size, batch_delay_s=9), "r")
    assert [len(s.devices) for s in stages] == sizes
    assert [s.name for s in stages] == [f"batch {i + 1}/{len(sizes)}" for i in range(len(sizes))]
    assert [s.bake_s for s in stages] == [9.0] * (len(sizes) - 1) + [0.0]
    assert_partition(stages, FLEET[:n])


# ---------------------------------------------------------------- A/B


def test_ab_is_a_test_stage_then_a_winner_stage_over_everyone() -> None:
    """ab → 'a/b test' baking test_duration_s, then 'winner'; both hold every target."""
    stages = ab(FLEET, spec(strategy="ab", version_b="2", test_duration_s=9), "r")
    assert [s.name for s in stages] == ["a/b test", "winner"]
    assert [s.bake_s for s in stages] == [9, 0.0]
    assert all(sorted(s.devices) == IDS for s in stages)


def test_ab_split_is_stable_disjoint_halves() -> None:
    """ab_split: disjoint halves covering everyone (A gets the odd one), same for the same id."""
    a_side, b_side = ab_split(IDS, "r-1")
    assert (len(a_side), len(b_side)) == (25, 25)
    assert not set(a_side) & set(b_side) and sorted(a_side + b_side) == IDS
    assert ab_split(list(reversed(IDS)), "r-1") == (a_side, b_side)
    assert ab_split(IDS, "r-2") != (a_side, b_side)
    odd_a, odd_b = ab_split(IDS[:7], "r-1")
    assert (len(odd_a), len(odd_b)) == (4, 3)


# ---------------------------------------------------------------- every strategy


@pytest.mark.parametrize("name", ["direct", "canary", "progressive", "regional", "rolling"])
def test_every_strategy_partitions_the_targets(name: str) -> None:
    """The union of stages equals the targets and no device appears twice."""
    s = spec(
        strategy=name,
        stages=(StageSpec(percent=30, duration_s=1), StageSpec(percent=100, duration_s=0)),
        regions=("us",),
        batch_size=7,
    )
    assert_partition(STRATEGIES[name].stages(FLEET, s, "r-3"), FLEET)


# ---------------------------------------------------------------- StartRollout validation


def test_progressive_without_stages_is_rejected() -> None:
    """strategy=progressive with no stages → ValidationError."""
    with pytest.raises(ValidationError, match="needs stages"):
        spec(strategy="progressive")


@pytest.mark.parametrize(
    "shares",
    [(50, 25, 100), (25, 25, 100), (10, 50), (100, 100)],
    ids=["decreasing", "repeated", "not-ending-at-100", "repeated-100"],
)
def test_progressive_stages_must_grow_and_end_at_100(shares: tuple[float, ...]) -> None:
    """Non-increasing shares or a last share below 100 → ValidationError."""
    with pytest.raises(ValidationError, match="grow and end at 100"):
        stages_spec(*((p, 0) for p in shares))


def test_progressive_valid_stages_are_accepted() -> None:
    """Growing shares ending at 100 validate."""
    assert [s.percent for s in stages_spec((10, 1), (50, 1), (100, 0)).stages] == [10, 50, 100]


@pytest.mark.parametrize("percent", [0, -5, 101])
def test_stage_percent_out_of_range_is_rejected(percent: float) -> None:
    """A stage share must be in (0, 100]."""
    with pytest.raises(ValidationError):
        StageSpec(percent=percent, duration_s=0)


def test_regional_without_regions_is_rejected() -> None:
    """strategy=regional with no regions → ValidationError."""
    with pytest.raises(ValidationError, match="needs --regions"):
        spec(strategy="regional")


def test_ab_needs_a_different_version_b() -> None:
    """strategy=ab without version_b, or with version_b == version → ValidationError."""
    with pytest.raises(ValidationError, match="version-b"):
        spec(strategy="ab")
    with pytest.raises(ValidationError, match="version-b"):
        spec(strategy="ab", version_b="1")


def test_region_names_must_be_identifiers() -> None:
    """A region name with a topic separator is rejected."""
    with pytest.raises(ValidationError):
        spec(strategy="regional", regions=("bad/region",))


@pytest.mark.parametrize("percent", [0, 100])
def test_canary_percent_must_be_strictly_between_0_and_100(percent: float) -> None:
    """canary_percent of 0 or 100 is rejected."""
    with pytest.raises(ValidationError):
        spec(strategy="canary", canary_percent=percent)
