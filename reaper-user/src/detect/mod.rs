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
//! rule's threshold (target plus descendants), and descendants' execs and exits. All side
//! effects go through [`Host`], so the logic is tested without a kernel.
pub mod targets;
pub mod verdict;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use reaper_common::SockActivity;
use serde::{Deserialize, Serialize};

use self::{
    targets::Mismatch,
    verdict::{ActivityKind, Evidence, Nanos, Verdict},
};
use crate::{
    config::{Config, Mode, Rule},
    events::{Event, Identity},
    reap::{RateLimit, ReapOrder, ReapReport, Reason, Victim},
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
    fn watch(&mut self, pid: u32, target: u32);
    fn unwatch(&mut self, target: u32, pids: &[u32]);
}

/// Where activity evidence comes from, as resolved at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Socket bytes counted in the kernel (`sock:sock_{send,recv}_length`).
    Socket,
    /// `/proc/PID/io` rchar + wchar, sampled.
    ProcIo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Pending {
    None,
    /// An order is out; wait for its report.
    Reaping,
    /// Dry run: reported once; reported again only after new activity.
    WouldKillReported,
    /// A kill failed: retry after this.
    RetryAt(Nanos),
    /// Killed (or found gone): never ordered again; its exit event removes it.
    Done,
}

#[derive(Clone, Debug)]
struct Target {
    id: Identity,
    rule: usize,
    /// The parent it had when adopted; its exit makes the target an orphan.
    parent: u32,
    evidence: Evidence,
    cpu: Option<(Nanos, u64)>,
    io: Option<(Nanos, u64)>,
    sock_bytes: u64,
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
}

/// Why a process is or is not a target (`reaper explain PID`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub pid: u32,
    pub process: Option<Process>,
    pub rules: Vec<RuleCheck>,
    pub target: Option<TargetView>,
    /// Set when the process is watched as a target's descendant.
    pub descendant_of: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleCheck {
    pub rule: String,
    pub matches: bool,
    pub why_not: Option<String>,
}

pub struct Detector {
    rules: Vec<Rule>,
    mode: Mode,
    grace: Duration,
    source: Source,
    io_bytes_per_second: u64,
    targets: HashMap<u32, Target>,
    /// Descendant pid → the target pid it counts for.
    member_of: HashMap<u32, u32>,
    rate: RateLimit,
    rate_limited_until: Option<Instant>,
}

