"""The CLI's contract: exit codes and errors that name file and key; no agent on a bad config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from remedy.cli import main


@pytest.fixture
def config(tmp_path: Path, repo_root: Path) -> tuple[Path, Path]:
    policies, playbooks = tmp_path / "policies", tmp_path / "playbooks"
    shutil.copytree(repo_root / "policies", policies)
    shutil.copytree(repo_root / "playbooks", playbooks)
    return policies, playbooks


def test_check_accepts_the_shipped_files(
    config: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", *map(str, config)]) == 0
    assert "ok: 2 policy(ies), 7 playbook(s)" in capsys.readouterr().out


def test_check_rejects_an_unknown_key_naming_file_and_key(
    config: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = config[0] / "fork-bomb.yaml"
    policy.write_text(policy.read_text().replace("threshold: 200", "threshhold: 200"))
    assert main(["check", *map(str, config)]) == 1
    err = capsys.readouterr().err
    assert f"{policy}:" in err
    assert "threshhold" in err


def test_run_refuses_to_start_on_an_invalid_policy(
    config: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    policy = config[0] / "fork-bomb.yaml"
    policy.write_text(policy.read_text().replace("window: 1s", "window: 1s\nwindoww: 2s"))
    argv = ["run", "--dry-run", "--policies", str(config[0]), "--playbooks", str(config[1])]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "windoww" in captured.err
    assert "ready:" not in captured.out


def test_check_rejects_broken_yaml_with_its_line(
    config: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    playbook = config[1] / "contain-fork-bomb.yaml"
    playbook.write_text("steps: [\n  - action: kill\n")
    assert main(["check", *map(str, config)]) == 1
    assert f"{playbook}:" in capsys.readouterr().err


def test_print_bpf_shows_the_program_with_the_policies_parameters(
    config: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--print-bpf", "--policies", str(config[0]), "--playbooks", str(config[1])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "TRACEPOINT_PROBE(sched, sched_process_fork)" in out
    assert "-DREMEDY_SECTION_SCHED=1" in out
    assert "-DREMEDY_SECTION_FILES" not in out  # no policy watches files: not compiled in
    assert "fork_rate: window_ns=[1000000000,0,0,0]" in out
    assert "threshold=200" in out  # the tier's threshold, written at run time


def test_the_example_policies_for_every_signal_validate(
    repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = repo_root / "policies" / "examples"
    assert main(["check", str(examples), str(repo_root / "playbooks")]) == 0
    assert "ok: 12 policy(ies)" in capsys.readouterr().out
