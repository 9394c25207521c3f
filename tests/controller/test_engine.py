"""The controller's engine at fleet scale without a broker: what it publishes and stores.

The controller is attached to a recording publisher (a test double for the MQTT
client only: it records each publish); its database is a real SQLite file and
presigning uses moto's real S3 server. Device messages are handed in as the
broker would deliver them. At 2,000 devices this checks the shape of the work,
never its time: one deploy publish per region and chunk (not per device), a
retained status whose size does not grow with the fleet, and a rollback that
reaches every device in as few publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.service import Controller
from shared import topics
from shared.keys import init_keys, load_private_key
from shared.manifest import build_manifest, sign_manifest
from shared.messages import (
    ControlRollout,
    DeployCommand,
    DeviceEvent,
    DeviceState,
    GetRollout,
    ListDevices,
    ListRolloutDevices,
    ModelRef,
    RollbackCommand,
    StartRollout,
)
from shared.tflite import read_signature
from tests.controller.conftest import Recorder

N = 2000
REGIONS = ("eu-west", "us-east")


@pytest.fixture
async def engine(detached_engine: Controller) -> Any:
    controller = detached_engine
    recorder = Recorder()
    await controller.attach(recorder)
    for i in range(N):
        device = f"d-{i:05d}"
        state = DeviceState(
            device_id=device,
            region=REGIONS[i % 2],
            device_type="cam",
            online=True,
            active=ModelRef(name="m", version="1.0", sha256="1" * 64),
        )
        controller.receive(topics.device_state(device), state.to_wire(), retain=True)
    await controller.flush()
    return controller, recorder


async def answer(controller: Controller, commands: list[tuple[str, Any]], phase: str) -> None:
    """Every device a command names answers it with `phase`."""
    for topic, command in commands:
        named = command.selector.cohort if command.selector else ()
        for device in named or (topics.parse_device_topic(topic).device_id,):
            event = DeviceEvent(
                device_id=device, rollout_id=command.rollout_id,
                command_id=command.command_id, phase=phase,
            )  # fmt: skip
            controller.receive(topics.device_events(device), event.to_wire())
    await controller.flush()


async def test_the_fleet_is_listed_in_pages_that_stay_small(engine: Any) -> None:
    """`device list` asks page after page: 1,000 devices per answer by default."""
    controller, _ = engine
    first = await controller.request(ListDevices())
    rest = await controller.request(ListDevices(offset=1000, limit=2000))
    assert len(first) == 1000 and len(rest) == N - 1000
    assert {d["deviceId"] for d in first + rest} == {f"d-{i:05d}" for i in range(N)}
    assert await controller.request(ListDevices(offset=N)) == []


async def test_a_fleet_rollout_and_rollback_publish_per_region_not_per_device(
    engine: Any,
) -> None:
    controller, recorder = engine
    started = await controller.request(StartRollout(model="m", version="2.0", all_devices=True))
    rid = started["rolloutId"]
    assert started["devicesTargeted"] == N
    await controller.tick()  # Pending -> InProgress, deploys out
    await controller.tick()
    deploys = recorder.commands(DeployCommand)
    # One per region and chunk of 1,000 devices: 2 regions of 1,000 each.
    assert len(deploys) == 2, [t for t, _ in deploys]
    assert {t for t, _ in deploys} == {topics.region_cmd(r) for r in REGIONS}
    named = [d for _, c in deploys for d in c.selector.cohort]
    assert sorted(named) == sorted(f"d-{i:05d}" for i in range(N))  # each device once

    await answer(controller, deploys, "activated")
    await controller.tick()  # every device done: the stage settles
    await controller.tick()  # no bake: the rollout ends
    status, size = recorder.status(rid)
    assert (status.status, status.devices_updated) == ("Succeeded", N), status.reason
    assert status.device_states == {"activated": N}
    assert status.devices == ()  # per device: paged on request
    assert size < 16 * 1024, size

    page = await controller.request(ListRolloutDevices(rollout_id=rid, offset=1990, limit=50))
    assert page["total"] == N and len(page["devices"]) == 10
    assert page["devices"][0] | {"v": 1} == {
        "deviceId": "d-01990",
        "state": "activated",
        "reason": None,
        "v": 1,
    }

    before = len(recorder.published)
    await controller.request(ControlRollout(rollout_id=rid, action="rollback"))
    await controller.tick()
    await controller.tick()
    rollbacks = recorder.commands(RollbackCommand)
    assert len(rollbacks) == 2, [t for t, _ in rollbacks]
    await answer(controller, rollbacks, "rolled_back")
    await controller.tick()
    status, size = recorder.status(rid)
    assert status.status == "RolledBack", status
    assert status.device_states == {"rolled_back": N}
    assert size < 16 * 1024, size
    # Commands and statuses only: nothing went out per device.
    assert len(recorder.published) - before < 20, len(recorder.published) - before
    answered = await controller.request(GetRollout(rollout_id=rid))
    assert answered["deviceStates"] == {"rolled_back": N}
    # Paged by the state the status counts them in.
    back = await controller.request(ListRolloutDevices(rollout_id=rid, state="rolled_back"))
    assert back["total"] == N
    still = await controller.request(ListRolloutDevices(rollout_id=rid, state="activated"))
    assert still["total"] == 0


async def test_a_canary_goes_to_its_devices_topics_not_to_whole_regions(engine: Any) -> None:
    """A 10 % canary names 100 devices of each 1,000-device region: one region command
    each would make the broker deliver it to 1,000 devices (10 times the devices named;
    before `controller.fanout`, that is what went out). Each canary device gets its own
    command instead; the rest of the fleet, whole regions, gets one region command."""
    controller, recorder = engine
    started = await controller.request(
        StartRollout(
            model="m", version="2.0", all_devices=True, strategy="canary",
            canary_percent=10, canary_duration_s=0,
        )
    )  # fmt: skip
    await controller.tick()
    await controller.tick()
    canary = recorder.commands(DeployCommand)
    assert len(canary) == N // 10
    assert all(c.selector is None and t.startswith("hotswap/v1/devices/") for t, c in canary)
    await answer(controller, canary, "activated")
    for _ in range(3):
        await controller.tick()
    rest = recorder.commands(DeployCommand)[len(canary) :]
    assert {t for t, _ in rest} == {topics.region_cmd(r) for r in REGIONS}, [t for t, _ in rest]
    named = [d for _, c in canary + rest for d in (c.selector.cohort if c.selector else ())]
    assert len(named) == N - N // 10
    await answer(controller, rest, "activated")
    await controller.tick()
    await controller.tick()
    status, _ = recorder.status(started["rolloutId"])
    assert (status.status, status.devices_updated) == ("Succeeded", N), status.reason


async def test_a_confidence_gate_on_a_task_none_model_is_not_applicable_before_any_window(
    engine: Any, tmp_path: Path, model_v1: bytes
) -> None:
    """The candidate's registered task says the gate cannot apply: `not_applicable` at once,
    not `inconclusive` until samples come (a last stage that just began has none)."""
    from shared.manifest import ModelTask
    from shared.messages import GateSpec

    controller, recorder = engine
    priv, _ = init_keys(tmp_path / "k-none")
    manifest = build_manifest(
        name="m", version="3.0", data=model_v1, signature=read_signature(model_v1),
        task=ModelTask(kind="none"),
    )  # fmt: skip
    controller.store.register_model(sign_manifest(manifest, load_private_key(priv)), "m/3", 0.0)
    started = await controller.request(
        StartRollout(
            model="m",
            version="3.0",
            devices=("d-00000", "d-00001"),
            strategy="canary",
            canary_percent=50,
            gates=GateSpec(max_confidence_drop=0.01, min_samples=20),
        )
    )
    await controller.tick()
    status, _ = recorder.status(started["rolloutId"])
    verdicts = {g.gate: g for g in status.gates}
    assert verdicts["max_confidence_drop"].verdict == "not_applicable", status.gates
    assert "no confidence (task none)" in verdicts["max_confidence_drop"].detail


def test_the_incoming_queue_drops_only_telemetry_past_its_backlog_and_counts_it() -> None:
    """aiomqtt's own bounded queue discarded anything silently when full; ours keeps every
    event, state and request and drops telemetry past the backlog, counted as `backlog`."""
    from aiomqtt import Message

    from controller import metrics
    from controller.service import _IncomingQueue

    class Small(_IncomingQueue):
        limit = 2

    def message(topic: str) -> Message:
        return Message(topic, b"{}", qos=1, retain=False, mid=1, properties=None)

    def dropped() -> float:
        value = metrics.REGISTRY.get_sample_value(
            "hotswap_device_messages_dropped_total", {"reason": "backlog"}
        )
        return value or 0.0

    before = dropped()
    queue = Small()
    for _ in range(3):
        queue.put_nowait(message(topics.device_telemetry("d-1")))
    queue.put_nowait(message(topics.device_events("d-1")))
    queue.put_nowait(message(topics.device_state("d-1")))
    kinds = [queue.get_nowait().topic.value.rsplit("/", 1)[-1] for _ in range(queue.qsize())]
    assert kinds == ["telemetry", "telemetry", "events", "state"]
    assert dropped() - before == 1


def test_an_operator_request_is_taken_before_the_device_messages_queued_ahead_of_it() -> None:
    """A burst of device answers sits in the incoming queue; a request that arrives after
    them is read first (before: behind all 1,000), the device messages then in order."""
    from aiomqtt import Message

    from controller.service import _IncomingQueue

    def message(topic: str, mid: int) -> Message:
        return Message(topic, b"{}", qos=1, retain=False, mid=mid, properties=None)

    queue = _IncomingQueue()
    for i in range(1000):
        queue.put_nowait(message(topics.device_events(f"d-{i:05d}"), i + 1))
    queue.put_nowait(message(topics.CONTROLLER_REQUESTS, 5000))
    assert queue.qsize() == 1001
    assert queue.get_nowait().topic.value == topics.CONTROLLER_REQUESTS
    order = [queue.get_nowait().mid for _ in range(1000)]
    assert order == list(range(1, 1001)) and queue.empty()


def test_every_intent_the_planner_can_emit_has_exactly_one_effect() -> None:
    """The executor maps each intent type to one effect: a single one, or one for a run."""
    from typing import get_args

    from controller.planner import Action
    from controller.service import _EFFECTS, _RUN_EFFECTS

    kinds = set(get_args(Action))
    assert kinds == set(_EFFECTS) | set(_RUN_EFFECTS)
    assert not set(_EFFECTS) & set(_RUN_EFFECTS)
