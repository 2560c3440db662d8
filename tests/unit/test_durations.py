"""parse_duration: the units policy files may use, and everything it must refuse."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remedy.policy.durations import UNITS, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("2.5s", 2.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        (" 3 s ", 3.0),
        ("0s", 0.0),
        ("5", 5.0),
        (".5s", 0.5),
        (5, 5.0),
        (0.25, 0.25),
    ],
)
def test_parses(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "1 d", "1us", "1S", "1e3", "one second", "1s2", "1..5s", "nan", "inf", "1_000s"],
)
def test_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|unit"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-1s", "-0.5", -1, -0.001])
def test_rejects_negative(text: str | float) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(text)


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, [1], None])
def test_rejects_non_durations(value: object) -> None:
    # YAML turns `yes` into True: it must not quietly mean one second.
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


def test_overflow_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration("1" + "0" * 400 + "h")


@given(st.floats(min_value=0, max_value=1e9), st.sampled_from(sorted(UNITS)))
def test_round_trips_every_unit(number: float, unit: str) -> None:
    # Written as a decimal: exponents ("1e-3s") are deliberately not part of the format.
    text = f"{number:.6f}{unit}"
    assert parse_duration(text) == pytest.approx(float(f"{number:.6f}") * UNITS[unit])


@given(st.text(max_size=20))
def test_only_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds)
    assert seconds >= 0
