//! Ending a target without breaking its parent: the kill ladder.
//!
//! **clean end → `eof_grace` → SIGTERM → `grace` → SIGKILL**, every step through a pidfd whose
//! process was verified (start time, name and uid) before anything was sent; never the process
//! group or session (the SDK leaves the CLI in the daemon's group: killing the group kills the
//! daemon).
//!
//! The clean end is what the SDK's own `close()` does: the CLI's stdin is a socket the daemon
//! holds the other end of; shutting it down makes the CLI read EOF and `exit_group(0)`, and
//! the daemon's `for await` loop ends without an error. A child killed by SIGTERM exits with
//! status 143 instead, which the SDK throws out of that loop, killing a daemon without a
//! `catch`. Where stdin is a pipe (the Python SDK) the clean end is SIGINT, the CLI's own
//! clean exit. Descendants left when the target is gone continue down the ladder (SIGTERM →
//! grace → SIGKILL), deepest first.
//!
//! Side effects go through [`ProcessOps`], so the policy (what is refused, what is sent, in
//! which order) is tested without killing anything.
use std::{future::Future, time::Duration};

use serde::Serialize;

use crate::{
    clock::Nanos,
    config::CleanEnd,
    detect::{Decision, Victim},
};

/// A step of the ladder: what ended (or would first try to end) a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Its stdin was shut down; it exited by itself.
    Closed,
    /// SIGINT.
    Interrupted,
    /// SIGTERM.
    Terminated,
    /// SIGKILL.
    Killed,
}

impl Step {
    pub(crate) const ALL: [Step; 4] = [
        Self::Closed,
        Self::Interrupted,
        Self::Terminated,
        Self::Killed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Interrupted => "interrupted",
            Self::Terminated => "terminated",
            Self::Killed => "killed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Dry run: nothing was done; `step` says where the ladder would start.
    WouldKill,
    /// Gone; `step` says which step ended it.
    Ended,
    /// Had exited before anything was done.
    AlreadyGone,
    /// The pid now names another process (or one that exec'd or changed uid): nothing was done.
    IdentityMismatch,
    /// A safety rule forbade it (pid 1, reaper itself): nothing was done.
    Refused,
    /// A reload (SIGHUP) switched to dry-run or removed its rule after the decision and
    /// before the first signal: nothing was done.
    Cancelled,
    /// Signalling failed, or the process outlived SIGKILL.
    Failed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::WouldKill => "would_kill",
            Self::Ended => "ended",
            Self::AlreadyGone => "already_gone",
            Self::IdentityMismatch => "identity_mismatch",
            Self::Refused => "refused",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

/// What happened to one decision.
#[derive(Clone, Debug, Serialize)]
pub struct ReapReport {
    pub outcome: Outcome,
    /// The step that ended the target (or, in dry run, the one the ladder would start with).
    pub step: Option<Step>,
    /// Every step taken, in order (`closed` means the input was shut down).
    pub steps: Vec<Step>,
    /// RSS of the target and its descendants just before anything was done.
    pub rss_bytes: u64,
    /// When the target was seen gone.
    pub gone_ns: Option<Nanos>,
    pub error: Option<String>,
}

/// Why a process could not be opened for signalling.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("process has exited")]
    Gone,
    #[error("pid {pid} is no longer the process that was decided on: {what}")]
    Mismatch { pid: u32, what: String },
    #[error("pidfd_open failed")]
    Io(#[source] std::io::Error),
}

/// What a process's fd 0 is, as far as ending its input goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A connected stream socket: shutting it down gives the reader EOF.
    StreamSocket,
    /// Something else (a pipe, a file, a datagram socket) or nothing.
    Other,
    /// Its fd 0 cannot be taken (`pidfd_getfd` missing before 5.6, or not permitted).
    Unreachable(String),
}

/// The side effects of reaping.
pub trait ProcessOps: Send + Sync + 'static {
    type Handle: Send + Sync;
    /// A handle that names exactly `v`: fails if the pid now belongs to another process, or
    /// the process no longer has `v`'s name or uid.
    fn open(&self, v: &Victim) -> Result<Self::Handle, OpenError>;
    /// Sends `signal` (`libc::SIGTERM`, …) through the handle. `Ok(false)`: already gone.
    fn signal(&self, handle: &Self::Handle, signal: i32) -> std::io::Result<bool>;
    /// What the process's fd 0 is.
    fn input(&self, handle: &Self::Handle) -> Input;
    /// Shuts the process's stdin socket down for reading (`shutdown(SHUT_RD)` on a duplicate
    /// of its fd 0): its next read returns EOF.
    fn close_input(&self, handle: &Self::Handle) -> std::io::Result<()>;
    /// Waits up to `timeout` for the process to exit; true if it did.
    fn wait_exit(
        &self,
        handle: &Self::Handle,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send;
    fn rss_bytes(&self, v: &Victim) -> Option<u64>;
    fn now_ns(&self) -> Nanos;
}

/// The ladder's first step for a target with this rule and input.
pub(crate) fn first_step(clean_end: CleanEnd, input: &Input) -> Step {
    match (clean_end, input) {
        (CleanEnd::CloseInput, Input::StreamSocket) => Step::Closed,
        (CleanEnd::CloseInput | CleanEnd::Interrupt, _) => Step::Interrupted,
        (CleanEnd::None, _) => Step::Terminated,
    }
}

/// The configuration in force as far as a reap already decided cares: a reload between the
/// decision and the first signal may cancel it ([`Policy::cancels`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Bumped by every reload.
    pub generation: u64,
    pub dry_run: bool,
    /// The rules' names.
    pub rules: Vec<String>,
}

