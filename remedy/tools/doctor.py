"""``remedy doctor``: what this host offers remedy, as checks with a status and one line each.

Every check is a pure function of injectable roots (``/proc``, ``/sys``, tracefs, ``/lib/modules``,
the cgroup mount) and callables (importing bcc, opening a pidfd), so tests point them at fixture
trees. :func:`gather` runs them all against a :class:`Host`; :func:`render` prints plain text;
:func:`run_doctor` is the command.

Statuses: ``ok``; ``warn`` when remedy runs but something is degraded (a signal falls back to the
/proc sampler, an action is unavailable, struct layouts may differ); ``fail`` when a thing is
missing outright. The exit code only looks at what the kernel funnel needs (:data:`FUNNEL_CHECKS`
and at least one signal able to run in the kernel): a host with no usable cgroups can still sense.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal, TextIO

from remedy.actions.cgroups import detect
from remedy.errors import RemedyError, SensorError
from remedy.proc import ProcFS
from remedy.sensors.bpf import tracefs_root
from remedy.sensors.btf import task_offsets
from remedy.sensors.catalog import CATALOGUE, Signal

__all__ = [
    "FUNNEL_CHECKS",
    "Check",
    "Host",
    "Report",
    "SignalPlan",
    "check_bcc",
    "check_bpf_sysctls",
    "check_btf",
    "check_cgroups",
    "check_headers",
    "check_kernel",
    "check_pidfd",
    "check_privileges",
    "check_ringbuf",
    "check_tracefs",
    "check_tracepoints",
    "gather",
    "kernel_version",
    "plan_signals",
    "render",
    "run_doctor",
    "to_json",
]

Status = Literal["ok", "warn", "fail"]

# Debian's python3-bpfcc installs here. PyPI's "bcc" is an unrelated project that shadows it.
DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
# The checks whose failure stops any kernel program from loading.
FUNNEL_CHECKS = ("headers", "btf", "tracefs", "bcc", "privileges", "ring buffer")
# include/uapi/linux/capability.h
_CAPS = {
    "CAP_KILL": 5,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
# The v1 hierarchies remedy's actions use: pids and cpu to quarantine, memory and freezer to
# freeze or report.
_V1_CONTROLLERS = ("cpu", "pids", "memory", "freezer")
# BPF_MAP_TYPE_RINGBUF arrived in Linux 5.8 (commit 457f44363a88).
_RINGBUF_SINCE = (5, 8)


@dataclass(frozen=True)
class Check:
    """One thing the doctor looked at: ``name`` (stable, for automation), status, one line."""

    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class SignalPlan:
    """Where one catalogue signal would be counted on this host, and why."""

    name: str
    section: str
    where: Literal["kernel", "sampled (/proc)"]
    reason: str


@dataclass(frozen=True)
class Report:
    """Every check, every signal's plan, and whether the kernel funnel can run."""

    checks: tuple[Check, ...]
    signals: tuple[SignalPlan, ...]
    kernel_ok: bool


def _import_bcc() -> ModuleType:
    return importlib.import_module("bcc")


@dataclass(frozen=True)
class Host:
    """Where to look. The defaults describe the running host; tests replace every field."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    modules: Path = Path("/lib/modules")
    cgroup: Path = Path("/sys/fs/cgroup")
    tracefs: Path | None = None  # None: find the mounted tracefs like the sensors do
    release: str | None = None  # None: os.uname().release
    euid: int | None = None  # None: os.geteuid()
    import_bcc: Callable[[], ModuleType] = _import_bcc
    pidfd_open: Callable[[int], int] | None = field(
        default_factory=lambda: getattr(os, "pidfd_open", None)
    )
    catalogue: tuple[Signal, ...] = CATALOGUE


def _is_file(path: Path) -> bool:
    """Path.is_file, but an unreadable parent (EACCES) counts as missing instead of raising."""
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but an unreadable parent (EACCES) counts as missing instead of raising."""
    try:
        return path.is_dir()
    except OSError:
        return False


# --- kernel ----------------------------------------------------------------------------------


def kernel_version(release: str) -> tuple[int, ...]:
    """The leading numbers of a release string: "6.18.44-fc-v1252" -> (6, 18, 44)."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", release)
    if match is None:
        return ()
    return tuple(int(g) for g in match.groups() if g is not None)


def check_kernel(release: str) -> Check:
    """The running kernel's release (information)."""
    return Check("kernel", "ok", release)


def _headers_release(build: Path) -> str | None:
    """Which kernel the headers at ``build`` are for: their utsrelease.h, else the symlink name."""
    uts = build / "include" / "generated" / "utsrelease.h"
    with contextlib.suppress(OSError):
        match = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
        if match:
            return match.group(1)
    if build.is_symlink():
        name = Path(os.readlink(build)).name
        match = re.fullmatch(r"linux-headers-(.+)", name)
        return match.group(1) if match else None
    return None


