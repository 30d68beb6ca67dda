//! Who is a leaked `claude`, and who is idle: targets ([`targets`]), their activity, and the
//! verdict ([`verdict`]) that decides when a target is reaped.
//!
//! The detector lives with the process tree (same task, same events). It is deadline-driven:
//! each target has a deadline (last activity + idle timeout, or orphaned + grace) and a next
//! sample time; the owner sleeps until the earliest of them. There is no whole-system polling:
//! only targets are sampled, and only their own `/proc` entries are read.
//!
//! Activity of a target is: socket bytes (counted in the kernel for the target and its
//! descendants, or `/proc/PID/io` on kernels without the socket tracepoints), CPU above the
//! rule's threshold (target plus descendants), and descendants' execs and exits.
//!
//! A **turn in flight** is never idle: a target with a live child forked after the target
//! last received bytes from the network (its model's last word) waits on that child — a tool
//! the model asked for — however silent both are. Children started before that (stdio MCP
//! servers, started at session start, before the first request; background tasks, after which
//! the turn went on talking to the model) do not hold a target.
//!
//! The detector decides; it signals nothing. It returns [`Decision`]s and hears back what
//! became of them as [`Settled`]. All side effects go through [`Host`], so the logic is tested
//! without a kernel.
//!
//! The files follow the data: `classify.rs` (which processes are targets, and whose
//! descendants are whose, kept up to date from events), `sample.rs` (reading a target's
//! activity counters into its evidence), `decide.rs` (due targets, leftovers and runaways
//! become [`Decision`]s, within the kill rate limit of `rate.rs`), `report.rs` (what `reaper
//! tree`, `sessions` and `explain` show).
mod classify;
mod decide;
mod rate;
mod report;
mod sample;
pub mod session;
pub mod targets;
pub mod verdict;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use reaper_common::SockActivity;
use serde::{Deserialize, Serialize};

pub(crate) use self::{decide::Settled, rate::RateLimit};
pub use self::{
    decide::{Decision, Reason, Victim},
    report::{Explanation, RuleCheck, TargetView},
};
use self::{
    sample::Sampling,
    session::{Attribution, Connections, Kind},
    verdict::{Evidence, Nanos},
};
use crate::{
    config::{Config, Leftovers, MemoryPressure, Mode},
    events::Identity,
    tree::{Image, ProcessTree},
};

/// What the detector needs from the host: `/proc` reads and the kernel's activity maps.
pub(crate) trait Host {
    /// `CLOCK_MONOTONIC` now: the time of an event the kernel did not stamp.
    fn now_ns(&self) -> Nanos;
    /// `tty_nr` from `/proc/PID/stat` (0: no controlling terminal).
    fn tty_nr(&self, pid: u32) -> Option<i32>;
    /// The image from `/proc/PID/exe` and `/proc/PID/cmdline` (its first `ARGV_LEN` bytes,
    /// and whether there was more), if `id` is still alive: read from that very process, never
    /// from a later holder of its pid. For a process whose exec the kernel sent without its
    /// image ([`Argv::unknown`](crate::events::Argv::unknown)).
    fn image(&self, id: Identity) -> Option<Image>;
    /// utime + stime in clock ticks, if `id` is still alive.
    fn cpu_ticks(&self, id: Identity) -> Option<u64>;
    /// Bytes read and written (rchar + wchar), if `id` is still alive.
    fn io_bytes(&self, id: Identity) -> Option<u64>;
    /// Socket activity counted in the kernel for `target`.
    fn sock_activity(&self, target: u32) -> Option<SockActivity>;
    /// Counts `pid`'s activity for `target` in the kernel. False if the kernel refused (its
    /// map is full): then the target's activity is not fully seen.
    fn watch(&mut self, pid: u32, target: u32) -> bool;
    fn unwatch(&mut self, target: u32, pids: &[u32]);
    /// A watched member of a live target exited (the kernel already forgot it): drops what
    /// user space keeps for it in the kernel.
    fn member_exited(&mut self, pid: u32);
    /// Whether the kernel could not watch some process of `target`'s family (its map was full
    /// when one was forked): its activity is not fully seen.
    fn watch_incomplete(&self, target: u32) -> bool;
    /// The process names the kernel watches from their exec on (before user space decides).
    fn watch_names(&mut self, names: &[&str]);
    /// How the process's stdin and stdout are connected, and whether it leads its session.
    fn connections(&self, pid: u32) -> Option<Connections>;
    /// Resident memory, if `id` is still alive.
    fn rss_bytes(&self, id: Identity) -> Option<u64>;
    /// The text of `/proc/PID/cgroup`.
    fn cgroup(&self, pid: u32) -> Option<String>;
}

