"""The agent under real systemd with the shipped unit (deploy/systemd/remedy.service).

Installed as docs/deploy.md says (the unit file unchanged, /usr/local/bin/remedy, /etc/remedy),
with one test policy that matches only a cgroup the test owns, so the enforcing agent can never
act on anything but the test's own bounded storm. One agent start is shared by the tests in
this file (each start compiles the BPF program, which is slow under TCG), in file order.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remedy.actions.cgroups import Limits
from vmtest.guest.conftest import Delegated

pytestmark = [pytest.mark.kernel, pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = Path("/etc/systemd/system")
ETC = Path("/etc/remedy")
STORM = REPO / "tests" / "workloads" / "storm.py"
# The unit's AmbientCapabilities, by number (linux/capability.h).
CAPS = {
    "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39,
}  # fmt: skip
POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: vmtest-storm
signal: fork_rate
threshold: 30
window: 1s
match:
  cgroups: ["/system.slice/remedy-vmtest-*.service/storm"]
scope: cgroup
playbook: vmtest-throttle
mode: enforce
cooldown: 500ms
release_after: 60s
rate_limit: {max_actions: 20, per: 1m}
"""
PLAYBOOK = """\
apiVersion: remedy/v1
kind: Playbook
name: vmtest-throttle
steps:
  - action: throttle_cpu
    params: {cpu: 0.2}
"""


def systemctl(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def prop(name: str) -> str:
    return systemctl("show", "-P", name, "remedy.service").stdout.strip()


def journal() -> str:
    return subprocess.run(
        ["journalctl", "-u", "remedy.service", "--no-pager", "-o", "cat"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout


def until(what: str, done: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{journal()[-3000:]}"
        time.sleep(0.2)


def _install() -> None:
    bin_remedy = Path("/usr/local/bin/remedy")
    bin_remedy.unlink(missing_ok=True)
    bin_remedy.symlink_to(REPO / ".venv" / "bin" / "remedy")
    for sub in ("policies", "playbooks"):
        shutil.rmtree(ETC / sub, ignore_errors=True)
        (ETC / sub).mkdir(parents=True)
    (ETC / "policies" / "vmtest.yaml").write_text(POLICY)
    (ETC / "playbooks" / "vmtest.yaml").write_text(PLAYBOOK)
    for unit in ("remedy.service", "remedy-reconcile.service", "remedy-reconcile.timer"):
        shutil.copy(REPO / "deploy" / "systemd" / unit, UNIT_DIR / unit)
    assert systemctl("daemon-reload").returncode == 0


@pytest.fixture(scope="module")
def service() -> Iterator[None]:
    """The unit installed and started once; stopped and removed at the end of the module."""
    _install()
    try:
        yield
    finally:
        systemctl("stop", "remedy.service")
        shutil.rmtree(UNIT_DIR / "remedy.service.d", ignore_errors=True)
        for unit in ("remedy.service", "remedy-reconcile.service", "remedy-reconcile.timer"):
            (UNIT_DIR / unit).unlink(missing_ok=True)
        systemctl("daemon-reload")
        systemctl("reset-failed", "remedy.service")


def _caps(pid: int) -> set[str]:
    """The process's effective capabilities, named."""
    line = next(
        x for x in Path(f"/proc/{pid}/status").read_text().split("\n") if x.startswith("CapEff:")
    )
    mask = int(line.split()[1], 16)
    named = {name for name, bit in CAPS.items() if mask >> bit & 1}
    others = mask & ~sum(1 << bit for bit in CAPS.values())
    return named | ({f"other:{others:#x}"} if others else set())


def _mount_options(pid: int, where: str) -> list[str]:
    options: list[str] = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().split("\n"):
        fields = line.split()
        if len(fields) > 5 and fields[4] == where:
            options = fields[5].split(",")
    return options


def test_start_reaches_ready_through_sd_notify_and_status_shows_the_text(service: None) -> None:
    started = time.monotonic()
    done = systemctl("start", "remedy.service")  # Type=notify: returns once READY=1 arrived
    took = time.monotonic() - started
    assert done.returncode == 0, f"{done.stderr}\n{journal()[-3000:]}"
    assert (prop("ActiveState"), prop("SubState")) == ("active", "running")
    text = prop("StatusText")
    assert text, "no STATUS= from the agent"
    status = systemctl("status", "--no-pager", "remedy.service").stdout
    assert f'Status: "{text}"' in status, status
    print(f"systemctl start took {took:.1f} s; status: {text}")


def test_the_self_test_passed_under_the_units_capabilities_and_sandbox(service: None) -> None:
    """It started enforcing (an enforcing agent that fails its self-test never gets READY) with
    exactly the unit's capabilities, behind ProtectSystem=strict."""
    pid = int(prop("MainPID"))
    assert pid > 0
    assert _caps(pid) == set(CAPS), _caps(pid)
    assert "dry-run" not in journal() and "cannot enforce" not in journal()
    # ProtectSystem=strict: the root is read-only to the agent (the last mount there wins),
    # cgroupfs is not.
    assert "ro" in _mount_options(pid, "/")
    assert "rw" in _mount_options(pid, "/sys/fs/cgroup")


def test_reload_reloads_the_policies_in_the_same_process(service: None) -> None:
    pid = prop("MainPID")
    assert systemctl("reload", "remedy.service").returncode == 0, journal()[-3000:]
    until("the reloaded status", lambda: prop("StatusText").startswith("reloaded:"))
    assert prop("MainPID") == pid
    assert prop("ActiveState") == "active"


def test_stop_reverts_the_throttle_it_applied(service: None, delegated: Delegated) -> None:
    storm_rel = f"{delegated.rel}/storm"
    delegated.driver.create(storm_rel, Limits())
    cpu_max = delegated.path(storm_rel) / "cpu.max"
    assert cpu_max.read_text().strip() == "max 100000"
    argv = [sys.executable, str(STORM), "fork", "--count", "3000", "--seconds", "20"]
    storm = delegated.spawn([*argv, "--rate", "0"], where=storm_rel, stderr=subprocess.DEVNULL)
    until("the throttle", lambda: cpu_max.read_text().strip() == "20000 100000", 90)
    assert systemctl("stop", "remedy.service").returncode == 0
    assert cpu_max.read_text().strip() == "max 100000", journal()[-3000:]
    storm.kill()
    storm.wait(10)


def test_a_stuck_agent_is_killed_by_the_watchdog_and_restarted(service: None) -> None:
    """SIGSTOP: no thread runs, so its own supervisor cannot end it; the watchdog must. The
    unit's 60 s is shortened by a drop-in, the only change to the shipped unit."""
    drop = UNIT_DIR / "remedy.service.d"
    drop.mkdir(exist_ok=True)
    (drop / "vmtest-watchdog.conf").write_text("[Service]\nWatchdogSec=10s\nTimeoutAbortSec=5s\n")
    assert systemctl("daemon-reload").returncode == 0
    assert systemctl("start", "remedy.service").returncode == 0, journal()[-3000:]
    first = int(prop("MainPID"))
    restarts = int(prop("NRestarts") or 0)
    os.kill(first, signal.SIGSTOP)
    until("a restart", lambda: int(prop("NRestarts") or 0) > restarts, 240)
    until("the new agent ready", lambda: prop("SubState") == "running", 240)
    assert int(prop("MainPID")) != first
    assert "watchdog timeout" in journal().lower()
