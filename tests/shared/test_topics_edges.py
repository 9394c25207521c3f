"""Topic edge cases: identifier limits, other builders and parse errors."""

from __future__ import annotations

import pytest

from shared import topics


def test_check_ident_accepts_64_chars_and_punctuation_and_returns_the_value() -> None:
    """A 64-character id and the allowed '.', '_', ':' and '-' pass unchanged."""
    assert topics.check_ident("a" * 64) == "a" * 64
    assert topics.check_ident("cam_1.eu:west-2") == "cam_1.eu:west-2"


@pytest.mark.parametrize("bad", ["+", "#", "/", "", "a" * 65, "a+b", "a#", "eu/west", ".x"])
def test_check_ident_rejects_wildcards_separators_empty_and_too_long(bad: str) -> None:
    """check_ident itself raises TopicError for every unsafe segment."""
    with pytest.raises(topics.TopicError):
        topics.check_ident(bad)


def test_check_ident_error_names_what_was_checked() -> None:
    """The error message says which kind of identifier was wrong and repeats it."""
    with pytest.raises(topics.TopicError, match=r"invalid region 'eu/west'"):
        topics.region_cmd("eu/west")


def test_every_builder_validates_its_identifier() -> None:
    """Region, rollout and response topics refuse a wildcard like device topics do."""
    for build in (topics.region_cmd, topics.rollout_status, topics.response_topic,
                  topics.device_state, topics.device_events, topics.device_telemetry):  # fmt: skip
        with pytest.raises(topics.TopicError):
            build("+")


def test_response_topic_sits_under_the_responses_prefix() -> None:
    """Each operator client gets its own topic below controller/responses."""
    assert topics.response_topic("cli-42") == "hotswap/v1/controller/responses/cli-42"


def test_wildcard_subscriptions_match_the_builders_shape() -> None:
    """The `+` subscriptions have the builder's topic with the id replaced by '+'."""
    assert topics.device_state("x").replace("/x/", "/+/") == topics.ALL_DEVICE_STATES
    assert topics.device_cmd("x").replace("/x/", "/+/") == topics.ALL_DEVICE_CMDS
    assert topics.region_cmd("x").replace("/x/", "/+/") == topics.ALL_REGION_CMDS
    assert topics.rollout_status("x").replace("/x/", "/+/") == topics.ALL_ROLLOUT_STATUS


@pytest.mark.parametrize(
    "bad",
    [
        "hotswap/v1/devices/+/state",
        "hotswap/v1/devices//state",
        "hotswap/v2/devices/a/state",
        "hotswap/v1/devices/a/state/",
        "hotswap/v1/devices/a/STATE",
    ],
)
def test_parse_device_topic_rejects_wildcards_and_near_misses(bad: str) -> None:
    """Wildcard ids, empty ids, other versions, trailing slashes and case changes are refused."""
    with pytest.raises(topics.TopicError):
        topics.parse_device_topic(bad)


def test_parse_device_topic_round_trips_every_builder() -> None:
    """Building then parsing gives back the same id and leaf for all four leaves."""
    builders = {"cmd": topics.device_cmd, "state": topics.device_state,
                "events": topics.device_events, "telemetry": topics.device_telemetry}  # fmt: skip
    for leaf, build in builders.items():
        assert topics.parse_device_topic(build("gw_1.eu")) == topics.DeviceTopic("gw_1.eu", leaf)


@pytest.mark.parametrize(
    "bad",
    ["hotswap/v1/rollouts/r-1", "hotswap/v1/rollouts//status", "hotswap/v1/rollouts/a/b/status"],
)
def test_parse_rollout_status_topic_rejects_malformed(bad: str) -> None:
    """Missing leaf, empty id or an id with a slash is not a rollout status topic."""
    with pytest.raises(topics.TopicError):
        topics.parse_rollout_status_topic(bad)
