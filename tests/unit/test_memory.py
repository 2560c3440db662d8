"""Giving back the compiler's memory (remedy/sensors/memory.py): which mappings may be dropped,
and what is asked of the kernel, against a fake /proc/self and a fake libc."""

from __future__ import annotations

from pathlib import Path

from remedy.sensors import memory
from remedy.sensors.memory import MADV_DONTNEED, MADV_PAGEOUT, Mapping

LLVM = "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"
CLANG = "/usr/lib/llvm-14/lib/libclang-cpp.so.14"


def _entry(head: str, rss: int, anon: int = 0, swap: int = 0) -> str:
    return (
        f"{head}\nSize:  {rss * 2} kB\nRss:  {rss} kB\nPss:  {rss} kB\n"
        f"Anonymous:  {anon} kB\nSwap:  {swap} kB\nVmFlags: rd ex mr mw me\n"
    )


SMAPS = "".join(
    (
        _entry("00a85000-00aca000 rw-p 00000000 00:00 0                          [heap]", 276, 276),
        _entry(f"7f0000000000-7f0000100000 r-xp 00000000 fe:00 11    {LLVM}", 1024),
        # RELRO: read-only now, but the dynamic linker wrote relocations into it.
        _entry(f"7f0000100000-7f0000200000 r--p 00100000 fe:00 11    {LLVM}", 1024, 1000),
        _entry(f"7f0000200000-7f0000210000 rw-p 00200000 fe:00 11    {LLVM}", 64, 64),
        _entry(f"7f0000300000-7f0000380000 r-xp 00000000 fe:00 12    {CLANG}", 512),
        _entry(f"7f0000380000-7f0000390000 r--p 00080000 fe:00 12    {CLANG}", 16, 0, 16),
        _entry("7f0000400000-7f0000480000 r-xp 00000000 fe:00 13    /usr/lib/libbcc.so.0", 512),
        _entry("7f0000500000-7f0000600000 rw-p 00000000 00:00 0 ", 1024, 1024),
        _entry("7f0000600000-7f0000601000 r-xp 00000000 fe:00 14    /opt/a dir/libLLVM x.so", 4),
    )
)


def test_smaps_entries_are_parsed_by_field_name_with_paths_intact() -> None:
    maps = memory.parse_smaps(SMAPS)
    assert len(maps) == 9
    assert maps[0] == Mapping(0xA85000, 0xACA000, "rw-p", "[heap]", 276, 276, 0)
    assert (maps[2].perms, maps[2].anon_kib, maps[2].name) == ("r--p", 1000, "libLLVM-14.so.1")
    assert maps[5].swap_kib == 16
    assert maps[7].path == "" and maps[7].anon_kib == 1024
    assert maps[8].path == "/opt/a dir/libLLVM x.so" and maps[8].name == "libLLVM x.so"


def test_only_clean_read_only_compiler_mappings_are_droppable() -> None:
    maps = memory.parse_smaps(SMAPS)
    # Dropping the relocated (anonymous) pages would replace pointers with the file's bytes;
    # swapped ones would lose their contents; writable ones are data.
    assert [m.start for m in maps if memory.droppable(m)] == [
        0x7F0000000000,
        0x7F0000300000,
        0x7F0000600000,
    ]


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad, 0, 0))
        return 1

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls.append(("madvise", start, length, advice))
        return 0


def _proc_self(tmp_path: Path) -> Path:
    (tmp_path / "smaps").write_text(SMAPS)
    (tmp_path / "smaps_rollup").write_text(
        "00400000-7ffcc4220000 ---p 00000000 00:00 0    [rollup]\nRss:  4000 kB\n"
        "Anonymous:  1300 kB\nSwap:  0 kB\n"
    )
    return tmp_path


def test_release_trims_the_heap_then_unmaps_only_the_clean_compiler_text(tmp_path: Path) -> None:
    libc = FakeLibc()
    released = memory.release_compiler_memory(_proc_self(tmp_path), libc)
    assert released is not None
    assert libc.calls[0] == ("trim", 0, 0, 0)
    advised = [c[1:] for c in libc.calls[1:]]
    assert advised == [
        # PAGEOUT (frees the page cache too where no one else maps it), then DONTNEED.
        (0x7F0000000000, 0x100000, MADV_PAGEOUT),
        (0x7F0000000000, 0x100000, MADV_DONTNEED),
        (0x7F0000300000, 0x80000, MADV_PAGEOUT),
        (0x7F0000300000, 0x80000, MADV_DONTNEED),
        (0x7F0000600000, 0x1000, MADV_PAGEOUT),
        (0x7F0000600000, 0x1000, MADV_DONTNEED),
    ]
    assert (released.text_kib, released.mappings) == (1024 + 512 + 4, 3)
    assert released.after == memory.Usage(4000, 1300)
    assert "compiler text 2 in 3 mapping(s)" in released.line()


def test_a_failed_unmap_is_not_counted_and_no_proc_means_nothing_done(tmp_path: Path) -> None:
    class Refusing(FakeLibc):
        def madvise(self, start: int, length: int, advice: int) -> int:
            super().madvise(start, length, advice)
            return 22 if advice == MADV_DONTNEED else 0  # EINVAL

    released = memory.release_compiler_memory(_proc_self(tmp_path), Refusing())
    assert released is not None and (released.text_kib, released.mappings) == (0, 0)
    libc = FakeLibc()
    assert memory.release_compiler_memory(tmp_path / "missing", libc) is None
    assert libc.calls == []


def test_breakdown_groups_rss_by_what_it_is_made_of() -> None:
    groups = memory.breakdown(memory.parse_smaps(SMAPS))
    assert groups["LLVM/clang"] == memory.Usage(1024 + 1024 + 64 + 512 + 16 + 4, 1064)
    assert groups["[heap]"] == memory.Usage(276, 276)
    assert groups["bcc/libbpf"] == memory.Usage(512, 0)
    assert groups["other anonymous"] == memory.Usage(1024, 1024)
    assert groups["LLVM/clang"].file_kib == 1580


def test_resident_reads_statm_pages_and_splits_off_the_shared_file_pages(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    page_kib = memory._PAGE_SIZE // 1024
    statm.write_text("60000 23000 5000 1 0 20000 0\n")  # size resident shared text lib data dt
    now = memory.resident(statm)
    assert now == memory.Usage(23000 * page_kib, 18000 * page_kib)
    assert now.file_kib == 5000 * page_kib
    real = memory.resident()  # this process: some of it anonymous, some file-backed
    assert 0 < real.anon_kib < real.rss_kib
