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
pub mod session;
pub mod targets;
pub mod verdict;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use reaper_common::SockActivity;
use serde::{Deserialize, Serialize};

use self::{
    session::{Attribution, Connections, Kind, KindCounts, Pressure, SessionView},
    targets::Mismatch,
    verdict::{ActivityKind, Evidence, Nanos, Verdict, Waiting},
};
use crate::{
    config::{CleanEnd, Config, Leftovers, MemoryPressure, Mode, Rule},
    events::{Event, Identity},
    tree::{Process, ProcessTree},
};

/// What the detector needs from the host: `/proc` reads and the kernel's activity maps.
pub trait Host {
    /// `tty_nr` from `/proc/PID/stat` (0: no controlling terminal).
    fn tty_nr(&self, pid: u32) -> Option<i32>;
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

/// Why a target is reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A target idle past its timeout.
    Idle,
    /// A target whose parent exited, past its grace.
    Orphaned,
    /// A descendant still alive `leftover_grace` after its session's target exited.
    Leftover,
    /// An agent CLI that lost its terminal and burns CPU.
    Runaway,
    /// An idle target or a leftover, ended early because memory is short.
    MemoryPressure,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Self::Idle,
        Self::Orphaned,
        Self::Leftover,
        Self::Runaway,
        Self::MemoryPressure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Orphaned => "orphaned",
            Self::Leftover => "leftover",
            Self::Runaway => "runaway",
            Self::MemoryPressure => "memory_pressure",
        }
    }
}

/// A process a decision names, as the tree knew it when deciding. The reaper re-checks all of
/// it on the live process before signalling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Victim {
    pub id: Identity,
    pub comm: String,
    pub uid: u32,
}

impl Victim {
    fn of(p: &Process) -> Self {
        Self {
            id: p.id,
            comm: p.comm.clone(),
            uid: p.uid,
        }
    }
}

/// The decision to end a target and its descendants, with what the log line says about it.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub target: Victim,
    /// Live descendants of the target's uid, parents before their children.
    pub descendants: Vec<Victim>,
    /// Descendants left out because they run as another uid.
    pub other_uid: usize,
    pub rule: String,
    pub reason: Reason,
    /// The first step of the ladder the rule asks for.
    pub clean_end: CleanEnd,
    pub eof_grace: Duration,
    pub grace: Duration,
    pub idle_secs: f64,
    /// When the target became due (idle or orphan deadline).
    pub deadline_ns: Nanos,
    pub ppid: u32,
    pub parent_comm: String,
    pub argv: String,
    pub dry_run: bool,
    /// For a leftover: what it is.
    pub kind: Option<Kind>,
    /// What else the log line should say (the memory reading that triggered it, …).
    pub note: String,
    /// The target's systemd unit, container and pod.
    pub attribution: Attribution,
}

/// What became of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Dry run: reported; reported again only after new activity.
    WouldKill,
    /// Gone (or the pid is someone else's now): never decided on again.
    Gone,
    /// Still there after a failure: try again after this.
    RetryAt(Nanos),
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

/// Sessions by state and leftovers by kind, for the gauges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionCounts {
    pub states: Vec<(&'static str, i64)>,
    pub leftovers: Vec<(Kind, i64)>,
}

/// Characters of argv a log line shows.
const ARGV_SHOWN: usize = 512;

/// Sessions kept once their target and every leftover are gone (for `reaper sessions`).
const ENDED_KEPT: usize = 64;

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

/// A target as shown by `reaper tree` and `reaper explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetView {
    pub id: Identity,
    pub rule: String,
    pub verdict: Verdict,
    pub evidence: Evidence,
    pub idle_secs: f64,
    pub descendants: usize,
    /// The comm of the child a turn in flight waits on.
    #[serde(default)]
    pub waiting_on_comm: Option<String>,
    /// For how long the turn has waited on it, seconds.
    #[serde(default)]
    pub waiting_secs: Option<f64>,
}

/// Why `pid` is or is not a target (`reaper explain PID`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub pid: u32,
    pub process: Option<Process>,
    pub rules: Vec<RuleCheck>,
    pub target: Option<TargetView>,
    /// How the matching rule would end it first, and why.
    #[serde(default)]
    pub first_step: Option<FirstStep>,
    /// The session it belongs to, if any, and whether it is a leftover.
    #[serde(default)]
    pub session: Option<SessionOf>,
    /// Where it runs: its systemd unit, container, pod (`/proc/PID/cgroup`).
    #[serde(default)]
    pub attribution: Option<Attribution>,
    /// Set when the process is watched as a target's descendant.
    pub descendant_of: Option<u32>,
}

/// Which session a process belongs to (by lineage), and what reaper makes of it there.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionOf {
    pub target: Identity,
    /// Whether the session's target has exited.
    pub ended: bool,
    pub kind: Option<Kind>,
    /// Why it is, or is not (yet), a leftover that gets reaped.
    pub leftover: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleCheck {
    pub rule: String,
    pub matches: bool,
    pub why_not: Option<String>,
}

/// The first step of the kill ladder for a process, as far as `/proc` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FirstStep {
    pub clean_end: CleanEnd,
    /// What fd 0 is (`socket:[…]`, `pipe:[…]`, …).
    pub stdin: Option<String>,
    /// `close input`, `SIGINT` or `SIGTERM`.
    pub step: String,
}

/// At most `per_minute` processes signalled in any 60 s: a wrong rule cannot wipe a host. Every
/// process a reap signals counts, the target and each descendant that goes with it: a target
/// with two children takes three slots. A reap that would signal more than `per_minute` waits
/// for a minute with no kill at all and then goes alone (else it could never go). Pure: `now`
/// in.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    /// One entry per process signalled, oldest first.
    recent: VecDeque<Nanos>,
    /// Kills held back so far because the limit was reached.
    deferred: u64,
    /// A reap held back waits until then: nothing smaller jumps the queue meanwhile, and the
    /// detector sleeps until then instead of asking again and again.
    waiting_until: Nanos,
}

const MINUTE: Nanos = 60_000_000_000;

