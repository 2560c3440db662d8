"""Context enrichment: who a sensor record is about, in words a human (and a playbook) can use.

Each record that reaches user space is enriched once with the process's identity (uid, comm,
exe, command line), its parent chain, its cgroup path and, parsed from that path, the container
and Kubernetes pod it runs in. Everything here is best effort: the process may already have
exited, so every field has an "unknown" value and nothing raises for a vanished process.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from remedy.errors import ActionError
from remedy.proc import ProcessInfo, ProcFS
from remedy.sensors.records import SensorRecord

__all__ = [
    "CMDLINE_MAX",
    "KEY_CONTROLLER",
    "Ancestor",
    "CgroupIndex",
    "ContainerRef",
    "Context",
    "Enricher",
    "ParentChain",
    "key_hierarchy",
    "parse_container",
]

KEY_CONTROLLER = "pids"
"""The v1 controller whose hierarchy keys cgroup signals where cgroup2 has no controllers: the
one remedy's v1 driver names cgroups by (membership, inode, display) and whose limit stops a
fork storm (remedy/actions/cgroups.py)."""


def key_hierarchy(cgroup_root: Path = Path("/sys/fs/cgroup")) -> str:
    """Which hierarchy cgroup signals are keyed by on this host: "cgroup2" when ``cgroup_root``
    is a cgroup2 mount with the pids controller (remedy acts through cgroup2 there), else
    :data:`KEY_CONTROLLER` when that controller has a v1 hierarchy (hybrid and v1 hosts; on a
    hybrid host every process is in cgroup2's root, which would count the whole host as one
    cgroup), else "cgroup2". The same rule as the driver's detection, so the kernel counts by
    the hierarchy actions act on."""
    try:
        controllers = (cgroup_root / "cgroup.controllers").read_text().split()
    except OSError:
        controllers = None
    if controllers is not None and KEY_CONTROLLER in controllers:
        return "cgroup2"
    if (cgroup_root / KEY_CONTROLLER / "tasks").exists():
        return KEY_CONTROLLER
    return "cgroup2"


# Longest command line kept, ellipsis included: argv can be megabytes (ARG_MAX), audit lines not.
CMDLINE_MAX = 256
_ELLIPSIS = "…"
# Docker and the CRI runtimes print and accept the first 12 hex digits as the short id.
_SHORT_ID = 12

# Runtime prefixes of systemd scope units (and of cri-o's cgroupfs-driver directories), e.g.
# "docker-<id>.scope", "cri-containerd-<id>.scope", "crio-conmon-<id>.scope", "libpod-<id>.scope".
# The conmon scopes hold cri-o's/podman's monitor process, not the container, but they carry the
# container's id, which is what an operator needs to find it.
_SCOPE = re.compile(
    r"^(?P<prefix>docker|cri-containerd|crio-conmon|crio|libpod-conmon|libpod)"
    r"-(?P<id>[0-9a-f]{12,64})(?:\.scope)?$"
)
_RUNTIME_OF_PREFIX = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
    "libpod": "podman",
    "libpod-conmon": "podman",
}
_BARE_ID = re.compile(r"^[0-9a-f]{12,64}$")
# A pod uid is a UUID; the systemd cgroup driver writes its dashes as underscores because '-' is
# the slice hierarchy separator in unit names. Static (mirror) pods use a 32-hex hash instead.
_UID = r"[0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# cgroupfs driver: "pod<uid>"; systemd driver: "kubepods[-<qos>]-pod<uid>.slice".
_POD = re.compile(
    rf"^(?:kubepods-(?:(?P<qos>besteffort|burstable)-)?)?pod(?P<uid>{_UID})(?:\.slice)?$"
)
# The QoS level directories: "burstable" (cgroupfs) or "kubepods-burstable.slice" (systemd).
# Guaranteed pods have none: they sit directly under the kubepods root.
_QOS = re.compile(r"^(?:kubepods-)?(?P<qos>besteffort|burstable)(?:\.slice)?$")


@dataclass(frozen=True)
class ContainerRef:
    """The container (or Kubernetes pod) a cgroup path belongs to.

    ``runtime`` is "docker", "containerd", "cri-o" or "podman" when the path names it, and
    "kubepods" when the path only shows Kubernetes: a pod without a container, or a container
    under the cgroupfs driver, whose directory is the bare id whichever runtime made it.
    """

    runtime: str
    container_id: str | None  # hex id as the runtime prints it (usually 64 digits)
    pod_uid: str | None  # Kubernetes pod uid with dashes
    qos: str | None = None  # "besteffort" | "burstable" | "guaranteed" under kubepods

    @property
    def short_id(self) -> str | None:
        """The first 12 hex digits of the container id, as ``docker ps`` shows it."""
        return self.container_id[:_SHORT_ID] if self.container_id else None


def parse_container(cgroup_path: str) -> ContainerRef | None:
    """Find the container and pod in a cgroup path; None for paths outside any container.

    The deepest container wins, so nested containers (docker-in-docker, kind) report the
    innermost one. Supported shapes, v1 or v2::

        /docker/<id>                                   docker, cgroupfs driver
        /system.slice/docker-<id>.scope                docker, systemd driver
        /machine.slice/libpod-<id>.scope               podman
        /kubepods/burstable/pod<uid>/<id>              Kubernetes, cgroupfs driver
        /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice/
            cri-containerd-<id>.scope                  Kubernetes, systemd driver
        .../crio-<id>.scope, .../crio-conmon-<id>.scope
    """
    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    qos: str | None = None
    in_kube = False
    prev = ""
    for seg in (s for s in cgroup_path.split("/") if s):
        # The kubepods root: "kubepods", "kubepods.slice", or "kubelet-kubepods.slice" when
        # the kubelet runs with --cgroup-root; its QoS and pod slices also start "kubepods-".
        if seg == "kubepods" or (seg.endswith(".slice") and "kubepods" in seg):
            if not in_kube:
                # A kubepods root nested below the host's (kind, a kubelet in a container):
                # the outer container is not the one the record is about.
                runtime = container_id = None
            in_kube = True
        if in_kube and (m := _POD.match(seg)):
            pod_uid = m["uid"].replace("_", "-")
            qos = m["qos"] or qos or "guaranteed"
        elif in_kube and pod_uid is None and (m := _QOS.match(seg)):
            qos = m["qos"]
        elif m := _SCOPE.match(seg):
            runtime, container_id = _RUNTIME_OF_PREFIX[m["prefix"]], m["id"]
        elif _BARE_ID.match(seg) and (prev == "docker" or (in_kube and _POD.match(prev))):
            runtime, container_id = ("docker" if prev == "docker" else "kubepods"), seg
        prev = seg
    if container_id is None and pod_uid is None:
        return None
    return ContainerRef(
        runtime=runtime or "kubepods",
        container_id=container_id,
        pod_uid=pod_uid,
        qos=qos if pod_uid else None,
    )


@dataclass(frozen=True)
class Ancestor:
    """One process of a parent chain. ``exe`` is None when it came from the lineage map."""

    pid: int
    comm: str
    exe: str | None


@dataclass(frozen=True)
class Context:
    """Everything known about the process a record is about, at enrichment time."""

    pid: int
    ppid: int
    uid: int  # real uid; -1 when the process was gone before we could read it
    comm: str
    exe: str | None
    cmdline: str  # argv joined with spaces, at most CMDLINE_MAX characters
    cgroup_path: str  # e.g. "/system.slice/foo.service"; "" when unknown
    container: ContainerRef | None
    parents: tuple[Ancestor, ...]  # nearest first
    pod: PodRef | None = None  # namespace and name, when the node's kubelet says

    def summary(self) -> str:
        """One human line for audit lines and alerts; unknown parts are left out.

        E.g. "container 3f2a1b9c0d1e, /usr/bin/worker, parent 42 (supervisord)".
        """
        parts: list[str] = []
        if self.container and self.container.short_id:
            parts.append(f"container {self.container.short_id}")
        elif self.container and self.container.pod_uid:
            parts.append(f"pod {self.container.pod_uid}")
        elif self.cgroup_path:
            # Outside containers the cgroup is what names the service ("foo.service").
            parts.append(f"cgroup {self.cgroup_path}")
        if self.pod is not None:
            parts.append(f"pod {self.pod.namespace}/{self.pod.name}")
        if self.exe or self.comm:
            parts.append(self.exe or self.comm)
        if self.parents:
            parent = self.parents[0]
            parts.append(f"parent {parent.pid} ({parent.comm})")
        elif self.ppid > 0:
            parts.append(f"parent {self.ppid}")
        return ", ".join(parts)


def _truncate(text: str, limit: int = CMDLINE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - len(_ELLIPSIS)] + _ELLIPSIS


class CgroupIndex:
    """cgroup id -> cgroup path, in one hierarchy.

    On cgroup v2 the id ``bpf_get_current_cgroup_id()`` returns is the inode number of the
    cgroup's directory in the cgroup2 mount (both are the kernfs node id, ``kernfs_ino`` in
    fs/kernfs). A v1 hierarchy is a kernfs of its own, and the kernel filter's v1 cgroup keys
    (``css->cgroup->kn->id``) are the inodes of its directories in the same way. Every hierarchy
    numbers its own nodes, so an id means nothing without the mount it came from. The mount is
    walked once and cached, and walked again (at most once per
    ``min_rescan_s``) on a miss, because new cgroups appear all the time; the rate limit keeps
    a stream of records from an unknown id (a v1-only cgroup, a cgroup already removed) from
    turning into a stream of tree walks.
    """

    def __init__(
        self,
        mount: Path,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_s: float = 1.0,
    ) -> None:
        self.mount = mount
        self._clock = clock
        self._min_rescan_s = min_rescan_s
        self._paths: dict[int, str] = {}
        self._last_scan: float | None = None
        self.scans = 0  # how many walks so far; for tests and `remedy doctor`

    @classmethod
    def detect(
        cls,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        *,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_s: float = 1.0,
    ) -> CgroupIndex | None:
        """The index of this host's cgroup2 mount, or None if there is none.

        Unified hosts mount cgroup2 at the root itself; hybrid hosts (systemd's default before
        v247 and on many LTS distributions) mount it at ``<root>/unified``. Only cgroup2 has
        ``cgroup.controllers`` in every directory, so that file tells the two apart.
        """
        for mount in (cgroup_root, cgroup_root / "unified"):
            if (mount / "cgroup.controllers").is_file():
                return cls(mount, clock=clock, min_rescan_s=min_rescan_s)
        return None

    @classmethod
    def for_keys(
        cls,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        *,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_s: float = 1.0,
    ) -> CgroupIndex:
        """The index of the hierarchy cgroup signals are keyed by (:func:`key_hierarchy`)."""
        hierarchy = key_hierarchy(cgroup_root)
        mount = cgroup_root if hierarchy == "cgroup2" else cgroup_root / hierarchy
        return cls(mount, clock=clock, min_rescan_s=min_rescan_s)

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup's path relative to the mount ("/a/b", "/" for the root), or None."""
        if cgroup_id <= 0:
            return None  # the sensors' "unknown"; no walk can find it
        path = self._paths.get(cgroup_id)
        if path is not None:
            return path
        now = self._clock()
        if self._last_scan is not None and now - self._last_scan < self._min_rescan_s:
            return None
        self._last_scan = now
        self._paths = self._walk()
        return self._paths.get(cgroup_id)

    def _walk(self) -> dict[int, str]:
        self.scans += 1
        paths: dict[int, str] = {}
        try:
            paths[os.stat(self.mount).st_ino] = "/"
        except OSError:
            return paths
        stack: list[tuple[str, str]] = [(str(self.mount), "")]
        while stack:
            directory, rel = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        child = f"{rel}/{entry.name}"
                        # d_ino from readdir: kernfs fills it with the same kernfs_ino as
                        # stat's st_ino, and it saves one stat per cgroup on big hosts.
                        paths[entry.inode()] = child
                        stack.append((entry.path, child))
            except OSError:
                # Cgroups are removed while we walk (ENOENT); a missing subtree only means
                # a later miss and rescan.
                continue
        return paths


