"""Harness for the fault catalogue: a real controller process, real agents, real signals.

Everything here is the real thing: `hotswap controller run` as a child process
(SIGKILL / SIGTERM it), the secure mosquitto of tests/conftest.py (SIGKILL it
with `kill_broker`, bring it back on the same port and data dir with
`restart_broker`), moto's S3 HTTP API and in-process edge agents with real
interpreters. Does process, network and file I/O.

API:
- `ControllerProcess(mosquitto, s3, tmp_path, signing_keys, *, db_path=None, db_url=None,
  name="controller")` and the function-scoped async fixture `controller` (started, connected):
  `.proc`, `.db_path`, `.db_url`, `.metrics_port`, `.log_path`, `async start()`,
  `async wait_connected(within_s=15, times=1)`, `connected_count()`, `log_text()`,
  `log_events()`, `events(name)`, `async kill()`, `async terminate() -> int`, `alive()`,
  `metrics_text()`, `metric(name, **labels) -> float`, `async cli(*args) -> Result`.
- `Result(code, out, err)` with `.json()`.
- `async eventually(check, within_s=30.0)`: `check` (sync or async) until truthy.
- `kill_broker(mosquitto)` (SIGKILL, restartable), `restart_broker(mosquitto)` (same port/dir).
- `async retained(endpoint, topic, within_s=2.0) -> bytes | None`.
- `make_agents(mosquitto, tmp_path, signing_keys, devices, **config)`: async context
  manager running real `Agent`s (each device a `(id, region, type)` tuple) for the block.
- `async push(cli, path, name, version)`: `model push` through the CLI; asserts success.
- `async devices_online(controller, n, within_s=30)`: until `device list` shows `n` online.
- `async start_rollout(controller, *args) -> str`: `rollout start ARGS --json`; the rollout id.
- `async final_rollout(controller, rollout_id, within_s=60) -> dict`: polls `rollout status
  --json` until final, failing at once if the controller process has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.launcher import Mosquitto, free_port
from broker.s3server import DEMO_CREDENTIALS
from edge_agent.agent import Agent
from shared.mqtt import make_client
from shared.settings import MqttEndpoint
from tests.conftest import S3, KeyPair, fleet_agents


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class ControllerProcess:
    """`hotswap controller run --log-json` as a child process, logging to `<tmp_path>/<name>.log`."""

    def __init__(
        self,
        mosquitto: Mosquitto,
        s3: S3,
        tmp_path: Path,
        signing_keys: KeyPair,
        *,
        db_path: Path | None = None,
        db_url: str | None = None,
        name: str = "controller",
    ) -> None:
        self.mosquitto = mosquitto
        self.db_path = db_path or tmp_path / f"{name}.db"
        self.db_url = db_url or f"sqlite:///{self.db_path}"
        self.metrics_port = free_port()
        self.log_path = tmp_path / f"{name}.log"
        self.env = os.environ | DEMO_CREDENTIALS
        self.cli_env = self.env | {
            "HOTSWAP_MQTT_URL": mosquitto.url,
            "HOTSWAP_CREDENTIALS": str(mosquitto.credentials("operator")),
            "HOTSWAP_S3_ENDPOINT": s3.endpoint,
            "HOTSWAP_S3_BUCKET": s3.bucket,
            "HOTSWAP_SIGNING_KEY": str(signing_keys.private_path),
        }
        self.args = [
            sys.executable, "-m", "broker.cli", "controller", "run",
            "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("controller")),
            "--db-url", self.db_url, "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket,
            "--metrics-port", str(self.metrics_port), "--log-json",
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process (appending to its log); does not wait for it to connect."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, env=self.env, stdout=log, stderr=log
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON line of the log (other lines, e.g. tracebacks, are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def connected_count(self) -> int:
        return len(self.events("controller_connected"))

    async def wait_connected(self, within_s: float = 15.0, times: int = 1) -> None:
        """Until the log shows `controller_connected` at least `times` times."""

        def connected() -> bool:
            assert self.alive(), f"the controller exited:\n{self.log_text()[-3000:]}"
            return self.connected_count() >= times

        await eventually(connected, within_s)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, within_s: float = 20.0) -> int:
        """SIGTERM; the exit code (the process is SIGKILLed if it outlives `within_s`)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), within_s)
            except TimeoutError:
                await self.kill()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def metrics_text(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            m = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    async def cli(self, *args: str) -> Result:
        """`hotswap …` as a real process, as the operator, with this test's broker and S3."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", *args,
            env=self.cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def controller(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> AsyncIterator[ControllerProcess]:
    """A connected controller process; terminated at teardown if still alive."""
    process = ControllerProcess(mosquitto, s3, tmp_path, signing_keys)
    await process.start()
    try:
        await process.wait_connected()
        yield process
    finally:
        if process.alive():
            await process.terminate()


async def eventually(check: Callable[[], Any], within_s: float = 30.0) -> None:
    """Poll `check` (sync or async) until it returns something truthy, at most `within_s`."""
    async with asyncio.timeout(within_s):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.2)


def kill_broker(mosquitto: Mosquitto) -> None:
    """SIGKILL the broker (no clean disconnects, no will flush); `restart_broker` brings it back."""
    proc = mosquitto.process
    assert proc is not None, "the broker is not running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    mosquitto.process = None


def restart_broker(mosquitto: Mosquitto) -> None:
    """Start the broker again on the same port and data directory."""
    mosquitto.start()


async def retained(endpoint: MqttEndpoint, topic: str, within_s: float = 2.0) -> bytes | None:
    """The retained message on `topic` (read fresh with `endpoint`), None if none in `within_s`."""
    async with make_client(endpoint, identifier=f"test-retained-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes):
                        return message.payload
    return None


@contextlib.asynccontextmanager
async def make_agents(
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    devices: Sequence[tuple[str, str, str]],
    **config: Any,
) -> AsyncIterator[list[Agent]]:
    """Real edge agents (`(device_id, region, device_type)` each) running for the block.

    Fast telemetry and light synthetic load by default; `config` overrides AgentConfig fields.
    """
    defaults: dict[str, Any] = {
        "workload_hz": 50.0,
        "telemetry_interval_s": 0.5,
        "max_latency_factor": 1e6,  # the controller's gates are under test, not the agent's
    }
    agents = fleet_agents(mosquitto, signing_keys, tmp_path, devices, **(defaults | config))
    tasks = [asyncio.create_task(a.run(), name=f"agent-{a.config.device_id}") for a in agents]
    try:
        yield agents
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def push(
    cli: Callable[..., Awaitable[Result]], path: Path, name: str, version: str
) -> Result:
    """`hotswap model push PATH --name NAME --version VERSION --json`; asserts it succeeded."""
    r = await cli("model", "push", str(path), "--name", name, "--version", version, "--json")
    assert r.code == 0, r.err
    return r


FINAL_ROLLOUT_STATES = frozenset({"Succeeded", "Failed", "RolledBack", "Aborted"})


async def devices_online(controller: ControllerProcess, n: int, within_s: float = 30.0) -> None:
    """Until the controller's `device list` shows at least `n` devices online."""

    async def online() -> bool:
        assert controller.alive(), f"the controller exited:\n{controller.log_text()[-3000:]}"
        r = await controller.cli("device", "list", "--json")
        return r.code == 0 and sum(d["online"] for d in r.json()) >= n

    await eventually(online, within_s)


async def start_rollout(controller: ControllerProcess, *args: str) -> str:
    """`hotswap rollout start ARGS --json`; asserts it was accepted and returns its id."""
    r = await controller.cli("rollout", "start", *args, "--json")
    assert r.code == 0, r.err
    return str(r.json()["rolloutId"])


async def final_rollout(
    controller: ControllerProcess, rollout_id: str, within_s: float = 60.0
) -> dict[str, Any]:
    """The rollout's first final retained status (`rollout status --json`, camelCase keys).

    Fails at once, with the log's tail, if the controller process exits meanwhile.
    """
    last: dict[str, Any] = {}

    async def final() -> bool:
        nonlocal last
        assert controller.alive(), f"the controller exited:\n{controller.log_text()[-3000:]}"
        r = await controller.cli("rollout", "status", rollout_id, "--json")
        if r.code == 0:
            last = r.json()
        return last.get("status") in FINAL_ROLLOUT_STATES

    try:
        await eventually(final, within_s)
    except TimeoutError:
        raise AssertionError(f"rollout {rollout_id} not final in {within_s}s: {last}") from None
    return last
