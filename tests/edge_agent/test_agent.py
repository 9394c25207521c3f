"""One edge agent against a real broker and moto's S3: commands, events, refusals, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.launcher import Mosquitto
from controller.artifacts import ArtifactStore
from edge_agent.agent import Agent, AgentConfig
from shared import tflite_schema, topics
from shared.keys import load_public_key
from shared.manifest import SignedManifest, build_manifest, sign_manifest
from shared.messages import (
    DeployCommand,
    DeviceEvent,
    DeviceState,
    RollbackCommand,
    Selector,
    TelemetryWindow,
)
from shared.model_builder import build_dense_model, build_two_input_model
from shared.mqtt import make_client
from shared.tflite import make_interpreter, read_signature
from tests.conftest import S3, KeyPair, device_endpoint, final_event, running_task
from tests.edge_agent.artifact_server import ArtifactServer
from tests.edge_agent.layout_models import with_other_weights

VARIANT = build_dense_model(seed=7)  # same tensor signature as model_v1, other weights
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def reference(model: bytes) -> np.ndarray:
    interp = make_interpreter(model)
    interp.set_tensor(interp.get_input_details()[0]["index"], X)
    interp.invoke()
    return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))


@dataclass
class Harness:
    """Publishes commands like the controller and records the device's events."""

    agent: Agent
    client: aiomqtt.Client
    artifacts: ArtifactStore
    keys: KeyPair
    events: list[DeviceEvent] = field(default_factory=list)
    states: list[DeviceState] = field(default_factory=list)

    def upload(
        self, data: bytes, version: str, device_types: tuple[str, ...] = (), **manifest_kw: Any
    ) -> tuple[SignedManifest, str]:
        """Sign a manifest of `data` (its signature read from the file unless given), store
        both; the manifest and a presigned URL."""
        fields: dict[str, Any] = dict(manifest_kw)
        if "signature" not in fields:
            fields["signature"] = read_signature(data)
        manifest = build_manifest(
            name="clf", version=version, data=data, device_types=device_types, **fields
        )
        signed = sign_manifest(manifest, self.keys.private)
        key = self.artifacts.put_model("clf", version, data, signed)
        return signed, self.artifacts.presign_get(key, 600)

    async def send(
        self, command: DeployCommand | RollbackCommand, topic: str | None = None
    ) -> None:
        await self.client.publish(
            topic or topics.device_cmd(self.agent.config.device_id), command.to_wire(), qos=1
        )

    async def final_event(self, command_id: str, within_s: float = 20.0) -> DeviceEvent:
        return await final_event(self.events, command_id, within_s)

    def phases(self, command_id: str) -> list[str]:
        return [e.phase for e in self.events if e.command_id == command_id]


def deploy(signed: SignedManifest, url: str, **kw) -> DeployCommand:
    return DeployCommand(
        command_id=f"c-{uuid.uuid4().hex}", rollout_id="r-test", manifest=signed, url=url, **kw
    )


def agent_config(tmp_path: Path, keys: KeyPair, broker: Mosquitto, **kw) -> AgentConfig:
    """cam-1 (eu-west, camera), logged in to `broker` with its own provisioned identity."""
    return AgentConfig(
        device_id="cam-1",
        region="eu-west",
        device_type="camera",
        data_dir=tmp_path / "agent",
        trusted_keys=(load_public_key(keys.public_path),),
        mqtt=device_endpoint(broker, "cam-1", "eu-west", "camera"),
        telemetry_interval_s=0.3,
        **kw,
    )


@contextlib.asynccontextmanager
async def watching(
    agent: Agent, broker: Mosquitto, s3: S3, keys: KeyPair
) -> AsyncIterator[Harness]:
    """A controller's view of cam-1: a client with the controller's identity recording its
    events and states."""
    async with make_client(broker.endpoint("controller"), identifier="test-controller") as client:
        h = Harness(agent, client, ArtifactStore(s3.endpoint, s3.bucket), keys)
        await client.subscribe(topics.device_events("cam-1"), qos=1)
        await client.subscribe(topics.device_state("cam-1"), qos=1)

        async def record() -> None:
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                if m.topic.matches(topics.device_events("cam-1")):
                    h.events.append(DeviceEvent.model_validate_json(m.payload))
                elif m.payload:
                    h.states.append(DeviceState.model_validate_json(m.payload))

        reader = asyncio.create_task(record())
        try:
            yield h
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def running(agent: Agent, *, wait_connected: bool = True) -> AsyncIterator[Agent]:
    """The agent's run() as a task, cancelled on exit."""
    async with running_task(agent.run(), agent.connected if wait_connected else None):
        yield agent


