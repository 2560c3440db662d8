"""The start-up self-test names what would make enforcement fail."""

from __future__ import annotations

from dataclasses import replace

from test_engine import PLAYBOOK, POLICY

from remedy.actions.cgroups import Limits
from remedy.errors import CgroupError
from remedy.policy import PolicySet
from remedy.service.selftest import enforcement_problems, enforcing, probe_limits


class Driver:
    """Records what the probe does; fails where told to."""

    def __init__(self, fail_create: bool = False) -> None:
        self.fail_create = fail_create
        self.created: list[tuple[str, Limits]] = []
        self.removed: list[str] = []
        self.existing = {"/remedy"}

    def exists(self, rel: str) -> bool:
        return rel in self.existing

    def create(self, rel: str, limits: Limits) -> None:
        if self.fail_create:
            raise CgroupError("mkdir: read-only file system", cgroup=rel)
        self.created.append((rel, limits))

    def remove(self, rel: str) -> None:
        self.removed.append(rel)


def test_a_healthy_host_has_no_problems_and_the_probe_is_removed() -> None:
    driver = Driver()
    policies = PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK})
    assert enforcement_problems(driver, "/remedy", policies) == []  # type: ignore[arg-type]
    [(rel, limits)] = driver.created
    assert rel.startswith("/remedy/selftest-") and driver.removed == [rel]
    assert limits.pids_max and limits.memory_high is None


def test_a_quarantine_root_the_probe_created_is_removed_with_it() -> None:
    driver = Driver()
    driver.existing = set()
    policies = PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK})
    assert enforcement_problems(driver, "/remedy", policies) == []  # type: ignore[arg-type]
    assert driver.removed == ["/remedy"]


def test_a_cgroup_that_cannot_be_written_is_named() -> None:
    policies = PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK})
    problems = enforcement_problems(Driver(fail_create=True), "/remedy", policies)  # type: ignore[arg-type]
    assert problems and "cannot create and limit a cgroup under /remedy" in problems[0]


def test_enforcing_means_some_policy_may_act() -> None:
    policies = PolicySet((POLICY,), {PLAYBOOK.name: PLAYBOOK})
    assert enforcing(policies, dry_run=False)
    assert not enforcing(policies, dry_run=True)
    monitor = PolicySet((replace(POLICY, dry_run=True),), {PLAYBOOK.name: PLAYBOOK})
    assert not enforcing(monitor, dry_run=False)
    assert probe_limits(policies).frozen is None