def check_headers(release: str, modules: Path, sys_root: Path) -> Check:
    """Kernel headers at modules/<release>/build, which bcc compiles every program against."""
    build = modules / release / "build"
    if not _is_dir(build):
        # CONFIG_IKHEADERS: bcc extracts /sys/kernel/kheaders.tar.xz when no headers are installed.
        if _is_file(sys_root / "kernel" / "kheaders.tar.xz"):
            return Check("headers", "warn", f"no {build}; bcc will use /sys/kernel/kheaders.tar.xz")
        return Check("headers", "fail", f"no {build}: bcc cannot compile (install kernel headers)")
    found = _headers_release(build)
    if found is None:
        return Check("headers", "warn", f"{build} exists but does not say which kernel it is for")
    if found != release:
        return Check(
            "headers",
            "warn",
            f"headers are for {found}, kernel is {release}: "
            "programs compile, struct layouts may differ",
        )
    return Check("headers", "ok", f"{build} matches {release}")


def check_btf(sys_root: Path) -> Check:
    """/sys/kernel/btf/vmlinux: the kernel's own type information, where the kernel filter
    learns task_struct's layout (a process's birth) whatever headers are installed."""
    btf = sys_root / "kernel" / "btf" / "vmlinux"
    if not _is_file(btf):
        return Check(
            "btf",
            "fail",
            f"no {btf}: kernel built without CONFIG_DEBUG_INFO_BTF; the kernel filter cannot "
            "name processes by (pid, birth), so it will not load (the /proc sampler runs)",
        )
    try:
        offsets = task_offsets(btf)
    except SensorError as err:
        return Check("btf", "fail", f"{btf}: {err}")
    return Check(
        "btf",
        "ok",
        f"{btf}: task_struct start_boottime at {offsets.start_boottime}, "
        f"group_leader at {offsets.group_leader}, real_parent at {offsets.real_parent}",
    )


def check_ringbuf(release: str) -> Check:
    """BPF ring buffer support, judged by version: records leave the kernel through one."""
    version = kernel_version(release)
    if version >= _RINGBUF_SINCE:
        return Check("ring buffer", "ok", f"BPF_MAP_TYPE_RINGBUF (kernel {release} >= 5.8)")
    return Check("ring buffer", "fail", f"kernel {release} predates BPF ring buffers (5.8)")


# --- tracefs ---------------------------------------------------------------------------------


def check_tracefs(tracefs: Path | None) -> tuple[Check, Path | None]:
    """The mounted tracefs (``None``: find it like the sensors do); and its root if usable."""
    try:
        if tracefs is None:
            tracefs = tracefs_root()
        if not (tracefs / "events").is_dir():
            return Check("tracefs", "fail", f"{tracefs}/events does not exist: not mounted"), None
    except SensorError as err:
        return Check("tracefs", "fail", str(err)), None
    except OSError as err:
        # tracefs is mode 0700 root: a non-root user cannot even tell whether it is mounted.
        return Check("tracefs", "fail", f"cannot read tracefs ({err.strerror}): run as root"), None
    return Check("tracefs", "ok", str(tracefs)), tracefs


def _tracepoint_users(catalogue: Sequence[Signal]) -> dict[str, list[str]]:
    """Each tracepoint the catalogue uses, in order of first use, with the signals needing it."""
    users: dict[str, list[str]] = {}
    for sig in catalogue:
        for tp in sig.tracepoints:
            users.setdefault(tp, []).append(sig.name)
    return users


def check_tracepoints(
    tracefs: Path | None, catalogue: Sequence[Signal]
) -> tuple[list[Check], set[str]]:
    """One check per tracepoint the catalogue uses; and the set of those present."""
    checks: list[Check] = []
    present: set[str] = set()
    for tp, names in _tracepoint_users(catalogue).items():
        needed = f"for {', '.join(names)}"
        if tracefs is None:
            checks.append(Check(f"tracepoint {tp}", "fail", f"tracefs unavailable; {needed}"))
            continue
        category, event = tp.split(":", 1)
        fmt = tracefs / "events" / category / event / "format"
        if _is_file(fmt):
            present.add(tp)
            checks.append(Check(f"tracepoint {tp}", "ok", needed))
        else:
            # A missing tracepoint degrades its signals to the sampler rather than stopping remedy.
            checks.append(Check(f"tracepoint {tp}", "warn", f"missing ({fmt}); {needed}"))
    return checks, present


# --- bcc -------------------------------------------------------------------------------------


def _bcc_version(module: ModuleType) -> str | None:
    """bcc's version: its ``__version__``, its package metadata, or Debian's package database."""
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("bcc")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "python3-bpfcc"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return out or None
    return None


