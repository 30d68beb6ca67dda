//! reaper's eBPF programs: process lifecycle events into one ring buffer.
//!
//! BTF tracepoints (`tp_btf`) give typed `task_struct *` arguments without tracefs; they work
//! where kprobes and fentry do not. Struct field offsets are never hard-coded: user space
//! resolves them from the running kernel's BTF and hands them over in [`OFFSETS`] (and what the
//! kernel offers in [`FEATURES`]) before the programs are loaded. Each program is a thin wrapper over a `try_*` function.
//!
//! Failures are rare and never on the hot path: a kernel read that faulted, a map insert
//! refused, a ring buffer reserve that failed. Each is counted in a per-CPU array (which the
//! daemon exports as metrics) and reported through aya-log into the daemon's logs, at most one
//! line per kind of failure a minute ([`may_log`]); only the failure branches do either.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, generated,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use reaper_common::{
    ACTIVITY_MAX, ACTIVITY_WATCH_INCOMPLETE, ActivityRecord, COMM_LEN, EXEC_IMAGE_UNREAD,
    EventKind, ExecEvent, ExecHead, ExitEvent, ForkEvent, Header, KIND_SLOTS, KernelFeatures,
    KernelOffsets, RenameEvent, SIGNAL_GROUP_EXIT, SockActivity, WATCH_MAX, WATCH_NAME_FILTER_BITS,
    WATCH_NAME_TARGET, WATCH_NAMES_MAX, comm_nul_padded, watch_name_bit,
};
use reaper_ebpf::{exec_content, exec_lengths, load, off};

/// Field offsets of the running kernel, written by user space at load time (read-only global).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::UNSET;

/// What the running kernel offers, written by user space at load time (read-only global).
#[unsafe(no_mangle)]
static FEATURES: KernelFeatures = KernelFeatures {
    exit_has_group_dead: 0,
    has_in_execve: 0,
};

/// Wake the reader once a CPU has submitted this many bytes since it last did (set by user
/// space at load time: `probes::wakeup_bytes` says how much and why); below it, records are
/// submitted without a wake-up and the reader's timer collects them. A fast reader is always "caught up", so the kernel's
/// default would wake it for every record: one context switch per event in a fork storm.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// Whether every exec record carries the exec's path and argv, not only a candidate's or a
/// watched process's (set by user space at load time: `reaper events`, which shows every exec
/// whole; the daemon leaves it 0).
#[unsafe(no_mangle)]
static FULL_EXEC_RECORDS: u32 = 0;

/// Bytes this CPU submitted since it last woke the reader. Counted per CPU, not asked of the
/// ring (`bpf_ringbuf_query(BPF_RB_AVAIL_DATA)` reads the consumer position, a cache line the
/// reader writes from another CPU: a miss on most submits).
#[map]
static UNANNOUNCED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The one ring buffer all events go through. Its size is set by user space at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Where an exec record with its image is built: it is too big for the 512-byte BPF stack, and
/// only its used part (fixed fields + the path and argv bytes present) is copied into the ring
/// buffer.
#[map]
static EXEC_SCRATCH: PerCpuArray<ExecEvent> = PerCpuArray::with_max_entries(1, 0);

/// Ring buffer reserve failures, per CPU, indexed by event kind id.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(KIND_SLOTS, 0);

/// Kernel reads that faulted, per CPU, indexed by event kind id: the event was not sent.
#[map]
static READ_FAULTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KIND_SLOTS, 0);

/// Processes whose activity is tracked: tgid → the target (tgid) it counts for. User space
/// inserts targets; the fork program adds their descendants as they are born, the exit program
/// removes the dead. Sized by user space at load time (from `kernel.pid_max`); an insert that
/// fails all the same is counted in WATCH_FAILURES and flagged in the target's record.
#[map]
static WATCHED: HashMap<u32, u32> = HashMap::with_max_entries(WATCH_MAX, 0);

/// Which tgids may be in [`WATCHED`], for the programs that run for every process (fork, exit,
/// the socket programs) and mostly find nothing there: a hash lookup of a tgid that is not in
/// the map still hashes it and reads its bucket, a cold cache line on nearly every exit, while
/// this is a dense array (one byte per tgid, eight to an element) whose recent tgids share warm
/// lines, and an array lookup the verifier inlines (array_map_gen_lookup(), since 4.14:
/// <https://github.com/torvalds/linux/blob/v5.10/kernel/bpf/arraymap.c>).
///
/// A zero byte means "not in WATCHED"; a set byte means "maybe" (today's lookup follows). Only
/// the programs write it, byte by byte (a byte store leaves its neighbours alone, so no update
/// is lost without the atomic OR that needs 5.12 <https://github.com/torvalds/linux/commit/981f94c3e921>):
/// the fork and exec programs set a tgid's byte before they insert it into WATCHED, and the
/// exit program clears it when the process is gone. User space inserts through
/// [`WATCHED_BY_USER`] instead, so no read-modify-write of its ever races theirs. Sized by user
/// space at load time from `kernel.pid_max`; a tgid beyond it is always "maybe".
#[map]
static WATCHED_BY_KERNEL: Array<u64> = Array::with_max_entries(WATCH_MAX / 8, 0);

