"""How one command reaches many devices: region topics or device topics. Pure.

A command on a region's topic (`hotswap/v1/regions/{r}/cmd`) with a selector
naming its devices costs the controller one publish, but the broker delivers it
to every device subscribed to that region, and each of them reads it to find
out whether it is named. Sent to each device's own topic, it costs one publish
per device and reaches only them. So the region topic pays off while the
devices named are a large part of the region, and stops paying off when a few
are named in a large region or when a stage needs many region commands (each
one delivered to the whole region):

    deliveries by region topic  = commands * region size
    deliveries by device topics = devices named

`plan_fanout` packs each region's devices into as few selectors as the byte
budget allows and takes the region topic only when its deliveries stay within
`max_amplification` times the devices named; otherwise, and for a device
alone, each device gets its own publish. So what the broker and the devices
handle grows with the devices the command is for, never with the fleet: the old
fixed chunks of 1,000 ids sent every device of a 2,500-device region three
commands, and of a 25,000-device region 25.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

Send = tuple[str | None, tuple[str, ...]]  # (region topic or None: each device's own, devices)

# A selector's ids must leave room in the device's message limit (256 KiB) for the
# signed manifest and the rest of the command.
COHORT_BUDGET_BYTES = 96 * 1024


def plan_fanout(
    devices: Iterable[tuple[str, str]],
    region_sizes: Mapping[str, int],
    *,
    budget_bytes: int = COHORT_BUDGET_BYTES,
    max_amplification: float = 2.0,
) -> list[Send]:
    """`devices` as (device id, region); `region_sizes`: devices subscribed to each
    region's topic (registered there). Regions in name order, devices in the order
    given."""
    by_region: dict[str, list[str]] = {}
    for device_id, region in devices:
        by_region.setdefault(region, []).append(device_id)
    sends: list[Send] = []
    for region, members in sorted(by_region.items()):
        if region and len(members) > 1:
            chunks = _pack(members, budget_bytes)
            size = max(region_sizes.get(region, 0), len(members))
            if len(chunks) * size <= max_amplification * len(members):
                sends += [(region, chunk) for chunk in chunks]
                continue
        sends += [(None, (d,)) for d in members]
    return sends


def _pack(members: list[str], budget_bytes: int) -> list[tuple[str, ...]]:
    """The ids in order, cut so that each chunk's JSON list stays within the budget."""
    chunks: list[tuple[str, ...]] = []
    current: list[str] = []
    used = 2  # []
    for d in members:
        cost = len(json.dumps(d)) + 1  # the id quoted, and a comma
        if current and used + cost > budget_bytes:
            chunks.append(tuple(current))
            current, used = [], 2
        current.append(d)
        used += cost
    if current:
        chunks.append(tuple(current))
    return chunks
