"""The kernel funnel: ``bpf/remedy.bpf.c`` and its user-space face (the ``Sensor`` protocol)."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from remedy.compiler.plan import MAX_CGROUP_RULES, MAX_CLASSES, MAX_TIERS, SensorPlan, SignalPlan
from remedy.errors import SensorError
from remedy.sensors import bpf, btf, memory
from remedy.sensors.catalog import BY_ID, SIGNALS, SignalCounters, needs_bpf, sections_for
from remedy.sensors.context import key_hierarchy
from remedy.sensors.records import SensorRecord

PROGRAM = "remedy"
TASK_COMM_LEN = 16
SIG_MAX = len(BY_ID)
CFG_STACKS = 1
REC_DEGRADED = 1
MIB = 1 << 20


class Counter(enum.IntEnum):
    """Per-signal counter indexes; KEEP IN SYNC with enum remedy_counter."""

    EVENTS_SEEN = 0
    RECORDS_EMITTED = 1
    RINGBUF_FAILED = 2
    WINDOWS_OPENED = 3
    KEY_INIT_FAILED = 4


class TierC(ctypes.Structure):
    """Mirror of struct tier_config (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("threshold", ctypes.c_int64),
        ("rule", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("sustain", ctypes.c_uint32),
        ("cls", ctypes.c_uint32),
        ("fastpath", ctypes.c_uint32),
        ("fp_dry_run", ctypes.c_uint32),
    )


class SignalConfigC(ctypes.Structure):
    """Mirror of struct signal_config (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("window_ns", ctypes.c_uint64 * MAX_CLASSES),
        ("lifetime_ns", ctypes.c_uint64),
        ("mode", ctypes.c_uint32),
        ("naive", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ntiers", ctypes.c_uint32),
        ("everywhere", ctypes.c_uint32),
        ("scoped", ctypes.c_uint32),
        ("tiers", TierC * MAX_TIERS),
    )


class RecordC(ctypes.Structure):
    """Mirror of struct remedy_record (KEEP IN SYNC with bpf/remedy.bpf.c)."""

    _fields_ = (
        ("ts_boot_ns", ctypes.c_uint64),
        ("window_start_ns", ctypes.c_uint64),
        ("window_ns", ctypes.c_uint64),
        ("value", ctypes.c_int64),
        ("cgroup_id", ctypes.c_uint64),
        ("key", ctypes.c_uint64),
        ("birth_ns", ctypes.c_uint64),
        ("key_birth_ns", ctypes.c_uint64),
        ("signal", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("kstack_id", ctypes.c_int32),
        ("ustack_id", ctypes.c_int32),
        ("rule", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
    )


def to_kernel_threshold(name: str, threshold: int, window_s: float) -> int:
    """A tier's threshold in the kernel's units: percent of a core becomes nanoseconds of CPU
    per window, MiB become bytes; counts stay counts."""
    if name == "cpu":
        return int(threshold / 100 * window_s * 1e9)
    if name in ("rss", "rss_growth"):
        return threshold * MIB
    return threshold


def to_policy_units(name: str, value: int, window_ns: int) -> int:
    """The inverse of ``to_kernel_threshold``, for the record's count."""
    if name == "cpu":
        return round(value * 100 / window_ns) if window_ns else 0
    if name in ("rss", "rss_growth"):
        return value // MIB
    return value


def decode(raw: RecordC) -> SensorRecord:
    """Turn the kernel's struct into a SensorRecord."""
    name = BY_ID[raw.signal].name
    return SensorRecord(
        signal=name,
        tgid=raw.tgid,
        pid=raw.pid,
        ppid=raw.ppid,
        comm=raw.comm.decode("utf-8", "replace"),
        cgroup_id=raw.cgroup_id,
        count=to_policy_units(name, raw.value, raw.window_ns),
        window_s=raw.window_ns / 1e9,
        elapsed_s=(raw.ts_boot_ns - raw.window_start_ns) / 1e9,
        ts_boot_ns=raw.ts_boot_ns,
        key=raw.key,
        birth_ns=raw.birth_ns,
        key_birth_ns=raw.key_birth_ns,
        degraded=bool(raw.flags & REC_DEGRADED),
        kstack_id=raw.kstack_id,
        ustack_id=raw.ustack_id,
        rule=raw.rule,
        generation=raw.generation,
    )


@dataclass(frozen=True)
class Sizes:
    """Compile-time sizes of the kernel maps."""

    map_entries: int = 16384
    ringbuf_pages: int = 16
    stack_entries: int = 1024
    birth_entries: int = 65536  # live processes born since start whose birth can be verified
    cgroup_rules: int = MAX_CGROUP_RULES  # (signal, cgroup) entries of cgroup-scoped tiers
    held_entries: int = 4096  # incidents held open at once


class IdentityCounter(enum.IntEnum):
    """Indexes of ``identity_counters``; KEEP IN SYNC with enum identity_counter."""

    BIRTH_INSERT_FAILED = 0
    BIRTH_UNREADABLE = 1


class CgroupKeyCounter(enum.IntEnum):
    """Indexes of ``cgroup_key_counters``; KEEP IN SYNC with enum cgroup_key_counter."""

    ROOT = 0  # events in the keyed hierarchy's root: never counted against a cgroup
    UNREADABLE = 1


def slot_masks(sp: SignalPlan) -> tuple[int, int]:
    """(everywhere, scoped): the kernel's masks of a signal's tiers by slot."""
    everywhere = scoped = 0
    for slot, tier in enumerate(sp.slots):
        if tier.everywhere:
            everywhere |= 1 << slot
        else:
            scoped |= 1 << slot
    return everywhere, scoped


def resolve_cgroup_rules(plan: SensorPlan, paths: dict[int, str]) -> dict[tuple[int, int], int]:
    """(signal id, cgroup key) -> mask of the cgroup-scoped tiers whose globs match that
    cgroup's path (Facts.cgroup style, fnmatchcase), for every cgroup of ``paths`` (key ->
    path in the keyed hierarchy). The root ("/") is never a key."""
    rules: dict[tuple[int, int], int] = {}
    for name, sp in plan.signals.items():
        scoped = [(slot, t.cgroups) for slot, t in enumerate(sp.slots) if not t.everywhere]
        if not scoped:
            continue
        sig = SIGNALS[name].id
        for key, path in paths.items():
            if path == "/":
                continue
            mask = 0
            for slot, globs in scoped:
                if any(fnmatchcase(path, g) for g in globs):
                    mask |= 1 << slot
            if mask:
                rules[(sig, key)] = mask
    return rules


def walk_hierarchy(mount: Path) -> dict[int, str]:
    """Every cgroup of the hierarchy mounted at ``mount``: directory inode -> path ("/a/b";
    "/" for the root), as CgroupIndex (remedy/sensors/context.py) names them."""
    paths: dict[int, str] = {}
    try:
        paths[os.stat(mount).st_ino] = "/"
    except OSError:
        return paths
    stack: list[tuple[str, str]] = [(str(mount), "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = f"{rel}/{entry.name}"
                        paths[entry.inode()] = child  # d_ino is kernfs_ino, as st_ino
                        stack.append((entry.path, child))
        except OSError:
            continue  # removed while we walk: the next rescan sees the tree as it is
    return paths


class CgroupRules:
    """Keeps the kernel's ``cgroup_rules`` map equal to what the plan's cgroup-scoped tiers
    resolve to in the keyed hierarchy, following cgroups as they appear and go. Bounded: rules
    past ``capacity`` (or refused by the map) are counted in ``refused`` and mark the sensor
    ``degraded`` (a scoped tier may then miss a cgroup: an under-count, never a wrong one)."""

    def __init__(
        self,
        mount: Path,
        capacity: int = MAX_CGROUP_RULES,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_s: float = 1.0,
    ) -> None:
        self.mount = mount
        self.capacity = capacity
        self._clock = clock
        self._min_rescan_s = min_rescan_s
        self._last: float | None = None
        self._written: dict[tuple[int, int], int] = {}
        self.refused = 0
        self.degraded = False
        self.scans = 0

    def sync(self, table: Any, plan: SensorPlan, *, force: bool = False) -> None:
        """Rescan (at most once per ``min_rescan_s`` unless ``force``) and apply the diff."""
        now = self._clock()
        if not force and self._last is not None and now - self._last < self._min_rescan_s:
            return
        self._last = now
        if not any(not t.everywhere for sp in plan.signals.values() for t in sp.slots):
            wanted: dict[tuple[int, int], int] = {}
        else:
            self.scans += 1
            wanted = resolve_cgroup_rules(plan, walk_hierarchy(self.mount))
        for key in [k for k in self._written if k not in wanted]:
            with contextlib.suppress(KeyError):
                del table[table.Key(key[0], 0, key[1])]
            del self._written[key]
        refused = 0
        for key, mask in sorted(wanted.items()):
            if self._written.get(key) == mask:
                continue
            if key not in self._written and len(self._written) >= self.capacity:
                refused += 1
                continue
            try:
                table[table.Key(key[0], 0, key[1])] = ctypes.c_uint32(mask)
            except Exception:  # bcc raises bare Exception on a failed update (E2BIG: full)
                refused += 1
                continue
            self._written[key] = mask
        self.refused += refused
        self.degraded = refused > 0

    @property
    def entries(self) -> dict[tuple[int, int], int]:
        """What the map holds now: (signal id, cgroup key) -> tier mask."""
        return dict(self._written)


class KernelSensor:
    """Owns the loaded program. Not thread-safe: poll() belongs to the reader thread, except
    :meth:`birth`, a single map lookup the worker makes while identifying."""

    kind: Literal["kernel", "sampler"] = "kernel"

    def __init__(
        self,
        sizes: Sizes | None = None,
        *,
        naive: bool = False,
        stacks: bool = True,
        offsets: btf.TaskOffsets | None = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        cgroup_keys: str | None = None,
    ):
        self.sizes = sizes or Sizes()
        self.naive = naive
        self.stacks = stacks
        self.sections: tuple[str, ...] = ()
        self.plan: SensorPlan | None = None
        self._offsets = offsets
        # Which hierarchy cgroup signals are keyed by: "cgroup2" or a v1 controller ("pids").
        self.cgroup_keys = cgroup_keys or key_hierarchy(cgroup_root)
        mount = cgroup_root if self.cgroup_keys == "cgroup2" else cgroup_root / self.cgroup_keys
        if self.cgroup_keys == "cgroup2" and not (mount / "cgroup.controllers").is_file():
            mount = cgroup_root / "unified"  # hybrid host without the pids v1 hierarchy
        self.cgroup_rules = CgroupRules(mount, self.sizes.cgroup_rules)
        self._bpf: Any = None
        self._btf: btf.Btf | None = None
        # CLOCK_BOOTTIME once every probe was attached: a process born later has its birth in
        # the births map (or a counted insert failure), one born earlier may not.
        self.started_ns = 0
        self.released: memory.Released | None = None  # what start() gave back after compiling

    def offsets(self) -> btf.TaskOffsets:
        """task_struct offsets of the running kernel (from its BTF, read once)."""
        if self._offsets is None:
            self._offsets = btf.task_offsets(btf=self._kernel_btf())
        return self._offsets

    def _kernel_btf(self) -> btf.Btf:
        """/sys/kernel/btf/vmlinux parsed once (5 MB): task and cgroup offsets share it."""
        if self._btf is None:
            self._btf = btf.Btf.read()
        return self._btf

    def defines(self, sections: tuple[str, ...]) -> dict[str, int]:
        defines = {
            "REMEDY_MAP_ENTRIES": self.sizes.map_entries,
            "REMEDY_RINGBUF_PAGES": self.sizes.ringbuf_pages,
            "REMEDY_STACK_ENTRIES": self.sizes.stack_entries,
            "REMEDY_BIRTH_ENTRIES": self.sizes.birth_entries,
            "REMEDY_CGROUP_RULES": self.sizes.cgroup_rules,
            "REMEDY_HELD_ENTRIES": self.sizes.held_entries,
            "REMEDY_EXIT_HAS_GROUP_DEAD": int(
                bpf.tracepoint_has_field("sched", "sched_process_exit", "group_dead")
            ),
            **self.offsets().defines(),
            **self._cgroup_key_defines(),
        }
        defines.update({f"REMEDY_SECTION_{s.upper()}": 1 for s in sections})
        return defines

    def _cgroup_key_defines(self) -> dict[str, int]:
        if self.cgroup_keys == "cgroup2":
            return {"REMEDY_CGROUP_KEY_V1": 0}
        offsets = btf.cgroup_offsets(self.cgroup_keys, btf=self._kernel_btf())
        return {"REMEDY_CGROUP_KEY_V1": 1, **offsets.defines()}

    def source(self, plan: SensorPlan) -> str:
        """The program as bcc compiles it, with the configuration user space will write
        (``remedy run --print-bpf``)."""
        sections = sections_for(plan.signals)
        text, cflags = bpf.render_source(PROGRAM, self.defines(sections))
        lines = [f"// cflags: {' '.join(cflags)}", "// signal_config entries written at start:"]
        for name, sp in sorted(plan.signals.items()):
            c = self._config(sp, plan.generation)
            windows = ",".join(str(w) for w in c.window_ns)
            lines.append(
                f"//   [{SIGNALS[name].id}] {name}: window_ns=[{windows}] mode={c.mode} "
                f"naive={c.naive} lifetime_ns={c.lifetime_ns} everywhere={c.everywhere:#x} "
                f"scoped={c.scoped}"
            )
            for slot in range(c.ntiers):
                t = c.tiers[slot]
                lines.append(
                    f"//     tier {slot}: rule={t.rule} class={t.cls} threshold={t.threshold} "
                    f"sustain={t.sustain} generation={t.generation} fastpath={t.fastpath}"
                )
        return "\n".join(lines) + "\n" + text

    def start(self, plan: SensorPlan) -> None:
        """Compile the sections the plan's signals need, load, attach, then arm the filter."""
        unknown = {n for n in plan.signals if n not in SIGNALS or not needs_bpf(n)}
        if unknown:
            raise SensorError(f"unknown signal(s): {', '.join(sorted(unknown))}")
        for name in plan.signals:
            for tp in SIGNALS[name].tracepoints:
                bpf.require_tracepoint(*tp.split(":"))
        self.sections = sections_for(plan.signals)
        self._bpf = bpf.load(PROGRAM, self.defines(self.sections))
        # The parsed BTF (~20 MiB of objects) and the compiler's leftovers, given back: the
        # offsets are cached, and nothing recompiles before a restart (docs/memory.md).
        self._btf = None
        if self.stacks:
            # Parse kallsyms now, not while deciding the first offender: the table stays
            # (~10 MiB), the garbage of parsing it is given back with the compiler's.
            self._bpf.ksym(0)
        self.released = memory.release_compiler_memory()
        self.started_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.configure(plan)

    def _table(self, name: str) -> Any:
        if self._bpf is None:
            raise SensorError("kernel sensor is not started")
        return self._bpf[name.encode()]

    def _config(self, sp: SignalPlan, generation: int) -> SignalConfigC:
        name = sp.signal
        if len(sp.classes) > MAX_CLASSES or len(sp.slots) > MAX_TIERS:
            raise SensorError(f"{name}: more window classes or tiers than the kernel holds")
        cfg = SignalConfigC(
            lifetime_ns=int(sp.lifetime_s * 1e9),
            mode=int(SIGNALS[name].mode),
            naive=int(self.naive),
            flags=CFG_STACKS if self.stacks else 0,
            ntiers=len(sp.slots),
        )
        cfg.everywhere, cfg.scoped = slot_masks(sp)
        slot = 0
        for cls in sp.classes:
            cfg.window_ns[cls.index] = int(cls.window_s * 1e9)
            for tier in cls.tiers:
                fp = tier.fastpath
                cfg.tiers[slot] = TierC(
                    threshold=to_kernel_threshold(name, tier.threshold, cls.window_s),
                    rule=tier.rule,
                    generation=generation,
                    sustain=max(1, tier.sustain),
                    cls=cls.index,
                    fastpath=fp.signal if fp and name == "fork_rate" else 0,
                    fp_dry_run=int(fp.dry_run) if fp else 1,
                )
                slot += 1
        return cfg

    def configure(self, plan: SensorPlan) -> None:
        """Write every signal's tiers: a map update, no recompilation. Signals absent from the
        plan are disabled; a signal whose section is not compiled in cannot be enabled."""
        missing = set(sections_for(plan.signals)) - set(self.sections)
        if missing:
            raise SensorError(
                f"section(s) {', '.join(sorted(missing))} not loaded; restart to add signals"
            )
        configs = {name: self._config(sp, plan.generation) for name, sp in plan.signals.items()}
        table = self._table("signal_config")
        self._drop_stale_holds(self.plan, plan)
        self.plan = plan
        # Rules first when tiers gain scopes: a scoped tier never applies before its cgroups do.
        self.cgroup_rules.sync(self._table("cgroup_rules"), plan, force=True)
        for sig in BY_ID.values():  # the BPF program's signals (not the PSI sensor's)
            table[ctypes.c_int(sig.id)] = configs.get(sig.name, SignalConfigC())

    def open_ring_buffer(self, callback: Callable[[SensorRecord], None]) -> None:
        def _on_event(_ctx: Any, data: Any, _size: int) -> None:
            callback(decode(ctypes.cast(data, ctypes.POINTER(RecordC)).contents))

        self._table("events").open_ring_buffer(_on_event)

    def poll(self, timeout_ms: int) -> None:
        if self._bpf is None:
            raise SensorError("kernel sensor is not started")
        self._bpf.ring_buffer_poll(timeout_ms)
        if self.plan is not None:  # follow cgroups as they appear and go (~1 s)
            self.cgroup_rules.sync(self._table("cgroup_rules"), self.plan)

    def counters(self) -> dict[str, SignalCounters]:
        sums = bpf.percpu_sums(self._table("counters"), SIG_MAX * len(Counter))
        n = len(Counter)
        return {
            sig.name: SignalCounters(*sums[sig.id * n : (sig.id + 1) * n]) for sig in BY_ID.values()
        }

    def window_value(
        self, name: str, key: int, birth: int | None = None, cls: int = 0
    ) -> int | None:
        """The current raw value of a key's window of class ``cls`` (tests and diagnostics).
        Without ``birth``, the newest window of any process that held ``key`` (a walk)."""
        table = self._table("windows")
        sig = SIGNALS[name].id
        if birth is not None:
            try:
                return int(table[table.Key(sig, cls, key, birth)].value)
            except KeyError:
                return None
        found = [
            (int(w.start_ns), int(w.value))
            for k, w in table.items()
            if k.signal == sig and k.id == key and k.cls == cls
        ]
        return max(found)[1] if found else None

    def _class_of(self, record: SensorRecord) -> tuple[SignalPlan, int, int] | None:
        """(signal plan, class index, slot) of the record's rule in the running plan; a rule
        this plan lacks (0, or gone in a reload) reads class 0 and holds nothing."""
        sp = self.plan.signals.get(record.signal) if self.plan else None
        if sp is None:
            return None
        found = self.plan.rule(record.rule) if self.plan else None
        if found is None or found[0] != record.signal:
            return sp, sp.classes[0].index, -1
        return sp, found[1].index, sp.slot_of(record.rule)

    def measure(self, record: SensorRecord) -> int | None:
        """The current window of the record's key in its rule's class, in the policy's unit (a
        playbook step's ``until``): 0 when the window has ended with no event since (it went
        quiet), None when the signal is not watched. CPU is the share of a core over the part
        of the window that has passed."""
        where = self._class_of(record)
        if where is None:
            return None
        sp, cls, _ = where
        name = record.signal
        table = self._table("windows")
        try:
            w = table[table.Key(SIGNALS[name].id, cls, record.key, record.key_birth_ns)]
        except KeyError:
            return 0
        window_ns = int(next(c.window_s for c in sp.classes if c.index == cls) * 1e9)
        elapsed = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - int(w.start_ns)
        if elapsed >= window_ns:
            return 0
        if name == "cpu":
            return to_policy_units(name, int(w.value), max(elapsed, 1))
        return to_policy_units(name, int(w.value), window_ns)

    def _drop_stale_holds(self, old: SensorPlan | None, new: SensorPlan) -> None:
        """A held mask names tiers by slot. When a reload moves a signal's tiers to other
        slots, its masks would hold the wrong tiers (a new tier never emitted for an open
        incident), so they are dropped: the key emits again (noisier, never blind) and the
        engine holds it afresh."""
        if old is None:
            return
        stale = {
            SIGNALS[name].id
            for name, sp in old.signals.items()
            if name not in new.signals
            or [t.rule for t in sp.slots] != [t.rule for t in new.signals[name].slots]
        }
        if not stale:
            return
        table = self._table("held")
        for key in [k for k, _ in table.items() if int(k.signal) in stale]:
            with contextlib.suppress(KeyError):
                del table[key]

    def _held_key(self, record: SensorRecord, cls: int) -> Any:
        table = self._table("held")
        return table, table.Key(SIGNALS[record.signal].id, cls, record.key, record.key_birth_ns)

    def hold(self, record: SensorRecord) -> None:
        """An incident is open for the record's (signal, class, key, key birth): its tier is
        not re-emitted in later windows. Only its own tier: holding a lower tier of another
        policy (one whose `for` was not met yet, say) would keep that policy from ever seeing
        the key, so going faster would evade it. Raises SensorError when the held map is full
        (the key then emits every window, as before: noisier, never blind)."""
        where = self._class_of(record)
        if where is None or where[2] < 0:
            return
        _, cls, slot = where
        table, key = self._held_key(record, cls)
        mask = 1 << slot
        with contextlib.suppress(KeyError):
            mask |= int(table[key].value)
        try:
            table[key] = ctypes.c_uint32(mask)
        except Exception as err:  # bcc raises bare Exception on a failed update (E2BIG)
            raise SensorError(f"cannot hold the incident of key {record.key}: {err}") from err

    def unhold(self, record: SensorRecord) -> None:
        """The incident ended: from the next window on, its tier emits again for the key
        (another policy's hold of the same key stays)."""
        where = self._class_of(record)
        if where is None:
            return
        _, cls, slot = where
        table, key = self._held_key(record, cls)
        with contextlib.suppress(KeyError):
            mask = int(table[key].value) & ~(1 << slot) if slot >= 0 else 0
            if mask:
                table[key] = ctypes.c_uint32(mask)
            else:
                del table[key]

    def held(self) -> int:
        """How many incidents are held now (diagnostics)."""
        return len(self._table("held").items())

    def birth(self, tgid: int) -> int | None:
        """The birth (CLOCK_BOOTTIME ns) the kernel recorded when ``tgid``'s current holder was
        forked, or None when it was born before :attr:`started_ns` or the map was full."""
        try:
            return int(self._table("births")[ctypes.c_uint32(tgid)].birth_ns)
        except KeyError:
            return None

    def identity_counters(self) -> dict[str, int]:
        """Summed per-CPU identity counters by name (birth_insert_failed, birth_unreadable)."""
        sums = bpf.percpu_sums(self._table("identity_counters"), len(IdentityCounter))
        return {c.name.lower(): sums[c] for c in IdentityCounter}

    def cgroup_key_counters(self) -> dict[str, int]:
        """Summed per-CPU cgroup key counters by name (root, unreadable): events of cgroup
        signals that were counted against no cgroup."""
        sums = bpf.percpu_sums(self._table("cgroup_key_counters"), len(CgroupKeyCounter))
        return {c.name.lower(): sums[c] for c in CgroupKeyCounter}

    def lineage(self, tgid: int) -> tuple[int, str] | None:
        """(parent tgid, comm) the kernel remembers for ``tgid``: exited processes included."""
        try:
            entry = self._table("lineage")[ctypes.c_uint32(tgid)]
        except KeyError:
            return None
        return int(entry.ppid), bytes(entry.comm).split(b"\0", 1)[0].decode("utf-8", "replace")

    def stack(self, stack_id: int, *, user_pid: int | None = None) -> list[str]:
        """Symbolized frames of a captured stack ("[unknown]" where no symbols exist).

        Read once: the id is then deleted from the stack map, and bcc's symbol cache for
        ``user_pid`` freed. Neither is ever pruned otherwise: the map fills, and then
        bpf_get_stackid fails (-EEXIST on a hash collision, without BPF_F_REUSE_STACKID) for
        every new stack; bcc keeps one symbol cache per pid, for every offender, forever."""
        if stack_id < 0 or self._bpf is None:
            return []
        stacks = self._table("stacks")
        try:
            frames = list(stacks.walk(stack_id))
        except KeyError:
            return []
        with contextlib.suppress(KeyError):  # a record with the same stack deleted it first
            del stacks[stacks.Key(stack_id)]
        if user_pid is None:
            return [self._bpf.ksym(addr).decode("utf-8", "replace") for addr in frames]
        if not _user_symbols_safe():
            return [f"0x{addr:x}" for addr in frames]
        try:
            return [self._bpf.sym(addr, user_pid).decode("utf-8", "replace") for addr in frames]
        finally:
            _drop_symbol_cache(self._bpf, user_pid)

    def table(self, name: str) -> Any:
        """A map of the loaded program by name (for companions such as ``FastPath``)."""
        return self._table(name)

    def layout_types(self) -> tuple[Any, Any]:
        """bcc's own ctypes types for the config and record structs, to check our mirrors."""
        return (self._table("signal_config").Leaf, self._table("record_layout").Leaf)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


@functools.cache
def _user_symbols_safe() -> bool:
    """Whether bcc may build a process's symbol cache. libbcc before 0.33.0 leaves
    ``ModulePath::fd_`` uninitialised for the global /tmp/perf-PID.map of a process whose root
    link cannot be read (one exiting: a zombie) and its destructor closes that junk number
    (bcc #5193): some descriptor of the agent's, an offender's pidfd included, whose number is
    then reused by the next open. User frames stay addresses there."""
    try:
        from bcc.version import __version__  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(__version__))[:2])
    return numbers >= (0, 33)


def _drop_symbol_cache(loaded: Any, pid: int) -> None:
    """Free bcc's symbol cache for ``pid``: ``BPF.sym`` keeps one per pid in a class-wide dict
    (``BPF._sym_caches``, bcc/__init__.py) with native memory that nothing frees."""
    caches = getattr(type(loaded), "_sym_caches", None)
    cache = caches.pop(pid, None) if isinstance(caches, dict) else None
    if cache is None or getattr(cache, "cache", None) is None:
        return
    from bcc.libbcc import lib  # noqa: PLC0415 - optional dependency, kernel tier only

    lib.bcc_free_symcache(cache.cache, pid)