/// Tgids user space inserted into [`WATCHED`] (one bit per tgid, 64 to an element), set before
/// the insert. Written only by user space (one thread), so its read-modify-writes of an element
/// cannot lose a bit; cleared when user space unwatches the tgid. Sized like
/// [`WATCHED_BY_KERNEL`].
#[map]
static WATCHED_BY_USER: Array<u64> = Array::with_max_entries(WATCH_MAX / 64, 0);

/// Descendants of watched processes that WATCHED refused (full), per CPU.
#[map]
static WATCH_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Socket activity per target tgid. User space creates a target's record when it watches it;
/// `sock_io` creates one for a process watched by its name before user space adopts it.
#[map]
static ACTIVITY: HashMap<u32, ActivityRecord> = HashMap::with_max_entries(ACTIVITY_MAX, 0);

/// The rules' process names (comm, NUL-padded) → [`WATCH_NAME_TARGET`], and the runtimes
/// whose argv is kept → `WATCH_NAME_ARGV`, written by user space. A process that execs under a
/// rule's name is watched from its exec on: user space reads the ring only every 0.4–1.6 s in
/// a storm or a trickle, and a CLI's first turn (its model's answer, the tool it starts) can
/// come sooner. Either kind's exec record carries the path and argv.
#[map]
static WATCH_NAMES: HashMap<[u8; COMM_LEN], u32> = HashMap::with_max_entries(WATCH_NAMES_MAX, 0);

/// Which names may be in [`WATCH_NAMES`], a bit per [`watch_name_bit`] of the name: every exec
/// reads it, and only a set bit costs the hash lookup (hashing 16 bytes and reading a bucket,
/// ~10 % of the exec program's samples when every exec paid it). Written only by user space,
/// a name's bit before its key goes into WATCH_NAMES; a stale bit costs only the lookup.
#[map]
static WATCH_NAME_BITS: Array<u64> = Array::with_max_entries(WATCH_NAME_FILTER_BITS / 64, 0);

/// Kernels before 6.16 do not say which thread's exit ended the group: every thread that
/// reaches the exit tracepoint after the last `signal->live` decrement reads 0. The first one
/// claims its process here (tgid → start time, `BPF_NOEXIST`) and alone reports the exit; the
/// fork program clears a reused pid's old claim. LRU: old claims age out by themselves.
#[map]
static EXIT_CLAIMED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(WATCH_MAX, 0);

/// At most one log line per report slot in this long (ns).
const LOG_INTERVAL_NS: u64 = 60_000_000_000;

/// Report slots: a faulted read per event kind, a full ring per event kind, a refused watch.
const REPORT_SLOTS: u32 = 2 * EventKind::ALL.len() as u32 + 1;

/// When each report slot was last logged (`CLOCK_MONOTONIC` ns, 0: never), for rate limiting.
/// Shared by all CPUs: a race between two CPUs costs at most one extra line.
#[map]
static LOGGED_AT: Array<u64> = Array::with_max_entries(REPORT_SLOTS, 0);

/// The tgid of the initial pid namespace's child reaper: init (see [`find_new_reaper`]).
const ROOT_NS_REAPER_TGID: u32 = 1;

/// How far up the parent chain the subreaper search goes; the kernel walks without a bound,
/// but a subreaper deeper than this above an exiting process is not seen (it falls back to
/// the namespace's init).
const MAX_ANCESTORS: usize = 24;

/// One field of [`FEATURES`], read like [`off!`] reads [`OFFSETS`]; the verifier knows it as a constant too, so
/// the branch a kernel does not take is dead code.
macro_rules! feature {
    ($field:ident) => {
        // SAFETY: as for `off!`.
        unsafe { core::ptr::read_volatile(&raw const FEATURES.$field) }
    };
}

/// Reads a `T` at `base + off` with `bpf_probe_read_kernel`, for what [`load`] cannot reach
/// (offsets known only at run time) or should not (the subreaper walk: see
/// [`find_new_reaper`]).
#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }
}

/// `CLOCK_MONOTONIC` ns, the daemon's clock for idle times: it stops during suspend, so a
/// resumed machine does not find every session idle (`bpf_ktime_get_ns()` reads
/// `ktime_get_mono_fast_ns()`: <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c>).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { generated::bpf_ktime_get_ns() }
}

/// The header every record starts with, stamped `at` (`CLOCK_MONOTONIC` ns: [`now_ns`], or a
/// time the kernel already took).
#[inline(always)]
fn header(kind: EventKind, tgid: u32, start_time_ns: u64, at: u64) -> Header {
    Header {
        kind: kind as u32,
        tgid,
        timestamp_ns: at,
        start_time_ns,
    }
}

/// Submit flags for a record of `bytes`: a wake-up only once this CPU has submitted enough
/// since its last one.
#[inline(always)]
fn wakeup_flags(bytes: u64) -> u64 {
    // SAFETY: a plain global, read volatile so the zero initializer is not folded in.
    let threshold = unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) };
    let Some(pending) = UNANNOUNCED.get_ptr_mut(0) else {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    };
    // SAFETY: this CPU's slot. Programs run with migration disabled, not always with
    // preemption disabled, so another run on this CPU can interleave and lose an update: one
    // wake-up more than needed, or one record's bytes not counted; the reader's timer
    // collects the ring either way.
    unsafe {
        let total = *pending + bytes;
        if total >= threshold {
            *pending = 0;
            u64::from(BPF_RB_FORCE_WAKEUP)
        } else {
            *pending = total;
            u64::from(BPF_RB_NO_WAKEUP)
        }
    }
}

