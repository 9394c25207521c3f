"""structlog configuration: events with bound context, console or JSON lines.

Writes to stderr only, so that `--json` command output on stdout stays clean.
Third-party libraries' stdlib logging (paho, aiomqtt, botocore) renders through
the same processors. With `json=True` and `native=True`, what native code prints
on file descriptor 2 (LiteRT's "Created TensorFlow Lite XNNPACK delegate" line:
LiteRT 2.x exports no call to silence its logger) is read from a pipe and logged
as `native_output` events, so that stderr is JSON lines and nothing else.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import TextIO

import structlog

from shared import console

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "info", *, json: bool = False, native: bool = False) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    if json and native:
        _capture_native_stderr()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    console.json_errors = json
    # Third-party libraries log through stdlib logging; keep them quiet unless debugging,
    # and render them like our own events (one JSON object per line under --log-json).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *_SHARED,
                structlog.stdlib.ExtraAdder(),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))


_captured: threading.Thread | None = None


def _capture_native_stderr() -> None:
    """Point fd 2 at a pipe whose lines become `native_output` events on the real stderr.

    Python's own writes (`sys.stderr`, structlog) go straight to the real stderr;
    only what bypasses Python (native libraries, subprocesses sharing fd 2) passes
    the pipe. Restored at exit, after the last line is logged.
    """
    global _captured
    if _captured is not None:
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    reader = os.fdopen(read_end, "r", encoding="utf-8", errors="replace")
    _captured = threading.Thread(
        target=_log_native_lines, args=(reader,), name="native-stderr", daemon=True
    )
    _captured.start()

    def restore() -> None:
        os.dup2(real, 2)  # closes the pipe's last write end: the reader sees EOF
        if _captured is not None:
            _captured.join(timeout=2.0)

    atexit.register(restore)


_LEVELS = {"INFO": "info", "WARNING": "warning", "ERROR": "error", "DEBUG": "debug"}


def _log_native_lines(reader: TextIO) -> None:
    log = structlog.get_logger("native")
    for raw in reader:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        prefix, sep, rest = line.partition(": ")
        level = _LEVELS.get(prefix.strip().upper()) if sep else None
        getattr(log, level or "warning")("native_output", line=rest if level else line)
