"""Start-up self-test: can this host enforce what the policies ask?

Enforcement requested on a host that cannot enforce fails loudly at start, never silently
downgrades to auditing: an operator who asked for enforcement must learn it is not happening.
"""

from __future__ import annotations

import os

from remedy.actions.cgroups import CgroupDriver, Limits
from remedy.errors import RemedyError
from remedy.policy import PolicySet

# Which actions need which cgroup knobs beyond pids and cpu.
_KNOBS_OF = {"limit_memory": "memory_high", "freeze": "frozen", "thaw": "frozen"}


def probe_limits(policies: PolicySet) -> Limits:
    """The limits a probe cgroup must accept for the shipped playbooks' actions to work."""
    actions = {s.action for b in policies.playbooks.values() for s in b.steps}
    knobs = {_KNOBS_OF[a] for a in actions if a in _KNOBS_OF}
    return Limits(
        pids_max=4096,
        cpu_cores=1024.0,  # effectively unlimited: a probe must not throttle anything
        memory_high=(1 << 50) if "memory_high" in knobs else None,
        frozen=False if "frozen" in knobs else None,
    )


def enforcement_problems(
    cgroups: CgroupDriver, quarantine_root: str, policies: PolicySet
) -> list[str]:
    """Everything that would make an enforcing step fail here, in words; [] when all is well."""
    problems: list[str] = []
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as err:
        problems.append(f"pidfd_open is refused ({err.strerror}): signals could hit reused pids")
    root = quarantine_root.rstrip("/") or "/"
    probe = f"{root.rstrip('/')}/selftest-{os.getpid()}"
    # Leave the host as found: a quarantine root this probe created goes with it.
    made_root = root != "/" and not _exists(cgroups, root)
    try:
        cgroups.create(probe, probe_limits(policies))
    except RemedyError as err:
        problems.append(f"cannot create and limit a cgroup under {quarantine_root}: {err}")
    finally:
        try:
            cgroups.remove(root if made_root else probe)
        except RemedyError as err:
            problems.append(f"cannot remove the probe cgroup {probe}: {err}")
    return problems


def _exists(cgroups: CgroupDriver, rel: str) -> bool:
    try:
        return cgroups.exists(rel)
    except RemedyError:
        return False


def enforcing(policies: PolicySet, dry_run: bool) -> bool:
    """Whether any action may really be taken."""
    return not dry_run and any(not p.dry_run for p in policies.policies)
