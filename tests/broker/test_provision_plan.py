"""What batch provisioning decides, without a broker: device lists and each device's outcome."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.provision import Found, ProvisionError, Target, parse_device_list, plan_devices
from shared.credentials import Credentials, DeviceIdentity, MqttLogin


def test_device_lists_take_a_header_comments_and_blank_lines() -> None:
    """`id,region,type` per line; spaces around fields are trimmed."""
    text = "id,region,type\n# first batch\ncam-1, eu-west ,camera\n\ncam-2,us-east,gateway\n"
    assert parse_device_list(text, "f.csv") == [
        DeviceIdentity("cam-1", "eu-west", "camera"),
        DeviceIdentity("cam-2", "us-east", "gateway"),
    ]


def target(device_id: str) -> Target:
    return Target(DeviceIdentity(device_id, "eu-west", "camera"), Path("/creds") / device_id)


def test_each_device_gets_the_outcome_a_single_provisioning_would() -> None:
    """New: created; existing with force: replaced; existing with its own credentials and
    keep_existing: kept; the others refused with the single-device messages."""
    kept = Credentials(Path("/creds/c"), MqttLogin("c", "pw", client_id="c"))
    device_roles = frozenset({"hotswap-device-b"})
    found = {
        "a": Found(None, False),
        "b": Found(device_roles, True),
        "c": Found(frozenset({"hotswap-device-c"}), True, kept),
    }
    plan = plan_devices(
        [target("a"), target("b"), target("c")], found, force=True, keep_existing=True
    )
    assert [(p.target.device.device_id, p.outcome) for p in plan] == [
        ("a", "created"),
        ("b", "replaced"),
        ("c", "kept"),
    ]
    with pytest.raises(ProvisionError, match="already holds credentials"):
        plan_devices([target("b")], found, force=False, keep_existing=True)
    with pytest.raises(ProvisionError, match="b is already provisioned"):
        plan_devices(
            [target("b")], {"b": Found(device_roles, False)}, force=False, keep_existing=False
        )
    with pytest.raises(ProvisionError, match="is a broker identity, not a device"):
        plan_devices(
            [target("x")],
            {"x": Found(frozenset({"test-observer"}), False)},
            force=True,
            keep_existing=False,
        )
    with pytest.raises(ProvisionError, match="listed twice"):
        plan_devices([target("a"), target("a")], found, force=True, keep_existing=False)
