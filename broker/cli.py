"""The `hotswap` command: mounts every sub-command and runs the broker and the demo.

`hotswap broker run`, `hotswap device provision|import|revoke`, `hotswap keys init`
and `hotswap demo` live here; the controller's, operators' and agent's commands
are mounted from their packages (provision, import and revoke join the controller's
`device` group here, so that `controller` never imports `broker`).
Does process, network, file and terminal I/O.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import aiomqtt
import typer

from broker.launcher import Mosquitto
from broker.provision import (
    Provisioned,
    import_devices,
    parse_device_list,
    provision_device,
    provision_devices,
    revoke_device,
)
from broker.tls import DEFAULT_DAYS, DEFAULT_HOSTS, init_tls
from controller.cli import Timeout, controller_app, device_app, model_app, rollout_app, wait_until
from edge_agent.cli import app as agent_app
from shared import __version__
from shared.console import OneLineErrors, cli_errors, duration_option, emit_json, fail, progress
from shared.credentials import DeviceIdentity, endpoint_for, load_credentials
from shared.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    init_keys,
    load_private_key,
    load_public_key,
)
from shared.model_builder import build_dense_model
from shared.mqtt import connection_error, make_client
from shared.settings import MqttEndpoint, parse_mqtt_url, settings_from_env

_DEFAULTS = settings_from_env()

app = typer.Typer(
    name="hotswap",
    help="Roll signed TFLite models out to edge devices over MQTT, without dropping inferences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)
broker_app = typer.Typer(help="Run the local mosquitto broker.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage the operator's signing keys.", no_args_is_help=True)

app.add_typer(broker_app, name="broker")
app.add_typer(controller_app, name="controller")
app.add_typer(agent_app, name="agent")
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(device_app, name="device")
app.add_typer(rollout_app, name="rollout")


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"hotswap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Roll signed TFLite models out to edge devices over MQTT, without dropping inferences."""


@broker_app.command("run")
def broker_run(
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on")
    ] = 1883,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="HOTSWAP_DATA_DIR", help="persistence and logs")
    ] = Path("hotswap-data/broker"),
    bind: Annotated[str, typer.Option("--bind", help="address to listen on")] = "127.0.0.1",
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            "--tls-dir",
            help="ca.crt, server.crt, server.key (from `broker init-tls`); default: DATA_DIR/tls",
        ),
    ] = None,
    tls_port: Annotated[
        int, typer.Option("--tls-port", min=1, max=65535, help="TLS listener")
    ] = 8883,
    tls_cert_port: Annotated[
        int,
        typer.Option(
            "--tls-cert-port",
            min=1,
            max=65535,
            help="TLS listener with client-certificate identity",
        ),
    ] = 8884,
) -> None:
    """Run mosquitto with the project's mosquitto.conf until SIGINT/SIGTERM.

    On the first start of DATA_DIR it writes the broker's identities: credentials
    for the admin, the controller and an operator under DATA_DIR/credentials.
    """
    if tls_dir is None and (data_dir / "tls" / "ca.crt").is_file():
        tls_dir = data_dir / "tls"
    # Handlers first: a signal while mosquitto starts must stop it, not orphan it.
    stop_requested = False
    waiting = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        if waiting:
            # Only leave the wait below: stopping from inside the handler would wait on
            # the same process again while Popen.wait holds its lock (a deadlock).
            raise _StopSignalError

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with cli_errors():
        broker = Mosquitto(
            data_dir,
            port=port,
            host=bind,
            tls_dir=tls_dir,
            tls_port=tls_port if tls_dir else None,
            tls_cert_port=tls_cert_port if tls_dir else None,
        ).start()
    progress(f"mosquitto listening on {broker.url} (data and log in {broker.data_dir})")
    if broker.tls_port is not None:
        progress(f"TLS on {broker.tls_url}, client-certificate identity on {broker.tls_cert_url}")
    progress(f"credentials for the controller, operators and the admin in {broker.credentials_dir}")
    try:
        waiting = True
        if stop_requested:
            raise _StopSignalError
        code = broker.process.wait() if broker.process else 0
    except _StopSignalError:
        waiting = False
        broker.stop()
        return
    fail(f"mosquitto exited with code {code}; see {broker.log_path}")


class _StopSignalError(Exception):
    """SIGTERM or SIGINT arrived while `broker run` waited for mosquitto."""


