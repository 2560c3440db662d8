"""The BTF reader on a hand-built blob: struct offsets through typedefs, integer sizes, and enum
values (ENUM and ENUM64), as include/uapi/linux/btf.h lays them out."""

from __future__ import annotations

import struct

import pytest

from remedy.errors import SensorError
from remedy.sensors.btf import Btf


def _blob() -> bytes:
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        strings.extend(text.encode() + b"\0")
        return len(strings) - len(text) - 1

    def head(name_off: int, kind: int, vlen: int, size_or_type: int) -> bytes:
        return struct.pack("<III", name_off, kind << 24 | vlen, size_or_type)

    types = b"".join(
        (
            # 1: INT "unsigned long long", 8 bytes (trailer: encoding, offset, bits)
            head(name("unsigned long long"), 1, 0, 8) + struct.pack("<I", 64),
            # 2: TYPEDEF u64 -> 1; 3: CONST -> 2 (modifiers a member's type may hide behind)
            head(name("u64"), 8, 0, 1),
            head(0, 10, 0, 2),
            # 4: STRUCT kernfs_node { u64 flags; const u64 id; struct { u64 inner; } }
            head(name("kernfs_node"), 4, 3, 24)
            + struct.pack("<III", name("flags"), 1, 0)
            + struct.pack("<III", name("id"), 3, 64)
            + struct.pack("<III", 0, 5, 128),
            # 5: an anonymous STRUCT { u64 inner; }
            head(0, 4, 1, 8) + struct.pack("<III", name("inner"), 2, 0),
            # 6: ENUM cgroup_subsys_id { cpu_cgrp_id = 1, pids_cgrp_id = 11 }
            head(name("cgroup_subsys_id"), 6, 2, 4)
            + struct.pack("<Ii", name("cpu_cgrp_id"), 1)
            + struct.pack("<Ii", name("pids_cgrp_id"), 11),
            # 7: ENUM64 big { huge = 2**40 + 5 }
            head(name("big"), 19, 1, 8) + struct.pack("<III", name("huge"), 5, 1 << 8),
        )
    )
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + bytes(strings)


def test_struct_offsets_through_typedefs_and_anonymous_members() -> None:
    btf = Btf(_blob())
    assert btf.offsets("kernfs_node", ("flags", "id", "inner")) == {
        "flags": 0,
        "id": 8,
        "inner": 16,
    }
    assert btf.int_size("kernfs_node", "id") == 8  # const u64 -> u64 -> unsigned long long


def test_enum_values() -> None:
    btf = Btf(_blob())
    assert btf.enum_value("cgroup_subsys_id", "pids_cgrp_id") == 11
    assert btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id") == 1
    assert btf.enum_value("big", "huge") == (1 << 40) + 5


def test_what_is_missing_is_named() -> None:
    btf = Btf(_blob())
    with pytest.raises(SensorError, match="no member memory_cgrp_id"):
        btf.enum_value("cgroup_subsys_id", "memory_cgrp_id")
    with pytest.raises(SensorError, match="enum nope not found"):
        btf.enum_value("nope", "x")
    with pytest.raises(SensorError, match="struct css_set not found"):
        btf.offsets("css_set", ("subsys",))
