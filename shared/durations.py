"""Human-written durations for flags and settings: `90`, `30s`, `5m`, `1h` → seconds.

Pure: no I/O. Shared by the controller's and the agent's flags (the agent may not
import the controller).
"""

from __future__ import annotations

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """`90`, `30s`, `5m`, `1h` (or a number, in seconds) → seconds; ValueError otherwise."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        t = text.strip().lower()
        unit = _UNITS.get(t[-1:]) if t else None
        number = t[:-1] if unit else t
        try:
            value = float(number) * (unit or 1.0)
        except ValueError:
            raise ValueError(f"invalid duration {text!r}: use 90, 30s, 5m or 1h") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(f"invalid duration {text!r}: must be a finite number >= 0")
    return value
