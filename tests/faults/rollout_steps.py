"""Operator steps the fault tests share: push a model, start a rollout, read what it says.

Pushing and starting go through the real CLI (`controller.cli`); reading the
fleet and polling a rollout's retained status go through the operator's own
client in-process, which is quicker to poll. Does process and network I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from broker.launcher import Mosquitto
from controller.operator import OperatorClient, read_rollout_status
from shared.errors import RequestError
from shared.messages import ListDevices, Request, RolloutStatus
from tests.faults.conftest import ControllerProcess, eventually, push


async def push_version(
    controller: ControllerProcess, tmp_path: Path, data: bytes, version: str, name: str = "clf"
) -> None:
    """`model push` of `data` as `name@version`."""
    path = tmp_path / f"{name}-{version}.tflite"
    path.write_bytes(data)
    await push(controller.cli, path, name, version)


async def start_rollout(controller: ControllerProcess, *args: str) -> str:
    """`rollout start ARGS --json`, which must succeed; the new rollout's id."""
    r = await controller.cli("rollout", "start", *args, "--json")
    assert r.code == 0, r.err
    return str(r.json()["rolloutId"])


async def request(mosquitto: Mosquitto, message: Request) -> Any:
    """One operator request, answered by the controller."""
    async with OperatorClient(mosquitto.endpoint("operator"), timeout=15) as op:
        return await op.request(message)


async def devices(mosquitto: Mosquitto) -> dict[str, dict[str, Any]]:
    """`device list`, by device id."""
    return {d["deviceId"]: d for d in await request(mosquitto, ListDevices())}


async def wait_online(mosquitto: Mosquitto, ids: Iterable[str], within_s: float = 20.0) -> None:
    """Until the controller lists every device of `ids` online."""
    wanted = set(ids)

    async def all_online() -> bool:
        try:
            listed = await devices(mosquitto)
        except RequestError:
            return False
        return all(listed.get(d, {}).get("online") for d in wanted)

    await eventually(all_online, within_s)


async def status(mosquitto: Mosquitto, rollout_id: str) -> RolloutStatus:
    """The rollout's retained status, as it is now."""
    return await read_rollout_status(mosquitto.endpoint("operator"), rollout_id)


def entries(s: RolloutStatus) -> dict[str, tuple[str, str | None]]:
    """Device id -> (state, reason) of a rollout status."""
    return {d.device_id: (d.state, d.reason) for d in s.devices}


def state_of(s: RolloutStatus, device_id: str) -> str | None:
    """The device's state in a rollout status (None when it is not one of its devices)."""
    return entries(s).get(device_id, (None, None))[0]


async def wait_status(
    mosquitto: Mosquitto,
    rollout_id: str,
    check: Callable[[RolloutStatus], bool],
    within_s: float = 30.0,
) -> RolloutStatus:
    """The first status of the rollout that satisfies `check`; AssertionError with the last
    one seen when none does within `within_s`."""
    seen: list[RolloutStatus] = []

    async def satisfied() -> bool:
        seen.append(await status(mosquitto, rollout_id))
        return check(seen[-1])

    try:
        await eventually(satisfied, within_s)
    except TimeoutError:
        last = seen[-1] if seen else None
        raise AssertionError(
            f"rollout {rollout_id} never matched within {within_s:g}s; last status: "
            + (last.model_dump_json(exclude={"gates", "candidate", "baseline"}) if last else "-")
        ) from None
    return seen[-1]
