//! Reading a target's activity counters (socket bytes or `/proc/PID/io`, CPU) into its
//! evidence, and the turn in flight it waits on.
use std::time::Duration;

use super::{
    ActivityMeter, Detector, Host, Pending, Target, nanos, secs,
    verdict::{ActivityKind, Nanos, Waiting},
};
use crate::{config::Rule, events::Identity, tree::ProcessTree};

/// What sampling needs besides the target: the rules (a target names its own by index), the
/// activity meter in use, and the I/O rate that counts as activity on the `/proc/PID/io` meter.
/// One field of the detector, so `self.sampling.sample(t, …)` borrows it beside a target
/// borrowed from `self.targets`.
pub(super) struct Sampling {
    pub(super) rules: Vec<Rule>,
    pub(super) meter: ActivityMeter,
    pub(super) io_bytes_per_second: u64,
}

/// How often a rule's targets are sampled.
fn sample_interval(rule: &Rule) -> Duration {
    (rule.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

/// How early a sample may be taken, for an `interval` between samples: whoever is this close
/// to its sample time is sampled in the wake-up of one that is due. Targets adopted at
/// different moments fall into step after a round or two, so a quiet host's daemon wakes once
/// per sample interval rather than once per target (an idle wake-up costs more than the
/// sample; 20 targets at 10 s intervals woke it twice a second). A sample taken early only
/// reads activity sooner.
fn sample_slack(interval: Duration) -> Nanos {
    nanos(interval / 8)
}

impl Detector {
    /// Samples the targets (and watched runaway candidates) whose sample time has come, or
    /// comes within their [`sample_slack`].
    pub(crate) fn sample_due(&mut self, tree: &ProcessTree, now: Nanos, host: &impl Host) {
        for t in self.targets.values_mut() {
            let slack = sample_slack(sample_interval(&self.sampling.rules[t.rule]));
            if matches!(t.pending, Pending::Reaping | Pending::Done)
                || now.saturating_add(slack) < t.next_sample
            {
                continue;
            }
            self.sampling.sample(t, tree, now, host);
        }
        let interval =
            (self.runaway_for / 8).clamp(Duration::from_millis(250), Duration::from_secs(15));
        let slack = sample_slack(interval);
        let threshold = self.runaway_cpu;
        self.runaways.retain(|pid, r| {
            if r.pending != Pending::None || now.saturating_add(slack) < r.next_sample {
                return true;
            }
            // With a terminal it is an interactive CLI in use: never a runaway.
            if host.tty_nr(*pid) != Some(0) {
                return false;
            }
            let Some(ticks) = host.cpu_ticks(r.id) else {
                return false;
            };
            if let Some((at, before)) = r.cpu {
                let dt = secs(now.saturating_sub(at));
                let rate = ticks.saturating_sub(before) as f64
                    / crate::events::ticks_per_second() as f64
                    / dt.max(1e-9);
                if rate >= threshold {
                    r.burning_since.get_or_insert(at);
                } else {
                    r.burning_since = None;
                }
            }
            r.cpu = Some((now, ticks));
            r.next_sample = now + nanos(interval);
            true
        });
    }
}

/// The seconds a rate is taken over, for counters last read `since` ago: at least the sample
/// interval. A sample may come moments after the last one (a decision re-samples a target that
/// is due; the memory-pressure check samples them all), and over such a sliver the idle hum of
/// a leaked child reads as a rate: 16 bytes in 60 ms is 266 B/s, above the 256 B/s default,
/// and a child whose 1 s heartbeat fell in that sliver at each idle deadline was never reaped
/// (seen in `the_proc_io_fallback_reaps_the_idle_and_spares_the_chatting` under load). So a
/// window counts as at least the shortest one between scheduled samples (an interval less its
/// [`sample_slack`]): those read as before, a sliver as that much.
fn rate_window(since: Nanos, interval: Duration) -> f64 {
    secs(since.max(nanos(interval) - sample_slack(interval)))
}

/// Moves a target's last activity forward to `at`, if that is later.
pub(super) fn bump(t: &mut Target, kind: ActivityKind, at: Nanos) {
    if at > t.evidence.last_activity {
        t.evidence.last_activity = at;
        t.evidence.last_activity_kind = kind;
        if t.pending == Pending::WouldKillReported {
            t.pending = Pending::None;
        }
    }
}

/// The child a turn in flight waits on: the first live child of the target forked at or after
/// the model's last word. None if the target never heard from the network: no model asked for
/// anything, so nothing it started can be a turn's tool.
pub(super) fn turn_in_flight(t: &Target, tree: &ProcessTree) -> Option<Waiting> {
    let last_word = t.last_word?;
    let target = tree.get_id(t.id)?;
    target
        .children
        .iter()
        .filter_map(|pid| t.members.get(pid))
        .filter(|m| m.forked_ns >= last_word)
        .min_by_key(|m| m.forked_ns)
        .map(|m| Waiting {
            pid: m.id.pid,
            since: m.forked_ns,
        })
}

/// How many ticks more than a process used the difference of two of its `/proc/PID/stat`
/// CPU readings (utime + stime) can show: each of the two fields is printed truncated to whole
/// ticks (`nsec_to_clock_t()` in do_task_stat(),
/// <https://github.com/torvalds/linux/blob/v6.18/fs/proc/array.c>), while their sum is the
/// exact run time (cputime_adjust() scales them to `sum_exec_runtime`,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/sched/cputime.c>), so a reading is up
/// to two ticks short of it, and a later one may be exact. Taken once per sample, not per
/// process read: a family's summed readings can be off by two ticks each, but subtracting that
/// for every member would let a working family read as idle (5 % of a core for 25 processes at
/// 10 s samples); left over, the other members' rounding can only read as activity, which spares.
const CPU_READING_SLACK_TICKS: u64 = 2;

impl Sampling {
    /// Reads a target's activity counters and moves its last activity forward if they moved.
    pub(super) fn sample(&self, t: &mut Target, tree: &ProcessTree, now: Nanos, host: &impl Host) {
        let rule = &self.rules[t.rule];
        let family: Vec<Identity> = std::iter::once(t.id)
            .chain(t.members.values().map(|m| m.id))
            .collect();
        let interval = sample_interval(rule);

        t.evidence.watch_failed |= host.watch_incomplete(t.id.pid);
        if self.meter == ActivityMeter::Socket {
            if let Some(a) = host.sock_activity(t.id.pid) {
                if a.bytes > t.sock_bytes {
                    t.sock_bytes = a.bytes;
                    t.evidence.last_socket_byte = Some(a.last_ns);
                    bump(t, ActivityKind::Socket, a.last_ns.min(now));
                }
                if a.last_net_recv_ns != 0 {
                    t.last_word = Some(a.last_net_recv_ns);
                }
            }
        } else {
            // Stamped in the kernel by `tcp:tcp_rcv_space_adjust` where it is attached (in place
            // of the socket programs): exact, and only the target's own TCP receives.
            let stamped = host
                .sock_activity(t.id.pid)
                .map_or(0, |a| a.last_net_recv_ns);
            let bytes: u64 = family.iter().filter_map(|id| host.io_bytes(*id)).sum();
            if let Some((at, before)) = t.io {
                let dt = rate_window(now.saturating_sub(at), interval);
                if bytes.saturating_sub(before) as f64 / dt > self.io_bytes_per_second as f64 {
                    bump(t, ActivityKind::Io, now);
                    // Sampled: the bytes moved after the previous sample read the counters (`at`),
                    // so `at` is a lower bound of the last word, and a child forked after the real
                    // last word was forked after it too (kept: a turn in flight). The counters grow
                    // when a read returns, after its bytes arrived; a fork in between would need
                    // another thread of the target forking during that read.
                    if stamped == 0 {
                        t.last_word = Some(at);
                    }
                }
            }
            if stamped != 0 {
                t.last_word = Some(stamped);
            }
            t.io = Some((now, bytes));
        }

        let ticks: u64 = family.iter().filter_map(|id| host.cpu_ticks(*id)).sum();
        if let Some((at, before)) = t.cpu {
            let dt = rate_window(now.saturating_sub(at), interval);
            let used = ticks.saturating_sub(before);
            let per_second = crate::events::ticks_per_second() as f64;
            t.evidence.cpu_rate = Some(used as f64 / per_second / dt);
            // Activity only if the CPU time surely used is above the threshold: the readings'
            // rounding alone must not count. Over a short interval it would: with a 3 s idle
            // timeout (750 ms samples) one tick is 1.3 % of a core, and a leaked CLI's idle
            // hum of 1-2 ticks per sample read as 2.7 % often enough that it was never idle
            // for four samples in a row on a busy host (the real-CLI e2e leak tests).
            let surely = used.saturating_sub(CPU_READING_SLACK_TICKS);
            if surely as f64 / per_second / dt >= rule.cpu_threshold {
                bump(t, ActivityKind::Cpu, now);
            }
        }
        t.cpu = Some((now, ticks));
        if let Some(p) = tree.get_id(t.id) {
            t.evidence.ppid = p.ppid;
        }
        t.evidence.turn = turn_in_flight(t, tree);
        t.next_sample = now + nanos(interval);
    }
}
