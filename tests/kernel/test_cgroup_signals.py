"""Cgroup signals mean a cgroup (issue 10, item 9), on the real kernel and real cgroups.

This host is hybrid: v1 controllers under /sys/fs/cgroup/<ctrl>, a cgroup2 without controllers
at /sys/fs/cgroup/unified where every process sits in the root. Workloads here join only the
v1 hierarchies of their sandbox (pids-limited, made by the test), as processes do on such hosts,
so cgroup2's id is "/" for all of them: keyed by it, fork_rate_cgroup would count the whole host
as one cgroup and blame whichever process crossed. Keyed by the pids css, each sandbox is its
own key, equal to the inode of its pids directory, and resolves to its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import STORM, Harness, cgroup_key, start

from remedy.actions.base import ActionContext
from remedy.actions.cgroups import detect
from remedy.actions.params import QuarantineParams
from remedy.actions.quarantine import Quarantine
from remedy.proc import ProcFS
from remedy.sensors.catalog import SignalSettings
from remedy.sensors.context import Enricher, ParentChain
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.kernel import KernelSensor
from remedy.sensors.records import SensorRecord
from testkit.launcher import AgentProcess, in_cgroups
from testkit.sandbox import CGROUP_ROOT, CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

OFF = SignalSettings(window_s=1.0, threshold=1 << 40)  # armed, never crossing
CGROUP_SIGNALS = ("fork_rate_cgroup", "exec_rate_cgroup")


@pytest.fixture(scope="module")
def keyed(bpf_ready: None) -> Iterator[Harness]:
    """The sensor as the agent builds it: keys from the hierarchy this host acts through."""
    yield from start(KernelSensor(), {"fork_rate": OFF, **dict.fromkeys(CGROUP_SIGNALS, OFF)})


@pytest.fixture
def bystander() -> Iterator[CgroupSandbox]:
    box = CgroupSandbox(f"remedy-test-{uuid.uuid4().hex[:12]}")
    try:
        yield box
    finally:
        box.cleanup()


def spawn_v1(box: CgroupSandbox, *args: str, hierarchies: tuple[str, ...] = ()) -> int:
    """storm.py in ``box``'s v1 directories only (all of them, or those named): cgroup2 sees it
    in its root, as it sees every process on this host."""
    files = [
        d / "cgroup.procs"
        for d in box.dirs
        if d.parent.name != "unified" and (not hierarchies or d.parent.name in hierarchies)
    ]
    proc = subprocess.Popen(in_cgroups(files, [sys.executable, str(STORM), *args]))
    box.procs.append(proc)  # the sandbox's cleanup kills and reaps it
    return proc.pid


def wait(h: Harness, box: CgroupSandbox, *others: CgroupSandbox, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    procs = [p for b in (box, *others) for p in b.procs]
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        h.sensor.poll(50)
    assert all(p.wait(1) == 0 for p in procs)
    h.drain()


def cgroup_records(h: Harness, signal: str = "fork_rate_cgroup") -> list[SensorRecord]:
    return [r for r in h.records if r.signal == signal]


def identifier() -> ProcIdentifier:
    procfs = ProcFS()
    cgroups = detect()
    enricher = Enricher(procfs, None, ParentChain(procfs), proc_cgroup=cgroups.cgroup_of)
    return ProcIdentifier(procfs, cgroups, enricher)


def test_keys_come_from_the_hierarchy_actions_act_through(keyed: Harness) -> None:
    # Here (hybrid, cgroup2 without controllers) that is the pids hierarchy.
    assert keyed.sensor.cgroup_keys == ("cgroup2" if detect().version == 2 else "pids")


def keyed_root(sensor: KernelSensor) -> Path:
    return CGROUP_ROOT if sensor.cgroup_keys == "cgroup2" else CGROUP_ROOT / sensor.cgroup_keys


def test_a_fanout_storm_is_its_cgroup_and_a_slow_forker_elsewhere_is_never_named(
    keyed: Harness, test_cgroup: CgroupSandbox, bystander: CgroupSandbox
) -> None:
    per_window = SignalSettings(window_s=5.0, threshold=150)
    keyed.configure(fork_rate=per_window, fork_rate_cgroup=per_window)
    slow = spawn_v1(bystander, "fork", "--count", "40", "--seconds", "8", "--rate", "10")
    storm = spawn_v1(test_cgroup, "fanout", "--count", "100", "--seconds", "10")  # 200 forks
    wait(keyed, test_cgroup, bystander)

    bomb, quiet = cgroup_key(keyed.sensor, test_cgroup), cgroup_key(keyed.sensor, bystander)
    assert bomb == os.stat(test_cgroup.pids_dir).st_ino  # kn->id is the directory's inode
    records = cgroup_records(keyed)
    assert [r.key for r in records].count(bomb) == 1, [(r.key, r.tgid) for r in records]
    assert quiet not in {r.key for r in records}
    assert os.stat(keyed_root(keyed.sensor)).st_ino not in {r.key for r in records}
    [rec] = [r for r in records if r.key == bomb]
    assert rec.count == 150
    assert not [r for r in keyed.records if r.signal == "fork_rate" and r.tgid >= storm]

    subject = identifier().identify(rec)
    assert subject.is_cgroup and subject.pid == 0
    assert (subject.cgroup, subject.cgroup_inode) == (test_cgroup.rel, bomb)
    assert subject.cgroup_display == str(test_cgroup.pids_dir)
    assert subject.context is not None and subject.context.cgroup_path == test_cgroup.rel
    assert slow not in (subject.pid, rec.tgid)

    # The offender is usable by a scope-cgroup action: capped in place, the bystander untouched.
    ctx = ActionContext(detect(), ProcFS(), f"{test_cgroup.rel}/q", scope="cgroup")
    Quarantine().run(QuarantineParams(pids_max=32, cpu=0.2), subject, ctx)
    assert (test_cgroup.pids_dir / "pids.max").read_text().strip() == "32"
    assert (bystander.pids_dir / "pids.max").read_text().strip() == "256"


def test_exec_storms_are_counted_per_pids_cgroup(
    keyed: Harness, test_cgroup: CgroupSandbox
) -> None:
    keyed.configure(exec_rate_cgroup=SignalSettings(window_s=5.0, threshold=60))
    spawn_v1(test_cgroup, "exec", "--count", "80", "--seconds", "10")
    wait(keyed, test_cgroup)
    [rec] = [
        r
        for r in cgroup_records(keyed, "exec_rate_cgroup")
        if r.key == cgroup_key(keyed.sensor, test_cgroup)
    ]
    assert rec.count == 60
    # The crossing child exec'd `true` and is gone: the cgroup is the offender all the same.
    assert identifier().identify(rec).cgroup == test_cgroup.rel


def test_the_hierarchy_root_is_never_a_key(bpf_ready: None, test_cgroup: CgroupSandbox) -> None:
    """Keyed by the cpu hierarchy, a storm that joins only its sandbox's pids directory (it is
    bounded there) runs in the cpu hierarchy's root: counted as a root event, never windowed,
    so no record can blame a process for the whole host's forks."""
    settings = {"fork_rate": OFF, "fork_rate_cgroup": SignalSettings(window_s=5.0, threshold=100)}
    gen = start(KernelSensor(cgroup_keys="cpu"), settings)
    h = next(gen)
    try:
        before = h.sensor.cgroup_key_counters()["root"]
        spawn_v1(test_cgroup, "fanout", "--count", "100", "--seconds", "10", hierarchies=("pids",))
        wait(h, test_cgroup)
        assert h.sensor.cgroup_key_counters()["root"] - before >= 200
        cpu_root = os.stat(CGROUP_ROOT / "cpu").st_ino
        assert cpu_root not in {r.key for r in cgroup_records(h)}
    finally:
        next(gen, None)  # the harness closes the sensor


