"""Pushes while the controller is down (item 6): nothing uploaded, or orphans nobody serves.

A real `hotswap controller run` process and moto's S3 HTTP API. A push that
finds no controller uploads nothing; a push whose controller dies between the
upload and the registration says so and leaves objects that no registered
version refers to: the controller will not roll them out, `hotswap model
orphans` lists them and `--delete` removes them.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import boto3
import pytest

from controller.artifacts import ArtifactStore
from controller.operator import push_model
from shared.errors import RequestError
from shared.manifest import SignedManifest
from tests.conftest import S3, KeyPair
from tests.faults.conftest import ControllerProcess, push

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def bucket_snapshot(s3: S3) -> dict[str, bytes]:
    """Every object of the bucket, key -> bytes (read with boto3 itself)."""
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


async def test_a_push_while_the_controller_is_down_fails_clearly_and_uploads_nothing(
    s3: S3, controller: ControllerProcess, model_v1: bytes, model_v2: bytes, tmp_path: Path
) -> None:
    """No controller answers: exit 1, one line saying so and that nothing was uploaded; the
    bucket holds exactly what it held."""
    (v1 := tmp_path / "v1.tflite").write_bytes(model_v1)
    (v2 := tmp_path / "v2.tflite").write_bytes(model_v2)
    await push(controller.cli, v1, "clf", "1.0.0")
    before = bucket_snapshot(s3)
    await controller.terminate()
    controller.cli_env["HOTSWAP_REQUEST_TIMEOUT_S"] = "2"
    r = await controller.cli("model", "push", str(v2), "--name", "clf", "--version", "2.0.0")
    assert bucket_snapshot(s3) == before
    assert r.code == 1, r.err
    assert "no answer from the controller" in r.err and "nothing was uploaded" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


class ControllerDiesAfterUpload(ArtifactStore):
    """The real store; once the upload is done, the controller process is SIGKILLed."""

    def __init__(
        self, s3: S3, controller: ControllerProcess, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(s3.endpoint, s3.bucket)
        self.controller = controller
        self.loop = loop

    def put_model(self, name: str, version: str, data: bytes, signed: SignedManifest) -> str:
        key = super().put_model(name, version, data, signed)
        asyncio.run_coroutine_threadsafe(self.controller.kill(), self.loop).result(30)
        return key


async def test_a_push_interrupted_after_upload_leaves_orphans_never_served_and_deleted_on_demand(
    s3: S3,
    signing_keys: KeyPair,
    controller: ControllerProcess,
    model_v1: bytes,
    model_v2: bytes,
    tmp_path: Path,
) -> None:
    """The controller dies between upload and registration: the push names the uploaded key;
    2.0.0 is unknown to the restarted controller; `model orphans` lists its two objects (not
    within --older-than's grace), `--delete` removes them and leaves 1.0.0's."""
    (v1 := tmp_path / "v1.tflite").write_bytes(model_v1)
    await push(controller.cli, v1, "clf", "1.0.0")
    registered = bucket_snapshot(s3)
    v2_sha = hashlib.sha256(model_v2).hexdigest()
    orphans = [f"models/clf/2.0.0/{v2_sha}.manifest.json", f"models/clf/2.0.0/{v2_sha}.tflite"]

    with pytest.raises(RequestError, match="was uploaded but not registered") as info:
        await push_model(
            model_v2,
            name="clf",
            version="2.0.0",
            signing_key=signing_keys.private_path,
            endpoint=controller.mosquitto.endpoint("operator"),
            artifacts=ControllerDiesAfterUpload(s3, controller, asyncio.get_running_loop()),
            request_timeout_s=1.0,
        )
    assert info.value.reason == "controller_unavailable"
    assert orphans[1] in str(info.value)
    assert sorted(bucket_snapshot(s3)) == sorted([*registered, *orphans])

    # The unanswered RegisterModel waits in the controller's session until it expires (2 s).
    await asyncio.sleep(3.0)
    await controller.start()
    await controller.wait_connected(times=2)
    r = await controller.cli("rollout", "start", "--model", "clf", "--version", "2.0.0", "--all")
    assert r.code == 2 and "unknown model clf@2.0.0" in r.err, r.err

    fresh = await controller.cli("model", "orphans", "--json")
    assert fresh.code == 0, fresh.err
    assert fresh.json() == []  # younger than the default --older-than: may be a push in flight
    listed = await controller.cli("model", "orphans", "--older-than", "0", "--json")
    assert listed.code == 0, listed.err
    assert [(o["key"], o["deleted"]) for o in listed.json()] == [(k, False) for k in orphans]
    assert sorted(bucket_snapshot(s3)) == sorted([*registered, *orphans])

    deleted = await controller.cli("model", "orphans", "--older-than", "0", "--delete")
    assert deleted.code == 0, deleted.err
    assert all(f"deleted {k}" in deleted.out for k in orphans), deleted.out
    assert bucket_snapshot(s3) == registered
    after = await controller.cli("model", "orphans", "--older-than", "0", "--json")
    assert after.json() == []
