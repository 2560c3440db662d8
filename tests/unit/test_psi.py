"""Pressure signals (PSI) without a kernel: parsing pressure files, trigger strings, the policy
language and its file:line errors, the heaviest pick's ranking, and the engine's treatment of
the host (notify-only) offender."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from remedy.actions.params import KillParams, NotifyParams
from remedy.clock import FakeClock
from remedy.compiler import compile_plan
from remedy.engine.engine import Engine
from remedy.engine.guards import Protector
from remedy.engine.offender import Subject
from remedy.errors import ConfigError, ConfigErrors
from remedy.policy import Playbook, PolicySet, Step, load_policy_set
from remedy.proc import ProcFS
from remedy.sensors.catalog import SIGNALS, needs_bpf
from remedy.sensors.psi import (
    HostPin,
    PsiRule,
    has_cap_sys_resource,
    heaviest,
    parse_pressure,
    psi_rules,
)
from remedy.sensors.records import SensorRecord

HOST_CPU = "some avg10=1.50 avg60=0.75 avg300=0.20 total=123456\n"
CGROUP_MEMORY = (
    "some avg10=12.34 avg60=5.00 avg300=1.00 total=987654\n"
    "full avg10=3.21 avg60=1.00 avg300=0.10 total=55555\n"
)


def test_pressure_files_parse_with_and_without_the_full_line() -> None:
    host = parse_pressure(HOST_CPU)
    assert (host.some_avg10, host.some_total, host.full_avg10, host.full_total) == (
        1.5,
        123456,
        0.0,
        0,
    )
    cg = parse_pressure(CGROUP_MEMORY)
    assert cg.avg10("some") == 12.34 and cg.avg10("full") == 3.21 and cg.full_total == 55555


@pytest.mark.parametrize(
    "text",
    ["", "full avg10=1 total=2\n", "some avg10=x total=1\n", "some total=1\n", "odd 1 2\n"],
)
def test_malformed_pressure_files_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pressure(text)


def _rule(**kw: object) -> PsiRule:
    fields: dict[str, object] = {
        "rule": 3,
        "policy": "p",
        "signal": "memory_pressure",
        "stall": "some",
        "stall_us": 150_000,
        "window_us": 1_000_000,
        "cgroups": ("/svc/*",),
    }
    fields.update(kw)
    return PsiRule(**fields)  # type: ignore[arg-type]


def test_the_trigger_string_is_what_psi_rst_says_nul_terminated() -> None:
    assert _rule().trigger() == b"some 150000 1000000\0"
    assert _rule(stall="full", stall_us=2_000_000, window_us=10_000_000).trigger() == (
        b"full 2000000 10000000\0"
    )
    assert _rule().resource == "memory" and _rule().threshold_pct == 15


@pytest.mark.parametrize(
    "kw",
    [
        {"window_us": 499_999},
        {"window_us": 10_000_001},
        {"stall_us": 0},
        {"stall_us": 1_000_001},
        {"signal": "fork_rate"},
    ],
)
def test_rules_the_kernel_would_refuse_are_refused_first(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _rule(**kw)


def test_a_cgroup_rule_never_arms_on_the_root_even_when_its_glob_matches_it() -> None:
    rule = _rule(cgroups=("*",))
    assert not rule.wants("/") and rule.wants("/a")
    assert _rule().wants("/svc/web") and not _rule().wants("/other/web")
    assert not _rule(host=True, cgroups=()).wants("/svc/web")


def test_pressure_signals_are_in_the_catalogue_but_need_no_bpf() -> None:
    for name in ("cpu_pressure", "memory_pressure", "io_pressure"):
        assert SIGNALS[name].section == "psi" and SIGNALS[name].key == "cgroup"
        assert not needs_bpf(name)
    assert needs_bpf("fork_rate")


def test_cap_sys_resource_is_read_from_cap_eff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")  # bit 24 clear
    assert not has_cap_sys_resource(status)
    status.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_cap_sys_resource(status)
    assert not has_cap_sys_resource(tmp_path / "missing")


# -- the policy language ----------------------------------------------------------------------

POLICY = """\
apiVersion: remedy/v1
kind: Policy
name: mem
signal: memory_pressure
threshold: 15
window: 2s
match:
  cgroups: ["/svc/*"]
