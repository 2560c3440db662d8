"""deploy/: the systemd unit verifies, the manifests are valid Kubernetes objects and agree with
each other, the Helm templates only use values that exist. All offline: no cluster, no helm."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "remedy.service"
DRY_RUN_DROPIN = DEPLOY / "systemd" / "remedy.service.d" / "dry-run.conf"
K8S = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "remedy"
KUBERNETES_VERSION = "1.33.0"
METRICS_PORT = 9464
CAPABILITIES = {
    "BPF",
    "PERFMON",
    "SYS_ADMIN",
    "KILL",
    "SYS_RESOURCE",
    "SYS_NICE",
    "DAC_OVERRIDE",
    "SYS_PTRACE",
}
ARGS_TAIL = (
    "--policies /etc/remedy/policies --playbooks /etc/remedy/playbooks"
    " --audit /var/log/remedy/audit.jsonl --journal /var/lib/remedy/undo.jsonl"
)
EXEC_START = f"/usr/local/bin/remedy run {ARGS_TAIL}"
# The metrics server's probes (remedy/service/metrics.py): liveness is the worker's heartbeat.
PROBES = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def _directives(text: str) -> dict[str, list[str]]:
    """Key → values of a unit file; comments and section headers dropped."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


# --- systemd ---------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("REMEDY_REQUIRE_BPF") == "1":
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is missing (apt-get install systemd)")
    return found


def test_unit_verifies(tmp_path: Path) -> None:
    # verify rejects a unit whose binary is absent, so check a copy that runs /bin/true instead.
    analyze = _systemd_analyze()
    copy = tmp_path / "remedy.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/remedy", "/bin/true"))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remedy.service" not in result.stderr, result.stderr  # warnings about our unit


def test_unit_runs_the_agent_as_the_brief_says() -> None:
    d = _directives(UNIT.read_text())
    assert d["ExecStart"] == [EXEC_START]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["60s"]
    assert d["KillSignal"] == ["SIGTERM"]
    assert d["Restart"] == ["on-failure"]
    assert d["TimeoutStopSec"] == ["30"]
    for key in ("StateDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert d[key] == ["remedy"]


def test_unit_capabilities_and_sandbox() -> None:
    d = _directives(UNIT.read_text())
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        (value,) = d[key]
        assert {cap.removeprefix("CAP_") for cap in value.split()} == CAPABILITIES
    assert d["MemoryDenyWriteExecute"] == ["no"]  # bcc's LLVM JIT
    # Either would make cgroupfs or tracefs read-only: no throttle could be applied or reverted.
    assert "ProtectControlGroups" not in d
    assert "ProtectKernelTunables" not in d
    assert d["ProtectSystem"] == ["strict"]
    writable = {p.lstrip("-") for p in d["ReadWritePaths"][0].split()}
    assert {
        "/sys/fs/cgroup",
        "/var/lib/remedy",
        "/var/log/remedy",
        "/sys/kernel/tracing",
    } <= writable
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictNamespaces"):
        assert d[key] == ["yes"], key


def test_dry_run_dropin_only_adds_dry_run() -> None:
    d = _directives(DRY_RUN_DROPIN.read_text())
    assert d["ExecStart"] == ["", f"/usr/local/bin/remedy run --dry-run {ARGS_TAIL}"]


# --- Kubernetes manifests --------------------------------------------------------------------


def _manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def _one(kind: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in _manifests() if doc["kind"] == kind]
    return found


def test_every_manifest_has_identity() -> None:
    docs = list(_manifests())
    assert {doc["kind"] for _, doc in docs} >= {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
    }
    for path, doc in docs:
        assert doc.get("apiVersion"), path
        assert doc["metadata"]["name"], path
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "remedy", path


def test_manifests_validate_against_kubernetes_schemas() -> None:
    import kubernetes_validate  # type: ignore[import-untyped]  # noqa: PLC0415

    for path, doc in _manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships for it; test_service_monitor checks it
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {err}")


def test_no_rbac_and_no_token() -> None:
    kinds = {doc["kind"] for _, doc in _manifests()}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    assert _one("ServiceAccount")["automountServiceAccountToken"] is False
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]


def test_daemonset_pod() -> None:
    ds = _one("DaemonSet")
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%"},
    }
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/remedy/remedy:0.1.0"
    security = container["securityContext"]
    assert security.get("privileged") is not True  # explicit capabilities instead
    assert set(security["capabilities"]["add"]) == CAPABILITIES
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
        container["env"]
    )
    assert container["resources"]["requests"] and container["resources"]["limits"]
    args = container["args"]
    assert args[0] == "run" and "--dry-run" in args
    assert args[args.index("--journal") + 1] == "/var/lib/remedy/undo.jsonl"


