"""Loading kernel programs with bcc: find the source, check the hooks, compile, translate errors.

bcc is imported lazily so that everything but the kernel tier works (and is tested) without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remedy.errors import SensorError

_TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def bpf_dir() -> Path:
    """Where the ``*.bpf.c`` programs live: the source tree, or the installed wheel's data."""
    override = os.environ.get("REMEDY_BPF_DIR")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "bpf", here.parent / "_data" / "bpf"):
        if candidate.is_dir():
            return candidate
    raise SensorError(f"no bpf/ directory next to {here.parents[1]} or in the package data")


def program_path(name: str) -> Path:
    """The path of ``bpf/<name>.bpf.c``."""
    path = bpf_dir() / f"{name}.bpf.c"
    if not path.is_file():
        raise SensorError(f"kernel program {path} is missing")
    return path


def tracefs_root() -> Path:
    """The mounted tracefs; setup mounts it when missing."""
    for root in _TRACEFS_CANDIDATES:
        try:
            if (root / "events").is_dir():
                return root
        except PermissionError as err:
            raise SensorError(f"cannot read {root} ({err.strerror}): run as root") from err
    raise SensorError(
        "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing, or run make setup)"
    )


def require_tracepoint(category: str, event: str) -> None:
    """Fail with a message naming the hook when a tracepoint is missing on this kernel."""
    fmt = tracefs_root() / "events" / category / event / "format"
    if not fmt.is_file():
        raise SensorError(f"tracepoint {category}:{event} is not available on this kernel")


def tracepoint_has_field(category: str, event: str, field: str) -> bool:
    """Whether a tracepoint's format names ``field`` (fields are added across kernel versions,
    e.g. sched_process_exit's group_dead in 6.13)."""
    fmt = tracefs_root() / "events" / category / event / "format"
    try:
        text = fmt.read_text()
    except OSError:
        return False
    return any(
        line.split(";")[0].split()[-1:] == [field] for line in text.split("\n") if "field:" in line
    )


def render_source(name: str, defines: Mapping[str, int]) -> tuple[str, list[str]]:
    """The program text and the ``-D`` flags bcc will compile it with (for ``--ebpf``)."""
    text = program_path(name).read_text()
    return text, [f"-D{key}={value}" for key, value in sorted(defines.items())]


def load(name: str, defines: Mapping[str, int]) -> Any:
    """Compile and load ``bpf/<name>.bpf.c``; tracepoint probes attach automatically."""
    if os.geteuid() != 0:
        raise SensorError("loading BPF programs needs root (CAP_BPF and CAP_PERFMON)")
    try:
        from bcc import BPF  # noqa: PLC0415 - optional dependency, kernel tier only
    except ImportError as err:
        raise SensorError(
            "python cannot import bcc; install Debian's python3-bpfcc (never PyPI's 'bcc')"
        ) from err
    _, cflags = render_source(name, defines)
    try:
        return BPF(src_file=str(program_path(name)).encode(), cflags=cflags)
    except Exception as err:  # bcc raises bare Exception for compile and load errors
        raise SensorError(f"could not load {program_path(name)}: {err}") from err


def percpu_sums(table: Any, size: int) -> list[int]:
    """Sum a per-CPU array of u64 counters across CPUs."""
    sums = [0] * size
    for key, values in table.items():
        idx = key.value
        if idx < size:
            sums[idx] = sum(int(v) for v in values)
    return sums
