"""Command-line output shared by every `hotswap` command: errors, JSON and tables.

Errors become one line on stderr and a non-zero exit, never a traceback;
machine output (`--json`) goes to stdout alone. Writes to the terminal only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer._click.globals import get_current_context  # typer vendors click: no public alias
from typer.core import TyperGroup

from shared.durations import parse_duration
from shared.errors import HotswapError
from shared.settings import env_errors

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


# Set by `shared.logs.configure_logging(json=True)`: errors then go out as JSON events too,
# so that a service's stderr stays one JSON object per line.
json_errors = False


def error_line(message: str) -> None:
    """The one stderr line every failure prints: `error: …` (a JSON event under --log-json)."""
    one_line = " ".join(message.split())
    if json_errors:
        event = {"event": "error", "level": "error", "error": one_line}
        event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = json.dumps(event)
    else:
        line = f"error: {one_line}"
    print(line, file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    error_line(message)
    raise typer.Exit(code)


def _flag_of(loc: Sequence[int | str]) -> str | None:
    """The command-line flag that fed the pydantic field at `loc`, if the running command
    has one: `device_timeout_s` is `--device-timeout`, `gates.min_samples` `--min-samples`."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return None
    by_name = {p.name: p for p in ctx.command.params if p.name}
    for part in reversed([str(x) for x in loc]):
        for name in (part, part.removesuffix("_s"), part.removesuffix("_ms")):
            param = by_name.get(name)
            if param is not None:
                long = [o for o in param.opts if o.startswith("--")]
                return (long or param.opts or [name])[0]
    return None


def _with_flag(message: str) -> str:
    """`message` led by the flag whose value it quotes, when it names no flag itself and
    exactly one option's value stands in it as a whole word: `invalid device id 'a b'`
    is `--device-id: invalid device id 'a b'`, `/x: No such file …` `--dir: /x: …`."""
    ctx = get_current_context(silent=True)
    if ctx is None or re.search(r"(?<![\w-])--[a-z]", message):
        return message
    named = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        values = value if isinstance(value, list | tuple) else [value]
        texts = [str(v) for v in values if isinstance(v, str | Path) and len(str(v)) >= 2]
        longs = [o for o in param.opts if o.startswith("--")]
        if longs and any(
            re.search(rf"(?<![\w./-]){re.escape(t)}(?![\w/-])", message) for t in texts
        ):
            named.append(longs[0])
    return f"{named[0]}: {message}" if len(named) == 1 else message


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn the project's errors into one line on stderr and an exit code; a refused
    value's line leads with its flag."""
    try:
        yield
    except HotswapError as exc:
        if exc.reason in BAD_INPUT_REASONS:
            fail(_with_flag(str(exc)), EXIT_BAD_INPUT)
        fail(str(exc), EXIT_FAILURE)
    except ValidationError as exc:  # a request model refused a flag's value
        first = exc.errors()[0]
        where = _flag_of(first["loc"]) or ".".join(str(x) for x in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        fail(f"{where}: {message}" if where else message, EXIT_BAD_INPUT)
    except ValueError as exc:  # invalid URLs, ids and values from our own validators
        fail(_with_flag(str(exc).splitlines()[-1].strip() or repr(exc)), EXIT_BAD_INPUT)
    except OSError as exc:  # a path given on the command line: missing, not writable, …
        if exc.filename is None:
            fail(exc.strerror or str(exc))
        fail(_with_flag(f"{exc.filename}: {exc.strerror or exc}"), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted", 130)


# Reasons that mean "you asked for something wrong", as opposed to "something is down".
BAD_INPUT_REASONS = frozenset(
    {
        "bad_request",
        "bad_key",
        "bad_file",
        "not_a_model",
        "unknown_model",
        "unknown_device",
        "unknown_rollout",
        "no_targets",
        "incompatible_device",
        "manifest_invalid",
        "bad_credentials",
        "not_authorized",
        "rollout_conflict",
        "no_bucket",
    }
)


def iso_time(value: datetime | float | str | None) -> str | None:
    """A time as every `--json` output writes it: ISO 8601 in UTC (`…Z`); epoch seconds
    (floats on the wire) and aware datetimes alike; None stays None."""
    if value is None or isinstance(value, str):
        return value
    when = (
        datetime.fromtimestamp(value, UTC)
        if isinstance(value, int | float)
        else value.astimezone(UTC)
    )
    return when.isoformat().replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, date | Path):
        return str(value)
    return str(value)


def with_iso_times(
    row: Mapping[str, Any], times: Iterable[str], lists: Iterable[str] = ()
) -> dict[str, Any]:
    """`row` with its `times` fields as ISO 8601 UTC and its comma-separated `lists` fields
    as real lists (`""` is `[]`): how a controller's wire rows go out under `--json`."""
    out = dict(row)
    for key in times:
        if key in out:
            out[key] = iso_time(out[key])
    for key in lists:
        if isinstance(out.get(key), str):
            out[key] = [x for x in out[key].split(",") if x]
    return out


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n")
    sys.stdout.flush()


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """A table of `rows` with (header, key) `columns`; a plain line when empty."""
    console = Console(soft_wrap=True)
    if not rows:
        console.print("(none)")
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for header, _ in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*("" if row.get(k) is None else str(row.get(k)) for _, k in columns))
    console.print(table)