class ParentChain:
    """Builds a parent chain from /proc, falling back to a lineage lookup.

    The lineage lookup is the kernel's lineage map (tgid -> (ppid, comm)), which remembers
    ancestors that already exited, so short-lived processes still have a chain. The chain is
    nearest first and ends at pid 1, after ``max_depth`` ancestors, or at the first ancestor
    neither source knows.
    """

    def __init__(
        self,
        procfs: ProcFS,
        lineage: Callable[[int], tuple[int, str] | None] = lambda _pid: None,
        max_depth: int = 8,
    ) -> None:
        self._procfs = procfs
        self._lineage = lineage
        self._max_depth = max_depth

    def chain(self, pid: int, ppid_hint: int = 0) -> tuple[Ancestor, ...]:
        """The ancestors of ``pid``, nearest first.

        Its parent comes from /proc, else ``ppid_hint`` (the parent the kernel saw), else the
        lineage map.
        """
        return self.chain_from(pid, self._read(pid), ppid_hint)

    def chain_from(
        self, pid: int, info: ProcessInfo | None, ppid_hint: int = 0
    ) -> tuple[Ancestor, ...]:
        """Like :meth:`chain` with ``pid``'s /proc entry already read (None: it is gone)."""
        if info is not None:
            ppid, child_start = info.ppid, info.start_ticks
        else:
            known = self._lineage(pid)
            ppid, child_start = (ppid_hint or (known[0] if known else 0)), None
        chain: list[Ancestor] = []
        seen = {pid}
        # ppid 0: the kernel's "no parent" (pid 1, kthreadd, a parent outside our pid ns).
        while ppid > 0 and ppid not in seen and len(chain) < self._max_depth:
            seen.add(ppid)
            parent = self._read(ppid)
            # A parent cannot start after its child: if it did, the parent exited and its pid
            # was reused, so /proc describes a stranger and only the lineage map can help.
            if parent is not None and child_start is not None and parent.start_ticks > child_start:
                parent = None
            if parent is not None:
                chain.append(Ancestor(parent.pid, parent.comm, parent.exe))
                ppid, child_start = parent.ppid, parent.start_ticks
                continue
            known = self._lineage(ppid)
            if known is None:
                break
            chain.append(Ancestor(ppid, known[1], None))
            ppid, child_start = known[0], None
        return tuple(chain)

    def _read(self, pid: int) -> ProcessInfo | None:
        try:
            return self._procfs.read(pid)
        except ActionError:
            # Gone, or unreadable (hidepid=, EACCES): either way /proc cannot tell us.
            return None


