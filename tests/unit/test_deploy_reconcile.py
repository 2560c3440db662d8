"""deploy/: TTLs are kept with no agent running. The unit reconciles when the agent stops or
fails, a timer does it while the agent is down, the Kubernetes pod has a sidecar doing the same;
all of it verifies offline (systemd-analyze, the Kubernetes schemas)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
RECONCILE = "/usr/local/bin/remedy reconcile --journal /var/lib/remedy/undo.jsonl"
UNITS = ("remedy.service", "remedy-reconcile.service", "remedy-reconcile.timer")


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_units_verify_together(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    copies = []
    for name in UNITS:
        copy = tmp_path / name
        text = (SYSTEMD / name).read_text()
        copy.write_text(text.replace("/usr/local/bin/remedy", "/bin/true"))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remedy" not in result.stderr, result.stderr


def test_the_agent_unit_reconciles_when_it_stops_or_fails() -> None:
    d = _directives((SYSTEMD / "remedy.service").read_text())
    assert d["ExecStopPost"] == [f"-{RECONCILE}"]


def test_the_timer_runs_reconcile_only_while_the_agent_is_down() -> None:
    service = _directives((SYSTEMD / "remedy-reconcile.service").read_text())
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"] == [RECONCILE]
    assert service["SuccessExitStatus"] == ["75"]  # the journal held by an agent: not a failure
    assert "remedy.service" in service["ExecCondition"][0]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert not caps & {"CAP_BPF", "CAP_PERFMON"}  # no BPF in reconcile
    timer = _directives((SYSTEMD / "remedy-reconcile.timer").read_text())
    assert timer["OnUnitActiveSec"] == ["30s"]
    assert timer["WantedBy"] == ["timers.target"]


def _daemonset_pod() -> dict[str, Any]:
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "DaemonSet":
                pod: dict[str, Any] = doc["spec"]["template"]["spec"]
                return pod
    raise AssertionError("no DaemonSet")


def test_the_pod_has_a_reconcile_sidecar_on_the_agents_journal() -> None:
    pod = _daemonset_pod()
    (sidecar,) = [c for c in pod.get("initContainers", []) if c["name"] == "reconcile"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: lives as long as the pod
    args = sidecar["args"]
    assert args[0] == "reconcile" and "--every" in args
    (agent,) = pod["containers"]
    assert args[args.index("--journal") + 1] == agent["args"][agent["args"].index("--journal") + 1]
    agent_mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts == {n: agent_mounts[n] for n in ("state", "cgroup")}
    assert "BPF" not in sidecar["securityContext"]["capabilities"]["add"]


def test_the_chart_has_the_same_sidecar() -> None:
    template = (ROOT / "deploy" / "helm" / "remedy" / "templates" / "daemonset.yaml").read_text()
    assert "initContainers:" in template and "restartPolicy: Always" in template
    assert "- reconcile" in template
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "remedy" / "values.yaml").read_text())
    assert values["reconcile"]["enabled"] is True
