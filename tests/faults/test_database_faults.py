"""The controller's database runs out of disk (issue 10, item 5), against real processes.

The SQLite file lives on a small real tmpfs mounted by the test, filled with
a filler file until the kernel says ENOSPC while the controller runs; real
agents keep sending telemetry meanwhile. Needs root (for `mount`). Does
process, network and file I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import Mosquitto
from edge_agent.agent import Agent
from tests.conftest import S3, KeyPair
from tests.faults.conftest import (
    ControllerProcess,
    devices_online,
    eventually,
    final_rollout,
    make_agents,
    push,
    start_rollout,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEVICES = (("cam-1", "eu-west", "camera"), ("cam-2", "eu-west", "camera"))
IDS = ",".join(d[0] for d in DEVICES)
REQUEST_TIMEOUT_S = 10.0  # the CLI's own wait for an answer (shared.settings)
# Log lines per kind of storage failure we accept over a few seconds of a full disk.
MAX_STORE_FAILED_EVENTS = 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own, unmounted at teardown."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = tmp_path / "small-disk"
    where.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run([umount, str(where)], check=False).returncode != 0:
            subprocess.run([umount, "-l", str(where)], check=False)  # still busy: detach


@pytest.fixture
async def controller_on_small_disk(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, small_disk: Path
) -> AsyncIterator[ControllerProcess]:
    """A connected controller whose SQLite database is on `small_disk`."""
    process = ControllerProcess(
        mosquitto, s3, tmp_path, signing_keys, db_path=small_disk / "controller.db"
    )
    await process.start()
    try:
        await process.wait_connected()
        yield process
    finally:
        if process.alive():
            await process.terminate()


def fill(directory: Path) -> Path:
    """Write a filler file into `directory` until the file system has no byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def sql(controller: ControllerProcess, statement: str, *params: object) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(controller.db_path, timeout=10)) as db:
        return db.execute(statement, params).fetchall()


def telemetry_rows(controller: ControllerProcess) -> int:
    return int(sql(controller, "SELECT count(*) FROM telemetry_minutes")[0][0])


@contextlib.asynccontextmanager
async def serving_fleet(
    controller: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    model_v1: bytes,
    model_v2: bytes,
) -> AsyncIterator[list[Agent]]:
    """Two agents serving clf@1.0.0 (rolled out Direct) whose telemetry is being stored;
    clf@2.0.0 is registered too."""
    for name, data in (("v1", model_v1), ("v2", model_v2)):
        (tmp_path / f"{name}.tflite").write_bytes(data)
    async with make_agents(mosquitto, tmp_path, signing_keys, DEVICES) as agents:
        await devices_online(controller, len(DEVICES))
        await push(controller.cli, tmp_path / "v1.tflite", "clf", "1.0.0")
        await push(controller.cli, tmp_path / "v2.tflite", "clf", "2.0.0")
        first = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", IDS
        )
        assert (await final_rollout(controller, first))["status"] == "Succeeded"
        await eventually(lambda: telemetry_rows(controller) > 0, within_s=15)
        yield agents


async def test_request_on_a_full_database_is_answered_at_once_with_a_clear_error(
    controller_on_small_disk: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    small_disk: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Disk full: `rollout start` exits 1 with `error: controller database: … full`, well
    before the CLI's request timeout."""
    controller = controller_on_small_disk
    async with serving_fleet(controller, mosquitto, tmp_path, signing_keys, model_v1, model_v2):
        fill(small_disk)
        loop = asyncio.get_running_loop()
        started = loop.time()
        r = await controller.cli(
            "rollout", "start", "--model", "clf", "--version", "2.0.0", "--devices", IDS
        )
        elapsed = loop.time() - started
    assert r.code == 1, (r.code, r.out, r.err)
    assert r.err.startswith("error: controller database:") and "full" in r.err, (elapsed, r.err)
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert elapsed < REQUEST_TIMEOUT_S - 1, f"answered after {elapsed:.1f}s"
    assert controller.alive(), controller.log_text()[-3000:]


async def test_telemetry_on_a_full_database_is_counted_and_logged_at_most_once_per_interval(
    controller_on_small_disk: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    small_disk: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """Disk full while agents report: no traceback, a few `telemetry_store_failed` lines,
    every dropped window counted as `db_error`."""
    controller = controller_on_small_disk
    async with serving_fleet(controller, mosquitto, tmp_path, signing_keys, model_v1, model_v2):
        fill(small_disk)
        await asyncio.sleep(5)  # ~20 windows from two agents at 0.5 s
        assert controller.alive(), controller.log_text()[-3000:]
        tracebacks = controller.log_text().count("Traceback")
        logged = controller.events("telemetry_store_failed")
        dropped = controller.metric("hotswap_device_messages_dropped_total", reason="db_error")
    assert tracebacks == 0, f"{tracebacks} tracebacks in the log"
    assert dropped > 0, controller.metrics_text()
    assert 1 <= len(logged) <= MAX_STORE_FAILED_EVENTS, logged
    assert len(logged) < dropped, (len(logged), dropped)


async def test_work_resumes_by_itself_once_the_full_database_has_space_again(
    controller_on_small_disk: ControllerProcess,
    mosquitto: Mosquitto,
    tmp_path: Path,
    signing_keys: KeyPair,
    small_disk: Path,
    model_v1: bytes,
    model_v2: bytes,
) -> None:
    """A rollout refused on a full disk leaves no rows; once space returns the same controller
    process runs the next rollout to Succeeded and stores telemetry again."""
    controller = controller_on_small_disk
    assert controller.proc is not None
    pid = controller.proc.pid
    async with serving_fleet(
        controller, mosquitto, tmp_path, signing_keys, model_v1, model_v2
    ) as agents:
        filler = fill(small_disk)
        refused = await controller.cli(
            "rollout", "start", "--model", "clf", "--version", "2.0.0", "--devices", IDS
        )
        assert refused.code != 0, refused.out
        rollouts_before = sql(controller, "SELECT count(*) FROM rollouts")[0][0]
        filler.unlink()
        stored_before = telemetry_rows(controller)

        rid = await start_rollout(
            controller, "--model", "clf", "--version", "2.0.0", "--devices", IDS
        )
        status = await final_rollout(controller, rid)
        assert status["status"] == "Succeeded", status
        assert status["devicesUpdated"] == len(DEVICES), status
        assert {a.active.version if a.active else None for a in agents} == {"2.0.0"}
        await eventually(lambda: telemetry_rows(controller) > stored_before, within_s=15)
    assert controller.proc.pid == pid and controller.alive(), controller.log_text()[-3000:]
    assert rollouts_before == 1, "the refused rollout left a row"
    orphans = sql(
        controller,
        "SELECT r.rollout_id FROM rollouts r LEFT JOIN assignments a USING (rollout_id) "
        "WHERE a.rollout_id IS NULL",
    )
    assert orphans == [], orphans
