"""The BTF reader that gives the kernel filter task_struct's layout (remedy/sensors/btf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from btf_blob import TASK, blob

from remedy.errors import SensorError
from remedy.sensors.btf import TASK_FIELDS, member_offsets, task_offsets


def test_offsets_of_task_struct(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(blob())
    offsets = task_offsets(path)
    assert {f: getattr(offsets, f) for f in TASK_FIELDS} == TASK
    assert offsets.defines()["TASK_OFF_START_BOOTTIME"] == TASK["start_boottime"]


def test_members_inside_an_anonymous_struct_are_found(tmp_path: Path) -> None:
    assert member_offsets(blob(anonymous=True), "task_struct", TASK_FIELDS) == TASK


def test_a_missing_member_or_struct_or_file_is_a_sensor_error(tmp_path: Path) -> None:
    short = {k: v for k, v in TASK.items() if k != "start_boottime"}
    with pytest.raises(SensorError, match=r"no member.*start_boottime"):
        member_offsets(blob({"task_struct": short}), "task_struct", TASK_FIELDS)
    with pytest.raises(SensorError, match="not found"):
        member_offsets(blob({"mm_struct": TASK}), "task_struct", TASK_FIELDS)
    with pytest.raises(SensorError, match="no BTF"):
        task_offsets(tmp_path / "absent")
    with pytest.raises(SensorError, match="not BTF"):
        member_offsets(b"\0" * 64, "task_struct", TASK_FIELDS)


def test_the_running_kernels_btf_is_read(tmp_path: Path) -> None:
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if not vmlinux.exists():
        pytest.skip("this kernel has no BTF")
    offsets = task_offsets(vmlinux)
    # Sanity: pid then tgid are adjacent ints; the pointers are 8-byte aligned.
    assert offsets.tgid == offsets.pid + 4
    assert offsets.group_leader % 8 == 0 and offsets.real_parent % 8 == 0
