"""remedy: an on-host remediation controller.

The package is split by stage of the funnel: ``sensors`` (kernel filters and their ring buffer),
``windows`` (user-space time windows), ``engine`` (per-offender state machines and guards),
``policy`` (YAML loading and validation), ``actions`` (cgroup and signal actuators) and
``service`` (the agent, audit log, CLI glue).
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
