"""Faults of the controller's MQTT session (issue 10, item 1), against real processes.

The broker is SIGKILLed and restarted on the same port and data directory, or
restarted gracefully; another client takes over the controller's session; a
second `controller run` uses the same credentials; the controller gets
SIGTERM. The controller is a real `hotswap controller run` process and the
devices are real edge agents.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest

from broker.launcher import Mosquitto
from shared import topics
from shared.messages import ControllerState
from shared.mqtt import make_client
from tests.conftest import S3, KeyPair
from tests.faults.conftest import (
    ControllerProcess,
    devices_online,
    eventually,
    final_rollout,
    kill_broker,
    make_agents,
    push,
    restart_broker,
    retained,
    start_rollout,
)
from tests.faults.devices import sim_fleet
from tests.faults.rollout_steps import push_version, wait_online, wait_status
from tests.faults.rollout_steps import start_rollout as steps_start

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEVICES = (
    ("cam-1", "eu-west", "camera"),
    ("cam-2", "eu-west", "camera"),
    ("gw-1", "us-east", "gateway"),
)
IDS = tuple(d[0] for d in DEVICES)
# How long the controller must go on living after a fault before we believe it stays up.
STAYS_UP_S = 4.0


def reconnected(controller: ControllerProcess) -> bool:
    """The log shows a reconnect: `controller_reconnected`, or a second `controller_connected`."""
    return bool(controller.events("controller_reconnected")) or controller.connected_count() >= 2


async def wait_reconnected(controller: ControllerProcess, within_s: float = 30.0) -> None:
    def check() -> bool:
        assert controller.alive(), (
            f"the controller exited with code {controller.proc and controller.proc.returncode}:\n"
            f"{controller.log_text()[-3000:]}"
        )
        return reconnected(controller)

    await eventually(check, within_s)


async def still_serving(controller: ControllerProcess) -> None:
    """Alive for a while longer, and answering operator requests."""
    await asyncio.sleep(STAYS_UP_S)
    assert controller.alive(), (
        f"the controller exited with code {controller.proc and controller.proc.returncode}:\n"
        f"{controller.log_text()[-3000:]}"
    )
    r = await controller.cli("device", "list", "--json")
    assert r.code == 0, r.err


async def controller_state(mosquitto: Mosquitto) -> ControllerState | None:
    payload = await retained(mosquitto.endpoint("operator"), topics.CONTROLLER_STATE)
    return ControllerState.model_validate_json(payload) if payload else None


def assert_disconnect_logged(controller: ControllerProcess) -> None:
    disconnects = controller.events("mqtt_disconnected")
    assert disconnects, controller.log_text()[-3000:]
    assert {e.get("level") for e in disconnects} == {"warning"}, disconnects


async def test_controller_survives_broker_sigkill_and_reconnects(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """Broker SIGKILLed and restarted on the same port: the controller reconnects and stays up."""
    kill_broker(mosquitto)
    await asyncio.sleep(1.5)
    restart_broker(mosquitto)
    await wait_reconnected(controller)
    await still_serving(controller)
    assert_disconnect_logged(controller)
    state = await controller_state(mosquitto)
    assert state is not None and state.online, state


async def test_controller_survives_graceful_broker_restart_and_reconnects(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """Broker stopped with SIGTERM and started again: the controller reconnects and stays up."""
    mosquitto.restart()
    await wait_reconnected(controller)
    await still_serving(controller)
    assert_disconnect_logged(controller)
    state = await controller_state(mosquitto)
    assert state is not None and state.online, state


async def test_controller_keeps_retrying_while_the_broker_stays_down(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """Broker away for several backoff rounds: the controller waits it out and reconnects."""
    kill_broker(mosquitto)
    await asyncio.sleep(8)
    assert controller.alive(), controller.log_text()[-3000:]
    restart_broker(mosquitto)
    await wait_reconnected(controller, within_s=45)
    await still_serving(controller)
    assert_disconnect_logged(controller)


async def test_controller_survives_a_session_takeover_with_its_own_login(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """Another client connects once with the controller's login and client id: it stays up."""
    # The controller may take its session back before we leave: that is its right.
    with contextlib.suppress(aiomqtt.MqttError):
        async with make_client(mosquitto.endpoint("controller"), identifier="hotswap-controller"):
            await asyncio.sleep(0.5)
    await wait_reconnected(controller)
    await still_serving(controller)
    state = await controller_state(mosquitto)
    assert state is not None and state.online, state


