"""The agent's own configuration file (``remedy run --config /etc/remedy/agent.yaml``).

Validated as strictly as policies: unknown keys and wrong types are errors with file, line and
key, and the agent does not start on them. Command-line options override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from remedy.errors import ConfigError, ConfigErrors
from remedy.policy.loader import translate
from remedy.policy.source import read_documents


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AuditDoc(_Doc):
    path: str = "/var/log/remedy/audit.jsonl"
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    keep: int = Field(default=5, ge=1, le=1000)


class MetricsDoc(_Doc):
    address: str = "127.0.0.1:9464"  # host:port of the Prometheus exporter


class AlertsDoc(_Doc):
    alertmanager: str | None = None  # e.g. http://127.0.0.1:9093
    webhook: str | None = None
    log: bool = False  # also one line per alert on stdout (the journal)


class AgentConfigDoc(_Doc):
    """``kind: AgentConfig``: everything ``remedy run`` can be told, in one reviewed file."""

    apiVersion: Literal["remedy/v1"]  # the key as written in YAML
    kind: Literal["AgentConfig"]
    policies: list[str] = Field(default_factory=lambda: ["/etc/remedy/policies"])
    playbooks: list[str] = Field(default_factory=lambda: ["/etc/remedy/playbooks"])
    dry_run: bool = False
    sensor: Literal["auto", "kernel", "sampler"] = "auto"
    quarantine_root: str = "/remedy"
    journal: str = "/var/lib/remedy/undo.jsonl"
    keep_throttles: bool = False
    control_socket: str | None = "/run/remedy/control.sock"
    audit: AuditDoc = Field(default_factory=AuditDoc)
    metrics: MetricsDoc | None = None
    alerts: AlertsDoc = Field(default_factory=AlertsDoc)


def load_agent_config(path: Path) -> AgentConfigDoc:
    """Read and validate ``path``; ConfigErrors name file, line and key."""
    documents, error = read_documents(path)
    if error is not None:
        raise ConfigErrors([error])
    if len(documents) != 1:
        raise ConfigErrors([ConfigError(path, "", "expected exactly one AgentConfig document")])
    doc = documents[0]
    data: Any = doc.data
    try:
        return AgentConfigDoc.model_validate(data)
    except ValidationError as err:
        raise ConfigErrors([*doc.problems, *translate(doc, err, AgentConfigDoc)]) from None
