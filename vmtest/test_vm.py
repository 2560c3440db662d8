"""The host's view of the VM: one host test per in-VM test.

The in-VM test ids are collected here, on the host, from the same files the guest runs
(vmtest/guest/targets.txt); the VM boots once for the session and each host test reports its
guest test's junit outcome. A guest test that was skipped, or that has no result at all (the VM
died, setup failed, the guest collected something else), fails under REMEDY_REQUIRE_BPF=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmtest.image import REPO
from vmtest.vm import Run, run

REQUIRE = os.environ.get("REMEDY_REQUIRE_BPF") == "1"
OUT = Path(os.environ.get("REMEDY_VMTEST_OUT", str(REPO / ".vmtest")))


def targets(repo: Path = REPO) -> list[str]:
    """The guest's pytest arguments: vmtest/guest/targets.txt without comments."""
    lines = (repo / "vmtest" / "guest" / "targets.txt").read_text().splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def guest_ids(repo: Path = REPO) -> list[str]:
    """The node ids the guest will run, collected here with ``--collect-only -q``."""
    env = {**os.environ, "REMEDY_VMTEST_GUEST": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *targets(repo),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    ids = [line for line in done.stdout.splitlines() if "::" in line and " " not in line]
    if done.returncode != 0 or not ids:
        raise RuntimeError(f"cannot collect the guest tests:\n{done.stdout}\n{done.stderr}")
    return ids


@dataclass(frozen=True)
class Outcome:
    """One guest test case: passed, failed, error or skipped, with the message."""

    status: str
    message: str


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest's junit XML writes a node id."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1]


def parse_junit(path: Path) -> dict[tuple[str, str], Outcome]:
    """Every testcase in the guest's junit XML by (classname, name)."""
    found: dict[tuple[str, str], Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                status = tag
                message = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
        if key in found and found[key].status != "passed":
            continue  # a teardown error is a second testcase entry: keep the worse one
        found[key] = Outcome(status, message)
    return found


@pytest.fixture(scope="session")
def vm() -> Run:
    """Boot the VM once; every host test reads this run's results."""
    return run(OUT)


@pytest.fixture(scope="session")
def outcomes(vm: Run) -> dict[tuple[str, str], Outcome]:
    junit = vm.file("junit.xml")
    if junit is None:
        log = vm.file("guest.log")
        tail = log.read_text()[-4000:] if log else f"no guest log; serial: {vm.serial}"
        pytest.fail(f"the VM produced no junit XML (qemu rc={vm.returncode}):\n{tail}")
    return parse_junit(junit)


def test_the_vm_booted_and_setup_sh_installed_remedy(vm: Run) -> None:
    """setup.sh, the user's path, ran clean in the guest, and the guest's pytest finished."""
    assert vm.returncode == 0, f"qemu rc={vm.returncode} (None: killed on timeout); {vm.serial}"
    log = vm.file("guest.log")
    assert log is not None, f"no guest log; serial console: {vm.serial}"
    assert vm.file("setup-failed") is None, log.read_text()[-4000:]
    assert "setup: ready" in log.read_text()
    assert vm.file("pytest.rc") is not None, "the guest's pytest did not finish"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_id" in metafunc.fixturenames:
        metafunc.parametrize("guest_id", guest_ids())


def verdict(got: Outcome | None, guest_id: str, require: bool) -> tuple[str, str]:
    """What the host test does with a guest outcome: ("pass"|"fail"|"skip", why). A skip is
    a failure under REMEDY_REQUIRE_BPF=1; a missing result always is."""
    if got is None:
        return "fail", f"no result in the VM for {guest_id}"
    if got.status == "skipped":
        if require:
            return "fail", f"skipped in the VM under REMEDY_REQUIRE_BPF=1: {got.message}"
        return "skip", got.message
    if got.status != "passed":
        return "fail", f"{got.status} in the VM:\n{got.message}"
    return "pass", ""


def test_in_vm(guest_id: str, outcomes: dict[tuple[str, str], Outcome]) -> None:
    """The guest's outcome for ``guest_id``."""
    action, why = verdict(outcomes.get(junit_key(guest_id)), guest_id, REQUIRE)
    if action == "skip":
        pytest.skip(why)
    if action == "fail":
        pytest.fail(why, pytrace=False)