async def _logs_in(endpoint: MqttEndpoint) -> bool:
    """Whether the broker answers and accepts this login (connect, then leave)."""
    try:
        async with make_client(endpoint, identifier=f"hotswap-wait-{uuid.uuid4().hex[:12]}"):
            return True
    except aiomqtt.MqttError as exc:
        raise connection_error(endpoint, exc) from exc


@broker_app.command("wait")
def broker_wait(
    credentials: Annotated[
        Path,
        typer.Option(
            "--credentials",
            envvar="HOTSWAP_CREDENTIALS",
            help="an identity to log in with (DATA_DIR/credentials/admin, …)",
        ),
    ],
    timeout: Timeout = 30.0,
    mqtt_url: Annotated[
        str, typer.Option("--mqtt-url", envvar="HOTSWAP_MQTT_URL", help="broker, mqtt://host:port")
    ] = _DEFAULTS.mqtt_url,
) -> None:
    """Wait until the broker accepts this login; exit 1 after --timeout.

    For scripts that start `broker run` in the background: the credentials
    directory its first start writes may not exist yet either.
    """
    with cli_errors():
        parsed = parse_mqtt_url(mqtt_url)

        async def ready() -> bool:
            return await _logs_in(endpoint_for(parsed, credentials))

        asyncio.run(wait_until(ready, timeout_s=timeout, what=f"the broker at {parsed}"))
    progress(f"broker at {parsed} accepts {credentials}")


@broker_app.command("sub-command")
def broker_sub_command(
    topic: Annotated[str, typer.Argument(help="topic filter")] = "hotswap/v1/devices/+/state",
    credentials: Annotated[
        Path,
        typer.Option(
            "--credentials",
            envvar="HOTSWAP_CREDENTIALS",
            help="whose login (an operator's: DATA_DIR/credentials/operator)",
        ),
    ] = Path("hotswap-data/broker/credentials/operator"),
    mqtt_url: Annotated[
        str, typer.Option("--mqtt-url", envvar="HOTSWAP_MQTT_URL", help="broker, mqtt://host:port")
    ] = _DEFAULTS.mqtt_url,
) -> None:
    """Print the `mosquitto_sub` command that reads TOPIC with these credentials.

    Host, port, login (and CA and client certificate for mqtts://), shell-quoted:
    `eval "$(hotswap broker sub-command) -W 1"` runs it. The line holds the password.
    """
    with cli_errors():
        endpoint = parse_mqtt_url(mqtt_url)
        creds = load_credentials(credentials)
    argv = ["mosquitto_sub", "-h", endpoint.host, "-p", str(endpoint.port), "-V", "mqttv5"]
    argv += ["-u", creds.login.username, "-P", creds.login.password]
    if creds.login.client_id:
        argv += ["-i", creds.login.client_id]
    if endpoint.tls:
        if creds.ca_file is not None:
            argv += ["--cafile", str(creds.ca_file)]
        if creds.cert_file is not None and creds.key_file is not None:
            argv += ["--cert", str(creds.cert_file), "--key", str(creds.key_file)]
    argv += ["-t", topic, "-v"]
    print(shlex.join(argv))


