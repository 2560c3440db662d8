"""Rate limiter edges and what a step can do to a process (the protector is exercised through
the engine tests and, for protection by executable, tests/unit/test_protection.py and
tests/adversarial/test_protection_live.py)."""

from __future__ import annotations

import pytest

from remedy.actions.params import (
    PARAMS,
    KillParams,
    LimitMemoryParams,
    NotifyParams,
    StopParams,
    TerminateParams,
)
from remedy.engine.guards import NEVER_ENDS, RateLimiter, changes_process, ends_process
from remedy.policy import Step


def test_sliding_window() -> None:
    rl = RateLimiter(max_actions=2, per_s=10.0)
    assert rl.allow(0.0)
    assert rl.allow(1.0)
    assert not rl.allow(2.0)
    assert rl.retry_in(2.0) == 8.0
    assert rl.allow(10.0)  # the first action left the window
    assert not rl.allow(10.5)
    assert rl.allow(11.0)


@pytest.mark.parametrize(
    ("step", "how"),
    [
        (Step("kill", KillParams()), "kill with SIGKILL"),
        (Step("kill", KillParams(signal="SIGTERM")), "kill with SIGTERM"),
        (Step("kill", KillParams(), scope="cgroup"), "kill with SIGKILL"),
        (Step("terminate", TerminateParams()), "terminate"),
        (Step("kill", KillParams(), kernel=True), "a kernel arm (kill at the next fork)"),
        (Step("stop", StopParams(), kernel=True), "a kernel arm (stop at the next fork)"),
        (Step("stop", StopParams()), None),
        (Step("limit_memory", LimitMemoryParams(high=1 << 30)), "limit_memory"),
        (Step("notify", NotifyParams()), None),
    ],
)
def test_what_ends_a_process(step: Step, how: str | None) -> None:
    assert ends_process(step) == how


def test_an_action_nobody_classified_is_taken_to_end_processes() -> None:
    # A new action is refused on degraded data until it is listed as one that never ends one.
    assert ends_process(Step("reboot", NotifyParams())) == "reboot"
    assert PARAMS.keys() > NEVER_ENDS
    # limit_memory sets a hard limit: below what the process uses, the kernel OOM-kills it.
    assert PARAMS.keys() - NEVER_ENDS == {"kill", "terminate", "limit_memory"}


def test_only_notify_changes_nothing() -> None:
    assert not changes_process(Step("notify", NotifyParams()))
    assert all(changes_process(Step(name, NotifyParams())) for name in PARAMS.keys() - {"notify"})
