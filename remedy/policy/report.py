"""``remedy check --format json``: the loader's verdict as one JSON-ready mapping, for CI and tools.

The same :func:`~remedy.policy.loader.check_paths` as the text output, so both always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remedy.errors import ConfigError, ConfigErrors
from remedy.policy.loader import check_paths

__all__ = ["check_report", "error_record"]


def error_record(error: ConfigError) -> dict[str, Any]:
    """One error or warning as ``{"file", "line", "key", "message"}`` (``line`` may be null)."""
    return {
        "file": str(error.file),
        "line": error.line,
        "key": error.key,
        "message": error.message,
    }


def check_report(paths: Sequence[Path], require_secure: bool = False) -> dict[str, Any]:
    """Validate ``paths`` and describe the outcome; never raises ConfigErrors.

    ``{"ok": bool, "errors": [...], "policies": [names], "playbooks": [names],
    "silences": [names], "protected_exes": [paths], "warnings": [...]}``; the name lists are
    empty when ``ok`` is false, since nothing is loaded from a rejected configuration.
    """
    warnings: list[ConfigError] = []
    try:
        policy_set = check_paths(paths, require_secure=require_secure, warnings=warnings)
    except ConfigErrors as err:
        return {
            "ok": False,
            "errors": [error_record(e) for e in err.errors],
            "policies": [],
            "playbooks": [],
            "silences": [],
            "protected_exes": [],
            "warnings": [error_record(w) for w in warnings],
        }
    return {
        "ok": True,
        "errors": [],
        "policies": [p.name for p in policy_set.policies],
        "playbooks": list(policy_set.playbooks),
        "silences": [s.name for s in policy_set.silences],
        "protected_exes": sorted(policy_set.protected_exes),
        "warnings": [error_record(w) for w in warnings],
    }
