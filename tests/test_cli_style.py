"""One CLI style, checked on the real `hotswap` command: `--version`; every error one
`error: …` line naming the flag; every duration flag takes 90, 30s, 5m, 1h; `--log-level`
checked and `--log-json` nothing but JSON lines (LiteRT's native line and stdlib loggers
included); `--json` times in ISO 8601 UTC and lists as lists; progress on long work.

Real processes where it matters: mosquitto, moto's S3 server, a controller process,
edge agents with real LiteRT interpreters.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from broker.cli import app
from broker.launcher import Mosquitto, free_port
from broker.s3server import DEMO_CREDENTIALS
from controller.cli import StageProgress
from shared import topics
from shared.console import OneLineErrors
from shared.credentials import CA_FILE, MQTT_FILE, MqttLogin, login_json, private_dir, write_secret
from shared.messages import RolloutStatus
from shared.model_builder import build_dense_model
from shared.mqtt import make_client
from tests.conftest import S3, KeyPair
from tests.faults.conftest import ControllerProcess, devices_online, make_agents

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
UNREACHABLE = ("--mqtt-url", "mqtt://127.0.0.1:1")
START = ("rollout", "start", "--model", "clf", "--version", "1.0.0", "--all", *UNREACHABLE)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version_prints_the_package_version() -> None:
    """`hotswap --version` prints `hotswap X.Y.Z` and exits 0."""
    code, out, _ = run("--version")
    assert code == 0
    assert re.fullmatch(r"hotswap \d+\.\d+\.\d+\S*\n", out)


BAD_INPUT = [
    # (arguments, the flag or word the one line must name)
    ((*START, "--device-timeout", "-5"), "--device-timeout"),
    ((*START, "--device-timeout", "soon"), "--device-timeout"),
    ((*START, "--min-samples", "0"), "--min-samples"),
    ((*START, "--strategy", "canary", "--canary-percent", "500"), "--canary-percent"),
    ((*START, "--max-error-rate", "2"), "--max-error-rate"),
    ((*START, "--retries", "x"), "--retries"),
    ((*START, "--strategy", "progressive", "--stages", "10:5x"), "--stages"),
    ((*START, "--strategy", "progressive", "--stages", "10"), "--stages"),
    ((*START, "--strategy", "progressive", "--stages", "150:5m,100:0"), "--stages"),
    (("rollout", "status", "r-1", "--wait", "abc", *UNREACHABLE), "--wait"),
    (("rollout", "devices", "r-1", "--limit", "0", *UNREACHABLE), "--limit"),
    (("controller", "run", "--log-level", "loud"), "--log-level"),
    (("agent", "run", "--log-level", "loud"), "--log-level"),
    (("agent", "run", "--telemetry-interval", "0"), "--telemetry-interval"),
    (("broker", "run", "--port", "99999"), "--port"),
    (("demo", "--devices", "0"), "--devices"),
    (("keys", "init"), "--dir"),
    (("generate-model", "/nonexistent/dir/x.tflite"), "/nonexistent/dir/x.tflite"),
    (("generate-model", "x.tflite", "--hidden", "a"), "--hidden"),
    (("generate-model", "x.tflite", "--inputs", "0"), "--inputs"),
    (("controller", "run", "--metrics-port", "99999"), "--metrics-port"),
    (("model", "orphans", "--older-than", "yesterday"), "--older-than"),
    (("rollout", "status"), "ROLLOUT_ID"),
    # Refused values our own checks find name their flag too, not only the value.
    (("keys", "init", "--dir", "/dev/null/keys"), "--dir: /dev/null/keys"),
    (("device", "list", "--mqtt-url", "bogus"), "--mqtt-url: invalid MQTT URL 'bogus'"),
    ((*START, "--credentials", "/nonexistent/creds"), "--credentials: "),
    (("device", "revoke", "cam-1"), "--credentials"),
    (("no-such-command",), "no-such-command"),
    (("rollout", "start", "--no-such-flag"), "--no-such-flag"),
]


@pytest.mark.parametrize(("args", "names"), BAD_INPUT, ids=[" ".join(a[0][:4]) for a in BAD_INPUT])
def test_bad_input_is_one_error_line_naming_the_flag(args: tuple[str, ...], names: str) -> None:
    """Exit 2 and exactly one `error: …` line on stderr naming the flag; no box, no
    traceback, no pydantic link, no internal field name, nothing on stdout."""
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], err
    for noise in ("Traceback", "╭", "Usage:", "errors.pydantic.dev", "For further information"):
        assert noise not in err
    assert not re.search(r"\b[a-z]+(_[a-z]+)+_s\b", err), f"an internal field name: {err}"


def test_a_refused_flag_under_log_json_is_a_json_line() -> None:
    """`controller run --log-json --log-level x`: the one error line is a JSON event."""
    code, out, err = run("controller", "run", "--log-json", "--log-level", "x")
    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and event["error"].startswith("--log-level")
    code, _, err = run("controller", "run", "--log-level", "x")  # the next run: plain again
    assert code == 2 and err.startswith("error: --log-level")


PUSH = (
    "model",
    "push",
    "m.tflite",
    "--name",
    "m",
    "--version",
    "1",
    "--signing-key",
    "k",
    *UNREACHABLE,
)


@pytest.mark.parametrize("command", [START, PUSH, ("controller", "run"), ("agent", "run")])
def test_an_unknown_otel_exporter_is_one_line_naming_the_variable(command: tuple[str, ...]) -> None:
    """`OTEL_TRACES_EXPORTER=jaeger`: exit 2 and one line naming the variable, before the
    command reads or connects anything; not an internal error. (The services set up their
    logging for the whole process: they run as one.)"""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "jaeger"}
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", *command],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: OTEL_TRACES_EXPORTER='jaeger'") and "internal" not in line


def test_push_with_an_invalid_version_is_one_line(tmp_path: Path) -> None:
    """A version the manifest refuses is `error: --version: …`, not pydantic's report."""
    model = tmp_path / "m.tflite"
    model.write_bytes(build_dense_model(seed=1))
    key = tmp_path / "signing.key"
    assert run("keys", "init", "--dir", str(tmp_path))[0] == 0
    code, out, err = run(
        "model", "push", str(model), "--name", "clf", "--version", "not a version!",
        "--signing-key", str(key), *UNREACHABLE,
    )  # fmt: skip
    assert code == 2, (code, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: --version"), err
    assert "pydantic" not in err
    code, _, err = run(
        "model", "push", str(model), "--name", "clf", "--version", "1.0.0",
        "--signing-key", str(tmp_path / "missing.key"), *UNREACHABLE,
    )  # fmt: skip
    assert (code, err) == (2, f"error: --signing-key: cannot read signing key "
                              f"{tmp_path / 'missing.key'}: No such file or directory\n")  # fmt: skip


def test_a_bug_is_one_line_and_exit_1() -> None:
    """An unexpected exception in a command ends as one `error: internal error …` line."""
    buggy = typer.Typer(cls=OneLineErrors)

    @buggy.command()
    def boom() -> None:
        _ = 1 / 0

    @buggy.command()
    def other() -> None:
        pass

    result = CliRunner().invoke(buggy, ["boom"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: internal error: ZeroDivisionError")
    assert len(result.stderr.splitlines()) == 1


def test_the_installed_entry_point_speaks_the_same_way(tmp_path: Path) -> None:
    """The `hotswap` console script (not only CliRunner): a missing directory is one line."""
    hotswap = Path(sys.executable).parent / "hotswap"
    done = subprocess.run(
        [str(hotswap), "generate-model", str(tmp_path / "no" / "x.tflite")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {tmp_path / 'no' / 'x.tflite'}: No such file or directory\n"


def test_a_bad_environment_variable_is_one_line_not_a_traceback() -> None:
    """HOTSWAP_* variables are read while the CLI loads: one that does not parse is exit 2
    and one line naming it; durations there take units too (HOTSWAP_PRESIGN_TTL_S=1h)."""
    hotswap = str(Path(sys.executable).parent / "hotswap")
    bad = subprocess.run(
        [hotswap, "model", "list"],
        env=os.environ | {"HOTSWAP_REQUEST_TIMEOUT_S": "soon"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr == (
        "error: HOTSWAP_REQUEST_TIMEOUT_S: invalid duration 'soon': use 90, 30s, 5m or 1h\n"
    )
    good = subprocess.run(
        [hotswap, "--version"],
        env=os.environ | {"HOTSWAP_PRESIGN_TTL_S": "1h", "HOTSWAP_REQUEST_TIMEOUT_S": "5s"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (good.returncode, good.stderr) == (0, "")


CONFIG_OF_CONTROLLER_RUN = textwrap.dedent(
    """
    import sys
    import controller.service
    from broker.cli import app

    class Captured:  # prints the configuration `controller run` built, then stops
        def __init__(self, config):
            print(config.command_ttl_s, config.presign_ttl_s)
            sys.exit(0)

    controller.service.Controller = Captured
    app(["controller", "run", "--metrics-port", "0"])
    """
)


def test_command_ttl_variable_reaches_the_controller() -> None:
    """HOTSWAP_COMMAND_TTL_S (docs/security.md) sets the expiry of the controller's
    commands, as a duration like every other; it was read and then ignored."""
    env = {**os.environ, "HOTSWAP_COMMAND_TTL_S": "2m", "HOTSWAP_PRESIGN_TTL_S": "1h"}
    done = subprocess.run(
        [sys.executable, "-c", CONFIG_OF_CONTROLLER_RUN],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "120 3600\n"), done.stderr


def test_sub_command_prints_the_mosquitto_sub_line_for_a_login(tmp_path: Path) -> None:
    """`broker sub-command`: host, port, MQTT 5, the login, the CA for mqtts://, the topic;
    shell-quoted so that `eval` runs it."""
    creds = tmp_path / "operator"
    write_secret(private_dir(creds) / MQTT_FILE, login_json(MqttLogin("hotswap-operator", "pw 1")))
    (creds / CA_FILE).write_text("not read here")
    code, out, err = run(
        "broker", "sub-command", "hotswap/v1/rollouts/+/status",
        "--credentials", str(creds), "--mqtt-url", "mqtts://broker.example:8883",
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert shlex.split(out) == [
        "mosquitto_sub", "-h", "broker.example", "-p", "8883", "-V", "mqttv5",
        "-u", "hotswap-operator", "-P", "pw 1", "--cafile", str(creds / CA_FILE),
        "-t", "hotswap/v1/rollouts/+/status", "-v",
    ]  # fmt: skip


def _all_params(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _all_params(sub, (*path, name))
    for param in getattr(command, "params", []):
        yield " ".join(path), param


DURATION_WORDS = ("timeout", "duration", "delay", "wait", "ttl", "interval", "budget", "older")


def test_every_duration_flag_takes_seconds_and_units() -> None:
    """Each flag whose name says it is a time reads `90`, `30s`, `5m` and `1h` as seconds."""
    root = get_command(app)
    durations = [
        (where, p)
        for where, p in _all_params(root)
        if any(word in (p.name or "") for word in DURATION_WORDS) and not p.is_flag
    ]
    assert len(durations) >= 15, [f"{w} {p.name}" for w, p in durations]
    for where, param in durations:
        ctx = typer.Context(root)
        for text, seconds in (("90", 90.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)):
            got = param.process_value(ctx, text)
            assert got == seconds, f"{where} {param.opts[0]} {text!r} -> {got!r}"


def test_stage_progress_shows_done_of_targeted_per_stage() -> None:
    """`rollout status --watch` keeps one bar per stage seen, frozen when the next begins."""
    stages = StageProgress()

    def status(stage: str, targeted: int, pending: int) -> RolloutStatus:
        return RolloutStatus(
            rollout_id="r-1", model="clf", version="2", strategy="canary",
            status="InProgress", devices_targeted=targeted, devices_updated=targeted - pending,
            devices_pending=pending, stage=stage,
        )  # fmt: skip

    stages.update(status("canary (1/2)", 10, 9))
    stages.update(status("canary (1/2)", 10, 8))
    stages.update(status("all (2/2)", 10, 3))
    assert stages.lines() == [
        "progress  canary (1/2)     [####................] 2/10 devices done",
        "progress  all (2/2)        [##############......] 7/10 devices done",
    ]


# ------------------------------------------------------------------ --log-json

NATIVE_AND_STDLIB = textwrap.dedent(
    """
    import logging, structlog
    from shared.logs import configure_logging
    from shared.model_builder import build_dense_model
    from shared.tflite import make_interpreter
    configure_logging("info", json=True, native=True)
    structlog.get_logger().info("hello", who="us")
    make_interpreter(build_dense_model(seed=1))   # LiteRT prints its XNNPACK line on fd 2
    logging.getLogger("mqtt").warning("paho says %s", "hi")
    """
)


def test_log_json_turns_native_and_stdlib_lines_into_json() -> None:
    """Under --log-json every stderr line is a JSON object: our events, LiteRT's native
    "Created TensorFlow Lite XNNPACK delegate" line and stdlib loggers (paho's) alike."""
    done = subprocess.run(
        [sys.executable, "-c", NATIVE_AND_STDLIB],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]  # fails on any non-JSON
    names = {e["event"] for e in events}
    assert {"hello", "paho says hi", "native_output"} <= names, events
    native = next(e for e in events if e["event"] == "native_output")
    assert "XNNPACK" in native["line"] and native["level"] == "info"


@pytest.mark.parametrize("as_json", [True, False], ids=["log-json", "plain"])
def test_agent_start_up_is_one_line_for_people_or_json_lines_only(
    tmp_path: Path, signing_keys: KeyPair, as_json: bool
) -> None:
    """`agent run` while its broker is down: its start-up line, then its retries. Under
    --log-json every line is a JSON event, the start-up one included; plain, it is the
    sentence for people."""
    args = [
        sys.executable, "-m", "broker.cli", "agent", "run", "--device-id", "cam-1",
        "--region", "eu-west", "--device-type", "camera", "--data-dir", str(tmp_path / "a"),
        "--trusted-key", str(signing_keys.public_path), *UNREACHABLE,
    ]  # fmt: skip
    proc = subprocess.Popen(
        [*args, "--log-json"] if as_json else args,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:  # the start-up line, then retries: stop at the first retry
            lines.append(line.rstrip("\n"))
            if "mqtt_unavailable" in line:
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # drains and closes the pipe
    if as_json:
        events = [json.loads(line) for line in lines]  # fails on any line that is not JSON
        assert events[0]["event"] == "agent_starting" and events[0]["device_id"] == "cam-1"
    else:
        assert lines[0].startswith("agent cam-1 (eu-west/camera): broker mqtt://"), lines


def test_controller_metrics_bind_loopback_unless_told(tmp_path: Path) -> None:
    """`controller run` serves its metrics on 127.0.0.1 by default and on --metrics-host
    when given: a port already taken there is one error line naming that address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra, host in (((), "127.0.0.1"), (("--metrics-host", "203.0.113.7"), "203.0.113.7")):
            done = subprocess.run(
                [
                    sys.executable, "-m", "broker.cli", "controller", "run", *UNREACHABLE,
                    "--db-url", f"sqlite:///{tmp_path / 'c.db'}", "--metrics-port", str(port),
                    *extra,
                ],
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith(f"error: cannot serve metrics on {host}:{port}: "), (
                done.stderr
            )


def test_a_database_url_that_cannot_be_opened_names_db_url(tmp_path: Path) -> None:
    """`controller run --db-url bogus://x`: one line naming --db-url and the URL."""
    done = subprocess.run(
        [
            sys.executable, "-m", "broker.cli", "controller", "run", *UNREACHABLE,
            "--db-url", "bogus://x", "--metrics-port", "0",
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: --db-url: cannot open the database bogus://x: "), line


def test_controller_log_json_is_json_lines_only_errors_included(
    mosquitto: Mosquitto, s3_server: Any, tmp_path: Path
) -> None:
    """`controller run --log-json` whose bucket is missing: exit 2, and its stderr, start-up
    line and error included, is JSON lines only (the error names --create-bucket)."""
    done = subprocess.run(
        [
            sys.executable, "-m", "broker.cli", "controller", "run", "--log-json",
            "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("controller")),
            "--db-url", f"sqlite:///{tmp_path / 'c.db'}", "--metrics-port", "0",
            "--s3-endpoint", s3_server.endpoint, "--s3-bucket", "no-such-bucket",
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[-1]["event"] == "error"
    assert "does not exist" in events[-1]["error"] and "--create-bucket" in events[-1]["error"]


# ------------------------------------------------------------------ the controller checks S3


def controller_args(mosquitto: Mosquitto, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "broker.cli", "controller", "run",
        "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("controller")),
        "--db-url", f"sqlite:///{tmp_path / 'c.db'}", "--metrics-port", "0", *extra,
    ]  # fmt: skip


def test_controller_refuses_to_start_without_s3(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Nothing answers at the S3 endpoint: after --s3-wait, one line and exit 1."""
    done = subprocess.run(
        controller_args(
            mosquitto, tmp_path, "--s3-endpoint", f"http://127.0.0.1:{free_port()}",
            "--s3-wait", "1s",
        ),
        env=os.environ | DEMO_CREDENTIALS,  # credentials present: only the endpoint is wrong
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: cannot reach S3 at http://127.0.0.1:")


def test_controller_without_s3_credentials_says_so(
    mosquitto: Mosquitto, s3_server: Any, tmp_path: Path
) -> None:
    """No AWS_* variables, no profile: exit 2 naming the variables to set, at start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run(
        controller_args(mosquitto, tmp_path, "--s3-endpoint", s3_server.endpoint),
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "error: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    )


def test_controller_creates_a_missing_bucket_when_asked(
    mosquitto: Mosquitto, s3_server: Any, tmp_path: Path
) -> None:
    """--create-bucket: the controller creates the bucket at start and runs."""
    bucket = f"created-{os.getpid()}-{free_port()}"
    args = controller_args(
        mosquitto, tmp_path, "--s3-endpoint", s3_server.endpoint, "--s3-bucket", bucket,
        "--create-bucket",
    )  # fmt: skip
    with subprocess.Popen(args, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        try:
            first = proc.stderr.readline()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert first == f"created bucket {bucket}\n"
    boto3.client("s3", endpoint_url=s3_server.endpoint).head_bucket(Bucket=bucket)


# ------------------------------------------------------------------ an operator's session


async def test_json_times_lists_upload_progress_and_watch(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> None:
    """A real session: a 9 MiB push reports upload progress on stderr while stdout stays
    JSON; `--json` lists give ISO 8601 UTC times and real lists; `--watch` shows per-stage
    progress to the end."""
    controller = ControllerProcess(mosquitto, s3, tmp_path, signing_keys)
    await controller.start()
    try:
        await controller.wait_connected()
        big = tmp_path / "big.tflite"
        big.write_bytes(build_dense_model(input_size=4, hidden=(1600, 1400), seed=1))
        assert big.stat().st_size > 8 * 2**20
        async with make_agents(mosquitto, tmp_path, signing_keys, [("cam-1", "eu", "camera")]):
            await devices_online(controller, 1)
            pushed = await controller.cli(
                "model", "push", str(big), "--name", "big", "--version", "1.0.0",
                "--device-type", "camera", "--json",
            )  # fmt: skip
            assert pushed.code == 0, pushed.err
            assert pushed.json()["deviceTypes"] == ["camera"]
            uploads = [x for x in pushed.err.splitlines() if x.startswith("uploading ")]
            assert len(uploads) >= 2 and uploads[-1].endswith("(100%)"), pushed.err

            started = await controller.cli(
                "rollout", "start", "--model", "big", "--version", "1.0.0", "--devices", "cam-1",
                "--device-timeout", "2m", "--json",
            )  # fmt: skip
            assert started.code == 0, started.err
            rollout_id = started.json()["rolloutId"]
            watched = await controller.cli("rollout", "status", rollout_id, "--watch")
            assert watched.code == 0, watched.err + watched.out
            assert "progress  all (1/1)" in watched.out
            assert "[####################] 1/1 devices done" in watched.out

            models = (await controller.cli("model", "list", "--json")).json()
            devices = (await controller.cli("device", "list", "--json")).json()
            rollouts = (await controller.cli("rollout", "list", "--json")).json()
    finally:
        await controller.terminate()
    assert models[0]["deviceTypes"] == ["camera"]
    times = [models[0]["createdAt"], devices[0]["lastSeen"]]
    times += [rollouts[0]["createdAt"], rollouts[0]["updatedAt"]]
    assert all(isinstance(t, str) and ISO_UTC.match(t) for t in times), times


async def test_watch_reads_a_retained_status_to_its_end(mosquitto: Mosquitto) -> None:
    """`rollout status --watch` on a finished rollout: its progress line, exit 0."""
    status = RolloutStatus(
        rollout_id="r-0123456789ab", model="clf", version="2", strategy="direct",
        status="Succeeded", devices_targeted=3, devices_updated=3, stage="all (1/1)",
    )  # fmt: skip
    async with make_client(mosquitto.endpoint("controller"), identifier="test-status") as client:
        await client.publish(
            topics.rollout_status(status.rollout_id), status.to_wire(), qos=1, retain=True
        )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "rollout", "status", status.rollout_id, "--watch",
        "--mqtt-url", mosquitto.url, "--credentials", str(mosquitto.credentials("operator")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert "progress  all (1/1)        [####################] 3/3 devices done" in out.decode()
