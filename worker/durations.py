"""Parsing of human durations: 90, 1.5, "90s", "15m", "2h", "1h30m"."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Return seconds for a number or a string such as "90s", "15m", "2h", "1h30m".

    Raises ValueError with a readable message for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected seconds or a string like '90s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"expected seconds or a string like '90s', '15m', '2h', got {value!r}"
                ) from None
    else:
        raise ValueError(f"expected seconds or a string like '90s', got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds
