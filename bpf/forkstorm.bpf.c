// SPDX-License-Identifier: Apache-2.0
// Fork-storm filter: count forks per process (tgid) in a per-process window, and let exactly one
// record leave the kernel when a process crosses the threshold inside its window.
//
// KEEP IN SYNC: struct fork_config and struct fork_record are mirrored by ForkConfigC and
// ForkRecordC in remedy/sensors/forkstorm.py; tests/kernel/test_forkstorm_sensor.py compares
// sizes and offsets through the record_layout map.
//
// Map sizes come in as compiler defines (-DFORK_MAP_ENTRIES=..., -DFORK_RINGBUF_PAGES=...);
// window and threshold live in fork_config so a policy change never recompiles or reattaches.

#include <linux/sched.h>

#ifndef FORK_MAP_ENTRIES
#define FORK_MAP_ENTRIES 16384
#endif
#ifndef FORK_RINGBUF_PAGES
#define FORK_RINGBUF_PAGES 16
#endif

struct fork_config {
    u64 window_ns;  // 0 disables the filter (no policy for this signal)
    u64 threshold;  // forks in one window that make a process an offender
    u32 naive;      // 1: every fork crosses to user space (benchmark baseline)
    u32 _pad;
};

struct fork_window {
    u64 start_ns;
    u64 count;
};

struct fork_record {
    u64 ts_boot_ns;     // when the threshold was crossed, CLOCK_BOOTTIME
    u64 window_start_ns;
    u64 window_ns;
    u64 count;
    u64 cgroup_id;
    u32 tgid;           // the forking process (offender)
    u32 pid;            // the forking thread
    u32 ppid;           // parent of the offender, from the lineage map (0 when unknown)
    u32 child_pid;      // the child this fork created
    char comm[TASK_COMM_LEN];
};

enum fork_counter {
    FORK_EVENTS_SEEN = 0,
    FORK_RECORDS_EMITTED,
    FORK_RINGBUF_FAILED,
    FORK_WINDOWS_OPENED,
    FORK_KEY_INIT_FAILED,
    FORK_COUNTER_MAX,
};

BPF_ARRAY(fork_config, struct fork_config, 1);
// LRU: a host with more forking processes than entries evicts the coldest window instead of
// refusing new ones; eviction only ever forgets a count, it never emits a false record.
BPF_TABLE("lru_hash", u32, struct fork_window, fork_windows, FORK_MAP_ENTRIES);
BPF_TABLE("lru_hash", u32, u32, fork_lineage, FORK_MAP_ENTRIES);
BPF_PERCPU_ARRAY(fork_counters, u64, FORK_COUNTER_MAX);
BPF_RINGBUF_OUTPUT(fork_events, FORK_RINGBUF_PAGES);
// Never written: exists so user space can read the record's layout from BTF-less bcc metadata.
BPF_ARRAY(record_layout, struct fork_record, 1);

static __always_inline void bump(u32 idx)
{
    u64 *v = fork_counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void emit(struct fork_config *cfg, u64 now, u64 start, u64 count,
                                 u32 tgid, u32 pid, u32 child)
{
    struct fork_record *rec = fork_events.ringbuf_reserve(sizeof(struct fork_record));
    if (!rec) {
        bump(FORK_RINGBUF_FAILED);
        return;
    }
    u32 *ppid = fork_lineage.lookup(&tgid);
    rec->ts_boot_ns = now;
    rec->window_start_ns = start;
    rec->window_ns = cfg->window_ns;
    rec->count = count;
    rec->cgroup_id = bpf_get_current_cgroup_id();
    rec->tgid = tgid;
    rec->pid = pid;
    rec->ppid = ppid ? *ppid : 0;
    rec->child_pid = child;
    bpf_get_current_comm(&rec->comm, sizeof(rec->comm));
    fork_events.ringbuf_submit(rec, 0);
    bump(FORK_RECORDS_EMITTED);
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 zero = 0;
    struct fork_config *cfg = fork_config.lookup(&zero);
    if (!cfg || cfg->window_ns == 0)
        return 0;
    bump(FORK_EVENTS_SEEN);

    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 pid = (u32)id;
    u32 child = args->child_pid;
    // The child is a new process only when it is not a thread of ours; record its parent so
    // records about it can name the parent even after it is gone from /proc.
    fork_lineage.update(&child, &tgid);

    // Boot time, not monotonic: it keeps counting across suspend, like /proc start times.
    u64 now = bpf_ktime_get_boot_ns();
    if (cfg->naive) {
        emit(cfg, now, now, 1, tgid, pid, child);
        return 0;
    }

    struct fork_window *w = fork_windows.lookup(&tgid);
    if (!w || now - w->start_ns >= cfg->window_ns) {
        struct fork_window fresh = {.start_ns = now, .count = 1};
        // Two CPUs may both open a window at once; one of them wins and the other's first fork
        // is lost, which only ever under-counts by one.
        if (fork_windows.update(&tgid, &fresh) != 0) {
            bump(FORK_KEY_INIT_FAILED);
            return 0;
        }
        bump(FORK_WINDOWS_OPENED);
        if (cfg->threshold == 1)
            emit(cfg, now, now, 1, tgid, pid, child);
        return 0;
    }
    // Atomic add: concurrent forks of one process on several CPUs see distinct old values, so
    // exactly one of them sees old + 1 == threshold and emits. Later forks in the window emit
    // nothing, however many there are.
    u64 old = __sync_fetch_and_add(&w->count, 1);
    if (old + 1 == cfg->threshold)
        emit(cfg, now, w->start_ns, old + 1, tgid, pid, child);
    return 0;
}
