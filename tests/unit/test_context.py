"""Context enrichment: container paths, summaries, parent chains, the cgroup index, the enricher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remedy.proc import ProcFS
from remedy.sensors.context import (
    CMDLINE_MAX,
    Ancestor,
    CgroupIndex,
    ContainerRef,
    Context,
    Enricher,
    ParentChain,
    parse_container,
)
from remedy.sensors.records import SensorRecord

CID = "3f2a1b9c0d1e" + "4a5b6c7d8e9f" * 4 + "0123"  # 64 hex
CID2 = "ab" * 32
POD = "0f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e"
POD_US = POD.replace("-", "_")


def write_proc(
    root: Path,
    pid: int,
    *,
    ppid: int,
    comm: str = "sh",
    start_ticks: int = 1000,
    uid: int = 1000,
    exe: str | None = "/usr/bin/sh",
    cmdline: tuple[str, ...] = ("sh", "-c", "x"),
) -> None:
    """One /proc/<pid> directory shaped like the kernel's (fs/proc/array.c)."""
    d = root / str(pid)
    d.mkdir(parents=True)
    # Fields 3..22 of proc(5): state, ppid, pgrp, session, tty, tpgid, flags, ..., starttime.
    after = ["S", str(ppid), str(pid), str(pid), "0", "-1", "4194304"]
    after += [str(n) for n in range(10, 22)]
    after += [str(start_ticks), "12345", "67"]
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(after)}\n")
    (d / "status").write_text(f"Name:\t{comm}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
    if exe is not None:
        (d / "exe").symlink_to(exe)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    # init -> supervisord (42) -> worker (300) -> child (400)
    root = tmp_path / "proc"
    root.mkdir()
    write_proc(root, 1, ppid=0, comm="systemd", uid=0, start_ticks=1, exe="/usr/lib/systemd")
    write_proc(root, 42, ppid=1, comm="supervisord", start_ticks=100, exe="/usr/bin/supervisord")
    write_proc(
        root,
        300,
        ppid=42,
        comm="worker",
        start_ticks=200,
        exe="/usr/bin/worker",
        cmdline=("/usr/bin/worker", "--jobs", "4"),
    )
    write_proc(root, 400, ppid=300, comm="child", start_ticks=300)
    return root


def record(tgid: int, *, ppid: int = 0, comm: str = "worker", cgroup_id: int = 0) -> SensorRecord:
    return SensorRecord(
        signal="fork_rate",
        tgid=tgid,
        pid=tgid,
        ppid=ppid,
        comm=comm,
        cgroup_id=cgroup_id,
        count=200,
        window_s=1.0,
        elapsed_s=0.5,
        ts_boot_ns=0,
    )


# --- parse_container -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(f"/docker/{CID}", ContainerRef("docker", CID, None), id="docker-cgroupfs"),
        pytest.param(
            f"/system.slice/docker-{CID}.scope",
            ContainerRef("docker", CID, None),
            id="docker-systemd",
        ),
        pytest.param(
            f"/kubepods/burstable/pod{POD}/{CID}",
            ContainerRef("kubepods", CID, POD, "burstable"),
            id="kube-cgroupfs-burstable",
        ),
        pytest.param(
            f"/kubepods/pod{POD}/{CID}",
            ContainerRef("kubepods", CID, POD, "guaranteed"),
            id="kube-cgroupfs-guaranteed",
        ),
        pytest.param(
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD_US}.slice/cri-containerd-{CID}.scope",
            ContainerRef("containerd", CID, POD, "burstable"),
            id="kube-systemd-containerd",
        ),
        pytest.param(
            f"/kubepods.slice/kubepods-pod{POD_US}.slice/cri-containerd-{CID}.scope",
            ContainerRef("containerd", CID, POD, "guaranteed"),
            id="kube-systemd-guaranteed",
        ),
        pytest.param(
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{POD_US}.slice/crio-{CID}.scope",
            ContainerRef("cri-o", CID, POD, "besteffort"),
            id="kube-systemd-crio",
        ),
        pytest.param(
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{POD_US}.slice/crio-conmon-{CID}.scope",
            ContainerRef("cri-o", CID, POD, "besteffort"),
            id="kube-systemd-crio-conmon",
        ),
        pytest.param(
            f"/kubepods/besteffort/pod{POD}/",
            ContainerRef("kubepods", None, POD, "besteffort"),
            id="kube-pod-without-container",
        ),
        pytest.param(
            f"/machine.slice/libpod-{CID}.scope",
            ContainerRef("podman", CID, None),
            id="podman",
        ),
        pytest.param(
            f"/machine.slice/libpod-{CID}.scope/container",
            ContainerRef("podman", CID, None),
            id="podman-nested-container-cgroup",
        ),
        pytest.param(
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
            ContainerRef("podman", CID, None),
            id="podman-rootless",
        ),
        pytest.param(
            f"/docker/{CID2}/kubepods/burstable/pod{POD}/{CID}",
            ContainerRef("kubepods", CID, POD, "burstable"),
            id="kind-innermost-wins",
        ),
        pytest.param(
            f"/docker/{CID2}/kubepods/besteffort/pod{POD}",
            ContainerRef("kubepods", None, POD, "besteffort"),
            id="kind-pod-only-drops-node-container",
        ),
        pytest.param(
            f"/kubepods/burstable/pod{'5c6a0f8a9a2e7b1c3d4e5f6a7b8c9d0e'}/{CID}",
            ContainerRef("kubepods", CID, "5c6a0f8a9a2e7b1c3d4e5f6a7b8c9d0e", "burstable"),
            id="kube-static-pod-hash-uid",
        ),
    ],
)
def test_parse_container(path: str, expected: ContainerRef) -> None:
    assert parse_container(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/system.slice/containerd.service",
        "/system.slice/docker.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
        "/",
        "",
        f"/system.slice/{CID}",  # a bare hex directory means nothing outside docker/kubepods
        "/kubepods/burstable",  # a QoS level with no pod
        "/docker",
    ],
)
def test_parse_container_non_matches(path: str) -> None:
    assert parse_container(path) is None


