//! Signals, carefully: open a pidfd, verify the start time, signal through the pidfd,
//! SIGTERM → grace → SIGKILL, target and descendants — never the process group or session
//! (the SDK leaves the CLI in the daemon's group: killing the group kills the daemon).
//!
//! Side effects go through [`ProcessOps`], so the policy (what is refused, what is sent, in
//! which order) is tested without killing anything.
use std::{
    collections::VecDeque,
    future::Future,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{detect::verdict::Nanos, events::Identity};

/// A process to signal, with what the log line says about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Victim {
    pub id: Identity,
    pub comm: String,
}

/// Why a target is reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Idle,
    Orphaned,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Orphaned => "orphaned",
        }
    }
}

/// One decision to reap a target and its descendants.
#[derive(Clone, Debug, Serialize)]
pub struct ReapOrder {
    pub target: Victim,
    pub descendants: Vec<Victim>,
    pub rule: String,
    pub reason: Reason,
    pub idle_secs: f64,
    /// When the target became due (idle or orphan deadline), boot-time ns.
    pub deadline_ns: Nanos,
    pub ppid: u32,
    pub parent_comm: String,
    pub argv: String,
    pub dry_run: bool,
    pub grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Dry run: nothing was signalled.
    WouldKill,
    /// Gone after SIGTERM within the grace.
    Terminated,
    /// Needed SIGKILL.
    Killed,
    /// Had exited before it was signalled.
    AlreadyGone,
    /// The pid now names another process: nothing was signalled.
    IdentityMismatch,
    /// A safety rule forbade it (pid 1, reaper itself): nothing was signalled.
    Refused,
    /// Signalling failed, or the process outlived SIGKILL.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WouldKill => "would_kill",
            Self::Terminated => "terminated",
            Self::Killed => "killed",
            Self::AlreadyGone => "already_gone",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// What happened to one order.
#[derive(Clone, Debug, Serialize)]
pub struct ReapReport {
    pub target: Identity,
    pub rule: String,
    pub reason: Reason,
    pub outcome: Outcome,
    pub signals: Vec<&'static str>,
    /// RSS of the target and its descendants just before they were signalled.
    pub rss_bytes: u64,
    /// Processes signalled (target and descendants).
    pub signalled: usize,
    pub deadline_ns: Nanos,
    /// When the target was seen gone (boot-time ns).
    pub gone_ns: Option<Nanos>,
    pub error: Option<String>,
}

/// Why a pid could not be opened for signalling.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("process has exited")]
    Gone,
    #[error("pid {pid} now belongs to another process (start {found} ≠ {expected})")]
    Mismatch { pid: u32, expected: u64, found: u64 },
    #[error("pidfd_open failed")]
    Io(#[source] std::io::Error),
}

/// The side effects of reaping.
pub trait ProcessOps: Send + Sync + 'static {
    type Handle: Send + Sync;
    /// A handle that names exactly `id`: fails if the pid now belongs to another process.
    fn open(&self, id: Identity) -> Result<Self::Handle, OpenError>;
    /// Sends `signal` (`libc::SIGTERM`, …) through the handle. `Ok(false)`: already gone.
    fn signal(&self, handle: &Self::Handle, signal: i32) -> std::io::Result<bool>;
    /// Waits up to `timeout` for the process to exit; true if it did.
    fn wait_exit(&self, handle: &Self::Handle, timeout: Duration) -> impl Future<Output = bool> + Send;
    fn rss_bytes(&self, id: Identity) -> Option<u64>;
    fn now_ns(&self) -> Nanos;
}