impl RateLimit {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            recent: VecDeque::new(),
            deferred: 0,
            waiting_until: 0,
        }
    }

    /// When a slot is free (for a reap of one process, or the one held back): `now` if one
    /// is, else when enough kills leave the window.
    pub fn free_at(&mut self, now: Nanos) -> Nanos {
        self.free_at_for(now, 1)
    }

    /// When `n` slots are free at once (all of them once the window is empty, for `n` over
    /// the limit).
    fn free_at_for(&mut self, now: Nanos, n: usize) -> Nanos {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        let limit = self.per_minute as usize;
        let n = n.clamp(1, limit);
        let len = self.recent.len();
        let at = if len + n <= limit {
            now
        } else {
            self.recent[len + n - limit - 1] + MINUTE
        };
        at.max(self.waiting_until)
    }

    /// Takes `n` slots (a reap signalling `n` processes) if they are free at `now`; otherwise
    /// says when they will be.
    pub fn take(&mut self, now: Nanos, n: usize) -> Result<(), Nanos> {
        match self.free_at_for(now, n) {
            at if at <= now => {
                // Over the limit, the window is full for a minute either way.
                let counted = n.clamp(1, self.per_minute as usize);
                self.recent.extend(std::iter::repeat_n(now, counted));
                self.waiting_until = 0;
                Ok(())
            }
            at => {
                self.deferred += 1;
                self.waiting_until = at;
                Err(at)
            }
        }
    }

    /// Kills held back by the limit so far.
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    /// A new limit (SIGHUP) keeps the kills already made in the window.
    fn set_per_minute(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        self.waiting_until = 0;
    }
}

pub struct Detector {
    rules: Vec<Rule>,
    mode: Mode,
    eof_grace: Duration,
    grace: Duration,
    meter: ActivityMeter,
    io_bytes_per_second: u64,
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

/// How often a rule's targets are sampled.
fn sample_interval(rule: &Rule) -> Duration {
    (rule.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10))
}