@pytest.fixture
async def harness(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> AsyncIterator[Harness]:
    agent = Agent(agent_config(tmp_path, signing_keys, mosquitto))
    async with watching(agent, mosquitto, s3, signing_keys) as h, running(agent):
        yield h


async def test_deploy_goes_through_every_phase_and_serves_the_model(
    harness: Harness, model_v1: bytes
) -> None:
    """received → downloading → verified → activated, then real outputs of the model and a retained state."""
    signed, url = harness.upload(model_v1, "1.0.0")
    cmd = deploy(signed, url)
    await harness.send(cmd)
    final = await harness.final_event(cmd.command_id)
    assert final.phase == "activated" and final.model and final.model.version == "1.0.0"
    assert harness.phases(cmd.command_id) == ["received", "downloading", "verified", "activated"]
    np.testing.assert_allclose(harness.agent.infer(X), reference(model_v1), atol=1e-6)
    async with asyncio.timeout(5):
        while not (
            harness.states
            and harness.states[-1].active
            and harness.states[-1].active.version == "1.0.0"
        ):
            await asyncio.sleep(0.05)
    assert list((harness.agent.config.data_dir / "downloads").iterdir()) == []


async def test_duplicate_command_does_the_work_once_and_answers_again(
    harness: Harness, model_v1: bytes
) -> None:
    """The same command id twice: one download, and the final event is sent a second time."""
    signed, url = harness.upload(model_v1, "1.0.0")
    cmd = deploy(signed, url)
    await harness.send(cmd)
    await harness.final_event(cmd.command_id)
    await harness.send(cmd)
    async with asyncio.timeout(10):
        while harness.phases(cmd.command_id).count("activated") < 2:
            await asyncio.sleep(0.05)
    assert harness.phases(cmd.command_id) == [
        "received",
        "downloading",
        "verified",
        "activated",
        "activated",
    ]


async def test_expired_command_is_refused(harness: Harness, model_v1: bytes) -> None:
    """A command past its expiry does no work: one `failed`/`command_expired` event."""
    signed, url = harness.upload(model_v1, "1.0.0")
    stale = deploy(signed, url, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await harness.send(stale)
    final = await harness.final_event(stale.command_id)
    assert (final.phase, final.reason) == ("failed", "command_expired")
    assert harness.phases(stale.command_id) == ["failed"]
    assert harness.agent.active is None


async def test_deploy_of_the_active_version_answers_at_once(
    harness: Harness, model_v1: bytes
) -> None:
    """Asking for what already runs is `activated` with no download."""
    signed, url = harness.upload(model_v1, "1.0.0")
    await harness.send(first := deploy(signed, url))
    await harness.final_event(first.command_id)
    await harness.send(again := deploy(signed, url))
    final = await harness.final_event(again.command_id)
    assert harness.phases(again.command_id) == ["received", "activated"]
    assert final.detail == "already active"


async def test_rollback_swaps_back_to_the_resident_model(
    harness: Harness, model_v1: bytes, model_v2: bytes
) -> None:
    """After v1 then v2, a rollback serves v1 again without any download."""
    for data, version in ((model_v1, "1.0.0"), (model_v2, "2.0.0")):
        signed, url = harness.upload(data, version)
        await harness.send(cmd := deploy(signed, url))
        assert (await harness.final_event(cmd.command_id)).phase == "activated"
    np.testing.assert_allclose(harness.agent.infer(X), reference(model_v2), atol=1e-6)
    rb = RollbackCommand(command_id="c-rb-1", rollout_id="r-test")
    await harness.send(rb)
    final = await harness.final_event(rb.command_id)
    assert final.phase == "rolled_back" and final.model and final.model.version == "1.0.0"
    assert harness.phases(rb.command_id) == ["received", "rolled_back"]
    np.testing.assert_allclose(harness.agent.infer(X), reference(model_v1), atol=1e-6)
    assert harness.agent.standby and harness.agent.standby.version == "2.0.0"


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("flip_artifact_byte", "sha256_mismatch"),
        ("unknown_key", "untrusted_key"),
        ("wrong_device_type", "incompatible_device_type"),
        ("other_signature", "incompatible"),
        ("not_a_model", "not_a_model"),
    ],
)
async def test_bad_artifacts_are_refused_and_the_old_model_keeps_serving(
    harness: Harness, model_v1: bytes, model_other_signature: bytes, tamper: str, reason: str
) -> None:
    """Each refusal names its reason, leaves no file behind and changes nothing served."""
    signed, url = harness.upload(model_v1, "1.0.0")
    await harness.send(first := deploy(signed, url))
    await harness.final_event(first.command_id)
    if tamper == "flip_artifact_byte":
        signed2, url2 = harness.upload(VARIANT, "2.0.0")
        # The signed manifest promises one file; S3 now holds another of the same size.
        harness.artifacts.put_model("clf", "2.0.0", flip_last_byte(VARIANT), signed2)
    elif tamper == "unknown_key":
        manifest = build_manifest(
            name="clf", version="2.0.0", data=VARIANT, signature=read_signature(VARIANT)
        )
        signed2 = sign_manifest(manifest, Ed25519PrivateKey.generate())
        url2 = harness.artifacts.presign_get(
            harness.artifacts.put_model("clf", "2.0.0", VARIANT, signed2), 600
        )
    elif tamper == "wrong_device_type":
        signed2, url2 = harness.upload(VARIANT, "2.0.0", device_types=("gateway",))
    elif tamper == "other_signature":
        signed2, url2 = harness.upload(model_other_signature, "2.0.0")
    else:
        junk = b"\x00" * 64
        manifest = build_manifest(
            name="clf", version="2.0.0", data=junk, signature=read_signature(model_v1)
        )
        signed2 = sign_manifest(manifest, harness.keys.private)
        url2 = harness.artifacts.presign_get(
            harness.artifacts.put_model("clf", "2.0.0", junk, signed2), 600
        )
    await harness.send(bad := deploy(signed2, url2))
    final = await harness.final_event(bad.command_id)
    assert final.phase == "failed"
    assert final.reason == reason, final
    assert harness.agent.active and harness.agent.active.version == "1.0.0"
    np.testing.assert_allclose(harness.agent.infer(X), reference(model_v1), atol=1e-6)
    store = harness.agent.store
    assert list(store.downloads.iterdir()) == []
    assert {sha for sha, _ in store.stored()} == {signed.unverified().sha256}


