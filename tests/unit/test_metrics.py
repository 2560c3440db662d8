"""Metrics: fake snapshots and decisions in, the Prometheus text format out, checked by promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from remedy.engine.decisions import Decision
from remedy.sensors.catalog import SignalCounters
from remedy.service.control import status_from
from remedy.service.metrics import Metrics, bpf_program_stats, enable_bpf_stats, reason_class
from remedy.status import AgentSnapshot, OffenderView

REQUIRE = os.environ.get("REMEDY_REQUIRE_BPF") == "1"


def promtool_check(text: bytes) -> None:
    """``promtool check metrics`` must accept the exposition (lint problems included)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if REQUIRE:
            pytest.fail("REMEDY_REQUIRE_BPF=1 but promtool is missing (Debian: prometheus)")
        pytest.skip("promtool missing (Debian package prometheus)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def snapshot(events: int = 10, cpu: float = 1.5, **kw: object) -> AgentSnapshot:
    fields: dict[str, object] = {
        "sensor": "kernel",
        "counters": {
            "fork_rate": SignalCounters(events, 3, 1, 5, 2),
            "cpu": SignalCounters(7, 0, 0, 1, 0),
        },
        "records_received": 3,
        "queue_full": 0,
        "engine": {},
        "offenders": (
            OffenderView(100, "bomb", "fork", "cooldown", 1),
            OffenderView(101, "bomb", "fork", "cooldown", 1),
            OffenderView(102, "spin", "cpu", "suspect", 0),
        ),
        "cpu_s": cpu,
        "max_rss_mib": 42.5,
        "rss_mib": 30.0,
        "rss_anon_mib": 20.0,
    }
    fields.update(kw)
    return AgentSnapshot(**fields)  # type: ignore[arg-type]


def decision(
    outcome: str = "would-act", reason: str = "monitor mode", policy: str = "fork"
) -> Decision:
    return Decision(
        time=1.0, policy=policy, signal="fork_rate", pid=100, start_ticks=5, comm="bomb", ppid=1,
        exe=None, cgroup="/test", count=300, window_s=1.0, action="kill", step=0, dry_run=True,
        outcome=outcome, reason=reason, message="would kill pid 100", state="cooldown",
    )  # fmt: skip


@pytest.fixture
def metrics(tmp_path: Path) -> Metrics:
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("0\n")
    return Metrics(pid=1234, proc_root=tmp_path / "proc", bpf_stats_path=sysctl)


def test_funnel_decisions_offenders_and_agent_cost(metrics: Metrics) -> None:
    metrics.observe(snapshot())
    metrics.record(decision())
    metrics.record(decision())
    metrics.record(decision("skipped", "cooldown, 1.2 s left"))
    text = metrics.exposition()
    got = samples(text)
    assert got[("remedy_kernel_events_total", (("signal", "fork_rate"),))] == 10
    assert got[("remedy_records_emitted_total", (("signal", "fork_rate"),))] == 3
    assert got[("remedy_ringbuf_drops_total", (("signal", "fork_rate"),))] == 1
    assert got[("remedy_map_failures_total", (("signal", "fork_rate"),))] == 2
    assert got[("remedy_kernel_events_total", (("signal", "cpu"),))] == 7
    assert got[("remedy_records_received_total", ())] == 3
    assert got[("remedy_queue_drops_total", ())] == 0
    would = (("outcome", "would-act"), ("policy", "fork"), ("reason_class", "monitor"))
    assert got[("remedy_decisions_total", would)] == 2
    cooldown = (("outcome", "skipped"), ("policy", "fork"), ("reason_class", "cooldown"))
    assert got[("remedy_decisions_total", cooldown)] == 1
    assert got[("remedy_offenders", (("state", "cooldown"),))] == 2
    assert got[("remedy_offenders", (("state", "suspect"),))] == 1
    assert got[("remedy_offenders", (("state", "remediating"),))] == 0  # every state, even 0
    assert got[("remedy_agent_cpu_seconds_total", ())] == 1.5
    assert got[("remedy_agent_resident_memory_mib", ())] == 42.5
    # Resident now, by kind (the peak above is the compile at start).
    assert got[("remedy_agent_rss_mib", (("kind", "anon"),))] == 20.0
    assert got[("remedy_agent_rss_mib", (("kind", "file"),))] == 10.0
    assert got[("remedy_sensor_info", (("kind", "kernel"),))] == 1
    assert got[("remedy_bpf_stats_enabled", ())] == 0
    promtool_check(text)


def test_counters_never_go_down(metrics: Metrics) -> None:
    metrics.observe(snapshot(events=10, cpu=2.0))
    metrics.exposition()
    metrics.observe(snapshot(events=4, cpu=2.5))  # the source restarted below its last value
    got = samples(metrics.exposition())
    assert got[("remedy_kernel_events_total", (("signal", "fork_rate"),))] == 14
    metrics.observe(snapshot(events=6, cpu=3.0))
    got = samples(metrics.exposition())
    assert got[("remedy_kernel_events_total", (("signal", "fork_rate"),))] == 16
    assert got[("remedy_agent_cpu_seconds_total", ())] == 3.0


def test_before_the_first_snapshot_the_exposition_is_valid(metrics: Metrics) -> None:
    text = metrics.exposition()
    assert b"# TYPE remedy_kernel_events_total counter" in text
    assert b"remedy_sensor_info{" not in text
    promtool_check(text)


def test_metrics_use_their_own_registry(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY  # noqa: PLC0415

    a, b = Metrics(proc_root=tmp_path), Metrics(proc_root=tmp_path)
    a.record(decision())
    assert b"remedy_decisions_total{" not in b.exposition()
    assert REGISTRY.get_sample_value("remedy_decisions_total") is None


@pytest.mark.parametrize(
    ("outcome", "reason", "cls"),
    [
        ("skipped", "cooldown, 3.0 s left", "cooldown"),
        ("skipped", "rate limit 5 per 60 s, next in 3.0 s", "rate_limit"),
        ("skipped", "protected: pid 1", "protected"),
        ("skipped", "silenced by ops until 2026-01-01T00:00:00+00:00: deploy", "silenced"),
        ("skipped", "another policy is remediating: fork", "precedence"),
        ("skipped", "degraded window: records were lost; never kill on partial data", "degraded"),
        ("would-act", "demoted to monitor by its breaker: 5 kills in 60 s", "breaker"),
        ("breaker-tripped", "5 kills in 60 s", "breaker"),
        ("would-act", "dry-run", "dry_run"),
        ("would-act", "monitor mode", "monitor"),
        ("acted", "threshold crossed", "threshold"),
        ("gone", "process 100 already exited", "other"),
        ("recovered", "fork_rate at 3 < 10 after settling", "other"),
    ],
)
def test_reason_classes(outcome: str, reason: str, cls: str) -> None:
    assert reason_class(decision(outcome, reason)) == cls


def _fdinfo(proc: Path, pid: int, fd: int, text: str) -> None:
    d = proc / str(pid) / "fdinfo"
    d.mkdir(parents=True, exist_ok=True)
    (d / str(fd)).write_text(text)


PROG = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_jited:\t1\nprog_id:\t{id}\n" \
    "run_time_ns:\t{ns}\nrun_cnt:\t{cnt}\nrecursion_misses:\t0\n"  # fmt: skip


def test_bpf_run_time_from_the_agents_fdinfo(tmp_path: Path) -> None:
    """The kernel prints prog_id/run_time_ns/run_cnt in the fdinfo of a BPF program fd (seen on
    6.18); a program open through two descriptors counts once."""
    proc = tmp_path / "proc"
    _fdinfo(proc, 1234, 3, PROG.format(id=7, ns=2_000_000_000, cnt=100))
    _fdinfo(proc, 1234, 4, PROG.format(id=8, ns=500_000_000, cnt=20))
    _fdinfo(proc, 1234, 5, PROG.format(id=8, ns=500_000_000, cnt=20))
    _fdinfo(proc, 1234, 6, "pos:\t0\nflags:\t02\nmap_type:\t27\n")  # a map: not a program
    _fdinfo(proc, 999, 3, PROG.format(id=9, ns=9, cnt=9))  # another process
    stats = bpf_program_stats(1234, proc)
    assert (stats.programs, stats.run_time_ns, stats.run_cnt) == (2, 2_500_000_000, 120)
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("1\n")
    got = samples(Metrics(pid=1234, proc_root=proc, bpf_stats_path=sysctl).exposition())
    assert got[("remedy_bpf_run_time_seconds_total", ())] == 2.5
    assert got[("remedy_bpf_run_count_total", ())] == 120
    assert got[("remedy_bpf_programs", ())] == 2
    assert got[("remedy_bpf_stats_enabled", ())] == 1


def test_enable_bpf_stats_writes_the_sysctl_when_root(tmp_path: Path) -> None:
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("0\n")
    enabled, what = enable_bpf_stats(sysctl)
    if os.geteuid() == 0:
        assert enabled and sysctl.read_text() == "1\n" and "enabled" in what
    else:
        assert not enabled and "not root" in what
    assert enable_bpf_stats(tmp_path / "missing")[0] is False
    if os.geteuid() == 0:  # the agent's Metrics put the sysctl back when it stops
        sysctl.write_text("0\n")
        metrics = Metrics(proc_root=tmp_path, bpf_stats_path=sysctl)
        assert "set back to 0" in metrics.enable_bpf_stats() and sysctl.read_text() == "1\n"
        metrics.close()
        assert sysctl.read_text() == "0\n"


def test_serve_exposes_the_registry_over_http(metrics: Metrics) -> None:
    metrics.observe(snapshot())
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read()
    finally:
        metrics.close()
    assert b'remedy_kernel_events_total{signal="fork_rate"} 10.0' in body


def test_a_throttle_whose_revert_failed_is_a_gauge_to_alert_on(metrics: Metrics) -> None:
    metrics.observe(snapshot(throttles=3, reverts_failing=1))
    text = metrics.exposition()
    got = samples(text)
    assert got[("remedy_active_throttles", ())] == 3
    assert got[("remedy_reverts_failing", ())] == 1
    promtool_check(text)


def test_status_shows_which_throttle_could_not_be_reverted() -> None:
    throttles = [
        {"id": "a", "action": "quarantine", "policy": "p", "pid": 7, "cgroup": "/q", "expires": 1},
        {
            "id": "b", "action": "throttle_cpu", "policy": "p", "pid": 8, "cgroup": "/r",
            "expires": 2.0, "revert_failed": {"attempts": 3, "error": "cannot move back"},
        },
    ]  # fmt: skip
    payload = status_from(snapshot(throttles=2, reverts_failing=1), throttles, [], [])
    assert [t["revert_failed"] for t in payload["throttles"]] == [
        None,
        {"attempts": 3, "error": "cannot move back"},
    ]
