// SPDX-License-Identifier: Apache-2.0
// remedy's kernel filter: every signal of the catalogue is counted here, per key, in windows;
// exactly one record per (key, window, tier) leaves the kernel when the key crosses a tier's
// threshold (issue 12: several tiers per signal, each a policy, in up to four window classes;
// tiers may be scoped to cgroups; an open incident is held so it stops emitting every window).
//
// Layout: first what all signals share (config, windows, counters, ring buffer, the accounting
// logic); then one section of tracepoint handlers per group of signals, each compiled in only
// when a policy uses one of its signals (-DREMEDY_SECTION_<NAME>=1), because attaching
// syscalls:* tracepoints slows every syscall on the host. (The handlers cannot live in included
// headers: bcc generates tracepoint argument structs only for the main file.)
//
// KEEP IN SYNC: enum remedy_signal with remedy/sensors/catalog.py (CATALOGUE ids);
// struct signal_config, struct tier_config, struct remedy_record with SignalConfigC, TierC,
// RecordC in
// remedy/sensors/kernel.py; enum remedy_counter with Counter there. The kernel tests compare
// sizes and offsets of the structs through bcc's own view of this file.
//
// Thresholds and windows live in signal_config, written by user space at run time: changing a
// policy never recompiles or reattaches. Map sizes are compile-time defines.

#include <linux/sched.h>

#ifndef REMEDY_MAP_ENTRIES
#define REMEDY_MAP_ENTRIES 16384
#endif
#ifndef REMEDY_RINGBUF_PAGES
#define REMEDY_RINGBUF_PAGES 16
#endif
#ifndef REMEDY_STACK_ENTRIES
#define REMEDY_STACK_ENTRIES 1024
#endif
#ifndef REMEDY_BIRTH_ENTRIES
#define REMEDY_BIRTH_ENTRIES 65536
#endif

// ===== Identity (issue 10). A pid is a number the kernel hands out again; a process is
// (tgid, birth), where birth is task->group_leader->start_boottime: the nanosecond value that
// /proc/PID/stat reports truncated to clock ticks. Every per-process key, record and fast-path
// arm carries it, so nothing counted for one process is ever charged to the next holder of its
// pid. The offsets come from the running kernel's BTF (remedy/sensors/btf.py), not from the
// installed headers, which may be another kernel's.
#if !defined(TASK_OFF_PID) || !defined(TASK_OFF_TGID) || !defined(TASK_OFF_START_BOOTTIME) || \
    !defined(TASK_OFF_GROUP_LEADER) || !defined(TASK_OFF_REAL_PARENT)
#error "task_struct offsets (TASK_OFF_*) must be given by user space (remedy/sensors/btf.py)"
#endif

static __always_inline u64 task_ptr(u64 task, u32 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(task + off));
    return v;
}

static __always_inline u32 task_u32(u64 task, u32 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(task + off));
    return v;
}

// The birth of the process `task` (any of its threads) belongs to; 0 when unreadable.
static __always_inline u64 birth_of(u64 task)
{
    if (!task)
        return 0;
    u64 leader = task_ptr(task, TASK_OFF_GROUP_LEADER);
    return leader ? task_ptr(leader, TASK_OFF_START_BOOTTIME) : 0;
}

static __always_inline u64 current_birth(void)
{
    return birth_of(bpf_get_current_task());
}

// The parent process of the current task, as the kernel knows it now (real_parent: the
// reaper once the parent died, never a stale number).
static __always_inline u32 current_parent(u64 *birth)
{
    u64 parent = task_ptr(bpf_get_current_task(), TASK_OFF_REAL_PARENT);
    *birth = birth_of(parent);
    return parent ? task_u32(parent, TASK_OFF_TGID) : 0;
}

// ===== Cgroup keys (issue 10, item 9). A cgroup signal counts per cgroup of the hierarchy
// remedy acts on, named by the inode of that cgroup's directory (its kernfs node id), which
// user space resolves in the same hierarchy (remedy/sensors/context.py CgroupIndex):
//   - REMEDY_CGROUP_KEY_V1: the task's css in one v1 controller's hierarchy (pids, whose limit
//     stops a fork storm): task->cgroups->subsys[REMEDY_CGROUP_SUBSYS_ID]->cgroup->kn->id, with
//     offsets from BTF. On hybrid hosts cgroup2 has no controllers and every process sits in its
//     root, so bpf_get_current_cgroup_id() would count the whole host as one cgroup;
//   - otherwise (cgroup2 hosts): bpf_get_current_cgroup_id().
// The hierarchy's root is never a key: it is every process not placed anywhere, not one
// workload, and no cgroup action may act on it. Its events are counted here and not windowed.
#ifndef REMEDY_CGROUP_KEY_V1
#define REMEDY_CGROUP_KEY_V1 0
#endif
#if REMEDY_CGROUP_KEY_V1 && (!defined(REMEDY_CGROUP_SUBSYS_ID) || !defined(TASK_OFF_CGROUPS) || \
    !defined(CSS_SET_OFF_SUBSYS) || !defined(CSS_OFF_CGROUP) || !defined(CSS_OFF_PARENT) ||      \
    !defined(CGROUP_OFF_KN) || !defined(KERNFS_NODE_OFF_ID))
