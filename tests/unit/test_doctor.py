"""``remedy doctor`` against fixture host trees: each check's verdict and the exit code."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
from btf_blob import blob

from remedy.sensors.catalog import CATALOGUE
from remedy.tools.doctor import (
    Check,
    Host,
    check_bcc,
    check_cgroups,
    check_headers,
    check_privileges,
    gather,
    kernel_version,
    render,
    run_doctor,
)

RELEASE = "6.18.44-test"
# CapEff of a root shell: every capability up to CAP_CHECKPOINT_RESTORE (40).
ALL_CAPS = "000001ffffffffff"
V1_MOUNTS = "".join(
    f"cgroup /sys/fs/cgroup/{c} cgroup rw,relatime,{c} 0 0\n"
    for c in ("cpu", "cpuacct", "memory", "freezer", "pids")
)


def _fake_bcc(where: str = "/usr/lib/python3/dist-packages/bcc/__init__.py") -> ModuleType:
    module = ModuleType("bcc")
    module.__file__ = where
    module.__version__ = "0.26.0"  # type: ignore[attr-defined]
    return module


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _host(tmp_path: Path, **overrides: object) -> Host:
    """A healthy v1 host: matching headers, BTF, every tracepoint, Debian bcc, root."""
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    modules, cgroup, tracefs = tmp_path / "modules", tmp_path / "cgroup", tmp_path / "tracing"
    _touch(proc / "self" / "status", f"Name:\tpython\nCapEff:\t{ALL_CAPS}\n")
    _touch(proc / "self" / "mounts", V1_MOUNTS)
    _touch(proc / "sys" / "kernel" / "bpf_stats_enabled", "0\n")
    btf = sys_root / "kernel" / "btf" / "vmlinux"
    btf.parent.mkdir(parents=True, exist_ok=True)
    btf.write_bytes(blob())
    _touch(modules / RELEASE / "build" / "include" / "generated" / "utsrelease.h",
           f'#define UTS_RELEASE "{RELEASE}"\n')  # fmt: skip
    _touch(cgroup / "pids" / "tasks")
    _touch(cgroup / "cpu" / "cpu.cfs_quota_us", "-1\n")
    for sig in CATALOGUE:
        for tp in sig.tracepoints:
            _touch(tracefs.joinpath("events", *tp.split(":"), "format"))
    fields: dict[str, object] = {
        "proc": proc,
        "sys": sys_root,
        "modules": modules,
        "cgroup": cgroup,
        "tracefs": tracefs,
        "release": RELEASE,
        "euid": 0,
        "import_bcc": _fake_bcc,
        "pidfd_open": os.pidfd_open,
    }
    fields.update(overrides)
    return Host(**fields)  # type: ignore[arg-type]


def _by_name(checks: tuple[Check, ...] | list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_healthy_host_runs_every_signal_in_the_kernel(tmp_path: Path) -> None:
    report = gather(_host(tmp_path))
    assert report.kernel_ok
    assert all(c.status == "ok" for c in report.checks), render(report.checks, report.signals)
    assert {s.where for s in report.signals} == {"kernel"}


def test_missing_btf_fails_the_funnel_loudly(tmp_path: Path) -> None:
    """Without BTF the kernel filter cannot learn where a task's birth is: it must not load
    (and guess offsets from headers that may be another kernel's)."""
    host = _host(tmp_path)
    (host.sys / "kernel" / "btf" / "vmlinux").unlink()
    report = gather(host)
    check = _by_name(report.checks)["btf"]
    assert check.status == "fail" and "birth" in check.detail
    assert not report.kernel_ok


def test_a_missing_tracepoint_sends_only_its_signals_to_the_sampler(tmp_path: Path) -> None:
    host = _host(tmp_path)
    assert host.tracefs is not None
    (host.tracefs / "events" / "kmem" / "rss_stat" / "format").unlink()
    report = gather(host)
    check = _by_name(report.checks)["tracepoint kmem:rss_stat"]
    assert check.status == "warn"
    assert "missing" in check.detail and "rss" in check.detail
    plans = {s.name: s for s in report.signals}
    assert plans["rss"].where == "sampled (/proc)"
    assert "kmem:rss_stat" in plans["rss"].reason
    assert plans["fork_rate"].where == "kernel"
    assert report.kernel_ok


def test_tracepoint_lines_name_every_signal_needing_them(tmp_path: Path) -> None:
    checks = _by_name(gather(_host(tmp_path)).checks)
    fork = checks["tracepoint sched:sched_process_fork"]
    assert fork.status == "ok"
    for name in ("fork_rate", "fork_rate_cgroup", "exec_rate", "churn"):
        assert name in fork.detail


def test_unmounted_tracefs_fails_and_nothing_runs_in_the_kernel(tmp_path: Path) -> None:
    report = gather(_host(tmp_path, tracefs=tmp_path / "no-tracefs"))
    checks = _by_name(report.checks)
    assert checks["tracefs"].status == "fail"
    assert checks["tracepoint sched:sched_process_fork"].status == "fail"
    assert not report.kernel_ok
    assert {s.where for s in report.signals} == {"sampled (/proc)"}


def test_headers_symlinked_to_another_kernel_warn_with_both_versions(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    other = tmp_path / "src" / "linux-headers-6.1.0-57-amd64"
    other.mkdir(parents=True)
    (modules / RELEASE).mkdir(parents=True)
    (modules / RELEASE / "build").symlink_to(other)
    check = check_headers(RELEASE, modules, tmp_path / "sys")
    assert check.status == "warn"
    assert check.detail == (
        f"headers are for 6.1.0-57-amd64, kernel is {RELEASE}: "
        "programs compile, struct layouts may differ"
    )


def test_utsrelease_wins_over_the_symlink_name(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    other = tmp_path / "src" / "linux-headers-custom"
    _touch(other / "include" / "generated" / "utsrelease.h", f'#define UTS_RELEASE "{RELEASE}"')
    (modules / RELEASE).mkdir(parents=True)
    (modules / RELEASE / "build").symlink_to(other)
    assert check_headers(RELEASE, modules, tmp_path / "sys").status == "ok"


def test_no_headers_fail_unless_the_kernel_carries_its_own(tmp_path: Path) -> None:
    modules, sys_root = tmp_path / "modules", tmp_path / "sys"
    assert check_headers(RELEASE, modules, sys_root).status == "fail"
    _touch(sys_root / "kernel" / "kheaders.tar.xz")
    assert check_headers(RELEASE, modules, sys_root).status == "warn"


def test_bcc_import_failing_fails_and_names_the_debian_package(tmp_path: Path) -> None:
    def broken() -> ModuleType:
        raise ImportError("No module named 'bcc'")

    report = gather(_host(tmp_path, import_bcc=broken))
    check = _by_name(report.checks)["bcc"]
    assert check.status == "fail"
    assert "python3-bpfcc" in check.detail
    assert not report.kernel_ok
    assert all(s.reason == "bcc failed (see above)" for s in report.signals)


def test_bcc_from_pypi_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "venv" / "site-packages" / "bcc" / "__init__.py"
    check = check_bcc(lambda: _fake_bcc(str(where)))
    assert check.status == "fail"
    assert "PyPI's bcc is an unrelated project" in check.detail


def test_bcc_version_comes_from_the_lookup_when_the_module_has_none() -> None:
    module = ModuleType("bcc")
    module.__file__ = "/usr/lib/python3/dist-packages/bcc/__init__.py"
    check = check_bcc(lambda: module, version=lambda _m: "0.26.0+ds-1")
    assert check.status == "ok"
    assert check.detail.startswith("0.26.0+ds-1 from ")


def test_non_root_fails_privileges(tmp_path: Path) -> None:
    _touch(tmp_path / "self" / "status", "CapEff:\t0000000000000000\n")
    check = check_privileges(1000, tmp_path)
    assert check.status == "fail"
    assert "euid 1000" in check.detail


def test_capabilities_are_decoded_by_bit(tmp_path: Path) -> None:
    # CAP_BPF (39) and CAP_PERFMON (38) without CAP_SYS_ADMIN still load; CAP_KILL (5) missing.
    caps = (1 << 39) | (1 << 38) | (1 << 19)
    _touch(tmp_path / "self" / "status", f"CapEff:\t{caps:016x}\n")
    check = check_privileges(0, tmp_path)
    assert check.status == "warn"
    assert "missing CAP_KILL CAP_SYS_ADMIN" in check.detail
    _touch(tmp_path / "self" / "status", f"CapEff:\t{1 << 5:016x}\n")
    assert check_privileges(0, tmp_path).status == "fail"


def test_cgroup_v2_lists_the_root_controllers(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    _touch(cgroup / "cgroup.controllers", "cpuset cpu io memory pids\n")
    checks = check_cgroups(cgroup, tmp_path / "proc")
    assert checks == [Check("cgroups", "ok", f"v2 at {cgroup}: cpuset cpu io memory pids")]


def test_cgroup_v2_warns_when_the_quarantine_root_has_processes(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    _touch(cgroup / "cgroup.controllers", "cpu memory pids\n")
    _touch(cgroup / "remedy" / "cgroup.procs", "")
    assert [c.name for c in check_cgroups(cgroup, tmp_path / "proc")] == ["cgroups"]
    _touch(cgroup / "remedy" / "cgroup.procs", "4242\n")
    checks = _by_name(check_cgroups(cgroup, tmp_path / "proc"))
    assert checks["quarantine root"].status == "warn"
    assert "processes of its own" in checks["quarantine root"].detail


def test_cgroup_v2_without_pids_fails(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    _touch(cgroup / "cgroup.controllers", "memory\n")
    (check,) = check_cgroups(cgroup, tmp_path / "proc")
    assert check.status == "fail"
    assert "pids" in check.detail


def test_hybrid_cgroups_report_v1_and_warn_about_the_empty_unified(tmp_path: Path) -> None:
    host = _host(tmp_path)
    _touch(host.cgroup / "unified" / "cgroup.controllers", "")
    checks = _by_name(check_cgroups(host.cgroup, host.proc))
    assert checks["cgroups"].status == "ok"
    assert checks["cgroups"].detail.startswith(f"v1 at {host.cgroup}: cpu, pids, memory, freezer")
    assert checks["cgroup hybrid"] == Check(
        "cgroup hybrid",
        "warn",
        f"cgroup2 at {host.cgroup / 'unified'} has no pids/cpu controllers: using v1",
    )


def test_v1_without_freezer_warns(tmp_path: Path) -> None:
    host = _host(tmp_path)
    _touch(host.proc / "self" / "mounts", V1_MOUNTS.replace("freezer", "devices"))
    checks = _by_name(check_cgroups(host.cgroup, host.proc))
    assert checks["cgroups"].status == "warn"
    assert "missing freezer" in checks["cgroups"].detail


def test_no_cgroups_fail_without_stopping_the_funnel(tmp_path: Path) -> None:
    report = gather(_host(tmp_path, cgroup=tmp_path / "nothing"))
    assert _by_name(report.checks)["cgroups"].status == "fail"
    assert report.kernel_ok


def test_pidfd_failing_warns(tmp_path: Path) -> None:
    def refuse(_pid: int) -> int:
        raise OSError(38, "Function not implemented")

    check = _by_name(gather(_host(tmp_path, pidfd_open=refuse)).checks)["pidfd"]
    assert check.status == "warn"


def test_old_kernel_has_no_ring_buffer(tmp_path: Path) -> None:
    report = gather(_host(tmp_path, release="5.4.0-1"))
    assert _by_name(report.checks)["ring buffer"].status == "fail"
    assert not report.kernel_ok


def test_kernel_version_parses_the_leading_numbers() -> None:
    assert kernel_version("6.18.44-fc-v1252") == (6, 18, 44)
    assert kernel_version("5.8") == (5, 8)
    assert kernel_version("weird") == ()


def test_exit_code_and_text(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_doctor(host=_host(tmp_path), out=out) == 0
    text = out.getvalue()
    assert "ok    tracepoint sched:sched_process_fork" in text
    assert "kernel funnel can run" in text


def test_exit_code_is_one_when_nothing_can_run(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_doctor(host=_host(tmp_path, euid=1000), out=out) == 1
    assert "sampled (/proc): privileges failed (see above)" in out.getvalue()


def test_json_carries_checks_and_signals(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_doctor(as_json=True, host=_host(tmp_path), out=out) == 0
    data = json.loads(out.getvalue())
    assert data["kernel_ok"] is True
    (btf,) = [c for c in data["checks"] if c["name"] == "btf"]
    assert btf["status"] == "ok" and "start_boottime at 1560" in btf["detail"]
    assert [s["name"] for s in data["signals"]] == [s.name for s in CATALOGUE]


@pytest.mark.parametrize("status", ["ok", "warn", "fail"])
def test_render_puts_the_status_first(status: str) -> None:
    line = render([Check("x", status, "detail")], [])  # type: ignore[arg-type]
    assert line.splitlines()[0].split() == [status, "x", "detail"]
