"""Rollout strategies: small functions of one shape, `(targets) -> stages`.

A strategy only decides which devices go in which stage; the planner decides
when a stage starts and ends. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    devices: tuple[str, ...]


Strategy = Callable[[Sequence[str]], list[Stage]]


def direct(targets: Sequence[str]) -> list[Stage]:
    """Every target at once, in one stage."""
    return [Stage("all", tuple(sorted(targets)))]


STRATEGIES: dict[str, Strategy] = {"direct": direct}
