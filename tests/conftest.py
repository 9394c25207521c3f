"""Shared fixtures: a real, secure mosquitto per test, moto's real S3 HTTP API, keys, models.

The broker is the secure one (`allow_anonymous false`, dynamic-security ACLs).
Connect as one of its identities with `mosquitto.endpoint("controller")`,
`"operator"` or `"admin"`; give a device an identity with
`device_endpoint(mosquitto, "cam-1", "eu-west", "camera")` (or
`provision(...)` for its whole credentials directory, e.g. for a
`hotswap agent run --credentials` process); `observer_endpoint(mosquitto)` is a
test-only identity that may read every hotswap topic (command spies).
Real third-party models (pinned wheels, `tests.thirdparty`) are session
fixtures of bytes: `face_detector`, `hand_landmarker`, `wakeword_int8`,
`wakeword_int8_b`, `melspectrogram` and `unloadable_model`.
`running_task` runs a controller's or agent's `run()` for the length of a block,
`controller_config` is the test controller's configuration, and `final_event`
waits for a command's last word in a list of recorded device events.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import dynsec
from broker.launcher import Mosquitto
from broker.provision import DynsecAdmin, provision_device
from broker.s3server import S3Server
from controller.service import ControllerConfig
from edge_agent.agent import Agent, AgentConfig
from shared import topics
from shared.credentials import (
    MQTT_FILE,
    Credentials,
    DeviceIdentity,
    MqttLogin,
    apply_credentials,
    endpoint_for,
    load_credentials,
    login_json,
    private_dir,
    write_secret,
)
from shared.keys import init_keys, load_private_key, load_public_key
from shared.messages import FINAL_PHASES, DeviceEvent
from shared.model_builder import build_dense_model
from shared.settings import MqttEndpoint, parse_mqtt_url
from tests.thirdparty import model_bytes

T = TypeVar("T")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real, secure mosquitto on a free port, with its own data directory and identities."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a loop of its own (callable from sync and async tests)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _test_identities(broker: Mosquitto) -> Path:
    return broker.data_dir / "test-identities"


def provision(
    broker: Mosquitto,
    device_id: str,
    region: str = "eu-west",
    device_type: str = "camera",
    *,
    trusted_keys: Sequence[Path] = (),
) -> Credentials:
    """The device's credentials directory, provisioned through the broker's API on first use.

    Later calls for the same device return the same directory (so a test may
    ask again after stopping the broker); the broker must be running the first time.
    """
    out = _test_identities(broker) / device_id
    if (out / MQTT_FILE).exists():
        return load_credentials(out)
    device = DeviceIdentity(device_id, region, device_type)
    admin = broker.endpoint("admin")
    done = run_sync(
        provision_device(admin, broker.credentials("admin"), device, out, trusted_keys=trusted_keys)
    )
    return done.credentials


def device_endpoint(
    broker: Mosquitto, device_id: str, region: str = "eu-west", device_type: str = "camera"
) -> MqttEndpoint:
    """The broker's URL logged in as `device_id` (provisioned on first use)."""
    creds = provision(broker, device_id, region, device_type)
    return apply_credentials(parse_mqtt_url(broker.url), creds)


OBSERVER = "test-observer"


def observer_endpoint(broker: Mosquitto) -> MqttEndpoint:
    """A test-only identity that may subscribe to and read every `hotswap/` topic."""
    out = _test_identities(broker) / OBSERVER
    if not (out / MQTT_FILE).exists():
        login = MqttLogin(OBSERVER, dynsec.new_password())
        role = dynsec.Role(
            OBSERVER,
            (
                dynsec.Acl("subscribePattern", f"{topics.ROOT}/#"),
                dynsec.Acl("publishClientReceive", f"{topics.ROOT}/#"),
            ),
        )

        async def create() -> None:
            async with DynsecAdmin(broker.endpoint("admin")) as api:
                answers = await api.run(
                    [dynsec.create_role(role), dynsec.create_client(login, (role.name,))]
                )
            assert all(a.error is None for a in answers), answers

        run_sync(create())
        write_secret(private_dir(out) / MQTT_FILE, login_json(login))
    return endpoint_for(parse_mqtt_url(broker.url), out)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@dataclass
class S3:
    endpoint: str
    bucket: str


@pytest.fixture
def s3(s3_server: S3Server) -> S3:
    """A fresh bucket on moto's S3 server."""
    bucket = f"hotswap-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    return S3(s3_server.endpoint, bucket)


@dataclass
class KeyPair:
    private_path: Path
    public_path: Path
    private: Ed25519PrivateKey


