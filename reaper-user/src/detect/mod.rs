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
pub mod targets;
pub mod verdict;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use reaper_common::SockActivity;
use serde::{Deserialize, Serialize};

use self::{
    targets::Mismatch,
    verdict::{ActivityKind, Evidence, Nanos, Verdict, Waiting},
};
use crate::{
    config::{CleanEnd, Config, Mode, Rule},
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
    /// What the process's fd 0 is (`/proc/PID/fd/0`: `socket:[…]`, `pipe:[…]`, a path).
    fn stdin(&self, pid: u32) -> Option<String>;
}

/// Where activity evidence comes from, as resolved at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Socket bytes counted in the kernel (`sock:sock_{send,recv}_length`).
    Socket,
    /// `/proc/PID/io` rchar + wchar, sampled.
    ProcIo,
}

impl Source {
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
    Idle,
    Orphaned,
}

impl Reason {
    pub const ALL: [Reason; 2] = [Self::Idle, Self::Orphaned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Orphaned => "orphaned",
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
}

/// A descendant of a target, counted for it since it was forked (or since adoption).
#[derive(Clone, Copy, Debug)]
struct Member {
    id: Identity,
    forked_ns: Nanos,
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
    /// Set when the process is watched as a target's descendant.
    pub descendant_of: Option<u32>,
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

/// At most `per_minute` kills in any 60 s: a wrong rule cannot wipe a host. Pure: `now` in.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    recent: VecDeque<Nanos>,
}

const MINUTE: Nanos = 60_000_000_000;

impl RateLimit {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            recent: VecDeque::new(),
        }
    }

    /// When a slot is free: `now` if one is, else when the oldest kill leaves the window.
    pub fn free_at(&mut self, now: Nanos) -> Nanos {
        while self.recent.front().is_some_and(|t| now.saturating_sub(*t) >= MINUTE) {
            self.recent.pop_front();
        }
        if self.recent.len() < self.per_minute as usize {
            now
        } else {
            self.recent[self.recent.len() - self.per_minute as usize] + MINUTE
        }
    }

    /// Takes a slot if one is free at `now`; otherwise says when the next one frees.
    pub fn take(&mut self, now: Nanos) -> Result<(), Nanos> {
        match self.free_at(now) {
            at if at <= now => {
                self.recent.push_back(now);
                Ok(())
            }
            at => Err(at),
        }
    }

    /// A new limit (SIGHUP) keeps the kills already made in the window.
    fn set_per_minute(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
    }
}

pub struct Detector {
    rules: Vec<Rule>,
    mode: Mode,
    eof_grace: Duration,
    grace: Duration,
    source: Source,
    io_bytes_per_second: u64,
    targets: HashMap<u32, Target>,
    /// Descendant pid → the target pid it counts for (an index into `Target::members`).
    member_of: HashMap<u32, u32>,
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
    pub fn new(config: &Config, source: Source) -> Self {
        Self {
            rules: config.rules.clone(),
            mode: config.mode,
            eof_grace: config.eof_grace,
            grace: config.grace,
            source,
            io_bytes_per_second: config.io_bytes_per_second,
            targets: HashMap::new(),
            member_of: HashMap::new(),
            rate: RateLimit::new(config.max_kills_per_minute),
        }
    }

    /// Takes a new configuration (SIGHUP). Targets keep their evidence while their rule (by
    /// name) still exists and still matches; new matches are adopted, the rest dropped. The
    /// kills already made this minute still count against the (new) rate limit.
    pub fn reconfigure(&mut self, config: &Config, tree: &ProcessTree, now: Nanos, host: &mut impl Host) {
        let old_rules = std::mem::replace(&mut self.rules, config.rules.clone());
        let mode_changed = self.mode != config.mode;
        self.mode = config.mode;
        self.eof_grace = config.eof_grace;
        self.grace = config.grace;
        self.io_bytes_per_second = config.io_bytes_per_second;
        self.rate.set_per_minute(config.max_kills_per_minute);
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
        let pids: Vec<u32> = tree
            .processes()
            .map(|p| p.id.pid)
            .filter(|pid| !self.member_of.contains_key(pid))
            .collect();
        for pid in pids {
            self.classify(tree, pid, now, host);
        }
    }