async def test_region_command_with_a_selector_reaches_only_matching_devices(
    harness: Harness, model_v1: bytes
) -> None:
    """A region-wide deploy for gateways is ignored by a camera; one for cameras is done."""
    signed, url = harness.upload(model_v1, "1.0.0")
    region_topic = topics.region_cmd("eu-west")
    skip = deploy(signed, url, selector=Selector(device_types=("gateway",)))
    await harness.send(skip, region_topic)
    take = deploy(signed, url, selector=Selector(device_types=("camera",)))
    await harness.send(take, region_topic)
    assert (await harness.final_event(take.command_id)).phase == "activated"
    assert harness.phases(skip.command_id) == []


async def test_restarted_agent_serves_the_stored_model_offline(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> None:
    """With the broker down, a restarted agent serves its last model at once; it reconnects later."""
    first = Agent(agent_config(tmp_path, signing_keys, mosquitto))
    async with watching(first, mosquitto, s3, signing_keys) as h, running(first):
        signed, url = h.upload(model_v1, "1.0.0")
        await h.send(cmd := deploy(signed, url))
        await h.final_event(cmd.command_id)
    mosquitto.stop()
    second = Agent(agent_config(tmp_path, signing_keys, mosquitto))
    async with running(second, wait_connected=False):
        await asyncio.wait_for(second.serving.wait(), 10)
        assert not second.connected.is_set()
        np.testing.assert_allclose(second.infer(X), reference(model_v1), atol=1e-6)
        mosquitto.start()
        await asyncio.wait_for(second.connected.wait(), 30)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


async def test_expired_url_is_refreshed_through_the_controller_and_the_download_completes(
    harness: Harness, model_v1: bytes
) -> None:
    """HTTP 403 → `downloading`/`url_expired` event → same command with a fresh URL → activated."""
    signed, good_url = harness.upload(model_v1, "1.0.0")
    with ArtifactServer(model_v1, "expired") as expired:
        cmd = deploy(signed, expired.url)
        await harness.send(cmd)
        async with asyncio.timeout(10):
            while not any(e.reason == "url_expired" for e in harness.events):
                await asyncio.sleep(0.05)
    await harness.send(cmd.model_copy(update={"url": good_url}))
    final = await harness.final_event(cmd.command_id)
    assert final.phase == "activated"
    assert harness.phases(cmd.command_id) == [
        "received", "downloading", "downloading", "verified", "activated"
    ]  # fmt: skip


@pytest.mark.serial  # latency verdicts: run alone, not beside 3 other tests
async def test_much_slower_model_is_swapped_back_by_the_agent(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, model_v1: bytes
) -> None:
    """Health watch: a model far slower than the previous one is rolled back, v1 serves on."""
    agent = Agent(
        agent_config(tmp_path, signing_keys, mosquitto, workload_hz=200, max_latency_factor=3)
    )
    slow = build_dense_model(hidden=(2048, 2048, 2048), seed=3)  # same signature, ~1000x the work
    async with watching(agent, mosquitto, s3, signing_keys) as h, running(agent):
        signed, url = h.upload(model_v1, "1.0.0")
        await h.send(first := deploy(signed, url))
        assert (await h.final_event(first.command_id)).phase == "activated"
        await asyncio.sleep(0.5)  # live traffic on v1 gives the baseline
        signed, url = h.upload(slow, "2.0.0")
        await h.send(bad := deploy(signed, url))
        final = await h.final_event(bad.command_id, within_s=60)
        assert (final.phase, final.reason) == ("rolled_back", "unhealthy"), final
        assert agent.active and agent.active.version == "1.0.0"
        np.testing.assert_allclose(agent.infer(X), reference(model_v1), atol=1e-6)


async def test_staged_model_survives_a_restart_and_switches_by_reference(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Blue-green on one device: v2 staged (v1 serves), agent restarted, switch → v2 serves."""
    from shared.messages import SwitchCommand

    async def with_agent(steps: Any) -> None:
        agent = Agent(agent_config(tmp_path, signing_keys, mosquitto))
        async with watching(agent, mosquitto, s3, signing_keys) as h, running(agent):
            await steps(h)

    staged: list[Any] = []

    async def stage(h: Harness) -> None:
        signed, url = h.upload(model_v1, "1.0.0")
        await h.send(first := deploy(signed, url))
        assert (await h.final_event(first.command_id)).phase == "activated"
        signed, url = h.upload(model_v2, "2.0.0")
        await h.send(cmd := deploy(signed, url, activate=False))
        final = await h.final_event(cmd.command_id)
        assert final.phase == "staged" and final.model is not None
        staged.append(final.model)
        assert h.agent.active and h.agent.active.version == "1.0.0"
        assert h.agent.standby and h.agent.standby.version == "2.0.0"
        np.testing.assert_allclose(h.agent.infer(X), reference(model_v1), atol=1e-6)

    async def switch(h: Harness) -> None:
        assert h.agent.standby and h.agent.standby.version == "2.0.0"  # restored from disk
        flip = SwitchCommand(command_id="c-switch-1", rollout_id="r-test", to=staged[0])
        await h.send(flip)
        final = await h.final_event(flip.command_id)
        assert final.phase == "activated" and h.phases(flip.command_id) == ["received", "activated"]
        np.testing.assert_allclose(h.agent.infer(X), reference(model_v2), atol=1e-6)
        assert h.agent.standby and h.agent.standby.version == "1.0.0"

    await with_agent(stage)
    await with_agent(switch)


# ------------------------------------------------------------ tensor layouts


async def test_an_incompatible_candidate_is_refused_before_download_unless_allowed(
    harness: Harness,
) -> None:
    """Another output shape: `failed`/`incompatible` naming the tensor, before any download,
    the served model untouched; the same candidate with allow_interface_change serves."""
    served = build_two_input_model(seed=1)
    changed = build_two_input_model(seed=2, regression=3)
    signed, url = harness.upload(served, "1.0.0")
    await harness.send(first := deploy(signed, url))
    assert (await harness.final_event(first.command_id)).phase == "activated"
    signed2, url2 = harness.upload(changed, "2.0.0")
    await harness.send(refused := deploy(signed2, url2))
    final = await harness.final_event(refused.command_id)
    assert (final.phase, final.reason) == ("failed", "incompatible")
    assert final.detail is not None
    assert "output 1 ('regression'): shape [1, 3] instead of [1, 2]" in final.detail
    assert harness.phases(refused.command_id) == ["received", "failed"]  # nothing downloaded
    assert not harness.agent.store.has(signed2.unverified().sha256)
    inputs = {"features": np.ones((1, 4), np.float32), "context": np.ones((1, 2), np.float32)}
    assert harness.agent.infer(inputs)["regression"].shape == (1, 2)
    await harness.send(allowed := deploy(signed2, url2, allow_interface_change=True))
    assert (await harness.final_event(allowed.command_id)).phase == "activated"
    assert harness.agent.infer(inputs)["regression"].shape == (1, 3)


async def test_a_manifest_pushed_as_an_interface_change_is_accepted(harness: Harness) -> None:
    """`model push --interface-change` (the signed manifest says so) needs no command flag."""
    signed, url = harness.upload(build_two_input_model(seed=1), "1.0.0")
    await harness.send(first := deploy(signed, url))
    assert (await harness.final_event(first.command_id)).phase == "activated"
    signed2, url2 = harness.upload(build_dense_model(seed=2), "2.0.0", interface_change=True)
    await harness.send(cmd := deploy(signed2, url2))
    assert (await harness.final_event(cmd.command_id)).phase == "activated"
    np.testing.assert_allclose(
        harness.agent.infer(X), reference(build_dense_model(seed=2)), atol=1e-6
    )


async def test_a_third_party_multi_output_model_serves_and_swaps_to_a_compatible_one(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, face_detector: bytes
) -> None:
    """MediaPipe's face detector (two outputs) deployed, then another version of it (other
    weights, same interface) while an application thread calls by name and the synthetic
    workload runs: both activated, no call fails, the new model's outputs served."""
    agent = Agent(agent_config(tmp_path, signing_keys, mosquitto, workload_hz=50, interpreters=2))
    v2 = with_other_weights(face_detector)
    image = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)
    errors: list[BaseException] = []
    calls = 0
    stop = threading.Event()

    def application() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                out = agent.infer({"input": image})
                assert out["classificators"].shape == (1, 896, 1)
                calls += 1
            except BaseException as exc:  # any failure is a dropped request
                errors.append(exc)
                return
            time.sleep(0.002)

    async with watching(agent, mosquitto, s3, signing_keys) as h, running(agent):
        signed, url = h.upload(face_detector, "1.0.0")
        await h.send(first := deploy(signed, url))
        assert (await h.final_event(first.command_id)).phase == "activated"
        app = threading.Thread(target=application)
        app.start()
        try:
            await asyncio.sleep(0.3)
            signed2, url2 = h.upload(v2, "2.0.0")
            await h.send(second := deploy(signed2, url2))
            final = await h.final_event(second.command_id, within_s=30)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            app.join()
        assert final.phase == "activated", final
        assert errors == [] and calls > 0
        regressors, _ = agent.infer([image])
        want = make_interpreter(v2)
        want.set_tensor(want.get_input_details()[0]["index"], image)
        want.invoke()
        np.testing.assert_allclose(
            regressors, want.get_tensor(want.get_output_details()[0]["index"]), atol=1e-5
        )
        active = agent.runtime.active
        assert active is not None and active.stats.snapshot().errors == 0


