//! The daemon's clocks, in one place.
//!
//! Idle time and deadlines are `CLOCK_MONOTONIC` nanoseconds ([`mono_ns`]): that clock stops
//! while the machine is suspended, so a laptop that resumes after 20 minutes does not find
//! every session 20 minutes idler. Kernel events are stamped with the same clock
//! (`bpf_ktime_get_ns()`, which reads `ktime_get_mono_fast_ns()`:
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c>), and tokio's
//! timers sleep on it too.
//!
//! Process start times are another matter: `/proc/PID/stat` and `task_struct::start_boottime`
//! count from boot including suspend (`CLOCK_BOOTTIME`), in clock ticks in `/proc`. They name
//! processes ([`crate::events::Identity`]); [`boot_ticks`] is only for comparing with them.

use rustix::time::ClockId;

/// Nanoseconds of `CLOCK_MONOTONIC`: the detector's time.
pub(crate) type Nanos = u64;

fn read(clock: ClockId) -> u64 {
    let ts = rustix::time::clock_gettime(clock);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of event timestamps, idle times and deadlines.
pub fn mono_ns() -> Nanos {
    read(ClockId::Monotonic)
}

/// Clock ticks since boot, suspend included (the unit of process start times in `/proc`).
pub(crate) fn boot_ticks() -> u64 {
    read(ClockId::Boottime) / (1_000_000_000 / crate::events::ticks_per_second())
}

/// When a process that started at `start_ticks` (boot-time clock ticks) started, on the
/// monotonic clock. Exact unless the machine was suspended since; then it is earlier than the
/// truth by the time suspended (never later), which only ever makes a process look older.
pub(crate) fn start_mono_ns(start_ticks: u64) -> Nanos {
    let tick_ns = 1_000_000_000 / crate::events::ticks_per_second();
    let suspended = read(ClockId::Boottime).saturating_sub(mono_ns());
    (start_ticks * tick_ns).saturating_sub(suspended)
}
