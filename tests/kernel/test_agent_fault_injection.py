"""Faults injected into the real agent (issue 11, "What must be shown"), each while a bounded
fork storm runs in the test's own pids-limited cgroup, each followed by `remedy audit --verify`:

- the undo journal on a full filesystem (a 64 KiB tmpfs the test mounts and always unmounts):
  no change is made that the journal could not hold, the agent goes on deciding, and once the
  disk has room the same storm is contained;
- a failing bcc map update: the fast-path arm map filled to its limit from outside, through a
  duplicate of the agent's own map descriptor (pidfd_getfd): the arm is refused and audited,
  the agent goes on, and once there is room the next record arms it;
- SIGKILL of the agent between a kill's intent and its outcome (its pidfd_send_signal held back
  by strace's syscall delay injection): the storm lives, the next agent reports the unfinished
  intent, and `--verify` exits 5 naming it;
- a bad policy edit while a quarantine with a 3 s TTL is applied: the agent stops, refuses to
  start on the bad set, and `remedy reconcile --journal` (as the systemd timer runs it) reverts
  the quarantine on time, neither before its TTL nor long after, with no agent running.

Every storm is bounded in count and time; only processes this test spawned are signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.launcher import AgentProcess
from testkit.sandbox import CgroupSandbox

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf_ready")]

STORM = Path(__file__).resolve().parents[1] / "workloads" / "storm.py"

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: test-fault
signal: fork_rate
threshold: 100
window: 1s
match:
  cgroups: ["{rel}", "{rel}/*"]
playbook: test-fault
mode: enforce
cooldown: 0s
release_after: 10s
rate_limit: {{max_actions: 60, per: 1m}}
"""

CONTAIN = """\
apiVersion: remedy/v1
kind: Playbook
name: test-fault
steps:
  - action: quarantine
    params: {pids_max: 8, cpu: 0.2}
  - action: kill
    params: {signal: SIGKILL}
"""


# -- shared helpers ---------------------------------------------------------------------------


def _write_config(tmp_path: Path, box: CgroupSandbox, playbook: str) -> tuple[Path, Path]:
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    policies.mkdir(exist_ok=True)
    playbooks.mkdir(exist_ok=True)
    (policies / "fault.yaml").write_text(POLICY.format(rel=box.rel))
    (playbooks / "fault.yaml").write_text(playbook)
    return policies, playbooks


def _start_agent(
    tmp_path: Path,
    box: CgroupSandbox,
    repo: Path,
    *,
    journal: Path,
    name: str = "agent",
    extra: tuple[str, ...] = (),
) -> AgentProcess:
    agent = AgentProcess(
        [
            "--policies",
            str(tmp_path / "policies"),
            "--playbooks",
            str(tmp_path / "playbooks"),
            "--audit",
            str(tmp_path / "audit.jsonl"),
            "--journal",
            str(journal),
            "--quarantine-root",
            f"{box.rel}/quarantine",
            "--duration",
            "90",
            *extra,
        ],
        cwd=repo,
        log_path=tmp_path / f"{name}.log",
    )
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop()
        raise
    return agent


def _forker(box: CgroupSandbox, forks: int, seconds: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(STORM), "fork", "--count", str(forks), "--seconds", str(seconds)]
    return box.spawn(argv)


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), "the audit file ends in a fragment"
    return [json.loads(raw) for raw in data.splitlines()]


def _of(tmp_path: Path, pid: int) -> list[dict[str, Any]]:
    return [e for e in _audit(tmp_path) if e.get("pid") == pid and "event" not in e]


def _wait_for(
    what: str, done: Callable[[], bool], timeout_s: float, agent: AgentProcess | None = None
) -> None:
    """Poll ``done()`` until true; fail after ``timeout_s``, or at once if the agent exited."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if agent is not None and agent.proc.poll() is not None:
            pytest.fail(
                f"the agent exited {agent.proc.returncode} waiting for {what}:\n{agent.output()}"
            )
        if time.monotonic() >= deadline:
            extra = f":\n{agent.output()}" if agent is not None else ""
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}{extra}")
        time.sleep(0.05)


def _remedy(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``remedy ARGS`` to completion (bounded), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "remedy", *args],
        check=False,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _verify(tmp_path: Path, repo: Path) -> subprocess.CompletedProcess[str]:
    return _remedy(repo, "audit", str(tmp_path / "audit.jsonl"), "--verify")


def _cgroup_of(pid: int) -> str:
    """The pids-hierarchy cgroup of ``pid`` (or the cgroup2 one on a pure v2 host)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(",") or controllers == "":
            return path
    return ""