impl Policy {
    pub(crate) fn new(generation: u64, config: &crate::config::Config) -> Self {
        Self {
            generation,
            dry_run: config.mode == crate::config::Mode::DryRun,
            rules: config.rules.iter().map(|r| r.name.clone()).collect(),
        }
    }

    /// Why `d`, decided under generation `decided`, must not start now; `None`: go on. A reload
    /// since that switched to dry-run, or removed the rule that chose the target (or the
    /// session its leftover belongs to), cancels it. Runaways are no rule's: only dry-run
    /// cancels them.
    pub(crate) fn cancels(&self, decided: u64, d: &Decision) -> Option<String> {
        if self.generation == decided || d.dry_run {
            return None;
        }
        if self.dry_run {
            return Some("a reload switched to dry-run before the first signal".into());
        }
        if d.reason != crate::detect::Reason::Runaway && !self.rules.contains(&d.rule) {
            return Some(format!(
                "a reload removed rule {:?} before the first signal",
                d.rule
            ));
        }
        None
    }
}

/// Carries out `d` and reports what happened. Never signals pid ≤ 1 or this process, never a
/// process that is not the one decided on, never a descendant of another uid than the target,
/// never a group or session.
pub async fn execute<O: ProcessOps>(ops: &O, d: &Decision) -> ReapReport {
    execute_unless(ops, d, |_| None).await
}

