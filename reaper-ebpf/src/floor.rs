//! The bench's floor: the least a program on reaper's lifecycle tracepoints can do and still
//! report the event. Each program reserves a ring-buffer record of reaper's header size
//! ([`Header`]), writes its kind and submits it without a wake-up (the bench's loader drains the
//! ring on a timer). No filtering, no kernel reads, no maps but the ring.
//!
//! `cargo xtask bench` attaches these (never together with reaper's programs) and compares the
//! kernel's `run_time_ns / run_cnt` per program with reaper's: the difference is what reaper's
//! filtering, reads and bookkeeping cost. Built by reaper-user/build.rs beside `reaper` (aya-build
//! builds every bin of this crate); loaded by `bench-load floor` (tests/src/bin/bench_load.rs).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    macros::{btf_tracepoint, map},
    maps::RingBuf,
    programs::BtfTracePointContext,
};
use reaper_common::{EventKind, Header};

/// 1 MiB: the loader drains it every few milliseconds, far below what a storm fills.
#[map]
static FLOOR_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

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
