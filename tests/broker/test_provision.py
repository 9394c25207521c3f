"""`hotswap device provision|revoke` against a real broker: files, refusals, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto, free_port
from shared import topics
from shared.credentials import endpoint_for, load_credentials
from shared.keys import init_keys, load_public_key
from shared.mqtt import make_client
from shared.settings import parse_mqtt_url
from tests.conftest import KeyPair, device_endpoint


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def provision_args(
    broker: Mosquitto, out: Path, *extra: str, device_id: str = "cam-9"
) -> list[str]:
    return [
        "device", "provision", "--device-id", device_id, "--region", "eu-west",
        "--device-type", "camera", "--out", str(out), "--mqtt-url", broker.url,
        "--credentials", str(broker.credentials("admin")), *extra,
    ]  # fmt: skip


async def connects(broker: Mosquitto, directory: Path, client_id: str) -> bool:
    try:
        async with make_client(
            endpoint_for(parse_mqtt_url(broker.url), directory), identifier=client_id
        ):
            return True
    except aiomqtt.MqttCodeError:
        return False


def test_provision_writes_a_device_directory_the_broker_accepts_at_once(
    mosquitto: Mosquitto, signing_keys: KeyPair, tmp_path: Path
) -> None:
    """The directory holds identity, login (0600, client id bound), trusted key and controller key."""
    out = tmp_path / "cam-9"
    code, stdout, stderr = invoke(
        *provision_args(mosquitto, out, "--trusted-key", str(signing_keys.public_path), "--json")
    )
    assert code == 0, stderr
    shown = json.loads(stdout)
    assert (shown["deviceId"], shown["credentials"], shown["outcome"]) == (
        "cam-9",
        str(out),
        "created",
    )
    creds = load_credentials(out)
    assert creds.device is not None and creds.device.region == "eu-west"
    assert (creds.login.username, creds.login.client_id) == ("cam-9", "cam-9")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "mqtt.json").stat().st_mode) == 0o600
    assert [load_public_key(k) for k in creds.trusted_keys] == [
        load_public_key(signing_keys.public_path)
    ]
    assert creds.controller_key is not None
    assert (
        creds.controller_key.read_bytes()
        == (mosquitto.credentials("controller") / "command.pub").read_bytes()
    )
    assert asyncio.run(connects(mosquitto, out, "cam-9"))
    assert not asyncio.run(connects(mosquitto, out, "cam-other"))  # bound to its own id


def test_an_existing_device_is_refused_unless_forced_which_replaces_its_password(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Again: exit 2 and one line; --force: a new password, the old one no longer logs in."""
    first = tmp_path / "first"
    assert invoke(*provision_args(mosquitto, first))[0] == 0
    code, _, stderr = invoke(*provision_args(mosquitto, tmp_path / "second"))
    assert code == 2 and "cam-9 is already provisioned" in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = invoke(*provision_args(mosquitto, first))
    assert code == 2 and "already holds credentials" in stderr  # nothing is overwritten silently
    old = tmp_path / "old"
    shutil.copytree(first, old)
    code, stdout, stderr = invoke(*provision_args(mosquitto, first, "--force", "--json"))
    assert code == 0, stderr
    assert json.loads(stdout)["outcome"] == "replaced"
    assert asyncio.run(connects(mosquitto, first, "cam-9"))
    assert not asyncio.run(connects(mosquitto, old, "cam-9"))