@broker_app.command("init-tls")
def broker_init_tls(
    directory: Annotated[
        Path, typer.Option("--dir", help="where to write them (the broker's DATA_DIR/tls)")
    ],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="name or address clients dial (repeat); default: localhost"),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option("--client", help="also issue a client certificate with this CN (repeat)"),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="leaf certificate lifetime")] = (
        DEFAULT_DAYS
    ),
    force: Annotated[
        bool, typer.Option("--force", help="replace certificates that no longer fit")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Create a CA, the broker's server certificate and client certificates (safe to re-run)."""
    with cli_errors():
        files = init_tls(
            directory,
            hosts=tuple(host or DEFAULT_HOSTS),
            clients=tuple(client or ()),
            days=days,
            force=force,
        )
    if as_json:
        emit_json(
            {
                "ca": str(files.ca_cert),
                "serverCert": str(files.server_cert),
                "serverKey": str(files.server_key),
                "clients": {
                    c.name: {"cert": str(c.cert), "key": str(c.key)} for c in files.clients
                },
            }
        )
    else:
        print(
            f"wrote {files.ca_cert} (give it to clients), {files.server_cert} and "
            f"{files.server_key}; `hotswap broker run --tls-dir {directory}` listens with TLS"
        )


MqttUrl = Annotated[
    str, typer.Option("--mqtt-url", envvar="HOTSWAP_MQTT_URL", help="broker, mqtt://host:port")
]
AdminCredentials = Annotated[
    Path,
    typer.Option(
        "--credentials",
        envvar="HOTSWAP_CREDENTIALS",
        help="the broker's admin credentials (DATA_DIR/credentials/admin)",
    ),
]


TrustedKeys = Annotated[
    list[Path] | None,
    typer.Option("--trusted-key", help="operator public key it accepts (repeat)"),
]
Force = Annotated[bool, typer.Option("--force", help="replace an existing device's credentials")]
KeepExisting = Annotated[
    bool,
    typer.Option(
        "--keep-existing", help="the device exists and its directory holds its credentials: exit 0"
    ),
]
TlsDir = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir", help="the broker's TLS dir: also issue a client certificate (CN = device id)"
    ),
]
DeviceFile = Annotated[
    Path | None,
    typer.Option(
        "--from-file", help="CSV of devices, one `id,region,type` per line (OUT_DIR/<id> each)"
    ),
]
OutDir = Annotated[
    Path | None, typer.Option("--out-dir", help="with --from-file: directory of credentials dirs")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _read_device_file(path: Path) -> list[DeviceIdentity]:
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", 2)
    return parse_device_list(text, str(path))


def _batch_summary(done: list[Provisioned], out_dir: Path, seconds: float) -> dict[str, Any]:
    counts = {o: sum(1 for d in done if d.outcome == o) for o in ("created", "replaced", "kept")}
    return {
        "devices": [
            {
                "deviceId": d.credentials.login.username,
                "credentials": str(d.credentials.directory),
                "outcome": d.outcome,
            }
            for d in done
        ],
        "counts": counts,
        "outDir": str(out_dir),
        "seconds": round(seconds, 3),
    }


def _print_batch(summary: dict[str, Any], verb: str) -> None:
    counts = summary["counts"]
    print(
        f"{verb} {len(summary['devices'])} devices in {summary['seconds']:.1f}s "
        f"(created {counts['created']}, replaced {counts['replaced']}, kept {counts['kept']}); "
        f"run `hotswap agent run --credentials {summary['outDir']}/<device id>` on each"
    )


@device_app.command("provision")
def device_provision(
    credentials: AdminCredentials,
    device_id: Annotated[str | None, typer.Option("--device-id", help="the device's id")] = None,
    region: Annotated[str | None, typer.Option("--region", help="its region")] = None,
    device_type: Annotated[
        str | None, typer.Option("--device-type", help="its device type")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="credentials directory to write")
    ] = None,
    from_file: DeviceFile = None,
    out_dir: OutDir = None,
    trusted_key: TrustedKeys = None,
    force: Force = False,
    keep_existing: KeepExisting = False,
    tls_dir: TlsDir = None,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    as_json: JsonFlag = False,
) -> None:
    """Create devices' broker identities and ACLs (no restart) and write their credentials.

    One device: --device-id, --region, --device-type and --out. Many: --from-file
    and --out-dir (batched; for thousands at once see `device import`).
    """
    one = (device_id, region, device_type, out)
    if from_file is not None:
        if any(v is not None for v in one) or out_dir is None:
            fail(
                "--from-file takes --out-dir, and no --device-id, --region, --device-type or --out",
                2,
            )
        with cli_errors():
            devices = _read_device_file(from_file)
            admin = endpoint_for(parse_mqtt_url(mqtt_url), credentials)
            started = time.monotonic()
            many = asyncio.run(
                provision_devices(
                    admin, credentials, devices, out_dir, trusted_keys=trusted_key or (),
                    force=force, keep_existing=keep_existing, tls_dir=tls_dir, progress=progress,
                )
            )  # fmt: skip
        summary = _batch_summary(many, out_dir, time.monotonic() - started)
        if as_json:
            emit_json(summary)
        else:
            _print_batch(summary, "provisioned")
        return
    if device_id is None or region is None or device_type is None or out is None:
        fail(
            "give --device-id, --region, --device-type and --out (or --from-file and --out-dir)", 2
        )
    with cli_errors():
        device = DeviceIdentity(device_id, region, device_type)
        admin = endpoint_for(parse_mqtt_url(mqtt_url), credentials)
        done = asyncio.run(
            provision_device(
                admin,
                credentials,
                device,
                out,
                trusted_keys=trusted_key or (),
                force=force,
                keep_existing=keep_existing,
                tls_dir=tls_dir,
            )
        )
    if as_json:
        emit_json(
            {
                "deviceId": device_id,
                "region": region,
                "deviceType": device_type,
                "credentials": str(out),
                "trustedKeys": [str(k) for k in done.credentials.trusted_keys],
                "clientCert": str(cert) if (cert := done.credentials.cert_file) else None,
                "outcome": done.outcome,
            }
        )
    else:
        print(f"{done.outcome} {device_id}: run `hotswap agent run --credentials {out}`")