/// Where activity evidence comes from, as resolved at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivityMeter {
    /// Socket bytes counted in the kernel (`sock:sock_{send,recv}_length`).
    Socket,
    /// `/proc/PID/io` rchar + wchar, sampled.
    ProcIo,
}

impl ActivityMeter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::ProcIo => "proc-io",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Pending {
    None,
    /// A decision is out; wait for it to settle.
    Reaping,
    /// Dry run: reported once; reported again only after new activity.
    WouldKillReported,
    /// A kill failed: retry after this.
    RetryAt(Nanos),
    /// Killed (or found gone): never ordered again; its exit event removes it.
    Done,
    /// A leftover reported and left alone (detached on purpose, another uid, or its rule reaps
    /// none).
    LeftAlone,
}

/// A descendant of a target, counted for it since it was forked (or since adoption).
#[derive(Clone, Copy, Debug)]
struct Member {
    id: Identity,
    forked_ns: Nanos,
    /// Once it is a leftover: what became of it.
    pending: Pending,
    /// Once it is a leftover: what it is.
    kind: Option<Kind>,
}

impl Member {
    fn new(id: Identity, forked_ns: Nanos) -> Self {
        Self {
            id,
            forked_ns,
            pending: Pending::None,
            kind: None,
        }
    }
}

/// A session whose target has exited. Its members still alive `leftover_grace` later are
/// leftovers.
#[derive(Clone, Debug)]
struct Ended {
    target: Identity,
    comm: String,
    rule: String,
    policy: Leftovers,
    uid: u32,
    parent: Identity,
    parent_comm: String,
    at: Nanos,
    members: BTreeMap<u32, Member>,
    attribution: Attribution,
}

/// An agent CLI re-parented after its parent exited, watched for burning CPU.
#[derive(Clone, Copy, Debug)]
struct Runaway {
    id: Identity,
    cpu: Option<(Nanos, u64)>,
    /// Since when it has burnt more than `runaway_cpu`, sample after sample.
    burning_since: Option<Nanos>,
    next_sample: Nanos,
    pending: Pending,
}

#[derive(Clone, Debug)]
struct Target {
    id: Identity,
    rule: usize,
    /// The parent it had when adopted; its exit makes the target an orphan.
    parent: Identity,
    evidence: Evidence,
    /// Its live descendants: the one list of them (the kernel's watch map mirrors it).
    members: BTreeMap<u32, Member>,
    cpu: Option<(Nanos, u64)>,
    io: Option<(Nanos, u64)>,
    sock_bytes: u64,
    /// The model's last word: the last network byte the target itself received (socket
    /// source), or the last sample that saw its I/O move (`/proc/PID/io` fallback).
    last_word: Option<Nanos>,
    next_sample: Nanos,
    pending: Pending,
    /// Where it runs (its unit, container, pod), read at adoption.
    attribution: Attribution,
}

pub struct Detector {
    sampling: Sampling,
    mode: Mode,
    eof_grace: Duration,
    grace: Duration,
    targets: HashMap<u32, Target>,
    /// Descendant pid → the target pid it counts for (an index into `Target::members`).
    member_of: HashMap<u32, u32>,
    /// Sessions whose target has exited, by the target's identity.
    ended: HashMap<Identity, Ended>,
    /// Member pid of an ended session → that session (an index into `Ended::members`).
    left_of: HashMap<u32, Identity>,
    leftover_grace: Duration,
    runaways: HashMap<u32, Runaway>,
    runaway_cpu: f64,
    runaway_for: Duration,
    memory_pressure: MemoryPressure,
    rate: RateLimit,
}

