"""Issue 10 item 8: a rollout's record says what its devices answered and really run.

A rollback a device cannot do (no previous model resident) ends `Failed`, not
`RolledBack`; a device that timed out while offline does not install the
deploy queued in its broker session when it returns; a late `activated` answer
to the same command shows the device as `activated`. Real controller process,
real agents with real interpreters, and a simulated device for the late answer.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker.launcher import Mosquitto
from shared import topics
from shared.messages import DeviceState
from tests.conftest import KeyPair, observer_endpoint
from tests.faults.conftest import ControllerProcess, eventually, make_agents, retained
from tests.faults.devices import Behaviour, sim_device
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

FINAL_AFTER_ROLLBACK = {"Failed", "RolledBack", "Aborted"}


async def test_rollback_a_device_cannot_do_ends_failed_not_rolled_back(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    signing_keys: KeyPair,
    model_v1: bytes,
) -> None:
    """v1 onto an empty agent, then `rollout rollback`: the agent answers not_resident → Failed."""
    async with make_agents(mosquitto, tmp_path, signing_keys, [("cam-1", "eu-west", "camera")]) as [agent]:  # fmt: skip
        await wait_online(mosquitto, ["cam-1"])
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        rid = await start_rollout(controller, "--model", "clf", "--version", "1.0.0", "--devices", "cam-1")  # fmt: skip
        s = await wait_status(mosquitto, rid, lambda s: s.final)
        assert s.status == "Succeeded", s

        r = await controller.cli("rollout", "rollback", rid, "--json")
        assert r.code == 0, r.err
        s = await wait_status(mosquitto, rid, lambda s: s.status in FINAL_AFTER_ROLLBACK)
        assert s.status == "Failed", s
        assert s.reason and "rollback" in s.reason.lower() and "fail" in s.reason.lower(), s.reason
        assert entries(s)["cam-1"] == ("rollback_failed", "not_resident"), s.devices
        assert agent.active is not None and agent.active.version == "1.0.0"


async def test_timed_out_device_does_not_install_the_queued_deploy_when_it_returns(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    signing_keys: KeyPair,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Offline through a deploy's 3 s timeout, back on its session: the agent keeps serving v1."""
    device = [("gw-1", "eu-west", "gateway")]
    await push_version(controller, tmp_path, model_v1, "1.0.0")
    await push_version(controller, tmp_path, model_v2, "2.0.0")
    async with make_agents(mosquitto, tmp_path, signing_keys, device):
        await wait_online(mosquitto, ["gw-1"])
        first = await start_rollout(controller, "--model", "clf", "--version", "1.0.0", "--devices", "gw-1")  # fmt: skip
        assert (await wait_status(mosquitto, first, lambda s: s.final)).status == "Succeeded"

    # The agent left (its broker session stays): the deploy of v2 waits queued in it.
    await eventually(lambda: _offline(mosquitto, "gw-1"), within_s=10)
    rid = await start_rollout(
        controller, "--model", "clf", "--version", "2.0.0", "--devices", "gw-1",
        "--device-timeout", "3",
    )  # fmt: skip
    await wait_status(mosquitto, rid, lambda s: state_of(s, "gw-1") == "timed_out")

    async with make_agents(mosquitto, tmp_path, signing_keys, device) as [agent]:
        await asyncio.wait_for(agent.connected.wait(), 15)
        # Time enough for a queued deploy of a tiny model to be downloaded and activated.
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: agent.active and agent.active.version == "2.0.0", within_s=8)
        assert agent.active is not None and agent.active.version == "1.0.0", agent.active
        raw = await retained(observer_endpoint(mosquitto), topics.device_state("gw-1"))
        assert raw is not None
        state = DeviceState.model_validate_json(raw)
        assert state.active is not None and state.active.version == "1.0.0", state
        s = await wait_status(mosquitto, rid, lambda s: s.final)
        assert entries(s)["gw-1"][0] != "activated", s.devices


async def _offline(mosquitto: Mosquitto, device_id: str) -> bool:
    return (await devices(mosquitto)).get(device_id, {}).get("online") is False


async def test_late_activation_after_timeout_is_recorded_as_activated(
    controller: ControllerProcess, mosquitto: Mosquitto, tmp_path, model_v1: bytes
) -> None:
    """A device answers `activated` 6 s after a 2 s timeout: its entry ends `activated`."""
    late = Behaviour(answer_after_s=6.0, honour_cancel=False)
    async with sim_device(mosquitto, "cam-1", behaviour=late) as device:
        await wait_online(mosquitto, ["cam-1"])
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        rid = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", "cam-1",
            "--device-timeout", "2",
        )  # fmt: skip
        await wait_status(mosquitto, rid, lambda s: state_of(s, "cam-1") == "timed_out")
        await eventually(lambda: any(e.phase == "activated" for e in device.sent), within_s=15)
        s = await wait_status(
            mosquitto, rid, lambda s: entries(s)["cam-1"][0] == "activated", within_s=10
        )
        assert s.devices_updated == 1, s
        assert (await devices(mosquitto))["cam-1"]["activeVersion"] == "1.0.0"
