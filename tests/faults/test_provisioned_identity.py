"""Issue 10 item 4: the identity fixed at provisioning outranks what a device says about itself.

A device provisioned in `r2` as a camera publishes a retained state claiming
another region (or device type). The controller keeps the provisioned
attributes, flags the claim (log event and metric) and keeps the device out of
the other region's (type's) rollouts; what a device may report about itself
(memory, agent version, the model it serves) still updates.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.launcher import Mosquitto
from shared.messages import ModelRef
from tests.faults.conftest import ControllerProcess, eventually
from tests.faults.devices import sim_device
from tests.faults.rollout_steps import devices, entries, push_version, start_rollout, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SERVED = ModelRef(name="clf", version="0.9.0", sha256="ab" * 32)


@pytest.mark.parametrize(
    ("claim", "honest", "selector"),
    [
        ({"claim_region": "r1"}, ("cam-r1", "r1", "camera"), ("--region", "r1")),
        ({"claim_device_type": "gateway"}, ("gw-1", "r2", "gateway"), ("--device-type", "gateway")),
    ],
    ids=["region", "device_type"],
)
async def test_a_contradicting_claim_is_refused_and_the_device_keeps_its_provisioned_identity(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path,
    model_v1: bytes,
    claim: dict[str, Any],
    honest: tuple[str, str, str],
    selector: tuple[str, ...],
) -> None:
    """The claim is flagged, `device list` shows the provisioned r2 camera, its rollouts skip it."""
    liar = sim_device(
        mosquitto, "cam-x", "r2", "camera",
        memory_mb=512, agent_version="sim-9.9", active=SERVED, **claim,
    )  # fmt: skip
    async with sim_device(mosquitto, *honest), liar:

        async def both_reported() -> bool:
            listed = await devices(mosquitto)
            return listed.get("cam-x", {}).get("memoryMb") == 512 and honest[0] in listed

        await eventually(both_reported, within_s=20)
        row = (await devices(mosquitto))["cam-x"]
        assert (row["region"], row["deviceType"]) == ("r2", "camera"), row
        # Self-reported capabilities of the same state message are kept.
        assert (row["agentVersion"], row["activeVersion"]) == ("sim-9.9", "0.9.0"), row

        await eventually(
            lambda: any(e.get("device_id") == "cam-x" for e in controller.events("device_identity_refused")),
            within_s=10,
        )  # fmt: skip
        dropped = controller.metric(
            "hotswap_device_messages_dropped_total", reason="identity_claim"
        )
        assert dropped >= 1

        await push_version(controller, tmp_path, model_v1, "1.0.0")
        rid = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", *selector,
            "--strategy", "rolling", "--device-timeout", "5",
        )  # fmt: skip
        s = await wait_status(mosquitto, rid, lambda s: s.final)
        assert set(entries(s)) == {honest[0]}, s.devices
        assert s.status == "Succeeded", s
        assert liar.deploys == []
