"""Giving back the memory that compiling the kernel program leaves in the agent (issue 12, item 9).

bcc compiles ``bpf/remedy.bpf.c`` in-process with clang and LLVM, once, at start. Measured on the
bench VM (docs/memory.md), that leaves in a steady agent:

- about 40 MiB of compiler heap that was freed but that glibc keeps under the top of its heap:
  ``malloc_trim(0)`` returns it to the kernel;
- about 60 MiB of libLLVM and libclang-cpp *text* mapped resident: clean pages of the library
  files, which only a recompile runs again (a reload only writes maps). They are unmapped here;
  a recompile faults them back in from the page cache or the disk, nothing else changes.

What is never dropped: a mapping of those libraries that holds anonymous (or swapped) pages,
such as the relocated read-only data (RELRO) the dynamic linker wrote. ``MADV_DONTNEED`` on a
private file mapping replaces written pages with the file's bytes: relocated pointers would
become the file's unrelocated ones (a crash at the next call into LLVM). Writable mappings are
skipped for the same reason.

Everything here is best-effort: a libc without ``malloc_trim`` (musl) or a kernel without
``MADV_PAGEOUT`` gives back less, never fails the agent.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "COMPILER_LIBRARIES",
    "Libc",
    "Mapping",
    "Released",
    "Usage",
    "breakdown",
    "droppable",
    "parse_smaps",
    "release_compiler_memory",
    "resident",
    "usage",
]

log = logging.getLogger(__name__)

# Shared objects only the compiler runs (by file name prefix). libbcc itself stays: it polls
# the ring buffer, reads maps and symbolizes stacks all the time.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4; EINVAL before
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


@dataclass(frozen=True)
class Usage:
    """Resident memory in KiB: anonymous (heap, Python objects, relocated data) and the rest
    (file pages: the interpreter, libraries)."""

    rss_kib: int
    anon_kib: int

    @property
    def file_kib(self) -> int:
        return self.rss_kib - self.anon_kib

    def mib(self) -> str:
        """``123.4 MiB (anon 45.6, file 77.8)``."""
        return (
            f"{self.rss_kib / 1024:.1f} MiB (anon {self.anon_kib / 1024:.1f}, "
            f"file {self.file_kib / 1024:.1f})"
        )


@dataclass(frozen=True)
class Mapping:
    """One entry of /proc/PID/smaps: its range, permissions, path and resident KiB."""

    start: int
    end: int
    perms: str
    path: str
    rss_kib: int = 0
    anon_kib: int = 0
    swap_kib: int = 0

    @property
    def name(self) -> str:
        """The file name (``libLLVM-14.so.1``), or the pseudo-name (``[heap]``, ``""``)."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Released:
    """What :func:`release_compiler_memory` gave back, in KiB of RSS."""

    heap_kib: int  # malloc_trim and the garbage collector
    text_kib: int  # compiler text unmapped
    mappings: int  # compiler mappings unmapped
    after: Usage

    def line(self) -> str:
        """The start-up line the agent prints."""
        return (
            f"memory: gave back {(self.heap_kib + self.text_kib) / 1024:.0f} MiB after compiling "
            f"(heap {self.heap_kib / 1024:.0f}, compiler text {self.text_kib / 1024:.0f} in "
            f"{self.mappings} mapping(s)); RSS now {self.after.mib()}"
        )


class Libc(Protocol):
    """The two libc calls used, so tests can watch what is asked of the kernel."""

    def malloc_trim(self, pad: int) -> int: ...

    def madvise(self, start: int, length: int, advice: int) -> int: ...


