"""Offsets of kernel struct members, read from the running kernel's BTF.

The kernel filter names each process by (tgid, birth), and the birth is
``task->group_leader->start_boottime``. bcc compiles against whatever headers are installed;
where they are not the running kernel's (this project's CI VM runs 6.18 with 6.1 headers), the
offsets clang computes from them are wrong and every read returns garbage or 0. The kernel
describes its own layout in ``/sys/kernel/btf/vmlinux`` (CONFIG_DEBUG_INFO_BTF), so the offsets
are taken from there and handed to the program as compile-time defines.

Cgroup signals on hybrid hosts (issue 10, item 9) are keyed by the task's cgroup in the v1
hierarchy remedy acts on: ``task->cgroups->subsys[<id>]->cgroup->kn->id``, where ``<id>`` is the
controller's value in ``enum cgroup_subsys_id`` (which controllers are built in decides it, so it
is read from BTF too) and ``kn->id`` is the inode of that cgroup's directory.

Only the parts of the format needed to walk struct members and enums are decoded
(include/uapi/linux/btf.h; Documentation/bpf/btf.rst).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from remedy.errors import SensorError

__all__ = [
    "TASK_FIELDS",
    "Btf",
    "CgroupOffsets",
    "TaskOffsets",
    "cgroup_offsets",
    "member_offsets",
    "task_offsets",
]

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")

# BTF_KIND_* -> bytes that follow struct btf_type: (fixed, per vlen entry).
_KIND_INT, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM, _KIND_ENUM64 = 1, 4, 5, 6, 19
_ENUM = struct.Struct("<Ii")
_ENUM64 = struct.Struct("<III")
_TRAILER = {
    1: (4, 0),  # INT
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}
# Modifiers and typedefs an anonymous member's type may hide behind.
_ALIASES = {8, 9, 10, 11, 18}

TASK_FIELDS = ("pid", "tgid", "start_boottime", "group_leader", "real_parent")


@dataclass(frozen=True)
class TaskOffsets:
    """Byte offsets in ``struct task_struct`` and where they came from."""

    pid: int
    tgid: int
    start_boottime: int
    group_leader: int
    real_parent: int
    source: str  # "btf:/sys/kernel/btf/vmlinux"
    # task->signal->live (the threads not yet exited): on kernels whose sched_process_exit has
    # no group_dead (before 6.13) it is how the filter tells the process's death from its
    # leader thread's. None where the BTF does not describe them.
    signal: int | None = None
    signal_live: int | None = None

    def defines(self) -> dict[str, int]:
        """As -D flags for bpf/remedy.bpf.c (TASK_OFF_<FIELD>, SIGNAL_OFF_LIVE)."""
        out = {f"TASK_OFF_{name.upper()}": getattr(self, name) for name in TASK_FIELDS}
        if self.signal is not None and self.signal_live is not None:
            out["TASK_OFF_SIGNAL"] = self.signal
            out["SIGNAL_OFF_LIVE"] = self.signal_live
        return out


@dataclass(frozen=True)
class _Type:
    kind: int
    name_off: int
    size_or_type: int
    # struct/union: (name_off, type id, bit offset); enum: (name_off, value, 0)
    members: tuple[tuple[int, int, int], ...]


def _parse(data: bytes) -> tuple[list[_Type | None], bytes]:
    if len(data) < _HEADER.size:
        raise SensorError("BTF blob too short")
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SensorError(f"not BTF (magic {magic:#x}); big-endian BTF is not supported")
    types_at, strings_at = hdr_len + type_off, hdr_len + str_off
    strings = data[strings_at : strings_at + str_len]
    types: list[_Type | None] = [None]  # type id 0 is void
    pos, end = types_at, types_at + type_len
    while pos < end:
        name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
        pos += _TYPE.size
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        if kind not in _TRAILER:
            raise SensorError(f"unknown BTF kind {kind}: a newer kernel than this parser")
        fixed, per = _TRAILER[kind]
        members: tuple[tuple[int, int, int], ...] = ()
        if kind in (_KIND_STRUCT, _KIND_UNION):
            entries = []
            for i in range(vlen):
                m_name, m_type, m_off = _MEMBER.unpack_from(data, pos + i * _MEMBER.size)
                entries.append((m_name, m_type, m_off & 0xFFFFFF if kind_flag else m_off))
            members = tuple(entries)
        elif kind == _KIND_ENUM:
            members = tuple(
                (name, value, 0)
                for name, value in (
                    _ENUM.unpack_from(data, pos + i * _ENUM.size) for i in range(vlen)
                )
            )
        elif kind == _KIND_ENUM64:
            members = tuple(
                (name, lo | hi << 32, 0)
                for name, lo, hi in (
                    _ENUM64.unpack_from(data, pos + i * _ENUM64.size) for i in range(vlen)
                )
            )
        pos += fixed + per * vlen
        types.append(_Type(kind, name_off, size_or_type, members))
    return types, strings


def _name(strings: bytes, off: int) -> str:
    return strings[off : strings.index(b"\0", off)].decode()


def _flatten(
    types: list[_Type | None],
    strings: bytes,
    t: _Type,
    base_bits: int,
    out: dict[str, tuple[int, int]],
) -> None:
    """Named members of ``t`` (and of its anonymous struct/union members): (bit offset, type)."""
    for name_off, type_id, bits in t.members:
        if name_off:
            out.setdefault(_name(strings, name_off), (base_bits + bits, type_id))
            continue
        inner = _resolve(types, type_id)
        if inner is not None and inner.kind in (_KIND_STRUCT, _KIND_UNION):
            _flatten(types, strings, inner, base_bits + bits, out)


def _resolve(types: list[_Type | None], type_id: int) -> _Type | None:
    """The type behind typedefs and modifiers (u64 -> __u64 -> unsigned long long)."""
    t = types[type_id]
    while t is not None and t.kind in _ALIASES:
        t = types[t.size_or_type]
    return t


class Btf:
    """A parsed BTF blob: struct member offsets and enum values by name."""

    def __init__(self, data: bytes, source: str = "btf") -> None:
        self._types, self._strings = _parse(data)
        self.source = source

    @classmethod
    def read(cls, path: Path = VMLINUX) -> Btf:
        """The running kernel's BTF; SensorError when it has none."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SensorError(
                f"cannot read {path} ({err.strerror}): the kernel has no BTF "
                "(CONFIG_DEBUG_INFO_BTF), so remedy cannot learn its struct layouts"
            ) from err
        return cls(data, source=f"btf:{path}")

    def _named(self, kind: int, name: str) -> Iterable[_Type]:
        wanted = name.encode() + b"\0"
        for t in self._types:
            if t is None or t.kind != kind or not t.members:
                continue
            if self._strings[t.name_off : t.name_off + len(wanted)] == wanted:
                yield t

    def _members(self, struct_name: str, fields: Iterable[str]) -> dict[str, tuple[int, int]]:
        for t in self._named(_KIND_STRUCT, struct_name):
            flat: dict[str, tuple[int, int]] = {}
            _flatten(self._types, self._strings, t, 0, flat)
            missing = [f for f in fields if f not in flat]
            if missing:
                raise SensorError(f"struct {struct_name} has no member(s) {', '.join(missing)}")
            return {f: flat[f] for f in fields}
        raise SensorError(f"struct {struct_name} not found in BTF")

    def offsets(self, struct_name: str, fields: Iterable[str]) -> dict[str, int]:
        """Byte offsets of ``fields`` in ``struct <struct_name>``."""
        return {f: bits // 8 for f, (bits, _) in self._members(struct_name, fields).items()}

    def int_size(self, struct_name: str, field: str) -> int:
        """The size in bytes of an integer member (0 when it is not an integer)."""
        _, type_id = self._members(struct_name, (field,))[field]
        t = _resolve(self._types, type_id)
        return t.size_or_type if t is not None and t.kind == _KIND_INT else 0

    def enum_value(self, enum_name: str, member: str) -> int:
        """The value of ``member`` in ``enum <enum_name>``."""
        wanted = member.encode() + b"\0"
        for kind in (_KIND_ENUM, _KIND_ENUM64):
            for t in self._named(kind, enum_name):
                for name_off, value, _ in t.members:
                    if self._strings[name_off : name_off + len(wanted)] == wanted:
                        return value
                raise SensorError(f"enum {enum_name} has no member {member}")
        raise SensorError(f"enum {enum_name} not found in BTF")


def member_offsets(data: bytes, struct_name: str, fields: Iterable[str]) -> dict[str, int]:
    """Byte offsets of ``fields`` in ``struct <struct_name>`` as described by a BTF blob."""
    return Btf(data).offsets(struct_name, fields)


def task_offsets(path: Path = VMLINUX, btf: Btf | None = None) -> TaskOffsets:
    """The running kernel's task_struct offsets (from ``btf`` when already parsed); SensorError
    when it has no BTF."""
    btf = btf or Btf.read(path)
    signal: int | None
    live: int | None
    try:
        signal = btf.offsets("task_struct", ["signal"])["signal"]
        live = btf.offsets("signal_struct", ["live"])["live"]
    except SensorError:
        signal = live = None
    return TaskOffsets(
        **btf.offsets("task_struct", TASK_FIELDS),
        source=btf.source,
        signal=signal,
        signal_live=live,
    )


@dataclass(frozen=True)
class CgroupOffsets:
    """What the kernel filter reads to key cgroup signals by a v1 hierarchy: the chain
    ``task->cgroups->subsys[subsys_id]`` (the task's css in that controller's hierarchy),
    ``css->parent`` (NULL only for the hierarchy's root), ``css->cgroup->kn->id`` (the inode of
    the cgroup's directory there)."""

    controller: str  # "pids"
    subsys_id: int  # <controller>_cgrp_id in enum cgroup_subsys_id
    task_cgroups: int
    css_set_subsys: int
    css_cgroup: int
    css_parent: int
    cgroup_kn: int
    kernfs_node_id: int
    source: str

    def defines(self) -> dict[str, int]:
        """As -D flags for bpf/remedy.bpf.c."""
        return {
            "REMEDY_CGROUP_SUBSYS_ID": self.subsys_id,
            "TASK_OFF_CGROUPS": self.task_cgroups,
            "CSS_SET_OFF_SUBSYS": self.css_set_subsys,
            "CSS_OFF_CGROUP": self.css_cgroup,
            "CSS_OFF_PARENT": self.css_parent,
            "CGROUP_OFF_KN": self.cgroup_kn,
            "KERNFS_NODE_OFF_ID": self.kernfs_node_id,
        }


def cgroup_offsets(controller: str = "pids", btf: Btf | None = None) -> CgroupOffsets:
    """The running kernel's offsets for keying by ``controller``'s v1 hierarchy."""
    btf = btf or Btf.read()
    # kernfs_node.id is u64 since Linux 5.5 (before, a union of ino and generation): the inode
    # on 64-bit hosts. Anything else would be a different key than the directory's st_ino.
    size = btf.int_size("kernfs_node", "id")
    if size != 8:
        raise SensorError(f"kernfs_node.id is not a 64-bit integer here (size {size})")
    return CgroupOffsets(
        controller=controller,
        subsys_id=btf.enum_value("cgroup_subsys_id", f"{controller}_cgrp_id"),
        task_cgroups=btf.offsets("task_struct", ("cgroups",))["cgroups"],
        css_set_subsys=btf.offsets("css_set", ("subsys",))["subsys"],
        css_cgroup=btf.offsets("cgroup_subsys_state", ("cgroup",))["cgroup"],
        css_parent=btf.offsets("cgroup_subsys_state", ("parent",))["parent"],
        cgroup_kn=btf.offsets("cgroup", ("kn",))["kn"],
        kernfs_node_id=btf.offsets("kernfs_node", ("id",))["id"],
        source=btf.source,
    )