playbook: tell
"""

HOST = """\
apiVersion: remedy/v1
kind: Policy
name: host
signal: cpu_pressure
threshold: 5
window: 10s
pressure: {stall: full, scope: host}
playbook: tell
"""

PLAYBOOKS = """\
apiVersion: remedy/v1
kind: Playbook
name: tell
steps:
  - action: notify
---
apiVersion: remedy/v1
kind: Playbook
name: end
steps:
  - action: notify
  - action: kill
"""


def load(tmp_path: Path, *policies: str) -> PolicySet:
    (tmp_path / "p.yaml").write_text("---\n".join(textwrap.dedent(p) for p in policies))
    (tmp_path / "b.yaml").write_text(PLAYBOOKS)
    return load_policy_set([tmp_path / "p.yaml"], [tmp_path / "b.yaml"], require_secure=False)


def errors(tmp_path: Path, *policies: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, *policies)
    return list(info.value.errors)


def test_a_cgroup_pressure_policy_loads_with_defaults_and_becomes_a_rule(tmp_path: Path) -> None:
    policies = load(tmp_path, POLICY, HOST)
    mem, _host = policies.policies
    assert mem.pressure is not None and mem.scope == "cgroup"
    assert (mem.pressure.stall, mem.pressure.scope, mem.pressure.offender) == (
        "some",
        "cgroup",
        "cgroup",
    )
    plan = compile_plan(policies)
    rules = {r.policy: r for r in psi_rules(policies, plan)}
    ids = {t.policy: t.rule for sp in plan.signals.values() for _, t in sp.tiers()}
    assert rules["mem"] == PsiRule(
        rule=ids["mem"],
        policy="mem",
        signal="memory_pressure",
        stall="some",
        stall_us=300_000,  # 15 % of 2 s
        window_us=2_000_000,
        cgroups=("/svc/*",),
        notify_only=True,
        generation=plan.generation,
    )
    assert rules["host"].host and rules["host"].stall == "full"
    assert rules["host"].trigger() == b"full 500000 10000000\0"


def test_a_host_policy_matches_only_the_host(tmp_path: Path) -> None:
    [host] = load(tmp_path, HOST).policies
    assert host.match.matches("/", "") and not host.match.matches("/svc/web", "")


def test_offender_heaviest_makes_the_offender_a_process(tmp_path: Path) -> None:
    text = POLICY + "pressure: {offender: heaviest}\nscope: process\n"
    [policy] = load(tmp_path, text.replace("playbook: tell", "playbook: end")).policies
    assert policy.scope == "process" and policy.pressure is not None
    [rule] = psi_rules(load(tmp_path, text.replace("playbook: tell", "playbook: end")))
    assert rule.heaviest and not rule.notify_only


def _one(found: list[ConfigError]) -> ConfigError:
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("change", "key", "line", "words"),
    [
        (("window: 2s", "window: 20s"), "window", 6, "500ms to 10s"),
        (("window: 2s", "window: 100ms"), "window", 6, "500ms to 10s"),
        (("threshold: 15", "threshold: 150"), "threshold", 5, "percent of the window"),
        (('match:\n  cgroups: ["/svc/*"]\n', ""), "match.cgroups", None, "match: cgroups:"),
        (("playbook: tell", "playbook: tell\nfor: 3"), "for", 10, "no 'for'"),
        (("playbook: tell", "playbook: tell\npressure: {stall: half}"), "pressure.stall", 10, ""),
    ],
)
def test_mistakes_in_pressure_policies_name_the_file_key_and_line(
    tmp_path: Path, change: tuple[str, str], key: str, line: int | None, words: str
) -> None:
    error = _one(errors(tmp_path, POLICY.replace(*change)))
    assert error.file.name == "p.yaml" and error.key == key and words in error.message
    if line is not None:
        assert error.line == line


def test_pressure_on_another_signal_is_an_error(tmp_path: Path) -> None:
    text = POLICY.replace("memory_pressure", "fork_rate").replace("threshold: 15", "threshold: 9")
    error = _one(errors(tmp_path, text + "pressure: {stall: some}\n"))
    assert error.key == "pressure" and "only for pressure signals" in error.message


def test_a_host_policy_selects_no_cgroups_and_never_picks_a_process(tmp_path: Path) -> None:
    found = errors(tmp_path, HOST + 'match:\n  cgroups: ["/a"]\n')
    assert [e.key for e in found] == ["match"]
    found = errors(tmp_path, HOST.replace("scope: host}", "scope: host, offender: heaviest}"))
    assert [e.key for e in found] == ["pressure.offender"]


def test_a_host_policy_may_only_notify(tmp_path: Path) -> None:
    error = _one(errors(tmp_path, HOST.replace("playbook: tell", "playbook: end")))
    assert error.key == "playbook" and error.line == 8
    assert "only notifies" in error.message and "2 (kill)" in error.message


def test_the_shipped_pressure_examples_load(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "policies" / "examples"
    names = ("memory-pressure", "host-memory-pressure", "cpu-pressure")
    policies = load_policy_set(
        [examples / f"{n}.yaml" for n in names],
        [examples / "notify-pressure.yaml", examples / "relieve-pressure.yaml"],
        require_secure=False,
    )
    assert {p.signal for p in policies.policies} == {"memory_pressure", "cpu_pressure"}
    assert {r.policy for r in psi_rules(policies)} == {p.name for p in policies.policies}


# -- the heaviest pick ------------------------------------------------------------------------


def _proc(root: Path, pid: int, rss_pages: int, utime: int, io_bytes: int) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "statm").write_text(f"1000 {rss_pages} 10 1 0 50 0\n")
    rest = ["S", "1"] + ["0"] * 9 + [str(utime), "0"] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (a) b) {' '.join(rest)}\n")  # a ")" in comm is skipped
    (d / "io").write_text(f"rchar: 1\nwchar: 1\nread_bytes: {io_bytes}\nwrite_bytes: 0\n")


def test_the_heaviest_ranking_follows_the_resource(tmp_path: Path) -> None:
    _proc(tmp_path, 10, rss_pages=500, utime=1, io_bytes=7)
    _proc(tmp_path, 11, rss_pages=20, utime=900, io_bytes=3)
    _proc(tmp_path, 12, rss_pages=20, utime=5, io_bytes=10_000)
    procfs = ProcFS(tmp_path)
    pids = [10, 11, 12, 13]  # 13 is gone: usage 0, last
    assert [pid for _, pid in heaviest(pids, procfs, "memory")] == [10, 11, 12, 13]
    assert [pid for _, pid in heaviest(pids, procfs, "cpu")] == [11, 12, 10, 13]
    assert [pid for _, pid in heaviest(pids, procfs, "io")] == [12, 10, 11, 13]


# -- the engine and the host ------------------------------------------------------------------


class _HostIdentifier:
    def identify(self, record: SensorRecord) -> Subject:
        return Subject(0, 1, "", 0, None, -1, False, "/", "host", HostPin(), cgroup_inode=1)


class _Executor:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def describe(self, step: Step, subject: Subject) -> str:
        return ""

    def execute(self, step: Step, subject: Subject, policy: object) -> str:
        self.ran.append(step.action)
        return ""

    def release(self, subject: Subject) -> None:
        pass


class _Sink:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def record(self, decision: object) -> None:
        self.outcomes.append((decision.outcome, decision.reason))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("steps", "ran", "outcome"),
    [
        ((Step("notify", NotifyParams()),), ["notify"], "acted"),
        ((Step("notify", NotifyParams()), Step("kill", KillParams())), [], "skipped"),
    ],
)
def test_the_engine_lets_the_host_be_notified_about_and_nothing_more(
    tmp_path: Path, steps: tuple[Step, ...], ran: list[str], outcome: str
) -> None:
    [policy] = load(tmp_path, HOST).policies
    playbook = Playbook("tell", Path("b.yaml"), steps)
    executor, sink = _Executor(), _Sink()
    engine = Engine(
        PolicySet((replace(policy, dry_run=False),), {"tell": playbook}),
        identifier=_HostIdentifier(),
        executor=executor,
        sink=sink,
        clock=FakeClock(),
        protector=Protector(999, frozenset({1})),
    )
    record = SensorRecord("cpu_pressure", 0, 0, 0, "", 0, 40, 10.0, 10.0, 0, key=0, rule=1)
    engine.on_record(replace(record, generation=engine.plan.generation))
    assert executor.ran == ran
    assert sink.outcomes and sink.outcomes[0][0] == outcome
    if outcome == "skipped":
        assert "hierarchy root" in sink.outcomes[0][1]
