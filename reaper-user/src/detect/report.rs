//! What `reaper tree`, `reaper sessions` and `reaper explain` show of the detector's state.
use serde::{Deserialize, Serialize};

use super::{
    Detector, Host, Member, Target, nanos, secs,
    session::{self, Attribution, Kind, KindCounts, SessionView},
    targets::{self, Mismatch},
    verdict::{Evidence, Nanos, Verdict},
};
use crate::{
    config::CleanEnd,
    events::Identity,
    tree::{Process, ProcessTree},
};

/// Sessions by state and leftovers by kind, for the gauges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SessionCounts {
    pub states: Vec<(&'static str, i64)>,
    pub leftovers: Vec<(Kind, i64)>,
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

impl Detector {
    /// Every session: live targets and ended ones with what is left of them.
    pub(crate) fn sessions(
        &self,
        tree: &ProcessTree,
        now: Nanos,
        host: &impl Host,
    ) -> Vec<SessionView> {
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
                rule: self.sampling.rules[t.rule].name.clone(),
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
    pub(crate) fn session_counts(&self, now: Nanos) -> SessionCounts {
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
            rule: self.sampling.rules[t.rule].name.clone(),
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

    pub(crate) fn views(&self, tree: &ProcessTree, now: Nanos) -> Vec<TargetView> {
        let mut views: Vec<_> = self
            .targets
            .values()
            .map(|t| self.view(t, tree, now))
            .collect();
        views.sort_by_key(|v| v.id.pid);
        views
    }

    /// Why `pid` is or is not a target.
    pub(crate) fn explain(
        &self,
        tree: &ProcessTree,
        pid: u32,
        now: Nanos,
        host: &impl Host,
    ) -> Explanation {
        let mut process = tree.get(pid).cloned();
        // An image the kernel did not send is read now, for the rules' name and argv checks
        // (as classify() would read it if a rule's name may match).
        if let Some(p) = process.as_mut().filter(|p| p.argv.is_unknown())
            && let Some(image) = host.image(p.id)
        {
            p.fill_image(image);
        }
        let mut first_match = None;
        let rules = match &process {
            Some(p) => {
                let parent = tree.get(p.ppid);
                self.sampling
                    .rules
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