/// `task->comm` as two little-endian `u64` halves, NUL-padded ([`comm_nul_padded`]), loaded
/// byte by byte: what `bpf_get_current_comm()` copies for `current`, without the helper call.
/// Byte loads, because the verifier checks a load from a `char[]` member against one element
/// ("access beyond the end of member" for a wider one: btf_struct_walk() in
/// <https://github.com/torvalds/linux/blob/v5.10/kernel/bpf/btf.c>,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/btf.c>). Like the helper, it does
/// not take the task lock: a rename in flight may be read half done.
#[inline(always)]
fn task_comm(task: *const u8) -> (u64, u64) {
    let at = off!(task_comm);
    let half = |from: u32| -> u64 {
        let mut word = 0u64;
        let mut i = 0;
        while i < 8 {
            word |= u64::from(load::<u8>(task, at + from + i)) << (8 * i);
            i += 1;
        }
        word
    };
    comm_nul_padded(half(0), half(8))
}

/// Stores a comm's halves ([`task_comm`]) into a record's `comm`.
///
/// # Safety
/// `dst` must be writable for [`COMM_LEN`] bytes and 8-byte aligned.
#[inline(always)]
unsafe fn store_comm(dst: *mut [u8; COMM_LEN], (lo, hi): (u64, u64)) {
    // SAFETY: the caller's promise; two aligned u64 stores.
    unsafe {
        let words = dst.cast::<u64>();
        *words = lo;
        *words.add(1) = hi;
    }
}

/// The task's real uid as the initial user namespace sees it: what
/// `bpf_get_current_uid_gid()` returns for `current` (its low half), without the helper call.
/// The helper reads `current_cred()->uid` (`task->cred`, the subjective credentials) through
/// from_kuid(&init_user_ns, …), the identity: init_user_ns maps every id to itself
/// (<https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c>,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/user.c>). `task->cred` is `__rcu`:
/// these programs run under rcu_read_lock(), and the verifier has the pointer checked for
/// NULL before it is loaded through (a live task always has one).
#[inline(always)]
fn task_uid(task: *const u8) -> Result<u32, i32> {
    let cred: *const u8 = load(task, off!(task_cred));
    if cred.is_null() {
        return Err(EFAULT);
    }
    Ok(load(cred, off!(cred_uid)))
}

/// `-EFAULT`, as a helper that could not read would return.
const EFAULT: i32 = -14;

#[inline(always)]
fn count(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(slot) = counters.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other program touches it concurrently on this CPU.
        unsafe { *slot += 1 }
    }
}

