"""Command-line output shared by every `hotswap` command: errors, JSON and tables.

Errors become one line on stderr and a non-zero exit, never a traceback;
machine output (`--json`) goes to stdout alone. Writes to the terminal only.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shared.errors import HotswapError

T = TypeVar("T")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn the project's errors into one line on stderr and an exit code."""
    try:
        yield
    except HotswapError as exc:
        fail(str(exc), EXIT_BAD_INPUT if exc.reason in BAD_INPUT_REASONS else EXIT_FAILURE)
    except ValidationError as exc:  # a request model refused a flag's value
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        fail(f"{where}: {message}" if where else message, EXIT_BAD_INPUT)
    except ValueError as exc:  # invalid URLs, ids and values from our own validators
        fail(str(exc).splitlines()[-1].strip() or repr(exc), EXIT_BAD_INPUT)
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
    }
)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
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