fn secs(ns: Nanos) -> f64 {
    ns as f64 / 1e9
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Detector {
    pub fn new(config: &Config, meter: ActivityMeter) -> Self {
        Self {
            sampling: Sampling {
                rules: config.rules.clone(),
                meter,
                io_bytes_per_second: config.io_bytes_per_second,
            },
            mode: config.mode,
            eof_grace: config.eof_grace,
            grace: config.grace,
            targets: HashMap::new(),
            member_of: HashMap::new(),
            ended: HashMap::new(),
            left_of: HashMap::new(),
            leftover_grace: config.leftover_grace,
            runaways: HashMap::new(),
            runaway_cpu: config.runaway_cpu,
            runaway_for: config.runaway_for,
            memory_pressure: config.memory_pressure.clone(),
            rate: RateLimit::new(config.max_kills_per_minute),
        }
    }

    /// Tells the kernel which process names to watch from their exec on: the rules' `comm`s.
    pub(crate) fn publish_names(&self, host: &mut impl Host) {
        let names: Vec<&str> = self
            .sampling
            .rules
            .iter()
            .flat_map(|r| r.comm.iter().map(String::as_str))
            .collect();
        host.watch_names(&names);
    }

    /// Kills the rate limit has held back so far.
    pub(crate) fn rate_limit_deferrals(&self) -> u64 {
        self.rate.deferred()
    }

    /// The memory pressure settings in force.
    pub(crate) fn memory_pressure(&self) -> &MemoryPressure {
        &self.memory_pressure
    }

    /// Takes a new configuration (SIGHUP). Targets keep their evidence while their rule (by
    /// name) still exists and still matches; new matches are adopted, the rest dropped. The
    /// kills already made this minute still count against the (new) rate limit.
    pub(crate) fn reconfigure(
        &mut self,
        config: &Config,
        tree: &mut ProcessTree,
        now: Nanos,
        host: &mut impl Host,
    ) {
        let old_rules = std::mem::replace(&mut self.sampling.rules, config.rules.clone());
        let mode_changed = self.mode != config.mode;
        self.mode = config.mode;
        self.eof_grace = config.eof_grace;
        self.grace = config.grace;
        self.sampling.io_bytes_per_second = config.io_bytes_per_second;
        self.leftover_grace = config.leftover_grace;
        self.runaway_cpu = config.runaway_cpu;
        self.runaway_for = config.runaway_for;
        self.memory_pressure = config.memory_pressure.clone();
        self.rate.set_per_minute(config.max_kills_per_minute);
        self.publish_names(host);
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            let name = &old_rules[self.targets[&pid].rule].name;
            match self.sampling.rules.iter().position(|r| &r.name == name) {
                Some(index) => {
                    let t = self.targets.get_mut(&pid).expect("listed above");
                    t.rule = index;
                    if mode_changed && t.pending == Pending::WouldKillReported {
                        t.pending = Pending::None;
                    }
                }
                None => self.drop_target(pid, host),
            }
        }
        // Sessions whose rule is gone: their leftovers are reported from now on, no longer
        // reaped (a reap of one already under way is cancelled before its first signal).
        for e in self.ended.values_mut() {
            if !self.sampling.rules.iter().any(|r| r.name == e.rule) {
                e.policy = Leftovers::None;
            }
        }
        let pids: Vec<u32> = tree
            .processes()
            .map(|p| p.id.pid)
            .filter(|pid| !self.member_of.contains_key(pid) && !self.left_of.contains_key(pid))
            .collect();
        for pid in pids {
            self.classify(tree, pid, Some(now), host);
        }
    }

    pub(crate) fn meter(&self) -> ActivityMeter {
        self.sampling.meter
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }
}

#[cfg(test)]
mod tests;