/// Whether a line may be logged for report `slot` now; if so, the slot is stamped.
#[inline(always)]
fn may_log(slot: u32) -> bool {
    let Some(last) = LOGGED_AT.get_ptr_mut(slot) else {
        return false;
    };
    let now = now_ns();
    // SAFETY: a pointer into an array map value; plain loads and stores of a u64.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// The ring buffer was full: a `kind` event is lost (the daemon reconciles with /proc).
#[inline(always)]
fn ring_full(ctx: &BtfTracePointContext, kind: EventKind) {
    count(&LOST, kind as u32);
    if may_log(EventKind::ALL.len() as u32 + kind.index() as u32) {
        warn!(
            ctx,
            target: "reaper::ebpf",
            "ring buffer full: a {} event was lost (reaper_events_lost_total; at most one line a minute)",
            kind.name()
        );
    }
}

/// A program's `try_*` failed: a kernel read faulted, and its event was not sent.
#[inline(always)]
fn read_fault(ctx: &BtfTracePointContext, kind: EventKind, err: i32) {
    count(&READ_FAULTS, kind as u32);
    if may_log(kind.index() as u32) {
        warn!(
            ctx,
            target: "reaper::ebpf",
            "{}: a kernel read failed with error {}: the event was not sent (reaper_kernel_read_faults_total; at most one line a minute)",
            kind.name(),
            err
        );
    }
}

/// WATCHED refused `pid`, forked in `target`'s family (a full preallocated hash map refuses
/// new keys with `E2BIG`:
/// <https://github.com/gregkh/linux/blob/v6.1.172/kernel/bpf/hashtab.c#L1003-L1005>): its
/// socket bytes will not be counted, so the target's record says its activity is incomplete.
#[inline(always)]
fn watch_refused(ctx: &BtfTracePointContext, pid: u32, target: u32) {
    count(&WATCH_FAILURES, 0);
    if let Some(record) = ACTIVITY.get_ptr_mut(target) {
        // SAFETY: a pointer into the map value. A plain read-modify-write of the flags: an
        // atomic OR needs 5.12 <https://github.com/torvalds/linux/commit/981f94c3e921>, the
        // matrix starts at 5.10, and nothing else writes the flags while the record exists.
        unsafe { (*record).flags |= ACTIVITY_WATCH_INCOMPLETE }
    }
    if may_log(2 * EventKind::ALL.len() as u32) {
        warn!(
            ctx,
            target: "reaper::ebpf",
            "the watch map is full: pid {} of target {} is not watched, so the target is not reaped as idle (reaper_watch_failures_total; at most one line a minute)",
            pid,
            target
        );
    }
}

/// The process's start time: its group leader's `start_boottime`, which `/proc/PID/stat`
/// reports in clock ticks (fs/proc/array.c, do_task_stat).
#[inline(always)]
fn process_start(task: *const u8) -> u64 {
    let leader: *const u8 = load(task, off!(task_group_leader));
    load(leader, off!(task_start_boottime))
}

/// A one-bit field, read with the helper as the byte that holds it (`base` need not be typed).
#[inline(always)]
fn bit(o_byte: u32, o_bit: u32, base: *const u8) -> Result<bool, i32> {
    let byte: u8 = read(base, o_byte)?;
    Ok((byte >> (o_bit & 7)) & 1 == 1)
}

/// A one-bit field, loaded directly ([`load`]) as the byte that holds it: `base` must be a
/// BTF-typed pointer. The verifier accepts a load that covers a bit field's bytes whole
/// (btf_struct_walk(): <https://github.com/torvalds/linux/blob/v5.10/kernel/bpf/btf.c>,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/btf.c>).
#[inline(always)]
fn load_bit(base: *const u8, o_byte: u32, o_bit: u32) -> bool {
    (load::<u8>(base, o_byte) >> (o_bit & 7)) & 1 == 1
}

/// Whether `tgid` may be in [`WATCHED`]: false only if no insert into it ever set its filter
/// ([`WATCHED_BY_KERNEL`], [`WATCHED_BY_USER`]) or the exit program cleared it since.
#[inline(always)]
fn maybe_watched(tgid: u32) -> bool {
    let Some(word) = WATCHED_BY_KERNEL.get_ptr(tgid / 8) else {
        return true;
    };
    // SAFETY: a byte of an 8-byte array map value.
    let byte = unsafe { core::ptr::read_volatile(word.cast::<u8>().add((tgid % 8) as usize)) };
    if byte != 0 {
        return true;
    }
    match WATCHED_BY_USER.get_ptr(tgid / 64) {
        // SAFETY: a pointer into an array map value.
        Some(bits) => (unsafe { core::ptr::read_volatile(bits) } >> (tgid % 64)) & 1 != 0,
        None => true,
    }
}

/// Sets (`true`) or clears `tgid`'s byte in [`WATCHED_BY_KERNEL`]. Set it before inserting
/// `tgid` into WATCHED; clear it only where no program can insert it concurrently.
#[inline(always)]
fn mark_watched(tgid: u32, watched: bool) {
    if let Some(word) = WATCHED_BY_KERNEL.get_ptr_mut(tgid / 8) {
        // SAFETY: a byte of an 8-byte array map value; a single-byte store.
        unsafe {
            core::ptr::write_volatile(
                word.cast::<u8>().add((tgid % 8) as usize),
                u8::from(watched),
            )
        }
    }
}

/// Whether the NUL-padded comm (its halves, [`task_comm`]) may be one of [`WATCH_NAMES`]
/// ([`WATCH_NAME_BITS`]).
#[inline(always)]
fn maybe_watched_name((lo, hi): (u64, u64)) -> bool {
    let bit = watch_name_bit(lo, hi);
    match WATCH_NAME_BITS.get(bit / 64) {
        Some(word) => (*word >> (bit % 64)) & 1 != 0,
        None => true,
    }
}

// --- fork -------------------------------------------------------------------------------

/// `trace_sched_process_fork(current, p)` in kernel_clone(), before the child first runs:
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    if let Err(err) = try_fork(&ctx) {
        read_fault(&ctx, EventKind::Fork, err);
    }
    0
}

fn try_fork(ctx: &BtfTracePointContext) -> Result<(), i32> {
    if off!(ready) == 0 {
        return Ok(());
    }
    let child: *const u8 = ctx.arg(1);
    let pid: i32 = load(child, off!(task_pid));
    let tgid: i32 = load(child, off!(task_tgid));
    if pid != tgid {
        // CLONE_THREAD: a new thread of an existing process, not a process.
        return Ok(());
    }
    let start: u64 = load(child, off!(task_start_boottime));
    let parent: *const u8 = load(child, off!(task_real_parent));
    let parent_tgid: i32 = load(parent, off!(task_tgid));
    let parent_start = process_start(parent);
    // The child copies the forking thread's credentials and comm: that thread is `current`,
    // the tracepoint's first argument.
    let forking: *const u8 = ctx.arg(0);
    let uid = task_uid(forking)?;
    let comm = task_comm(forking);

    if feature!(exit_has_group_dead) == 0 {
        let _ = EXIT_CLAIMED.remove(tgid as u32);
    }
    // A descendant of a watched process is watched for the same target, from birth. The child
    // first runs (and can exit) only after this program: wake_up_new_task() follows the
    // tracepoint in kernel_clone() <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>
    // (and in _do_fork() <https://github.com/torvalds/linux/blob/v5.10/kernel/fork.c>), so its
    // exit sees the byte set here.
    if maybe_watched(parent_tgid as u32)
        // SAFETY: a map lookup; the value is copied out at once.
        && let Some(target) = unsafe { WATCHED.get(parent_tgid as u32) }.copied()
    {
        mark_watched(tgid as u32, true);
        if WATCHED.insert(tgid as u32, target, 0).is_err() {
            watch_refused(ctx, tgid as u32, target);
        }
    }

    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        ring_full(ctx, EventKind::Fork);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at the reserved record; every field is written before the submit.
    unsafe {
        // The fork's time is the child's creation: copy_process() stamps `start_time` with
        // ktime_get_ns(), bpf_ktime_get_ns()'s clock, just before this tracepoint
        // (<https://github.com/torvalds/linux/blob/v5.10/kernel/fork.c>,
        // <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>): no clock read here.
        (*ev).header = header(
            EventKind::Fork,
            tgid as u32,
            start,
            load(child, off!(task_start_time)),
        );
        (*ev).parent_tgid = parent_tgid as u32;
        (*ev).uid = uid;
        (*ev).parent_start_time_ns = parent_start;
        store_comm(&raw mut (*ev).comm, comm);
    }
    entry.submit(wakeup_flags(size_of::<ForkEvent>() as u64));
    Ok(())
}

