"""The broker over TLS: `broker init-tls`, `broker run` with TLS listeners, certificate identity.

A real mosquitto with the project's TLS listeners (broker.tls makes the
certificates): clients verify the server against the CA in their credentials
directory; on the client-certificate listener a device's certificate alone is
its identity (CN = username = client id) and its dynamic-security role applies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto, free_port, wait_for_port
from broker.tls import add_client_cert, init_tls
from controller.operator import OperatorClient
from controller.service import Controller
from shared import topics
from shared.credentials import apply_credentials, endpoint_for, load_credentials
from shared.messages import Ping
from shared.mqtt import make_client
from shared.settings import parse_mqtt_url
from tests.conftest import S3, controller_config, running_task

NOT_AUTHORIZED = 0x87
# paho 2.2 leaves the socket of a failed TLS handshake for the garbage collector
# (Client._ssl_wrap_socket does not close it); the refused handshake is the point here.
PAHO_SSL_LEAK = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


def granted(codes: object) -> int:
    (code,) = codes  # type: ignore[misc]
    return int(getattr(code, "value", code))


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A secure broker with its TLS listeners, certificates from `hotswap broker init-tls`."""
    result = CliRunner().invoke(
        app, ["broker", "init-tls", "--dir", str(tmp_path / "tls"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    with Mosquitto(tmp_path / "broker", tls_dir=tmp_path / "tls") as broker:
        yield broker


def test_init_tls_writes_the_files_the_broker_needs_and_is_safe_to_rerun(tmp_path: Path) -> None:
    """CA, server certificate and key, client certificates; a second run keeps them."""
    args = ["broker", "init-tls", "--dir", str(tmp_path), "--client", "cam-1", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.stderr
    files = json.loads(first.stdout)
    assert set(files["clients"]) == {"cam-1"}
    ca = (tmp_path / "ca.crt").read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert Path(files["serverCert"]).is_file() and Path(files["serverKey"]).is_file()


@PAHO_SSL_LEAK
async def test_identities_log_in_over_tls_with_the_ca_from_their_credentials(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    """The controller's credentials dir got the CA: mqtts:// just works; a client that
    trusts another CA refuses the broker's certificate."""
    endpoint = tls_broker.endpoint("controller", tls=True)
    assert endpoint.tls and endpoint.ca_file == tls_broker.credentials("controller") / "ca.crt"
    async with make_client(endpoint, identifier="t-ctl") as client:
        assert granted(await client.subscribe(topics.ALL_DEVICE_EVENTS, qos=1)) == 1
    init_tls(tmp_path / "other-ca")
    stranger = replace(endpoint, ca_file=tmp_path / "other-ca" / "ca.crt")
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        async with make_client(stranger, identifier="t-stranger", timeout=5):
            pass


@PAHO_SSL_LEAK
async def test_device_certificate_is_its_identity_on_the_certificate_listener(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    """Provisioned with --tls-dir, a device connects with its certificate and no password,
    under its own id whatever id it asks for, with its own ACLs; without a certificate
    the TLS handshake is refused."""
    out = tmp_path / "cam-1"
    assert tls_broker.tls_dir is not None
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        [
            "device",
            "provision",
            "--device-id",
            "cam-1",
            "--region",
            "eu-west",
            "--device-type",
            "camera",
            "--out",
            str(out),
            "--tls-dir",
            str(tls_broker.tls_dir),
            "--mqtt-url",
            tls_broker.tls_url,
            "--credentials",
            str(tls_broker.credentials("admin")),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    creds = load_credentials(out)
    assert creds.cert_file is not None and creds.ca_file is not None
    by_cert = replace(
        apply_credentials(parse_mqtt_url(tls_broker.tls_cert_url), creds),
        username=None,
        password=None,
    )
    async with make_client(by_cert, identifier="cam-2") as device:  # asks for another id
        assert granted(await device.subscribe(topics.device_cmd("cam-1"), qos=1)) == 1
        assert granted(await device.subscribe(topics.device_cmd("cam-2"), qos=1)) == NOT_AUTHORIZED
    assert "as cam-1 (p5" in tls_broker.log_path.read_text()
    assert "as cam-2 (p5" not in tls_broker.log_path.read_text()
    no_cert = replace(by_cert, cert_file=None, key_file=None)
    with pytest.raises(aiomqtt.MqttError):
        async with make_client(no_cert, identifier="cam-1", timeout=3):
            pass


async def test_revoked_certificate_device_is_kicked_and_left_without_rights(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    """Revoking a certificate-identified device disconnects it at once; its certificate still
    completes the TLS handshake (until it expires or a CRL lists it) but every subscribe and
    publish is denied, since its role is gone."""
    from broker.provision import provision_device, revoke_device
    from shared.credentials import DeviceIdentity

    assert tls_broker.tls_dir is not None
    done = await provision_device(
        tls_broker.endpoint("admin"),
        tls_broker.credentials("admin"),
        DeviceIdentity("cam-1", "eu-west", "camera"),
        tmp_path / "cam-1",
        tls_dir=tls_broker.tls_dir,
    )
    by_cert = apply_credentials(parse_mqtt_url(tls_broker.tls_cert_url), done.credentials)
    async with make_client(by_cert, identifier="cam-1") as device:
        await device.subscribe(topics.device_cmd("cam-1"), qos=1)
        await revoke_device(tls_broker.endpoint("admin"), "cam-1")
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(2):
                await anext(aiter(device.messages))
    async with make_client(by_cert, identifier="cam-1") as device:
        assert granted(await device.subscribe(topics.device_cmd("cam-1"), qos=1)) == NOT_AUTHORIZED


def test_broker_run_finds_its_tls_dir_and_writes_identities_on_first_start(tmp_path: Path) -> None:
    """`hotswap broker run --data-dir D` with D/tls: plain, TLS and certificate listeners,
    and D/credentials for admin, controller and operator (with the CA) on its first start."""
    data = tmp_path / "broker"
    init_tls(data / "tls")
    ports = [free_port(), free_port(), free_port()]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "broker",
            "run",
            "--data-dir",
            str(data),
            "--port",
            str(ports[0]),
            "--tls-port",
            str(ports[1]),
            "--tls-cert-port",
            str(ports[2]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        assert all(wait_for_port("127.0.0.1", p, 15) for p in ports)
        operator = data / "credentials" / "operator"
        assert (operator / "ca.crt").read_bytes() == (data / "tls" / "ca.crt").read_bytes()

        async def log_in() -> None:
            endpoint = endpoint_for(parse_mqtt_url(f"mqtts://127.0.0.1:{ports[1]}"), operator)
            async with make_client(endpoint, identifier="t-op") as client:
                assert granted(await client.subscribe(topics.ALL_ROLLOUT_STATUS, qos=1)) == 1

        asyncio.run(log_in())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert b"credentials for the controller, operators and the admin" in err


async def test_a_controller_with_a_client_certificate_serves_on_one_session(
    tls_broker: Mosquitto, s3: S3, tmp_path: Path
) -> None:
    """On the certificate listener the CN is the client id of every session, so the
    controller's telemetry and request sessions would take each other and the main one
    over: with a certificate it runs one session. It stays connected, answers requests
    and takes telemetry."""
    assert tls_broker.tls_dir is not None
    issued = add_client_cert(tls_broker.tls_dir, "hotswap-controller")
    by_cert = replace(
        endpoint_for(parse_mqtt_url(tls_broker.tls_cert_url), tls_broker.credentials("controller")),
        username=None,
        password=None,
        cert_file=issued.cert,
        key_file=issued.key,
    )
    controller = Controller(controller_config(tls_broker, s3, tmp_path, mqtt=by_cert))
    operator = OperatorClient(tls_broker.endpoint("operator", tls=True))
    async with running_task(controller.run(), controller.connected), operator as op:
        for _ in range(5):
            assert (await op.request(Ping()))["clientId"] == "hotswap-controller"
            await asyncio.sleep(0.3)
    log = tls_broker.log_path.read_text()
    assert "hotswap-controller already connected" not in log
    # The start-up probe (its asked-for id replaced by the CN too), then one session.
    assert log.count("as hotswap-controller (p5, c0") == 1, log[-3000:]
    assert "as hotswap-controller (p4" not in log
