//! The live process tree: every process on the host, keyed by pid and checked by identity
//! (pid + start time), kept exact by lifecycle events ([`ProcessTree::apply`]) and repaired
//! against `/proc` ([`ProcessTree::reconcile`]). Pure: no kernel, no I/O, no clock.
//!
//! Out-of-order or missing events are expected (start-up overlap, ring buffer losses):
//! an event for an unknown process creates it, an unknown parent becomes a placeholder, and
//! a pid held by a different identity than the event's was reused, so the old entry is
//! dropped. Nothing here is an error.
pub mod scan;

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::events::{Argv, Event, ExitStatus, Identity};

/// Exited processes remembered (with their exit status) after they leave the live tree.
pub(crate) const EXITED_KEPT: usize = 4096;

/// The last [`EXITED_KEPT`] exited processes by identity, oldest dropped first: the processes
/// in a ring in the order they exited, and an index from identity to place. Looked up on every
/// fork and exit: a linear search of the 4,096 was most of the daemon's CPU in a spawn storm.
///
/// Not an LRU cache: `lru::LruCache::put` was 30 % of the daemon's samples in a spawn storm
/// (`perf record --call-graph dwarf`, 12 × 5,000 spawns), most of it chasing the cold evicted
/// node and its neighbours in the linked list and comparing keys through node pointers. Here
/// the oldest is the ring's front, and the index holds identities inline.
#[derive(Debug, Default)]
struct Exited {
    ring: VecDeque<Process>,
    /// Identity → sequence number: the entry is `ring[seq - dropped]`.
    index: HashMap<Identity, u64, Hasher>,
    /// How many entries left the ring's front so far.
    dropped: u64,
}

impl Exited {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len()
    }

    fn get(&self, id: &Identity) -> Option<&Process> {
        let seq = *self.index.get(id)?;
        self.ring
            .get(usize::try_from(seq.checked_sub(self.dropped)?).ok()?)
    }

    /// Remembers `p`, dropping the oldest entry once [`EXITED_KEPT`] are held. An identity
    /// remembered again (an exit applied twice, after an exec brought it back) keeps its place
    /// and takes the newer entry.
    ///
    /// The dropped entry's identity stays in the index (its sequence number is below
    /// `dropped`, so [`Exited::get`] does not find it) until the index holds twice
    /// [`EXITED_KEPT`] identities, then all such are swept at once: removing each as it left
    /// the ring was a cold hash-table probe per exit, 9 % of the daemon's samples in a spawn
    /// storm (`perf record --call-graph dwarf`, 3 × 4 × 5,000 spawns).
    fn put(&mut self, p: Process) {
        if let Some(at) = self
            .index
            .get(&p.id)
            .and_then(|seq| seq.checked_sub(self.dropped))
        {
            self.ring[usize::try_from(at).expect("within the ring")] = p;
            return;
        }
        if self.ring.len() == EXITED_KEPT && self.ring.pop_front().is_some() {
            self.dropped += 1;
        }
        if self.index.len() >= 2 * EXITED_KEPT {
            let dropped = self.dropped;
            self.index.retain(|_, seq| *seq >= dropped);
        }
        self.index
            .insert(p.id, self.dropped + self.ring.len() as u64);
        self.ring.push_back(p);
    }
}

/// The tree's maps are looked up several times per event, by pid or identity: with std's
/// SipHash, hashing was 3-4 % of the daemon's samples in a spawn storm (`perf record`).
/// foldhash is seeded per process too, and the keys are pids, which the kernel hands out.
type Hasher = foldhash::fast::RandomState;

/// One process as the tree knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub id: Identity,
    /// Parent process id. The parent itself is `tree.get(ppid)` while it lives.
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    /// The program: the path given to execve, or `/proc/PID/exe` for processes found by a scan.
    /// Empty where unknown: a kernel thread, or an exec whose image the kernel did not read
    /// (`reaper_common::EXEC_IMAGE_UNREAD`, with [`Argv::unknown`]) until the process is a
    /// candidate and it is read from `/proc` ([`ProcessTree::fill_image`]).
    pub exe: String,
    pub argv: Argv,
    pub argv_truncated: bool,
    /// Live children's pids (for an exited process: the children it had when it exited).
    pub children: BTreeSet<u32>,
    /// Set once the process has exited.
    pub exit: Option<ExitStatus>,
    /// Known only as someone's parent: its details wait for a `/proc` reconcile.
    pub placeholder: bool,
    /// Still carries the image (argv, exe) it inherited at fork: no exec seen since. If its
    /// exec event was lost, a reconcile refreshes the image from `/proc`.
    #[serde(default)]
    pub inherited_image: bool,
}