async def test_sigterm_stops_the_controller_with_code_0_and_retains_online_false(
    controller: ControllerProcess, mosquitto: Mosquitto
) -> None:
    """SIGTERM: exit code 0, and the retained controller state says `online: false`."""
    before = await controller_state(mosquitto)
    assert before is not None and before.online
    assert await controller.terminate() == 0, controller.log_text()[-3000:]
    after = await controller_state(mosquitto)
    assert after is not None and not after.online, after


async def test_second_controller_with_the_same_credentials_is_refused_and_the_first_keeps_running(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
) -> None:
    """A second `controller run` exits non-zero with `error: … another controller …`; the first
    is untouched."""
    second = ControllerProcess(
        mosquitto, s3, tmp_path, signing_keys, db_path=controller.db_path, name="controller-2"
    )
    await second.start()
    try:
        assert second.proc is not None
        code = await asyncio.wait_for(second.proc.wait(), 20)
    except TimeoutError:
        raise AssertionError(
            f"the second controller is still running:\n{second.log_text()[-2000:]}"
        ) from None
    finally:
        if second.alive():
            await second.kill()
    assert code != 0, second.log_text()[-2000:]
    # --log-json: the error line is a JSON event like every other line of the log
    errors = [e["error"] for e in second.events("error")]
    assert errors and "another controller" in errors[0], second.log_text()[-2000:]
    await still_serving(controller)


async def rollout_across_outage(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model: bytes,
    outage: Callable[[], Awaitable[None]],
) -> None:
    """A rolling rollout to three real agents with `outage` right after its start: it must end
    Succeeded with every device counted exactly once, the same controller process throughout."""
    path = tmp_path / "v1.tflite"
    path.write_bytes(model)
    assert controller.proc is not None
    pid = controller.proc.pid
    async with make_agents(mosquitto, tmp_path, signing_keys, DEVICES) as agents:
        await devices_online(controller, len(DEVICES))
        await push(controller.cli, path, "clf", "1.0.0")
        rid = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--strategy", "rolling",
            "--batch-size", "1", "--batch-delay", "2s", "--devices", ",".join(IDS),
        )  # fmt: skip
        await asyncio.sleep(0.5)  # the first batch is out, the others wait for their turn
        await outage()
        status = await final_rollout(controller, rid, within_s=90)
        assert {a.active.version if a.active else None for a in agents} == {"1.0.0"}
    assert controller.proc.pid == pid and controller.alive()
    assert status["status"] == "Succeeded", status
    assert status["devicesTargeted"] == status["devicesUpdated"] == len(DEVICES), status
    assert sorted(d["deviceId"] for d in status["devices"]) == sorted(IDS), status["devices"]


async def test_rollout_running_across_a_broker_sigkill_completes_with_every_device_once(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model_v1: bytes,
) -> None:
    """Broker SIGKILLed mid-rollout and restarted: the rollout ends Succeeded, 3 of 3 devices."""

    async def outage() -> None:
        kill_broker(mosquitto)
        await asyncio.sleep(1.5)
        restart_broker(mosquitto)

    await rollout_across_outage(controller, mosquitto, tmp_path, signing_keys, model_v1, outage)


async def test_rollout_running_across_a_graceful_broker_restart_completes_with_every_device_once(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model_v1: bytes,
) -> None:
    """Broker restarted gracefully mid-rollout: the rollout ends Succeeded, 3 of 3 devices."""

    async def outage() -> None:
        mosquitto.restart()

    await rollout_across_outage(controller, mosquitto, tmp_path, signing_keys, model_v1, outage)


async def test_a_device_whose_broker_session_was_lost_gets_its_open_deploy_when_it_reconnects(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    model_v1: bytes,
) -> None:
    """The deploy went out while the device had no session (a broker restarted without it):
    nothing was queued for it. When it connects again, the controller resends the open
    command under the same id and the rollout ends Succeeded, long before the device's
    timeout."""
    async with sim_fleet(mosquitto, [("cam-1", "eu-west", "camera")]) as (device,):
        await wait_online(mosquitto, ["cam-1"])
        await device.go_offline(say_goodbye=False)
        # What a broker that lost its sessions does: no subscription, nothing queued.
        wipe = make_client(device.endpoint, identifier="cam-1", persistent_session=False)
        async with wipe:
            pass
        await push_version(controller, tmp_path, model_v1, "1.0.0")
        rid = await steps_start(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", "cam-1",
            "--device-timeout", "120",
        )  # fmt: skip
        await eventually(lambda: bool(controller.events("deploy_sent")), within_s=10)
        await asyncio.sleep(0.5)
        assert device.deploys == []
        await device.start()
        final = await wait_status(mosquitto, rid, lambda s: s.status != "InProgress", 30)
    assert final.status == "Succeeded", final
    assert len({c.command_id for c in device.deploys}) == 1, device.deploys
