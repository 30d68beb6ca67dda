//! The bench's floor: the least a program on reaper's lifecycle tracepoints can do and still
//! report the event. Each `floor_<tracepoint>` program reserves a ring-buffer record of
//! reaper's header size ([`Header`]), writes its kind and submits it without a wake-up (the
//! bench's loader drains the ring on a timer). No filtering, no kernel reads, no maps but the
//! ring.
//!
//! A second floor on exec, [`floor_sched_process_exec_content`], carries what reaper's exec
//! record carries beyond a header for a candidate (a process named as a rule's `comm`, or a
//! watched one): the exec'd path and argv, copied by the same code
//! (`reaper_ebpf::exec_content`) through the same per-CPU scratch record into the ring, for
//! every exec. The distance from the first floor to it is what that content costs, whoever
//! sends it. (reaper sends every other exec's head alone: `EXEC_IMAGE_UNREAD`.)
//!
//! `cargo xtask bench` attaches these (never together with reaper's programs; the content
//! floor in a turn of its own, in the exec floor's place beside the other three) and compares the kernel's `run_time_ns / run_cnt` per program
//! with reaper's: the difference is what reaper's filtering, reads and bookkeeping cost. Built
//! by reaper-user/build.rs beside `reaper` (aya-build builds every bin of this crate); loaded
//! by `bench-load floor` (tests/src/bin/bench_load.rs).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use reaper_common::{EventKind, ExecEvent, Header, KernelOffsets};
use reaper_ebpf::{exec_content, load, off};

/// Field offsets of the running kernel, written by the loader as for reaper's programs (only
/// the content floor reads them).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::UNSET;

/// 1 MiB: the loader drains it every few milliseconds, far below what a storm fills.
#[map]
static FLOOR_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// The content floor's exec record, built here as reaper builds its own (EXEC_SCRATCH).
#[map]
static FLOOR_EXEC_SCRATCH: PerCpuArray<ExecEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn record(kind: EventKind) -> i32 {
    if let Some(mut entry) = FLOOR_EVENTS.reserve::<Header>(0) {
        entry.write(Header {
            kind: kind as u32,
            ..Header::default()
        });
        entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    }
    0
}

// Named as reaper's programs are (after their tracepoints), with a `floor_` prefix so the bench
// and `foreign_tracers` can tell them apart by name.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn floor_sched_process_fork(_ctx: BtfTracePointContext) -> i32 {
    record(EventKind::Fork)
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn floor_sched_process_exec(_ctx: BtfTracePointContext) -> i32 {
    record(EventKind::Exec)
}

/// The exec floor with the record's content: `bprm->filename` and the new `mm`'s argv, read
/// and copied as reaper's exec program does, then the used prefix of the record output. No
/// timestamp, comm, uid, parent or start time, no filter, no wake-up accounting.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn floor_sched_process_exec_content(ctx: BtfTracePointContext) -> i32 {
    if off!(ready) == 0 {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    let bprm: *const u8 = ctx.arg(2);
    let filename: *const u8 = load(bprm, off!(binprm_filename));
    let mm: *const u8 = load(task, off!(task_mm));
    let arg_start: u64 = load(mm, off!(mm_arg_start));
    let arg_end: u64 = load(mm, off!(mm_arg_end));
    let Some(ev) = FLOOR_EXEC_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `ev` points at this CPU's scratch record; the size is a prefix of it.
    unsafe {
        let size = exec_content(ev, filename, arg_start, arg_end);
        (*ev).head.header = Header {
            kind: EventKind::Exec as u32,
            ..Header::default()
        };
        let used = core::slice::from_raw_parts(ev.cast::<u8>(), size);
        let _ = FLOOR_EVENTS.output::<[u8]>(used, u64::from(BPF_RB_NO_WAKEUP));
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn floor_sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    record(EventKind::Exit)
}

#[btf_tracepoint(function = "task_rename")]
pub fn floor_task_rename(_ctx: BtfTracePointContext) -> i32 {
    record(EventKind::Rename)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