def test_daemonset_mounts_match_volumes() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes, mount
    assert set(volumes) == {m["name"] for m in mounts.values()}, "unused volumes"
    # Written by the agent; everything else from the host is read-only.
    writable = {
        "/sys/fs/cgroup",
        "/sys/kernel/tracing",
        "/var/lib/remedy",
        "/var/log/remedy",
        "/tmp",
    }
    for path, mount in mounts.items():
        assert mount.get("readOnly", False) is (path not in writable), path
        if path in writable - {"/tmp"}:
            assert volumes[mount["name"]]["hostPath"]["path"] == path
    for path in ("/sys/kernel/btf", "/lib/modules", "/usr/src"):
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    configmaps = {doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] == "ConfigMap"}
    for path in ("/etc/remedy/policies", "/etc/remedy/playbooks"):
        assert volumes[mounts[path]["name"]]["configMap"]["name"] in configmaps


def test_metrics_port_agrees_everywhere() -> None:
    ds = _one("DaemonSet")
    template = ds["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (port,) = container["ports"]
    assert port == {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    for kind, path in PROBES.items():
        probe = container[kind]["httpGet"]
        assert probe["path"] == path, kind
        assert probe["port"] in (port["name"], port["containerPort"])
    args = container["args"]
    assert args[args.index("--metrics") + 1].endswith(f":{METRICS_PORT}")
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    service = _one("Service")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    assert service_port["port"] == METRICS_PORT


def test_service_monitor() -> None:
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one("Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("name", ["policies", "playbooks"])
def test_configmaps_ship_the_repository_files(name: str) -> None:
    (configmap,) = [
        doc
        for _, doc in _manifests()
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == f"remedy-{name}"
    ]
    shipped = {p.name: p.read_text() for p in sorted((ROOT / name).glob("*.yaml"))}
    assert configmap["data"] == shipped, "stale: regenerate (see configmap-policies.yaml)"
    bundled = {p.name: p.read_text() for p in sorted((CHART / "files" / name).glob("*.yaml"))}
    assert bundled == shipped, f"stale: cp {name}/*.yaml {CHART.relative_to(ROOT)}/files/{name}/"


# --- Helm chart (no helm binary: structure and values only) ----------------------------------

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.DOTALL)
_VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _templates() -> list[Path]:
    return sorted((CHART / "templates").iterdir())


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "remedy"
    assert chart["appVersion"] == "0.1.0"
    names = {p.name for p in _templates()}
    assert {"_helpers.tpl", "NOTES.txt", "daemonset.yaml", "configmap.yaml"} <= names
    assert {"serviceaccount.yaml", "service.yaml", "servicemonitor.yaml"} <= names


@pytest.mark.parametrize("template", _templates(), ids=lambda p: p.name)
def test_template_actions_balance(template: Path) -> None:
    text = template.read_text()
    assert text.count("{{") == text.count("}}"), "unbalanced {{ }}"
    depth = 0
    for action in _ACTION.findall(text):
        if action.startswith("/*"):
            continue
        word = action.split(maxsplit=1)[0] if action else ""
        if word in {"if", "range", "with", "define", "block"}:
            depth += 1
        elif word == "end":
            depth -= 1
            assert depth >= 0, "{{ end }} without an opening block"
    assert depth == 0, "a block is never closed with {{ end }}"


def test_templates_use_only_existing_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for template in _templates():
        for ref in _VALUES_REF.findall(template.read_text()):
            node: Any = values
            for key in ref.strip(".").split("."):
                assert isinstance(node, dict) and key in node, f"{template.name}: .Values{ref}"
                node = node[key]


def test_chart_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["dryRun"] is True
    assert values["metrics"]["port"] == METRICS_PORT
    assert values["image"]["repository"] == "ghcr.io/remedy/remedy"
    assert {"operator": "Exists"} in values["tolerations"]
    assert values["priorityClassName"] == "system-node-critical"
    daemonset = (CHART / "templates" / "daemonset.yaml").read_text()
    for cap in CAPABILITIES:
        assert cap in daemonset
    assert "privileged: true" not in daemonset
    probes = re.findall(r"(\w+Probe):.*\n\s+httpGet:\n\s+path: (\S+)\n\s+port: metrics", daemonset)
    assert dict(probes) == PROBES
    assert "hostPID: true" in daemonset
