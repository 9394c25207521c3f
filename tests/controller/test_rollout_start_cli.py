"""`hotswap rollout start` names its devices: no selector is refused before connecting, the
whole fleet takes `--all`, and `--all` / `--supersede` reach the controller's request topic."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto
from shared import topics
from shared.messages import REQUEST, StartRollout
from shared.mqtt import make_client
from tests.conftest import observer_endpoint

UNREACHABLE = ("--mqtt-url", "mqtt://127.0.0.1:1")  # a command that connects fails with exit 1


def start(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["rollout", "start", "--model", "clf", "--version", "1.0.0", *UNREACHABLE, *args]
    )
    return result.exit_code, result.stderr


def test_no_selector_is_refused_before_connecting() -> None:
    """Exit 2 and one line naming the selectors and --all; no broker is reached for it."""
    code, stderr = start()
    assert code == 2
    assert stderr == (
        "error: name the devices: --devices, --region or --device-type, "
        "or --all for the whole fleet\n"
    )


@pytest.mark.parametrize(
    "selector", [("--devices", "cam-1"), ("--region", "eu-west"), ("--device-type", "camera")]
)
def test_all_with_a_selector_is_refused(selector: tuple[str, str]) -> None:
    """--all is the whole fleet: combined with a selector it is exit 2, not a guess."""
    code, stderr = start("--all", *selector)
    assert code == 2
    assert stderr == "error: --all cannot be combined with --devices, --region or --device-type\n"


async def sent_request(mosquitto: Mosquitto, *args: str) -> StartRollout:
    """What `rollout start ARGS` publishes on the request topic (no controller answers)."""
    async with make_client(observer_endpoint(mosquitto), identifier="test-requests-spy") as spy:
        await spy.subscribe(topics.CONTROLLER_REQUESTS, qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", "rollout", "start",
            "--model", "clf", "--version", "1.0.0", *args,
            env=os.environ | {
                "HOTSWAP_MQTT_URL": mosquitto.url,
                "HOTSWAP_CREDENTIALS": str(mosquitto.credentials("operator")),
                "HOTSWAP_REQUEST_TIMEOUT_S": "1",
            },
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 1 and b"no answer from the controller" in err, err
        async with asyncio.timeout(5):
            message = await anext(aiter(spy.messages))
    assert isinstance(message.payload, bytes)
    request = REQUEST.validate_json(message.payload)
    assert isinstance(request, StartRollout)
    return request


async def test_all_and_supersede_are_sent_to_the_controller(mosquitto: Mosquitto) -> None:
    """--all --supersede: all_devices and supersede set, no selector; a region: neither."""
    fleet = await sent_request(mosquitto, "--all", "--supersede")
    assert (fleet.all_devices, fleet.supersede) == (True, True)
    assert (fleet.devices, fleet.region, fleet.device_type) == ((), None, None)
    region = await sent_request(mosquitto, "--region", "eu-west")
    assert (region.all_devices, region.supersede, region.region) == (False, False, "eu-west")


async def test_duration_flags_take_units_on_the_wire(mosquitto: Mosquitto) -> None:
    """--device-timeout 1m and --canary-duration 90 reach the controller as 60 s and 90 s."""
    request = await sent_request(
        mosquitto, "--all", "--strategy", "canary", "--device-timeout", "1m",
        "--canary-duration", "90",
    )  # fmt: skip
    assert (request.device_timeout_s, request.canary_duration_s) == (60.0, 90.0)