/// Executes `order` and reports what happened. Never signals pid ≤ 1 or this process, never a
/// pid whose start time does not match, never a group or session.
pub async fn execute<O: ProcessOps>(ops: &O, order: &ReapOrder) -> ReapReport {
    let mut report = ReapReport {
        target: order.target.id,
        rule: order.rule.clone(),
        reason: order.reason,
        outcome: Outcome::Failed,
        signals: Vec::new(),
        rss_bytes: 0,
        signalled: 0,
        deadline_ns: order.deadline_ns,
        gone_ns: None,
        error: None,
    };
    let me = std::process::id();
    let forbidden = |id: Identity| id.pid <= 1 || id.pid == me;
    if forbidden(order.target.id) {
        report.outcome = Outcome::Refused;
        report.error = Some(format!("pid {} is never signalled", order.target.id.pid));
        return report;
    }

    // Open every pidfd first: identity is verified before anything is signalled.
    let target = match ops.open(order.target.id) {
        Ok(handle) => handle,
        Err(OpenError::Gone) => {
            report.outcome = Outcome::AlreadyGone;
            report.gone_ns = Some(ops.now_ns());
            return report;
        }
        Err(OpenError::Mismatch { .. }) => {
            report.outcome = Outcome::IdentityMismatch;
            return report;
        }
        Err(err @ OpenError::Io(_)) => {
            report.error = Some(err.to_string());
            return report;
        }
    };
    let descendants: Vec<(Identity, O::Handle)> = order
        .descendants
        .iter()
        .filter(|v| !forbidden(v.id))
        .filter_map(|v| ops.open(v.id).ok().map(|h| (v.id, h)))
        .collect();
    report.rss_bytes = std::iter::once(order.target.id)
        .chain(descendants.iter().map(|(id, _)| *id))
        .filter_map(|id| ops.rss_bytes(id))
        .sum();

    if order.dry_run {
        report.outcome = Outcome::WouldKill;
        return report;
    }

    // SIGTERM the descendants, deepest first, before the target: a parent that dies first
    // can take its children with a harsher signal (the CLI's tools die by PR_SET_PDEATHSIG
    // SIGKILL) or spawn more. A default-action SIGTERM fixes the exit signal when it is sent
    // (`complete_signal()` in kernel/signal.c), so each process ends by the polite signal.
    report.signals.push("SIGTERM");
    for (_, h) in descendants.iter().rev() {
        let _ = ops.signal(h, libc::SIGTERM);
    }
    report.signalled = descendants.len();
    let target_alive = match ops.signal(&target, libc::SIGTERM) {
        Ok(alive) => alive,
        Err(err) => {
            report.error = Some(format!(
                "SIGTERM to the target: {err} ({} descendant(s) were sent SIGTERM)",
                descendants.len()
            ));
            return report;
        }
    };
    report.signalled += 1;
    if !target_alive {
        report.outcome = Outcome::AlreadyGone;
        report.gone_ns = Some(ops.now_ns());
        return report;
    }

    if ops.wait_exit(&target, order.grace).await {
        report.outcome = Outcome::Terminated;
        report.gone_ns = Some(ops.now_ns());
    }
    // Anyone still there after the grace gets SIGKILL (descendants may ignore SIGTERM).
    let mut killed = false;
    if report.gone_ns.is_none() {
        killed |= ops.signal(&target, libc::SIGKILL).unwrap_or(false);
    }
    for (_, h) in &descendants {
        if !ops.wait_exit(h, Duration::ZERO).await {
            killed |= ops.signal(h, libc::SIGKILL).unwrap_or(false);
        }
    }
    if killed {
        report.signals.push("SIGKILL");
    }
    if report.gone_ns.is_none() {
        if ops.wait_exit(&target, Duration::from_secs(5)).await {
            report.outcome = Outcome::Killed;
            report.gone_ns = Some(ops.now_ns());
        } else {
            report.error = Some("still alive 5 s after SIGKILL".into());
        }
    }
    report
}

/// At most `per_minute` kills in any 60 s: a wrong rule cannot wipe a host. Pure: `now` in.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    recent: VecDeque<Instant>,
}

impl RateLimit {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            recent: VecDeque::new(),
        }
    }

    /// Takes a slot if one is free at `now`; otherwise says when the next one frees.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        const WINDOW: Duration = Duration::from_secs(60);
        while self.recent.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            self.recent.pop_front();
        }
        if self.recent.len() < self.per_minute as usize {
            self.recent.push_back(now);
            Ok(())
        } else {
            Err(self.recent[0] + WINDOW)
        }
    }
}

/// The real side effects: pidfds (`pidfd_open`, `pidfd_send_signal`, poll for exit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pidfds;

/// Start time (clock ticks) from `/proc/PID/stat`.
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some(stat.starttime)
}

impl ProcessOps for Pidfds {
    type Handle = OwnedFd;