def test_cgroup2_keys_are_the_cgroup2_id(bpf_ready: None, test_cgroup: CgroupSandbox) -> None:
    """Pure cgroup2 hosts keep bpf_get_current_cgroup_id(): the same program keyed that way,
    with the sandbox joining its cgroup2 directory too."""
    assert test_cgroup.has_cgroup_id
    settings = {"fork_rate": OFF, "fork_rate_cgroup": SignalSettings(window_s=5.0, threshold=100)}
    gen = start(KernelSensor(cgroup_keys="cgroup2"), settings)
    h = next(gen)
    try:
        h.run(test_cgroup, "fanout", "--count", "100", "--seconds", "10")
        [rec] = [r for r in cgroup_records(h) if r.key == test_cgroup.cgroup_id]
        assert rec.count == 100
        assert Path("/sys/fs/cgroup/unified").stat().st_ino not in {r.key for r in h.records}
    finally:
        next(gen, None)  # the harness closes the sensor


# -- end to end: the real agent ---------------------------------------------------------------

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-bomb-cgroup
signal: fork_rate_cgroup
threshold: 200
window: 1s
match:
  cgroups: ["{storm}", "{bystander}"]
playbook: test-cgroup-ladder
cooldown: 500ms
release_after: 10s
rate_limit: {{max_actions: 20, per: 1m}}
"""

PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: test-cgroup-ladder
steps:
  - action: notify
    params: {message: "first window"}
  - action: kill
    params: {signal: SIGKILL}
"""


def test_the_agent_escalates_on_the_cgroup_and_never_names_a_bystander(
    tmp_path: Path, test_cgroup: CgroupSandbox, bystander: CgroupSandbox, repo_root: Path
) -> None:
    """A fanout storm (no process crosses alone; a new crossing process every window) in one
    cgroup, a slow forker in another, both selected by the policy: the storm's cgroup is the
    offender, notified in one window and killed in the next; the bystander is never named."""
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir()
    playbooks.mkdir()
    (policies / "p.yaml").write_text(POLICY.format(storm=test_cgroup.rel, bystander=bystander.rel))
    (playbooks / "b.yaml").write_text(PLAYBOOK)
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(
        [
            *("--policies", str(policies), "--playbooks", str(playbooks)),
            *("--audit", str(audit), "--quarantine-root", f"{test_cgroup.rel}/q"),
            *("--duration", "60"),
        ],
        cwd=repo_root,
        log_path=tmp_path / "agent.log",
    )
    agent.wait_ready()
    try:
        slow = spawn_v1(bystander, "fork", "--count", "60", "--seconds", "10", "--rate", "10")
        spawn_v1(test_cgroup, "fanout", "--count", "1000000", "--seconds", "20")
        storm_rc = test_cgroup.procs[-1].wait(30)
        slow_rc = bystander.procs[-1].wait(30)
    finally:
        rc = agent.stop()
    print(agent.output())
    assert rc == 0
    decisions = [json.loads(line) for line in audit.read_text().splitlines()]
    acted = [d for d in decisions if d["outcome"] == "acted"]
    assert [(d["action"], d["step"]) for d in acted][:2] == [("notify", 0), ("kill", 1)]
    assert {d["cgroup"] for d in decisions} == {str(test_cgroup.pids_dir)}
    assert {d["pid"] for d in decisions} == {0}  # the cgroup, never a process that crossed
    assert storm_rc == -9, "the storm's cgroup should have been killed at the second step"
    assert slow_rc == 0 and slow not in {d["pid"] for d in decisions}