async def test_a_quantized_wake_word_swaps_to_the_next_one(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    tmp_path: Path,
    wakeword_int8: bytes,
    wakeword_int8_b: bytes,
) -> None:
    """int8 in, uint8 out, same quantization: compatible; the workload feeds it int8 frames."""
    agent = Agent(agent_config(tmp_path, signing_keys, mosquitto, workload_hz=100))
    async with watching(agent, mosquitto, s3, signing_keys) as h, running(agent):
        for data, version in ((wakeword_int8, "1.0.0"), (wakeword_int8_b, "2.0.0")):
            signed, url = h.upload(data, version)
            await h.send(cmd := deploy(signed, url))
            assert (await h.final_event(cmd.command_id)).phase == "activated"
            await asyncio.sleep(0.2)
        out = agent.infer(np.zeros((1, 3, 40), np.int8))
        assert out.dtype == np.uint8 and out.shape == (1, 1)
        active = agent.runtime.active
        assert active is not None
        stats = active.stats.snapshot()
        assert stats.count > 5 and stats.errors == 0


async def test_a_dynamic_shape_candidate_is_warmed_up_on_the_shapes_in_use(
    harness: Harness, melspectrogram: bytes
) -> None:
    """After the application called the mel spectrogram with 1280-sample frames, the next
    version is warmed up (and probed) at that size, not at the placeholder."""
    signed, url = harness.upload(melspectrogram, "1.0.0")
    await harness.send(first := deploy(signed, url))
    assert (await harness.final_event(first.command_id)).phase == "activated"
    (spec,) = harness.agent.infer((np.zeros((1, 1280), np.float32),))
    assert spec.shape == (1, 1, 5, 32)
    signed2, url2 = harness.upload(melspectrogram + bytes(64), "2.0.0")  # another file
    await harness.send(second := deploy(signed2, url2))
    assert (await harness.final_event(second.command_id)).phase == "activated"
    active = harness.agent.runtime.active
    assert active is not None and active.ref.version == "2.0.0"
    assert active.sample_shapes == ((1, 1280),)