@contextlib.contextmanager
def _tiny_tmpfs(where: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``where``, always unmounted (a busy one lazily, and the test fails)."""
    where.mkdir()
    source = f"remedy-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", source, str(where)],
        check=True,
        timeout=30,
    )
    try:
        yield where
    finally:
        done = subprocess.run(["umount", str(where)], check=False, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], check=True, timeout=30)
            pytest.fail(f"the test tmpfs at {where} was busy at teardown")


def _fill(mnt: Path) -> Path:
    """Take every free block of ``mnt``; the file returned gives them back when removed."""
    filler = mnt / "filler"
    with filler.open("wb") as f:
        st = os.statvfs(mnt)
        f.write(b"x" * (st.f_bavail * st.f_frsize))
    assert os.statvfs(mnt).f_bavail == 0
    return filler


# -- the undo journal on a full filesystem ------------------------------------------------------


def test_a_full_journal_disk_refuses_the_change_and_the_agent_goes_on_deciding(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    _write_config(tmp_path, test_cgroup, CONTAIN)
    with _tiny_tmpfs(tmp_path / "state") as mnt:
        journal = mnt / "undo.jsonl"
        agent = _start_agent(tmp_path, test_cgroup, repo_root, journal=journal)
        storm = None
        try:
            filler = _fill(mnt)
            storm = _forker(test_cgroup, forks=100_000, seconds=25)
            # Decided while the disk is full: refused, and the storm left where it was (a
            # change the journal cannot hold is never made).
            _wait_for(
                "a decision on the storm with the journal full",
                lambda: len(_of(tmp_path, storm.pid)) >= 2,
                15,
                agent,
            )
            refused = _of(tmp_path, storm.pid)
            where = _cgroup_of(storm.pid)
            filler.unlink()
            rc = storm.wait(30)
        finally:
            code = agent.stop()
            if storm is not None and storm.poll() is None:
                storm.kill()
                storm.wait(10)
        out = agent.output()
        print(out)
        journal_lines = journal.read_bytes()
    assert code == 0, out
    assert where == test_cgroup.rel, "quarantined although the journal could not hold its undo"
    for refusal in refused:  # each record decided, each a refusal that says why
        assert (refusal["outcome"], refusal["action"]) == ("error", "quarantine"), refusal
        assert "its undo could not be journaled" in refusal["message"], refusal
        assert "No space left on device" in refusal["message"], refusal
    assert rc == -9, "once the disk had room, the same storm was contained and killed"
    acted = [e["action"] for e in _of(tmp_path, storm.pid) if e["outcome"] == "acted"]
    assert acted == ["quarantine", "kill"], out
    verified = _verify(tmp_path, repo_root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert not journal_lines or journal_lines.endswith(b"\n")
    applied = [json.loads(x) for x in journal_lines.splitlines()]
    opened = {e["record"]["id"] for e in applied if e["op"] == "apply"}
    closed = {e["id"] for e in applied if e["op"] in ("revert", "abandon")}
    assert opened == closed, "every journaled change was taken back at the end"


# -- a failing bcc map update: the fast-path arm map full ---------------------------------------

KERNEL_KILL = """\
apiVersion: remedy/v1
kind: Playbook
name: test-fault
steps:
  - action: kill
    params: {signal: SIGKILL}
    kernel: true
"""

SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified table, 5.6+)
BPF_NOEXIST = 1
# Keys no process can hold (tgids stay below pid_max, at most 2**22), with a birth no process
# has and dry_run set: an entry the kernel could never act on, whatever happens.
FAKE_TGID = 0x8000_0000


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h); the kernel fills what fits."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


def _agent_map(pid: int, name: bytes) -> tuple[int, int]:
    """A duplicate (pidfd_getfd) of the descriptor of the agent's BPF map ``name``, and its
    max_entries: the agent's own map, not one of another process on the host."""
    from bcc.libbcc import lib  # noqa: PLC0415 (bcc only exists on the kernel tier)

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for fd_path in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd_path) != "anon_inode:bpf-map":
                    continue
            mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd_path.name), 0)
            if mine < 0:
                continue  # closed since we listed it
            info = _MapInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            got = lib.bpf_obj_get_info(mine, ctypes.byref(info), ctypes.byref(size))
            if got == 0 and info.name == name:
                return mine, int(info.max_entries)
            os.close(mine)
    finally:
        os.close(pidfd)
    raise AssertionError(f"the agent (pid {pid}) holds no BPF map named {name!r}")


