"""Issue 10 item 7: a revoked device is revoked and offline everywhere, and gets no rollout.

`hotswap device revoke` (the broker admin's command) deletes the device's
broker identity. At once after it: the controller's registry lists the device
`revoked` and offline, its retained state no longer says online, the online
gauge drops, new rollouts leave it out and its open assignments close with
reason `revoked`.
"""

from __future__ import annotations

import pytest

from broker.launcher import Mosquitto
from shared import topics
from shared.messages import DeviceState
from tests.conftest import observer_endpoint
from tests.faults.conftest import ControllerProcess, Result, eventually, retained
from tests.faults.devices import Behaviour, sim_device, sim_fleet
from tests.faults.rollout_steps import (
    devices,
    entries,
    push_version,
    start_rollout,
    state_of,
    wait_online,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

FLEET = [("cam-1", "eu-west", "camera"), ("cam-2", "eu-west", "camera")]


async def revoke(controller: ControllerProcess, mosquitto: Mosquitto, device_id: str) -> Result:
    r = await controller.cli(
        "device", "revoke", device_id,
        "--credentials", str(mosquitto.credentials("admin")), "--mqtt-url", mosquitto.url,
    )  # fmt: skip
    assert r.code == 0, r.err
    return r


async def wait_revoked(mosquitto: Mosquitto, device_id: str, within_s: float = 10.0) -> None:
    """Until `device list` shows the device revoked and offline; else its row, as the failure."""

    async def revoked() -> bool:
        row = (await devices(mosquitto)).get(device_id, {})
        return row.get("revoked") is True and row.get("online") is False

    try:
        await eventually(revoked, within_s)
    except TimeoutError:
        row = (await devices(mosquitto)).get(device_id)
        raise AssertionError(f"{device_id} is not listed revoked and offline: {row}") from None


async def test_revoked_device_is_offline_and_revoked_everywhere(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """After revoke: `device list` says revoked and offline, the retained state and gauge agree."""
    async with sim_fleet(mosquitto, FLEET):
        await wait_online(mosquitto, ["cam-1", "cam-2"])
        await eventually(lambda: controller.metric("hotswap_devices_online") == 2, within_s=10)
        await revoke(controller, mosquitto, "cam-1")

        await wait_revoked(mosquitto, "cam-1")
        state = await retained(observer_endpoint(mosquitto), topics.device_state("cam-1"))
        assert state is None or not DeviceState.model_validate_json(state).online, state
        await eventually(lambda: controller.metric("hotswap_devices_online") == 1, within_s=10)
        assert (await devices(mosquitto))["cam-2"]["online"] is True


async def test_revoked_device_is_left_out_of_new_rollouts(
    controller: ControllerProcess, mosquitto: Mosquitto, tmp_path, model_v1: bytes
) -> None:
    """`--devices` naming a revoked device exits 2 saying so; `--all` targets the others only."""
    async with sim_fleet(mosquitto, FLEET):
        await wait_online(mosquitto, ["cam-1", "cam-2"])
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        await revoke(controller, mosquitto, "cam-1")
        await wait_revoked(mosquitto, "cam-1")

        r = await controller.cli(
            "rollout", "start", "--model", "clf", "--version", "1.0.0", "--devices", "cam-1", "--json"
        )  # fmt: skip
        assert r.code == 2, (r.code, r.out, r.err)
        assert "revoked" in r.err, r.err

        rid = await start_rollout(controller, "--model", "clf", "--version", "1.0.0", "--all")
        s = await wait_status(mosquitto, rid, lambda s: s.final)
        assert set(entries(s)) == {"cam-2"}, s.devices
        assert s.status == "Succeeded", s


async def test_open_assignment_of_a_revoked_device_closes_as_revoked(
    controller: ControllerProcess, mosquitto: Mosquitto, tmp_path, model_v1: bytes
) -> None:
    """A silent device revoked mid-rollout: its entry is `cancelled`/`revoked`, the rollout ends."""
    silent = sim_device(mosquitto, "cam-1", behaviour=Behaviour(deploy="silent"))
    async with silent, sim_device(mosquitto, "cam-2"):
        await wait_online(mosquitto, ["cam-1", "cam-2"])
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        rid = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", "cam-1,cam-2",
            "--device-timeout", "120",
        )  # fmt: skip
        await silent.wait_for("deploy")
        await wait_status(mosquitto, rid, lambda s: state_of(s, "cam-2") == "activated")
        await revoke(controller, mosquitto, "cam-1")

        s = await wait_status(
            mosquitto, rid, lambda s: entries(s)["cam-1"] == ("cancelled", "revoked"), within_s=15
        )
        # Closed, not waiting out the 120 s device timeout.
        s = await wait_status(mosquitto, rid, lambda s: s.final, within_s=15)
        assert entries(s)["cam-1"] == ("cancelled", "revoked"), s.devices