// --- exec -------------------------------------------------------------------------------

/// `trace_sched_process_exec(current, old_pid, bprm)` in exec_binprm(), after the new image is
/// in place, so `current->mm` holds the new argv:
/// <https://github.com/torvalds/linux/blob/v6.18/fs/exec.c>
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    if let Err(err) = try_exec(&ctx) {
        read_fault(&ctx, EventKind::Exec, err);
    }
    0
}

fn try_exec(ctx: &BtfTracePointContext) -> Result<(), i32> {
    if off!(ready) == 0 {
        return Ok(());
    }
    let task: *const u8 = ctx.arg(0);
    let bprm: *const u8 = ctx.arg(2);
    let tgid: u32 = load(task, off!(task_tgid));
    // The exec'ing thread leads its group by now: de_thread() made it the leader, with the old
    // leader's start time, before the tracepoint (begin_new_exec() → de_thread():
    // <https://github.com/torvalds/linux/blob/v5.10/fs/exec.c>,
    // <https://github.com/torvalds/linux/blob/v6.18/fs/exec.c>), so its own start time is the
    // process's: no `group_leader` load.
    let start: u64 = load(task, off!(task_start_boottime));
    let parent: *const u8 = load(task, off!(task_real_parent));
    let parent_tgid: i32 = load(parent, off!(task_tgid));
    let uid = task_uid(task)?;
    let comm = task_comm(task);

    let named: u32 = if maybe_watched_name(comm) {
        let (lo, hi) = comm;
        let mut key = [0u8; COMM_LEN];
        key[..8].copy_from_slice(&lo.to_le_bytes());
        key[8..].copy_from_slice(&hi.to_le_bytes());
        // SAFETY: a map lookup; the value is copied out at once.
        unsafe { WATCH_NAMES.get(key) }.copied().unwrap_or(0)
    } else {
        0
    };
    if named == WATCH_NAME_TARGET {
        // Its own target until user space decides; a descendant of a target stays that.
        mark_watched(tgid, true);
        let _ = WATCHED.insert(tgid, tgid, u64::from(BPF_NOEXIST));
    }
    // The image (path and argv) only where user space reads it: a candidate by its name
    // (matched against the rules' argv), a runtime that may take a rule's name later
    // (WATCH_NAME_ARGV: it may overwrite its argv when it does), a watched process (a target or
    // its descendant: what a decision logs), or every exec for `reaper events`
    // (FULL_EXEC_RECORDS). Every other exec sends the head alone (EXEC_IMAGE_UNREAD): the path
    // read (~90 ns a run) and the copy out of the scratch record (~50 ns) were a quarter of this
    // program's time on /bin/true (issue 14). User space's other name match, the exec'd file's basename, is the comm at this
    // point: begin_new_exec() sets it to kbasename(bprm->filename), cut to TASK_COMM_LEN - 1
    // bytes as WATCH_NAMES keys are (<https://github.com/torvalds/linux/blob/v5.10/fs/exec.c>);
    // 6.18 takes the file's dentry name instead only for an execveat() of an fd with an empty
    // path, whose `filename` is "/dev/fd/N" (bprm->comm_from_dentry:
    // <https://github.com/torvalds/linux/blob/v6.18/fs/exec.c>). A process that becomes a
    // candidate later (renamed to a rule's name, new rules) has its image read from /proc by
    // user space. The filter first, as in the other programs.
    // SAFETY: a plain global, read volatile so the zero initializer is not folded in.
    let full = unsafe { core::ptr::read_volatile(&raw const FULL_EXEC_RECORDS) } != 0;
    let wants_image = full
        || named != 0
        || (maybe_watched(tgid)
            // SAFETY: a map lookup; only whether it is there is used.
            && unsafe { WATCHED.get(tgid) }.is_some());
    if !wants_image {
        let Some(mut entry) = EVENTS.reserve::<ExecHead>(0) else {
            ring_full(ctx, EventKind::Exec);
            return Ok(());
        };
        let head = entry.as_mut_ptr();
        // SAFETY: `head` points at the reserved record; every field is written before the
        // submit. No timestamp: nothing in user space reads this exec's time, and the clock
        // read was a tenth of this program's time (~40 ns: bpf_ktime_get_ns() reads the
        // clocksource through an indirect call, ktime_get_mono_fast_ns() → tk_clock_read():
        // <https://github.com/torvalds/linux/blob/v6.18/kernel/time/timekeeping.c>).
        unsafe {
            exec_identity(
                head,
                header(EventKind::Exec, tgid, start, 0),
                parent_tgid,
                uid,
                comm,
            );
            exec_lengths(head, EXEC_IMAGE_UNREAD, 0, 0);
        }
        entry.submit(wakeup_flags(size_of::<ExecHead>() as u64));
        return Ok(());
    }

    let Some(ev) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    let filename: *const u8 = load(bprm, off!(binprm_filename));
    let mm: *const u8 = load(task, off!(task_mm));
    let arg_start: u64 = load(mm, off!(mm_arg_start));
    let arg_end: u64 = load(mm, off!(mm_arg_end));
    // SAFETY: `ev` points at this CPU's scratch record: the path, then argv right after its
    // last byte (the same code as the bench's floor with the record's content), then the
    // head's other fields, plain stores.
    let size = unsafe {
        let size = exec_content(ev, filename, arg_start, arg_end);
        let stamped = header(EventKind::Exec, tgid, start, now_ns());
        exec_identity(&raw mut (*ev).head, stamped, parent_tgid, uid, comm);
        size
    };
    // SAFETY: `size` is a prefix of the record (exec_content()).
    let used = unsafe { core::slice::from_raw_parts(ev.cast::<u8>(), size) };
    if EVENTS
        .output::<[u8]>(used, wakeup_flags(size as u64))
        .is_err()
    {
        ring_full(ctx, EventKind::Exec);
    }
    Ok(())
}

