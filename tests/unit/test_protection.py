"""Protection by an identity an unprivileged user cannot forge, against a fixture /proc tree.

A process is protected by its executable only when it runs a protected path as root (or as the
user its Protection document names), with all four uids equal, started in nobody else's login
session, with nothing for the dynamic loader to inject, from a file and a name only root (or
that user) can write; an upgraded daemon's "… (deleted)" exe stays protected. Each negative
case also checks the log line that names its cause, so it cannot pass for another reason.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remedy.clock import FakeClock
from remedy.engine.decisions import Decision
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import ConfigErrors, ProcessGone
from remedy.policy import Policy, PolicySet, Step
from remedy.policy.loader import check_paths
from remedy.proc import ProcessInfo, ProcFS
from remedy.sensors.records import SensorRecord
from remedy.tools.explain import explain, parse_facts

# A root-owned binary in root-owned, non-writable directories on every Linux host.
SYSTEM_EXE = "/usr/bin/sleep"
PID = 4242
START = 777
NO_LOGINUID = 2**32 - 1


def write_proc(
    root: Path,
    *,
    exe: str = SYSTEM_EXE,
    uids: tuple[int, int, int, int] = (0, 0, 0, 0),
    loginuid: int | None = NO_LOGINUID,
    environ: tuple[str, ...] = ("PATH=/usr/bin:/bin", "LANG=C"),
    start_ticks: int = START,
) -> None:
    """/proc/PID as the kernel writes it (fs/proc/array.c, base.c); exe is a symlink to
    ``exe``, which must exist (the protector stats the file through it)."""
    d = root / str(PID)
    d.mkdir(parents=True)
    after = ["S", "1", str(PID), str(PID), "0", "-1", "4194560"]
    after += [str(n) for n in range(10, 22)] + [str(start_ticks), "1", "2"]
    (d / "stat").write_text(f"{PID} (daemon) {' '.join(after)}\n")
    uid_line = "\t".join(str(u) for u in uids)
    (d / "status").write_text(f"Name:\tdaemon\nPPid:\t1\nUid:\t{uid_line}\nGid:\t0\t0\t0\t0\n")
    (d / "cmdline").write_bytes(b"daemon\0")
    (d / "environ").write_bytes(b"".join(e.encode() + b"\0" for e in environ))
    if loginuid is not None:  # None: a kernel without CONFIG_AUDITSYSCALL has no such file
        (d / "loginuid").write_text(str(loginuid))
    (d / "exe").symlink_to(exe)


def protector(root: Path, *exes: str, owners: dict[str, frozenset[int]] | None = None) -> Protector:
    return Protector(999, frozenset({1}), frozenset(exes), owners or {}, ProcFS(root))


def info(root: Path) -> ProcessInfo:
    return ProcFS(root).read(PID)


def subject_of(found: ProcessInfo) -> Subject:
    return Subject(
        found.pid,
        found.start_ticks,
        found.comm,
        found.ppid,
        found.exe,
        found.uid,
        found.is_kernel_thread,
        "/",
        "/",
    )


def verdicts(guard: Protector, root: Path) -> tuple[str | None, str | None]:
    """What the engine's guard and the reach check (``Engine.spare``) say: always the same."""
    found = info(root)
    return guard.why_protected(subject_of(found)), guard.why(found)


def not_protected_because(
    guard: Protector, root: Path, caplog: pytest.LogCaptureFixture, cause: str
) -> None:
    with caplog.at_level(logging.INFO, logger="remedy.engine.guards"):
        assert verdicts(guard, root) == (None, None)
    assert any(cause in r.getMessage() for r in caplog.records), caplog.text


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return tmp_path / "proc"


def test_a_root_daemon_started_by_the_system_is_protected(proc: Path) -> None:
    write_proc(proc)
    assert (
        verdicts(protector(proc, SYSTEM_EXE), proc) == (f"protected executable {SYSTEM_EXE}",) * 2
    )