@dataclass(frozen=True)
class PodRef:
    """A Kubernetes pod by namespace and name, for fleet dashboards to group by workload."""

    namespace: str
    name: str


class PodIndex:
    """Pod uid → namespace and name, without any Kubernetes API access: the kubelet keeps every
    pod's logs under ``/var/log/pods/<namespace>_<name>_<uid>/``, so the node's own directory
    names say it (neither namespaces nor pod names may contain "_"). Rescanned on a miss, at
    most once per ``min_rescan_s``."""

    def __init__(
        self,
        root: Path = Path("/var/log/pods"),
        clock: Callable[[], float] = time.monotonic,
        min_rescan_s: float = 5.0,
    ) -> None:
        self._root = root
        self._clock = clock
        self._min_rescan_s = min_rescan_s
        self._pods: dict[str, PodRef] = {}
        self._scanned_at: float | None = None

    def lookup(self, pod_uid: str) -> PodRef | None:
        found = self._pods.get(pod_uid)
        now = self._clock()
        if found is None and (
            self._scanned_at is None or now - self._scanned_at >= self._min_rescan_s
        ):
            self._scanned_at = now
            self._pods = self._scan()
            found = self._pods.get(pod_uid)
        return found

    def _scan(self) -> dict[str, PodRef]:
        pods: dict[str, PodRef] = {}
        try:
            entries = list(self._root.iterdir())
        except OSError:
            return pods
        for entry in entries:
            parts = entry.name.split("_")
            if len(parts) == 3 and all(parts):
                namespace, name, uid = parts
                pods[uid] = PodRef(namespace, name)
        return pods