#error "v1 cgroup keys need the css offsets from BTF (remedy/sensors/btf.py cgroup_offsets)"
#endif

// KEEP IN SYNC with CgroupKeyCounter in remedy/sensors/kernel.py.
enum cgroup_key_counter {
    CK_ROOT = 0,        // an event in the hierarchy's root: not counted against any cgroup
    CK_UNREADABLE,      // the task's cgroup could not be read: not counted
    CK_MAX,
};
BPF_PERCPU_ARRAY(cgroup_key_counters, u64, CK_MAX);

static __always_inline void ck_bump(u32 idx)
{
    u64 *v = cgroup_key_counters.lookup(&idx);
    if (v)
        (*v)++;
}

// The key of the current task's cgroup; 0 (do not count) for the hierarchy's root and for what
// cannot be read. `count`: bump the cgroup key counters (cgroup signals only: a process signal
// asking for its cgroup rules is not an event counted against no cgroup).
static __always_inline u64 cgroup_key_of_current(int count)
{
#if REMEDY_CGROUP_KEY_V1
    u64 cset = task_ptr(bpf_get_current_task(), TASK_OFF_CGROUPS);
    u64 css = cset ? task_ptr(cset, CSS_SET_OFF_SUBSYS + 8 * REMEDY_CGROUP_SUBSYS_ID) : 0;
    if (!css) {
        if (count)
            ck_bump(CK_UNREADABLE);
        return 0;
    }
    if (!task_ptr(css, CSS_OFF_PARENT)) {  // only a hierarchy's root css has no parent
        if (count)
            ck_bump(CK_ROOT);
        return 0;
    }
    u64 cgrp = task_ptr(css, CSS_OFF_CGROUP);
    u64 kn = cgrp ? task_ptr(cgrp, CGROUP_OFF_KN) : 0;
    u64 id = kn ? task_ptr(kn, KERNFS_NODE_OFF_ID) : 0;
    if (!id && count)
        ck_bump(CK_UNREADABLE);
    return id;
#else
    u64 id = bpf_get_current_cgroup_id();
    if (id == bpf_get_current_ancestor_cgroup_id(0)) {  // ancestor level 0: the root
        if (count)
            ck_bump(CK_ROOT);
        return 0;
    }
    return id;
#endif
}

// The key of the current task's cgroup for cgroup signals (counted when it is none).
static __always_inline u64 current_cgroup_key(void)
{
    return cgroup_key_of_current(1);
}

enum remedy_signal {
    SIG_FORK = 0,
    SIG_FORK_CGROUP = 1,
    SIG_EXEC = 2,
    SIG_EXEC_CGROUP = 3,
    SIG_CHURN = 4,
    SIG_CPU = 5,
    SIG_RSS = 6,
    SIG_OPEN = 7,
    SIG_FD = 8,
    SIG_CONNECT = 9,
    SIG_RSS_GROWTH = 10,
    SIG_MAX = 11,
};

enum remedy_mode {
    MODE_COUNT = 0,   // events add signed deltas; cross when the window's sum reaches threshold
    MODE_LEVEL = 1,   // events report a level; cross when a level is at or above threshold
    MODE_GROWTH = 2,  // events report a level; the value is the level minus the window's first
};

enum remedy_counter {
    C_EVENTS_SEEN = 0,
    C_RECORDS_EMITTED,
    C_RINGBUF_FAILED,
    C_WINDOWS_OPENED,
    C_KEY_INIT_FAILED,
    C_MAX,
};

// Issue 12: per signal up to MAX_TIERS tiers (one policy each) in up to MAX_CLASSES window
// classes (tiers of one window length share one window). KEEP IN SYNC with
// remedy/compiler/plan.py MAX_TIERS, MAX_CLASSES. A tier's bit in the masks below is its slot.
#define MAX_TIERS 8
#define MAX_CLASSES 4
#define TIER_MASK ((1u << MAX_TIERS) - 1)

#define CFG_STACKS 1       // capture kernel and user stack ids with each record
#define W_LOST 1           // a record of this window was lost: flagged degraded on the retry
#define REC_DEGRADED 1     // a record of this window was lost before this one got through

