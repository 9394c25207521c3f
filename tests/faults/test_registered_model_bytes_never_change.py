"""A refused `model push` leaves S3 as it was; the registered version keeps deploying (item 6).

A real `hotswap controller run` process, moto's S3 HTTP API, a real edge agent
and the operator's real CLI: pushing other bytes under a registered version is
refused before anything is uploaded, every object of the bucket is byte for
byte what it was, and the version still reaches a device with its own sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from broker.launcher import Mosquitto
from tests.conftest import S3, KeyPair
from tests.faults.conftest import (
    ControllerProcess,
    devices_online,
    final_rollout,
    make_agents,
    push,
    start_rollout,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def bucket_snapshot(s3: S3) -> dict[str, bytes]:
    """Every object of the bucket, key -> bytes (read with boto3 itself)."""
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


async def test_a_refused_push_leaves_the_bucket_byte_identical_and_the_version_still_deploys(
    mosquitto: Mosquitto,
    s3: S3,
    signing_keys: KeyPair,
    controller: ControllerProcess,
    model_v1: bytes,
    model_v2: bytes,
    tmp_path: Path,
) -> None:
    """Other bytes as clf@1.0.0: exit 2 naming the registered sha256, S3 unchanged; the same
    bytes again: exit 0, S3 unchanged; a rollout of 1.0.0 activates v1's sha256 on a device."""
    v1_sha = hashlib.sha256(model_v1).hexdigest()
    (first := tmp_path / "v1.tflite").write_bytes(model_v1)
    (other := tmp_path / "other.tflite").write_bytes(model_v2)
    async with make_agents(mosquitto, tmp_path, signing_keys, [("cam-1", "eu-west", "camera")]) as (
        agent,
    ):
        await devices_online(controller, 1)
        await push(controller.cli, first, "clf", "1.0.0")
        before = bucket_snapshot(s3)
        assert model_v1 in before.values()

        r = await controller.cli("model", "push", str(other), "--name", "clf", "--version", "1.0.0")
        assert r.code == 2, r.err
        assert f"already registered with another sha256 ({v1_sha[:12]}" in r.err
        assert len(r.err.strip().splitlines()) == 1
        assert bucket_snapshot(s3) == before

        again = await push(controller.cli, first, "clf", "1.0.0")
        assert again.json()["sha256"] == v1_sha
        assert bucket_snapshot(s3) == before
        (row,) = (await controller.cli("model", "list", "--json")).json()
        assert (row["version"], row["sha256"]) == ("1.0.0", v1_sha)

        rid = await start_rollout(
            controller, "--model", "clf", "--version", "1.0.0", "--devices", "cam-1"
        )
        status = await final_rollout(controller, rid)
        assert status["status"] == "Succeeded", status
        assert agent.active is not None and agent.active.sha256 == v1_sha