# --- Context.summary -------------------------------------------------------------------------


def context(**kw: object) -> Context:
    fields: dict[str, object] = {
        "pid": 300,
        "ppid": 42,
        "uid": 1000,
        "comm": "worker",
        "exe": "/usr/bin/worker",
        "cmdline": "/usr/bin/worker",
        "cgroup_path": f"/docker/{CID}",
        "container": ContainerRef("docker", CID, None),
        "parents": (Ancestor(42, "supervisord", "/usr/bin/supervisord"),),
    }
    fields.update(kw)
    return Context(**fields)  # type: ignore[arg-type]


def test_summary_with_container() -> None:
    assert context().summary() == "container 3f2a1b9c0d1e, /usr/bin/worker, parent 42 (supervisord)"


def test_summary_pod_without_container() -> None:
    ctx = context(container=ContainerRef("kubepods", None, POD, "besteffort"))
    assert ctx.summary() == f"pod {POD}, /usr/bin/worker, parent 42 (supervisord)"


def test_summary_outside_containers_names_the_cgroup() -> None:
    ctx = context(container=None, cgroup_path="/system.slice/foo.service")
    assert (
        ctx.summary()
        == "cgroup /system.slice/foo.service, /usr/bin/worker, parent 42 (supervisord)"
    )


def test_summary_omits_unknown_parts() -> None:
    ctx = context(container=None, cgroup_path="", exe=None, parents=())
    assert ctx.summary() == "worker, parent 42"
    assert (
        context(container=None, cgroup_path="", exe=None, comm="", ppid=0, parents=()).summary()
        == ""
    )


# --- ParentChain -----------------------------------------------------------------------------


def test_chain_nearest_first_up_to_init(proc_root: Path) -> None:
    chain = ParentChain(ProcFS(proc_root)).chain(400)
    assert chain == (
        Ancestor(300, "worker", "/usr/bin/worker"),
        Ancestor(42, "supervisord", "/usr/bin/supervisord"),
        Ancestor(1, "systemd", "/usr/lib/systemd"),
    )
    assert ParentChain(ProcFS(proc_root)).chain(1) == ()


