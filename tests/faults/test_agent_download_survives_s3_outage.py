"""S3 outages during a deploy (issue 10, item 9), against a real agent, broker and S3 API.

A real edge agent on the secure mosquitto of tests/conftest.py downloads from
moto's S3 HTTP API, served by an `S3Server` of this module's own that is
stopped (its port refuses connections) and started again on the same port.
Before the retry budget, the agent spent its 4 attempts within 2.5 s and a
3-second outage failed the rollout with `download_failed`.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import structlog

from broker.launcher import Mosquitto
from broker.s3server import S3Server
from edge_agent.agent import Agent
from edge_agent.fetch import FetchLimits
from shared.messages import FINAL_PHASES, utcnow
from tests.conftest import S3, KeyPair
from tests.edge_agent.test_agent import agent_config, deploy, running, watching

# A little over the 3 s, so that the old fixed schedule (four attempts, at most
# 0.5 + 1 + 2 s of backoff between them) can never outlast it: on the old code this test
# fails every time, not most of the time.
OUTAGE_S = 4.0


@dataclass
class StoppableS3:
    server: S3Server  # stop() refuses connections on its port; start() serves there again
    s3: S3


@pytest.fixture
def stoppable_s3() -> Iterator[StoppableS3]:
    """A bucket on an S3 server of its own, for the test to stop and restart.

    (moto keeps its buckets in the process, so they survive a restart.)"""
    with S3Server() as server:
        bucket = f"hotswap-outage-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
        yield StoppableS3(server, S3(server.endpoint, bucket))


@pytest.mark.timeout(120)
async def test_a_deploy_waits_out_a_few_seconds_of_s3_outage_and_activates_the_model(
    mosquitto: Mosquitto,
    stoppable_s3: StoppableS3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
) -> None:
    """S3 down as the download starts and for 4 s more: the agent keeps retrying, then
    activates the model with the signed sha256."""
    sha = hashlib.sha256(model_v1).hexdigest()
    with structlog.testing.capture_logs() as logs:
        agent = Agent(agent_config(tmp_path, signing_keys, mosquitto))
        async with watching(agent, mosquitto, stoppable_s3.s3, signing_keys) as h, running(agent):
            signed, url = h.upload(model_v1, "1.0.0")
            cmd = deploy(signed, url, expires_at=utcnow() + timedelta(minutes=2))
            await asyncio.to_thread(stoppable_s3.server.stop)
            await h.send(cmd)
            async with asyncio.timeout(15):
                while "downloading" not in h.phases(cmd.command_id):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(OUTAGE_S)
            gave_up = [
                e for e in h.events if e.command_id == cmd.command_id and e.phase in FINAL_PHASES
            ]
            assert gave_up == [], f"the agent gave up during the outage: {gave_up}"
            await asyncio.to_thread(stoppable_s3.server.start)  # same port
            final = await h.final_event(cmd.command_id, within_s=60)
        assert final.phase == "activated", final
        assert final.model is not None and final.model.sha256 == sha
        assert agent.active is not None and agent.active.sha256 == sha
        assert hashlib.sha256(agent.store.model_path(sha).read_bytes()).hexdigest() == sha
    retries = [e for e in logs if e["event"] == "download_retry"]
    assert len(retries) >= 2, "the outage was never hit"
    assert {(e["device_id"], e["command_id"]) for e in retries} == {("cam-1", cmd.command_id)}


@pytest.mark.timeout(60)
async def test_download_retries_stop_when_the_deploy_command_expires(
    mosquitto: Mosquitto,
    stoppable_s3: StoppableS3,
    signing_keys: KeyPair,
    tmp_path: Path,
    model_v1: bytes,
) -> None:
    """S3 stays down: a 5-minute budget is cut to the command's 3 s left, and the deploy
    fails with `download_failed` long before the budget would have run out."""
    limits = FetchLimits(budget_s=300)
    with structlog.testing.capture_logs() as logs:
        agent = Agent(agent_config(tmp_path, signing_keys, mosquitto, fetch_limits=limits))
        async with watching(agent, mosquitto, stoppable_s3.s3, signing_keys) as h, running(agent):
            signed, url = h.upload(model_v1, "1.0.0")
            await asyncio.to_thread(stoppable_s3.server.stop)
            cmd = deploy(signed, url, expires_at=utcnow() + timedelta(seconds=3))
            await h.send(cmd)
            final = await h.final_event(cmd.command_id, within_s=30)  # not 300
    assert (final.phase, final.reason) == ("failed", "download_failed"), final
    assert final.detail is not None and "budget is spent" in final.detail
    retries = [e for e in logs if e["event"] == "download_retry"]
    assert retries, "the agent never retried"
    assert max(e["budget_left_s"] for e in retries) <= 3.0
    assert agent.active is None