impl Detector {
    pub fn new(config: &Config, meter: ActivityMeter) -> Self {
        Self {
            rules: config.rules.clone(),
            mode: config.mode,
            eof_grace: config.eof_grace,
            grace: config.grace,
            meter,
            io_bytes_per_second: config.io_bytes_per_second,
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
    pub fn publish_names(&self, host: &mut impl Host) {
        let names: Vec<&str> = self
            .rules
            .iter()
            .flat_map(|r| r.comm.iter().map(String::as_str))
            .collect();
        host.watch_names(&names);
    }

    /// Kills the rate limit has held back so far.
    pub fn rate_limit_deferrals(&self) -> u64 {
        self.rate.deferred()
    }

    /// The memory pressure settings in force.
    pub fn memory_pressure(&self) -> &MemoryPressure {
        &self.memory_pressure
    }

    /// Takes a new configuration (SIGHUP). Targets keep their evidence while their rule (by
    /// name) still exists and still matches; new matches are adopted, the rest dropped. The
    /// kills already made this minute still count against the (new) rate limit.
    pub fn reconfigure(
        &mut self,
        config: &Config,
        tree: &ProcessTree,
        now: Nanos,
        host: &mut impl Host,
    ) {
        let old_rules = std::mem::replace(&mut self.rules, config.rules.clone());
        let mode_changed = self.mode != config.mode;
        self.mode = config.mode;
        self.eof_grace = config.eof_grace;
        self.grace = config.grace;
        self.io_bytes_per_second = config.io_bytes_per_second;
        self.leftover_grace = config.leftover_grace;
        self.runaway_cpu = config.runaway_cpu;
        self.runaway_for = config.runaway_for;
        self.memory_pressure = config.memory_pressure.clone();
        self.rate.set_per_minute(config.max_kills_per_minute);
        self.publish_names(host);
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            let name = &old_rules[self.targets[&pid].rule].name;
            match self.rules.iter().position(|r| &r.name == name) {
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
            if !self.rules.iter().any(|r| r.name == e.rule) {
                e.policy = Leftovers::None;
            }
        }
        let pids: Vec<u32> = tree
            .processes()
            .map(|p| p.id.pid)
            .filter(|pid| !self.member_of.contains_key(pid) && !self.left_of.contains_key(pid))
            .collect();
        for pid in pids {
            self.classify(tree, pid, now, host);
        }
    }

    pub fn meter(&self) -> ActivityMeter {
        self.meter
    }

    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// Classifies every process (start-up, after a restart). Idle clocks start now: an
    /// adopted process's earlier inactivity cannot be proven.
    pub fn adopt_all(&mut self, tree: &ProcessTree, now: Nanos, host: &mut impl Host) {
        let pids: Vec<u32> = tree.processes().map(|p| p.id.pid).collect();
        for pid in pids {
            self.classify(tree, pid, now, host);
        }
    }

    /// Re-checks what a reconcile changed: `renewed` pids (added, filled or refreshed from
    /// `/proc`), and targets that vanished without an exit event.
    pub fn classify_new(
        &mut self,
        tree: &ProcessTree,
        renewed: &[u32],
        now: Nanos,
        host: &mut impl Host,
    ) {
        let unknown: Vec<u32> = renewed
            .iter()
            .copied()
            .filter(|pid| !self.member_of.contains_key(pid))
            .collect();
        for pid in unknown {
            self.classify(tree, pid, now, host);
        }
        // Targets that vanished without an exit event.
        let gone: Vec<u32> = self
            .targets
            .values()
            .filter(|t| tree.get_id(t.id).is_none())
            .map(|t| t.id.pid)
            .collect();
        for pid in gone {
            self.drop_target(pid, host);
        }
    }

    /// Updates after the tree applied `event`.
    pub fn on_event(&mut self, tree: &ProcessTree, event: &Event, host: &mut impl Host) {
        match event {
            Event::Fork {
                id,
                parent,
                time_ns,
                ..
            } => {
                if let Some(session) = self.left_of.get(&parent.pid).copied() {
                    // A leftover's child belongs to the same (ended) session.
                    self.left_of.insert(id.pid, session);
                    if let Some(e) = self.ended.get_mut(&session) {
                        e.members.insert(id.pid, Member::new(*id, *time_ns));
                    }
                } else if let Some(target) = self.owner(parent.pid) {
                    // The kernel's fork program watches children of watched processes too;
                    // watching here also covers children forked before the target was adopted.
                    let watched = host.watch(id.pid, target);
                    self.member_of.insert(id.pid, target);
                    if let Some(t) = self.targets.get_mut(&target) {
                        t.evidence.watch_failed |= !watched;
                        t.members.insert(id.pid, Member::new(*id, *time_ns));
                        t.evidence.turn = turn_in_flight(t, tree);
                    }
                }
            }
            Event::Exec { id, time_ns, .. } => {
                if let Some(target) = self.member_of.get(&id.pid).copied() {
                    self.activity(target, *time_ns, ActivityKind::DescendantExec);
                } else if !self.left_of.contains_key(&id.pid) {
                    self.classify(tree, id.pid, *time_ns, host);
                }
            }
            Event::Rename { id, time_ns, .. } => {
                if !self.member_of.contains_key(&id.pid) {
                    self.classify(tree, id.pid, *time_ns, host);
                }
            }
            Event::Exit { id, time_ns, .. } => {
                self.runaways.remove(&id.pid);
                if self.targets.get(&id.pid).is_some_and(|t| t.id == *id) {
                    self.end_target(id.pid, *time_ns, tree, host);
                } else if let Some(session) = self.left_of.remove(&id.pid) {
                    if let Some(e) = self.ended.get_mut(&session) {
                        e.members.remove(&id.pid);
                    }
                } else if let Some(target) = self.member_of.remove(&id.pid) {
                    if let Some(t) = self.targets.get_mut(&target) {
                        t.members.remove(&id.pid);
                        t.evidence.turn = turn_in_flight(t, tree);
                    }
                    self.activity(target, *time_ns, ActivityKind::DescendantExit);
                }
                for t in self.targets.values_mut() {
                    if t.parent == *id && t.evidence.orphaned_since.is_none() {
                        t.evidence.orphaned_since = Some(*time_ns);
                        tracing::info!(
                            pid = t.id.pid,
                            parent = id.pid,
                            "target orphaned: its parent exited"
                        );
                    }
                }
                self.watch_orphaned_clis(tree, *id, *time_ns);
            }
        }
    }

    /// The children `gone` left behind that are agent CLIs (by a rule's name) but not targets
    /// (interactive ones): watched for burning CPU once they lost their terminal.
    fn watch_orphaned_clis(&mut self, tree: &ProcessTree, gone: Identity, now: Nanos) {
        let Some(exited) = tree.exited(gone) else {
            return;
        };
        for pid in &exited.children {
            let Some(p) = tree.get(*pid) else { continue };
            if self.targets.contains_key(pid)
                || self.member_of.contains_key(pid)
                || !self.rules.iter().any(|r| targets::name_matches(r, p))
            {
                continue;
            }
            self.runaways.insert(
                *pid,
                Runaway {
                    id: p.id,
                    cpu: None,
                    burning_since: None,
                    next_sample: now,
                    pending: Pending::None,
                },
            );
        }
    }

    /// The target exited: its session ends, its live descendants become leftovers-to-be.
    fn end_target(&mut self, pid: u32, at: Nanos, tree: &ProcessTree, host: &mut impl Host) {
        let Some(t) = self.targets.remove(&pid) else {
            return;
        };
        let members: Vec<u32> = t.members.keys().copied().collect();
        for m in &members {
            self.member_of.remove(m);
            self.left_of.insert(*m, t.id);
        }
        host.unwatch(pid, &members);
        let comm_of = |id: Identity| {
            tree.get_id(id)
                .or_else(|| tree.exited(id))
                .map(|p| p.comm.clone())
                .unwrap_or_default()
        };
        let rule = &self.rules[t.rule];
        if !members.is_empty() {
            tracing::info!(
                pid,
                descendants = members.len(),
                leftover_grace = %humantime::format_duration(self.leftover_grace),
                "target exited; its descendants still alive after the grace are leftovers"
            );
        }
        self.ended.insert(
            t.id,
            Ended {
                target: t.id,
                comm: comm_of(t.id),
                rule: rule.name.clone(),
                policy: rule.leftovers,
                uid: tree.exited(t.id).map_or(0, |p| p.uid),
                parent: t.parent,
                parent_comm: comm_of(t.parent),
                at,
                members: t.members,
                attribution: t.attribution,
            },
        );
        // Keep the newest few sessions with nothing left, for `reaper sessions`.
        let mut empty: Vec<(Nanos, Identity)> = self
            .ended
            .values()
            .filter(|e| e.members.is_empty())
            .map(|e| (e.at, e.target))
            .collect();
        if empty.len() > ENDED_KEPT {
            empty.sort_unstable();
            for (_, id) in &empty[..empty.len() - ENDED_KEPT] {
                self.ended.remove(id);
            }
        }
    }

    /// The target pid `pid` counts for, if any.
    fn owner(&self, pid: u32) -> Option<u32> {
        if self.targets.contains_key(&pid) {
            Some(pid)
        } else {
            self.member_of.get(&pid).copied()
        }
    }

    fn activity(&mut self, target: u32, at: Nanos, kind: ActivityKind) {
        if let Some(t) = self.targets.get_mut(&target) {
            bump(t, kind, at);
        }
    }

    /// (Re)decides whether `pid` is a target.
    fn classify(&mut self, tree: &ProcessTree, pid: u32, now: Nanos, host: &mut impl Host) {
        let Some(p) = tree.get(pid) else { return };
        if p.placeholder {
            return;
        }
        let parent = tree.get(p.ppid);
        let matched = self
            .rules
            .iter()
            // The name first: a mismatch's explanation (`Mismatch::Name`) copies the names, and
            // nearly every exec on a host is one.
            .position(|rule| {
                targets::name_matches(rule, p)
                    && targets::matches(rule, p, parent, || host.tty_nr(pid)).is_ok()
            });
        let current = self
            .targets
            .get(&pid)
            .filter(|t| t.id == p.id)
            .map(|t| t.rule);
        match (current, matched) {
            (Some(_), Some(_)) => {}
            (Some(_), None) => {
                tracing::info!(pid, comm = %crate::events::quoted(&p.comm), "no longer matches any rule; not a target");
                self.drop_target(pid, host);
            }
            (None, Some(rule)) => self.adopt(tree, p.id, rule, now, host),
            // Watched by its name from its exec on, but not a target after all.
            (None, None) if self.rules.iter().any(|r| targets::name_matches(r, p)) => {
                host.unwatch(pid, &[])
            }
            (None, None) => {}
        }
    }

    fn adopt(
        &mut self,
        tree: &ProcessTree,
        id: Identity,
        rule: usize,
        now: Nanos,
        host: &mut impl Host,
    ) {
        if self.targets.contains_key(&id.pid) {
            self.drop_target(id.pid, host);
        }
        let Some(p) = tree.get_id(id) else { return };
        let mut watch_failed = !host.watch(id.pid, id.pid);
        let mut members = BTreeMap::new();
        for d in descendants(tree, id.pid) {
            watch_failed |= !host.watch(d.id.pid, id.pid);
            self.member_of.insert(d.id.pid, id.pid);
            members.insert(
                d.id.pid,
                Member::new(d.id, crate::clock::start_mono_ns(d.id.start_ticks)),
            );
        }
        let rule_ref = &self.rules[rule];
        // A target found already under init or a subreaper is not an orphan: orphaned means
        // its parent was seen to exit. It is reaped when idle, like any other.
        let evidence = Evidence {
            last_activity: now,
            ppid: p.ppid,
            watch_failed,
            ..Evidence::default()
        };
        let parent = tree.get(p.ppid).map_or(
            Identity {
                pid: p.ppid,
                start_ticks: 0,
            },
            |pp| pp.id,
        );
        tracing::info!(
            pid = id.pid,
            start_time = id.start_ticks,
            ppid = p.ppid,
            rule = %rule_ref.name,
            idle_timeout = %humantime::format_duration(rule_ref.idle_timeout),
            argv = %crate::events::quoted(&p.argv.to_string()),
            "watching a target"
        );
        if watch_failed {
            tracing::warn!(
                pid = id.pid,
                "the kernel's watch map is full: this target's activity is not fully seen, so it is never reaped as idle"
            );
        }
        let mut target = Target {
            id,
            rule,
            parent,
            evidence,
            members,
            cpu: None,
            io: None,
            sock_bytes: host.sock_activity(id.pid).map_or(0, |a| a.bytes),
            last_word: None,
            next_sample: now,
            pending: Pending::None,
            attribution: host
                .cgroup(id.pid)
                .map(|c| Attribution::from_cgroup(&c))
                .unwrap_or_default(),
        };
        sample(
            &mut target,
            rule_ref,
            tree,
            now,
            host,
            self.meter,
            self.io_bytes_per_second,
        );
        self.targets.insert(id.pid, target);
    }

    fn drop_target(&mut self, pid: u32, host: &mut impl Host) {
        let Some(t) = self.targets.remove(&pid) else {
            return;
        };
        let members: Vec<u32> = t.members.keys().copied().collect();
        for m in &members {
            self.member_of.remove(m);
        }
        host.unwatch(pid, &members);
    }

    /// When a target becomes due, if nothing changes.
    fn due_at(&self, t: &Target) -> Nanos {
        let rule = &self.rules[t.rule];
        verdict::deadline(&t.evidence, rule.idle_timeout, rule.orphan_grace)
    }

    /// When the detector next needs to run: the earliest deadline or sample time, but not
    /// before the rate limit lets a due process go.
    pub fn next_wakeup(&mut self, now: Nanos) -> Option<Nanos> {
        let free_at = self.rate.free_at(now);
        let limited = |due: Nanos| {
            if due == Nanos::MAX {
                due
            } else {
                due.max(free_at)
            }
        };
        let targets = self
            .targets
            .values()
            .filter(|t| !matches!(t.pending, Pending::Reaping | Pending::Done))
            .map(|t| {
                let due = match t.pending {
                    Pending::RetryAt(at) => self.due_at(t).max(at),
                    Pending::WouldKillReported => Nanos::MAX,
                    _ => self.due_at(t),
                };
                limited(due).min(t.next_sample)
            });
        let grace = nanos(self.leftover_grace);
        let leftovers = self.ended.values().flat_map(|e| {
            let due = e.at.saturating_add(grace);
            e.members.values().filter_map(move |m| match m.pending {
                Pending::None => Some(due),
                Pending::RetryAt(at) => Some(due.max(at)),
                _ => None,
            })
        });
        let runaway_for = nanos(self.runaway_for);
        let runaways = self
            .runaways
            .values()
            .filter(|r| r.pending == Pending::None)
            .map(|r| {
                let due = r
                    .burning_since
                    .map_or(Nanos::MAX, |s| s.saturating_add(runaway_for));
                r.next_sample.min(due)
            });
        targets
            .chain(leftovers.map(limited))
            .chain(runaways.map(limited))
            .min()
    }

    /// Samples the targets (and watched runaway candidates) whose sample time has come.
    pub fn sample_due(&mut self, tree: &ProcessTree, now: Nanos, host: &impl Host) {
        for t in self.targets.values_mut() {
            if matches!(t.pending, Pending::Reaping | Pending::Done) || now < t.next_sample {
                continue;
            }
            let rule = &self.rules[t.rule];
            sample(
                t,
                rule,
                tree,
                now,
                host,
                self.meter,
                self.io_bytes_per_second,
            );
        }
        let interval =
            (self.runaway_for / 8).clamp(Duration::from_millis(250), Duration::from_secs(15));
        let threshold = self.runaway_cpu;
        self.runaways.retain(|pid, r| {
            if r.pending != Pending::None || now < r.next_sample {
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

    fn verdict(&self, t: &Target, now: Nanos) -> Verdict {
        let rule = &self.rules[t.rule];
        verdict::judge(&t.evidence, now, rule.idle_timeout, rule.orphan_grace)
    }

    /// Whether something is due now (then the owner brings the tree up to date and calls
    /// [`Detector::decide`]).
    pub fn any_due(&self, now: Nanos) -> bool {
        self.targets.values().any(|t| self.ready(t, now))
            || self
                .ended
                .values()
                .any(|e| self.leftovers_due(e, now).next().is_some())
            || self.runaways.values().any(|r| self.runaway_due(r, now))
    }

    fn ready(&self, t: &Target, now: Nanos) -> bool {
        match t.pending {
            Pending::Reaping | Pending::Done | Pending::WouldKillReported | Pending::LeftAlone => {
                false
            }
            Pending::RetryAt(at) if now < at => false,
            _ => self.verdict(t, now).due(),
        }
    }

    /// The members of an ended session that are leftovers to look at now.
    fn leftovers_due<'a>(&self, e: &'a Ended, now: Nanos) -> impl Iterator<Item = &'a Member> + 'a {
        let due = now >= e.at.saturating_add(nanos(self.leftover_grace));
        e.members.values().filter(move |m| {
            due && match m.pending {
                Pending::None => true,
                Pending::RetryAt(at) => now >= at,
                _ => false,
            }
        })
    }

    fn runaway_due(&self, r: &Runaway, now: Nanos) -> bool {
        r.pending == Pending::None
            && r.burning_since
                .is_some_and(|since| now.saturating_sub(since) >= nanos(self.runaway_for))
    }

    /// What is due now, on a tree that has every event up to now applied: idle and orphaned
    /// targets, leftovers, runaways. Each due target is sampled once more first: socket bytes
    /// or a tool started since its last sample keep it.
    pub fn decide(&mut self, tree: &ProcessTree, now: Nanos, host: &impl Host) -> Vec<Decision> {
        let mut due: Vec<u32> = self
            .targets
            .values()
            .filter(|t| self.ready(t, now))
            .map(|t| t.id.pid)
            .collect();
        due.sort_unstable();
        for pid in &due {
            let t = self.targets.get_mut(pid).expect("listed above");
            sample(
                t,
                &self.rules[t.rule],
                tree,
                now,
                host,
                self.meter,
                self.io_bytes_per_second,
            );
        }
        due.retain(|pid| self.ready(&self.targets[pid], now));
        let mut decisions = Vec::new();
        for pid in due {
            let t = &self.targets[&pid];
            let Some(p) = tree.get_id(t.id) else { continue };
            let rule = &self.rules[t.rule];
            let (reason, deadline_ns) = match self.verdict(t, now) {
                Verdict::Orphaned { since } => (
                    Reason::Orphaned,
                    since.saturating_add(nanos(rule.orphan_grace)),
                ),
                _ => (
                    Reason::Idle,
                    t.evidence
                        .last_activity
                        .saturating_add(nanos(rule.idle_timeout)),
                ),
            };
            let decision = self.target_decision(t, p, tree, host, reason, deadline_ns, now);
            if !take_slot(&mut self.rate, now, &decision) {
                return decisions;
            }
            decisions.push(decision);
            self.targets.get_mut(&pid).expect("listed above").pending = Pending::Reaping;
        }
        self.decide_leftovers(tree, now, host, &mut decisions);
        self.decide_runaways(tree, now, host, &mut decisions);
        decisions
    }

    /// The decision to end target `t` (live process `p`). Its descendants go with it when they
    /// run as its uid and its rule would reap them as leftovers: a dev server the user asked
    /// for (detached on purpose) is left alone, and reported as a leftover once `t` is gone.
    #[expect(clippy::too_many_arguments, reason = "the facts of one decision")]
    fn target_decision(
        &self,
        t: &Target,
        p: &Process,
        tree: &ProcessTree,
        host: &impl Host,
        reason: Reason,
        deadline_ns: Nanos,
        now: Nanos,
    ) -> Decision {
        let rule = &self.rules[t.rule];
        let (descendants, other_uid): (Vec<_>, Vec<_>) = t
            .members
            .values()
            .filter_map(|m| {
                Some((
                    tree.get_id(m.id)?,
                    host.connections(m.id.pid).unwrap_or_default(),
                ))
            })
            .filter(|(_, c)| session::reapable(rule.leftovers, Kind::of(c)).is_ok())
            .partition(|(d, c)| c.uid.unwrap_or(d.uid) == p.uid);
        let mut descendants: Vec<Victim> = descendants
            .into_iter()
            .map(|(d, _)| Victim::of(d))
            .collect();
        // Parents before their children: a parent always starts first.
        descendants.sort_by_key(|v| (v.id.start_ticks, v.id.pid));
        Decision {
            target: Victim::of(p),
            descendants,
            other_uid: other_uid.len(),
            rule: rule.name.clone(),
            reason,
            clean_end: rule.clean_end,
            eof_grace: self.eof_grace,
            grace: self.grace,
            idle_secs: secs(now.saturating_sub(t.evidence.last_activity)),
            deadline_ns,
            ppid: p.ppid,
            parent_comm: tree
                .get(p.ppid)
                .map(|pp| pp.comm.clone())
                .unwrap_or_default(),
            argv: p.argv.redacted(ARGV_SHOWN),
            dry_run: self.mode == Mode::DryRun,
            kind: None,
            note: String::new(),
            attribution: host
                .cgroup(p.id.pid)
                .map(|c| Attribution::from_cgroup(&c))
                .unwrap_or_default(),
        }
    }

    /// A decision to end one leftover of `e` (SIGTERM first: the agent that could close its
    /// input is gone).
    #[expect(clippy::too_many_arguments, reason = "the facts of one decision")]
    fn leftover_decision(
        &self,
        e: &Ended,
        p: &Process,
        host: &impl Host,
        kind: Kind,
        reason: Reason,
        deadline_ns: Nanos,
        now: Nanos,
    ) -> Decision {
        Decision {
            target: Victim::of(p),
            descendants: Vec::new(),
            other_uid: 0,
            rule: e.rule.clone(),
            reason,
            clean_end: CleanEnd::None,
            eof_grace: self.eof_grace,
            grace: self.grace,
            idle_secs: secs(now.saturating_sub(e.at)),
            deadline_ns,
            ppid: p.ppid,
            parent_comm: tree_comm(p.ppid, e),
            argv: p.argv.redacted(ARGV_SHOWN),
            dry_run: self.mode == Mode::DryRun,
            kind: Some(kind),
            attribution: host
                .cgroup(p.id.pid)
                .map(|c| Attribution::from_cgroup(&c))
                .unwrap_or_default(),
            note: format!(
                "leftover of session {} ({}), which ended {:.0}s ago",
                e.target,
                crate::events::quoted(&e.comm),
                secs(now.saturating_sub(e.at))
            ),
        }
    }

    /// Leftovers past their grace: the connected ones (per the rule) become decisions, the
    /// rest are reported once and left alone.
    fn decide_leftovers(
        &mut self,
        tree: &ProcessTree,
        now: Nanos,
        host: &impl Host,
        decisions: &mut Vec<Decision>,
    ) {
        let mut sessions: Vec<Identity> = self
            .ended
            .values()
            .filter(|e| self.leftovers_due(e, now).next().is_some())
            .map(|e| e.target)
            .collect();
        sessions.sort_unstable_by_key(|id| (id.start_ticks, id.pid));
        let grace = nanos(self.leftover_grace);
        let deadline_of = move |e: &Ended| e.at.saturating_add(grace);
        for session in sessions {
            let e = &self.ended[&session];
            let due: Vec<Member> = self.leftovers_due(e, now).copied().collect();
            // Children before their parents: the deepest leftovers first.
            let mut due = due;
            due.sort_by_key(|m| std::cmp::Reverse((m.id.start_ticks, m.id.pid)));
            for m in due {
                let e = &self.ended[&session];
                let Some(p) = tree.get_id(m.id) else { continue };
                let conns = host.connections(m.id.pid).unwrap_or_default();
                let kind = Kind::of(&conns);
                let verdict = if conns.uid.unwrap_or(p.uid) != e.uid {
                    Err("it runs as another uid than its agent: never signalled")
                } else {
                    session::reapable(e.policy, kind)
                };
                let (pending, decision) = match verdict {
                    Err(why) => {
                        tracing::info!(
                            pid = m.id.pid,
                            comm = %crate::events::quoted(&p.comm),
                            kind = kind.as_str(),
                            session = %e.target,
                            why,
                            "leftover left alone"
                        );
                        (Pending::LeftAlone, None)
                    }
                    Ok(()) => {
                        let decision = self.leftover_decision(
                            e,
                            p,
                            host,
                            kind,
                            Reason::Leftover,
                            deadline_of(e),
                            now,
                        );
                        if !take_slot(&mut self.rate, now, &decision) {
                            return;
                        }
                        (Pending::Reaping, Some(decision))
                    }
                };
                let member = self
                    .ended
                    .get_mut(&session)
                    .and_then(|e| e.members.get_mut(&m.id.pid))
                    .expect("listed above");
                member.pending = pending;
                member.kind = Some(kind);
                decisions.extend(decision);
            }
        }
    }

    fn decide_runaways(
        &mut self,
        tree: &ProcessTree,
        now: Nanos,
        host: &impl Host,
        decisions: &mut Vec<Decision>,
    ) {
        let mut due: Vec<u32> = self
            .runaways
            .values()
            .filter(|r| self.runaway_due(r, now))
            .map(|r| r.id.pid)
            .collect();
        due.sort_unstable();
        for pid in due {
            let r = self.runaways[&pid];
            let Some(p) = tree.get_id(r.id) else { continue };
            let mut descendants: Vec<Victim> = descendants(tree, pid)
                .into_iter()
                .filter(|d| d.uid == p.uid)
                .map(Victim::of)
                .collect();
            descendants.sort_by_key(|v| (v.id.start_ticks, v.id.pid));
            let since = r.burning_since.unwrap_or(now);
            let decision = Decision {
                target: Victim::of(p),
                descendants,
                other_uid: 0,
                rule: "runaway".into(),
                reason: Reason::Runaway,
                clean_end: CleanEnd::Interrupt,
                eof_grace: self.eof_grace,
                grace: self.grace,
                idle_secs: 0.0,
                deadline_ns: since.saturating_add(nanos(self.runaway_for)),
                ppid: p.ppid,
                parent_comm: tree
                    .get(p.ppid)
                    .map(|pp| pp.comm.clone())
                    .unwrap_or_default(),
                argv: p.argv.redacted(ARGV_SHOWN),
                dry_run: self.mode == Mode::DryRun,
                kind: None,
                attribution: host
                    .cgroup(pid)
                    .map(|c| Attribution::from_cgroup(&c))
                    .unwrap_or_default(),
                note: format!(
                    "lost its terminal, re-parented, above {:.0}% of a core for {:.0}s",
                    self.runaway_cpu * 100.0,
                    secs(now.saturating_sub(since))
                ),
            };
            if !take_slot(&mut self.rate, now, &decision) {
                return;
            }
            decisions.push(decision);
            self.runaways.get_mut(&pid).expect("listed above").pending = Pending::Reaping;
        }
    }

    /// Memory is short: the one idle target or leftover with the largest RSS, ended at once
    /// without waiting for its timeout. Never an active target or a turn in flight.
    pub fn pressure_decision(
        &mut self,
        tree: &ProcessTree,
        now: Nanos,
        host: &impl Host,
        reading: &Pressure,
    ) -> Option<Decision> {
        // Fresh evidence first: samples are up to 10 s apart, "quiet" here is finer.
        for t in self
            .targets
            .values_mut()
            .filter(|t| t.pending == Pending::None)
        {
            sample(
                t,
                &self.rules[t.rule],
                tree,
                now,
                host,
                self.meter,
                self.io_bytes_per_second,
            );
        }
        let min_idle = nanos(self.memory_pressure.min_idle);
        let rss = |ids: &mut dyn Iterator<Item = Identity>| -> u64 {
            ids.filter_map(|id| host.rss_bytes(id)).sum()
        };
        enum Pick {
            Target(u32),
            Leftover(Identity, u32, Kind),
        }
        let mut best: Option<(u64, Pick)> = None;
        for t in self.targets.values() {
            let quiet = now.saturating_sub(t.evidence.last_activity) >= min_idle;
            if t.pending != Pending::None
                || !quiet
                || t.evidence.watch_failed
                || matches!(self.verdict(t, now), Verdict::TurnInFlight { .. })
            {
                continue;
            }
            let bytes = rss(&mut std::iter::once(t.id).chain(t.members.values().map(|m| m.id)));
            if best.as_ref().is_none_or(|(b, _)| bytes > *b) {
                best = Some((bytes, Pick::Target(t.id.pid)));
            }
        }
        for e in self.ended.values() {
            for m in e.members.values().filter(|m| m.pending == Pending::None) {
                let Some(p) = tree.get_id(m.id) else { continue };
                let conns = host.connections(m.id.pid).unwrap_or_default();
                let kind = Kind::of(&conns);
                if conns.uid.unwrap_or(p.uid) != e.uid || session::reapable(e.policy, kind).is_err()
                {
                    continue;
                }
                let bytes = rss(&mut std::iter::once(m.id));
                if best.as_ref().is_none_or(|(b, _)| bytes > *b) {
                    best = Some((bytes, Pick::Leftover(e.target, m.id.pid, kind)));
                }
            }
        }
        let (bytes, pick) = best?;
        let note = format!(
            "memory is short ({reading}); largest idle target or leftover: {bytes} bytes RSS"
        );
        match pick {
            Pick::Target(pid) => {
                let t = &self.targets[&pid];
                let p = tree.get_id(t.id)?;
                let mut d =
                    self.target_decision(t, p, tree, host, Reason::MemoryPressure, now, now);
                if !take_slot(&mut self.rate, now, &d) {
                    return None;
                }
                d.note = note;
                self.targets.get_mut(&pid).expect("found above").pending = Pending::Reaping;
                Some(d)
            }
            Pick::Leftover(session, pid, kind) => {
                let e = &self.ended[&session];
                let p = tree.get_id(e.members[&pid].id)?;
                let mut d =
                    self.leftover_decision(e, p, host, kind, Reason::MemoryPressure, now, now);
                if !take_slot(&mut self.rate, now, &d) {
                    return None;
                }
                d.note = format!("{note}; {}", d.note);
                let m = self.ended.get_mut(&session)?.members.get_mut(&pid)?;
                m.pending = Pending::Reaping;
                m.kind = Some(kind);
                Some(d)
            }
        }
    }

    /// Takes what became of a decision into account.
    pub fn settle(&mut self, target: Identity, settled: Settled) {
        let pending = match settled {
            Settled::WouldKill => Pending::WouldKillReported,
            Settled::RetryAt(at) => Pending::RetryAt(at),
            // Gone, or the pid is someone else's now: nothing more to do until its exit event
            // (which may still be on its way) removes it.
            Settled::Gone => Pending::Done,
        };
        if let Some(t) = self.targets.get_mut(&target.pid).filter(|t| t.id == target) {
            t.pending = pending;
        } else if let Some(m) = self
            .left_of
            .get(&target.pid)
            .and_then(|session| self.ended.get_mut(session))
            .and_then(|e| e.members.get_mut(&target.pid))
            .filter(|m| m.id == target)
        {
            m.pending = pending;
        } else if let Some(r) = self
            .runaways
            .get_mut(&target.pid)
            .filter(|r| r.id == target)
        {
            r.pending = pending;
        }
    }

    /// Every session: live targets and ended ones with what is left of them.
    pub fn sessions(&self, tree: &ProcessTree, now: Nanos, host: &impl Host) -> Vec<SessionView> {
        let kinds = |members: &mut dyn Iterator<Item = &Member>| -> (KindCounts, u64) {
            let mut counts = KindCounts::default();
            let mut rss = 0;
            for m in members.filter(|m| tree.get_id(m.id).is_some()) {
                counts.add(m.kind.unwrap_or_else(|| {
                    host.connections(m.id.pid)
                        .map_or(Kind::Other, |c| Kind::of(&c))
                }));
                rss += host.rss_bytes(m.id).unwrap_or(0);
            }
            (counts, rss)
        };
        let mut out = Vec::new();
        for t in self.targets.values() {
            let Some(p) = tree.get_id(t.id) else { continue };
            let (descendants, rss) = kinds(&mut t.members.values());
            out.push(SessionView {
                target: t.id,
                comm: p.comm.clone(),
                rule: self.rules[t.rule].name.clone(),
                state: self.session_state(t, now).into(),
                uid: p.uid,
                parent: p.ppid,
                parent_comm: tree
                    .get(p.ppid)
                    .map(|pp| pp.comm.clone())
                    .unwrap_or_default(),
                quiet_secs: secs(now.saturating_sub(t.evidence.last_activity)),
                descendants,
                leftovers: 0,
                rss_bytes: rss + host.rss_bytes(t.id).unwrap_or(0),
                attribution: t.attribution.clone(),
            });
        }
        for e in self.ended.values() {
            let (descendants, rss) = kinds(&mut e.members.values());
            out.push(SessionView {
                target: e.target,
                comm: e.comm.clone(),
                rule: e.rule.clone(),
                state: "ended".into(),
                uid: e.uid,
                parent: e.parent.pid,
                parent_comm: e.parent_comm.clone(),
                quiet_secs: secs(now.saturating_sub(e.at)),
                descendants,
                leftovers: descendants.total(),
                rss_bytes: rss,
                attribution: e.attribution.clone(),
            });
        }
        out.sort_by_key(|v| (v.target.start_ticks, v.target.pid));
        out
    }

    fn session_state(&self, t: &Target, now: Nanos) -> &'static str {
        match self.verdict(t, now) {
            Verdict::TurnInFlight { .. } => "turn_in_flight",
            Verdict::Idle { .. } | Verdict::Orphaned { .. } => "leaked",
            Verdict::Active { .. }
                if now.saturating_sub(t.evidence.last_activity) >= 60_000_000_000 =>
            {
                "idle"
            }
            Verdict::Active { .. } => "active",
        }
    }

    /// Sessions by state, and leftovers (members of ended sessions past their grace) by kind,
    /// for the gauges. Reads nothing from the host.
    pub fn session_counts(&self, now: Nanos) -> SessionCounts {
        let mut states: Vec<(&'static str, i64)> =
            ["active", "idle", "turn_in_flight", "leaked", "ended"]
                .iter()
                .map(|s| (*s, 0))
                .collect();
        let mut bump_state = |state: &str| {
            if let Some((_, n)) = states.iter_mut().find(|(s, _)| *s == state) {
                *n += 1;
            }
        };
        for t in self.targets.values() {
            bump_state(self.session_state(t, now));
        }
        let mut kinds: Vec<(Kind, i64)> = Kind::ALL.iter().map(|k| (*k, 0)).collect();
        for e in self.ended.values() {
            bump_state("ended");
            for m in e.members.values() {
                if let Some(kind) = m.kind
                    && let Some((_, n)) = kinds.iter_mut().find(|(k, _)| *k == kind)
                {
                    *n += 1;
                }
            }
        }
        SessionCounts {
            states,
            leftovers: kinds,
        }
    }

    fn view(&self, t: &Target, tree: &ProcessTree, now: Nanos) -> TargetView {
        TargetView {
            id: t.id,
            rule: self.rules[t.rule].name.clone(),
            verdict: self.verdict(t, now),
            evidence: t.evidence,
            idle_secs: secs(now.saturating_sub(t.evidence.last_activity)),
            descendants: t.members.len(),
            waiting_on_comm: t
                .evidence
                .turn
                .and_then(|w| tree.get(w.pid))
                .map(|p| p.comm.clone()),
            waiting_secs: t.evidence.turn.map(|w| secs(now.saturating_sub(w.since))),
        }
    }

    pub fn views(&self, tree: &ProcessTree, now: Nanos) -> Vec<TargetView> {
        let mut views: Vec<_> = self
            .targets
            .values()
            .map(|t| self.view(t, tree, now))
            .collect();
        views.sort_by_key(|v| v.id.pid);
        views
    }

    /// Why `pid` is or is not a target.
    pub fn explain(
        &self,
        tree: &ProcessTree,
        pid: u32,
        now: Nanos,
        host: &impl Host,
    ) -> Explanation {
        let process = tree.get(pid).cloned();
        let mut first_match = None;
        let rules = match &process {
            Some(p) => {
                let parent = tree.get(p.ppid);
                self.rules
                    .iter()
                    .map(|rule| {
                        let result: Result<(), Mismatch> =
                            targets::matches(rule, p, parent, || host.tty_nr(pid));
                        if result.is_ok() && first_match.is_none() {
                            first_match = Some(rule.clean_end);
                        }
                        RuleCheck {
                            rule: rule.name.clone(),
                            matches: result.is_ok(),
                            why_not: result.err().map(|m| m.to_string()),
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let is_target = self
            .targets
            .get(&pid)
            .is_some_and(|t| process.as_ref().is_some_and(|p| p.id == t.id));
        let first_step = first_match.filter(|_| is_target).map(|clean_end| {
            let stdin = host.connections(pid).and_then(|c| c.stdin);
            let step = match clean_end {
                CleanEnd::CloseInput
                    if stdin.as_deref().is_some_and(|s| s.starts_with("socket:")) =>
                {
                    "close input (shutdown of its stdin socket, as the SDK's close() does)"
                }
                CleanEnd::CloseInput | CleanEnd::Interrupt => "SIGINT (the CLI's own clean exit)",
                CleanEnd::None => "SIGTERM",
            };
            FirstStep {
                clean_end,
                stdin,
                step: step.into(),
            }
        });
        Explanation {
            pid,
            target: self
                .targets
                .get(&pid)
                .filter(|t| process.as_ref().is_some_and(|p| p.id == t.id))
                .map(|t| self.view(t, tree, now)),
            first_step,
            session: self.session_of(tree, pid, now, host),
            attribution: host.cgroup(pid).map(|c| Attribution::from_cgroup(&c)),
            descendant_of: self.member_of.get(&pid).copied(),
            process,
            rules,
        }
    }
}

/// Takes a kill slot for every process `d` would signal (its target and descendants), or says
/// that the rate limit holds it back.
fn take_slot(rate: &mut RateLimit, now: Nanos, d: &Decision) -> bool {
    let processes = 1 + d.descendants.len();
    match rate.take(now, processes) {
        Ok(()) => true,
        Err(until) => {
            tracing::warn!(
                pid = d.target.id.pid,
                rule = d.rule,
                processes,
                retry_in_secs = secs(until.saturating_sub(now)),
                "kill rate limit reached; waiting"
            );
            false
        }
    }
}

/// The comm of a leftover's parent: its agent's, if the parent is the session's parent.
fn tree_comm(ppid: u32, e: &Ended) -> String {
    if ppid == e.target.pid {
        e.comm.clone()
    } else {
        String::new()
    }
}

impl Detector {
    /// The session `pid` belongs to by lineage, and why it is or is not a leftover reaped.
    fn session_of(
        &self,
        tree: &ProcessTree,
        pid: u32,
        now: Nanos,
        host: &impl Host,
    ) -> Option<SessionOf> {
        let p = tree.get(pid)?;
        let conns = host.connections(pid);
        let kind = || conns.as_ref().map(Kind::of);
        if let Some(target) = self.member_of.get(&pid).and_then(|t| self.targets.get(t)) {
            return Some(SessionOf {
                target: target.id,
                ended: false,
                kind: kind(),
                leftover: "not a leftover: its session's target is alive".into(),
            });
        }
        let e = self.ended.get(self.left_of.get(&pid)?)?;
        let m = e.members.get(&pid).filter(|m| m.id == p.id)?;
        let kind = m.kind.or_else(kind);
        let grace_left =
            e.at.saturating_add(nanos(self.leftover_grace))
                .saturating_sub(now);
        let verdict = if conns.as_ref().and_then(|c| c.uid).unwrap_or(p.uid) != e.uid {
            Err("it runs as another uid than its agent: never signalled")
        } else {
            session::reapable(e.policy, kind.unwrap_or(Kind::Other))
        };
        let leftover = match (grace_left, verdict) {
            (0, Ok(())) => "a leftover: its target exited and it is still here after leftover_grace; reaped (SIGTERM, grace, SIGKILL)".to_owned(),
            (left, Ok(())) => format!("its target exited; a leftover, reaped in {:.0}s unless it exits", secs(left)),
            (_, Err(why)) => format!("its target exited; left alone: {why}"),
        };
        Some(SessionOf {
            target: e.target,
            ended: true,
            kind,
            leftover,
        })
    }
}

/// Moves a target's last activity forward to `at`, if that is later.
fn bump(t: &mut Target, kind: ActivityKind, at: Nanos) {
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
fn turn_in_flight(t: &Target, tree: &ProcessTree) -> Option<Waiting> {
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

/// Every live descendant of `pid`, nearest first (at adoption; afterwards fork events keep
/// each target's members).
fn descendants(tree: &ProcessTree, pid: u32) -> Vec<&Process> {
    let mut out = Vec::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(next) = queue.pop_front() {
        let Some(p) = tree.get(next) else { continue };
        for child in &p.children {
            if let Some(c) = tree.get(*child)
                && c.id.pid != pid
                && out.len() < 4096
            {
                out.push(c);
                queue.push_back(c.id.pid);
            }
        }
    }
    out
}

/// How many ticks more than a process used the difference of two of its `/proc/PID/stat`
/// CPU readings (utime + stime) can show: each of the two fields is printed truncated to whole
/// ticks (`nsec_to_clock_t()` in do_task_stat(),
/// <https://github.com/torvalds/linux/blob/v6.18/fs/proc/array.c>), while their sum is the
/// exact run time (cputime_adjust() scales them to `sum_exec_runtime`,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/sched/cputime.c>), so a reading is up
/// to two ticks short of it, and a later one may be exact.
const CPU_READING_SLACK_TICKS: u64 = 2;

/// Reads a target's activity counters and moves its last activity forward if they moved.
fn sample(
    t: &mut Target,
    rule: &Rule,
    tree: &ProcessTree,
    now: Nanos,
    host: &impl Host,
    meter: ActivityMeter,
    io_bytes_per_second: u64,
) {
    let family: Vec<Identity> = std::iter::once(t.id)
        .chain(t.members.values().map(|m| m.id))
        .collect();
    let interval = sample_interval(rule);

    t.evidence.watch_failed |= host.watch_incomplete(t.id.pid);
    if meter == ActivityMeter::Socket {
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
            let dt = secs(now.saturating_sub(at));
            if dt > 0.0 && bytes.saturating_sub(before) as f64 / dt > io_bytes_per_second as f64 {
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
        let dt = secs(now.saturating_sub(at));
        if dt > 0.0 {
            let used = ticks.saturating_sub(before);
            let per_second = crate::events::ticks_per_second() as f64;
            t.evidence.cpu_rate = Some(used as f64 / per_second / dt);
            // Activity only if the CPU time surely used is above the threshold: the readings'
            // rounding alone must not count. Over a short interval it would: with a 3 s idle
            // timeout (750 ms samples) one tick is 1.3 % of a core, and a leaked CLI's idle hum
            // of 1-2 ticks per sample read as 2.7 % often enough that it was never idle for
            // four samples in a row on a busy host (the real-CLI e2e leak tests).
            let surely = used.saturating_sub(CPU_READING_SLACK_TICKS);
            if surely as f64 / per_second / dt >= rule.cpu_threshold {
                bump(t, ActivityKind::Cpu, now);
            }
        }
    }
    t.cpu = Some((now, ticks));
    if let Some(p) = tree.get_id(t.id) {
        t.evidence.ppid = p.ppid;
    }
    t.evidence.turn = turn_in_flight(t, tree);
    t.next_sample = now + nanos(interval);
}

#[cfg(test)]
mod tests;
