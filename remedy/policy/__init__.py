"""Policies and playbooks: YAML files validated once, at load time, into frozen records.

``load_policy_set`` (the service) and ``check_paths`` (``remedy check``) share one code path, so
whatever ``check`` accepts the service accepts. See docs/policies.md for the file format.
"""

from __future__ import annotations

from remedy.policy.durations import parse_duration
from remedy.policy.loader import check_paths, load_policy_set
from remedy.policy.model import (
    SEVERITIES,
    SIGNALS,
    Breaker,
    Facts,
    Playbook,
    Policy,
    PolicySet,
    RateLimit,
    Selector,
    Silence,
    Step,
)
from remedy.policy.regex import RegexError, compile_cmdline

__all__ = [
    "SEVERITIES",
    "SIGNALS",
    "Breaker",
    "Facts",
    "Playbook",
    "Policy",
    "PolicySet",
    "RateLimit",
    "RegexError",
    "Selector",
    "Silence",
    "Step",
    "check_paths",
    "compile_cmdline",
    "load_policy_set",
    "parse_duration",
]