/// [`execute`], asking `cancelled` once more just before the first signal (after the pidfds
/// are opened and the identities verified, which takes a while): `Some(why)` stops it there,
/// with nothing done ([`Outcome::Cancelled`]).
pub(crate) async fn execute_unless<O: ProcessOps>(
    ops: &O,
    d: &Decision,
    cancelled: impl Fn(&Decision) -> Option<String>,
) -> ReapReport {
    let mut report = ReapReport {
        outcome: Outcome::Failed,
        step: None,
        steps: Vec::new(),
        rss_bytes: 0,
        gone_ns: None,
        error: None,
    };
    let me = std::process::id();
    let forbidden = |v: &Victim| v.id.pid <= 1 || v.id.pid == me;
    if forbidden(&d.target) {
        report.outcome = Outcome::Refused;
        report.error = Some(format!("pid {} is never signalled", d.target.id.pid));
        return report;
    }

    // Open every pidfd first: identity is verified before anything is done.
    let target = match ops.open(&d.target) {
        Ok(handle) => handle,
        Err(OpenError::Gone) => {
            report.outcome = Outcome::AlreadyGone;
            report.gone_ns = Some(ops.now_ns());
            return report;
        }
        Err(err @ OpenError::Mismatch { .. }) => {
            report.outcome = Outcome::IdentityMismatch;
            report.error = Some(err.to_string());
            return report;
        }
        Err(err @ OpenError::Io(_)) => {
            report.error = Some(err.to_string());
            return report;
        }
    };
    let descendants: Vec<O::Handle> = d
        .descendants
        .iter()
        .filter(|v| !forbidden(v) && v.uid == d.target.uid)
        .filter_map(|v| ops.open(v).ok())
        .collect();
    report.rss_bytes = std::iter::once(&d.target)
        .chain(&d.descendants)
        .filter_map(|v| ops.rss_bytes(v))
        .sum();

    let first = first_step(d.clean_end, &ops.input(&target));
    if d.dry_run {
        report.outcome = Outcome::WouldKill;
        report.step = Some(first);
        return report;
    }
    if let Some(why) = cancelled(d) {
        report.outcome = Outcome::Cancelled;
        report.step = Some(first);
        report.error = Some(why);
        return report;
    }

    // 1. The clean end, if the rule has one: the target alone; its tools and servers end
    //    with it (they watch their parent or their stdin).
    let clean = match first {
        Step::Closed => match ops.close_input(&target) {
            Ok(()) => Some(Step::Closed),
            // Its stdin changed under us, or the duplicate failed: SIGINT instead.
            Err(_) => Some(Step::Interrupted),
        },
        Step::Interrupted => Some(Step::Interrupted),
        Step::Terminated | Step::Killed => None,
    };
    if let Some(step) = clean {
        if step == Step::Interrupted {
            match ops.signal(&target, libc::SIGINT) {
                Ok(true) => {}
                Ok(false) => return gone(report, ops),
                Err(err) => {
                    report.error = Some(format!("SIGINT to the target: {err}"));
                    return report;
                }
            }
        }
        report.steps.push(step);
        if ops.wait_exit(&target, d.eof_grace).await {
            report.outcome = Outcome::Ended;
            report.step = Some(step);
            report.gone_ns = Some(ops.now_ns());
            // Descendants left behind continue down the ladder.
            terminate(ops, &descendants, d.grace, &mut report.steps).await;
            return report;
        }
    }

    // 2. SIGTERM, descendants deepest first, then the target: a parent that dies first can
    //    take its children with a harsher signal (the CLI's tools die by PR_SET_PDEATHSIG
    //    SIGKILL) or spawn more. A default-action SIGTERM fixes the exit signal when it is sent
    //    (`complete_signal()` in kernel/signal.c), so each process ends by the polite signal.
    for h in descendants.iter().rev() {
        let _ = ops.signal(h, libc::SIGTERM);
    }
    match ops.signal(&target, libc::SIGTERM) {
        Ok(true) => {}
        Ok(false) => return gone(report, ops),
        Err(err) => {
            report.error = Some(format!(
                "SIGTERM to the target: {err} ({} descendant(s) were sent SIGTERM)",
                descendants.len()
            ));
            return report;
        }
    }
    report.steps.push(Step::Terminated);
    if ops.wait_exit(&target, d.grace).await {
        report.outcome = Outcome::Ended;
        report.step = Some(Step::Terminated);
        report.gone_ns = Some(ops.now_ns());
    }

    // 3. Anyone still there after the grace gets SIGKILL (descendants may ignore SIGTERM).
    let mut killed = false;
    if report.gone_ns.is_none() {
        killed |= ops.signal(&target, libc::SIGKILL).unwrap_or(false);
    }
    for h in &descendants {
        if !ops.wait_exit(h, Duration::ZERO).await {
            killed |= ops.signal(h, libc::SIGKILL).unwrap_or(false);
        }
    }
    if killed {
        report.steps.push(Step::Killed);
    }
    if report.gone_ns.is_none() {
        if ops.wait_exit(&target, Duration::from_secs(5)).await {
            report.outcome = Outcome::Ended;
            report.step = Some(Step::Killed);
            report.gone_ns = Some(ops.now_ns());
        } else {
            report.error = Some("still alive 5 s after SIGKILL".into());
        }
    }
    report
}