    pub fn source(&self) -> Source {
        self.source
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
    pub fn classify_new(&mut self, tree: &ProcessTree, renewed: &[u32], now: Nanos, host: &mut impl Host) {
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
            Event::Fork { id, parent, time_ns, .. } => {
                if let Some(target) = self.owner(parent.pid) {
                    // The kernel's fork program watches children of watched processes too;
                    // watching here also covers children forked before the target was adopted.
                    let watched = host.watch(id.pid, target);
                    self.member_of.insert(id.pid, target);
                    if let Some(t) = self.targets.get_mut(&target) {
                        t.evidence.watch_failed |= !watched;
                        t.members.insert(
                            id.pid,
                            Member {
                                id: *id,
                                forked_ns: *time_ns,
                            },
                        );
                        t.evidence.turn = turn_in_flight(t, tree);
                    }
                }
            }
            Event::Exec { id, time_ns, .. } => {
                if let Some(target) = self.member_of.get(&id.pid).copied() {
                    self.activity(target, *time_ns, ActivityKind::DescendantExec);
                } else {
                    self.classify(tree, id.pid, *time_ns, host);
                }
            }
            Event::Rename { id, time_ns, .. } => {
                if !self.member_of.contains_key(&id.pid) {
                    self.classify(tree, id.pid, *time_ns, host);
                }
            }
            Event::Exit { id, time_ns, .. } => {
                if self.targets.get(&id.pid).is_some_and(|t| t.id == *id) {
                    self.drop_target(id.pid, host);
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
                        tracing::info!(pid = t.id.pid, parent = id.pid, "target orphaned: its parent exited");
                    }
                }
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
            .position(|rule| targets::check(rule, p, parent, || host.tty_nr(pid)).is_ok());
        let current = self.targets.get(&pid).filter(|t| t.id == p.id).map(|t| t.rule);
        match (current, matched) {
            (Some(_), Some(_)) => {}
            (Some(_), None) => {
                tracing::info!(pid, comm = %crate::events::printable(&p.comm), "no longer matches any rule; not a target");
                self.drop_target(pid, host);
            }
            (None, Some(rule)) => self.adopt(tree, p.id, rule, now, host),
            (None, None) => {}
        }
    }

    fn adopt(&mut self, tree: &ProcessTree, id: Identity, rule: usize, now: Nanos, host: &mut impl Host) {
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
                Member {
                    id: d.id,
                    forked_ns: crate::clock::start_mono_ns(d.id.start_ticks),
                },
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
            argv = %p.argv,
            "watching a target"
        );
        if watch_failed {
            tracing::warn!(pid = id.pid, "the kernel's watch map is full: this target's activity is not fully seen, so it is never reaped as idle");
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
        };
        sample(&mut target, rule_ref, tree, now, host, self.source, self.io_bytes_per_second);
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
    /// before the rate limit lets a due target go.
    pub fn next_wakeup(&mut self, now: Nanos) -> Option<Nanos> {
        let free_at = self.rate.free_at(now);
        self.targets
            .values()
            .filter(|t| !matches!(t.pending, Pending::Reaping | Pending::Done))
            .map(|t| {
                let due = match t.pending {
                    Pending::RetryAt(at) => self.due_at(t).max(at),
                    Pending::WouldKillReported => Nanos::MAX,
                    _ => self.due_at(t),
                };
                let due = if due == Nanos::MAX { due } else { due.max(free_at) };
                due.min(t.next_sample)
            })
            .min()
    }

    /// Samples the targets whose sample time has come.
    pub fn sample_due(&mut self, tree: &ProcessTree, now: Nanos, host: &impl Host) {
        for t in self.targets.values_mut() {
            if matches!(t.pending, Pending::Reaping | Pending::Done) || now < t.next_sample {
                continue;
            }
            let rule = &self.rules[t.rule];
            sample(t, rule, tree, now, host, self.source, self.io_bytes_per_second);
        }
    }

    fn verdict(&self, t: &Target, now: Nanos) -> Verdict {
        let rule = &self.rules[t.rule];
        verdict::check(&t.evidence, now, rule.idle_timeout, rule.orphan_grace)
    }

    /// Whether some target is due now (then the owner brings the tree up to date and calls
    /// [`Detector::decide`]).
    pub fn any_due(&self, now: Nanos) -> bool {
        self.targets.values().any(|t| self.ready(t, now))
    }

    fn ready(&self, t: &Target, now: Nanos) -> bool {
        match t.pending {
            Pending::Reaping | Pending::Done | Pending::WouldKillReported => false,
            Pending::RetryAt(at) if now < at => false,
            _ => self.verdict(t, now).due(),
        }
    }

    /// The targets to end now, on a tree that has every event up to now applied. Each due
    /// target is sampled once more first: socket bytes or a tool started since its last
    /// sample keep it.
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
            sample(t, &self.rules[t.rule], tree, now, host, self.source, self.io_bytes_per_second);
        }
        due.retain(|pid| self.ready(&self.targets[pid], now));
        let mut decisions = Vec::new();
        for pid in due {
            let t = &self.targets[&pid];
            let Some(p) = tree.get_id(t.id) else { continue };
            let rule = &self.rules[t.rule];
            let (reason, deadline_ns) = match self.verdict(t, now) {
                Verdict::Orphaned { since } => (Reason::Orphaned, since.saturating_add(nanos(rule.orphan_grace))),
                _ => (
                    Reason::Idle,
                    t.evidence.last_activity.saturating_add(nanos(rule.idle_timeout)),
                ),
            };
            if let Err(until) = self.rate.take(now) {
                tracing::warn!(
                    pid,
                    rule = %rule.name,
                    retry_in_secs = secs(until.saturating_sub(now)),
                    "kill rate limit reached; waiting"
                );
                break;
            }
            let (descendants, other_uid): (Vec<&Process>, Vec<&Process>) = self.targets[&pid]
                .members
                .values()
                .filter_map(|m| tree.get_id(m.id))
                .partition(|d| d.uid == p.uid);
            let mut descendants: Vec<Victim> = descendants.into_iter().map(Victim::of).collect();
            // Parents before their children: a parent always starts first.
            descendants.sort_by_key(|v| (v.id.start_ticks, v.id.pid));
            decisions.push(Decision {
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
                parent_comm: tree.get(p.ppid).map(|pp| pp.comm.clone()).unwrap_or_default(),
                argv: p.argv.to_string(),
                dry_run: self.mode == Mode::DryRun,
            });
            self.targets.get_mut(&pid).expect("listed above").pending = Pending::Reaping;
        }
        decisions
    }

    /// Takes what became of a decision into account.
    pub fn settle(&mut self, target: Identity, settled: Settled) {
        let Some(t) = self.targets.get_mut(&target.pid).filter(|t| t.id == target) else {
            return;
        };
        t.pending = match settled {
            Settled::WouldKill => Pending::WouldKillReported,
            Settled::RetryAt(at) => Pending::RetryAt(at),
            // Gone, or the pid is someone else's now: nothing more to do until its exit event
            // (which may still be on its way) removes it.
            Settled::Gone => Pending::Done,
        };
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
        let mut views: Vec<_> = self.targets.values().map(|t| self.view(t, tree, now)).collect();
        views.sort_by_key(|v| v.id.pid);
        views
    }

    /// Why `pid` is or is not a target.
    pub fn explain(&self, tree: &ProcessTree, pid: u32, now: Nanos, host: &impl Host) -> Explanation {
        let process = tree.get(pid).cloned();
        let mut first_match = None;
        let rules = match &process {
            Some(p) => {
                let parent = tree.get(p.ppid);
                self.rules
                    .iter()
                    .map(|rule| {
                        let result: Result<(), Mismatch> = targets::check(rule, p, parent, || host.tty_nr(pid));
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
        let first_step = first_match.map(|clean_end| {
            let stdin = host.stdin(pid);
            let step = match clean_end {
                CleanEnd::CloseInput if stdin.as_deref().is_some_and(|s| s.starts_with("socket:")) => {
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
            descendant_of: self.member_of.get(&pid).copied(),
            process,
            rules,
        }
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

/// Reads a target's activity counters and moves its last activity forward if they moved.
fn sample(
    t: &mut Target,
    rule: &Rule,
    tree: &ProcessTree,
    now: Nanos,
    host: &impl Host,
    source: Source,
    io_bytes_per_second: u64,
) {
    let family: Vec<Identity> = std::iter::once(t.id).chain(t.members.values().map(|m| m.id)).collect();
    let interval = sample_interval(rule);

    if source == Source::Socket {
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
        let bytes: u64 = family.iter().filter_map(|id| host.io_bytes(*id)).sum();
        if let Some((at, before)) = t.io {
            let dt = secs(now.saturating_sub(at));
            if dt > 0.0 && bytes.saturating_sub(before) as f64 / dt > io_bytes_per_second as f64 {
                bump(t, ActivityKind::Io, now);
                // Sampled: the bytes moved some time in the last interval.
                t.last_word = Some(at.saturating_sub(nanos(interval)));
            }
        }
        t.io = Some((now, bytes));
    }

    let ticks: u64 = family.iter().filter_map(|id| host.cpu_ticks(*id)).sum();
    if let Some((at, before)) = t.cpu {
        let dt = secs(now.saturating_sub(at));
        if dt > 0.0 {
            let rate = ticks.saturating_sub(before) as f64 / crate::events::ticks_per_second() as f64 / dt;
            t.evidence.cpu_rate = Some(rate);
            if rate >= rule.cpu_threshold {
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
