"""A tiny BTF blob for tests: one u64 INT and structs with named members (byte offsets)."""

from __future__ import annotations

import struct

TASK = {
    "pid": 1264,
    "tgid": 1268,
    "real_parent": 1280,
    "group_leader": 1328,
    "start_boottime": 1560,
}


def blob(structs: dict[str, dict[str, int]] | None = None, *, anonymous: bool = False) -> bytes:
    """BTF with ``structs`` (name -> member -> byte offset); ``anonymous`` nests every member
    inside an anonymous struct member at offset 0 (as randomized_struct_fields does)."""
    structs = {"task_struct": TASK} if structs is None else structs
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        off = len(strings)
        strings.extend(text.encode() + b"\0")
        return off

    types = bytearray()
    # [1] INT u64
    types += struct.pack("<III", name("u64"), 1 << 24, 8) + struct.pack("<I", 64)
    next_id = 2
    for sname, members in structs.items():
        entries = b"".join(struct.pack("<III", name(m), 1, off * 8) for m, off in members.items())
        if anonymous:
            inner_id = next_id
            types += struct.pack("<III", 0, (4 << 24) | len(members), 4096) + entries
            next_id += 1
            entries = struct.pack("<III", 0, inner_id, 0)
            count = 1
        else:
            count = len(members)
        types += struct.pack("<III", name(sname), (4 << 24) | count, 4096) + entries
        next_id += 1
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings)
