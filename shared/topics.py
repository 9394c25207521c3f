"""The MQTT topic tree (DESIGN.md §2): every topic name is built and parsed here.

Pure: no I/O. Identifiers are validated at construction so that nobody can
smuggle a `/`, `+` or `#` into a topic through a device id or a region name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ROOT = "hotswap/v1"

_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

DeviceLeaf = Literal["cmd", "state", "events", "telemetry"]
DEVICE_LEAVES: tuple[DeviceLeaf, ...] = ("cmd", "state", "events", "telemetry")


class TopicError(ValueError):
    """A topic or an identifier inside one is not valid."""


def check_ident(value: str, what: str = "identifier") -> str:
    """Return `value` if it is a safe topic segment, else raise TopicError."""
    if not _IDENT.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def device_cmd(device_id: str) -> str:
    return f"{ROOT}/devices/{check_ident(device_id, 'device id')}/cmd"


def device_state(device_id: str) -> str:
    return f"{ROOT}/devices/{check_ident(device_id, 'device id')}/state"


def device_events(device_id: str) -> str:
    return f"{ROOT}/devices/{check_ident(device_id, 'device id')}/events"


def device_telemetry(device_id: str) -> str:
    return f"{ROOT}/devices/{check_ident(device_id, 'device id')}/telemetry"


def region_cmd(region: str) -> str:
    return f"{ROOT}/regions/{check_ident(region, 'region')}/cmd"


def rollout_status(rollout_id: str) -> str:
    return f"{ROOT}/rollouts/{check_ident(rollout_id, 'rollout id')}/status"


def device_registry(device_id: str) -> str:
    """The provisioned identity of a device (retained; written by provisioning only)."""
    return f"{ROOT}/registry/{check_ident(device_id, 'device id')}"


CONTROLLER_REQUESTS = f"{ROOT}/controller/requests"
CONTROLLER_STATE = f"{ROOT}/controller/state"
RESPONSES_PREFIX = f"{ROOT}/controller/responses"

ALL_DEVICE_STATES = f"{ROOT}/devices/+/state"
ALL_DEVICE_CMDS = f"{ROOT}/devices/+/cmd"
ALL_REGION_CMDS = f"{ROOT}/regions/+/cmd"
ALL_DEVICE_EVENTS = f"{ROOT}/devices/+/events"
ALL_DEVICE_TELEMETRY = f"{ROOT}/devices/+/telemetry"
ALL_ROLLOUT_STATUS = f"{ROOT}/rollouts/+/status"
ALL_DEVICE_REGISTRY = f"{ROOT}/registry/+"


def response_topic(client_id: str) -> str:
    """Where the controller answers one operator client's requests."""
    return f"{RESPONSES_PREFIX}/{check_ident(client_id, 'client id')}"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed `hotswap/v1/devices/{device_id}/{leaf}` topic."""

    device_id: str
    leaf: DeviceLeaf


def parse_device_topic(topic: str) -> DeviceTopic:
    """Parse a per-device topic; raise TopicError for anything else."""
    prefix = f"{ROOT}/devices/"
    if not topic.startswith(prefix):
        raise TopicError(f"not a device topic: {topic!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise TopicError(f"not a device topic: {topic!r}")
    device_id, leaf = parts
    check_ident(device_id, "device id")
    for known in DEVICE_LEAVES:
        if leaf == known:
            return DeviceTopic(device_id, known)
    raise TopicError(f"unknown device topic leaf {leaf!r} in {topic!r}")


def parse_registry_topic(topic: str) -> str:
    """Return the device id of a device registry topic."""
    prefix = f"{ROOT}/registry/"
    if not topic.startswith(prefix) or "/" in topic[len(prefix) :]:
        raise TopicError(f"not a device registry topic: {topic!r}")
    return check_ident(topic[len(prefix) :], "device id")


def parse_rollout_status_topic(topic: str) -> str:
    """Return the rollout id of a rollout status topic."""
    prefix = f"{ROOT}/rollouts/"
    if not (topic.startswith(prefix) and topic.endswith("/status")):
        raise TopicError(f"not a rollout status topic: {topic!r}")
    return check_ident(topic[len(prefix) : -len("/status")], "rollout id")
