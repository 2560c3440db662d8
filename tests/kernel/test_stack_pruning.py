"""Stacks are read once and pruned (issue 11, item 4): the stack map and bcc's per-pid symbol
caches were never pruned, so the map filled (then no stack id could be had) and a symbol cache
stayed for every offender ever symbolized."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernel_helpers import Harness, start

from remedy.sensors.catalog import CATALOGUE, SignalSettings
from remedy.sensors.kernel import KernelSensor
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]


@pytest.fixture(scope="module")
def forks(bpf_ready: None) -> Iterator[Harness]:
    off = SignalSettings(window_s=1.0, threshold=1 << 40)  # armed, never crossing
    settings = {s.name: off for s in CATALOGUE}
    settings["fork_rate"] = SignalSettings(window_s=5.0, threshold=50)
    yield from start(KernelSensor(), settings)


def test_a_stack_read_is_deleted_from_the_map_and_its_symbol_cache_freed(
    forks: Harness, test_cgroup: CgroupSandbox
) -> None:
    from bcc import BPF  # noqa: PLC0415 - kernel tier only

    storm = forks.run(test_cgroup, "fork", "--count", "100", "--seconds", "10")
    [rec] = forks.of("fork_rate", storm)
    assert rec.kstack_id >= 0 and rec.ustack_id >= 0
    stacks = forks.sensor.table("stacks")
    assert any("clone" in f for f in forks.sensor.stack(rec.kstack_id))
    forks.sensor.stack(rec.ustack_id, user_pid=storm)
    with pytest.raises(KeyError):
        stacks[stacks.Key(rec.kstack_id)]
    with pytest.raises(KeyError):
        stacks[stacks.Key(rec.ustack_id)]
    assert storm not in BPF._sym_caches
    # Read again (a later record naming the same stack): nothing, and no error.
    assert forks.sensor.stack(rec.kstack_id) == []
