"""Offsets of kernel struct members, read from the running kernel's BTF.

The kernel filter names each process by (tgid, birth), and the birth is
``task->group_leader->start_boottime``. bcc compiles against whatever headers are installed;
where they are not the running kernel's (this project's CI VM runs 6.18 with 6.1 headers), the
offsets clang computes from them are wrong and every read returns garbage or 0. The kernel
describes its own layout in ``/sys/kernel/btf/vmlinux`` (CONFIG_DEBUG_INFO_BTF), so the offsets
are taken from there and handed to the program as compile-time defines.

Only the parts of the format needed to walk struct members are decoded
(include/uapi/linux/btf.h; Documentation/bpf/btf.rst).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from remedy.errors import SensorError

__all__ = ["TASK_FIELDS", "TaskOffsets", "member_offsets", "task_offsets"]

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_MEMBER = struct.Struct("<III")

# BTF_KIND_* -> bytes that follow struct btf_type: (fixed, per vlen entry).
_KIND_STRUCT, _KIND_UNION = 4, 5
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

    def defines(self) -> dict[str, int]:
        """As -D flags for bpf/remedy.bpf.c (TASK_OFF_<FIELD>)."""
        return {f"TASK_OFF_{name.upper()}": getattr(self, name) for name in TASK_FIELDS}


@dataclass(frozen=True)
class _Type:
    kind: int
    name_off: int
    size_or_type: int
    members: tuple[tuple[int, int, int], ...]  # (name_off, type id, bit offset)


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
        pos += fixed + per * vlen
        types.append(_Type(kind, name_off, size_or_type, members))
    return types, strings


def _name(strings: bytes, off: int) -> str:
    return strings[off : strings.index(b"\0", off)].decode()


def _flatten(
    types: list[_Type | None], strings: bytes, t: _Type, base_bits: int, out: dict[str, int]
) -> None:
    """Named members of ``t`` (and of its anonymous struct/union members) by bit offset."""
    for name_off, type_id, bits in t.members:
        if name_off:
            out.setdefault(_name(strings, name_off), base_bits + bits)
            continue
        inner = types[type_id]
        while inner is not None and inner.kind in _ALIASES:
            inner = types[inner.size_or_type]
        if inner is not None and inner.kind in (_KIND_STRUCT, _KIND_UNION):
            _flatten(types, strings, inner, base_bits + bits, out)


def member_offsets(data: bytes, struct_name: str, fields: Iterable[str]) -> dict[str, int]:
    """Byte offsets of ``fields`` in ``struct <struct_name>`` as described by a BTF blob."""
    types, strings = _parse(data)
    wanted = struct_name.encode() + b"\0"
    for t in types:
        if t is None or t.kind != _KIND_STRUCT or not t.members:
            continue
        if strings[t.name_off : t.name_off + len(wanted)] != wanted:
            continue
        flat: dict[str, int] = {}
        _flatten(types, strings, t, 0, flat)
        missing = [f for f in fields if f not in flat]
        if missing:
            raise SensorError(f"struct {struct_name} has no member(s) {', '.join(missing)}")
        return {f: flat[f] // 8 for f in fields}
    raise SensorError(f"struct {struct_name} not found in BTF")


def task_offsets(path: Path = VMLINUX) -> TaskOffsets:
    """The running kernel's task_struct offsets; SensorError when it has no BTF."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SensorError(
            f"cannot read {path} ({err.strerror}): the kernel has no BTF "
            "(CONFIG_DEBUG_INFO_BTF), so remedy cannot learn task_struct's layout"
        ) from err
    offsets = member_offsets(data, "task_struct", TASK_FIELDS)
    return TaskOffsets(**offsets, source=f"btf:{path}")