def test_chain_fills_an_exited_ancestor_from_lineage(proc_root: Path) -> None:
    # 500's parent 450 already exited; the kernel's lineage map remembers it came from 42.
    write_proc(proc_root, 500, ppid=450, comm="short", start_ticks=400)
    lineage = {450: (42, "launcher")}
    chain = ParentChain(ProcFS(proc_root), lineage.get).chain(500)
    assert [(a.pid, a.comm, a.exe) for a in chain] == [
        (450, "launcher", None),
        (42, "supervisord", "/usr/bin/supervisord"),
        (1, "systemd", "/usr/lib/systemd"),
    ]


def test_chain_stops_at_an_ancestor_nobody_knows(proc_root: Path) -> None:
    write_proc(proc_root, 500, ppid=450, comm="orphan", start_ticks=400)
    assert ParentChain(ProcFS(proc_root)).chain(500) == ()


def test_chain_of_a_gone_pid_uses_the_hint_then_lineage(proc_root: Path) -> None:
    parents = ParentChain(ProcFS(proc_root), {999: (300, "gone")}.get)
    assert [a.pid for a in parents.chain(999, ppid_hint=42)] == [42, 1]
    assert [a.pid for a in parents.chain(999)] == [300, 42, 1]
    assert ParentChain(ProcFS(proc_root)).chain(999) == ()


def test_chain_survives_a_loop_in_lineage(proc_root: Path) -> None:
    # Stale lineage entries (pids reused) can point back at each other; never loop forever.
    lineage = {600: (601, "a"), 601: (602, "b"), 602: (600, "c")}
    chain = ParentChain(ProcFS(proc_root), lineage.get).chain(999, ppid_hint=600)
    assert [a.pid for a in chain] == [600, 601, 602]


def test_chain_stops_at_max_depth(proc_root: Path) -> None:
    lineage = {n: (n + 1, f"p{n}") for n in range(1000, 1100)}
    chain = ParentChain(ProcFS(proc_root), lineage.get).chain(999, ppid_hint=1000)
    assert [a.pid for a in chain] == list(range(1000, 1008))
    assert len(ParentChain(ProcFS(proc_root), lineage.get, max_depth=3).chain(999, 1000)) == 3


def test_chain_distrusts_a_parent_that_started_after_its_child(proc_root: Path) -> None:
    # 700's real parent 42 exited and a new process took pid 42 later than 700 started.
    write_proc(proc_root, 700, ppid=710, comm="old", start_ticks=50)
    write_proc(proc_root, 710, ppid=1, comm="reused", start_ticks=900)
    chain = ParentChain(ProcFS(proc_root), {710: (1, "original")}.get).chain(700)
    assert [(a.pid, a.comm) for a in chain] == [(710, "original"), (1, "systemd")]


# --- Enricher --------------------------------------------------------------------------------


def test_enrich_a_live_process(proc_root: Path) -> None:
    enricher = Enricher(
        ProcFS(proc_root),
        None,
        ParentChain(ProcFS(proc_root)),
        proc_cgroup=lambda _pid: f"/system.slice/docker-{CID}.scope",
    )
    ctx = enricher.enrich(record(300, ppid=42))
    assert ctx == Context(
        pid=300,
        ppid=42,
        uid=1000,
        comm="worker",
        exe="/usr/bin/worker",
        cmdline="/usr/bin/worker --jobs 4",
        cgroup_path=f"/system.slice/docker-{CID}.scope",
        container=ContainerRef("docker", CID, None),
        parents=(
            Ancestor(42, "supervisord", "/usr/bin/supervisord"),
            Ancestor(1, "systemd", "/usr/lib/systemd"),
        ),
    )