    fn open(&self, id: Identity) -> Result<OwnedFd, OpenError> {
        let pid = i32::try_from(id.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(OpenError::Gone)?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).map_err(|e| {
            if e == rustix::io::Errno::SRCH {
                OpenError::Gone
            } else {
                OpenError::Io(e.into())
            }
        })?;
        // The pidfd names whoever held the pid when it was opened. If /proc still shows the
        // expected start time now, that was our process; if it died since, signals through
        // the pidfd fail with ESRCH instead of reaching a newcomer.
        match proc_start_ticks(id.pid) {
            // A zombie (killed, not yet collected by its parent) is gone already.
            Some(found) if found == id.start_ticks && !crate::tree::scan::alive(id) => Err(OpenError::Gone),
            Some(found) if found == id.start_ticks => Ok(fd),
            Some(found) => Err(OpenError::Mismatch {
                pid: id.pid,
                expected: id.start_ticks,
                found,
            }),
            None => Err(OpenError::Gone),
        }
    }

    fn signal(&self, handle: &OwnedFd, signal: i32) -> std::io::Result<bool> {
        let sig = rustix::process::Signal::from_named_raw(signal)
            .ok_or_else(|| std::io::Error::other(format!("bad signal {signal}")))?;
        match rustix::process::pidfd_send_signal(handle, sig) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn wait_exit(&self, handle: &OwnedFd, timeout: Duration) -> bool {
        use std::os::fd::AsFd as _;
        // A pidfd polls readable once the process has exited.
        let Ok(dup) = handle.as_fd().try_clone_to_owned() else { return false };
        // SAFETY: the AsyncFd owns this duplicate fd for its whole life and closes it on drop.
        let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }) else {
            return false;
        };
        matches!(tokio::time::timeout(timeout, fd.readable()).await, Ok(Ok(_)))
    }

    fn rss_bytes(&self, id: Identity) -> Option<u64> {
        let p = procfs::process::Process::new(i32::try_from(id.pid).ok()?).ok()?;
        let statm = p.statm().ok()?;
        Some(statm.resident * procfs::page_size())
    }

    fn now_ns(&self) -> Nanos {
        crate::tree::scan::now_ns()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what would have been done; processes are rows in a table.
    #[derive(Default)]
    struct Fake {
        /// pid → (start, alive, ignores SIGTERM)
        procs: Mutex<std::collections::HashMap<u32, (u64, bool, bool)>>,
        sent: Mutex<Vec<(u32, i32)>>,
    }

    impl Fake {
        fn with(procs: &[(u32, u64, bool)]) -> Self {
            let f = Self::default();
            for (pid, start, stubborn) in procs {
                f.procs.lock().unwrap().insert(*pid, (*start, true, *stubborn));
            }
            f
        }
    }

    impl ProcessOps for Fake {
        type Handle = u32;
        fn open(&self, id: Identity) -> Result<u32, OpenError> {
            match self.procs.lock().unwrap().get(&id.pid) {
                Some((start, true, _)) if *start == id.start_ticks => Ok(id.pid),
                Some((start, true, _)) => Err(OpenError::Mismatch { pid: id.pid, expected: id.start_ticks, found: *start }),
                _ => Err(OpenError::Gone),
            }
        }
        fn signal(&self, pid: &u32, signal: i32) -> std::io::Result<bool> {
            self.sent.lock().unwrap().push((*pid, signal));
            let mut procs = self.procs.lock().unwrap();
            let p = procs.get_mut(pid).unwrap();
            let was_alive = p.1;
            if signal == libc::SIGKILL || !p.2 {
                p.1 = false;
            }
            Ok(was_alive)
        }
        async fn wait_exit(&self, pid: &u32, _timeout: Duration) -> bool {
            !self.procs.lock().unwrap()[pid].1
        }
        fn rss_bytes(&self, _id: Identity) -> Option<u64> {
            Some(1000)
        }
        fn now_ns(&self) -> Nanos {
            42
        }
    }

    fn order(pid: u32, start: u64, descendants: &[(u32, u64)]) -> ReapOrder {
        let victim = |pid, start| Victim { id: Identity { pid, start_ticks: start }, comm: "claude".into() };
        ReapOrder {
            target: victim(pid, start),
            descendants: descendants.iter().map(|(p, s)| victim(*p, *s)).collect(),
            rule: "claude-sdk".into(),
            reason: Reason::Idle,
            idle_secs: 900.0,
            deadline_ns: 1,
            ppid: 10,
            parent_comm: "node".into(),
            argv: "claude".into(),
            dry_run: false,
            grace: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn sigterm_then_done_for_a_cooperative_target_and_its_descendants() {
        let ops = Fake::with(&[(100, 5, false), (101, 6, false)]);
        let r = execute(&ops, &order(100, 5, &[(101, 6)])).await;
        assert_eq!(r.outcome, Outcome::Terminated);
        assert_eq!(r.signals, ["SIGTERM"]);
        assert_eq!(r.rss_bytes, 2000);
        assert_eq!(*ops.sent.lock().unwrap(), [(101, libc::SIGTERM), (100, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn descendants_are_signalled_deepest_first_and_before_the_target() {
        let ops = Fake::with(&[(100, 5, false), (101, 6, false), (102, 7, false)]);
        // `descendants` come nearest first: 101 is the child, 102 the grandchild.
        execute(&ops, &order(100, 5, &[(101, 6), (102, 7)])).await;
        assert_eq!(
            *ops.sent.lock().unwrap(),
            [(102, libc::SIGTERM), (101, libc::SIGTERM), (100, libc::SIGTERM)]
        );
    }

    #[tokio::test]
    async fn sigkill_after_the_grace_for_a_stubborn_one() {
        let ops = Fake::with(&[(100, 5, true), (101, 6, true)]);
        let r = execute(&ops, &order(100, 5, &[(101, 6)])).await;
        assert_eq!(r.outcome, Outcome::Killed);
        assert_eq!(r.signals, ["SIGTERM", "SIGKILL"]);
        let sent = ops.sent.lock().unwrap();
        assert!(sent.contains(&(101, libc::SIGKILL)), "descendants too: {sent:?}");
    }

    #[tokio::test]
    async fn a_reused_pid_is_never_signalled() {
        let ops = Fake::with(&[(100, 99, false)]);
        let r = execute(&ops, &order(100, 5, &[])).await;
        assert_eq!(r.outcome, Outcome::IdentityMismatch);
        assert!(ops.sent.lock().unwrap().is_empty());
        // Nor a reused descendant.
        let ops = Fake::with(&[(100, 5, false), (101, 77, false)]);
        execute(&ops, &order(100, 5, &[(101, 6)])).await;
        assert_eq!(*ops.sent.lock().unwrap(), [(100, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn pid_1_and_reaper_itself_are_refused() {
        let me = std::process::id();
        let ops = Fake::with(&[(1, 1, false), (me, 3, false), (200, 4, false)]);
        for pid in [0, 1, me] {
            let r = execute(&ops, &order(pid, if pid == me { 3 } else { 1 }, &[])).await;
            assert_eq!(r.outcome, Outcome::Refused, "pid {pid}");
        }
        // …also as someone's descendant.
        execute(&ops, &order(200, 4, &[(1, 1), (me, 3)])).await;
        assert_eq!(*ops.sent.lock().unwrap(), [(200, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn dry_run_signals_nothing() {
        let ops = Fake::with(&[(100, 5, false)]);
        let mut o = order(100, 5, &[]);
        o.dry_run = true;
        let r = execute(&ops, &o).await;
        assert_eq!(r.outcome, Outcome::WouldKill);
        assert!(ops.sent.lock().unwrap().is_empty());
        assert_eq!(r.rss_bytes, 1000);
    }

    #[tokio::test]
    async fn a_target_gone_before_the_signal_is_not_a_failure() {
        let ops = Fake::with(&[]);
        let r = execute(&ops, &order(100, 5, &[])).await;
        assert_eq!(r.outcome, Outcome::AlreadyGone);
        assert!(ops.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn the_rate_limit_holds_a_sliding_minute() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(2);
        assert!(limit.take(t0).is_ok());
        assert!(limit.take(t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(limit.take(t0 + Duration::from_secs(2)), Err(t0 + Duration::from_secs(60)));
        assert!(limit.take(t0 + Duration::from_secs(60)).is_ok());
        assert!(limit.take(t0 + Duration::from_secs(61)).is_ok());
        assert!(limit.take(t0 + Duration::from_secs(62)).is_err());
    }
}
