"""`hotswap rollout devices --state`: a state no device can be in is refused by the CLI
itself, before it connects; every state the controller lists devices by passes."""

from __future__ import annotations

from typer.testing import CliRunner

from broker.cli import app
from controller.cli import LISTED_STATES
from controller.progress import DEVICE_STATES
from controller.status import device_states

UNREACHABLE = ("--mqtt-url", "mqtt://127.0.0.1:1")


def test_an_unknown_state_is_one_error_line_before_connecting() -> None:
    done = CliRunner().invoke(app, ["rollout", "devices", "r-1", "--state", "bogus", *UNREACHABLE])
    assert done.exit_code == 2 and done.stdout == "", (done.stdout, done.stderr)
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: --state 'bogus'") and "rollback_failed" in line, line


def test_every_state_the_status_counts_can_be_listed() -> None:
    """The states a device passes through and those the status counts after a rollback
    all pass the CLI's check (and then reach for the broker, which is not there)."""
    counted = set(device_states({"activated": 2}, {"rolled_back": 1, "failed": 1}))
    assert set(DEVICE_STATES) | counted == set(LISTED_STATES)
    for state in LISTED_STATES:
        done = CliRunner().invoke(
            app, ["rollout", "devices", "r-1", "--state", state, *UNREACHABLE]
        )
        assert done.exit_code == 1, (state, done.stderr)
        assert done.stderr.startswith("error: cannot reach the MQTT broker"), done.stderr
