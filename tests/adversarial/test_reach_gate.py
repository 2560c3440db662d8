"""One reach gate for every action on a whole cgroup: the root cgroup, the agent's cgroup and a
cgroup whose subtree holds a protected process are refused by every cgroup-scope action, before
anything is written or signalled. Real v1 cgroups (and the cgroup2 ones) of the test's sandbox.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reuse_helpers import PARAMS, SLEEPER

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import CgroupDriver, detect
from remedy.actions.registry import ACTIONS
from remedy.engine.offender import Subject
from remedy.errors import ActionError
from remedy.proc import ProcessInfo, ProcFS
from testkit.launcher import in_cgroups
from testkit.sandbox import CgroupSandbox

pytestmark = pytest.mark.root
Pin = Callable[..., Subject]  # the conftest fixture: pin(pid, driver, cgroup)

GATED = (
    "quarantine",
    "throttle_cpu",
    "limit_pids",
    "freeze",
    "renice",
    "stop",
    "kill",
    "terminate",
)


class Box:
    """Sub-cgroups of the test's sandbox, in every hierarchy it lives in."""

    def __init__(self, sandbox: CgroupSandbox) -> None:
        self.sandbox = sandbox
        self.children: list[subprocess.Popen[bytes]] = []

    def mkdir(self, *names: str) -> str:
        for d in self.sandbox.dirs:
            d.joinpath(*names).mkdir(parents=True, exist_ok=True)
        return self.sandbox.rel + "/" + "/".join(names)

    def procs(self, rel: str) -> list[Path]:
        sub = rel.removeprefix(self.sandbox.rel).strip("/")
        return [d / sub / "cgroup.procs" for d in self.sandbox.dirs]

    def spawn_into(self, rel: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(in_cgroups(self.procs(rel), SLEEPER))
        self.children.append(child)
        deadline = time.monotonic() + 5
        # The wrapper joins each hierarchy in turn, then execs: wait for the last one.
        while str(child.pid) not in self.procs(rel)[-1].read_text().split():
            assert time.monotonic() < deadline, "child never joined its cgroup"
            time.sleep(0.01)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()
            child.wait(5)


@pytest.fixture
def box(test_cgroup: CgroupSandbox) -> Iterator[Box]:
    b = Box(test_cgroup)
    try:
        yield b
    finally:
        b.close()


def _ctx(driver: CgroupDriver, spare: set[int] = frozenset()) -> ActionContext:  # type: ignore[assignment]
    def why(info: ProcessInfo) -> str | None:
        return "protected by the test" if info.pid in spare else None

    return ActionContext(
        driver,
        ProcFS(),
        quarantine_root=f"/remedy-test-q-{os.getpid()}",
        scope="cgroup",
        spare=why,
    )


def _state(pid: int) -> tuple[str, str]:
    """Stopped, dead or up (R and S are one: the child may still be starting), and where."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    run = stat if stat in ("T", "t", "Z", "X") else "up"
    return run, Path(f"/proc/{pid}/cgroup").read_text()


def _knobs(rel: str, driver: CgroupDriver) -> dict[str, str]:
    return driver.read_knobs(rel, ("pids_max", "cpu_cores"))


class _Confined:
    """The host's driver, except that the root cgroup's members are only the test's own
    children: should the gate ever fail, nothing outside the test can be reached."""

    def __init__(self, real: CgroupDriver, members: list[int]) -> None:
        self._real = real
        self._members = members

    def members(self, rel: str) -> list[int]:
        return list(self._members) if rel == "/" else self._real.members(rel)

    def subtree_members(self, rel: str) -> list[int]:
        return list(self._members) if rel == "/" else self._real.subtree_members(rel)

    def kill_all(self, rel: str) -> bool:
        assert rel != "/", "cgroup.kill on the root cgroup"
        return self._real.kill_all(rel)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.mark.parametrize("action", GATED)
def test_cgroup_scope_on_the_root_cgroup_is_refused(pin: Pin, action: str, box: Box) -> None:
    child = box.spawn_into(box.mkdir("app"))
    real = detect()
    driver = _Confined(real, [child.pid])
    subject = pin(child.pid, real, "/")
    before = _state(child.pid)
    with pytest.raises(ActionError, match="root cgroup"):
        ACTIONS[action].run(PARAMS[action], subject, _ctx(driver))  # type: ignore[arg-type]
    assert child.poll() is None and _state(child.pid) == before


@pytest.mark.parametrize("action", GATED)
def test_cgroup_scope_on_the_agents_own_cgroup_is_refused(pin: Pin, action: str, box: Box) -> None:
    """The agent (this test process) shares the offender's cgroup."""
    rel = box.mkdir("app")
    child = box.spawn_into(rel)
    driver = detect()
    subject = pin(child.pid, driver, rel)
    home = {f: f.parent for f in box.procs(rel)}
    origins = Path("/proc/self/cgroup").read_text()
    for procs in home:
        procs.write_text(str(os.getpid()))
    try:
        knobs, before = _knobs(rel, driver), _state(child.pid)
        with pytest.raises(ActionError, match="the agent itself"):
            ACTIONS[action].run(PARAMS[action], subject, _ctx(driver))
        assert _knobs(rel, driver) == knobs
        assert child.poll() is None and _state(child.pid) == before
    finally:
        _go_home(origins)


def _go_home(cgroup_file: str) -> None:
    """Put this process back into the cgroups /proc/self/cgroup listed."""
    for line in cgroup_file.split("\n"):
        if not line:
            continue
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else ["unified"]
        for name in names:
            procs = Path("/sys/fs/cgroup") / name / path.lstrip("/") / "cgroup.procs"
            if name in ("pids", "cpu", "unified") and procs.exists():
                procs.write_text(str(os.getpid()))


@pytest.mark.parametrize("action", GATED)
def test_cgroup_scope_on_a_parent_of_a_protected_process_is_refused(
    pin: Pin, action: str, box: Box
) -> None:
    """A limit, a freeze or cgroup.kill on a cgroup reaches every cgroup below it: a
    protected process one level down must stop the action, not only a direct member."""
    rel = box.mkdir("app")
    child = box.spawn_into(rel)
    protected = box.spawn_into(box.mkdir("app", "inner"))
    driver = detect()
    subject = pin(child.pid, driver, rel)
    knobs = _knobs(rel, driver)
    before = _state(protected.pid), _state(child.pid)
    with pytest.raises(ActionError, match=f"protected pid {protected.pid}"):
        ACTIONS[action].run(PARAMS[action], subject, _ctx(driver, {protected.pid}))
    assert _knobs(rel, driver) == knobs
    assert protected.poll() is None and child.poll() is None
    assert (_state(protected.pid), _state(child.pid)) == before


def test_a_cgroup_replaced_since_identification_is_refused(pin: Pin, box: Box) -> None:
    rel = box.mkdir("app")
    driver = detect()
    child = box.spawn_into(rel)
    subject = pin(child.pid, driver, rel)
    # Same name, new directory: remove it (after moving the child out) and make it again.
    for procs in box.procs(rel):
        procs.parent.parent.joinpath("cgroup.procs").write_text(str(child.pid))
        procs.parent.rmdir()
    box.mkdir("app")
    for procs in box.procs(rel):
        procs.write_text(str(child.pid))
    with pytest.raises(ActionError, match="replaced since identification"):
        ACTIONS["throttle_cpu"].run(PARAMS["throttle_cpu"], subject, _ctx(driver))


def test_quarantine_in_place_never_recreates_a_removed_cgroup(pin: Pin, box: Box) -> None:
    rel = box.mkdir("app")
    driver = detect()
    child = box.spawn_into(rel)
    subject = pin(child.pid, driver, rel)
    for procs in box.procs(rel):
        procs.parent.parent.joinpath("cgroup.procs").write_text(str(child.pid))
        procs.parent.rmdir()
    with pytest.raises(ActionError):
        ACTIONS["quarantine"].run(PARAMS["quarantine"], subject, _ctx(driver))
    assert not any(p.parent.exists() for p in box.procs(rel))


def test_on_v1_a_same_named_cgroup_of_another_hierarchy_is_refused(pin: Pin, box: Box) -> None:
    """The offender's pids cgroup is …/app, its cpu cgroup …/elsewhere; …/app in the cpu
    hierarchy holds a bystander. A CPU cap in place would land on the bystander's cgroup."""
    driver = detect()
    if driver.version != 1:
        pytest.skip("v1 only: v2 has one hierarchy")
    rel = box.mkdir("app")
    bystander = box.spawn_into(rel)
    offender = box.spawn_into(rel)
    cpu_top = next(d for d in box.sandbox.dirs if d.parent.name == "cpu")
    elsewhere = cpu_top / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cgroup.procs").write_text(str(offender.pid))
    subject = pin(offender.pid, driver, rel)
    quota = (cpu_top / "app" / "cpu.cfs_quota_us").read_text()
    with pytest.raises(ActionError, match="in the cpu hierarchy its cgroup is"):
        ACTIONS["throttle_cpu"].run(PARAMS["throttle_cpu"], subject, _ctx(driver))
    assert (cpu_top / "app" / "cpu.cfs_quota_us").read_text() == quota
    assert bystander.poll() is None
