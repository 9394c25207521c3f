"""`hotswap demo`: the whole system on this machine, end to end, in one process.

Starts the secure mosquitto and moto's S3 server on free ports, provisions N
devices through the broker's dynamic-security API (each its own login and
ACLs), runs the controller (its own login; it signs every command with its
command key) and the N edge agents (real interpreters, synthetic load; they
check the controller's signature), pushes two signed versions of a generated
model as the operator, rolls each out Direct, and checks what every device
serves: from the retained state topics and from real inference outputs. Does
process, network and file I/O; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from broker.launcher import Mosquitto
from broker.provision import provision_device
from broker.s3server import S3Server
from controller.artifacts import ArtifactStore
from controller.operator import OperatorClient, push_model, read_rollout_status
from controller.service import Controller, ControllerConfig
from edge_agent.agent import Agent, AgentConfig
from shared import topics
from shared.console import progress
from shared.credentials import COMMAND_KEY_FILE, DeviceIdentity, apply_credentials
from shared.errors import HotswapError
from shared.keys import init_keys, load_private_key, load_public_key
from shared.logs import configure_logging
from shared.messages import DeviceState, ListDevices, StartRollout
from shared.model_builder import build_dense_model
from shared.mqtt import make_client
from shared.settings import MqttEndpoint, parse_mqtt_url
from shared.tflite import make_interpreter

MODEL_NAME = "demo-classifier"
REGIONS = ("eu-west", "us-east")
PROBE = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def reference_output(model: bytes, x: np.ndarray) -> np.ndarray:
    """What a bare interpreter computes for `x`: the ground truth for a device."""
    interp = make_interpreter(model)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    out: np.ndarray = interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
    return out


async def retained_states(endpoint: MqttEndpoint, expected: int) -> dict[str, DeviceState]:
    """Every device's retained state, read with a plain MQTT client (no controller)."""
    states: dict[str, DeviceState] = {}
    async with make_client(endpoint, identifier=f"hotswap-demo-reader-{time.time_ns()}") as c:
        await c.subscribe(topics.ALL_DEVICE_STATES, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                async for message in c.messages:
                    if isinstance(message.payload, bytes) and message.payload:
                        s = DeviceState.model_validate_json(message.payload)
                        states[s.device_id] = s
                    if len(states) >= expected:
                        break
    return states


async def _wait_for(predicate: Callable[[], Awaitable[bool]], what: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise HotswapError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def _demo(workdir: Path, devices: int, rollout_timeout_s: float) -> dict[str, Any]:
    report: list[str] = []
    with Mosquitto(workdir / "broker") as broker, S3Server() as s3:
        endpoint = broker.endpoint("operator")
        bucket = "hotswap-demo"
        artifacts = ArtifactStore(s3.endpoint, bucket)
        await asyncio.to_thread(artifacts.ensure_bucket)
        progress(f"demo: mosquitto at {broker.url}, S3 at {s3.endpoint}, work dir {workdir}")
        private_key, public_key = init_keys(workdir / "keys")
        controller_dir = broker.credentials("controller")
        controller = Controller(
            ControllerConfig(
                mqtt=broker.endpoint("controller"),
                db_url=f"sqlite:///{workdir / 'controller.db'}",
                s3_endpoint=s3.endpoint,
                s3_bucket=bucket,
                tick_s=0.2,
                command_key=load_private_key(controller_dir / COMMAND_KEY_FILE),
            )
        )
        agents = []
        for i in range(devices):
            # What `hotswap device provision` does: a login, ACLs, a credentials directory.
            device = DeviceIdentity(f"demo-{i + 1}", REGIONS[i % len(REGIONS)], "camera")
            creds = (
                await provision_device(
                    broker.endpoint("admin"),
                    broker.credentials("admin"),
                    device,
                    workdir / "devices" / device.device_id,
                    trusted_keys=(public_key,),
                )
            ).credentials
            if creds.controller_key is None:  # provisioning writes it; never absent
                raise HotswapError(f"{creds.directory} has no controller.pub")
            agents.append(
                Agent(
                    AgentConfig(
                        device_id=device.device_id,
                        region=device.region,
                        device_type=device.device_type,
                        data_dir=workdir / "agents" / device.device_id,
                        trusted_keys=tuple(load_public_key(k) for k in creds.trusted_keys),
                        controller_keys=(load_public_key(creds.controller_key),),
                        mqtt=apply_credentials(parse_mqtt_url(broker.url), creds),
                        workload_hz=20.0,
                        telemetry_interval_s=1.0,
                    )
                )
            )
        progress(f"demo: provisioned {devices} devices (credentials in {workdir / 'devices'})")
        tasks = [asyncio.create_task(controller.run(), name="controller")] + [
            asyncio.create_task(a.run(), name=a.config.device_id) for a in agents
        ]
        try:
            # Requests sent before the controller subscribes would go unheard.
            await asyncio.wait_for(controller.connected.wait(), 30)
            async with OperatorClient(endpoint) as op:

                async def all_registered() -> bool:
                    rows = await op.request(ListDevices())
                    return sum(bool(r["online"]) for r in rows) >= devices

                await _wait_for(all_registered, f"{devices} devices to come online", 30)
                progress(f"demo: controller and {devices} agents online")
                rollouts = []
                models: dict[str, bytes] = {}
                for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
                    data = build_dense_model(seed=seed, description=f"demo {version}")
                    (workdir / f"{MODEL_NAME}-{version}.tflite").write_bytes(data)
                    models[version] = data
                    pushed = await push_model(
                        data,
                        name=MODEL_NAME,
                        version=version,
                        signing_key=private_key,
                        endpoint=endpoint,
                        artifacts=artifacts,
                    )
                    progress(f"demo: pushed {MODEL_NAME}@{version} sha256={pushed.sha256[:12]}")
                    started = await op.request(
                        StartRollout(
                            model=MODEL_NAME,
                            version=version,
                            devices=tuple(a.config.device_id for a in agents),
                        )
                    )
                    rid = started["rolloutId"]
                    progress(f"demo: rollout {rid} of {version} started (direct)")
                    status = await read_rollout_status(endpoint, rid, wait_s=rollout_timeout_s)
                    progress(
                        f"demo: rollout {rid} {status.status}: "
                        f"{status.devices_updated}/{status.devices_targeted} devices"
                    )
                    rollouts.append(status.model_dump(mode="json", by_alias=True))
                # Give each agent a telemetry window on v2, then read the final status.
                await asyncio.sleep(1.5)
                final = await read_rollout_status(endpoint, rollouts[-1]["rolloutId"])
                rollouts[-1] = final.model_dump(mode="json", by_alias=True)

            states = await retained_states(endpoint, devices)
            expected = reference_output(models["2.0.0"], PROBE)
            rows = []
            for agent in agents:
                did = agent.config.device_id
                state = states.get(did)
                served = agent.infer(PROBE)
                rows.append(
                    {
                        "deviceId": did,
                        "region": agent.config.region,
                        "serving": state.active.ref if state and state.active else None,
                        "standby": state.standby.ref if state and state.standby else None,
                        "output": [round(float(v), 6) for v in served.ravel()],
                        "outputMatchesV2": bool(np.allclose(served, expected, atol=1e-6)),
                    }
                )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    ok = all(r["status"] == "Succeeded" for r in rollouts) and all(
        row["serving"] == f"{MODEL_NAME}@2.0.0" and row["outputMatchesV2"] for row in rows
    )
    for r in rollouts:
        latency = r["avgInferenceLatency"]
        report.append(
            f"rollout {r['rolloutId']} {r['model']}@{r['version']}: {r['status']}, "
            f"{r['devicesUpdated']}/{r['devicesTargeted']} devices, success {r['successRate']}%, "
            f"avg latency {'-' if latency is None else f'{latency:.3f} ms'}"
        )
    for row in rows:
        report.append(
            f"{row['deviceId']:<10} {row['region']:<8} serves {row['serving']} "
            f"(standby {row['standby']}); output {row['output']} "
            f"{'= v2 reference' if row['outputMatchesV2'] else '!= v2 reference'}"
        )
    report.append("demo: OK" if ok else "demo: FAILED")
    return {"ok": ok, "rollouts": rollouts, "devices": rows, "report": report}


def run_demo(*, devices: int = 3, rollout_timeout_s: float = 90.0) -> dict[str, Any]:
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="hotswap-demo-") as tmp:
        return asyncio.run(_demo(Path(tmp), devices, rollout_timeout_s))
