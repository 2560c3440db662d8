"""Durations as written in policy files: ``"500ms"``, ``"1s"``, ``"2.5s"``, ``"1m"``, ``"1h"`` or a
plain number of seconds."""

from __future__ import annotations

import math
import re

__all__ = ["UNITS", "parse_duration"]

#: Seconds per unit suffix. Deliberately few: "d" or "us" would invite windows the kernel filter
#: and the engine were never meant for, and a typo should fail loudly, not pick a surprising unit.
UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# The pattern accepts a sign only so that "-1s" is reported as negative, not as "not a duration".
_DURATION = re.compile(r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[a-z]*)")


def parse_duration(text: str | float) -> float:
    """Return the duration ``text`` denotes, in seconds.

    ``text`` is a number of seconds (``5``, ``0.5``, ``"5"``) or a number followed by one of the
    units in :data:`UNITS` (``"500ms"``, ``"2.5s"``, ``"1m"``, ``"1h"``). Zero is allowed; callers
    that need a positive duration check that themselves.

    Raises ``ValueError`` for anything else: unknown units, negative, NaN or infinite values, and
    booleans (YAML turns ``yes`` into ``True``, which must not silently mean one second).
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like '1s' or '500ms', got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        match = _DURATION.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"expected a duration like '1s' or '500ms', got {text!r}")
        unit = match["unit"] or "s"
        if unit not in UNITS:
            known = ", ".join(UNITS)
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}; use one of {known}")
        seconds = float(match["number"]) * UNITS[unit]
    else:
        raise ValueError(f"expected a duration like '1s' or '500ms', got {type(text).__name__}")
    # "1e999" or a huge number of hours overflows to inf; nan never compares, so both would break
    # every window and cooldown comparison downstream.
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is not finite")
    if seconds < 0:
        raise ValueError(f"duration {text!r} is negative")
    return seconds