def test_root_logged_in_as_root_may_start_a_protected_daemon(proc: Path) -> None:
    write_proc(proc, loginuid=0)
    assert verdicts(protector(proc, SYSTEM_EXE), proc)[0] is not None


def test_a_kernel_without_login_uids_does_not_unprotect(proc: Path) -> None:
    write_proc(proc, loginuid=None)
    assert verdicts(protector(proc, SYSTEM_EXE), proc)[0] is not None


def test_the_same_exe_run_by_uid_1000_is_not_protected(
    proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_proc(proc, uids=(1000, 1000, 1000, 1000))
    not_protected_because(protector(proc, SYSTEM_EXE), proc, caplog, "runs as uid 1000, not 0")


@pytest.mark.parametrize(
    "uids",
    [
        (1000, 0, 0, 0),  # a setuid-root program run by uid 1000 (real uid kept)
        (0, 1000, 0, 1000),  # effective uid another user's
        (0, 0, 1000, 0),  # saved uid: can switch to 1000 at will
    ],
)
def test_a_process_whose_uids_are_not_all_the_owner_is_not_protected(
    proc: Path, caplog: pytest.LogCaptureFixture, uids: tuple[int, int, int, int]
) -> None:
    write_proc(proc, uids=uids)
    cause = "runs as uid 1000" if uids[0] else "its uids differ"
    not_protected_because(protector(proc, SYSTEM_EXE), proc, caplog, cause)


@pytest.mark.parametrize(
    "variable",
    [
        "LD_PRELOAD=/tmp/evil.so",
        "LD_AUDIT=/tmp/evil.so",
        "LD_LIBRARY_PATH=/tmp",
        "GCONV_PATH=/tmp",
        "LD_PRELOAD=",  # present at all: the protector does not guess how the loader reads it
    ],
)
def test_an_injected_library_means_not_protected(
    proc: Path, caplog: pytest.LogCaptureFixture, variable: str
) -> None:
    write_proc(proc, environ=("PATH=/usr/bin", variable, "HOME=/root"))
    name = variable.split("=", maxsplit=1)[0]
    cause = f"its environment loads other code ({name})"
    not_protected_because(protector(proc, SYSTEM_EXE), proc, caplog, cause)


def test_a_variable_that_only_mentions_the_loader_is_not_an_injection(proc: Path) -> None:
    write_proc(proc, environ=("MY_LD_PRELOAD=x", "NOTE=LD_PRELOAD=/tmp/evil.so"))
    assert verdicts(protector(proc, SYSTEM_EXE), proc)[0] is not None


def test_root_started_from_a_users_login_session_is_not_protected(
    proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # sudo, su and setuid programs keep the login uid of the session they ran in.
    write_proc(proc, loginuid=1000)
    cause = "started in a login session of uid 1000"
    not_protected_because(protector(proc, SYSTEM_EXE), proc, caplog, cause)


def _daemon(tmp_path: Path, mode: int = 0o755) -> Path:
    """A copy of a system binary at <tmp>/sbin/daemon, the directory with ``mode``."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    daemon = sbin / "daemon"
    shutil.copy(SYSTEM_EXE, daemon)
    sbin.chmod(mode)
    return daemon


def _me() -> tuple[int, int, int, int]:
    me = os.getuid()
    return (me, me, me, me)


def _mine(path: Path) -> dict[str, frozenset[int]]:
    # The test's own uid owns tmp_path (root in CI, anyone for `make unit`): an entry naming it.
    return {str(path): frozenset({os.getuid()})}


def test_an_upgraded_daemon_whose_exe_reads_deleted_stays_protected(
    tmp_path: Path, proc: Path
) -> None:
    daemon = _daemon(tmp_path)
    # What the kernel prints for a file unlinked since exec; here a file of that name, so the
    # fixture's exe link reaches a file as the real one does.
    running = daemon.with_name("daemon (deleted)")
    daemon.rename(running)
    write_proc(proc, exe=str(running), uids=_me(), loginuid=None)
    guard = protector(proc, str(daemon), owners=_mine(daemon))
    why = f"protected executable {daemon} (replaced on disk since it started)"
    assert verdicts(guard, proc) == (why, why)


@pytest.mark.parametrize("deleted", [False, True])
def test_a_name_others_could_have_given_is_not_protected(
    tmp_path: Path, proc: Path, caplog: pytest.LogCaptureFixture, deleted: bool
) -> None:
    # A directory anyone may write: anyone could have put their own binary under that name.
    daemon = _daemon(tmp_path, mode=0o777)
    running = daemon.with_name("daemon (deleted)") if deleted else daemon
    daemon.rename(running)
    write_proc(proc, exe=str(running), uids=_me(), loginuid=None)
    guard = protector(proc, str(daemon), owners=_mine(daemon))
    not_protected_because(guard, proc, caplog, f"{daemon.parent} is writable by others")


def test_an_executable_file_others_may_write_is_not_protected(
    tmp_path: Path, proc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _daemon(tmp_path)
    daemon.chmod(0o777)
    write_proc(proc, exe=str(daemon), uids=_me(), loginuid=None)
    guard = protector(proc, str(daemon), owners=_mine(daemon))
    not_protected_because(guard, proc, caplog, "its executable file is writable by others")


def test_a_process_that_took_the_pid_is_never_read_as_the_subject(proc: Path) -> None:
    write_proc(proc, start_ticks=START + 1)
    with pytest.raises(ProcessGone):
        ProcFS(proc).provenance(PID, START)
    stale = subject_of(info(proc))
    stale.start_ticks = START
    assert protector(proc, SYSTEM_EXE).why_protected(stale) is None


def test_provenance_reads_what_the_kernel_wrote(proc: Path) -> None:
    write_proc(proc, uids=(0, 1, 2, 3), loginuid=1000, environ=("LD_AUDIT=a", "LD_PRELOAD=b"))
    facts = ProcFS(proc).provenance(PID, START)
    assert facts.uids == (0, 1, 2, 3)
    assert facts.loginuid == 1000
    assert facts.loader_env == ("LD_AUDIT", "LD_PRELOAD")
    assert facts.exe_uid == os.stat(SYSTEM_EXE).st_uid


def test_without_a_proc_tree_only_the_recorded_uid_counts(proc: Path) -> None:
    # Replay: the recorded processes are not on this host.
    write_proc(proc)
    guard = Protector(0, frozenset(), exes=frozenset({SYSTEM_EXE}))
    found = info(proc)
    assert guard.why(found) is not None
    assert guard.why(ProcessInfo(**{**found.__dict__, "uid": 1000})) is None


# --- Protection documents -----------------------------------------------------------------------

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: fork-bomb
signal: fork_rate
threshold: 200
window: 1s
playbook: contain
---
apiVersion: remedy/v1
kind: Playbook
name: contain
steps: [{action: notify}]
"""


def _load(tmp_path: Path, *docs: str) -> PolicySet:
    conf = tmp_path / "conf"
    conf.mkdir(parents=True)
    (conf / "all.yaml").write_text("---\n".join([POLICY, *docs]))
    return check_paths([conf])


def test_a_protection_document_may_name_the_user_its_daemon_runs_as(
    tmp_path: Path, proc: Path
) -> None:
    policies = _load(
        tmp_path,
        f"apiVersion: remedy/v1\nkind: Protection\nname: db\nuser: nobody\nexes: [{SYSTEM_EXE}]\n",
    )
    assert policies.protected_owners == {SYSTEM_EXE: frozenset({65534})}
    write_proc(proc, uids=(65534,) * 4)
    guard = Protector(999, frozenset({1}), exes=frozenset(), procfs=ProcFS(proc))
    assert verdicts(guard, proc) == (None, None)
    assert verdicts(guard.extended(policies), proc)[0] == f"protected executable {SYSTEM_EXE}"


def test_a_protection_document_without_user_protects_root_only(tmp_path: Path, proc: Path) -> None:
    # Backward compatible: the same document still loads and protects the path, now only
    # for processes root runs (anyone may run any binary they can read).
    policies = _load(
        tmp_path, f"apiVersion: remedy/v1\nkind: Protection\nname: s\nexes: [{SYSTEM_EXE}]\n"
    )
    assert policies.protected_exes == {SYSTEM_EXE}
    write_proc(proc, uids=(65534,) * 4)
    guard = Protector(999, frozenset({1}), exes=frozenset(), procfs=ProcFS(proc)).extended(policies)
    assert verdicts(guard, proc) == (None, None)


def test_a_path_built_in_and_configured_may_be_owned_by_either(tmp_path: Path, proc: Path) -> None:
    policies = _load(
        tmp_path,
        f"apiVersion: remedy/v1\nkind: Protection\nname: db\nuser: 65534\nexes: [{SYSTEM_EXE}]\n",
    )
    guard = Protector(999, frozenset({1}), exes=frozenset({SYSTEM_EXE})).extended(policies)
    assert guard.owners_of(SYSTEM_EXE) == {0, 65534}


def test_an_unknown_user_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match="unknown user 'no-such-user-xyz'") as err:
        _load(
            tmp_path,
            "apiVersion: remedy/v1\nkind: Protection\nname: db\nuser: no-such-user-xyz\n"
            f"exes: [{SYSTEM_EXE}]\n",
        )
    assert "user" in str(err.value)


def test_explain_says_when_a_protected_path_is_not_protected_for_this_uid() -> None:
    policies = PolicySet((), {})
    assert "NOT PROTECTED" in explain(policies, parse_facts(["exe=/usr/sbin/sshd", "uid=1000"]))
    assert "PROTECTED: /usr/sbin/sshd run as uid [0]" in explain(
        policies, parse_facts(["exe=/usr/sbin/sshd", "uid=0"])
    )


# --- through the engine -------------------------------------------------------------------------


@dataclass
class _Table:
    proc: Path

    def identify(self, record: SensorRecord) -> Subject:
        return subject_of(info(self.proc))


@dataclass
class _Runner:
    ran: list[int] = field(default_factory=list)

    def describe(self, step: Step, subject: Subject) -> str:
        return "notify"

    def execute(self, step: Step, subject: Subject, policy: Policy) -> str:
        self.ran.append(subject.pid)
        return ""

    def release(self, subject: Subject) -> None:
        pass


@dataclass
class _Sink:
    decisions: list[Decision] = field(default_factory=list)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


@pytest.mark.parametrize(("uid", "acted"), [(65534, False), (1000, True)])
def test_the_engine_protects_by_the_configured_owner_on_records_and_reach(
    tmp_path: Path, proc: Path, uid: int, acted: bool
) -> None:
    # The agent's wiring: the base protector reads this /proc, the configuration adds the
    # document (user: nobody), and Engine.spare (tree and cgroup reach) says the same.
    policies = _load(
        tmp_path,
        f"apiVersion: remedy/v1\nkind: Protection\nname: d\nuser: nobody\nexes: [{SYSTEM_EXE}]\n",
    )
    write_proc(proc, uids=(uid,) * 4)
    runner, sink = _Runner(), _Sink()
    engine = Engine(
        policies,
        identifier=_Table(proc),
        executor=runner,
        sink=sink,
        clock=FakeClock(),
        protector=Protector.for_this_agent(ProcFS(proc), 999),
    )
    engine.on_record(SensorRecord("fork_rate", PID, PID, 1, "daemon", 1, 500, 1.0, 0.2, 0))
    assert runner.ran == ([PID] if acted else [])
    assert [d.outcome for d in sink.decisions] == ["acted" if acted else "skipped"]
    assert (engine.spare(info(proc)) is None) == acted
    engine.reload(_load(tmp_path / "again"))
    assert engine.spare(info(proc)) is None, "a reload without the document drops it"
