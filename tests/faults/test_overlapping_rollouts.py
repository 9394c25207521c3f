"""Issue 10 item 3: a device belongs to at most one active rollout.

A start that overlaps an active rollout is refused (exit 2, naming it and the
overlap) unless `--supersede` cancels the older rollout on the shared devices;
two starts at the same instant are caught too. Real controller process, real
broker, simulated devices that keep the first rollout open by staying silent.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.launcher import Mosquitto
from controller.operator import OperatorClient
from shared.errors import RequestError
from shared.messages import ControlRollout, ListRollouts, StartRollout
from tests.faults.conftest import ControllerProcess
from tests.faults.devices import Behaviour, sim_fleet
from tests.faults.rollout_steps import (
    entries,
    push_version,
    request,
    start_rollout,
    wait_online,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

FLEET = [("cam-1", "eu-west", "camera"), ("cam-2", "eu-west", "camera"), ("cam-3", "us-east", "camera")]  # fmt: skip
IDS = [d[0] for d in FLEET]
SILENT = Behaviour(deploy="silent")


@pytest.mark.parametrize(
    "strategy",
    [("--strategy", "direct"), ("--strategy", "rolling", "--batch-size", "1")],
    ids=["direct", "rolling"],
)
async def test_start_overlapping_an_active_rollout_is_refused_naming_it(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    model_v1: bytes,
    model_v2: bytes,
    strategy: tuple[str, ...],
) -> None:
    """A second start on two devices of an open rollout exits 2 naming that rollout and '2 device'."""
    async with sim_fleet(mosquitto, FLEET, behaviour=SILENT):
        await wait_online(mosquitto, IDS)
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        await push_version(controller, tmp_path, model_v2, "2.0.0")
        first = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", ",".join(IDS),
            "--device-timeout", "60", *strategy,
        )  # fmt: skip
        r = await controller.cli(
            "rollout", "start", "--model", "clf", "--version", "2.0.0", "--devices", "cam-2,cam-3",
            "--device-timeout", "60", *strategy, "--json",
        )  # fmt: skip
        assert r.code == 2, (r.code, r.out, r.err)
        assert first in r.err and "2 device" in r.err, r.err
        rollouts = await request(mosquitto, ListRollouts())
        assert [x["rolloutId"] for x in rollouts] == [first]


async def test_supersede_cancels_the_older_rollout_on_the_shared_devices(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """--supersede: shared devices get a cancel and close `superseded`; all of them: Aborted."""
    async with sim_fleet(mosquitto, FLEET, behaviour=SILENT) as fleet:
        cam1, cam2, cam3 = fleet
        await wait_online(mosquitto, IDS)
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        await push_version(controller, tmp_path, model_v2, "2.0.0")
        first = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", ",".join(IDS),
            "--device-timeout", "60",
        )  # fmt: skip
        await asyncio.gather(*(d.wait_for("deploy") for d in fleet))

        await start_rollout(
            controller, "--model", "clf", "--version", "2.0.0", "--devices", "cam-2,cam-3",
            "--device-timeout", "60", "--supersede",
        )  # fmt: skip
        s = await wait_status(
            mosquitto,
            first,
            lambda s: (
                entries(s).get("cam-2") == ("cancelled", "superseded")
                and entries(s).get("cam-3") == ("cancelled", "superseded")
            ),
            within_s=15,
        )
        assert entries(s)["cam-1"][0] != "cancelled", s.devices
        assert s.status == "InProgress", s  # cam-1 is still the first rollout's
        for device in (cam2, cam3):
            await device.wait_for("cancel", within_s=10)
            assert first in {c.rollout_id for c in device.cancels}, device.cancels
        assert first not in {c.rollout_id for c in cam1.cancels}

        await start_rollout(
            controller, "--model", "clf", "--version", "2.0.0", "--devices", "cam-1",
            "--device-timeout", "60", "--supersede",
        )  # fmt: skip
        s = await wait_status(mosquitto, first, lambda s: s.final, within_s=15)
        assert s.status == "Aborted", s
        assert s.reason and "supersede" in s.reason.lower(), s.reason
        assert entries(s)["cam-1"] == ("cancelled", "superseded")


async def test_simultaneous_starts_for_shared_devices_accept_exactly_one(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Two StartRollout requests sent at the same instant: one is accepted, the other names it."""
    async with sim_fleet(mosquitto, FLEET, behaviour=SILENT):
        await wait_online(mosquitto, IDS)
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        await push_version(controller, tmp_path, model_v2, "2.0.0")
        endpoint = mosquitto.endpoint("operator")
        for _ in range(3):
            async with (
                OperatorClient(endpoint, timeout=15) as a,
                OperatorClient(endpoint, timeout=15) as b,
            ):
                results = await asyncio.gather(
                    a.request(StartRollout(model="clf", version="1.0.0", devices=("cam-1", "cam-2"), device_timeout_s=60)),
                    b.request(StartRollout(model="clf", version="2.0.0", devices=("cam-2", "cam-3"), device_timeout_s=60)),
                    return_exceptions=True,
                )  # fmt: skip
            accepted = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, RequestError)]
            assert len(accepted) == 1 and len(refused) == 1, results
            assert accepted[0]["rolloutId"] in str(refused[0]), refused[0]
            # Close the accepted one, so that the next round starts from no active rollout.
            await request(
                mosquitto, ControlRollout(rollout_id=accepted[0]["rolloutId"], action="abort")
            )


async def test_a_rollout_on_the_same_devices_is_accepted_once_the_first_finished(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """A finished rollout holds no device: the next one on the same devices starts and succeeds."""
    async with sim_fleet(mosquitto, FLEET):
        await wait_online(mosquitto, IDS)
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        await push_version(controller, tmp_path, model_v2, "2.0.0")
        devices = ",".join(IDS)
        first = await start_rollout(controller, "--model", "clf", "--version", "1.0.0", "--devices", devices)  # fmt: skip
        s = await wait_status(mosquitto, first, lambda s: s.final)
        assert s.status == "Succeeded", s
        second = await start_rollout(controller, "--model", "clf", "--version", "2.0.0", "--devices", devices)  # fmt: skip
        s = await wait_status(mosquitto, second, lambda s: s.final)
        assert s.status == "Succeeded", s