def check_bcc(
    import_bcc: Callable[[], ModuleType],
    debian_dir: Path = DEBIAN_DIST_PACKAGES,
    version: Callable[[ModuleType], str | None] = _bcc_version,
) -> Check:
    """Whether ``import bcc`` works and yields Debian's python3-bpfcc."""
    try:
        module = import_bcc()
    except Exception as err:  # bcc also raises OSError/AttributeError when libbcc is missing
        return Check(
            "bcc",
            "fail",
            f"python cannot import bcc ({err}); install Debian's python3-bpfcc",
        )
    where_s = getattr(module, "__file__", None)
    if where_s is None:
        return Check("bcc", "fail", "bcc has no __file__: not Debian's python3-bpfcc")
    # realpath: a venv may reach dist-packages through a symlink or .pth file.
    where = Path(os.path.realpath(where_s))
    if not where.is_relative_to(debian_dir):
        return Check(
            "bcc",
            "fail",
            f"bcc from {where.parent}, not {debian_dir}: PyPI's bcc is an unrelated project; "
            "pip uninstall bcc and install Debian's python3-bpfcc",
        )
    v = version(module)
    return Check("bcc", "ok", f"{v or 'version unknown'} from {where.parent}")


# --- privileges ------------------------------------------------------------------------------


def _cap_eff(proc: Path) -> int | None:
    with contextlib.suppress(OSError):
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return None


def check_privileges(euid: int, proc: Path) -> Check:
    """Effective uid and the capabilities loading programs and acting need."""
    caps = _cap_eff(proc)
    if caps is None:
        held, missing = "CapEff unreadable", list(_CAPS)
    else:
        has = [n for n, bit in _CAPS.items() if caps >> bit & 1]
        missing = [n for n in _CAPS if n not in has]
        held = " ".join(has)
    if not held:
        detail = f"euid {euid}; none of {' '.join(_CAPS)}"
    else:
        detail = f"euid {euid}; {held}" + (f"; missing {' '.join(missing)}" if missing else "")
    if euid != 0:
        # remedy.sensors.bpf.load refuses to run as non-root: bcc needs root for its headers too.
        return Check("privileges", "fail", f"{detail}: run as root")
    # Before 5.8 CAP_SYS_ADMIN was the only way; after, CAP_BPF with CAP_PERFMON for tracing.
    can_load = "CAP_SYS_ADMIN" not in missing or not {"CAP_BPF", "CAP_PERFMON"} & set(missing)
    if not can_load:
        return Check("privileges", "fail", f"{detail}: cannot load tracing programs")
    if missing:
        return Check("privileges", "warn", detail)
    return Check("privileges", "ok", detail)


def check_bpf_sysctls(proc: Path) -> Check:
    """kernel.bpf_stats_enabled and kernel.unprivileged_bpf_disabled (information)."""
    values = []
    for name in ("bpf_stats_enabled", "unprivileged_bpf_disabled"):
        try:
            value = (proc / "sys" / "kernel" / name).read_text().strip()
        except OSError:
            value = "unknown"
        values.append(f"{name}={value}")
    return Check("bpf sysctls", "ok", ", ".join(values))


def check_pidfd(pidfd_open: Callable[[int], int] | None) -> Check:
    """Whether offenders can be signalled through a pidfd (no pid-reuse race)."""
    if pidfd_open is None:
        return Check("pidfd", "warn", "os.pidfd_open missing: signals go by pid and start time")
    try:
        fd = pidfd_open(os.getpid())
    except OSError as err:
        return Check("pidfd", "warn", f"pidfd_open failed ({err.strerror}): signals go by pid")
    os.close(fd)
    if not hasattr(signal, "pidfd_send_signal"):
        return Check("pidfd", "warn", "signal.pidfd_send_signal missing: signals go by pid")
    return Check("pidfd", "ok", "pidfd_open and pidfd_send_signal work")


# --- cgroups ---------------------------------------------------------------------------------


