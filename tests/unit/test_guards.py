"""Rate limiter edges (the protector is exercised through the engine tests)."""

from __future__ import annotations

from remedy.engine.guards import RateLimiter


def test_sliding_window() -> None:
    rl = RateLimiter(max_actions=2, per_s=10.0)
    assert rl.allow(0.0)
    assert rl.allow(1.0)
    assert not rl.allow(2.0)
    assert rl.retry_in(2.0) == 8.0
    assert rl.allow(10.0)  # the first action left the window
    assert not rl.allow(10.5)
    assert rl.allow(11.0)