struct tier_config {
    s64 threshold;   // in kernel units: events, nanoseconds of CPU, bytes
    u32 rule;        // the compiler's rule id (>= 1), copied into records
    u32 generation;  // the plan generation this tier was written with, copied into records
    u32 sustain;     // consecutive crossing windows before a record is emitted (>= 1)
    u32 cls;         // window class index
    u32 fastpath;    // fork_rate: Unix signal the kernel sends the forker at or over it; 0 none
    u32 fp_dry_run;  // 1: the fast path only counts
};

struct signal_config {
    u64 window_ns[MAX_CLASSES];  // 0: class unused; every class 0: signal disabled
    u64 lifetime_ns;  // churn: a child that exits sooner than this is short-lived
    u32 mode;         // enum remedy_mode
    u32 naive;        // 1: every event crosses to user space (benchmark baseline)
    u32 flags;        // CFG_*
    u32 ntiers;       // 0: signal disabled
    u32 everywhere;   // mask of tiers that apply to every event
    u32 scoped;       // mask of tiers that apply only where cgroup_rules says so
    struct tier_config tiers[MAX_TIERS];
};

struct window_key {
    u32 signal;
    u32 cls;         // window class (issue 12)
    u64 id;          // tgid, parent tgid or cgroup key (current_cgroup_key), per the catalogue
    u64 birth;       // the birth of the process `id` names; 0 for cgroup keys
};

struct window {
    u64 start_ns;
    s64 value;
    s64 base;        // MODE_GROWTH: the level at the window's start
    u64 emitted;     // atomic: tiers whose record left (or that an open incident holds);
                     // u64 because BPF's 32-bit atomics need -mcpu=v3, which bcc does not pass
    u64 crossed;     // atomic: tiers at or over their threshold in this window (for streaks)
    u32 flags;       // W_*
    u32 _pad;
    u8 streak[MAX_TIERS];  // per tier: consecutive crossing windows before this one
};

struct remedy_record {
    u64 ts_boot_ns;
    u64 window_start_ns;
    u64 window_ns;
    s64 value;       // the window's value at the crossing, kernel units
    u64 cgroup_id;
    u64 key;
    u64 birth_ns;    // birth of `tgid`'s process (0: unreadable)
    u64 key_birth_ns; // birth of the process `key` names (parent-keyed: the parent's); 0 for cgroups
    u32 signal;
    u32 tgid;        // the task whose event crossed (for parent-keyed signals: the child)
    u32 pid;
    u32 ppid;        // its parent now (real_parent)
    u32 flags;       // REC_*
    s32 kstack_id;
    s32 ustack_id;
    u32 rule;        // the tier that crossed (issue 12)
    u32 generation;  // that tier's plan generation
    u32 _pad;
    char comm[TASK_COMM_LEN];
};

// What the kernel remembers of each process it saw fork, so that short-lived children still
// name their parent after they are gone from /proc.
struct lineage {
    u32 ppid;
    u32 _pad;
    u64 born_ns;
    char comm[TASK_COMM_LEN];
};

// (signal, cgroup key) -> mask of the signal's cgroup-scoped tiers that apply in that cgroup.
// User space resolves the tiers' globs against the keyed hierarchy and follows cgroups as they
// appear and go (remedy/sensors/kernel.py CgroupRules). No entry: only `everywhere` tiers.
struct cgroup_rule_key {
    u32 signal;
    u32 _pad;
    u64 cgroup;      // current_cgroup_key()
};

#ifndef REMEDY_CGROUP_RULES
#define REMEDY_CGROUP_RULES 4096
#endif
#ifndef REMEDY_HELD_ENTRIES
#define REMEDY_HELD_ENTRIES 4096
#endif

BPF_ARRAY(signal_config, struct signal_config, SIG_MAX);
// LRU maps: when full, the least recently used window (or lineage entry) is evicted to make room,
// which can only lose a count, never invent one; a failed insert is counted (C_KEY_INIT_FAILED)
// and user space marks that signal's windows degraded.
BPF_TABLE("lru_hash", struct window_key, struct window, windows, REMEDY_MAP_ENTRIES);
BPF_TABLE("lru_hash", u32, struct lineage, lineage, REMEDY_MAP_ENTRIES);
BPF_HASH(cgroup_rules, struct cgroup_rule_key, u32, REMEDY_CGROUP_RULES);
// Held incidents (issue 12, contract hold/unhold): window key -> tiers the open incident already
// emitted. A window that opens for a held key starts with them claimed, so the incident emits
// once per tier, not once per window. Not LRU: user space deletes entries when incidents end.
BPF_HASH(held, struct window_key, u32, REMEDY_HELD_ENTRIES);
// tgid -> birth of every process forked since the program was attached; deleted when the process
// dies. Not LRU: an entry that vanished while its process lives would let a stranger pass as it.
// User space compares the birth of the process its pidfd pins with this, at full resolution.
// It also keeps the parent that forked it (real_parent then, with its birth): once that parent
// dies the kernel reparents the child to a reaper (init, a subreaper such as systemd --user or a
// container's init) which spawned nothing, so parent-keyed signals must not charge it.
struct birth {
    u64 birth_ns;
    u64 parent_birth_ns;
    u32 parent;
    u32 _pad;
};
BPF_HASH(births, u32, struct birth, REMEDY_BIRTH_ENTRIES);

