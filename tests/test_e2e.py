"""The spine end to end: CLI → controller → real broker → agents → real interpreters.

A real mosquitto on a free port, moto's real S3 HTTP API, the controller as a
separate `hotswap controller run` process, three edge agents running real
LiteRT interpreters, and the operator's real CLI commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from broker.launcher import Mosquitto
from edge_agent.agent import Agent, AgentConfig
from shared import topics
from shared.keys import load_public_key
from shared.messages import DeviceState
from shared.mqtt import make_client
from shared.settings import MqttEndpoint
from shared.tflite import make_interpreter
from tests.conftest import S3, KeyPair, device_endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROBE = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
DEVICES = (
    ("cam-1", "eu-west", "camera"),
    ("cam-2", "eu-west", "camera"),
    ("gw-1", "us-east", "gateway"),
)


def reference(model: bytes, x: np.ndarray) -> np.ndarray:
    interp = make_interpreter(model)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


class Cli:
    """Runs `hotswap …` as a real process with the test's broker and S3 in its env."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    async def __call__(self, *args: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", *args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def controller_process(
    mosquitto: Mosquitto, s3: S3, tmp_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    log = (tmp_path / "controller.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "controller", "run",
        "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("controller")),
        "--db-url", f"sqlite:///{tmp_path / 'controller.db'}",
        "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket, "--metrics-port", "0",
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()


def make_agent(
    device: tuple[str, str, str], tmp_path: Path, keys: KeyPair, broker: Mosquitto
) -> Agent:
    device_id, region, device_type = device
    return Agent(
        AgentConfig(
            device_id=device_id,
            region=region,
            device_type=device_type,
            data_dir=tmp_path / "agents" / device_id,
            trusted_keys=(load_public_key(keys.public_path),),
            mqtt=device_endpoint(broker, device_id, region, device_type),
            workload_hz=50.0,
            telemetry_interval_s=0.5,
        )
    )


async def retained_states(operator: MqttEndpoint) -> dict[str, DeviceState]:
    """What runs where, read with an operator's identity from the retained state topics."""
    states: dict[str, DeviceState] = {}
    async with make_client(operator, identifier="test-state-reader") as client:
        await client.subscribe(topics.ALL_DEVICE_STATES, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    state = DeviceState.model_validate_json(message.payload)
                    states[state.device_id] = state
    return states


async def eventually(check, within_s: float = 30.0) -> None:
    async with asyncio.timeout(within_s):
        while not await check():
            await asyncio.sleep(0.2)


async def test_signed_models_roll_out_directly_and_bad_ones_are_refused(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    controller_process: asyncio.subprocess.Process,
    model_v1: bytes,
    model_v2: bytes,
    model_other_signature: bytes,
    tmp_path: Path,
) -> None:
    """v1 then v2 reach every agent; a wrong tensor signature fails and changes nothing."""
    cli = Cli(
        os.environ
        | {
            "HOTSWAP_MQTT_URL": mosquitto.url,
            "HOTSWAP_CREDENTIALS": str(mosquitto.credentials("operator")),
            "HOTSWAP_S3_ENDPOINT": s3.endpoint,
            "HOTSWAP_S3_BUCKET": s3.bucket,
            "HOTSWAP_SIGNING_KEY": str(signing_keys.private_path),
        }
    )
    files = {}
    for name, data in (("v1", model_v1), ("v2", model_v2), ("bad", model_other_signature)):
        files[name] = tmp_path / f"{name}.tflite"
        files[name].write_bytes(data)

    agents = [make_agent(d, tmp_path, signing_keys, mosquitto) for d in DEVICES]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:

        async def all_online() -> bool:
            r = await cli("device", "list", "--json")
            return r.code == 0 and sum(d["online"] for d in r.json()) == len(DEVICES)

        await eventually(all_online)

        # v1 to explicit devices, v2 by region + by device type.
        r = await cli("model", "push", str(files["v1"]), "--name", "clf", "--version", "1.0.0")
        assert r.code == 0, r.err
        r = await cli(
            "model", "push", str(files["v2"]), "--name", "clf", "--version", "2.0.0", "--json"
        )
        assert r.code == 0, r.err
        assert r.json()["version"] == "2.0.0"
        listed = (await cli("model", "list", "--json")).json()
        assert [(m["name"], m["version"]) for m in listed] == [("clf", "1.0.0"), ("clf", "2.0.0")]

        r = await cli(
            "rollout", "start", "--model", "clf", "--version", "1.0.0", "--strategy", "direct",
            "--devices", "cam-1,cam-2,gw-1", "--json",
        )  # fmt: skip
        assert r.code == 0, r.err
        first = r.json()["rolloutId"]
        r = await cli("rollout", "status", first, "--wait", "60", "--json")
        assert r.code == 0, r.out + r.err
        status = r.json()
        assert status["status"] == "Succeeded"
        assert (status["devicesTargeted"], status["devicesUpdated"], status["successRate"]) == (
            3,
            3,
            100.0,
        )
        for agent in agents:
            np.testing.assert_allclose(agent.infer(PROBE), reference(model_v1, PROBE), atol=1e-6)

        ids = []
        for selector in (("--region", "eu-west"), ("--device-type", "gateway")):
            r = await cli(
                "rollout", "start", "--model", "clf", "--version", "2.0.0", *selector, "--json"
            )
            assert r.code == 0, r.err
            ids.append(r.json()["rolloutId"])
        for rid in ids:
            r = await cli("rollout", "status", rid, "--wait", "60", "--json")
            assert r.code == 0 and r.json()["status"] == "Succeeded", r.out + r.err

        states = await retained_states(mosquitto.endpoint("operator"))
        assert {d: (s.online, s.active and s.active.ref) for d, s in states.items()} == {
            d[0]: (True, "clf@2.0.0") for d in DEVICES
        }
        assert all(s.standby and s.standby.ref == "clf@1.0.0" for s in states.values())
        v2_out = reference(model_v2, PROBE)
        assert not np.allclose(v2_out, reference(model_v1, PROBE))
        for agent in agents:
            np.testing.assert_allclose(agent.infer(PROBE), v2_out, atol=1e-6)

        # avgInferenceLatency comes from the agents' telemetry of the new version.
        async def latency_reported() -> bool:
            r = await cli("rollout", "status", ids[0], "--json")
            return r.json()["avgInferenceLatency"] is not None

        await eventually(latency_reported)

        # A model with another tensor signature: every agent refuses it, nothing changes.
        r = await cli("model", "push", str(files["bad"]), "--name", "clf", "--version", "3.0.0")
        assert r.code == 0, r.err
        r = await cli(
            "rollout",
            "start",
            "--model",
            "clf",
            "--version",
            "3.0.0",
            "--region",
            "eu-west",
            "--json",
        )
        bad = r.json()["rolloutId"]
        r = await cli("rollout", "status", bad, "--wait", "60", "--json")
        assert r.code == 1
        status = r.json()
        assert status["status"] == "Failed"
        assert status["devicesUpdated"] == 0
        assert {d["state"] for d in status["devices"]} == {"failed"}
        assert all("incompatible" in (d["reason"] or "") for d in status["devices"])
        for agent in agents:
            assert agent.active is not None and agent.active.version == "2.0.0"
            np.testing.assert_allclose(agent.infer(PROBE), v2_out, atol=1e-6)

        # Bad input: one line, non-zero exit; the controller keeps serving.
        for args, code, message in (
            (("rollout", "start", "--model", "clf", "--version", "9", "--all"), 2, "unknown model clf@9"),
            (("rollout", "start", "--model", "clf", "--version", "2.0.0", "--devices", "nope"), 2, "not registered: nope"),
            (("model", "push", str(tmp_path / "missing.tflite"), "--name", "x", "--version", "1"), 2, "cannot read"),
            (("model", "push", str(signing_keys.public_path), "--name", "x", "--version", "1"), 2, "TFL3"),
            (("model", "push", str(files["v1"]), "--name", "x", "--version", "1", "--signing-key", str(tmp_path / "nokey")), 2, "cannot read signing key"),
            (("rollout", "status", "r-doesnotexist"), 2, "unknown rollout"),
            (("device", "list", "--mqtt-url", "mqtt://127.0.0.1:1"), 1, "cannot reach the MQTT broker"),
            (("device", "list", "--credentials", str(tmp_path / "nowhere")), 2, "does not exist"),
            (("device", "list", "--credentials", str(mosquitto.credentials("admin"))), 2, "does not let 'hotswap-admin' subscribe"),
        ):  # fmt: skip
            r = await cli(*args)
            assert r.code == code, (args, r.code, r.err)
            assert len(r.err.strip().splitlines()) == 1 and message in r.err, (args, r.err)
        assert controller_process.returncode is None
        assert (await cli("device", "list", "--json")).code == 0

        # Restart: the agent serves its last model before the broker is back.
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        mosquitto.stop()
        restarted = make_agent(DEVICES[0], tmp_path, signing_keys, mosquitto)
        tasks[0] = asyncio.create_task(restarted.run())
        await asyncio.wait_for(restarted.serving.wait(), 10)
        assert not restarted.connected.is_set()
        assert restarted.active is not None and restarted.active.version == "2.0.0"
        np.testing.assert_allclose(restarted.infer(PROBE), v2_out, atol=1e-6)
        mosquitto.start()
        await asyncio.wait_for(restarted.connected.wait(), 30)

        async def restarted_state() -> bool:
            s = (await retained_states(mosquitto.endpoint("operator"))).get("cam-1")
            return bool(s and s.online and s.active and s.active.version == "2.0.0")

        await eventually(restarted_state)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