def test_enrich_a_gone_process_from_the_record(proc_root: Path) -> None:
    def proc_cgroup(pid: int) -> str:
        raise FileNotFoundError(pid)

    parents = ParentChain(ProcFS(proc_root), {450: (42, "launcher")}.get)
    enricher = Enricher(ProcFS(proc_root), None, parents, proc_cgroup)
    ctx = enricher.enrich(record(999, ppid=450, comm="burst"))
    assert (ctx.pid, ctx.ppid, ctx.uid, ctx.comm, ctx.exe, ctx.cmdline) == (
        999,
        450,
        -1,
        "burst",
        None,
        "",
    )
    assert (ctx.cgroup_path, ctx.container) == ("", None)
    assert [a.pid for a in ctx.parents] == [450, 42, 1]
    assert ctx.summary() == "burst, parent 450 (launcher)"


def test_enrich_treats_a_reused_pid_as_gone(proc_root: Path) -> None:
    procfs = ProcFS(proc_root)
    started_ns = procfs.start_boot_ns(procfs.read(300))
    rec = record(300, ppid=77, comm="original")
    rec = SensorRecord(**{**rec.__dict__, "ts_boot_ns": started_ns - 1_000_000_000})
    ctx = Enricher(procfs, None, ParentChain(procfs)).enrich(rec)
    assert (ctx.comm, ctx.ppid, ctx.exe) == ("original", 77, None)


def test_enrich_truncates_the_command_line(proc_root: Path) -> None:
    write_proc(proc_root, 800, ppid=1, cmdline=("python", "-c", "x" * 1000))
    ctx = Enricher(ProcFS(proc_root), None, ParentChain(ProcFS(proc_root))).enrich(record(800))
    assert len(ctx.cmdline) == CMDLINE_MAX
    assert ctx.cmdline.startswith("python -c xxx") and ctx.cmdline.endswith("x…")


def test_enrich_resolves_the_cgroup_id_and_falls_back_to_v1_for_the_container(
    proc_root: Path, tmp_path: Path
) -> None:
    mount = tmp_path / "unified"
    (mount / "system.slice" / "docker.service").mkdir(parents=True)
    cgroup_id = os.stat(mount / "system.slice" / "docker.service").st_ino
    enricher = Enricher(
        ProcFS(proc_root),
        CgroupIndex(mount),
        ParentChain(ProcFS(proc_root)),
        proc_cgroup=lambda _pid: f"/docker/{CID}",
    )
    ctx = enricher.enrich(record(300, cgroup_id=cgroup_id))
    # The path names the cgroup the id belongs to; the container comes from the v1 path.
    assert ctx.cgroup_path == "/system.slice/docker.service"
    assert ctx.container == ContainerRef("docker", CID, None)
    # An id the index cannot resolve: the v1 path is all there is.
    assert enricher.enrich(record(300, cgroup_id=424242)).cgroup_path == f"/docker/{CID}"


# --- CgroupIndex -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup2"
    (root / "system.slice" / "foo.service").mkdir(parents=True)
    (root / "user.slice").mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "system.slice" / "cgroup.procs").write_text("")
    return root


def ino(path: Path) -> int:
    return os.stat(path).st_ino


def test_index_maps_inodes_to_paths(mount: Path) -> None:
    index = CgroupIndex(mount)
    assert index.path_of(ino(mount)) == "/"
    assert index.path_of(ino(mount / "system.slice" / "foo.service")) == "/system.slice/foo.service"
    assert index.path_of(ino(mount / "user.slice")) == "/user.slice"
    assert index.path_of(ino(mount / "cgroup.controllers")) is None  # files are not cgroups
    assert index.path_of(0) is None
    assert index.scans == 1


def test_index_rescans_on_a_miss_at_most_once_per_interval(mount: Path) -> None:
    clock = FakeClock()
    index = CgroupIndex(mount, clock=clock, min_rescan_s=1.0)
    assert index.path_of(ino(mount / "user.slice")) == "/user.slice"
    new = mount / "system.slice" / "new.service"
    new.mkdir()
    clock.now += 0.5
    assert index.path_of(ino(new)) is None  # too soon after the first walk
    assert index.path_of(ino(new)) is None
    assert index.scans == 1
    clock.now += 0.6
    assert index.path_of(ino(new)) == "/system.slice/new.service"
    assert index.scans == 2
    # Hits never walk, however often they come.
    for _ in range(5):
        assert index.path_of(ino(new)) == "/system.slice/new.service"
    assert index.scans == 2