@device_app.command("import")
def device_import(
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", envvar="HOTSWAP_DATA_DIR", help="the stopped broker's DATA_DIR"),
    ],
    from_file: Annotated[
        Path, typer.Option("--from-file", help="CSV of devices, one `id,region,type` per line")
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="directory of credentials dirs")],
    trusted_key: TrustedKeys = None,
    force: Force = False,
    keep_existing: KeepExisting = False,
    tls_dir: TlsDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Write many devices into a stopped broker's identities at once (thousands per minute).

    The broker loads them when it starts; then publish their registry records with
    `device provision --from-file FILE --out-dir OUT_DIR --keep-existing`.
    """
    with cli_errors():
        devices = _read_device_file(from_file)
        started = time.monotonic()
        done = import_devices(
            data_dir, devices, out_dir, trusted_keys=trusted_key or (), force=force,
            keep_existing=keep_existing, tls_dir=tls_dir, progress=progress,
        )  # fmt: skip
    summary = _batch_summary(done, out_dir, time.monotonic() - started)
    if as_json:
        emit_json(summary)
    else:
        _print_batch(summary, f"imported into {data_dir}:")
        print(
            f"start the broker, then publish their registry records: `hotswap device provision "
            f"--from-file {from_file} --out-dir {out_dir} --keep-existing --credentials "
            f"{data_dir}/credentials/admin`"
        )


@device_app.command("revoke")
def device_revoke(
    device_id: Annotated[str, typer.Argument(help="the device's id")],
    credentials: AdminCredentials,
    mqtt_url: MqttUrl = _DEFAULTS.mqtt_url,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Delete a device's broker identity: it is disconnected at once and cannot log in."""
    with cli_errors():
        asyncio.run(revoke_device(endpoint_for(parse_mqtt_url(mqtt_url), credentials), device_id))
    if as_json:
        emit_json({"deviceId": device_id, "revoked": True})
    else:
        print(f"revoked {device_id}")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Option("--dir", help="where to write the key pair")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing key")] = False,
    keep_existing: Annotated[
        bool, typer.Option("--keep-existing", help="an existing valid pair is fine: exit 0")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an Ed25519 signing key (signing.key, mode 0600) and its public key."""
    with cli_errors():
        private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
        if keep_existing and private.exists():
            # Idempotent set-up (compose re-runs it): check the pair instead of writing.
            if load_private_key(private).public_key() != load_public_key(public):
                fail(f"{public} is not the public half of {private}", 2)
        else:
            private, public = init_keys(directory, overwrite=force)
    if as_json:
        emit_json({"signingKey": str(private), "publicKey": str(public)})
    else:
        print(f"wrote {private} (keep it secret) and {public} (give it to devices)")


@app.command("generate-model", hidden=False)
def generate_model(
    out: Annotated[Path, typer.Argument(help="where to write the .tflite file")],
    seed: Annotated[int, typer.Option(help="weights seed: another seed, another model")] = 0,
    inputs: Annotated[int, typer.Option(min=1, help="input width")] = 4,
    outputs: Annotated[int, typer.Option(min=2, help="output classes")] = 3,
    hidden: Annotated[str, typer.Option(help="hidden layer widths, comma-separated")] = "8",
) -> None:
    """Write a small real TFLite classifier (for trying things out)."""
    with cli_errors():
        words = [w.strip() for w in hidden.split(",") if w.strip()]
        if not all(w.isdigit() and int(w) > 0 for w in words):
            fail(f"--hidden: {hidden!r} is not a list of widths (e.g. 16,8)", 2)
        widths = tuple(int(w) for w in words)
        data = build_dense_model(input_size=inputs, hidden=widths, output_size=outputs, seed=seed)
        out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option("--devices", min=1, max=200, help="agents to run")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="summary as JSON on stdout")] = False,
    timeout: Annotated[
        float, duration_option("--timeout", help="how long each rollout may take (90, 2m)")
    ] = 90.0,
) -> None:
    """Run broker, S3, controller and N agents here; push and roll out v1 then v2."""
    from broker.demo import run_demo

    with cli_errors():
        summary = run_demo(devices=devices, rollout_timeout_s=timeout)
    if as_json:
        emit_json(summary)
    else:
        for line in summary["report"]:
            print(line)
    if not summary["ok"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
