"""Pid reuse, forced with /proc/sys/kernel/ns_last_pid, on every path from a kernel count to a
signal: no count, record, arm or action meant for a dead process reaches the newcomer that got
its pid. Real BPF, real processes (all the test's own, in its pids-limited cgroup).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reuse_helpers import SLEEPER, spawn_at, storm, wait_gone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
from kernel_helpers import Harness, start

from remedy.actions.cgroups import detect
from remedy.actions.process import Birth, ProcessHandle
from remedy.errors import ActionError, ProcessGone
from remedy.proc import ProcFS
from remedy.sensors.catalog import SignalSettings
from remedy.sensors.fastpath import FastPath
from remedy.sensors.identify import ProcIdentifier
from remedy.sensors.kernel import KernelSensor, Sizes
from remedy.sensors.records import SensorRecord
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

WINDOW = 10.0


@pytest.fixture
def sched() -> Iterator[Harness]:
    settings = {
        "fork_rate": SignalSettings(window_s=WINDOW, threshold=200),
        "exec_rate": SignalSettings(window_s=WINDOW, threshold=100),
        "churn": SignalSettings(window_s=WINDOW, threshold=40, lifetime_s=30.0),
    }
    yield from start(KernelSensor(), settings)


def _identifier(sensor: KernelSensor) -> ProcIdentifier:
    return ProcIdentifier(ProcFS(), detect(), births=sensor)


def _records(h: Harness, signal_name: str, key: int) -> list[SensorRecord]:
    h.drain()
    return [r for r in h.records if r.signal == signal_name and r.key == key]


def test_a_reused_pid_starts_from_an_empty_window(
    sched: Harness, test_cgroup: CgroupSandbox
) -> None:
    """150 forks by the first holder and 80 by the next, in one window, are not 230 forks."""
    first = storm(test_cgroup, "fork", 150)
    wait_gone(first)
    newcomer = spawn_at(test_cgroup, first.pid, [sys.executable, "-c", _FORK_80])
    assert newcomer.wait(20) == 0
    assert sched.sensor.window_value("fork_rate", first.pid) == 80  # its own window
    assert _records(sched, "fork_rate", first.pid) == []


_FORK_80 = (
    "import os\nfor _ in range(80):\n    p = os.fork()\n    p or os._exit(0)\n    os.waitpid(p, 0)"
)

_FORK_200_EXIT = _FORK_80.replace("80", "200") + "\nos._exit(0)"

# The orphan of a dead parent keeps exec'ing (a chain of execs of one process) once `go` exists.
_EXEC_CHAIN = (
    '[ -e "$1" ] || { sleep 0.05; exec /bin/sh "$0" "$@"; }; '
    '[ "$2" -gt 0 ] && exec /bin/sh "$0" "$1" $(($2-1)); exit 0'
)
# A parent that forks a child and exits at once, leaving it an orphan.
_ORPHANER = (
    "import os, sys\n"
    "if os.fork() == 0:\n    os.execv('/bin/sh', ['/bin/sh', *sys.argv[1:]])\n"
    "os._exit(0)"
)


def test_execs_of_an_orphan_are_never_charged_to_the_pid_its_dead_parent_had(
    sched: Harness, test_cgroup: CgroupSandbox, tmp_path: Path
) -> None:
    script = tmp_path / "chain.sh"
    script.write_text(_EXEC_CHAIN)
    go = tmp_path / "go"
    parent = test_cgroup.spawn([sys.executable, "-c", _ORPHANER, str(script), str(go), "300"])
    wait_gone(parent)
    newcomer = spawn_at(test_cgroup, parent.pid, SLEEPER)
    go.touch()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        "chain.sh" in _cmdline(p) for p in test_cgroup.members()
    ):
        sched.sensor.poll(50)
    exec_records = _records(sched, "exec_rate", parent.pid)
    assert exec_records == [], "the orphan's execs were charged to the newcomer's pid"
    assert newcomer.poll() is None


def test_churn_of_orphans_is_never_charged_to_the_pid_their_dead_parent_had(
    sched: Harness, test_cgroup: CgroupSandbox, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "for _ in range(60):\n"
        "    if os.fork() == 0:\n"
        "        while not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"
        "        os._exit(0)\n"
        "os._exit(0)\n"
    )
    parent = test_cgroup.spawn([sys.executable, "-c", code, str(go)])
    wait_gone(parent)
    newcomer = spawn_at(test_cgroup, parent.pid, SLEEPER)
    go.touch()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(test_cgroup.members()) > 1:
        sched.sensor.poll(50)
    assert _records(sched, "churn", parent.pid) == []
    assert newcomer.poll() is None


# One small process does the race, so no fork of the (big) test process sits in it: a child
# forks 200 times and _exits; the moment it is reaped, a newcomer is forked into its pid.
_RACE = """
import os, sys, time
first = os.fork()
if first == 0:
    for _ in range(200):
        p = os.fork()
        p or os._exit(0)
        os.waitpid(p, 0)
    os._exit(0)