// The parent that forked the current process, if the kernel still names it as the parent:
// 0 once the current process was reparented (orphaned), or when its parent is unknown.
// Processes born before the program was attached have no entry: their parent now is used.
static __always_inline u32 current_spawner(u64 *birth)
{
    u32 parent = current_parent(birth);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct birth *b = births.lookup(&tgid);
    if (b && b->birth_ns == current_birth() &&
        (b->parent != parent || b->parent_birth_ns != *birth))
        return 0;  // orphaned: its reaper is not its spawner
    return parent;
}

enum identity_counter {
    ID_BIRTH_INSERT_FAILED = 0,  // births full: that process cannot be verified (refused)
    ID_BIRTH_UNREADABLE,         // a birth read as 0: its records cannot be bound (refused)
    ID_MAX,
};
BPF_PERCPU_ARRAY(identity_counters, u64, ID_MAX);
BPF_PERCPU_ARRAY(counters, u64, SIG_MAX * C_MAX);
BPF_RINGBUF_OUTPUT(events, REMEDY_RINGBUF_PAGES);
BPF_STACK_TRACE(stacks, REMEDY_STACK_ENTRIES);
// Never written: lets user space read the record's layout as bcc sees it.
BPF_ARRAY(record_layout, struct remedy_record, 1);