def _fill_arm_map(fd: int, max_entries: int) -> list[int]:
    """Insert fake arms until the map refuses one; the keys inserted."""
    from bcc.libbcc import lib  # noqa: PLC0415

    from remedy.sensors.fastpath import ArmC  # noqa: PLC0415

    value = ArmC(signal=signal.SIGSTOP, dry_run=1, birth_ns=1, hits=0)
    keys = []
    for i in range(max_entries + 1):
        key = ctypes.c_uint32(FAKE_TGID + i)
        if lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), BPF_NOEXIST) != 0:
            break
        keys.append(key.value)
    return keys


def _empty_fakes(fd: int, keys: list[int]) -> None:
    from bcc.libbcc import lib  # noqa: PLC0415

    for k in keys:
        key = ctypes.c_uint32(k)
        lib.bpf_delete_elem(fd, ctypes.byref(key))


def test_a_full_arm_map_refuses_the_arm_and_the_agent_goes_on_deciding(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    _write_config(tmp_path, test_cgroup, KERNEL_KILL)
    agent = _start_agent(tmp_path, test_cgroup, repo_root, journal=tmp_path / "undo.jsonl")
    storm, fd, fakes = None, -1, []
    try:
        fd, max_entries = _agent_map(agent.proc.pid, b"fastpath_armed")
        fakes = _fill_arm_map(fd, max_entries)
        assert len(fakes) == max_entries, "the map took no more than its size"
        storm = _forker(test_cgroup, forks=100_000, seconds=25)
        _wait_for(
            "the refused arm",
            lambda: any(e["outcome"] == "error" for e in _of(tmp_path, storm.pid)),
            15,
            agent,
        )
        alive_after_refusal = storm.poll() is None
        _empty_fakes(fd, fakes)  # room again: the next record must arm it
        rc = storm.wait(30)
    finally:
        if fd >= 0:
            os.close(fd)
        code = agent.stop()
        if storm is not None and storm.poll() is None:
            storm.kill()
            storm.wait(10)
    out = agent.output()
    print(out)
    assert code == 0, out
    assert alive_after_refusal, "nothing armed, nothing killed"
    assert rc == -9, "once the map had room, the next record armed the kernel and it killed"
    mine = _of(tmp_path, storm.pid)
    first_intent, refusal = mine[0], mine[1]
    assert first_intent["outcome"] == "intent"
    assert refusal["outcome"] == "error" and refusal["intent"] == first_intent["seq"]
    assert "cannot arm the in-kernel fast path" in refusal["message"], refusal
    armed = [e for e in mine if e["outcome"] == "acted"]
    assert len(armed) == 1 and "armed: the kernel sends SIGKILL" in armed[0]["message"]
    verified = _verify(tmp_path, repo_root)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- SIGKILL of the agent between an intent and its outcome ---------------------------------------

KILL = """\
apiVersion: remedy/v1
kind: Playbook
name: test-fault
steps:
  - action: kill
    params: {signal: SIGKILL}
"""


def _traced(pid: int) -> bool:
    """Every thread of ``pid`` has a tracer."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return bool(tasks) and all(
            "TracerPid:\t0\n" not in (t / "status").read_text() for t in tasks
        )
    except OSError:
        return False


@contextlib.contextmanager
def _killed_at_its_first_signal(pid: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """strace on every thread of ``pid``: at the entry of its first pidfd_send_signal, the
    syscall is skipped (fails EPERM, so no signal is ever sent) and the agent gets SIGKILL.
    That is the instant between a kill's intent (written and fsynced first) and its outcome,
    every time. strace ends by itself once its tracee is dead; it is ours, so ended and reaped
    on the way out whatever happened."""
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(log),
            "-e",
            "trace=pidfd_send_signal",
            "-e",
            "inject=pidfd_send_signal:error=EPERM:signal=SIGKILL",
            "-p",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.with_suffix(".err").open("wb"),
    )
    try:
        _wait_for("strace to attach", lambda: _traced(pid) or tracer.poll() is not None, 20)
        assert tracer.poll() is None, log.with_suffix(".err").read_text()
        yield tracer
    finally:
        if tracer.poll() is None:
            tracer.terminate()  # detaches: a live tracee runs on, untraced
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(10)


def test_an_agent_killed_between_intent_and_outcome_is_reported_by_the_next_one(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    _write_config(tmp_path, test_cgroup, KILL)
    journal = tmp_path / "undo.jsonl"
    first = _start_agent(tmp_path, test_cgroup, repo_root, journal=journal, name="first")
    storm, second = None, None
    try:
        with _killed_at_its_first_signal(first.proc.pid, tmp_path / "strace.log") as tracer:
            storm = _forker(test_cgroup, forks=100_000, seconds=30)
            died = first.proc.wait(20)
            tracer.wait(10)
        assert died == -signal.SIGKILL, first.output()
        first.stop()
        [intent] = _of(tmp_path, storm.pid)
        assert intent["outcome"] == "intent" and intent["action"] == "kill"
        assert storm.poll() is None, "the kill never ran: the intent is all there is"
        # The next agent on the same audit reports it at once, and decides the next record.
        second = _start_agent(tmp_path, test_cgroup, repo_root, journal=journal, name="second")
        rc = storm.wait(30)
    finally:
        if second is not None:
            second.stop()
        first.stop()
        if storm is not None and storm.poll() is None:
            storm.kill()
            storm.wait(10)
    out = second.output()
    print(first.output(), out)
    assert rc == -9, "the second agent decided the storm's next record and killed it"
    assert f"the agent stopped after the intent {intent['seq']} (kill of pid {storm.pid}" in out
    reported = [e for e in _audit(tmp_path) if e.get("event") == "unfinished-intent"]
    assert [e["intent"] for e in reported] == [intent["seq"]]
    later = [e for e in _of(tmp_path, storm.pid) if e["seq"] > intent["seq"]]
    assert [e["outcome"] for e in later] == ["intent", "acted"]
    assert later[1]["intent"] == later[0]["seq"]
    verified = _verify(tmp_path, repo_root)
    assert verified.returncode == 5, verified.stdout + verified.stderr
    assert f"unfinished intent (seq {intent['seq']}," in verified.stdout, verified.stdout
    assert f"kill of pid {storm.pid} (python), policy test-fault" in verified.stdout
    assert "1 unfinished intent(s)" in verified.stdout


# -- a bad policy edit while a 3 s quarantine is applied -------------------------------------------

QUARANTINE_3S = """\
apiVersion: remedy/v1
kind: Playbook
name: test-fault
steps:
  - action: quarantine
    params: {pids_max: 8, cpu: 0.2}
    ttl: 3s
"""
TTL_S = 3.0
TIMER_S = 0.25  # how often the test's "timer" runs a reconcile pass (systemd's: every 30 s)
LATE_S = 2.5  # a pass is a Python start-up: on time means within this of the TTL


Pass = tuple[float, str, subprocess.CompletedProcess[str]]


def _pass(repo: Path, journal: Path, qroot: str, pid: int) -> Pass:
    """One reconcile pass as the unit runs it (the journal alone; the quarantine root only so
    it matches this test's agent): when it ended, where ``pid`` was then, the pass."""
    done = _remedy(repo, "reconcile", "--journal", str(journal), "--quarantine-root", qroot)
    return _boottime(), _cgroup_of(pid), done


def _timer(
    repo: Path, journal: Path, qroot: str, pid: int, *, home: str, until: float
) -> list[Pass]:
    """Passes every TIMER_S until ``pid`` is back ``home`` or CLOCK_BOOTTIME reaches ``until``."""
    passes = []
    while _boottime() < until:
        passes.append(_pass(repo, journal, qroot, pid))
        if passes[-1][1] == home:
            break
        time.sleep(TIMER_S)
    return passes


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def test_after_a_bad_policy_edit_reconcile_reverts_the_quarantine_on_time_with_no_agent(
    tmp_path: Path, test_cgroup: CgroupSandbox, repo_root: Path
) -> None:
    policies, playbooks = _write_config(tmp_path, test_cgroup, QUARANTINE_3S)
    journal = tmp_path / "undo.jsonl"
    qroot = f"{test_cgroup.rel}/quarantine"
    agent = _start_agent(tmp_path, test_cgroup, repo_root, journal=journal)
    storm = _forker(test_cgroup, forks=100_000, seconds=30)
    passes: list[Pass] = []
    try:
        _wait_for(
            "the quarantine",
            lambda: _cgroup_of(storm.pid).startswith(f"{qroot}/"),
            15,
            agent,
        )
        (policies / "fault.yaml").write_text(  # the bad edit, while it is applied
            POLICY.format(rel=test_cgroup.rel).replace("threshold: 100", "threshold: lots")
        )
        # The agent dies (a crash, the watchdog, the OOM killer); its quarantine stays, as it
        # must until its TTL, and the restart finds the bad edit.
        agent.proc.kill()
        agent.proc.wait(10)
        [applied] = [json.loads(x) for x in journal.read_text().splitlines()]
        record = applied["record"]
        due = record["boottime"] + TTL_S
        passes = [_pass(repo_root, journal, qroot, storm.pid)]  # ExecStopPost
        check = _remedy(repo_root, "check", str(policies), str(playbooks))  # ExecStartPre
        # And the agent itself, started on the bad set anyway.
        refused = _remedy(
            repo_root,
            *("run", "--policies", str(policies), "--playbooks", str(playbooks)),
            *("--journal", str(journal), "--duration", "30"),
            *("--control-socket", str(tmp_path / "refused.sock")),
        )
        # Then the timer, with no agent: passes until the quarantine is gone (bounded).
        passes += _timer(
            repo_root, journal, qroot, storm.pid, home=test_cgroup.rel, until=due + LATE_S + 10
        )
        storm_alive = storm.poll() is None
    finally:
        agent.stop()
        if storm.poll() is None:
            storm.kill()
        storm.wait(10)
    print(agent.output())
    for at, where, done in passes:
        print(f"a pass ended {at - record['boottime']:.2f} s after the apply: {where}")
        print(done.stdout, done.stderr)
    assert check.returncode != 0 and "threshold" in check.stdout + check.stderr
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "ready:" not in refused.stdout, "an agent started on the bad set"
    assert storm_alive, "reverted while the offender still ran"
    early = [(at, where, done) for at, where, done in passes if at < due]
    assert early, "no pass ended before the TTL: nothing shows it was not cut short"
    for _, where, done in early:
        assert where.startswith(f"{qroot}/"), "cut short: reverted before its TTL"
        assert "1 record(s) still active" in done.stdout, done.stdout + done.stderr
    restored = [(at, done) for at, where, done in passes if where == test_cgroup.rel]
    assert restored, "never reverted with no agent running"
    at, done = restored[0]
    assert at <= due + LATE_S, f"reverted {at - due:.2f} s past its TTL"
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reconcile: quarantine on" in done.stdout and "0 record(s) still active" in done.stdout
    closed = [json.loads(x) for x in journal.read_text().splitlines()][-1]
    assert (closed["op"], closed["id"]) == ("revert", record["id"])
    assert closed["reason"] == "ttl expired after restart"
    verified = _verify(tmp_path, repo_root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
