"""CgroupIndex on this machine's real cgroup2 mount: detection, lookups, a new cgroup."""

from __future__ import annotations

import ctypes
import os
import sys
import uuid
from pathlib import Path

import pytest

from remedy.sensors.context import CgroupIndex

pytestmark = pytest.mark.root

REQUIRE_BPF = os.environ.get("REMEDY_REQUIRE_BPF") == "1"
_AT_FDCWD = -100


class _FileHandle(ctypes.Structure):
    # struct file_handle (include/linux/fs.h, name_to_handle_at(2)) with room for kernfs's 8 bytes.
    _fields_ = (
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 8),
    )


def kernel_cgroup_id(path: Path) -> int:
    """The id the kernel itself reports for a cgroup: kernfs encodes it as the file handle
    (kernfs_encode_fh), which is how libbpf's selftests compute what
    bpf_get_current_cgroup_id() returns."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle = _FileHandle(handle_bytes=8)
    mount_id = ctypes.c_int()
    rc = libc.name_to_handle_at(
        _AT_FDCWD, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int.from_bytes(bytes(handle.f_handle), sys.byteorder)


@pytest.fixture
def index() -> CgroupIndex:
    why = None
    found = CgroupIndex.detect()
    if os.geteuid() != 0:
        why = "not root"
    elif found is None:
        why = "no cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    if why is not None:
        if REQUIRE_BPF:
            pytest.fail(f"REMEDY_REQUIRE_BPF=1 but the cgroup index cannot be tested: {why}")
        pytest.skip(why)
    assert found is not None
    return found


def test_detect_finds_the_cgroup2_mount(index: CgroupIndex) -> None:
    assert index.mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
    assert (index.mount / "cgroup.controllers").is_file()
    assert index.path_of(os.stat(index.mount).st_ino) == "/"


def test_existing_cgroups_resolve(index: CgroupIndex) -> None:
    # On a hybrid host systemd may leave the unified tree empty: then only the root is there.
    for sub in (p for p in index.mount.iterdir() if p.is_dir() and not p.is_symlink()):
        assert index.path_of(os.stat(sub).st_ino) == f"/{sub.name}"
    # This process's own v2 cgroup ("0::<path>" in /proc/self/cgroup).
    own = next(
        line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::"
    )
    assert index.path_of(os.stat(index.mount / own.lstrip("/")).st_ino) == own


def test_inode_is_the_kernel_cgroup_id(index: CgroupIndex) -> None:
    for cgroup in [index.mount, *(p for p in index.mount.iterdir() if p.is_dir())]:
        assert kernel_cgroup_id(cgroup) == os.stat(cgroup).st_ino


def test_a_new_cgroup_resolves_after_a_rescan(index: CgroupIndex) -> None:
    now = [0.0]
    index = CgroupIndex(index.mount, clock=lambda: now[0], min_rescan_s=1.0)
    assert index.path_of(os.stat(index.mount).st_ino) == "/"
    name = f"remedy-test-{uuid.uuid4().hex[:12]}"
    cgroup = index.mount / name
    child = cgroup / "child"
    cgroup.mkdir()
    try:
        child.mkdir()
        cgroup_id = os.stat(cgroup).st_ino
        assert kernel_cgroup_id(cgroup) == cgroup_id
        assert index.path_of(cgroup_id) is None  # a miss inside the rate limit
        now[0] += 1.5
        assert index.path_of(cgroup_id) == f"/{name}"
        assert index.path_of(os.stat(child).st_ino) == f"/{name}/child"
        assert index.scans == 2
    finally:
        # cgroup directories are removed with rmdir, leaves first (their files cannot be).
        if child.exists():
            child.rmdir()
        cgroup.rmdir()