static __always_inline void bump(u32 sig, u32 counter)
{
    u32 idx = sig * C_MAX + counter;
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void id_bump(u32 idx)
{
    u64 *v = identity_counters.lookup(&idx);
    if (v)
        (*v)++;
}


static __always_inline int emit(void *ctx, u32 sig, struct signal_config *cfg,
                                struct tier_config *t, u64 id, u64 key_birth, u64 now,
                                u64 window_ns, u64 start, s64 value, u32 flags)
{
    struct remedy_record *rec = events.ringbuf_reserve(sizeof(struct remedy_record));
    if (!rec) {
        bump(sig, C_RINGBUF_FAILED);
        return 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    rec->ts_boot_ns = now;
    rec->window_start_ns = start;
    rec->window_ns = window_ns;
    rec->value = value;
    rec->cgroup_id = bpf_get_current_cgroup_id();
    rec->key = id;
    rec->birth_ns = current_birth();
    rec->key_birth_ns = key_birth;
    rec->signal = sig;
    rec->tgid = tgid;
    rec->pid = (u32)pid_tgid;
    u64 parent_birth = 0;
    rec->ppid = current_parent(&parent_birth);
    rec->flags = flags;
    rec->kstack_id = -1;
    rec->ustack_id = -1;
    rec->rule = t ? t->rule : 0;
    rec->generation = t ? t->generation : 0;
    rec->_pad = 0;
    // Stacks only for records that really cross: a stack walk per event would cost more than
    // everything else here together.
    if ((cfg->flags & CFG_STACKS) && !cfg->naive) {
        rec->kstack_id = stacks.get_stackid(ctx, 0);
        rec->ustack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    }
    bpf_get_current_comm(&rec->comm, sizeof(rec->comm));
    events.ringbuf_submit(rec, 0);
    bump(sig, C_RECORDS_EMITTED);
    return 1;
}

// The tiers of `sig` that apply to the current event: the `everywhere` ones, and the scoped
// ones the cgroup rule map grants the key's cgroup. Only signals with scoped tiers pay the
// lookup. `cgroup` is the event's cgroup key when the caller has it (cgroup signals), else 0.
static __always_inline u32 applicable(u32 sig, struct signal_config *cfg, u64 cgroup)
{
    u32 mask = cfg->everywhere;
    if (!cfg->scoped)
        return mask;
    if (!cgroup)
        cgroup = cgroup_key_of_current(0);
    if (!cgroup)
        return mask;  // the hierarchy's root matches no glob
    struct cgroup_rule_key rk = {.signal = sig, ._pad = 0, .cgroup = cgroup};
    u32 *granted = cgroup_rules.lookup(&rk);
    return granted ? mask | (*granted & cfg->scoped) : mask;
}

// One window class of one signal: count the event, then give each applicable tier of the class
// that is at or over its threshold (and sustained) its one record of this window. Returns the
// mask of those tiers (the fast path signals on them).
// One event, as account_class sees it (a BPF subprogram takes at most five arguments).
struct acct {
    struct signal_config *cfg;
    u64 id;
    u64 birth;
    s64 delta;
    u64 now;
    u32 sig;
    u32 mask;
    u32 fp;  // fast path of the highest tier at or over: Unix signal | FP_DRY_BIT
    u32 _pad;
};
#define FP_DRY_BIT (1u << 16)

// Inlined in a loop the compiler must not unroll: one copy per class and tier would not fit the
// kernel's per-program instruction limit (4096 here), so the verifier walks bounded loops.
static __always_inline u32 account_class(void *ctx, struct acct *a, u32 c)
{
    struct signal_config *cfg = a->cfg;
    u32 sig = a->sig, mask = a->mask;
    u64 id = a->id, birth = a->birth, now = a->now;
    s64 delta = a->delta;
    if (c >= MAX_CLASSES)
        return 0;
    u64 window_ns = cfg->window_ns[c];
    if (window_ns == 0)
        return 0;
    struct window_key k = {.signal = sig, .cls = c, .id = id, .birth = birth};
    if (!mask) {
        // No scoped tier applies where the event happened, but a held incident is followed
        // wherever it went: remedy's own moves (a throttle, a quarantine) take an offender out
        // of its tier's cgroups, and the engine still re-measures it. Its held tiers stay
        // claimed, so this counts without ever emitting what the scope would not have.
        u32 *followed = held.lookup(&k);
        if (!followed)
            return 0;
        mask = *followed;
    }
    struct window *w = windows.lookup(&k);
    if (!w) {
        u32 *h = held.lookup(&k);
        struct window fresh = {.start_ns = now, .base = delta, .emitted = h ? *h : 0};
        if (windows.update(&k, &fresh) != 0) {
            bump(sig, C_KEY_INIT_FAILED);
            return 0;
        }
        bump(sig, C_WINDOWS_OPENED);
        w = windows.lookup(&k);
        if (!w) {
            bump(sig, C_KEY_INIT_FAILED);
            return 0;
        }
    } else if (now - w->start_ns >= window_ns) {
        // Roll over. A tier that crossed in a window followed at once by this one extends the
        // streak its `sustain` counts. Two CPUs rolling the same window at once can lose a few
        // events at the boundary: an under-count, never a false record.
        u32 contiguous = now - w->start_ns < 2 * window_ns;
        u64 crossed = w->crossed;
#pragma clang loop unroll(disable)
        for (int i = 0; i < MAX_TIERS; i++) {
            u8 s = w->streak[i];
            w->streak[i] = ((crossed >> i) & 1) && contiguous ? (s < 255 ? s + 1 : s) : 0;
        }
        u32 *h = held.lookup(&k);
        w->start_ns = now;
        w->value = 0;
        w->base = delta;
        w->crossed = 0;
        w->emitted = h ? *h : 0;  // a held incident's tiers stay claimed
        w->flags = 0;
        bump(sig, C_WINDOWS_OPENED);
    }

    s64 cur = delta;
    if (cfg->mode == MODE_LEVEL) {
        // A level, not a sum. Teardown at exit does not cross: exit_mm() clears current->mm
        // before the counters fall, so those events have curr == 0 and are filtered out.
        w->value = delta;
    } else if (cfg->mode == MODE_GROWTH) {
        cur = delta - w->base;
        w->value = cur;
    } else {
        // Atomic: concurrent events of one key on several CPUs see distinct old values.
        cur = __sync_fetch_and_add(&w->value, delta) + delta;
    }

    // At most one record per event and class: the first unclaimed tier it crosses (a level
    // that jumps over two tiers gives the higher one its record at the next event). One emit
    // outside the loop keeps the verifier's walk of the loop small.
    u32 over = 0;
    int pick = -1;
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_TIERS; i++) {
        u64 bit = 1ull << i;
        if (i >= cfg->ntiers)
            break;
        struct tier_config *t = &cfg->tiers[i];
        if (!(mask & bit) || t->cls != c || cur < t->threshold)
            continue;
        if (!(w->crossed & bit))
            __sync_fetch_and_or(&w->crossed, bit);
        if ((u32)w->streak[i] + 1 < t->sustain)
            continue;
        over |= bit;
        if (t->fastpath)  // the highest such tier decides (ascending within a class)
            a->fp = t->fastpath | (t->fp_dry_run ? FP_DRY_BIT : 0);
        if (pick >= 0 || (w->emitted & bit))
            continue;  // this tier's record of this window already left (or is held)
        if (__sync_fetch_and_or(&w->emitted, bit) & bit)
            continue;  // another CPU claimed it: exactly one record per (key, window, tier)
        pick = i;
    }
    if (pick < 0 || pick >= MAX_TIERS)
        return over;
    u32 lost = w->flags & W_LOST;
    if (emit(ctx, sig, cfg, &cfg->tiers[pick], id, birth, now, window_ns, w->start_ns, cur,
             lost ? REC_DEGRADED : 0)) {
        w->flags &= ~W_LOST;
    } else {
        // The ring buffer was full. Let the next event of this window try again; its record
        // says the window is degraded, so user space never escalates to a kill on it.
        w->flags |= W_LOST;
        __sync_fetch_and_and(&w->emitted, ~(1ull << pick));
    }
    return over;
}

// Count one event of `sig` for key `id` in every window class of the signal. Everything a
// signal needs beyond its tracepoint handler is here, so every signal gets the same window,
// tier, sustain, exactly-once and loss rules. `birth` is the birth of the process `id` names
// (0 for cgroup keys): a reused pid starts from an empty window instead of inheriting its
// predecessor's count. `cgroup` is the event's cgroup key when known (cgroup signals), else 0.
// Returns the tiers at or over their threshold for this event (the fast path's trigger).
static __always_inline u32 account_in(void *ctx, u32 sig, u64 id, u64 birth, s64 delta,
                                      u64 cgroup)
{
    struct signal_config *cfg = signal_config.lookup(&sig);
    if (!cfg || cfg->ntiers == 0)
        return 0;
    bump(sig, C_EVENTS_SEEN);
    u64 now = bpf_ktime_get_boot_ns();  // boot time, like /proc start times
    if (cfg->naive) {
        emit(ctx, sig, cfg, 0, id, birth, now, cfg->window_ns[0], now, delta, 0);
        return 0;
    }
    u32 mask = applicable(sig, cfg, cgroup);
    if (!mask && !cfg->scoped)
        return 0;  // no tier applies here: nothing to window (scoped: see account_class)
    struct acct a = {.cfg = cfg, .id = id, .birth = birth, .delta = delta, .now = now,
                     .sig = sig, .mask = mask, .fp = 0, ._pad = 0};
#pragma clang loop unroll(disable)
    for (u32 c = 0; c < MAX_CLASSES; c++)
        account_class(ctx, &a, c);
    return a.fp;
}

static __always_inline u32 account(void *ctx, u32 sig, u64 id, u64 birth, s64 delta)
{
    return account_in(ctx, sig, id, birth, delta, 0);
}

// Count one event of a cgroup signal against the current task's cgroup (never the root).
static __always_inline void account_cgroup(void *ctx, u32 sig)
{
    struct signal_config *cfg = signal_config.lookup(&sig);
    if (!cfg || cfg->ntiers == 0)
        return;  // not watched: no pointer chase, and no root events counted
    u64 key = current_cgroup_key();
    if (key)
        account_in(ctx, sig, key, 0, 1, key);
}

#if REMEDY_SECTION_SCHED
// ===== Fast path (issues 5, 12): the kernel itself signals a forking offender, with no
// user-space round trip. Two triggers, both checked only in sched_process_fork below:
//   - armed: user space marks a process (fastpath_armed, keyed by tgid, holding its birth); its
//     next fork is signalled. A different birth is a reused pid: never signalled. Arms are
//     deleted when the process dies and when user space releases the offender (a playbook's
//     `kernel: true` step);
//   - policy: a fork_rate tier with `fastpath` (a policy's `kernel:`): every fork at or over
//     that tier (its threshold, sustain and cgroup mask, exactly as its records) is signalled,
//     with the tier's own dry run.
// bpf_send_signal() signals the current task's whole process (the forker). Protected tgids
// (fastpath_protected: the agent, its ancestors, pid 1) are never signalled; dry_run only counts.
// KEEP IN SYNC: struct fastpath_arm and enum fastpath_counter with ArmC and FastPathCounter in
// remedy/sensors/fastpath.py.

enum fastpath_counter {
    FP_ARMED_HITS = 0,      // forks of an armed process (dry run included)
    FP_THRESHOLD_HITS,      // forks at or over a fast-path tier
    FP_SIGNALS_SENT,        // bpf_send_signal() returned 0
    FP_SEND_FAILED,         // bpf_send_signal() failed
    FP_DRY_RUN,             // would have signalled
    FP_PROTECTED,           // a protected tgid was spared
    FP_STALE,               // an armed tgid held by another process (a reused pid)
    FP_DISARMED_AT_EXIT,    // arms removed because their process died
    FP_MAX,
};

struct fastpath_arm {
    u32 signal;
    u32 dry_run;
    u64 birth_ns;      // the armed process's birth: the tgid alone is not an identity
    u64 hits;          // atomic
};

BPF_HASH(fastpath_armed, u32, struct fastpath_arm, 1024);
BPF_HASH(fastpath_protected, u32, u8, 1024);
BPF_PERCPU_ARRAY(fastpath_counters, u64, FP_MAX);

static __always_inline void fp_bump(u32 idx)
{
    u64 *v = fastpath_counters.lookup(&idx);
    if (v)
        (*v)++;
}

// Signal the current process unless protected or dry run; count what happened.
static __always_inline void fp_fire(u32 tgid, u32 sig, u32 dry_run)
{
    if (fastpath_protected.lookup(&tgid)) {
        fp_bump(FP_PROTECTED);
        return;
    }
    if (dry_run) {
        fp_bump(FP_DRY_RUN);
        return;
    }
    fp_bump(bpf_send_signal(sig) == 0 ? FP_SIGNALS_SENT : FP_SEND_FAILED);
}

static __always_inline void fastpath_armed_check(u32 tgid, u64 birth)
{
    struct fastpath_arm *a = fastpath_armed.lookup(&tgid);
    if (!a)
        return;
    if (birth == 0 || a->birth_ns != birth) {
        fp_bump(FP_STALE);
        return;
    }
    __sync_fetch_and_add(&a->hits, 1);
    fp_bump(FP_ARMED_HITS);
    fp_fire(tgid, a->signal, a->dry_run);
}

// `fp`: account's answer for this fork: the fast path (Unix signal | FP_DRY_BIT) of the
// highest fork_rate tier it is at or over, with that tier's cgroup scope and sustain; 0 none.
// One signal per fork.
static __always_inline void fastpath_tier_check(u32 tgid, u32 fp)
{
    u32 unix_sig = fp & 0xff;
    if (!unix_sig)
        return;
    fp_bump(FP_THRESHOLD_HITS);
    fp_fire(tgid, unix_sig, (fp & FP_DRY_BIT) != 0);
}
#endif  // REMEDY_SECTION_SCHED (fast path)

// ===== Births: always compiled, whatever signals run, because every record is bound to a
// process by its birth. The raw tracepoint hands us the child's task_struct, whose
// start_boottime copy_process() has just set.
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
#if REMEDY_SECTION_SCHED
    account_cgroup(ctx, SIG_FORK_CGROUP);  // the forker's context, like the tracepoint's
#endif
    u64 child = ctx->args[1];
    u32 pid = task_u32(child, TASK_OFF_PID);
    u32 tgid = task_u32(child, TASK_OFF_TGID);
    if (pid != tgid)
        return 0;  // a new thread: its process already has a birth
    struct birth b = {.birth_ns = task_ptr(child, TASK_OFF_START_BOOTTIME)};
    if (b.birth_ns == 0) {
        id_bump(ID_BIRTH_UNREADABLE);
        return 0;
    }
    u64 parent = task_ptr(child, TASK_OFF_REAL_PARENT);  // CLONE_PARENT: the forker's parent
    b.parent = parent ? task_u32(parent, TASK_OFF_TGID) : 0;
    b.parent_birth_ns = birth_of(parent);
    if (births.update(&tgid, &b) != 0)
        id_bump(ID_BIRTH_INSERT_FAILED);
    return 0;
}