/// Fills in what every exec record's head carries besides its flags and lengths
/// ([`exec_lengths`]): the header, parent, uid and comm.
///
/// # Safety
/// `head` must point at a writable [`ExecHead`].
#[inline(always)]
unsafe fn exec_identity(
    head: *mut ExecHead,
    header: Header,
    parent_tgid: i32,
    uid: u32,
    comm: (u64, u64),
) {
    // SAFETY: the caller's promise; plain stores into the record's head.
    unsafe {
        (*head).header = header;
        (*head).parent_tgid = parent_tgid as u32;
        (*head).uid = uid;
        store_comm(&raw mut (*head).comm, comm);
    }
}

// --- exit -------------------------------------------------------------------------------

/// `trace_sched_process_exit(tsk, group_dead)` in do_exit(), after `signal->live` was
/// decremented and `exit_code` set, before exit_notify() hands the children to a new parent:
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/exit.c>
/// Kernels before 6.16 pass only `tsk`; there the group is dead when `signal->live` is 0.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    if let Err(err) = try_exit(&ctx) {
        read_fault(&ctx, EventKind::Exit, err);
    }
    0
}

fn try_exit(ctx: &BtfTracePointContext) -> Result<(), i32> {
    if off!(ready) == 0 {
        return Ok(());
    }
    let task: *const u8 = ctx.arg(0);
    let signal: *const u8 = load(task, off!(task_signal));
    let has_group_dead = feature!(exit_has_group_dead) != 0;
    let group_dead = if has_group_dead {
        let arg: u64 = ctx.arg(1);
        arg & 0xff != 0
    } else {
        let live: i32 = load(signal, off!(signal_live));
        live == 0
    };
    if !group_dead {
        return Ok(());
    }
    let tgid: i32 = load(task, off!(task_tgid));
    let start = process_start(task);
    if !has_group_dead
        && EXIT_CLAIMED
            .insert(tgid as u32, start, u64::from(BPF_NOEXIST))
            .is_err()
    {
        // Another thread of this process already reported its exit.
        return Ok(());
    }
    // A filter read for every process, a lookup only for one that may be watched; only a
    // watched one pays for the deletes (each takes its bucket's lock).
    if maybe_watched(tgid as u32) {
        // SAFETY: a map lookup; the value is copied out at once.
        if let Some(target) = unsafe { WATCHED.get(tgid as u32) }.copied() {
            if target == tgid as u32 {
                // A target (or a process watched by its name): its activity goes with it.
                let _ = ACTIVITY.remove(tgid as u32);
            }
            let _ = WATCHED.remove(tgid as u32);
        }
        // No program inserts this tgid now: a dying process does not exec, and its pid stays
        // taken until release_task() detaches it (__unhash_process()), so nothing forks into
        // it: <https://github.com/torvalds/linux/blob/v6.18/kernel/exit.c>. (User space's
        // inserts have their own filter.)
        mark_watched(tgid as u32, false);
    }
    // What wait(2) reports: wait_task_zombie() in kernel/exit.c.
    let signal_flags: u32 = load(signal, off!(signal_flags));
    let exit_status: i32 = if signal_flags & SIGNAL_GROUP_EXIT != 0 {
        load(signal, off!(signal_group_exit_code))
    } else {
        load(task, off!(task_exit_code))
    };
    let reaper_tgid = find_new_reaper(task, signal).unwrap_or(0);

    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        ring_full(ctx, EventKind::Exit);
        return Ok(());
    };
    entry.write(ExitEvent {
        header: header(EventKind::Exit, tgid as u32, start, now_ns()),
        exit_status: exit_status as u32,
        reaper_tgid,
    });
    entry.submit(wakeup_flags(size_of::<ExitEvent>() as u64));
    Ok(())
}

