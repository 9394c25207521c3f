"""The topic tree: one module builds and parses every topic, and refuses bad ids."""

from __future__ import annotations

import pytest

from shared import topics


def test_builders_follow_the_design_tree() -> None:
    """Device, region, rollout and controller topics are where DESIGN.md §2 puts them."""
    assert topics.device_cmd("cam-1") == "hotswap/v1/devices/cam-1/cmd"
    assert topics.device_state("cam-1") == "hotswap/v1/devices/cam-1/state"
    assert topics.device_events("cam-1") == "hotswap/v1/devices/cam-1/events"
    assert topics.device_telemetry("cam-1") == "hotswap/v1/devices/cam-1/telemetry"
    assert topics.region_cmd("eu-west") == "hotswap/v1/regions/eu-west/cmd"
    assert topics.rollout_status("r-1") == "hotswap/v1/rollouts/r-1/status"
    assert topics.CONTROLLER_REQUESTS == "hotswap/v1/controller/requests"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "cam 1", "x" * 65, "-leading", "é"])
def test_ids_that_would_break_the_tree_are_refused(bad: str) -> None:
    """Wildcards, separators, spaces, empty and over-long ids raise TopicError."""
    with pytest.raises(topics.TopicError):
        topics.device_cmd(bad)


def test_device_topics_parse_back_to_id_and_leaf() -> None:
    """parse_device_topic inverts the builders and rejects anything else."""
    for leaf in ("cmd", "state", "events", "telemetry"):
        parsed = topics.parse_device_topic(f"hotswap/v1/devices/gw-7/{leaf}")
        assert (parsed.device_id, parsed.leaf) == ("gw-7", leaf)
    for bad in ("hotswap/v1/devices/gw-7", "hotswap/v1/devices/gw-7/other",
                "hotswap/v1/regions/eu/cmd", "hotswap/v1/devices/a/b/state"):  # fmt: skip
        with pytest.raises(topics.TopicError):
            topics.parse_device_topic(bad)
    assert topics.parse_rollout_status_topic("hotswap/v1/rollouts/r-9/status") == "r-9"
