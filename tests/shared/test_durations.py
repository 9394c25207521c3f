"""Durations as flags and settings write them: `300`, `30s`, `5m`, `1h`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.durations import parse_duration
from shared.settings import Settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), (" 2.5M ", 150.0), (90, 90.0)],
)
def test_durations_parse_to_seconds(text: str | float, seconds: float) -> None:
    """A bare number is seconds; s, m and h suffixes scale it; case and spaces do not matter."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "m", "5 min", "five", "-1s", "inf", "nan"])
def test_bad_durations_are_refused_naming_the_value(bad: str) -> None:
    """Anything else is a ValueError that quotes what was given."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


def test_download_budget_setting_reads_a_duration_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset it is 300 s; HOTSWAP_DOWNLOAD_BUDGET=90s is 90 s; zero is refused."""
    monkeypatch.delenv("HOTSWAP_DOWNLOAD_BUDGET", raising=False)
    assert Settings().download_budget == 300.0
    monkeypatch.setenv("HOTSWAP_DOWNLOAD_BUDGET", "90s")
    assert Settings().download_budget == 90.0
    monkeypatch.setenv("HOTSWAP_DOWNLOAD_BUDGET", "0")
    with pytest.raises(ValidationError):
        Settings()