def test_broker_identities_cannot_be_provisioned_or_revoked_as_devices(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A device may not take the controller's name; revoke refuses a non-device identity."""
    code, _, stderr = invoke(
        *provision_args(mosquitto, tmp_path / "x", device_id="hotswap-controller")
    )
    assert code == 2 and "reserved" in stderr
    admin = str(mosquitto.credentials("admin"))
    code, _, stderr = invoke(
        "device", "revoke", "hotswap-operator", "--credentials", admin, "--mqtt-url", mosquitto.url
    )
    assert code == 2 and "not a device" in stderr
    assert asyncio.run(connects(mosquitto, mosquitto.credentials("operator"), "op-still-works"))


def test_revoke_cuts_the_device_off_and_an_unknown_device_is_an_error(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """revoke --json: the device no longer logs in; revoking it again: exit 2, 'unknown device'."""
    out = tmp_path / "cam-9"
    assert invoke(*provision_args(mosquitto, out))[0] == 0
    admin = str(mosquitto.credentials("admin"))
    code, stdout, stderr = invoke(
        "device", "revoke", "cam-9", "--credentials", admin, "--mqtt-url", mosquitto.url, "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout) == {"deviceId": "cam-9", "revoked": True}
    assert not asyncio.run(connects(mosquitto, out, "cam-9"))
    code, _, stderr = invoke(
        "device", "revoke", "cam-9", "--credentials", admin, "--mqtt-url", mosquitto.url
    )
    assert code == 2 and stderr.strip() == "error: unknown device 'cam-9'"


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unreachable", 1, "cannot reach the MQTT broker"),
        ("wrong-password", 2, "refused 'hotswap-admin' (not authorized)"),
        ("not-admin", 2, "does not let 'hotswap-operator' subscribe to $CONTROL"),
        ("no-directory", 2, "does not exist"),
    ],
)
def test_broker_and_credential_problems_are_one_line_errors(
    mosquitto: Mosquitto, tmp_path: Path, case: str, code: int, message: str
) -> None:
    """Unreachable broker: exit 1; refused or missing admin credentials: exit 2; one line each."""
    url, admin = mosquitto.url, mosquitto.credentials("admin")
    if case == "unreachable":
        url = f"mqtt://127.0.0.1:{free_port()}"
    elif case == "wrong-password":
        admin = tmp_path / "bad-admin"
        shutil.copytree(mosquitto.credentials("admin"), admin)
        login = json.loads((admin / "mqtt.json").read_text())
        (admin / "mqtt.json").write_text(json.dumps(login | {"password": "guess"}))
    elif case == "not-admin":
        admin = tmp_path / "operator-as-admin"
        shutil.copytree(mosquitto.credentials("operator"), admin)
        shutil.copy(mosquitto.credentials("admin") / "command.pub", admin / "command.pub")
    elif case == "no-directory":
        admin = tmp_path / "nowhere"
    args = provision_args(mosquitto, tmp_path / "out")
    args[args.index("--mqtt-url") + 1] = url
    args[args.index("--credentials") + 1] = str(admin)
    got, _, stderr = invoke(*args)
    assert got == code, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def agent_run(*args: str) -> tuple[int, str]:
    """`hotswap agent run` as a process (it configures process-wide logging)."""
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "agent", "run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")},
    )
    return done.returncode, done.stderr


def test_agent_run_takes_its_identity_from_credentials_and_flags_win(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Without --credentials the identity flags are required; a --device-id other than the
    one the credentials are bound to is refused before connecting."""
    data = ("--data-dir", str(tmp_path / "d"))
    code, stderr = agent_run("--region", "eu-west", *data)
    assert code == 2 and "give --device-id, --device-type" in stderr
    out = tmp_path / "cam-9"
    assert invoke(*provision_args(mosquitto, out))[0] == 0  # no trusted key given
    code, stderr = agent_run("--credentials", str(out), *data)
    assert code == 2 and "give at least one --trusted-key" in stderr
    other_keys = init_keys(tmp_path / "k")[1]
    code, stderr = agent_run(
        "--credentials", str(out), "--device-id", "cam-10", "--trusted-key", str(other_keys), *data
    )
    assert code == 2 and "are for cam-9" in stderr


async def test_provisioned_device_may_use_only_its_own_topics(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Its own state/cmd: allowed; another device's cmd or a wildcard: refused at subscribe."""
    endpoint = device_endpoint(mosquitto, "cam-9", "eu-west", "camera")
    async with make_client(endpoint, identifier="cam-9") as c:
        ok = await c.subscribe(topics.device_cmd("cam-9"), qos=1)
        region = await c.subscribe(topics.region_cmd("eu-west"), qos=1)
        other_region = await c.subscribe(topics.region_cmd("us-east"), qos=1)
        other = await c.subscribe(topics.device_cmd("cam-1"), qos=1)
        wildcard = await c.subscribe(topics.ALL_DEVICE_CMDS, qos=1)
    assert [getattr(r[0], "value", r[0]) for r in (ok, region)] == [1, 1]
    assert [getattr(r[0], "value", r[0]) for r in (other_region, other, wildcard)] == [0x87] * 3


def test_keep_existing_makes_provisioning_safe_to_rerun(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """--keep-existing (compose runs it on every start): a provisioned device with its
    directory is left as it is (exit 0, same password); a directory of another device is not."""
    out = tmp_path / "cam-9"
    assert invoke(*provision_args(mosquitto, out, "--keep-existing"))[0] == 0
    login = (out / "mqtt.json").read_bytes()
    code, stdout, stderr = invoke(*provision_args(mosquitto, out, "--keep-existing", "--json"))
    assert code == 0, stderr
    assert json.loads(stdout)["outcome"] == "kept"
    assert (out / "mqtt.json").read_bytes() == login
    assert asyncio.run(connects(mosquitto, out, "cam-9"))
    code, _, stderr = invoke(*provision_args(mosquitto, out, "--keep-existing", device_id="cam-10"))
    assert code == 2 and "credentials of another identity" in stderr
