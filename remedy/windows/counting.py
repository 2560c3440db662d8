"""User-space fixed windows per key: the naive baseline for the kernel filter, and a building block
for conditions that must hold over time.

Same semantics as the kernel: a key's window opens at its first event and lasts ``window_s``; the
event that makes the count reach ``threshold`` returns True, exactly once per window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Window:
    start: float
    count: int
    crossed: bool = False


class WindowCounter:
    """Counts events per key in fixed windows, bounded like an LRU map."""

    def __init__(self, window_s: float, threshold: int, max_keys: int = 16384) -> None:
        if window_s <= 0 or threshold < 1 or max_keys < 1:
            raise ValueError("window_s > 0, threshold >= 1 and max_keys >= 1 are required")
        self.window_s = window_s
        self.threshold = threshold
        self.max_keys = max_keys
        self.evicted = 0
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def add(self, key: Hashable, now: float, amount: int = 1) -> bool:
        """Count ``amount``; True exactly when this event makes the window reach the threshold."""
        w = self._windows.get(key)
        if w is None or now - w.start >= self.window_s:
            w = _Window(start=now, count=0)
            self._windows[key] = w
            if len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
                self.evicted += 1
        self._windows.move_to_end(key)
        w.count += amount
        if w.crossed or w.count < self.threshold:
            return False
        w.crossed = True  # signed amounts may dip and rise again: still once per window
        return True

    def count(self, key: Hashable, now: float) -> int:
        """Events of ``key`` in its current window (0 if the window expired)."""
        w = self._windows.get(key)
        if w is None or now - w.start >= self.window_s:
            return 0
        return w.count

    def started(self, key: Hashable) -> float | None:
        w = self._windows.get(key)
        return None if w is None else w.start
