"""broker.tls: the files it writes, and a real mosquitto 2.0.11 that accepts them.

The broker here is started from the listener lines below (with the dynamic-security
plugin, as the product runs it), not from the project's mosquitto.conf, so that
these tests pin what mosquitto itself does with the certificates:

    listener PORT_A 127.0.0.1          # server auth only: clients check the CA,
    cafile .../ca.crt                  # then log in with a dynsec username/password
    certfile .../server.crt
    keyfile .../server.key

    listener PORT_B 127.0.0.1          # the client certificate is the identity
    cafile .../ca.crt
    certfile .../server.crt
    keyfile .../server.key
    require_certificate true
    use_identity_as_username true      # username := CN, the password is never checked
    use_username_as_clientid true      # client id := CN, whatever the client sent
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import json
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.launcher import find_mosquitto, free_port, wait_for_port
from broker.tls import (
    ClientFiles,
    TlsError,
    TlsFiles,
    add_client_cert,
    build_client_cert,
    common_name,
    init_tls,
    load_tls_files,
    new_key,
    server_hosts,
)
from shared.errors import HotswapError

DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
CONTROL = "$CONTROL/dynamic-security/v1"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
# An MQTT 3.1.1 CONNECT with client id "x": whatever the broker answers, it is a CONNACK.
CONNECT = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 1]) + b"x"
CONNACK = 0x20
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"
NOT_AUTHORIZED = 0x87
# paho 2.2 leaves the socket of a failed TLS handshake to the garbage collector;
# the refused handshake is what these tests are about.
PAHO_SSL_LEAK = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def eku(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*.*")}


# --- the files ------------------------------------------------------------------------------


def test_init_tls_writes_a_ca_a_server_cert_for_the_hosts_and_client_certs(tmp_path: Path) -> None:
    """CA (path length 0), serverAuth cert with DNS and IP SANs, clientAuth certs with CN = name,
    all issued by the CA; private keys are 0600."""
    files = init_tls(tmp_path, hosts=("broker.example", "10.0.0.7"), clients=("cam-1", "ctl"))
    ca = cert(files.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    server = cert(files.server_cert)
    server.verify_directly_issued_by(ca)
    assert server_hosts(server) == ["broker.example", "10.0.0.7"]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert [c.name for c in files.clients] == ["cam-1", "ctl"]
    for client in files.clients:
        issued = cert(client.cert)
        issued.verify_directly_issued_by(ca)
        assert common_name(issued) == client.name
        assert eku(issued) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert client.cert == tmp_path / "clients" / f"{client.name}.crt"
    for key in (files.ca_key, files.server_key, *(c.key for c in files.clients)):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        load_pem_private_key(key.read_bytes(), password=None)


def test_rerun_keeps_everything_and_later_clients_are_signed_by_the_same_ca(
    tmp_path: Path,
) -> None:
    """A second init_tls changes no byte; add_client_cert signs with the existing CA and keeps
    a certificate that still fits unless forced to issue a new key."""
    files = init_tls(tmp_path, clients=("cam-1",))
    before = snapshot(tmp_path)
    assert init_tls(tmp_path, clients=("cam-1",)) == files
    assert snapshot(tmp_path) == before
    added = add_client_cert(tmp_path, "cam-2")
    cert(added.cert).verify_directly_issued_by(cert(files.ca_cert))
    assert load_tls_files(tmp_path).client("cam-2") == added
    assert snapshot(tmp_path)["ca.crt"] == before["ca.crt"]
    kept = added.key.read_bytes()
    add_client_cert(tmp_path, "cam-2")
    assert added.key.read_bytes() == kept
    add_client_cert(tmp_path, "cam-2", force=True)
    assert added.key.read_bytes() != kept


def test_a_certificate_that_no_longer_fits_is_replaced_only_with_force(tmp_path: Path) -> None:
    """Other hosts: refused with a one-line message naming server.crt; force replaces the server
    certificate and keeps the CA and the client certificates that still fit."""
    init_tls(tmp_path, clients=("cam-1",))
    before = snapshot(tmp_path)
    with pytest.raises(TlsError, match=r"server\.crt is for localhost, 127\.0\.0\.1, not") as err:
        init_tls(tmp_path, hosts=("broker.example",), clients=("cam-1",))
    assert "\n" not in str(err.value) and err.value.path == tmp_path / "server.crt"
    assert isinstance(err.value, HotswapError) and snapshot(tmp_path) == before
    init_tls(tmp_path, hosts=("broker.example",), force=True)
    after = snapshot(tmp_path)
    assert server_hosts(cert(tmp_path / "server.crt")) == ["broker.example"]
    assert after["server.key"] != before["server.key"]
    for unchanged in ("ca.crt", "ca.key", "clients/cam-1.crt", "clients/cam-1.key"):
        assert after[unchanged] == before[unchanged], unchanged


def test_force_reissues_the_client_certificates_of_an_older_ca(tmp_path: Path) -> None:
    """After the CA files are removed a new CA is made; the old clients' certificates no longer
    fit, and force reissues them (even the ones not named) under the new CA."""
    init_tls(tmp_path, clients=("cam-1", "cam-2"))
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    with pytest.raises(TlsError, match="was not issued by this CA"):
        init_tls(tmp_path)
    files = init_tls(tmp_path, force=True)
    ca = cert(files.ca_cert)
    for path in (files.server_cert, files.client("cam-1").cert, files.client("cam-2").cert):
        cert(path).verify_directly_issued_by(ca)


def test_half_a_ca_or_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A CA certificate without its key is never replaced, not even with force; an unsafe
    client name, a bad host or no CA for add_client_cert: TlsError, nothing written."""
    init_tls(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(TlsError, match=r"ca\.key is missing: restore it, or remove"):
        init_tls(tmp_path / "ca", force=True)
    empty = tmp_path / "empty"
    for bad in (
        lambda: init_tls(empty, clients=("../evil",)),
        lambda: init_tls(empty, clients=("a/b",)),
        lambda: init_tls(empty, hosts=("bad host",)),
        lambda: init_tls(empty, hosts=()),
        lambda: init_tls(empty, days=0),
        lambda: add_client_cert(empty, "cam-1"),
    ):
        with pytest.raises(TlsError):
            bad()
        assert not empty.exists()


def test_a_certificate_with_a_missing_key_is_refused_then_replaced_with_force(
    tmp_path: Path,
) -> None:
    """A client certificate whose key is gone cannot be used: named in the error, reissued by
    force; a corrupt key likewise."""
    files = init_tls(tmp_path, clients=("cam-1",))
    files.client("cam-1").key.unlink()
    with pytest.raises(TlsError, match=r"cam-1\.crt has no key"):
        init_tls(tmp_path, clients=("cam-1",))
    init_tls(tmp_path, clients=("cam-1",), force=True)
    files.client("cam-1").key.write_text("not a key")
    with pytest.raises(TlsError, match="not an unencrypted PEM private key"):
        add_client_cert(tmp_path, "cam-1")
    add_client_cert(tmp_path, "cam-1", force=True)
    load_pem_private_key(files.client("cam-1").key.read_bytes(), password=None)


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    """Pure builder: asked for more days than the CA has left, the leaf ends with the CA."""
    files = init_tls(tmp_path)
    ca_cert = cert(files.ca_cert)
    ca_key = load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = ca_cert.not_valid_after_utc - dt.timedelta(days=10)
    issued = build_client_cert(ca_key, ca_cert, new_key().public_key(), name="x", now=now)
    assert issued.not_valid_after_utc == ca_cert.not_valid_after_utc


# --- a real mosquitto over TLS ----------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    tls: TlsFiles
    other_ca: TlsFiles  # a CA the broker does not trust, with its own "dev-1"
    dynsec_template: Path


@dataclass(frozen=True)
class Broker:
    password_port: int  # TLS, server auth only, then username/password
    cert_port: int  # TLS with client certificates, CN = identity
    log: Path
    tls: TlsFiles


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    base = tmp_path_factory.mktemp("tls")
    tls = init_tls(base / "tls", clients=("dev-1", "dev-2", "stranger"))
    other = init_tls(base / "other", clients=("dev-1",))
    template = base / "dynsec.json"
    subprocess.run(
        [MOSQUITTO_CTRL, "dynsec", "init", str(template), ADMIN, ADMIN_PASSWORD],
        check=True,
        capture_output=True,
    )
    return Material(tls, other, template)


def broker_config(tls: TlsFiles, password_port: int, cert_port: int, data: Path) -> str:
    files = f"cafile {tls.ca_cert}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
    return (
        f"user {getpass.getuser()}\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"plugin {DYNSEC_PLUGIN}\n"
        f"plugin_opt_config_file {data / 'dynsec.json'}\n"
        f"log_dest file {data / 'mosquitto.log'}\n"
        "log_type all\n"
        "connection_messages true\n"
        f"listener {password_port} 127.0.0.1\n{files}"
        f"listener {cert_port} 127.0.0.1\n{files}"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "use_username_as_clientid true\n"
    )


@contextlib.contextmanager
def running_mosquitto(tls: TlsFiles, dynsec: Path, data: Path) -> Iterator[Broker]:
    data.mkdir()
    shutil.copy(dynsec, data / "dynsec.json")
    ports = free_port(), free_port()
    (data / "mosquitto.conf").write_text(broker_config(tls, *ports, data))
    proc = subprocess.Popen(
        [str(find_mosquitto()), "-c", str(data / "mosquitto.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert all(wait_for_port("127.0.0.1", p, 10) for p in ports), "mosquitto did not start"
        yield Broker(*ports, data / "mosquitto.log", tls)
    finally:
        proc.terminate()
        proc.wait(10)


def client_context(ca: Path | None, identity: ClientFiles | None = None) -> ssl.SSLContext:
    """How a hotswap client builds its context: the CA file as the only trust anchor,
    hostname checking on, and Python 3.13's stricter defaults already applied."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


def mqtt(
    port: int,
    ctx: ssl.SSLContext,
    *,
    identifier: str,
    username: str | None = None,
    password: str | None = None,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        username=username,
        password=password,
        tls_context=ctx,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=5,
    )


def tls_refusal(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> str:
    """Why the TLS session to `port` failed, as OpenSSL's reason.

    With TLS 1.3 the server checks the client's certificate after the client has finished
    its handshake, so the refusal is the alert the first read returns.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.recv(1)
        except ssl.SSLCertVerificationError as exc:
            return f"{exc.reason}: {exc.verify_message}"
        except ssl.SSLError as exc:
            return str(exc.reason)
        except TimeoutError:
            return "accepted: no alert"
    return "closed without an alert"


def tls_accepts(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> bool:
    """The TLS session is established and the broker answers an MQTT CONNECT through it."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(CONNECT)
        return tls.recv(1) == bytes([CONNACK])


def broker_logged(broker: Broker, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.log.exists() and text in broker.log.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


async def dynsec(broker: Broker, *commands: dict[str, Any]) -> None:
    """Run dynamic-security commands as the admin over the password listener."""
    admin = mqtt(
        broker.password_port,
        client_context(broker.tls.ca_cert),
        identifier="t-admin",
        username=ADMIN,
        password=ADMIN_PASSWORD,
    )
    async with admin:
        await admin.subscribe(f"{CONTROL}/response", qos=1)
        await admin.publish(CONTROL, json.dumps({"commands": list(commands)}), qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(admin.messages))
    assert isinstance(message.payload, bytes)
    responses = json.loads(message.payload)["responses"]
    assert not [r for r in responses if "error" in r], responses


def device(name: str) -> list[dict[str, Any]]:
    """A dynsec role and client for `name`: it may publish and subscribe under dev/<name>/."""
    topic = f"dev/{name}/#"
    acls = [
        {"acltype": kind, "topic": topic, "allow": True}
        for kind in ("publishClientSend", "subscribePattern")
    ]
    return [
        {"command": "createRole", "rolename": f"role-{name}", "acls": acls},
        {
            "command": "createClient",
            "username": name,
            "password": f"pw-{name}",
            "roles": [{"rolename": f"role-{name}"}],
        },
    ]


@pytest.fixture
async def broker(material: Material, tmp_path: Path) -> AsyncIterator[Broker]:
    """mosquitto with both TLS listeners and dynsec clients dev-1 and dev-2 ('stranger' has a
    certificate from the CA but no dynsec client)."""
    with running_mosquitto(material.tls, material.dynsec_template, tmp_path / "broker") as b:
        await dynsec(b, *device("dev-1"), *device("dev-2"))
        yield b


async def granted(client: aiomqtt.Client, topic: str) -> int:
    (code,) = await client.subscribe(topic, qos=1)
    return code if isinstance(code, int) else int(code.value)


async def round_trip(client: aiomqtt.Client, topic: str) -> bytes:
    await client.subscribe(topic, qos=1)
    await client.publish(topic, b"ping", qos=1)
    async with asyncio.timeout(5):
        message = await anext(aiter(client.messages))
    assert isinstance(message.payload, bytes)
    return message.payload


def identity_of(material: Material, name: str) -> ssl.SSLContext:
    return client_context(material.tls.ca_cert, material.tls.client(name))


async def test_a_client_with_the_ca_logs_in_with_its_password_and_round_trips(
    broker: Broker,
) -> None:
    """Server-auth listener: CA-verified TLS, then the dynsec password decides."""
    ctx = client_context(broker.tls.ca_cert)
    port = broker.password_port
    async with mqtt(port, ctx, identifier="dev-1", username="dev-1", password="pw-dev-1") as c:
        assert await round_trip(c, "dev/dev-1/x") == b"ping"
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with mqtt(port, ctx, identifier="dev-1", username="dev-1", password="wrong"):
            pass


@PAHO_SSL_LEAK
async def test_a_client_with_default_trust_is_refused_at_the_handshake(broker: Broker) -> None:
    """Without our CA the client rejects the broker's certificate; the broker sees the alert."""
    ctx = client_context(None)  # the system's CAs only
    with pytest.raises(aiomqtt.MqttError, match=r"CERTIFICATE_VERIFY_FAILED.*self-signed"):
        async with mqtt(broker.password_port, ctx, identifier="t-x", username="dev-1"):
            pass
    assert broker_logged(broker, "alert unknown ca")


async def test_a_client_dialling_another_host_name_refuses_the_certificate(
    broker: Broker, material: Material
) -> None:
    """The certificate is for localhost and 127.0.0.1 only: a client expecting another name
    refuses it, on both listeners; the names it is for are accepted."""
    ctx = client_context(broker.tls.ca_cert)
    refused = tls_refusal(broker.password_port, ctx, server_hostname="broker.example")
    assert refused == (
        "CERTIFICATE_VERIFY_FAILED: Hostname mismatch, "
        "certificate is not valid for 'broker.example'."
    )
    assert "Hostname mismatch" in tls_refusal(broker.cert_port, ctx, "broker.example")
    assert tls_accepts(broker.password_port, ctx, server_hostname="localhost")
    assert tls_accepts(broker.cert_port, identity_of(material, "dev-1"), "127.0.0.1")


async def test_the_client_certificate_cn_is_the_username_whatever_the_client_sends(
    broker: Broker, material: Material
) -> None:
    """Certificate listener: dev-1's certificate with username dev-2 and a wrong password is
    logged in as dev-1 (password not checked) and gets dev-1's dynsec ACLs, not dev-2's."""
    ctx = identity_of(material, "dev-1")
    async with mqtt(
        broker.cert_port, ctx, identifier="asked-for", username="dev-2", password="wrong"
    ) as client:
        assert await granted(client, "dev/dev-2/#") == NOT_AUTHORIZED
        assert await round_trip(client, "dev/dev-1/x") == b"ping"
    assert broker_logged(broker, "as dev-1 (p5, c1, k60, u'dev-1')")


async def test_the_client_id_is_the_cn_so_a_second_session_takes_over_the_first(
    broker: Broker, material: Material
) -> None:
    """Two connections with dev-1's certificate and different client ids: both become client
    'dev-1', so the second takes the first one's session over."""
    ctx = identity_of(material, "dev-1")
    async with mqtt(broker.cert_port, ctx, identifier="first") as first:
        await first.subscribe("dev/dev-1/#", qos=1)
        async with mqtt(broker.cert_port, ctx, identifier="second") as second:
            with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                async with asyncio.timeout(5):
                    await anext(aiter(first.messages))
            assert await round_trip(second, "dev/dev-1/y") == b"ping"
    assert broker_logged(broker, "Client dev-1 already connected, closing old connection")


@pytest.mark.parametrize(
    ("who", "alert", "broker_says"),
    [
        (
            "no certificate",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "peer did not return a certificate",
        ),
        ("another CA's certificate", "TLSV1_ALERT_UNKNOWN_CA", "certificate verify failed"),
        (
            "the server's certificate",
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
            "certificate verify failed",
        ),
    ],
)
async def test_the_certificate_listener_refuses_clients_without_a_client_cert_from_the_ca(
    broker: Broker, material: Material, who: str, alert: str, broker_says: str
) -> None:
    """No certificate, one from another CA, or one without clientAuth (the server's own):
    refused in the TLS handshake, before any MQTT."""
    ctx = client_context(broker.tls.ca_cert)
    if who == "another CA's certificate":
        ctx.load_cert_chain(
            material.other_ca.client("dev-1").cert, material.other_ca.client("dev-1").key
        )
    elif who == "the server's certificate":
        ctx.load_cert_chain(broker.tls.server_cert, broker.tls.server_key)
    assert tls_refusal(broker.cert_port, ctx) == alert
    assert broker_logged(broker, broker_says)
    assert tls_accepts(broker.cert_port, identity_of(material, "dev-1"))


async def test_a_cn_without_a_dynsec_client_connects_but_may_do_nothing(
    broker: Broker, material: Material
) -> None:
    """'stranger' has a certificate from the CA but no dynsec client: the connection is
    accepted (no password check), every subscription is refused and its publishes are dropped."""
    async with (
        mqtt(broker.cert_port, identity_of(material, "stranger"), identifier="s") as stranger,
        mqtt(broker.cert_port, identity_of(material, "dev-1"), identifier="d") as dev1,
    ):
        for topic in ("#", "dev/stranger/#", "dev/dev-1/#"):
            assert await granted(stranger, topic) == NOT_AUTHORIZED, topic
        await dev1.subscribe("dev/dev-1/#", qos=1)
        # Acknowledged, so the broker has handled (and dropped) it before dev-1's own publish.
        await stranger.publish("dev/dev-1/x", b"forged", qos=1)
        await dev1.publish("dev/dev-1/x", b"own", qos=1)
        async with asyncio.timeout(5):
            first = await anext(aiter(dev1.messages))
    assert first.payload == b"own"
    assert broker_logged(broker, "Denied PUBLISH from stranger")


async def test_disabling_a_dynsec_client_does_not_stop_its_certificate_deleting_it_does(
    broker: Broker, material: Material
) -> None:
    """disableClient kicks dev-1 and stops its password login, but its certificate connects
    again with its ACLs intact (dynsec checks 'disabled' only with the password). After
    deleteClient the certificate still connects, with no rights left."""
    ctx = identity_of(material, "dev-1")
    async with mqtt(broker.cert_port, ctx, identifier="dev-1") as held:
        await dynsec(broker, {"command": "disableClient", "username": "dev-1"})
        with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
            async with asyncio.timeout(5):
                await anext(aiter(held.messages))
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with mqtt(
            broker.password_port,
            client_context(broker.tls.ca_cert),
            identifier="dev-1",
            username="dev-1",
            password="pw-dev-1",
        ):
            pass
    async with mqtt(broker.cert_port, ctx, identifier="dev-1") as again:
        assert await round_trip(again, "dev/dev-1/x") == b"ping"
    await dynsec(broker, {"command": "deleteClient", "username": "dev-1"})
    async with mqtt(broker.cert_port, ctx, identifier="dev-1") as deleted:
        assert await granted(deleted, "dev/dev-1/#") == NOT_AUTHORIZED
