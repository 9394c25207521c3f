"""`model push --task / --interface-change` and `rollout start --allow-interface-change`.

The flags parse into the manifest's ModelTask (bad values are one `error:` line
and exit 2, before any file or broker is touched), a task must name one of the
model's outputs, and a real push signs both into the manifest it uploads, with
the signature read from the file itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto
from controller.artifacts import ArtifactStore, manifest_key_of
from controller.cli import parse_task
from controller.operator import OperatorClient, check_task, push_model
from controller.service import Controller
from shared.errors import ModelFormatError, RequestError
from shared.keys import load_public_key
from shared.manifest import ModelTask, SignedManifest, trusted_keyring, verify_signed_manifest
from shared.messages import ListModels
from shared.settings import parse_mqtt_url
from shared.tflite_schema import read_signature
from tests.conftest import S3, KeyPair, controller_config, running_task
from tests.controller.test_rollout_start_cli import sent_request

UNREACHABLE = ("--mqtt-url", "mqtt://127.0.0.1:1")  # a command that connects fails with exit 1


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("none", ModelTask(kind="none")),
        ("classifier:scores", ModelTask(kind="classifier", output="scores")),
        (
            "classifier:StatefulPartitionedCall:0",
            ModelTask(kind="classifier", output="StatefulPartitionedCall:0"),
        ),
        (
            "detector:classificators:0.5",
            ModelTask(kind="detector", output="classificators", score_threshold=0.5),
        ),
        (
            "detector:PartitionedCall:1:0.25",
            ModelTask(kind="detector", output="PartitionedCall:1", score_threshold=0.25),
        ),
        (" detector:scores:1 ", ModelTask(kind="detector", output="scores", score_threshold=1.0)),
        ("detector:scores:0", ModelTask(kind="detector", output="scores", score_threshold=0.0)),
    ],
)
def test_task_forms_parse_into_the_manifest_task(text: str, task: ModelTask) -> None:
    """Output names keep their colons: a classifier's runs to the end, a detector's to the last."""
    assert parse_task(text) == task


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "use classifier:OUTPUT, detector:OUTPUT:THRESHOLD or none"),
        ("bogus", "use classifier:OUTPUT"),
        ("Classifier:scores", "use classifier:OUTPUT"),
        ("classifier", "use classifier:OUTPUT"),
        ("classifier:", "use classifier:OUTPUT"),
        ("detector:scores", "use classifier:OUTPUT"),
        ("detector::0.5", "use classifier:OUTPUT"),
        ("detector:scores:", "use classifier:OUTPUT"),
        ("detector:scores:high", "threshold 'high' is not a number from 0 to 1"),
        ("detector:scores:1.5", "threshold '1.5' is not a number from 0 to 1"),
        ("detector:scores:-0.1", "is not a number from 0 to 1"),
        ("detector:scores:nan", "is not a number from 0 to 1"),
        ("none:scores", "none names no output"),
    ],
)
def test_bad_task_values_are_refused_with_the_forms(text: str, message: str) -> None:
    """Anything else is a ValueError that names the value and what would have been right."""
    with pytest.raises(ValueError, match="invalid --task") as info:
        parse_task(text)
    assert message in str(info.value)


def push(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        [
            "model",
            "push",
            *args,
            "--name",
            "m",
            "--version",
            "1",
            "--signing-key",
            "k",
            *UNREACHABLE,
        ],
    )
    return result.exit_code, result.stderr


def test_a_bad_task_is_one_error_line_before_the_file_is_read(tmp_path: Path) -> None:
    """Exit 2 and one `error:` line, although the file does not exist either."""
    code, stderr = push(str(tmp_path / "missing.tflite"), "--task", "detector:scores:2")
    assert code == 2
    assert stderr == (
        "error: invalid --task 'detector:scores:2': the score threshold '2' is not a number "
        "from 0 to 1\n"
    )


def test_a_task_naming_no_output_is_refused_before_connecting(
    tmp_path: Path, face_detector: bytes
) -> None:
    """The detector has `regressors` and `classificators`: `scores` is exit 2 listing them,
    not exit 1 for the unreachable broker."""
    model = tmp_path / "faces.tflite"
    model.write_bytes(face_detector)
    code, stderr = push(str(model), "--task", "detector:scores:0.5")
    assert code == 2
    assert stderr == (
        "error: --task: the detector task names output 'scores'; "
        "the model has 'regressors', 'classificators'\n"
    )


def test_check_task_accepts_outputs_of_the_model_and_none(wakeword_int8: bytes) -> None:
    """A colon-named output of a real model is found; `none` names nothing to check."""
    signature = read_signature(wakeword_int8)
    check_task(parse_task("classifier:StatefulPartitionedCall:0"), signature)
    check_task(ModelTask(kind="none"), signature)
    with pytest.raises(RequestError) as info:
        check_task(parse_task("classifier:StatefulPartitionedCall"), signature)
    assert info.value.reason == "bad_request"


async def test_push_refuses_what_is_not_a_model_before_connecting(
    tmp_path: Path, signing_keys: KeyPair
) -> None:
    """Garbage with the TFL3 identifier is ModelFormatError (exit 2), not a broker error."""
    with pytest.raises(ModelFormatError):
        await push_model(
            b"\x08\x00\x00\x00TFL3" + b"\xff" * 64, name="m", version="1",
            signing_key=signing_keys.private_path, endpoint=parse_mqtt_url("mqtt://127.0.0.1:1"),
            artifacts=ArtifactStore("http://127.0.0.1:1", "nothing"),
        )  # fmt: skip


async def test_push_signs_the_task_and_interface_change_into_the_uploaded_manifest(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path, face_detector: bytes
) -> None:
    """`hotswap model push` (a real process) of a real detector, against a real controller and
    S3: the manifest it signs carries the file's own signature, the task and the flag; without
    the flags it carries neither (task left to the agent)."""
    model = tmp_path / "faces.tflite"
    model.write_bytes(face_detector)
    env = os.environ | {
        "HOTSWAP_MQTT_URL": mosquitto.url,
        "HOTSWAP_CREDENTIALS": str(mosquitto.credentials("operator")),
        "HOTSWAP_S3_ENDPOINT": s3.endpoint,
        "HOTSWAP_S3_BUCKET": s3.bucket,
        "HOTSWAP_SIGNING_KEY": str(signing_keys.private_path),
    }
    controller = Controller(controller_config(mosquitto, s3, tmp_path))
    async with running_task(controller.run(), controller.connected):
        for version, flags in (
            ("1.0.0", ("--task", "detector:classificators:0.5", "--interface-change")),
            ("1.0.1", ()),
        ):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker.cli", "model", "push", str(model),
                "--name", "faces", "--version", version, *flags,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
        async with OperatorClient(mosquitto.endpoint("operator")) as op:
            rows = {r["version"]: r for r in await op.request(ListModels())}
    trusted = trusted_keyring([load_public_key(signing_keys.public_path)])
    s3_client = boto3.client("s3", endpoint_url=s3.endpoint)
    manifests = {}
    for version, row in rows.items():
        body = s3_client.get_object(Bucket=s3.bucket, Key=manifest_key_of(row["s3Key"]))["Body"]
        manifests[version] = verify_signed_manifest(
            SignedManifest.model_validate_json(body.read()), trusted
        )
    flagged, plain = manifests["1.0.0"], manifests["1.0.1"]
    assert flagged.task == ModelTask(kind="detector", output="classificators", score_threshold=0.5)
    assert flagged.interface_change is True
    assert flagged.signature == plain.signature == read_signature(face_detector)
    assert (plain.task, plain.interface_change) == (None, False)


async def test_allow_interface_change_is_sent_to_the_controller(mosquitto: Mosquitto) -> None:
    """`rollout start --allow-interface-change` sets it on the request; without it, unset."""
    allowed = await sent_request(mosquitto, "--all", "--allow-interface-change")
    assert allowed.allow_interface_change is True
    plain = await sent_request(mosquitto, "--all")
    assert plain.allow_interface_change is False