fn secs(ns: Nanos) -> f64 {
    ns as f64 / 1e9
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Detector {
    pub fn new(config: &Config, source: Source) -> Self {
        Self {
            rules: config.rules.clone(),
            mode: config.mode,
            grace: config.grace,
            source,
            io_bytes_per_second: config.io_bytes_per_second,
            targets: HashMap::new(),
            member_of: HashMap::new(),
            rate: RateLimit::new(config.max_kills_per_minute),
            rate_limited_until: None,
        }
    }

    /// Takes a new configuration (SIGHUP). Targets keep their evidence while their rule (by
    /// name) still exists and still matches; new matches are adopted, the rest dropped.
    pub fn reconfigure(&mut self, config: &Config, tree: &ProcessTree, now: Nanos, host: &mut impl Host) {
        let old_rules = std::mem::replace(&mut self.rules, config.rules.clone());
        let mode_changed = self.mode != config.mode;
        self.mode = config.mode;
        self.grace = config.grace;
        self.io_bytes_per_second = config.io_bytes_per_second;
        self.rate = RateLimit::new(config.max_kills_per_minute);
        self.rate_limited_until = None;
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
            Event::Fork { id, parent, .. } => {
                if let Some(target) = self.owner(parent.pid) {
                    self.member_of.insert(id.pid, target);
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
                    self.activity(target, *time_ns, ActivityKind::DescendantExit);
                }
                for t in self.targets.values_mut() {
                    if t.parent == id.pid && t.evidence.orphaned_since.is_none() {
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
        if let Some(t) = self.targets.get_mut(&target)
            && at > t.evidence.last_activity {
                t.evidence.last_activity = at;
                t.evidence.last_activity_kind = kind;
                if t.pending == Pending::WouldKillReported {
                    t.pending = Pending::None;
                }
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
                tracing::info!(pid, comm = %p.comm, "no longer matches any rule; not a target");
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
        host.watch(id.pid, id.pid);
        let descendants = descendants(tree, id.pid);
        for d in &descendants {
            host.watch(d.id.pid, id.pid);
            self.member_of.insert(d.id.pid, id.pid);
        }
        let rule_ref = &self.rules[rule];
        let mut evidence = Evidence {
            last_activity: now,
            ppid: p.ppid,
            ..Evidence::default()
        };
        // Adopted already under init: its parent died before reaper saw it.
        if p.ppid == 1 {
            evidence.orphaned_since = Some(now);
        }
        tracing::info!(
            pid = id.pid,
            start_time = id.start_ticks,
            ppid = p.ppid,
            rule = %rule_ref.name,
            idle_timeout = %humantime::format_duration(rule_ref.idle_timeout),
            argv = %p.argv,
            "watching a target"
        );
        let mut target = Target {
            id,
            rule,
            parent: p.ppid,
            evidence,
            cpu: None,
            io: None,
            sock_bytes: host.sock_activity(id.pid).map_or(0, |a| a.bytes),
            next_sample: now,
            pending: Pending::None,
        };
        sample(&mut target, rule_ref, tree, now, host, self.source, self.io_bytes_per_second);
        self.targets.insert(id.pid, target);
    }

    fn drop_target(&mut self, pid: u32, host: &mut impl Host) {
        if self.targets.remove(&pid).is_none() {
            return;
        }
        let members: Vec<u32> = self
            .member_of
            .iter()
            .filter(|(_, t)| **t == pid)
            .map(|(m, _)| *m)
            .collect();
        for m in &members {
            self.member_of.remove(m);
        }
        host.unwatch(pid, &members);
    }

    /// When the detector next needs to run: the earliest deadline or sample time.
    pub fn next_wakeup(&self) -> Option<Nanos> {
        self.targets
            .values()
            .filter(|t| !matches!(t.pending, Pending::Reaping | Pending::Done))
            .map(|t| {
                let rule = &self.rules[t.rule];
                let due = verdict::deadline(&t.evidence, rule.idle_timeout, rule.orphan_grace);
                let due = match t.pending {
                    Pending::RetryAt(at) => due.max(at),
                    Pending::WouldKillReported => Nanos::MAX,
                    _ => due,
                };
                due.min(t.next_sample)
            })
            .min()
    }

    /// Samples what is due and returns the targets to reap now.
    pub fn tick(
        &mut self,
        tree: &ProcessTree,
        now: Nanos,
        mono_now: Instant,
        host: &mut impl Host,
    ) -> Vec<ReapOrder> {
        let mut orders = Vec::new();
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            let Some(t) = self.targets.get_mut(&pid) else { continue };
            let rule = &self.rules[t.rule];
            if matches!(t.pending, Pending::Reaping | Pending::Done) {
                continue;
            }
            if now >= t.next_sample {
                sample(t, rule, tree, now, host, self.source, self.io_bytes_per_second);
            }
            let v = verdict::check(&t.evidence, now, rule.idle_timeout, rule.orphan_grace);
            let reason = match v {
                Verdict::Active { .. } => continue,
                Verdict::Idle { .. } => Reason::Idle,
                Verdict::Orphaned { .. } => Reason::Orphaned,
            };
            match t.pending {
                Pending::WouldKillReported => continue,
                Pending::RetryAt(at) if now < at => continue,
                _ => {}
            }
            if self.rate_limited_until.is_some_and(|until| mono_now < until) {
                continue;
            }
            if let Err(until) = self.rate.take(mono_now) {
                if self.rate_limited_until.is_none_or(|u| u < until) {
                    tracing::warn!(
                        pid,
                        rule = %rule.name,
                        retry_in_secs = until.saturating_duration_since(mono_now).as_secs_f64(),
                        "kill rate limit reached; waiting"
                    );
                }
                self.rate_limited_until = Some(until);
                continue;
            }
            let Some(p) = tree.get_id(t.id) else { continue };
            let deadline_ns = match v {
                Verdict::Orphaned { since } => since.saturating_add(nanos(rule.orphan_grace)),
                _ => t.evidence.last_activity.saturating_add(nanos(rule.idle_timeout)),
            };
            let parent = tree.get(p.ppid);
            orders.push(ReapOrder {
                target: Victim {
                    id: t.id,
                    comm: p.comm.clone(),
                },
                descendants: descendants(tree, pid)
                    .into_iter()
                    .map(|d| Victim {
                        id: d.id,
                        comm: d.comm.clone(),
                    })
                    .collect(),
                rule: rule.name.clone(),
                reason,
                idle_secs: secs(now.saturating_sub(t.evidence.last_activity)),
                deadline_ns,
                ppid: p.ppid,
                parent_comm: parent.map(|pp| pp.comm.clone()).unwrap_or_default(),
                argv: p.argv.to_string(),
                dry_run: self.mode == Mode::DryRun,
                grace: self.grace,
            });
            t.pending = Pending::Reaping;
        }
        orders
    }

    /// Takes the outcome of an order into account.
    pub fn on_report(&mut self, report: &ReapReport, now: Nanos) {
        use crate::reap::Outcome;
        let Some(t) = self.targets.get_mut(&report.target.pid).filter(|t| t.id == report.target) else {
            return;
        };
        t.pending = match report.outcome {
            Outcome::WouldKill => Pending::WouldKillReported,
            // Still alive after a failure: try again later, not in a loop.
            Outcome::Failed | Outcome::Refused => Pending::RetryAt(now + 60_000_000_000),
            // Gone, or the pid is someone else's now: nothing more to do until its exit event
            // (which may still be on its way) removes it.
            Outcome::Terminated | Outcome::Killed | Outcome::AlreadyGone | Outcome::IdentityMismatch => {
                Pending::Done
            }
        };
    }

    fn view(&self, t: &Target, tree: &ProcessTree, now: Nanos) -> TargetView {
        let rule = &self.rules[t.rule];
        TargetView {
            id: t.id,
            rule: rule.name.clone(),
            verdict: verdict::check(&t.evidence, now, rule.idle_timeout, rule.orphan_grace),
            evidence: t.evidence,
            idle_secs: secs(now.saturating_sub(t.evidence.last_activity)),
            descendants: descendants(tree, t.id.pid).len(),
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
        let rules = match &process {
            Some(p) => {
                let parent = tree.get(p.ppid);
                self.rules
                    .iter()
                    .map(|rule| {
                        let result: Result<(), Mismatch> = targets::check(rule, p, parent, || host.tty_nr(pid));
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
        Explanation {
            pid,
            target: self
                .targets
                .get(&pid)
                .filter(|t| process.as_ref().is_some_and(|p| p.id == t.id))
                .map(|t| self.view(t, tree, now)),
            descendant_of: self.member_of.get(&pid).copied(),
            process,
            rules,
        }
    }
}

/// Every live descendant of `pid`, nearest first.
fn descendants(tree: &ProcessTree, pid: u32) -> Vec<&Process> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(next) = queue.pop_front() {
        let Some(p) = tree.get(next) else { continue };
        for child in &p.children {
            if let Some(c) = tree.get(*child)
                && c.id.pid != pid && out.len() < 4096 {
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
    let family: Vec<Identity> = std::iter::once(t.id)
        .chain(descendants(tree, t.id.pid).into_iter().map(|d| d.id))
        .collect();
    let bump = |t: &mut Target, kind: ActivityKind, at: Nanos| {
        if at > t.evidence.last_activity {
            t.evidence.last_activity = at;
            t.evidence.last_activity_kind = kind;
            if t.pending == Pending::WouldKillReported {
                t.pending = Pending::None;
            }
        }
    };

    if source == Source::Socket {
        if let Some(a) = host.sock_activity(t.id.pid)
            && a.bytes > t.sock_bytes {
                t.sock_bytes = a.bytes;
                t.evidence.last_socket_byte = Some(a.last_ns);
                bump(t, ActivityKind::Socket, a.last_ns.min(now));
            }
    } else {
        let bytes: u64 = family.iter().filter_map(|id| host.io_bytes(*id)).sum();
        if let Some((at, before)) = t.io {
            let dt = secs(now.saturating_sub(at));
            if dt > 0.0 && bytes.saturating_sub(before) as f64 / dt > io_bytes_per_second as f64 {
                bump(t, ActivityKind::Io, now);
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
    let interval = (rule.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    t.next_sample = now + nanos(interval);
}

/// The real host: `/proc` and the kernel's maps.
pub struct LiveHost<'a> {
    pub probes: &'a mut crate::probes::Probes,
}

fn proc_process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

impl Host for LiveHost<'_> {
    fn tty_nr(&self, pid: u32) -> Option<i32> {
        proc_process(pid)?.stat().ok().map(|s| s.tty_nr)
    }

    fn cpu_ticks(&self, id: Identity) -> Option<u64> {
        let stat = proc_process(id.pid)?.stat().ok()?;
        (stat.starttime == id.start_ticks).then_some(stat.utime + stat.stime)
    }

    fn io_bytes(&self, id: Identity) -> Option<u64> {
        let p = proc_process(id.pid)?;
        if p.stat().ok()?.starttime != id.start_ticks {
            return None;
        }
        let io = p.io().ok()?;
        Some(io.rchar + io.wchar)
    }

    fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.probes.sock_activity(target)
    }

    fn watch(&mut self, pid: u32, target: u32) {
        // A failure is logged, counted and remembered: Probes::watch_failed(target).
        let _ = self.probes.watch(pid, target);
    }

    fn unwatch(&mut self, target: u32, pids: &[u32]) {
        self.probes.unwatch(target, pids.iter().copied());
    }
}

#[cfg(test)]
mod tests;