#if REMEDY_SECTION_SCHED
// ===== Section "sched": fork rate (per process, per cgroup), exec rate (per parent, per cgroup) and
// short-lived churn (children exiting soon after their fork, per parent). Included by
// bpf/remedy.bpf.c when a policy uses one of these signals.

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 child = args->child_pid;
    u64 birth = current_birth();
    // Context only (parent chains of exited processes), never identity: it is LRU.
    struct lineage l = {.ppid = tgid, .born_ns = bpf_ktime_get_boot_ns()};
    bpf_get_current_comm(&l.comm, sizeof(l.comm));
    lineage.update(&child, &l);

    fastpath_armed_check(tgid, birth);  // fast path (issue 5): before the counting
    u32 fp = account(args, SIG_FORK, tgid, birth, 1);
    // fork_rate_cgroup is counted in the raw tracepoint's program: with both signals' tiers in
    // one program the verifier's walk passes its limit.
    fastpath_tier_check(tgid, fp);  // fast path from policy (issue 12): the tiers just counted
    return 0;
}

#endif  // REMEDY_SECTION_SCHED (fork); exec is shared with the memory section

#if REMEDY_SECTION_SCHED || REMEDY_SECTION_MEMORY
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#if REMEDY_SECTION_MEMORY
    // A new program gets a new address space: the level the old image (often a fork of a
    // big parent, between fork and exec) reached in this window is not the new program's.
    u64 birth = current_birth();
