"""The controller's Prometheus metrics, on the engine (no broker): "what runs where"
follows each state and provisioning record exactly as the store's rows do, revoked
devices are never online, aborted rollouts are counted, and the exposition passes
`promtool check metrics`."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from controller import metrics
from controller.service import Controller
from shared import topics
from shared.messages import (
    ControlRollout,
    DeviceRecord,
    DeviceState,
    ModelRef,
    StartRollout,
)
from tests.controller.conftest import Recorder


@pytest.fixture
async def engine(detached_engine: Controller) -> Controller:
    await detached_engine.attach(Recorder())
    return detached_engine


def from_rows(controller: Controller) -> dict[tuple[str, str, str], int]:
    """The oracle: the same counts, read from the store's rows."""
    return dict(
        Counter(
            (r.region, r.active_name or "", r.active_version or "")
            for r in controller.store.list_devices()
            if r.online and not r.revoked
        )
    )


def ref(version: str) -> ModelRef:
    return ModelRef(name="m", version=version, sha256=version[0] * 64)


async def test_what_runs_where_follows_each_change_as_the_rows_do(engine: Controller) -> None:
    """Random states (online, last wills, model changes, region claims), provisioning records
    and revocations: after every batch the gauge equals a count over the rows; revoked
    devices never count as online; a reload from the rows gives the same counts."""
    rng = random.Random(7)
    devices = [f"d-{i}" for i in range(30)]
    regions, versions = ("eu", "us", "ap"), ("1.0", "2.0", "3.0")
    for _ in range(25):
        for _ in range(rng.randint(1, 20)):
            device = rng.choice(devices)
            roll = rng.random()
            if roll < 0.15:
                record = DeviceRecord(
                    device_id=device, region=rng.choice(regions), device_type="cam"
                )
                engine.receive(topics.device_registry(device), record.to_wire(), retain=True)
            elif roll < 0.2:
                record = DeviceRecord(device_id=device, revoked=True)
                engine.receive(topics.device_registry(device), record.to_wire(), retain=True)
            else:
                state = DeviceState(
                    device_id=device,
                    region=rng.choice(regions),
                    device_type="cam",
                    online=rng.random() < 0.7,
                    active=rng.choice([None, *(ref(v) for v in versions)]),
                )
                engine.receive(topics.device_state(device), state.to_wire())
        await engine.flush()
        expected = from_rows(engine)
        assert metrics.FLEET.serving() == expected
        assert metrics.FLEET.online == engine.store.devices_online()
    revoked = {r.device_id for r in engine.store.list_devices() if r.revoked}
    assert revoked, "the run revoked no device: the test proves nothing about revocation"
    for device in revoked:  # a revoked device saying it is online stays offline
        state = DeviceState(
            device_id=device, region="eu", device_type="cam", online=True, active=ref("1.0")
        )
        engine.receive(topics.device_state(device), state.to_wire())
    await engine.flush()
    assert metrics.FLEET.serving() == from_rows(engine)
    online = metrics.REGISTRY.get_sample_value("hotswap_devices_online")
    assert online == engine.store.devices_online() == sum(from_rows(engine).values())
    metrics.FLEET.load(engine.store.list_devices())
    assert metrics.FLEET.serving() == from_rows(engine)


async def test_an_aborted_rollout_is_counted_with_its_duration(engine: Controller) -> None:
    """`rollout abort` ends a rollout: hotswap_rollouts_finished_total{status="Aborted"} and
    the duration histogram count it."""
    for i in range(3):
        state = DeviceState(
            device_id=f"a-{i}", region="eu", device_type="cam", online=True, active=ref("1.0")
        )
        engine.receive(topics.device_state(f"a-{i}"), state.to_wire())
    await engine.flush()

    def value(name: str, labels: dict[str, str]) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    aborted = value("hotswap_rollouts_finished_total", {"status": "Aborted"})
    timed = value(
        "hotswap_rollout_duration_seconds_count", {"strategy": "canary", "status": "Aborted"}
    )
    started = await engine.request(
        StartRollout(
            model="m", version="2.0", strategy="canary", devices=("a-0", "a-1", "a-2"),
            canary_percent=34, manual_approval=True,
        )
    )  # fmt: skip
    rid = started["rolloutId"]
    await engine.tick()
    info = metrics.REGISTRY.get_sample_value(
        "hotswap_rollout_devices_targeted", {"rollout_id": rid}
    )
    assert info == 3
    await engine.request(ControlRollout(rollout_id=rid, action="abort"))
    assert value("hotswap_rollouts_finished_total", {"status": "Aborted"}) == aborted + 1
    assert (
        value("hotswap_rollout_duration_seconds_count", {"strategy": "canary", "status": "Aborted"})
        == timed + 1
    )
    assert value("hotswap_rollouts_started_total", {"strategy": "canary"}) >= 1


def promtool() -> str | None:
    """promtool (Debian's `prometheus` package); on CI its absence is a failure."""
    found = shutil.which("promtool")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
    return found


def check_metrics(text: bytes) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return subprocess.run(
        [tool, "check", "metrics"], input=text.decode(), capture_output=True, text=True, timeout=30
    )


async def test_the_exposition_passes_promtool(engine: Controller) -> None:
    """After states, a rollout and a request, `promtool check metrics` finds nothing to say,
    and the process and platform collectors are there."""
    from prometheus_client import generate_latest

    state = DeviceState(
        device_id="p-1", region="eu", device_type="cam", online=True, active=ref("1.0")
    )
    engine.receive(topics.device_state("p-1"), state.to_wire())
    await engine.flush()
    await engine.request(StartRollout(model="m", version="2.0", devices=("p-1",)))
    await engine.tick()
    text = generate_latest(metrics.REGISTRY)
    result = check_metrics(text)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    names = {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE")}
    assert {
        "process_cpu_seconds_total",
        "python_info",
        "hotswap_build_info",
        "hotswap_devices_serving",
    } <= (names)


def test_promtool_is_not_silenced(tmp_path: Path) -> None:
    """The check above can fail: promtool flags a counter without _total."""
    bad = b"# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n"
    result = check_metrics(bad)
    assert result.returncode != 0 or result.stdout.strip()