impl Process {
    fn placeholder(id: Identity) -> Self {
        Self {
            id,
            ppid: 0,
            uid: 0,
            comm: String::new(),
            exe: String::new(),
            argv: Argv::default(),
            argv_truncated: false,
            children: BTreeSet::new(),
            exit: None,
            placeholder: true,
            inherited_image: false,
        }
    }
}

/// A process's image as `/proc` shows it (`exe`, `cmdline`): what an exec record carries where
/// the kernel reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Image {
    pub exe: String,
    /// At most [`reaper_common::ARGV_LEN`] bytes, as in exec events.
    pub argv: Argv,
    /// `/proc/PID/cmdline` was longer and was cut.
    pub argv_truncated: bool,
}

impl Process {
    /// Takes `image`, read from `/proc` for this very process, if the kernel did not read its
    /// image at its exec ([`Argv::unknown`]); else changes nothing.
    pub(crate) fn fill_image(&mut self, image: Image) {
        if self.argv.is_unknown() {
            self.exe = image.exe;
            self.argv = image.argv;
            self.argv_truncated = image.argv_truncated;
        }
    }
}

/// A process as a `/proc` scan saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: Identity,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub exe: String,
    /// At most [`reaper_common::ARGV_LEN`] bytes, as in exec events.
    pub argv: Argv,
    /// `/proc/PID/cmdline` was longer and was cut.
    pub argv_truncated: bool,
}

impl From<Snapshot> for Process {
    fn from(s: Snapshot) -> Self {
        Self {
            id: s.id,
            ppid: s.ppid,
            uid: s.uid,
            comm: s.comm,
            exe: s.exe,
            argv: s.argv,
            argv_truncated: s.argv_truncated,
            children: BTreeSet::new(),
            exit: None,
            placeholder: false,
            inherited_image: false,
        }
    }
}

/// Kinds of repair, counted: each is the tree disagreeing with the kernel's truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Corrections {
    /// In `/proc`, missing from the tree (a fork event was lost).
    pub added: u64,
    /// In the tree, gone from `/proc` (an exit event was lost).
    pub removed: u64,
    /// The pid now belongs to another process (exit and fork lost, or reuse).
    pub replaced: u64,
    /// The parent differed.
    pub reparented: u64,
    /// A placeholder filled in from `/proc`.
    pub filled: u64,
    /// A forked process's image refreshed from `/proc` (its exec event was lost).
    #[serde(default)]
    pub refreshed: u64,
}

impl Corrections {
    pub fn total(&self) -> u64 {
        self.added + self.removed + self.replaced + self.reparented + self.filled + self.refreshed
    }

    /// `(label, count)` pairs, for metrics and logs.
    pub(crate) fn by_kind(&self) -> [(&'static str, u64); 6] {
        [
            ("added", self.added),
            ("removed", self.removed),
            ("replaced", self.replaced),
            ("reparented", self.reparented),
            ("filled", self.filled),
            ("refreshed", self.refreshed),
        ]
    }

    fn add(&mut self, other: &Corrections) {
        self.added += other.added;
        self.removed += other.removed;
        self.replaced += other.replaced;
        self.reparented += other.reparented;
        self.filled += other.filled;
        self.refreshed += other.refreshed;
    }
}

/// What applying one event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The tree changed as the event says.
    Changed,
    /// The tree already held this (a fork seen by the start-up scan, a duplicate exit).
    AlreadyKnown,
    /// About a process the tree does not hold, and nothing to learn from it (a rename of an
    /// unknown pid, an exit of a process never seen).
    Unknown,
}

#[derive(Debug, Default)]
pub(crate) struct ProcessTree {
    live: HashMap<u32, Process, Hasher>,
    exited: Exited,
    corrections: Corrections,
    /// Pids whose name or argv a reconcile changed (see [`ProcessTree::take_renewed`]).
    renewed: Vec<u32>,
    /// Dead processes the last reconcile found in the tree (see [`ProcessTree::confirm_gone`]).
    gone_candidates: Vec<Identity>,
}

