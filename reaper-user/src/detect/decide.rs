//! Due targets, leftovers and runaways become [`Decision`]s (within the kill rate limit); what
//! became of each comes back as [`Settled`].
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    Detector, Ended, Host, Member, Pending, Runaway, Target,
    classify::descendants,
    nanos,
    rate::RateLimit,
    secs,
    session::{self, Attribution, Kind, Pressure},
    verdict::{self, Nanos, Verdict},
};
use crate::{
    config::{CleanEnd, Mode},
    events::Identity,
    tree::{Process, ProcessTree},
};

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
    pub(crate) const ALL: [Reason; 5] = [
        Self::Idle,
        Self::Orphaned,
        Self::Leftover,
        Self::Runaway,
        Self::MemoryPressure,
    ];

    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) enum Settled {
    /// Dry run: reported; reported again only after new activity.
    WouldKill,
    /// Gone (or the pid is someone else's now): never decided on again.
    Gone,
    /// Still there after a failure: try again after this.
    RetryAt(Nanos),
}

/// Characters of argv a log line shows.
const ARGV_SHOWN: usize = 512;

impl Detector {
    /// When a target becomes due, if nothing changes.
    fn due_at(&self, t: &Target) -> Nanos {
        let rule = &self.sampling.rules[t.rule];
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

    pub(super) fn verdict(&self, t: &Target, now: Nanos) -> Verdict {
        let rule = &self.sampling.rules[t.rule];
        verdict::judge(&t.evidence, now, rule.idle_timeout, rule.orphan_grace)
    }

    /// Whether something is due now (then the owner brings the tree up to date and calls
    /// [`Detector::decide`]).
    pub(crate) fn any_due(&self, now: Nanos) -> bool {
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
    pub(crate) fn decide(
        &mut self,
        tree: &ProcessTree,
        now: Nanos,
        host: &impl Host,
    ) -> Vec<Decision> {
        let mut due: Vec<u32> = self
            .targets
            .values()
            .filter(|t| self.ready(t, now))
            .map(|t| t.id.pid)
            .collect();
        due.sort_unstable();
        for pid in &due {
            let t = self.targets.get_mut(pid).expect("listed above");
            self.sampling.sample(t, tree, now, host);
        }
        due.retain(|pid| self.ready(&self.targets[pid], now));
        let mut decisions = Vec::new();
        for pid in due {
            let t = &self.targets[&pid];
            let Some(p) = tree.get_id(t.id) else { continue };
            let rule = &self.sampling.rules[t.rule];
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
        let rule = &self.sampling.rules[t.rule];
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
            descendants,
            other_uid: other_uid.len(),
            rule: rule.name.clone(),
            clean_end: rule.clean_end,
            idle_secs: secs(now.saturating_sub(t.evidence.last_activity)),
            deadline_ns,
            ..self.decision_on(p, parent_comm(tree, p), host, reason)
        }
    }

    /// A decision to end live process `p` for `reason`, with what every decision says of its
    /// process (parent, command line, cgroup) and of the daemon (mode, graces). The rest is the
    /// caller's to fill in; left as is, it ends `p` alone, SIGTERM first.
    fn decision_on(
        &self,
        p: &Process,
        parent_comm: String,
        host: &impl Host,
        reason: Reason,
    ) -> Decision {
        Decision {
            target: Victim::of(p),
            descendants: Vec::new(),
            other_uid: 0,
            rule: String::new(),
            reason,
            clean_end: CleanEnd::None,
            eof_grace: self.eof_grace,
            grace: self.grace,
            idle_secs: 0.0,
            deadline_ns: 0,
            ppid: p.ppid,
            parent_comm,
            // A leftover that exec'd after its session ended was no longer watched: the
            // kernel sent its exec without its image, so the log line reads argv now.
            argv: if p.argv.is_unknown() {
                host.image(p.id)
                    .map_or_else(String::new, |image| image.argv.redacted(ARGV_SHOWN))
            } else {
                p.argv.redacted(ARGV_SHOWN)
            },
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
            rule: e.rule.clone(),
            idle_secs: secs(now.saturating_sub(e.at)),
            deadline_ns,
            kind: Some(kind),
            note: format!(
                "leftover of session {} ({}), which ended {:.0}s ago",
                e.target,
                crate::events::quoted(&e.comm),
                secs(now.saturating_sub(e.at))
            ),
            ..self.decision_on(p, tree_comm(p.ppid, e), host, reason)
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
                descendants,
                rule: "runaway".into(),
                clean_end: CleanEnd::Interrupt,
                deadline_ns: since.saturating_add(nanos(self.runaway_for)),
                note: format!(
                    "lost its terminal, re-parented, above {:.0}% of a core for {:.0}s",
                    self.runaway_cpu * 100.0,
                    secs(now.saturating_sub(since))
                ),
                ..self.decision_on(p, parent_comm(tree, p), host, Reason::Runaway)
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
    pub(crate) fn pressure_decision(
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
            self.sampling.sample(t, tree, now, host);
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
    pub(crate) fn settle(&mut self, target: Identity, settled: Settled) {
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
/// The comm of `p`'s parent, if the tree has it.
fn parent_comm(tree: &ProcessTree, p: &Process) -> String {
    tree.get(p.ppid)
        .map(|pp| pp.comm.clone())
        .unwrap_or_default()
}

fn tree_comm(ppid: u32, e: &Ended) -> String {
    if ppid == e.target.pid {
        e.comm.clone()
    } else {
        String::new()
    }
}