os.waitpid(first, 0)
newcomer = -1
for _ in range(200):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first - 1))
    newcomer = os.fork()
    if newcomer == 0:
        time.sleep(30)
        os._exit(0)
    if newcomer == first:
        break
    os.kill(newcomer, 9)
    os.waitpid(newcomer, 0)
print(first, newcomer, flush=True)
os.waitpid(newcomer, 0)
"""


def test_a_record_is_never_bound_to_a_process_born_after_it_even_within_one_tick(
    sched: Harness, test_cgroup: CgroupSandbox
) -> None:
    """The crossing fork is the last one; its process exits at once and a newcomer takes its
    pid, often inside the same 10 ms /proc tick, where start times cannot tell them apart."""
    identifier = _identifier(sched.sensor)
    procfs = ProcFS()
    same_tick = 0
    rounds = 8
    for _ in range(rounds):
        race = test_cgroup.spawn([sys.executable, "-c", _RACE], stdout=subprocess.PIPE)
        newcomer = -1
        try:
            assert race.stdout is not None
            first, newcomer = map(int, race.stdout.readline().split())
            assert first == newcomer, "could not force the pid's reuse"
            (record,) = _records(sched, "fork_rate", first)[-1:]
            if procfs.start_boot_ns(procfs.read(newcomer)) <= record.ts_boot_ns:
                same_tick += 1  # "started before the record" would have let it through
            with pytest.raises(ProcessGone, match="reused"):
                identifier.identify(record)
        finally:
            race.kill()
            race.wait(5)
            with contextlib.suppress(OSError):  # the newcomer: the race's child, in our cgroup
                signal.pidfd_send_signal(fd := os.pidfd_open(newcomer), signal.SIGKILL)
                os.close(fd)
        sched.records.clear()
    print(f"\n{same_tick} of {rounds} newcomers started within the crossing's /proc tick")


def test_the_offender_itself_is_still_bound(sched: Harness, test_cgroup: CgroupSandbox) -> None:
    """The check is not a refusal of everything: the process a record names is bound."""
    proc = storm(test_cgroup, "fork", 400, "--rate", "400")
    proc_record: list[SensorRecord] = []
    deadline = time.monotonic() + 20
    while not proc_record and time.monotonic() < deadline:
        sched.sensor.poll(50)
        proc_record = [r for r in sched.records if r.signal == "fork_rate" and r.key == proc.pid]
    assert proc_record
    subject = _identifier(sched.sensor).identify(proc_record[0])  # it forks for 1 s more
    assert subject.birth_ns == proc_record[0].key_birth_ns
    assert subject.handle is not None
    subject.handle.close()
    proc.wait(20)


def test_a_birth_unknown_to_the_kernel_for_a_process_born_while_watched_is_refused(
    sched: Harness, test_cgroup: CgroupSandbox
) -> None:
    proc = test_cgroup.spawn(SLEEPER)
    try:
        birth = sched.sensor.birth(proc.pid)
        assert birth is not None
        procfs = ProcFS()
        with ProcessHandle.bind(proc.pid, procfs, birth=Birth(birth), registry=sched.sensor):
            pass
        with pytest.raises(ProcessGone, match="another nanosecond"):
            ProcessHandle.bind(proc.pid, procfs, birth=Birth(birth + 1), registry=sched.sensor)
        with pytest.raises(ActionError, match="unknown"):
            ProcessHandle.bind(proc.pid, procfs, birth=Birth(0), registry=sched.sensor)
    finally:
        proc.kill()
        proc.wait(5)


_WAIT_THEN_FORK = (
    "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n" + _FORK_80
)


def test_a_fast_path_arm_dies_with_its_process_even_when_a_storm_evicted_the_lineage(
    bpf_ready: None, test_cgroup: CgroupSandbox, tmp_path: Path
) -> None:
    settings = {"fork_rate": SignalSettings(window_s=WINDOW, threshold=1_000_000)}
    # A tiny lineage map, so the storm below evicts every entry in it.
    for h in start(KernelSensor(Sizes(map_entries=64)), settings):
        fp = FastPath(h.sensor)
        try:
            offender = test_cgroup.spawn(SLEEPER)
            time.sleep(0.2)
            birth = h.sensor.birth(offender.pid)
            assert birth is not None
            fp.arm(offender.pid, birth, signal.SIGKILL, dry_run=False)
            offender.kill()
            wait_gone(offender)
            go = tmp_path / "go"
            newcomer = spawn_at(
                test_cgroup, offender.pid, [sys.executable, "-c", _WAIT_THEN_FORK, str(go)]
            )
            evictor = storm(test_cgroup, "fork", 300)
            assert evictor.wait(20) == 0
            go.touch()
            assert newcomer.wait(20) == 0, "the newcomer was signalled by a dead process's arm"
            assert fp.counters()["signals_sent"] == 0
        finally:
            fp.disable()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