def progress(message: str) -> None:
    """A progress line for people, on stderr so stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


def announce(as_json: bool, event: str, text: str, **facts: Any) -> None:
    """A service's start-up line: `text` for people on stderr, or under --log-json the
    same as a log event `event` with `facts`, so that stderr stays JSON lines."""
    if as_json:
        structlog.get_logger().info(event, **facts)
    else:
        progress(text)


def parse_duration_flag(text: str) -> float:
    """typer's parser for every duration flag: `90`, `30s`, `5m`, `1h` → seconds."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def duration_option(
    *names: str, help: str, envvar: str | None = None, at_least: float = 0.0
) -> Any:
    """A typer option that takes a duration (`90`, `30s`, `5m`, `1h`) and gives seconds;
    below `at_least` seconds is refused while parsing, like any bad value."""

    def parse(text: str) -> float:
        seconds = parse_duration_flag(text)
        if seconds < at_least:
            raise typer.BadParameter(f"{text!r} is below {at_least:g}s")
        return seconds

    return typer.Option(*names, parser=parse, metavar="DURATION", envvar=envvar, help=help)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


LogLevel = Annotated[
    str,
    typer.Option(
        "--log-level",
        envvar="HOTSWAP_LOG_LEVEL",
        parser=_log_level,
        metavar="LEVEL",
        help="debug, info, warning or error",
    ),
]
LogJson = Annotated[
    bool,
    typer.Option(
        "--log-json", envvar="HOTSWAP_LOG_JSON", help="logs as JSON lines on stderr, nothing else"
    ),
]


class OneLineErrors(TyperGroup):
    """The root `hotswap` group: every usage error, refused value and unexpected exception
    ends as one `error: …` line on stderr and an exit code, never a box or a traceback."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        global json_errors
        json_errors = False  # until this run's --log-json says otherwise
        if env_errors:  # a HOTSWAP_* variable that does not parse: before anything runs
            _json_if_asked(sys.argv[1:] if args is None else args)
            error_line(env_errors[0])
            sys.exit(EXIT_BAD_INPUT)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors, refused values
            if type(exc).__name__ == "NoArgsIsHelpError":  # `hotswap model`: the help
                print(exc.format_message(), file=sys.stderr)
            else:
                _json_if_asked(sys.argv[1:] if args is None else args)
                error_line(_usage_message(exc.format_message()))
            sys.exit(exc.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(EXIT_FAILURE)
        except Exception as exc:  # a bug: still one line; the traceback on request
            if os.environ.get("HOTSWAP_DEBUG"):
                traceback.print_exc()
            error_line(
                f"internal error: {type(exc).__name__}: {exc} "
                "(HOTSWAP_DEBUG=1 prints the traceback)"
            )
            sys.exit(EXIT_FAILURE)
        sys.exit(code if isinstance(code, int) else 0)


def _json_if_asked(args: Sequence[str]) -> None:
    """A service asked for JSON logs: even a flag refused before it starts is a JSON line."""
    global json_errors
    env = os.environ.get("HOTSWAP_LOG_JSON", "").strip().lower()
    json_errors = json_errors or "--log-json" in args or env in ("1", "true", "yes", "on")


_MISSING = re.compile(r"^Missing (option|argument) '([^']+)'(?: \(env var: '([^']+)'\))?")
_INVALID = re.compile(r"^Invalid value for '([^']+)'(?: \(env var: '([^']+)'\))?: (.*)$", re.S)


def _usage_message(message: str) -> str:
    """click's message in the project's voice: `Invalid value for '--x': …` is `--x: …`."""
    invalid = _INVALID.match(message)
    if invalid:
        flag, env, why = invalid.groups()
        return f"{flag} ({env}): {why}" if env else f"{flag}: {why}"
    missing = _MISSING.match(message)
    if missing:
        kind, name, env = missing.groups()
        if kind == "argument":
            return f"missing argument {name.upper()}"
        return f"missing {name}" + (f" (or {env})" if env else "")
    return message[:1].lower() + message[1:]


RECANCEL_S = 3.0


def run_until_signalled(main: Coroutine[Any, Any, T]) -> T | None:
    """Run a long-lived coroutine; SIGINT/SIGTERM cancel it and return None.

    The cancellation is repeated every few seconds until the coroutine ends: on
    Python 3.11 `asyncio.wait_for` (inside aiomqtt) can swallow one.
    """

    async def runner() -> T | None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        signalled = False

        def stop() -> None:
            nonlocal signalled
            signalled = True
            if not task.done():
                task.cancel()
                loop.call_later(RECANCEL_S, stop)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            return await task
        except asyncio.CancelledError:
            if not signalled:  # never a silent exit 0 for a stop nobody asked for
                raise HotswapError("stopped unexpectedly: cancelled without a signal") from None
            return None

    return asyncio.run(runner())
