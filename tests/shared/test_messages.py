"""Wire messages: camelCase JSON with `v` and `kind`, discriminated unions, histograms."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.messages import (
    COMMAND,
    LATENCY_BUCKETS_MS,
    REQUEST,
    CancelCommand,
    DeviceState,
    Histogram,
    ListDevices,
    RollbackCommand,
    Selector,
    StartRollout,
)


def test_wire_json_is_camel_case_with_version_and_kind() -> None:
    """snake_case in Python, camelCase on the wire, `v` and `kind` always present."""
    state = DeviceState(device_id="cam-1", region="eu", device_type="camera", online=True)
    wire = json.loads(state.to_wire())
    assert wire["v"] == 1 and wire["kind"] == "state"
    assert wire["deviceId"] == "cam-1" and wire["deviceType"] == "camera"
    assert DeviceState.model_validate_json(state.to_wire()) == state


def test_adapters_pick_the_model_by_kind_and_ignore_unknown_keys() -> None:
    """COMMAND and REQUEST discriminate on `kind`; extra keys from newer peers are ignored."""
    cmd = COMMAND.validate_json(b'{"v":1,"kind":"rollback","commandId":"c-1","futureField":3}')
    assert isinstance(cmd, RollbackCommand) and cmd.command_id == "c-1"
    assert isinstance(COMMAND.validate_json(b'{"kind":"cancel","commandId":"c-2"}'), CancelCommand)
    assert isinstance(REQUEST.validate_json(b'{"kind":"list_devices"}'), ListDevices)
    with pytest.raises(ValidationError):
        COMMAND.validate_json(b'{"kind":"explode","commandId":"c"}')
    with pytest.raises(ValidationError):
        REQUEST.validate_json(b'{"kind":"start_rollout","model":"m"}')


def test_commands_expire() -> None:
    """A command past expiresAt is expired; one without expiry never is."""
    now = datetime.now(UTC)
    assert RollbackCommand(command_id="c", expires_at=now - timedelta(seconds=1)).expired(now)
    assert not RollbackCommand(command_id="c", expires_at=now + timedelta(seconds=9)).expired(now)
    assert not RollbackCommand(command_id="c").expired(now)


def test_device_state_refuses_ids_that_are_not_topic_safe() -> None:
    """A state message naming an id with '/' or '+' does not validate."""
    with pytest.raises(ValidationError):
        DeviceState(device_id="a/b", region="eu", device_type="camera", online=True)


def test_histograms_merge_and_give_conservative_quantiles() -> None:
    """Counts add per bucket; quantiles are bucket upper bounds; mean is total / n."""
    a = Histogram(counts=(0, 0, 0, 0, 10) + (0,) * 10, total=8.0)
    b = Histogram(counts=(0,) * 7 + (10,) + (0,) * 7, total=80.0)
    m = a.merged(b)
    assert m.n == 20 and m.mean() == 4.4
    assert m.quantile(0.5, LATENCY_BUCKETS_MS) == 1.0
    assert m.quantile(0.95, LATENCY_BUCKETS_MS) == 10.0
    assert Histogram.empty(LATENCY_BUCKETS_MS).quantile(0.5, LATENCY_BUCKETS_MS) is None
    with pytest.raises(ValueError):
        a.merged(Histogram(counts=(1, 2)))


def test_selector_matches_type_memory_and_cohort() -> None:
    """All selector fields must hold; empty fields match every device."""
    assert Selector().matches(device_id="d", device_type="cam", memory_mb=None)
    s = Selector(device_types=("cam",), min_memory_mb=512, cohort=("d1", "d2"))
    assert s.matches(device_id="d1", device_type="cam", memory_mb=1024)
    assert not s.matches(device_id="d3", device_type="cam", memory_mb=1024)
    assert not s.matches(device_id="d1", device_type="gw", memory_mb=1024)
    assert not s.matches(device_id="d1", device_type="cam", memory_mb=256)


def test_start_rollout_defaults_to_direct() -> None:
    """A bare request is a Direct rollout with a 10-minute device timeout."""
    req = StartRollout(model="m", version="1")
    assert (req.strategy, req.device_timeout_s) == ("direct", 600.0)
