"""The house's rooms hold: tools beside the daemon, neutral status types, no test kit shipped.

Read from the source's imports (not by importing), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import remedy

PACKAGE = Path(remedy.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offenders(room: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in (PACKAGE / room).rglob("*.py")
        for name in _imports(path)
        if name.startswith(forbidden)
    )


def test_tools_never_import_the_daemon() -> None:
    assert _offenders("tools", ("remedy.service",)) == []


def test_the_daemon_never_imports_the_tools() -> None:
    assert _offenders("service", ("remedy.tools",)) == []


def test_no_stage_of_the_funnel_imports_the_daemon_or_the_tools() -> None:
    for room in ("sensors", "engine", "actions", "policy", "windows"):
        assert _offenders(room, ("remedy.service", "remedy.tools")) == [], room


def test_the_shipped_package_never_imports_the_test_kit() -> None:
    assert _offenders(".", ("testkit", "tests", "bench")) == []


def test_the_test_kit_is_not_in_the_wheel() -> None:
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'packages = ["remedy"]' in pyproject
    assert not (PACKAGE / "service" / "sandbox.py").exists()
    assert not (PACKAGE / "service" / "launcher.py").exists()


def test_the_rooms_test_sees_a_lazy_import(tmp_path: Path) -> None:
    # The check must catch an import hidden inside a function, the usual way one slips in.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from remedy.service.agent import Agent\n")
    assert "remedy.service.agent" in _imports(probe)
