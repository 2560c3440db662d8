"""The catalogue and the kernel program agree (KEEP IN SYNC notes, checked)."""

from __future__ import annotations

import re
from pathlib import Path

from remedy.sensors.catalog import CATALOGUE, SIGNALS, Mode, sections_for
from remedy.sensors.kernel import Counter, to_kernel_threshold, to_policy_units


def _enum(text: str, name: str) -> dict[str, int]:
    body = text.split(f"enum {name} {{", 1)[1].split("};", 1)[0]
    values: dict[str, int] = {}
    nxt = 0
    for ident, value in re.findall(r"(\w+)(?:\s*=\s*(\d+))?,", body):
        nxt = int(value) if value else nxt
        values[ident] = nxt
        nxt += 1
    return values


def test_signal_ids_and_modes_match_the_kernel_enums(repo_root: Path) -> None:
    text = (repo_root / "bpf" / "remedy.bpf.c").read_text()
    ids = _enum(text, "remedy_signal")
    assert ids.pop("SIG_MAX") == len(CATALOGUE)
    assert sorted(ids.values()) == [s.id for s in CATALOGUE]
    assert _enum(text, "remedy_mode") == {f"MODE_{m.name}": m for m in Mode}
    counters = _enum(text, "remedy_counter")
    assert counters.pop("C_MAX") == len(Counter)
    assert list(counters.values()) == [c.value for c in Counter]


def test_every_section_is_compiled_from_the_program(repo_root: Path) -> None:
    text = (repo_root / "bpf" / "remedy.bpf.c").read_text()
    for sig in CATALOGUE:
        assert f"#if REMEDY_SECTION_{sig.section.upper()}" in text
        for tp in sig.tracepoints:
            category, event = tp.split(":")
            assert f"TRACEPOINT_PROBE({category}, {event})" in text


def test_sections_are_only_what_the_signals_need() -> None:
    assert sections_for(["fork_rate", "churn"]) == ("sched",)
    assert sections_for(["connect_rate", "cpu"]) == ("cpu", "net")


def test_units_round_trip() -> None:
    assert to_kernel_threshold("cpu", 80, 0.5) == 400_000_000  # 80 % of a core for 0.5 s, in ns
    assert to_policy_units("cpu", 400_000_000, 500_000_000) == 80
    assert to_kernel_threshold("rss", 100, 1.0) == 100 << 20
    assert to_kernel_threshold("rss_growth", 64, 1.0) == 64 << 20
    assert to_policy_units("rss", 150 << 20, 10**9) == 150
    assert to_kernel_threshold("fork_rate", 200, 1.0) == 200
    assert SIGNALS["churn"].key == "parent"