/// Who inherits the children, as find_new_reaper() decides it:
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/exit.c>
/// the nearest ancestor in the same pid namespace that is a live child subreaper, else the
/// namespace's init (`pid_namespace::child_reaper`).
#[inline(always)]
fn find_new_reaper(task: *const u8, signal: *const u8) -> Result<u32, i32> {
    let thread_pid: *const u8 = load(task, off!(task_thread_pid));
    let level: u32 = load(thread_pid, off!(pid_level));
    if load_bit(
        signal,
        off!(signal_has_subreaper_byte),
        off!(signal_has_subreaper_bit),
    ) {
        // The walk reads with the helper: direct loads here cost the verifier ~150 ms at load
        // time on 6.18 (each typed load is checked against task_struct's BTF, in each of
        // the 24 iterations), for a loop that runs only under a subreaper.
        let mut reaper: *const u8 = read(task, off!(task_real_parent))?;
        for _ in 0..MAX_ANCESTORS {
            let reaper_pid: *const u8 = read(reaper, off!(task_thread_pid))?;
            let reaper_level: u32 = read(reaper_pid, off!(pid_level))?;
            let pid: i32 = read(reaper, off!(task_pid))?;
            if reaper_level != level || pid == 0 {
                // Left the namespace, or reached init_task (pid 0).
                break;
            }
            let reaper_signal: *const u8 = read(reaper, off!(task_signal))?;
            if bit(
                off!(signal_is_subreaper_byte),
                off!(signal_is_subreaper_bit),
                reaper_signal,
            )? {
                let live: i32 = read(reaper_signal, off!(signal_live))?;
                if live > 0 {
                    let tgid: i32 = read(reaper, off!(task_tgid))?;
                    return Ok(tgid as u32);
                }
            }
            reaper = read(reaper, off!(task_real_parent))?;
        }
    }
    // In the initial pid namespace (level 0: init_pid_ns, the only one at that level) the
    // child reaper is the process with pid 1, whose global tgid is 1: copy_process() makes a
    // thread-group leader whose pid in its namespace is 1 that namespace's child_reaper
    // (is_child_reaper()), and only a thread of the same group replaces it (find_child_reaper()
    // in kernel/exit.c, which leaves the tgid as is); init exiting panics the kernel.
    // <https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c>,
    // <https://github.com/torvalds/linux/blob/v6.18/kernel/pid.c> (init_pid_ns),
    // <https://github.com/torvalds/linux/blob/v5.10/kernel/fork.c>. Most exits are there:
    // this spares them the four helper reads below.
    if level == 0 {
        return Ok(ROOT_NS_REAPER_TGID);
    }
    // task_active_pid_ns(): pid->numbers[pid->level].ns, at an offset known only at run time,
    // so read with the helper (and what it reads is untyped: the rest too). The verifier
    // refuses arithmetic with an unbounded value on a typed pointer (6.1: "math between ptr_
    // pointer and register with unbounded min value"), so the address comes as a plain
    // number from the helper.
    let thread_pid: *const u8 = read(task, off!(task_thread_pid))?;
    let upid = thread_pid
        .wrapping_add(off!(pid_numbers) as usize)
        .wrapping_add((level as usize) * (off!(upid_size) as usize));
    let ns: *const u8 = read(upid, off!(upid_ns))?;
    let child_reaper: *const u8 = read(ns, off!(pid_ns_child_reaper))?;
    let tgid: i32 = read(child_reaper, off!(task_tgid))?;
    Ok(tgid as u32)
}

// --- rename -----------------------------------------------------------------------------

/// `trace_task_rename(tsk, buf)` in __set_task_comm(), before the new name is copied in:
/// <https://github.com/torvalds/linux/blob/v6.18/fs/exec.c>
/// Only the main thread's comm is the process's (it is what `/proc/PID/comm` shows).
///
/// Every exec renames too (begin_new_exec() sets the comm to the file's basename), while
/// bprm_execve() holds `current->in_execve` set; that rename is skipped, since the exec event
/// that follows carries the new comm (and an exec failing after that point kills the process:
/// its exit follows instead). It saves a ring record per spawn.
#[btf_tracepoint(function = "task_rename")]
pub fn task_rename(ctx: BtfTracePointContext) -> i32 {
    if let Err(err) = try_rename(&ctx) {
        read_fault(&ctx, EventKind::Rename, err);
    }
    0
}

fn try_rename(ctx: &BtfTracePointContext) -> Result<(), i32> {
    if off!(ready) == 0 {
        return Ok(());
    }
    let task: *const u8 = ctx.arg(0);
    let new_comm: *const u8 = ctx.arg(1);
    let pid: i32 = load(task, off!(task_pid));
    let tgid: i32 = load(task, off!(task_tgid));
    if pid != tgid {
        return Ok(());
    }
    // A faulted load reads 0, "not in exec": better a redundant rename than a lost one.
    if feature!(has_in_execve) != 0
        && load_bit(task, off!(task_in_execve_byte), off!(task_in_execve_bit))
    {
        return Ok(());
    }
    let start: u64 = load(task, off!(task_start_boottime));
    let mut comm = [0u8; COMM_LEN];
    // SAFETY: reads a kernel string into a stack buffer of COMM_LEN bytes.
    unsafe {
        let _ = bpf_probe_read_kernel_str_bytes(new_comm, &mut comm);
    }

    let Some(mut entry) = EVENTS.reserve::<RenameEvent>(0) else {
        ring_full(ctx, EventKind::Rename);
        return Ok(());
    };
    entry.write(RenameEvent {
        header: header(EventKind::Rename, tgid as u32, start, now_ns()),
        comm,
    });
    entry.submit(wakeup_flags(size_of::<RenameEvent>() as u64));
    Ok(())
}

