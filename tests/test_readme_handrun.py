"""The README's "Running it by hand" block, run as written: it cannot rot unnoticed.

The block is taken from README.md and run by bash in a fresh directory, one
logical line after the other (continuations joined), stopping at the first that
fails, with only the ports moved: the block reads `MQTT_PORT`, `S3_PORT` and
`METRICS_PORT` if they are set, so parallel tests (and the system mosquitto on
1883) do not collide. Real processes throughout: moto's S3 server, mosquitto,
the controller, an agent with a real LiteRT interpreter, mosquitto_sub. Every
process the block starts is in one process group, stopped when the test ends,
whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.launcher import free_port

README = Path(__file__).resolve().parents[1] / "README.md"
LOGS = ("s3.log", "broker.log", "controller.log", "cam-1.log")
BASH = shutil.which("bash") or "/bin/bash"
RUN_LIMIT_S = 100.0  # far above a normal run: a loaded CI machine must not fail it


def handrun_block(readme: str) -> list[str]:
    """The logical lines of the first ```sh block under "## Running it by hand"."""
    section = readme.split("\n## Running it by hand\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no ```sh block under '## Running it by hand'"
    lines: list[str] = []
    pending = ""
    for raw in block.group(1).splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    assert not pending, "the block ends inside a continued line"
    return lines


def script_of(lines: list[str], trace: Path) -> str:
    """bash that runs `lines` in order, stops at the first failing one (`set -e`) and
    appends each line's index and start time to `trace` before running it."""
    out = ["set -e"]
    for i, line in enumerate(lines):
        out.append(f'printf "%s %s\\n" {i} "$(date +%s.%N)" >> {trace}')
        out.append(line)
    return "\n".join(out) + "\n"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int) -> None:
    """SIGTERM the block's process group, SIGKILL what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not group_alive(pgid):
            return
        os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def test_handrun_block_parses_into_commands() -> None:
    """The block is found and its continued lines join into whole commands."""
    lines = handrun_block(README.read_text())
    provision = next(x for x in lines if x.startswith("hotswap device provision"))
    assert "--credentials hotswap-data/broker/credentials/admin" in provision
    assert lines[-1].startswith("kill $(jobs -p)")


@pytest.mark.e2e
@pytest.mark.timeout(RUN_LIMIT_S + 20)
def test_readme_handrun_block_runs_as_written(tmp_path: Path) -> None:
    """Every line of the block exits 0 in a fresh directory; the rollout succeeds, the
    device serves the model, mosquitto_sub reads its state, the last line stops all."""
    lines = handrun_block(README.read_text())
    trace = tmp_path / "trace"
    script = tmp_path / "handrun.sh"
    script.write_text(script_of(lines, trace))
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(sys.prefix)  # the block's `$PWD/.venv/bin`
    # free_port() closes the port it found: two calls may well name the same one.
    picked: list[int] = []
    while len(picked) < 3:
        if (port := free_port()) not in picked:
            picked.append(port)
    ports = dict(zip(("MQTT_PORT", "S3_PORT", "METRICS_PORT"), picked, strict=True))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HOTSWAP_", "AWS_", "OTEL_"))  # a fresh user's shell
    }
    env |= {k: str(v) for k, v in ports.items()}
    output = tmp_path / "output"
    started = time.monotonic()
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [BASH, str(script)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: every process it starts
        )
    try:
        try:
            code = proc.wait(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            code = None
        seconds, ended = time.monotonic() - started, time.time()
        stopped_by_block = not group_alive(proc.pid)
        if code == 0 and not stopped_by_block:  # the last line's `wait` should see to it
            time.sleep(2.0)
            stopped_by_block = not group_alive(proc.pid)
    finally:
        stop_group(proc.pid)
    text = output.read_text(errors="replace")
    marks = trace.read_text().split() if trace.exists() else []
    ran = [(int(marks[i]), float(marks[i + 1])) for i in range(0, len(marks), 2)]
    timings = "\n".join(
        f"{(ran[j + 1][1] if j + 1 < len(ran) else ended) - t:6.1f}s  {lines[i]}"
        for j, (i, t) in enumerate(ran)
    )
    logs = "\n".join(
        f"--- {name}\n{(work / name).read_text(errors='replace')[-3000:]}"
        for name in LOGS
        if (work / name).exists()
    )
    where = f"stopped at: {lines[ran[-1][0]]}" if ran else "nothing ran"
    report = f"{where}\n--- timings\n{timings}\n--- output\n{text[-4000:]}\n{logs}"
    assert code == 0, f"exit {code} after {seconds:.1f}s; {report}"
    assert len(ran) == len(lines), report
    assert stopped_by_block, f"processes left running after the block's last line\n{report}"
    assert "status    Succeeded" in text, report
    assert re.search(r"cam-1\s+eu-west\s+camera\s+online\s+clf@1\.0\.0", text), report
    assert "hotswap/v1/devices/cam-1/state {" in text, report
    assert "revoked cam-1" in text, report
    print(f"README block: {len(lines)} lines in {seconds:.1f}s\n{timings}")