def test_index_rescan_forgets_removed_cgroups(mount: Path) -> None:
    clock = FakeClock()
    index = CgroupIndex(mount, clock=clock)
    gone = mount / "user.slice"
    gone_ino = ino(gone)
    assert index.path_of(gone_ino) == "/user.slice"
    # tmpfs hands a freed inode number straight to the next directory (kernfs, whose ids are
    # allocated cyclically, does not), so make the new cgroup before removing the old one.
    (mount / "later").mkdir()
    gone.rmdir()
    clock.now += 5
    assert index.path_of(ino(mount / "later")) == "/later"
    assert gone_ino not in {ino(p) for p in mount.rglob("*")}
    clock.now += 5
    assert index.path_of(gone_ino) is None


def test_detect_unified_and_hybrid(tmp_path: Path, mount: Path) -> None:
    unified = CgroupIndex.detect(mount)
    assert unified is not None and unified.mount == mount
    hybrid_root = tmp_path / "hybrid"
    (hybrid_root / "cpu").mkdir(parents=True)
    (hybrid_root / "unified").mkdir()
    (hybrid_root / "unified" / "cgroup.controllers").write_text("")
    hybrid = CgroupIndex.detect(hybrid_root)
    assert hybrid is not None and hybrid.mount == hybrid_root / "unified"
    v1_only = tmp_path / "v1"
    (v1_only / "cpu").mkdir(parents=True)
    assert CgroupIndex.detect(v1_only) is None


def test_pod_namespace_and_name_come_from_the_kubelet_log_directories(tmp_path: Path) -> None:
    from remedy.sensors.context import PodIndex, PodRef  # noqa: PLC0415

    uid = "0f1c2d3e-4a5b-6c7d-8e9f-0a1b2c3d4e5f"
    logs = tmp_path / "pods"
    (logs / f"payments_api-7d9f8_{uid}").mkdir(parents=True)
    (logs / "not-a-pod-dir").mkdir()
    now = [0.0]
    index = PodIndex(logs, clock=lambda: now[0], min_rescan_s=5.0)
    assert index.lookup(uid) == PodRef("payments", "api-7d9f8")
    other = "11111111-2222-3333-4444-555555555555"
    (logs / f"batch_job-1_{other}").mkdir()
    assert index.lookup(other) is None  # a miss rescans at most every 5 s
    now[0] = 6.0
    assert index.lookup(other) == PodRef("batch", "job-1")
    assert PodIndex(tmp_path / "absent").lookup(uid) is None


# --- hostile names -----------------------------------------------------------------------------


def test_enrich_reports_the_true_uid_behind_a_comm_faking_the_uid_line(proc_root: Path) -> None:
    # status is "Name:\t<comm>\n..." with \x1c raw in it: a reader that splits lines there
    # would take "Uid:\t0\t0\t0" for the Uid line.
    write_proc(proc_root, 810, ppid=1, comm="\x1cUid:\t0\t0\t0", uid=65534)
    ctx = Enricher(ProcFS(proc_root), None, ParentChain(ProcFS(proc_root))).enrich(record(810))
    assert (ctx.comm, ctx.uid) == ("\x1cUid:\t0\t0\t0", 65534)


def test_index_and_enricher_keep_any_byte_of_a_cgroup_name(proc_root: Path, mount: Path) -> None:
    names = ["x\x1c0::", "\u2028y\x85", os.fsdecode(b"\xff\xfe")]
    for name in names:
        (mount / "user.slice" / name).mkdir()
    index = CgroupIndex(mount)
    enricher = Enricher(ProcFS(proc_root), index, ParentChain(ProcFS(proc_root)))
    assert enricher.cgroup_index is index
    for name in names:
        cgroup_id = ino(mount / "user.slice" / name)
        assert index.path_of(cgroup_id) == f"/user.slice/{name}"
        assert (
            enricher.enrich(record(300, cgroup_id=cgroup_id)).cgroup_path == f"/user.slice/{name}"
        )
