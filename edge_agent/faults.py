"""Fault injection for the crash-safety tests: die at a named point of a deploy.

With `HOTSWAP_CRASH_AT=<point>` in its environment the agent process exits at
once (`os._exit`, no cleanup, like a power cut or SIGKILL) when it reaches that
point. Unset, each point costs one dictionary lookup per deploy stage.
"""

from __future__ import annotations

import os

CRASH_POINTS = ("downloaded", "verified", "stored", "swapped", "committed")
CRASH_EXIT_CODE = 86


def crash_point(name: str) -> None:
    if os.environ.get("HOTSWAP_CRASH_AT") == name:
        os._exit(CRASH_EXIT_CODE)