#pragma clang loop unroll(disable)
    for (u32 c = 0; c < MAX_CLASSES; c++) {
        struct window_key rss = {.signal = SIG_RSS, .cls = c, .id = tgid, .birth = birth};
        windows.delete(&rss);
        rss.signal = SIG_RSS_GROWTH;
        windows.delete(&rss);
    }
#endif
#if REMEDY_SECTION_SCHED
    struct lineage *l = lineage.lookup(&tgid);
    if (l) {
        // The process has a new name now; chains built later should show it.
        bpf_get_current_comm(&l->comm, sizeof(l->comm));
    }
    // Execs are counted against the parent that keeps spawning them (a crash loop's
    // supervisor, a shell loop): the parent the kernel knows now, with its birth. An orphan's
    // parent is its reaper, never the number its dead parent had.
    u64 parent_birth = 0;
    u32 parent = current_spawner(&parent_birth);
    if (parent)
        account(args, SIG_EXEC, parent, parent_birth, 1);
    account_cgroup(args, SIG_EXEC_CGROUP);
#endif
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
#if REMEDY_EXIT_HAS_GROUP_DEAD
    u32 process_dies = args->group_dead;  // the last thread of the process (Linux 6.13+)
#elif defined(TASK_OFF_SIGNAL) && defined(SIGNAL_OFF_LIVE)
    // Before 6.13: do_exit() decrements signal->live before this tracepoint, so 0 means every
    // thread is exiting. Not the leader's exit: a leader that leaves by pthread_exit() (or
    // dies in a non-leader exec's de_thread()) would take the births entry and the arm of a
    // process that lives on, which would then be unverifiable, so never acted on.
    u64 sigs = task_ptr(bpf_get_current_task(), TASK_OFF_SIGNAL);
    u32 process_dies = sigs && task_u32(sigs, SIGNAL_OFF_LIVE) == 0;