impl ProcessTree {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Builds the tree from a `/proc` scan (start-up).
    pub(crate) fn from_scan(snapshot: Vec<Snapshot>) -> Self {
        let mut tree = Self::new();
        for s in snapshot {
            tree.live.insert(s.id.pid, s.into());
        }
        tree.rebuild_children();
        crate::heap::give_back();
        tree
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// The live process at `pid`.
    pub(crate) fn get(&self, pid: u32) -> Option<&Process> {
        self.live.get(&pid)
    }

    /// The live process with exactly this identity.
    pub(crate) fn get_id(&self, id: Identity) -> Option<&Process> {
        self.live.get(&id.pid).filter(|p| p.id == id)
    }

    /// A recently exited process with this identity, with its exit status.
    pub(crate) fn exited(&self, id: Identity) -> Option<&Process> {
        self.exited.get(&id)
    }

    pub(crate) fn processes(&self) -> impl Iterator<Item = &Process> {
        self.live.values()
    }

    /// Pids whose name or argv the last reconciles changed (filled placeholders, refreshed
    /// images, added processes): whoever classifies processes should look at them again.
    pub(crate) fn take_renewed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.renewed)
    }

    /// Corrections made by reconciles so far.
    pub(crate) fn corrections(&self) -> Corrections {
        self.corrections
    }

    /// Applies one lifecycle event.
    #[cfg(test)]
    pub(crate) fn apply(&mut self, event: &Event) -> Applied {
        self.apply_taking(&mut event.clone())
    }

    /// Applies one lifecycle event like [`ProcessTree::apply`], moving its strings (comm, file,
    /// argv) into the tree rather than copying them: `event` keeps its kind, identities and
    /// times, and the strings the tree kept are left empty in it. Copying them was an
    /// allocation per fork (the comm) and per exec (argv's shared buffer) on the daemon's
    /// hottest path.
    pub(crate) fn apply_taking(&mut self, event: &mut Event) -> Applied {
        match event {
            Event::Fork {
                id,
                parent,
                uid,
                comm,
                ..
            } => self.fork(*id, *parent, *uid, comm),
            Event::Exec {
                id,
                parent_pid,
                uid,
                comm,
                filename,
                argv,
                argv_truncated,
                ..
            } => {
                let p = self.entry_for(*id, *parent_pid);
                p.uid = *uid;
                p.comm = std::mem::take(comm);
                // Unread: unknown, as for a kernel thread ("").
                p.exe = filename.take().unwrap_or_default();
                p.argv = std::mem::take(argv);
                p.argv_truncated = *argv_truncated;
                p.placeholder = false;
                p.inherited_image = false;
                let ppid = p.ppid;
                if ppid != *parent_pid {
                    self.set_parent(id.pid, *parent_pid);
                }
                Applied::Changed
            }
            Event::Exit {
                id,
                status,
                reaper_pid,
                ..
            } => self.exit(*id, *status, *reaper_pid),
            Event::Rename { id, comm, .. } => match self.live.get_mut(&id.pid) {
                Some(p) if p.id == *id => {
                    p.comm = std::mem::take(comm);
                    Applied::Changed
                }
                _ => Applied::Unknown,
            },
        }
    }

    fn fork(&mut self, id: Identity, parent: Identity, uid: u32, comm: &mut String) -> Applied {
        if self.get_id(id).is_some() {
            return Applied::AlreadyKnown;
        }
        if self.exited(id).is_some() {
            // Its exit was applied already (events raced a scan): do not resurrect it.
            return Applied::AlreadyKnown;
        }
        self.evict_if_other(id);
        self.ensure_parent(parent);
        // A forked child shares its parent's image until it execs.
        let parent_entry = &self.live[&parent.pid];
        let child = Process {
            id,
            ppid: parent.pid,
            uid,
            comm: std::mem::take(comm),
            exe: parent_entry.exe.clone(),
            argv: parent_entry.argv.clone(),
            argv_truncated: parent_entry.argv_truncated,
            children: BTreeSet::new(),
            exit: None,
            placeholder: false,
            inherited_image: true,
        };
        self.live.insert(id.pid, child);
        self.link(parent.pid, id.pid);
        Applied::Changed
    }

    fn exit(&mut self, id: Identity, status: ExitStatus, reaper_pid: u32) -> Applied {
        if self.get_id(id).is_none() {
            if self.exited(id).is_some() {
                return Applied::AlreadyKnown;
            }
            // Never seen alive: remember how it ended all the same.
            let mut gone = Process::placeholder(id);
            gone.exit = Some(status);
            self.remember_exited(gone);
            return Applied::Unknown;
        }
        let gone = self.remove(id.pid).expect("checked above");
        // exit_notify(): the children go to the reaper the kernel chose. The remembered entry
        // keeps the children it had: who was orphaned by this exit.
        for &child in &gone.children {
            if let Some(c) = self.live.get_mut(&child) {
                c.ppid = reaper_pid;
                self.link(reaper_pid, child);
            }
        }
        let mut gone = gone;
        gone.exit = Some(status);
        self.remember_exited(gone);
        Applied::Changed
    }

    /// The live entry for `id`, created (with a placeholder parent if need be) if missing.
    fn entry_for(&mut self, id: Identity, ppid: u32) -> &mut Process {
        if self.get_id(id).is_none() {
            self.evict_if_other(id);
            let mut p = Process::placeholder(id);
            p.ppid = ppid;
            self.live.insert(id.pid, p);
            self.link(ppid, id.pid);
        }
        self.live.get_mut(&id.pid).expect("inserted above")
    }

    /// Makes sure the live entry at `parent.pid` is `parent`, inserting a placeholder.
    fn ensure_parent(&mut self, parent: Identity) {
        if self.get_id(parent).is_some() {
            return;
        }
        self.evict_if_other(parent);
        self.live.insert(parent.pid, Process::placeholder(parent));
        self.adopt_orphans(parent.pid);
    }

    /// A different process at `id.pid` is stale: its exit was never seen.
    fn evict_if_other(&mut self, id: Identity) {
        if self.live.get(&id.pid).is_some_and(|p| p.id != id)
            && let Some(old) = self.remove(id.pid)
        {
            // Its children's parent pid stays as the kernel last said; the new holder of the
            // pid is not their parent, so they are not linked to it.
            for child in old.children {
                if let Some(c) = self.live.get_mut(&child) {
                    c.ppid = 0;
                }
            }
        }
    }

    fn remove(&mut self, pid: u32) -> Option<Process> {
        let p = self.live.remove(&pid)?;
        if let Some(parent) = self.live.get_mut(&p.ppid) {
            parent.children.remove(&pid);
        }
        Some(p)
    }

    fn remember_exited(&mut self, p: Process) {
        self.exited.put(p);
    }

    fn link(&mut self, ppid: u32, pid: u32) {
        if let Some(parent) = self.live.get_mut(&ppid) {
            parent.children.insert(pid);
        }
    }

    fn set_parent(&mut self, pid: u32, ppid: u32) {
        let Some(p) = self.live.get_mut(&pid) else {
            return;
        };
        let old = std::mem::replace(&mut p.ppid, ppid);
        if let Some(old_parent) = self.live.get_mut(&old) {
            old_parent.children.remove(&pid);
        }
        self.link(ppid, pid);
    }

    /// Links live processes whose ppid is `pid` to it (after `pid` was inserted late).
    fn adopt_orphans(&mut self, pid: u32) {
        let orphans: Vec<u32> = self
            .live
            .values()
            .filter(|p| p.ppid == pid && p.id.pid != pid)
            .map(|p| p.id.pid)
            .collect();
        if let Some(parent) = self.live.get_mut(&pid) {
            parent.children.extend(orphans);
        }
    }

    fn rebuild_children(&mut self) {
        let links: Vec<(u32, u32)> = self.live.values().map(|p| (p.ppid, p.id.pid)).collect();
        for p in self.live.values_mut() {
            p.children.clear();
        }
        for (ppid, pid) in links {
            if ppid != pid {
                self.link(ppid, pid);
            }
        }
    }

    /// Gives live process `id`, whose image the kernel did not read ([`Argv::unknown`]), the
    /// image read from `/proc` for it (the caller checked it was read from this very process).
    /// Returns false, changing nothing, if `id` is not live here or its image is known.
    pub(crate) fn fill_image(&mut self, id: Identity, image: Image) -> bool {
        match self.live.get_mut(&id.pid) {
            Some(p) if p.id == id && p.argv.is_unknown() => {
                p.fill_image(image);
                true
            }
            _ => false,
        }
    }

    /// Repairs the tree against a `/proc` scan taken after every event up to `scan_start_ticks`
    /// was applied (removals of dead processes wait for [`ProcessTree::confirm_gone`]). `alive(id)` re-checks one process in `/proc` now: a process the scan saw
    /// may have exited since (and its exit been applied), and must not come back.
    pub(crate) fn reconcile(
        &mut self,
        snapshot: Vec<Snapshot>,
        scan_start_ticks: u64,
        mut alive: impl FnMut(Identity) -> bool,
    ) -> Corrections {
        let mut fixed = Corrections::default();
        let mut seen = std::collections::HashSet::with_capacity(snapshot.len());
        for s in snapshot {
            seen.insert(s.id.pid);
            let held_by = self.live.get(&s.id.pid).map(|p| p.id);
            if held_by == Some(s.id) {
                let p = self.live.get_mut(&s.id.pid).expect("just looked up");
                let ppid = p.ppid;
                // A fork whose exec was lost shows its parent's image; /proc knows better.
                // (Only such entries: a process may rewrite its own argv, e.g. setproctitle.
                // An argv the kernel did not read tells nothing either way.)
                let stale_image = p.inherited_image
                    && (p.comm != s.comm || (!p.argv.is_unknown() && p.argv != s.argv));
                let placeholder = p.placeholder;
                if placeholder || stale_image {
                    let children = std::mem::take(&mut p.children);
                    *p = Process::from(s.clone());
                    p.children = children;
                    p.ppid = ppid;
                    if placeholder {
                        fixed.filled += 1;
                    } else {
                        fixed.refreshed += 1;
                    }
                    self.renewed.push(s.id.pid);
                }
                // A placeholder's parent was unknown, not wrong.
                if !placeholder && ppid != s.ppid {
                    fixed.reparented += 1;
                }
                if ppid != s.ppid {
                    self.set_parent(s.id.pid, s.ppid);
                }
            } else {
                {
                    if self.exited(s.id).is_some() || !alive(s.id) {
                        continue;
                    }
                    if held_by.is_some() {
                        fixed.replaced += 1;
                        self.evict_if_other(s.id);
                    } else {
                        fixed.added += 1;
                    }
                    let ppid = s.ppid;
                    let pid = s.id.pid;
                    self.renewed.push(pid);
                    self.live.insert(pid, s.into());
                    self.link(ppid, pid);
                    self.adopt_orphans(pid);
                }
            }
        }
        // Gone from /proc: only what started before the scan did (later ones it cannot know),
        // and is dead now. Not removed yet: its exit event may still be in the ring buffer
        // (it died after the flush). See `confirm_gone`.
        self.gone_candidates = self
            .live
            .values()
            .filter(|p| !seen.contains(&p.id.pid) && p.id.start_ticks < scan_start_ticks)
            .map(|p| p.id)
            .filter(|id| !alive(*id))
            .collect();
        self.corrections.add(&fixed);
        crate::heap::give_back();
        fixed
    }

    /// Whether the last reconcile found dead processes still in the tree.
    pub(crate) fn has_gone_candidates(&self) -> bool {
        !self.gone_candidates.is_empty()
    }

    /// Second half of a reconcile, called once the ring buffer was flushed again: the dead
    /// processes the last reconcile found are removed if they are still here — their exit
    /// event was lost, not merely late. Returns how many, counted as `removed`.
    pub(crate) fn confirm_gone(&mut self) -> u64 {
        let mut removed = 0;
        for id in std::mem::take(&mut self.gone_candidates) {
            if self.get_id(id).is_none() {
                continue; // its exit event arrived meanwhile
            }
            removed += 1;
            if let Some(old) = self.remove(id.pid) {
                for child in old.children {
                    if let Some(c) = self.live.get_mut(&child) {
                        c.ppid = 0;
                    }
                }
            }
        }
        self.corrections.removed += removed;
        removed
    }
}

#[cfg(test)]
mod tests;