class Enricher:
    """Turns a :class:`SensorRecord` into a :class:`Context`, reading /proc once per record.

    ``proc_cgroup(tgid)`` returns the process's cgroup path from /proc/<tgid>/cgroup (on a
    hybrid host, a v1 hierarchy's path is what container runtimes fill in); it is used when
    the cgroup id cannot be resolved, and to find the container when the v2 path shows none.
    """

    def __init__(
        self,
        procfs: ProcFS,
        cgroups: CgroupIndex | None,
        parents: ParentChain,
        proc_cgroup: Callable[[int], str] | None = None,
        pods: PodIndex | None = None,
    ) -> None:
        self._procfs = procfs
        self._cgroups = cgroups
        self._parents = parents
        self._proc_cgroup = proc_cgroup
        self._pods = pods

    @property
    def cgroup_index(self) -> CgroupIndex | None:
        """The cgroup id -> path index records are resolved with (None: no cgroup2 mount)."""
        return self._cgroups

    def enrich(self, record: SensorRecord, info: ProcessInfo | None = None) -> Context:
        """The context of ``record.tgid``; partial (from the record) when the process is gone.
        ``info``: the process as the caller already read it (it pinned the process and checked
        its start time), so /proc is not read twice."""
        tgid = record.tgid
        if info is None or info.pid != tgid:
            info = self._read(record)
        parents = self._parents.chain_from(tgid, info, record.ppid)
        v2_path = self._cgroups.path_of(record.cgroup_id) if self._cgroups else None
        cgroup_path = v2_path if v2_path is not None else self._v1_path(tgid)
        container = parse_container(cgroup_path)
        if container is None and v2_path is not None and self._proc_cgroup is not None:
            # Hybrid hosts: runtimes with the cgroupfs driver only create v1 cgroups, so the
            # process sits in a v2 cgroup that names no container.
            container = parse_container(self._v1_path(tgid))
        pod = None
        if container is not None and container.pod_uid and self._pods is not None:
            pod = self._pods.lookup(container.pod_uid)
        if info is None:
            return Context(
                pid=tgid,
                ppid=record.ppid,
                uid=-1,
                comm=record.comm,
                exe=None,
                cmdline="",
                cgroup_path=cgroup_path,
                container=container,
                parents=parents,
                pod=pod,
            )
        return Context(
            pid=tgid,
            ppid=info.ppid,
            uid=info.uid,
            comm=info.comm,
            exe=info.exe,
            cmdline=_truncate(" ".join(info.cmdline).strip()),
            cgroup_path=cgroup_path,
            container=container,
            parents=parents,
            pod=pod,
        )

    def _read(self, record: SensorRecord) -> ProcessInfo | None:
        try:
            info = self._procfs.read(record.tgid)
        except ActionError:
            return None
        # A process that started after the record was made reused the pid of the one it is
        # about. start_boot_ns rounds down, so the real process never fails this test.
        if record.ts_boot_ns > 0 and self._procfs.start_boot_ns(info) > record.ts_boot_ns:
            return None
        return info

    def _v1_path(self, tgid: int) -> str:
        if self._proc_cgroup is None:
            return ""
        try:
            return self._proc_cgroup(tgid)
        except (ActionError, OSError):
            return ""