#else
#error "sched_process_exit has no group_dead and BTF gave no task->signal->live offsets"
#endif
#if REMEDY_SECTION_SCHED
    // Churn first: it reads the births entry (who spawned this process) deleted below.
    if ((u32)pid_tgid == tgid) {
        u32 sig = SIG_CHURN;
        struct signal_config *cfg = signal_config.lookup(&sig);
        u64 birth = current_birth();
        if (cfg && cfg->ntiers != 0 && birth != 0) {
            u64 parent_birth = 0;
            u32 parent = current_spawner(&parent_birth);
            if (parent && bpf_ktime_get_boot_ns() - birth < cfg->lifetime_ns)
                account(args, SIG_CHURN, parent, parent_birth, 1);
        }
    }
#endif
    if (process_dies) {
        births.delete(&tgid);
#if REMEDY_SECTION_SCHED
        if (fastpath_armed.lookup(&tgid)) {
            fastpath_armed.delete(&tgid);
            fp_bump(FP_DISARMED_AT_EXIT);
        }
#endif
    }
    return 0;
}

#if REMEDY_SECTION_CPU
// ===== Section "cpu": CPU time per process from sched:sched_stat_runtime. The threshold is in
// nanoseconds of CPU per window (user space converts a policy's percent of a core).

TRACEPOINT_PROBE(sched, sched_stat_runtime)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    // The runtime is charged to args->pid; when that is not the current task (accounting done
    // on behalf of another), we cannot name its process cheaply, so skip it.
    if ((u32)pid_tgid != (u32)args->pid || (u32)pid_tgid == 0)
        return 0;
    account(args, SIG_CPU, pid_tgid >> 32, current_birth(), (s64)args->runtime);
    return 0;
}
#endif  // REMEDY_SECTION_CPU

#if REMEDY_SECTION_MEMORY
// ===== Section "memory": anonymous resident memory per process from kmem:rss_stat. The event fires
// on every counter change; the level check happens here, so routine changes cross nothing.

#define REMEDY_MM_ANONPAGES 1

TRACEPOINT_PROBE(kmem, rss_stat)
{
    // curr: the mm is the current task's, so the current tgid names its owner. A child
    // between fork and exec shares its parent's pages and counts them: it is as big as it
    // looks, for as long as it lasts.
    if (!args->curr || args->member != REMEDY_MM_ANONPAGES)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 birth = current_birth();
    account(args, SIG_RSS, tgid, birth, args->size);
    account(args, SIG_RSS_GROWTH, tgid, birth, args->size);  // issue 12: growth per window
    return 0;
}
#endif  // REMEDY_SECTION_MEMORY

#if REMEDY_SECTION_FILES
// ===== Section "files": successful opens per process, and descriptors opened minus closed (a leak).
// Attaching syscalls:* tracepoints puts every syscall on the slower traced path: this section
// is compiled in only when a policy uses open_rate or fd_growth.

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    if (args->ret < 0)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 birth = current_birth();
    account(args, SIG_OPEN, tgid, birth, 1);
    account(args, SIG_FD, tgid, birth, 1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_close)
{
    if (args->ret != 0)
        return 0;
    account(args, SIG_FD, bpf_get_current_pid_tgid() >> 32, current_birth(), -1);
    return 0;
}
#endif  // REMEDY_SECTION_FILES

#if REMEDY_SECTION_NET
// ===== Section "net": outbound connect() calls per process (attempts, successful or not: a storm of
// failing connects is exactly what operators want to see).

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    account(args, SIG_CONNECT, bpf_get_current_pid_tgid() >> 32, current_birth(), 1);
    return 0;
}
#endif  // REMEDY_SECTION_NET
