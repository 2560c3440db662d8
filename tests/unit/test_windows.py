"""WindowCounter: the user-space twin of the kernel filter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remedy.windows.counting import WindowCounter


def test_crosses_once_per_window() -> None:
    w = WindowCounter(window_s=1.0, threshold=3)
    hits = [w.add(7, t) for t in (0.0, 0.1, 0.2, 0.3, 0.4)]
    assert hits == [False, False, True, False, False]
    assert w.count(7, 0.5) == 5


def test_a_new_window_starts_after_the_old_one_ends() -> None:
    w = WindowCounter(window_s=1.0, threshold=2)
    assert [w.add(1, t) for t in (0.0, 0.5)] == [False, True]
    assert [w.add(1, t) for t in (1.0, 1.2)] == [False, True]
    assert w.started(1) == 1.0
    assert w.count(1, 5.0) == 0


def test_keys_are_independent_and_bounded() -> None:
    w = WindowCounter(window_s=10.0, threshold=2, max_keys=2)
    w.add(1, 0.0)
    w.add(2, 0.0)
    w.add(3, 0.0)  # evicts key 1, the least recently used
    assert w.evicted == 1
    assert w.started(1) is None
    assert w.add(2, 0.1) is True


@pytest.mark.parametrize(("window", "threshold"), [(0.0, 1), (1.0, 0), (-1.0, 5)])
def test_rejects_nonsense(window: float, threshold: int) -> None:
    with pytest.raises(ValueError):
        WindowCounter(window, threshold)


@given(st.lists(st.floats(min_value=0, max_value=0.999), min_size=1, max_size=300))
def test_at_most_one_crossing_in_a_single_window(offsets: list[float]) -> None:
    w = WindowCounter(window_s=1.0, threshold=5)
    crossings = sum(w.add(1, t) for t in sorted(offsets))
    assert crossings == (1 if len(offsets) >= 5 else 0)
