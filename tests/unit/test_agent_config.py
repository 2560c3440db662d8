"""The agent's configuration file: strict like policies, and the command line wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from remedy.cli import _apply_config, _parser
from remedy.errors import ConfigErrors
from remedy.service.config import load_agent_config


def test_the_example_loads(repo_root: Path) -> None:
    doc = load_agent_config(repo_root / "deploy" / "agent.example.yaml")
    assert doc.dry_run is True
    assert doc.metrics is not None and doc.metrics.address == "127.0.0.1:9464"
    assert doc.audit.keep == 5


def test_unknown_keys_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("apiVersion: remedy/v1\nkind: AgentConfig\naudit:\n  pth: /x\n")
    with pytest.raises(ConfigErrors) as caught:
        load_agent_config(path)
    [error] = caught.value.errors
    assert (error.file, error.key, error.line) == (path, "audit.pth", 4)


def test_flags_win_over_the_file_and_the_file_fills_the_rest(
    tmp_path: Path, repo_root: Path
) -> None:
    config = repo_root / "deploy" / "agent.example.yaml"
    args = _parser().parse_args(
        ["run", "--config", str(config), "--journal", str(tmp_path / "j.jsonl")]
    )
    _apply_config(args)
    assert args.journal == tmp_path / "j.jsonl"  # given on the command line
    assert args.dry_run is True  # from the file
    assert args.metrics == "127.0.0.1:9464"
    assert args.policies == [Path("/etc/remedy/policies")]