// --- socket activity of watched processes ------------------------------------------------

/// `trace_sock_send_length(sk, ret, flags)` in sock_sendmsg_nosec() (kernel 6.3+), called in
/// the sending task's context: <https://github.com/torvalds/linux/blob/v6.18/net/socket.c>
/// Attached only where the kernel has it; user space falls back to `/proc/PID/io` elsewhere.
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    sock_io(&ctx, false);
    0
}

/// `trace_sock_recv_length(sk, ret, flags)` in sock_recvmsg_nosec() (kernel 6.3+).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    sock_io(&ctx, true);
    0
}

/// `AF_INET` and `AF_INET6` (include/linux/socket.h): the network, where an agent's model is.
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// One hash lookup for every process; only watched ones do more.
#[inline(always)]
fn sock_io(ctx: &BtfTracePointContext, recv: bool) {
    let ret: i32 = ctx.arg(1);
    if ret <= 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !maybe_watched(tgid) {
        return;
    }
    // SAFETY: a map lookup; the value is copied out at once.
    let Some(target) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return;
    };
    let now = now_ns();
    // The model's answer reaching the target itself: `sk->__sk_common.skc_family` of the
    // tracepoint's `struct sock *` (first argument), offset from BTF.
    let net_recv = recv && tgid == target && {
        let sk: *const u8 = ctx.arg(0);
        matches!(load::<u16>(sk, off!(sock_family)), AF_INET | AF_INET6)
    };
    match ACTIVITY.get_ptr_mut(target) {
        // SAFETY: a pointer into the map value; concurrent updates from other CPUs can only
        // lose a few bytes of the count, never corrupt the entry.
        Some(record) => unsafe {
            (*record).activity.last_ns = now;
            (*record).activity.bytes += ret as u64;
            if net_recv {
                (*record).activity.last_net_recv_ns = now;
            }
        },
        // A process watched by its name from its exec on, not yet adopted by user space (only
        // the process itself: a child of one that user space unwatched must not recreate it).
        None if target == tgid => {
            let _ = ACTIVITY.insert(
                target,
                ActivityRecord {
                    activity: SockActivity {
                        last_ns: now,
                        bytes: ret as u64,
                        last_net_recv_ns: if net_recv { now } else { 0 },
                    },
                    flags: 0,
                    _pad: 0,
                },
                0,
            );
        }
        None => {}
    }
}

/// The model's last word where `sock:sock_recv_length` is missing (kernels 4.16 to 6.2, e.g.
/// Debian 11's 5.10 and 12's 6.1): `trace_tcp_rcv_space_adjust(sk)` opens
/// tcp_rcv_space_adjust(), which tcp_recvmsg() calls, under lock_sock(), right after copying
/// each chunk of received bytes to the reader, in the reader's context:
/// <https://github.com/torvalds/linux/blob/v5.10/net/ipv4/tcp.c> (tcp_recvmsg()),
/// <https://github.com/torvalds/linux/blob/v6.1/net/ipv4/tcp.c> (tcp_recvmsg_locked(), under
/// lock_sock() in tcp_recvmsg()); the tracepoint:
/// <https://github.com/torvalds/linux/blob/v6.1/net/ipv4/tcp_input.c> (tcp_rcv_space_adjust()),
/// <https://github.com/torvalds/linux/blob/v6.1/include/trace/events/tcp.h>.
/// tcp_read_sock() calls it too, from softirq for strparser, kTLS and sockmap receivers, where
/// the current task is whoever was interrupted; there the socket is not owned by a user
/// (bh_lock_sock() only: the softirq path queues to the backlog while a task owns it), so
/// `sk->sk_lock.owned` tells the receiving task's calls apart. Attached only where user space
/// meters activity from `/proc/PID/io`; it stamps only `last_net_recv_ns` (bytes and last
/// activity come from there).
#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn tcp_rcv_space_adjust(ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !maybe_watched(tgid) {
        return 0;
    }
    // SAFETY: a map lookup; the value is copied out at once.
    let Some(target) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return 0;
    };
    // Only the target itself hears its model, and only in its own recvmsg (socket owned).
    if target != tgid {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    if load::<i32>(sk, off!(sock_owned)) == 0
        || !matches!(load::<u16>(sk, off!(sock_family)), AF_INET | AF_INET6)
    {
        return 0;
    }
    let now = now_ns();
    match ACTIVITY.get_ptr_mut(target) {
        // SAFETY: a pointer into the map value; a plain store of a u64.
        Some(record) => unsafe { (*record).activity.last_net_recv_ns = now },
        // A process watched by its name from its exec on, not yet adopted by user space: its
        // first turn may come before that (user space keeps the record it finds).
        None => {
            let _ = ACTIVITY.insert(
                target,
                ActivityRecord {
                    activity: SockActivity {
                        last_ns: 0,
                        bytes: 0,
                        last_net_recv_ns: now,
                    },
                    flags: 0,
                    _pad: 0,
                },
                0,
            );
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
