"""Issue 10 item 10: a rollout with no selector reaches the whole fleet only when asked for.

A raw StartRollout request with no devices, region or device type and
`all_devices` false is refused (its message names `--all`); with `all_devices`
it targets every registered device. Real controller process, operator client
in-process, simulated devices.
"""

from __future__ import annotations

import pytest

from broker.launcher import Mosquitto
from controller.operator import OperatorClient
from shared.errors import RequestError
from shared.messages import ListRollouts, StartRollout
from tests.faults.conftest import ControllerProcess
from tests.faults.devices import sim_fleet
from tests.faults.rollout_steps import entries, push_version, request, wait_online, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

FLEET = [("cam-1", "eu-west", "camera"), ("gw-1", "us-east", "gateway")]


async def test_start_without_a_selector_is_refused_unless_all_devices(
    controller: ControllerProcess, mosquitto: Mosquitto, tmp_path, model_v1: bytes
) -> None:
    """No selector: RequestError naming --all and no rollout; all_devices=True: every device."""
    async with sim_fleet(mosquitto, FLEET):
        await wait_online(mosquitto, ["cam-1", "gw-1"])
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        async with OperatorClient(mosquitto.endpoint("operator"), timeout=15) as op:
            with pytest.raises(RequestError, match="--all"):
                await op.request(StartRollout(model="clf", version="1.0.0"))
            assert await op.request(ListRollouts()) == []
            result = await op.request(StartRollout(model="clf", version="1.0.0", all_devices=True))
        assert result["devicesTargeted"] == 2, result
        s = await wait_status(mosquitto, result["rolloutId"], lambda s: s.final)
        assert set(entries(s)) == {"cam-1", "gw-1"} and s.status == "Succeeded", s
        assert len(await request(mosquitto, ListRollouts())) == 1