@pytest.fixture
def signing_keys(tmp_path: Path) -> KeyPair:
    priv, pub = init_keys(tmp_path / "keys")
    return KeyPair(priv, pub, load_private_key(priv))


@pytest.fixture(scope="session")
def model_v1() -> bytes:
    return build_dense_model(seed=1)


@pytest.fixture(scope="session")
def model_v2() -> bytes:
    return build_dense_model(seed=2)


@pytest.fixture(scope="session")
def model_other_signature() -> bytes:
    """Same family, different tensor signature (5 inputs instead of 4)."""
    return build_dense_model(input_size=5, seed=3)


@pytest.fixture(scope="session")
def face_detector() -> bytes:
    """MediaPipe's short-range face detector: float32 [1,128,128,3] -> regressors
    [1,896,16] and classificators [1,896,1] (per-anchor scores)."""
    return model_bytes("face_detector")


@pytest.fixture(scope="session")
def hand_landmarker() -> bytes:
    """MediaPipe's hand landmark model (lite): one float32 input, four outputs."""
    return model_bytes("hand_landmarker")


@pytest.fixture(scope="session")
def wakeword_int8() -> bytes:
    """A quantized, stateful wake word model: int8 [1,3,40] -> uint8 [1,1], with a
    `serving_default` signature runner."""
    return model_bytes("wakeword_int8")


@pytest.fixture(scope="session")
def wakeword_int8_b() -> bytes:
    """Another wake word with wakeword_int8's exact interface: its next version, say."""
    return model_bytes("wakeword_int8_b")


@pytest.fixture(scope="session")
def melspectrogram() -> bytes:
    """A dynamic-shape model: float32 [-1,-1] -> [-1,1,-1,32]."""
    return model_bytes("melspectrogram")


@pytest.fixture(scope="session")
def unloadable_model() -> bytes:
    """A valid TFLite file that no stock interpreter loads (an unresolved custom op)."""
    return model_bytes("unloadable_model")


@contextlib.asynccontextmanager
async def running_task(
    coro: Coroutine[Any, Any, None], ready: asyncio.Event | None = None, within_s: float = 10.0
) -> AsyncIterator[None]:
    """`coro` (a controller's or agent's `run()`) as a task for the block, once `ready` is set;
    cancelled and awaited on the way out."""
    task = asyncio.create_task(coro)
    try:
        if ready is not None:
            await asyncio.wait_for(ready.wait(), within_s)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def fleet_agent_config(
    broker: Mosquitto,
    keys: KeyPair,
    data_dir: Path,
    device_id: str,
    region: str = "eu-west",
    device_type: str = "camera",
    **settings: Any,
) -> AgentConfig:
    """An agent of a test fleet: its own provisioned login on `broker`, its store in
    `data_dir`, trusting the test signing key; `settings` are AgentConfig's."""
    return AgentConfig(
        device_id=device_id,
        region=region,
        device_type=device_type,
        data_dir=data_dir,
        trusted_keys=(load_public_key(keys.public_path),),
        mqtt=device_endpoint(broker, device_id, region, device_type),
        **settings,
    )


def fleet_agents(
    broker: Mosquitto,
    keys: KeyPair,
    root: Path,
    devices: Sequence[tuple[str, str, str]],
    **settings: Any,
) -> list[Agent]:
    """Agents of a test fleet, one per `(device_id, region, device_type)`, each with its
    store in `root/agents/<device_id>` (`fleet_agent_config`); not started."""
    return [
        Agent(fleet_agent_config(broker, keys, root / "agents" / d, d, region, kind, **settings))
        for d, region, kind in devices
    ]


def controller_config(broker: Mosquitto, s3: S3, tmp_path: Path, **kw: Any) -> ControllerConfig:
    """The test controller: its broker identity, a SQLite file in `tmp_path`, a fast tick."""
    fields: dict[str, Any] = {
        "mqtt": broker.endpoint("controller"),
        "db_url": f"sqlite:///{tmp_path / 'controller.db'}",
        "s3_endpoint": s3.endpoint,
        "s3_bucket": s3.bucket,
        "tick_s": 0.1,
    }
    return ControllerConfig(**(fields | kw))


async def final_event(
    events: Sequence[DeviceEvent], command_id: str, within_s: float = 20.0
) -> DeviceEvent:
    """The first final event (`activated`, `failed`, …) for `command_id` in `events`."""
    async with asyncio.timeout(within_s):
        while True:
            for e in events:
                if e.command_id == command_id and e.phase in FINAL_PHASES:
                    return e
            await asyncio.sleep(0.05)