class _SystemLibc:
    """The process's own libc through ctypes; missing calls become no-ops."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self._trim = getattr(lib, "malloc_trim", None)  # glibc only
        self._madvise = lib.madvise
        self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self._madvise.restype = ctypes.c_int

    def malloc_trim(self, pad: int) -> int:
        return int(self._trim(ctypes.c_size_t(pad))) if self._trim is not None else 0

    def madvise(self, start: int, length: int, advice: int) -> int:
        if self._madvise(start, length, advice) == 0:
            return 0
        return ctypes.get_errno()


def parse_smaps(text: str) -> list[Mapping]:
    """Mappings of a /proc/PID/smaps text (fields by name; the path is everything after the
    inode, so a path with spaces survives)."""
    found: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    sizes: dict[str, int] = {}

    def flush() -> None:
        if head is not None:
            found.append(
                Mapping(
                    *head,
                    rss_kib=sizes.get("Rss", 0),
                    anon_kib=sizes.get("Anonymous", 0),
                    swap_kib=sizes.get("Swap", 0),
                )
            )

    for line in text.split("\n"):
        match = _RANGE.match(line)
        if match:
            flush()
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            head = (int(match.group(1), 16), int(match.group(2), 16), match.group(3), path)
            sizes = {}
        elif line.endswith(" kB"):
            key, _, value = line.partition(":")
            sizes[key] = int(value.split()[0])
    flush()
    return found


def droppable(mapping: Mapping, libraries: Sequence[str] = COMPILER_LIBRARIES) -> bool:
    """Whether unmapping ``mapping`` is both useful and safe: a compiler library's read-only,
    file-backed pages, resident, none of them written (anonymous) or swapped."""
    return (
        mapping.path.startswith("/")
        and mapping.name.startswith(tuple(libraries))
        and "w" not in mapping.perms
        and mapping.rss_kib > 0
        and mapping.anon_kib == 0
        and mapping.swap_kib == 0
    )


def _drop(mapping: Mapping, libc: Libc) -> bool:
    length = mapping.end - mapping.start
    # PAGEOUT first: pages no other process maps leave the page cache too (memory the host gets
    # back). It skips shared pages, so DONTNEED then unmaps whatever is left from this process.
    libc.madvise(mapping.start, length, MADV_PAGEOUT)
    err = libc.madvise(mapping.start, length, MADV_DONTNEED)
    if err:
        log.warning("madvise(DONTNEED) of %s failed (errno %d)", mapping.path, err)
    return err == 0


def usage(rollup: Path = Path("/proc/self/smaps_rollup")) -> Usage:
    """Resident memory now, from smaps_rollup (one read; the kernel walks the page tables)."""
    sizes: dict[str, int] = {}
    for line in rollup.read_text().split("\n"):
        key, _, value = line.partition(":")
        if value.endswith(" kB"):
            sizes[key] = int(value.split()[0])
    return Usage(sizes.get("Rss", 0), sizes.get("Anonymous", 0))


def resident(statm: Path = Path("/proc/self/statm")) -> Usage:
    """Resident memory now from statm: kept counters, no page-table walk (smaps_rollup costs
    ~1 ms a read), so cheap enough for a snapshot a second. ``shared`` there is RssFile +
    RssShmem, so resident minus shared is the anonymous part."""
    fields = statm.read_text().split()
    page_kib = _PAGE_SIZE // 1024
    rss, shared = int(fields[1]) * page_kib, int(fields[2]) * page_kib
    return Usage(rss, rss - shared)


def release_compiler_memory(
    proc_self: Path = Path("/proc/self"),
    libc: Libc | None = None,
    libraries: Sequence[str] = COMPILER_LIBRARIES,
) -> Released | None:
    """Return the compiler's leftovers to the kernel: the freed heap, then the compiler's clean
    text. Call once the program is loaded, before other threads start. None when /proc cannot
    be read (nothing was done)."""
    try:
        libc = libc or _SystemLibc()
        before = usage(proc_self / "smaps_rollup")
        gc.collect()  # objects freed with the compile (the parsed BTF) first, then the heap
        libc.malloc_trim(0)
        trimmed = usage(proc_self / "smaps_rollup")
        dropped = [
            m
            for m in parse_smaps((proc_self / "smaps").read_text())
            if droppable(m, libraries) and _drop(m, libc)
        ]
        after = usage(proc_self / "smaps_rollup")
    except OSError as err:
        log.warning("could not give back compiler memory: %s", err)
        return None
    return Released(
        heap_kib=max(0, before.rss_kib - trimmed.rss_kib),
        text_kib=sum(m.rss_kib for m in dropped),
        mappings=len(dropped),
        after=after,
    )


# The groups `make bench` and docs/memory.md report, first match wins.
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LLVM/clang", COMPILER_LIBRARIES),
    ("bcc/libbpf", ("libbcc", "libbpf")),
    ("python", ("python3", "libpython")),
)


def breakdown(mappings: Iterable[Mapping]) -> dict[str, Usage]:
    """RSS by what it is made of: ``[heap]``, other anonymous memory (Python's arenas, thread
    stacks, malloc arenas), LLVM/clang, bcc/libbpf, the interpreter, extension modules
    (``.so`` under site-packages or lib-dynload), other files."""
    groups: dict[str, list[int]] = {}
    for m in mappings:
        group = _group(m)
        rss, anon = groups.setdefault(group, [0, 0])
        groups[group] = [rss + m.rss_kib, anon + m.anon_kib]
    return {name: Usage(rss, anon) for name, (rss, anon) in groups.items()}


def _group(m: Mapping) -> str:
    if not m.path.startswith("/"):
        return "[heap]" if m.path == "[heap]" else "other anonymous"
    for group, prefixes in _GROUPS:
        if m.name.startswith(prefixes):
            return group
    if "site-packages/" in m.path or "lib-dynload/" in m.path:
        return "python extensions"
    return "other files"
