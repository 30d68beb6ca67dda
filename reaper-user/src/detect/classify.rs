//! Which processes are targets, and whose descendants are whose: kept up to date from the
//! tree's events, re-checked after a reconcile or a new configuration.
use std::collections::{BTreeMap, VecDeque};

use super::{
    Detector, Ended, Host, Member, Pending, Runaway, Target,
    sample::{bump, turn_in_flight},
    session::Attribution,
    targets,
    verdict::{ActivityKind, Evidence, Nanos},
};
use crate::{
    events::{Event, Identity},
    tree::{Process, ProcessTree},
};

/// Sessions kept once their target and every leftover are gone (for `reaper sessions`).
const ENDED_KEPT: usize = 64;

impl Detector {
    /// Classifies every process (start-up, after a restart). Idle clocks start now: an
    /// adopted process's earlier inactivity cannot be proven.
    pub(crate) fn adopt_all(&mut self, tree: &mut ProcessTree, now: Nanos, host: &mut impl Host) {
        let pids: Vec<u32> = tree.processes().map(|p| p.id.pid).collect();
        for pid in pids {
            self.classify(tree, pid, Some(now), host);
        }
    }

    /// Re-checks what a reconcile changed: `renewed` pids (added, filled or refreshed from
    /// `/proc`), and targets that vanished without an exit event.
    pub(crate) fn classify_new(
        &mut self,
        tree: &mut ProcessTree,
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
            self.classify(tree, pid, Some(now), host);
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

    /// Updates after the tree applied `event`. Reads only its kind, identities and times: the
    /// tree has taken its strings ([`ProcessTree::apply_taking`]). The tree is changed only to
    /// give a new candidate the image the kernel did not send ([`Detector::classify`]).
    pub(crate) fn on_event(&mut self, tree: &mut ProcessTree, event: &Event, host: &mut impl Host) {
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
                // Unstamped: the kernel did not watch it at its exec (it may be watched since,
                // or a candidate in a rules change): now is the closest time at hand, read only
                // where a time is used.
                if let Some(target) = self.member_of.get(&id.pid).copied() {
                    let at = time_ns.unwrap_or_else(|| host.now_ns());
                    self.activity(target, at, ActivityKind::DescendantExec);
                } else if !self.left_of.contains_key(&id.pid) {
                    self.classify(tree, id.pid, *time_ns, host);
                }
            }
            Event::Rename { id, time_ns, .. } => {
                if !self.member_of.contains_key(&id.pid) {
                    self.classify(tree, id.pid, Some(*time_ns), host);
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
                    host.member_exited(id.pid);
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
                || !self
                    .sampling
                    .rules
                    .iter()
                    .any(|r| targets::name_matches(r, p))
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
        let rule = &self.sampling.rules[t.rule];
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
    ///
    /// A process whose image the kernel did not send (it was no candidate at its exec: see
    /// `EXEC_IMAGE_UNREAD`) and that a rule's name may now match (renamed to it, or new rules:
    /// [`targets::name_may_match`]) gets its image (exe and argv) from `/proc` first, checked
    /// to be this very process; if it is gone or its pid taken by another, it matches nothing
    /// here (its exit event, or the new process's, follows). Unknown argv is never matched
    /// against a rule. `now` is when (an event without a time: the host's clock, read only if
    /// the process is adopted).
    pub(super) fn classify(
        &mut self,
        tree: &mut ProcessTree,
        pid: u32,
        now: Option<Nanos>,
        host: &mut impl Host,
    ) {
        let Some(p) = tree.get(pid) else { return };
        if p.placeholder {
            return;
        }
        // Nearly every exec on a host is named by no rule: one pass over the names decides.
        let named = self
            .sampling
            .rules
            .iter()
            .any(|rule| targets::name_may_match(rule, p));
        if named && p.argv.is_unknown() {
            let id = p.id;
            let Some(image) = host.image(id) else {
                return;
            };
            tree.fill_image(id, image);
        }
        let tree = &*tree;
        let Some(p) = tree.get(pid) else { return };
        let parent = tree.get(p.ppid);
        let matched = named
            .then(|| {
                self.sampling.rules.iter().position(|rule| {
                    // The name first: a mismatch's explanation (`Mismatch::Name`) copies the
                    // names.
                    targets::name_matches(rule, p)
                        && targets::matches(rule, p, parent, || host.tty_nr(pid)).is_ok()
                })
            })
            .flatten();
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
            (None, Some(rule)) => {
                let now = now.unwrap_or_else(|| host.now_ns());
                self.adopt(tree, p.id, rule, now, host)
            }
            // Watched by its name from its exec on, but not a target after all.
            (None, None) if named => host.unwatch(pid, &[]),
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
        let rule_ref = &self.sampling.rules[rule];
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
        self.sampling.sample(&mut target, tree, now, host);
        self.targets.insert(id.pid, target);
    }

    pub(super) fn drop_target(&mut self, pid: u32, host: &mut impl Host) {
        let Some(t) = self.targets.remove(&pid) else {
            return;
        };
        let members: Vec<u32> = t.members.keys().copied().collect();
        for m in &members {
            self.member_of.remove(m);
        }
        host.unwatch(pid, &members);
    }
}

/// Every live descendant of `pid`, nearest first (at adoption; afterwards fork events keep
/// each target's members).
pub(super) fn descendants(tree: &ProcessTree, pid: u32) -> Vec<&Process> {
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