fn gone<O: ProcessOps>(mut report: ReapReport, ops: &O) -> ReapReport {
    report.outcome = Outcome::AlreadyGone;
    report.gone_ns = Some(ops.now_ns());
    report
}

/// SIGTERM → `grace` → SIGKILL for the descendants still alive, deepest first.
async fn terminate<O: ProcessOps>(
    ops: &O,
    descendants: &[O::Handle],
    grace: Duration,
    steps: &mut Vec<Step>,
) {
    let mut alive = Vec::new();
    for h in descendants.iter().rev() {
        if ops.signal(h, libc::SIGTERM).unwrap_or(false) {
            alive.push(h);
        }
    }
    if alive.is_empty() {
        return;
    }
    steps.push(Step::Terminated);
    let until = tokio::time::Instant::now() + grace;
    let mut killed = false;
    for h in alive {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if !ops.wait_exit(h, left).await {
            killed |= ops.signal(h, libc::SIGKILL).unwrap_or(false);
        }
    }
    if killed {
        steps.push(Step::Killed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{detect::Reason, events::Identity};

    /// One process of the fake host.
    #[derive(Clone, Copy)]
    struct Proc {
        start: u64,
        alive: bool,
        /// Ignores SIGTERM (and SIGINT).
        stubborn: bool,
        /// Its stdin is a socket; shutting it down makes it exit (unless stubborn).
        socket_stdin: bool,
    }

    /// Records what would have been done; processes are rows in a table.
    #[derive(Default)]
    struct Fake {
        procs: Mutex<std::collections::HashMap<u32, Proc>>,
        /// (pid, signal); signal 0 stands for "input shut down".
        sent: Mutex<Vec<(u32, i32)>>,
        /// What dies with the target when it ends (its tools, by PR_SET_PDEATHSIG).
        die_with_target: Vec<u32>,
        target: u32,
    }

    impl Fake {
        fn with(procs: &[(u32, u64, bool)]) -> Self {
            let f = Self::default();
            for (pid, start, stubborn) in procs {
                f.procs.lock().unwrap().insert(
                    *pid,
                    Proc {
                        start: *start,
                        alive: true,
                        stubborn: *stubborn,
                        socket_stdin: false,
                    },
                );
            }
            f
        }

        fn socket_stdin(self, pid: u32) -> Self {
            self.procs
                .lock()
                .unwrap()
                .get_mut(&pid)
                .unwrap()
                .socket_stdin = true;
            self
        }

        fn end(&self, pid: u32) {
            let mut procs = self.procs.lock().unwrap();
            procs.get_mut(&pid).unwrap().alive = false;
            if pid == self.target {
                for d in &self.die_with_target {
                    procs.get_mut(d).unwrap().alive = false;
                }
            }
        }
    }

    impl ProcessOps for Fake {
        type Handle = u32;
        fn open(&self, v: &Victim) -> Result<u32, OpenError> {
            match self.procs.lock().unwrap().get(&v.id.pid) {
                Some(p) if p.alive && p.start == v.id.start_ticks => Ok(v.id.pid),
                Some(p) if p.alive => Err(OpenError::Mismatch {
                    pid: v.id.pid,
                    what: format!("start {}", p.start),
                }),
                _ => Err(OpenError::Gone),
            }
        }
        fn signal(&self, pid: &u32, signal: i32) -> std::io::Result<bool> {
            let p = self.procs.lock().unwrap()[pid];
            // A pidfd signal to a process that has exited delivers nothing (ESRCH).
            if p.alive {
                self.sent.lock().unwrap().push((*pid, signal));
            }
            if p.alive && (signal == libc::SIGKILL || !p.stubborn) {
                self.end(*pid);
            }
            Ok(p.alive)
        }
        fn input(&self, pid: &u32) -> Input {
            if self.procs.lock().unwrap()[pid].socket_stdin {
                Input::StreamSocket
            } else {
                Input::Other
            }
        }
        fn close_input(&self, pid: &u32) -> std::io::Result<()> {
            self.sent.lock().unwrap().push((*pid, 0));
            let p = self.procs.lock().unwrap()[pid];
            if !p.stubborn {
                self.end(*pid);
            }
            Ok(())
        }
        async fn wait_exit(&self, pid: &u32, _timeout: Duration) -> bool {
            !self.procs.lock().unwrap()[pid].alive
        }
        fn rss_bytes(&self, _v: &Victim) -> Option<u64> {
            Some(1000)
        }
        fn now_ns(&self) -> Nanos {
            42
        }
    }

    fn victim(pid: u32, start: u64) -> Victim {
        Victim {
            id: Identity {
                pid,
                start_ticks: start,
            },
            comm: "claude".into(),
            uid: 1000,
        }
    }

    fn decision(pid: u32, start: u64, descendants: &[(u32, u64)], clean_end: CleanEnd) -> Decision {
        Decision {
            target: victim(pid, start),
            descendants: descendants.iter().map(|(p, s)| victim(*p, *s)).collect(),
            other_uid: 0,
            rule: "claude-sdk".into(),
            reason: Reason::Idle,
            clean_end,
            eof_grace: Duration::from_secs(2),
            grace: Duration::from_secs(5),
            idle_secs: 900.0,
            deadline_ns: 1,
            ppid: 10,
            parent_comm: "node".into(),
            argv: "claude".into(),
            dry_run: false,
            kind: None,
            note: String::new(),
            attribution: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_socket_stdin_is_closed_and_nothing_is_signalled() {
        let mut ops = Fake::with(&[(100, 5, false), (101, 6, false)]).socket_stdin(100);
        ops.target = 100;
        ops.die_with_target = vec![101];
        let r = execute(&ops, &decision(100, 5, &[(101, 6)], CleanEnd::CloseInput)).await;
        assert_eq!((r.outcome, r.step), (Outcome::Ended, Some(Step::Closed)));
        assert_eq!(r.steps, [Step::Closed]);
        assert_eq!(
            *ops.sent.lock().unwrap(),
            [(100, 0)],
            "only the input was shut down"
        );
        assert_eq!(r.rss_bytes, 2000);
    }

    #[tokio::test]
    async fn a_pipe_stdin_gets_sigint() {
        let ops = Fake::with(&[(100, 5, false)]);
        let r = execute(&ops, &decision(100, 5, &[], CleanEnd::CloseInput)).await;
        assert_eq!(
            (r.outcome, r.step),
            (Outcome::Ended, Some(Step::Interrupted))
        );
        assert_eq!(*ops.sent.lock().unwrap(), [(100, libc::SIGINT)]);
    }

    #[tokio::test]
    async fn descendants_left_after_a_clean_end_continue_down_the_ladder_deepest_first() {
        let ops = Fake::with(&[(100, 5, false), (101, 6, false), (102, 7, true)]).socket_stdin(100);
        let r = execute(
            &ops,
            &decision(100, 5, &[(101, 6), (102, 7)], CleanEnd::CloseInput),
        )
        .await;
        assert_eq!(r.step, Some(Step::Closed));
        assert_eq!(r.steps, [Step::Closed, Step::Terminated, Step::Killed]);
        assert_eq!(
            *ops.sent.lock().unwrap(),
            [
                (100, 0),
                (102, libc::SIGTERM),
                (101, libc::SIGTERM),
                (102, libc::SIGKILL)
            ]
        );
    }

    #[tokio::test]
    async fn a_target_that_ignores_its_clean_end_gets_sigterm_after_the_eof_grace() {
        let ops = Fake::with(&[(100, 5, true), (101, 6, false)]).socket_stdin(100);
        let r = execute(&ops, &decision(100, 5, &[(101, 6)], CleanEnd::CloseInput)).await;
        assert_eq!((r.outcome, r.step), (Outcome::Ended, Some(Step::Killed)));
        assert_eq!(r.steps, [Step::Closed, Step::Terminated, Step::Killed]);
        assert_eq!(
            *ops.sent.lock().unwrap(),
            [
                (100, 0),
                (101, libc::SIGTERM),
                (100, libc::SIGTERM),
                (100, libc::SIGKILL)
            ]
        );
    }

    #[tokio::test]
    async fn a_rule_without_a_clean_end_starts_with_sigterm_descendants_first() {
        let ops =
            Fake::with(&[(100, 5, false), (101, 6, false), (102, 7, false)]).socket_stdin(100);
        // `descendants` come parents first: 101 is the child, 102 the grandchild.
        let r = execute(
            &ops,
            &decision(100, 5, &[(101, 6), (102, 7)], CleanEnd::None),
        )
        .await;
        assert_eq!(
            (r.outcome, r.step),
            (Outcome::Ended, Some(Step::Terminated))
        );
        assert_eq!(
            *ops.sent.lock().unwrap(),
            [
                (102, libc::SIGTERM),
                (101, libc::SIGTERM),
                (100, libc::SIGTERM)
            ]
        );
    }

    #[tokio::test]
    async fn a_reused_pid_is_never_signalled() {
        let ops = Fake::with(&[(100, 99, false)]);
        let r = execute(&ops, &decision(100, 5, &[], CleanEnd::None)).await;
        assert_eq!(r.outcome, Outcome::IdentityMismatch);
        assert!(ops.sent.lock().unwrap().is_empty());
        // Nor a reused descendant.
        let ops = Fake::with(&[(100, 5, false), (101, 77, false)]);
        execute(&ops, &decision(100, 5, &[(101, 6)], CleanEnd::None)).await;
        assert_eq!(*ops.sent.lock().unwrap(), [(100, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn a_descendant_of_another_uid_is_never_signalled() {
        let ops = Fake::with(&[(100, 5, false), (101, 6, false)]);
        let mut d = decision(100, 5, &[(101, 6)], CleanEnd::None);
        d.descendants[0].uid = 0; // a root `sudo` under a user's agent
        execute(&ops, &d).await;
        assert_eq!(*ops.sent.lock().unwrap(), [(100, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn pid_1_and_reaper_itself_are_refused() {
        let me = std::process::id();
        let ops = Fake::with(&[(1, 1, false), (me, 3, false), (200, 4, false)]);
        for pid in [0, 1, me] {
            let r = execute(
                &ops,
                &decision(pid, if pid == me { 3 } else { 1 }, &[], CleanEnd::None),
            )
            .await;
            assert_eq!(r.outcome, Outcome::Refused, "pid {pid}");
        }
        // …also as someone's descendant.
        execute(&ops, &decision(200, 4, &[(1, 1), (me, 3)], CleanEnd::None)).await;
        assert_eq!(*ops.sent.lock().unwrap(), [(200, libc::SIGTERM)]);
    }

    #[tokio::test]
    async fn dry_run_does_nothing_and_names_the_first_step() {
        let ops = Fake::with(&[(100, 5, false)]).socket_stdin(100);
        let mut d = decision(100, 5, &[], CleanEnd::CloseInput);
        d.dry_run = true;
        let r = execute(&ops, &d).await;
        assert_eq!(
            (r.outcome, r.step),
            (Outcome::WouldKill, Some(Step::Closed))
        );
        assert!(ops.sent.lock().unwrap().is_empty());
        assert_eq!(r.rss_bytes, 1000);
    }

    #[tokio::test]
    async fn a_reap_cancelled_before_its_first_signal_does_nothing() {
        let ops = Fake::with(&[(100, 5, false), (101, 6, false)]).socket_stdin(100);
        let d = decision(100, 5, &[(101, 6)], CleanEnd::CloseInput);
        let r = execute_unless(&ops, &d, |_| Some("a reload switched to dry-run".into())).await;
        assert_eq!(
            (r.outcome, r.step),
            (Outcome::Cancelled, Some(Step::Closed))
        );
        assert!(
            ops.sent.lock().unwrap().is_empty(),
            "nothing shut down or signalled"
        );
        assert!(r.error.unwrap().contains("dry-run"));
        // Not cancelled: the same decision goes ahead.
        let r = execute_unless(&ops, &d, |_| None).await;
        assert_eq!(r.outcome, Outcome::Ended);
        assert_eq!(ops.sent.lock().unwrap()[0], (100, 0));
    }

    #[test]
    fn a_reload_to_dry_run_or_without_the_rule_cancels_what_it_finds_pending() {
        let config = |text: &str| {
            crate::config::parse(text, "t", &crate::config::Overrides::default()).unwrap()
        };
        let rule = |name: &str| format!("[[rule]]\nname = \"{name}\"\ncomm = [\"claude\"]\n");
        let d = decision(100, 5, &[], CleanEnd::CloseInput); // rule "claude-sdk", enforcing
        let decided = Policy::new(1, &config(&rule("claude-sdk")));
        assert_eq!(decided.cancels(1, &d), None, "no reload since the decision");
        let same = Policy::new(2, &config(&rule("claude-sdk")));
        assert_eq!(
            same.cancels(1, &d),
            None,
            "a reload that keeps the mode and the rule"
        );
        let dry = Policy::new(
            2,
            &config(&format!("mode = \"dry-run\"\n{}", rule("claude-sdk"))),
        );
        assert!(dry.cancels(1, &d).unwrap().contains("dry-run"));
        let other = Policy::new(2, &config(&rule("other")));
        assert!(
            other
                .cancels(1, &d)
                .unwrap()
                .contains("removed rule \"claude-sdk\"")
        );
        let mut runaway = decision(100, 5, &[], CleanEnd::Interrupt);
        (runaway.rule, runaway.reason) = ("runaway".into(), Reason::Runaway);
        assert_eq!(other.cancels(1, &runaway), None, "runaways are no rule's");
        assert!(dry.cancels(1, &runaway).is_some());
    }

    #[tokio::test]
    async fn a_target_gone_before_the_signal_is_not_a_failure() {
        let ops = Fake::with(&[]);
        let r = execute(&ops, &decision(100, 5, &[], CleanEnd::CloseInput)).await;
        assert_eq!(r.outcome, Outcome::AlreadyGone);
        assert!(ops.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn the_first_step_follows_the_rule_and_the_input() {
        assert_eq!(
            first_step(CleanEnd::CloseInput, &Input::StreamSocket),
            Step::Closed
        );
        assert_eq!(
            first_step(CleanEnd::CloseInput, &Input::Other),
            Step::Interrupted
        );
        assert_eq!(
            first_step(CleanEnd::CloseInput, &Input::Unreachable("ENOSYS".into())),
            Step::Interrupted
        );
        assert_eq!(
            first_step(CleanEnd::Interrupt, &Input::StreamSocket),
            Step::Interrupted
        );
        assert_eq!(
            first_step(CleanEnd::None, &Input::StreamSocket),
            Step::Terminated
        );
    }
}