async def test_a_model_that_loads_but_does_not_run_is_refused_before_it_serves(
    harness: Harness, model_v1: bytes, unloadable_model: bytes
) -> None:
    """A valid file with an unresolved custom op (its manifest from the file reader, which
    needs no interpreter): `failed`/`not_a_model`, v1 serves on."""
    signed, url = harness.upload(model_v1, "1.0.0")
    await harness.send(first := deploy(signed, url))
    await harness.final_event(first.command_id)
    signed2, url2 = harness.upload(
        unloadable_model,
        "2.0.0",
        signature=tflite_schema.read_signature(unloadable_model),
        interface_change=True,
    )
    await harness.send(bad := deploy(signed2, url2))
    final = await harness.final_event(bad.command_id)
    assert (final.phase, final.reason) == ("failed", "not_a_model"), final
    np.testing.assert_allclose(harness.agent.infer(X), reference(model_v1), atol=1e-6)


async def test_shadow_mode_of_a_multi_output_detector_compares_every_output(
    harness: Harness, face_detector: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BlazeFace with other weights shadows the served one: its windows say it is a detector
    and that both outputs were compared within the tolerance; the served model's outputs
    are what the application gets."""
    windows: list[TelemetryWindow] = []
    drain = harness.agent.telemetry.drain

    def recording(now: datetime) -> list[TelemetryWindow]:
        out = drain(now)
        windows.extend(out)
        return out

    monkeypatch.setattr(harness.agent.telemetry, "drain", recording)
    signed, url = harness.upload(face_detector, "1.0.0")
    await harness.send(first := deploy(signed, url))
    assert (await harness.final_event(first.command_id)).phase == "activated"
    signed2, url2 = harness.upload(with_other_weights(face_detector), "2.0.0")
    await harness.send(cmd := deploy(signed2, url2, activate=False, shadow_s=30))
    assert (await harness.final_event(cmd.command_id)).phase == "staged"
    image = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)
    served = make_interpreter(face_detector)
    served.set_tensor(served.get_input_details()[0]["index"], image)
    served.invoke()
    want = served.get_tensor(served.get_output_details()[1]["index"])
    for _ in range(30):
        got = harness.agent.infer({"input": image})
        np.testing.assert_allclose(got["classificators"], want, rtol=1e-5, atol=1e-5)
        await asyncio.sleep(0.01)
    async with asyncio.timeout(10):
        while sum(w.count for w in windows if w.shadow) < 30:
            await asyncio.sleep(0.05)
    mirrored = [w for w in windows if w.shadow]
    assert {w.agreement_rule for w in mirrored} == {"all outputs within rtol=0.01, atol=0.001"}
    assert {w.task for w in windows} == {"detector on 'classificators' (threshold 0.5)"}
    assert all(w.agreements is not None and w.agreements <= w.count for w in mirrored)
