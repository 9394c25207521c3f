"""`plan_fanout`: region topics while they pay off, device topics when they would make
the broker deliver a command to many devices it does not name."""

from __future__ import annotations

from controller.fanout import plan_fanout


def fleet(n: int, region: str, prefix: str = "d") -> list[tuple[str, str]]:
    return [(f"{prefix}-{i:05d}", region) for i in range(n)]


def deliveries(sends: list[tuple[str | None, tuple[str, ...]]], sizes: dict[str, int]) -> int:
    return sum(sizes[r] if r is not None else 1 for r, _ in sends)


def test_a_whole_region_gets_one_command() -> None:
    """Every device of two regions: one region command each, naming all of them."""
    devices = fleet(2500, "eu") + fleet(2500, "us", "u")
    sends = plan_fanout(devices, {"eu": 2500, "us": 2500})
    assert [(r, len(ids)) for r, ids in sends] == [("eu", 2500), ("us", 2500)]


def test_a_few_devices_of_a_large_region_get_their_own_commands() -> None:
    """A 10 % canary in a region of 2,500: 250 device commands, not one region command
    that the broker would deliver to 2,500 devices (ten times the devices named)."""
    sends = plan_fanout(fleet(250, "eu"), {"eu": 2500})
    assert len(sends) == 250 and all(r is None and len(ids) == 1 for r, ids in sends)


def test_a_region_that_needs_many_commands_switches_to_device_topics() -> None:
    """Selectors cut by their byte budget: 3 commands for 1,000 devices would reach the
    region 3 times over (3,000 deliveries for 1,000 named): device topics instead; with
    a budget that holds them all, one region command."""
    devices = fleet(1000, "eu")
    small = plan_fanout(devices, {"eu": 1000}, budget_bytes=4000)
    assert len(small) == 1000 and {r for r, _ in small} == {None}
    large = plan_fanout(devices, {"eu": 1000})
    assert [(r, len(ids)) for r, ids in large] == [("eu", 1000)]
    two = plan_fanout(devices, {"eu": 1000}, budget_bytes=6000)
    assert [r for r, _ in two] == ["eu", "eu"]  # 2 x 1,000 is within 2 x 1,000 named


def test_every_device_is_named_once_and_deliveries_stay_within_twice_the_named() -> None:
    devices = fleet(3000, "eu") + fleet(40, "us", "u") + [("lone", "ap"), ("none", "")]
    sizes = {"eu": 3500, "us": 5000, "ap": 10, "": 0}
    sends = plan_fanout(devices, sizes, budget_bytes=20_000)
    named = [d for _, ids in sends for d in ids]
    assert sorted(named) == sorted(d for d, _ in devices)
    assert deliveries(sends, sizes) <= 2 * len(devices)
    assert ("ap", ("lone",)) not in sends and (None, ("lone",)) in sends
    assert (None, ("none",)) in sends
