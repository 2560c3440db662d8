"""``remedy doctor`` on this very host, as root: what the kernel tier relies on is reported."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from remedy.cli import main

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _as_root() -> None:
    # Not bpf_ready: the doctor is what explains why BPF cannot run, so it needs only root here.
    if os.geteuid() == 0:
        return
    if os.environ.get("REMEDY_REQUIRE_BPF") == "1":
        pytest.fail("REMEDY_REQUIRE_BPF=1 but not root: cannot run the doctor on the host")
    pytest.skip("the host doctor needs root")


def test_the_host_can_run_the_kernel_funnel(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"^ok +tracepoint sched:sched_process_fork +for fork_rate", out, re.M), out
    assert re.search(r"^ +fork_rate +kernel: sched:sched_process_fork$", out, re.M), out
    assert "kernel funnel can run" in out


def test_the_json_report_matches_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["kernel_ok"] is True
    assert checks["tracepoint sched:sched_process_fork"]["status"] == "ok"
    assert checks["kernel"]["detail"] == os.uname().release
    release = os.uname().release
    build = Path("/lib/modules") / release / "build"
    if build.is_symlink() and release not in os.readlink(build):
        # This VM: Debian's 6.1 headers linked under a newer kernel's release.
        assert checks["headers"]["status"] == "warn", checks["headers"]
        assert re.fullmatch(
            rf"headers are for \S+, kernel is {re.escape(release)}: "
            "programs compile, struct layouts may differ",
            checks["headers"]["detail"],
        ), checks["headers"]
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        # v1 or hybrid: remedy drives the v1 pids and cpu hierarchies.
        detail = checks["cgroups"]["detail"]
        assert detail.startswith("v1 at /sys/fs/cgroup: "), checks["cgroups"]
        assert "pids" in detail and "cpu" in detail
    assert checks["bcc"]["status"] == "ok"
