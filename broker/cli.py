"""The `hotswap` command: mounts every sub-command and runs the broker and the demo.

`hotswap broker run`, `hotswap keys init` and `hotswap demo` live here; the
controller's, operators' and agent's commands are mounted from their packages.
Does process, file and terminal I/O.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker.launcher import Mosquitto
from controller.cli import controller_app, device_app, model_app, rollout_app
from edge_agent.cli import app as agent_app
from shared.console import cli_errors, emit_json, fail, progress
from shared.keys import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    init_keys,
    load_private_key,
    load_public_key,
)
from shared.model_builder import build_dense_model

app = typer.Typer(
    name="hotswap",
    help="Roll signed TFLite models out to edge devices over MQTT, without dropping inferences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
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


@broker_app.command("run")
def broker_run(
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on")] = 1883,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="HOTSWAP_DATA_DIR", help="persistence and logs")
    ] = Path("hotswap-data/broker"),
    bind: Annotated[str, typer.Option("--bind", help="address to listen on")] = "127.0.0.1",
) -> None:
    """Run mosquitto with the project's mosquitto.conf until SIGINT/SIGTERM."""
    with cli_errors():
        broker = Mosquitto(data_dir, port=port, host=bind).start()
    progress(f"mosquitto listening on {broker.url} (data and log in {broker.data_dir})")

    def stop(_sig: int, _frame: object) -> None:
        broker.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = broker.process.wait() if broker.process else 0
    fail(f"mosquitto exited with code {code}; see {broker.log_path}")


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
    inputs: Annotated[int, typer.Option(help="input width")] = 4,
    outputs: Annotated[int, typer.Option(help="output classes")] = 3,
    hidden: Annotated[str, typer.Option(help="hidden layer widths, comma-separated")] = "8",
) -> None:
    """Write a small real TFLite classifier (for trying things out)."""
    with cli_errors():
        widths = tuple(int(w) for w in hidden.split(",") if w.strip())
        data = build_dense_model(input_size=inputs, hidden=widths, output_size=outputs, seed=seed)
        out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")


@app.command("demo")
def demo(
    devices: Annotated[int, typer.Option("--devices", min=1, max=200, help="agents to run")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="summary as JSON on stdout")] = False,
    timeout: Annotated[float, typer.Option(help="seconds each rollout may take")] = 90.0,
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
