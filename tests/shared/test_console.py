"""CLI output: errors as one stderr line and an exit code, JSON alone on stdout, tables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, field_validator

from shared.console import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    cli_errors,
    emit_json,
    print_table,
    progress,
    run_until_signalled,
)
from shared.credentials import CredentialsError
from shared.errors import BrokerError, RequestError


class Flags(BaseModel):
    percent: float

    @field_validator("percent")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0 <= value <= 100:
            raise ValueError("must be between 0 and 100")
        return value


def exit_code_of(exc: BaseException, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(typer.Exit) as raised, cli_errors():
        raise exc
    out, err = capsys.readouterr()
    return raised.value.exit_code, out, err


def test_bad_input_errors_exit_2_and_outages_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad_request reason exits 2, broker_unavailable exits 1; each is one stderr line."""
    code, out, err = exit_code_of(RequestError("unknown rollout r-9"), capsys)
    assert (code, out, err) == (EXIT_BAD_INPUT, "", "error: unknown rollout r-9\n")
    code, out, err = exit_code_of(BrokerError("mosquitto is not installed"), capsys)
    assert (code, out, err) == (EXIT_FAILURE, "", "error: mosquitto is not installed\n")


def test_refused_or_missing_credentials_are_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """The broker refusing who we are, or a broken credentials dir, exit 2 (fix the input)."""
    refused = BrokerError("the MQTT broker refused 'x'", reason="not_authorized")
    assert exit_code_of(refused, capsys)[0] == EXIT_BAD_INPUT
    assert exit_code_of(CredentialsError("mqtt.json is missing"), capsys)[0] == EXIT_BAD_INPUT


def test_validation_errors_name_the_field_without_pydantic_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refused flag value prints `field: message`, without the 'Value error, ' prefix."""
    with pytest.raises(typer.Exit) as raised, cli_errors():
        Flags(percent=150)
    assert raised.value.exit_code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: percent: must be between 0 and 100\n"


def test_value_errors_keep_their_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A multi-line ValueError is reduced to its last, most specific line, exit 2."""
    code, _, err = exit_code_of(ValueError("while parsing\n  invalid MQTT URL 'x'"), capsys)
    assert (code, err) == (EXIT_BAD_INPUT, "error: invalid MQTT URL 'x'\n")


def test_unexpected_errors_are_not_swallowed() -> None:
    """Only the project's and validation errors become exit codes; bugs keep their traceback."""
    with pytest.raises(ZeroDivisionError), cli_errors():
        _ = 1 / 0


def test_json_goes_to_stdout_alone_sorted_and_serialisable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """emit_json writes parseable JSON with sorted keys; paths become strings, times
    ISO 8601 in UTC (the one time format of every `--json` output)."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    emit_json({"b": 1, "a": Path("/keys/signing.pub"), "at": when})
    out, err = capsys.readouterr()
    assert err == ""
    assert json.loads(out) == {"a": "/keys/signing.pub", "at": "2026-01-02T03:04:05Z", "b": 1}
    assert out.index('"a"') < out.index('"at"') < out.index('"b"')


def test_tables_show_headers_blank_nones_and_say_none_when_empty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Columns are (header, key); a missing or None value is blank; no rows print (none)."""
    rows = [{"id": "cam-1", "model": "clf@1.0.0"}, {"id": "gw-1", "model": None}]
    print_table(rows, [("DEVICE", "id"), ("MODEL", "model")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE", "MODEL"]
    assert lines[1].split() == ["cam-1", "clf@1.0.0"]
    assert lines[2].split() == ["gw-1"]
    print_table([], [("DEVICE", "id")])
    assert capsys.readouterr().out == "(none)\n"


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """Progress lines never pollute stdout, which --json output owns."""
    progress("mosquitto listening")
    assert capsys.readouterr() == ("", "mosquitto listening\n")


def test_run_until_signalled_returns_the_result_or_none_on_sigterm() -> None:
    """A finished coroutine's value is returned; SIGTERM cancels a running one and gives None."""

    async def answer() -> int:
        return 42

    async def forever() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)
        return 0

    assert run_until_signalled(answer()) == 42
    assert run_until_signalled(forever()) is None