def _v1_mounted(proc: Path) -> set[str]:
    """The v1 controllers mounted, from the options of /proc/self/mounts' cgroup lines."""
    mounted: set[str] = set()
    with contextlib.suppress(OSError):
        for line in (proc / "self" / "mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup":
                mounted.update(fields[3].split(","))
    return mounted & set(_V1_CONTROLLERS)


def check_cgroups(cgroup: Path, proc: Path) -> list[Check]:
    """The hierarchy remedy's cgroup actions would use, its controllers, and hybrid layouts."""
    try:
        driver = detect(cgroup, ProcFS(proc))
    except RemedyError as err:
        # Quarantines need cgroups; sensing does not, so this is not a funnel check.
        return [Check("cgroups", "fail", str(err))]
    checks: list[Check] = []
    if driver.version == 2:
        controllers = (cgroup / "cgroup.controllers").read_text().split()
        checks.append(Check("cgroups", "ok", f"v2 at {driver.root}: {' '.join(controllers)}"))
        quarantine = cgroup / "remedy"  # the default --quarantine-root
        with contextlib.suppress(OSError):
            if (quarantine / "cgroup.procs").read_text().split():
                # Found by make vmtest: v2 gives controllers to children only in a cgroup with
                # no processes of its own, so no quarantine can be made below this one.
                checks.append(
                    Check("quarantine root", "warn", f"{quarantine} has processes of its own")
                )
        return checks
    mounted = _v1_mounted(proc)
    absent = [c for c in _V1_CONTROLLERS if c not in mounted]
    have = ", ".join(c for c in _V1_CONTROLLERS if c in mounted) or "none in /proc/self/mounts"
    detail = f"v1 at {driver.root}: {have} mounted"
    if absent:
        checks.append(Check("cgroups", "warn", f"{detail}; missing {', '.join(absent)}"))
    else:
        checks.append(Check("cgroups", "ok", detail))
    unified = cgroup / "unified"
    if _is_file(unified / "cgroup.controllers"):
        with contextlib.suppress(OSError):
            extra = (unified / "cgroup.controllers").read_text().split()
            has = f" (only {' '.join(extra)})" if extra else ""
            checks.append(
                Check(
                    "cgroup hybrid",
                    "warn",
                    f"cgroup2 at {unified} has no pids/cpu controllers{has}: using v1",
                )
            )
    return checks


# --- signals ---------------------------------------------------------------------------------


def plan_signals(
    catalogue: Sequence[Signal], present: set[str], blockers: Sequence[Check]
) -> list[SignalPlan]:
    """For each signal, "kernel" when nothing blocks the funnel and its tracepoints exist."""
    plans: list[SignalPlan] = []
    blocking = [c for c in blockers if c.status == "fail"]
    for sig in catalogue:
        missing = [tp for tp in sig.tracepoints if tp not in present]
        if blocking:
            # The checks above carry the details; repeating them on every signal drowns them.
            why = f"{', '.join(c.name for c in blocking)} failed (see above)"
            plans.append(SignalPlan(sig.name, sig.section, "sampled (/proc)", why))
        elif missing:
            why = f"missing tracepoint(s) {', '.join(missing)}"
            plans.append(SignalPlan(sig.name, sig.section, "sampled (/proc)", why))
        else:
            plans.append(SignalPlan(sig.name, sig.section, "kernel", ", ".join(sig.tracepoints)))
    return plans


# --- the command -----------------------------------------------------------------------------


def gather(host: Host) -> Report:
    """Run every check against ``host``."""
    release = host.release or os.uname().release
    euid = os.geteuid() if host.euid is None else host.euid
    tracefs_check, tracefs = check_tracefs(host.tracefs)
    tracepoint_checks, present = check_tracepoints(tracefs, host.catalogue)
    checks = [
        check_kernel(release),
        check_headers(release, host.modules, host.sys),
        check_btf(host.sys),
        check_ringbuf(release),
        tracefs_check,
        *tracepoint_checks,
        check_bcc(host.import_bcc),
        check_privileges(euid, host.proc),
        check_bpf_sysctls(host.proc),
        check_pidfd(host.pidfd_open),
        *check_cgroups(host.cgroup, host.proc),
    ]
    funnel = [c for c in checks if c.name in FUNNEL_CHECKS]
    signals = plan_signals(host.catalogue, present, funnel)
    kernel_ok = all(c.status != "fail" for c in funnel) and any(
        s.where == "kernel" for s in signals
    )
    return Report(tuple(checks), tuple(signals), kernel_ok)


def render(checks: Sequence[Check], signals: Sequence[SignalPlan]) -> str:
    """Plain text: one line per check, then one per signal."""
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    lines.append("")
    lines.append("signals:")
    sig_width = max((len(s.name) for s in signals), default=0)
    for s in signals:
        lines.append(f"  {s.name:<{sig_width}}  {s.where}: {s.reason}")
    return "\n".join(lines)


def to_json(report: Report) -> str:
    """The report as JSON, for fleet automation."""
    return json.dumps(
        {
            "kernel_ok": report.kernel_ok,
            "checks": [asdict(c) for c in report.checks],
            "signals": [asdict(s) for s in report.signals],
        },
        indent=2,
    )


def run_doctor(
    *, as_json: bool = False, host: Host | None = None, out: TextIO | None = None
) -> int:
    """Print the report; 0 when the kernel funnel can run here, 1 otherwise."""
    report = gather(host or Host())
    stream = out or sys.stdout
    if as_json:
        print(to_json(report), file=stream)
    else:
        print(render(report.checks, report.signals), file=stream)
        verdict = "can run" if report.kernel_ok else "cannot run: every signal is sampled"
        print(f"\nkernel funnel {verdict}", file=stream)
    return 0 if report.kernel_ok else 1
