use std::collections::HashMap as Map;

use super::*;
use crate::{
    config::{Overrides, parse},
    events::{Argv, ExitStatus},
    tree::Snapshot,
};

const S: Nanos = 1_000_000_000;

#[derive(Default)]
struct FakeHost {
    tty: Map<u32, i32>,
    cpu: Map<u32, u64>,
    sock: Map<u32, SockActivity>,
    watched: Map<u32, u32>,
}

impl Host for FakeHost {
    fn tty_nr(&self, pid: u32) -> Option<i32> {
        Some(self.tty.get(&pid).copied().unwrap_or(0))
    }
    fn cpu_ticks(&self, id: Identity) -> Option<u64> {
        Some(self.cpu.get(&id.pid).copied().unwrap_or(0))
    }
    fn io_bytes(&self, _id: Identity) -> Option<u64> {
        Some(0)
    }
    fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.sock.get(&target).copied()
    }
    fn watch(&mut self, pid: u32, target: u32) {
        self.watched.insert(pid, target);
    }
    fn unwatch(&mut self, target: u32, pids: &[u32]) {
        self.watched.remove(&target);
        for p in pids {
            self.watched.remove(p);
        }
    }
}

fn config(extra: &str) -> Config {
    let text = format!(
        "idle_timeout = \"10s\"\norphan_grace = \"3s\"\nmax_kills_per_minute = 3\n{extra}\n\
         [[rule]]\nname = \"claude-sdk\"\ncomm = [\"claude\", \"claude.exe\"]\n\
         argv_any = [\"--input-format=stream-json\", \"--output-format=stream-json\"]\n"
    );
    parse(&text, "test", &Overrides::default()).unwrap()
}

fn id(pid: u32) -> Identity {
    Identity { pid, start_ticks: u64::from(pid) }
}

const SDK: &[&str] = &["/opt/claude", "--output-format", "stream-json", "--input-format", "stream-json"];

/// init(1) → node(10); the test execs claude children under node.
fn world() -> ProcessTree {
    let snap = |pid, ppid, comm: &str| Snapshot {
        id: id(pid),
        ppid,
        uid: 0,
        comm: comm.into(),
        exe: String::new(),
        argv: Argv::from_args(&[comm]),
        argv_truncated: false,
    };
    ProcessTree::from_scan(vec![snap(1, 0, "init"), snap(10, 1, "node")])
}

struct World {
    tree: ProcessTree,
    det: Detector,
    host: FakeHost,
    mono: Instant,
}

impl World {
    fn new(extra: &str) -> Self {
        Self {
            tree: world(),
            det: Detector::new(&config(extra), Source::Socket),
            host: FakeHost::default(),
            mono: Instant::now(),
        }
    }

    fn apply(&mut self, e: Event) {
        self.tree.apply(&e);
        self.det.on_event(&self.tree, &e, &mut self.host);
    }

    fn spawn(&mut self, pid: u32, ppid: u32, argv: &[&str], at: Nanos) {
        self.apply(Event::Fork { id: id(pid), time_ns: at, parent: id(ppid), uid: 0, comm: "node".into() });
        self.apply(Event::Exec {
            id: id(pid),
            time_ns: at,
            parent_pid: ppid,
            uid: 0,
            comm: argv[0].rsplit('/').next().unwrap().into(),
            filename: argv[0].into(),
            argv: Argv::from_args(argv),
            argv_truncated: false,
            filename_truncated: false,
        });
    }

    fn exit(&mut self, pid: u32, at: Nanos) {
        self.apply(Event::Exit { id: id(pid), time_ns: at, status: ExitStatus(0), reaper_pid: 1 });
    }

    fn tick(&mut self, now: Nanos) -> Vec<ReapOrder> {
        let mono = self.mono + Duration::from_nanos(now);
        self.det.tick(&self.tree, now, mono, &mut self.host)
    }
}

#[test]
fn an_sdk_child_becomes_a_watched_target_and_a_shell_does_not() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(21, 10, &["/bin/bash", "-c", "claude --input-format stream-json"], S);
    assert_eq!(w.det.target_count(), 1);
    assert_eq!(w.host.watched.get(&20), Some(&20));
    assert!(!w.host.watched.contains_key(&21));
}

#[test]
fn an_idle_target_is_due_at_its_deadline_not_before() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    assert!(w.tick(5 * S).is_empty());
    let wake = w.det.next_wakeup().unwrap();
    assert!(wake <= 11 * S, "wakes for the deadline or a sample: {wake}");
    assert!(w.tick(11 * S - 1).is_empty());
    let orders = w.tick(11 * S);
    assert_eq!(orders.len(), 1);
    let o = &orders[0];
    assert_eq!((o.target.id, o.reason, o.ppid, o.parent_comm.as_str()), (id(20), Reason::Idle, 10, "node"));
    assert_eq!(o.deadline_ns, 11 * S);
    assert!(!o.dry_run);
    assert!(w.tick(12 * S).is_empty(), "one order at a time");
}

#[test]
fn socket_bytes_keep_a_target_alive() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    for second in 2..30 {
        w.host.sock.insert(20, SockActivity { last_ns: second * S, bytes: second * 100 });
        assert!(w.tick(second * S + S / 2).is_empty(), "at {second}s");
    }
    let v = &w.det.views(&w.tree, 30 * S)[0];
    assert_eq!(v.evidence.last_activity_kind, ActivityKind::Socket);
    assert_eq!(v.verdict.state(), "active");
}

#[test]
fn cpu_above_the_threshold_is_activity_and_below_is_not() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    // 50 % of a core (ticks_per_second/2 per second) for 20 s.
    let hz = crate::events::ticks_per_second();
    let mut t = S;
    while t < 21 * S {
        t += S;
        w.host.cpu.insert(20, (t / S) * hz / 2);
        assert!(w.tick(t).is_empty());
    }
    // Then ≈ 0.13 %: a leaked CLI's idle hum.
    let base = w.host.cpu[&20];
    let mut orders = Vec::new();
    while orders.is_empty() && t < 60 * S {
        t += S / 4;
        w.host.cpu.insert(20, base + (t - 21 * S) * hz / 750 / S);
        orders = w.tick(t);
    }
    let idle_for = secs(t) - 21.0;
    assert!((9.0..=11.5).contains(&idle_for), "reaped {idle_for:.2}s after the CPU stopped");
}

#[test]
fn a_busy_descendant_keeps_its_target_alive() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/bin/sh", "-c", "make"], 2 * S);
    assert_eq!(w.host.watched.get(&20), Some(&20));
    for second in 3..25 {
        // The tool (pid 30) execs a compiler every second.
        w.apply(Event::Exec {
            id: id(30),
            time_ns: second * S,
            parent_pid: 20,
            uid: 0,
            comm: "cc".into(),
            filename: "/usr/bin/cc".into(),
            argv: Argv::from_args(&["cc"]),
            argv_truncated: false,
            filename_truncated: false,
        });
        assert!(w.tick(second * S).is_empty());
    }
    let orders = w.tick(40 * S);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].descendants.len(), 1, "the descendant goes with it");
    assert_eq!(orders[0].descendants[0].id, id(30));
}

#[test]
fn an_orphan_is_due_after_the_grace_whatever_its_activity() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.exit(10, 2 * S);
    assert_eq!(w.tree.get(20).unwrap().ppid, 1);
    w.host.sock.insert(20, SockActivity { last_ns: 4 * S, bytes: 10 });
    assert!(w.tick(4 * S).is_empty());
    let orders = w.tick(5 * S);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].reason, Reason::Orphaned);
}

#[test]
fn dry_run_reports_once_until_new_activity() {
    let mut w = World::new("mode = \"dry-run\"");
    w.spawn(20, 10, SDK, S);
    let orders = w.tick(11 * S);
    assert!(orders[0].dry_run);
    w.det.on_report(
        &ReapReport {
            target: id(20),
            rule: "claude-sdk".into(),
            reason: Reason::Idle,
            outcome: crate::reap::Outcome::WouldKill,
            signals: vec![],
            rss_bytes: 0,
            signalled: 0,
            deadline_ns: 11 * S,
            gone_ns: None,
            error: None,
        },
        11 * S,
    );
    assert!(w.tick(12 * S).is_empty());
    assert!(w.tick(100 * S).is_empty());
    w.host.sock.insert(20, SockActivity { last_ns: 101 * S, bytes: 5 });
    assert!(w.tick(101 * S).is_empty());
    assert_eq!(w.tick(112 * S).len(), 1, "idle again after new activity");
}

#[test]
fn the_rate_limit_caps_kills() {
    let mut w = World::new("");
    for pid in 20..25 {
        w.spawn(pid, 10, SDK, S);
    }
    assert_eq!(w.tick(11 * S).len(), 3, "max_kills_per_minute = 3");
    assert!(w.tick(12 * S).is_empty());
    assert_eq!(w.tick(72 * S).len(), 2, "the rest a minute later");
}

#[test]
fn matching_follows_comm_changes() {
    let mut w = World::new("");
    // A runtime that sets its title to "claude" after exec (exe basename is "cli-main").
    let argv = ["/opt/cli-main", "--input-format=stream-json"];
    w.spawn(20, 10, &argv, S);
    assert_eq!(w.det.target_count(), 0);
    w.apply(Event::Rename { id: id(20), time_ns: 2 * S, comm: "claude".into() });
    assert_eq!(w.det.target_count(), 1, "became a target by its new comm");
    w.apply(Event::Rename { id: id(20), time_ns: 3 * S, comm: "worker".into() });
    assert_eq!(w.det.target_count(), 0, "renamed away: no longer a target");
    assert!(w.host.watched.is_empty());
    // The executable's basename still counts when comm changes.
    w.spawn(21, 10, SDK, S);
    w.apply(Event::Rename { id: id(21), time_ns: 3 * S, comm: "worker".into() });
    assert_eq!(w.det.target_count(), 1);
}

#[test]
fn a_target_that_exits_is_forgotten_and_unwatched() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/bin/sleep", "9"], S);
    w.exit(20, 2 * S);
    assert_eq!(w.det.target_count(), 0);
    assert!(w.host.watched.is_empty(), "{:?}", w.host.watched);
    assert!(w.tick(100 * S).is_empty());
}

#[test]
fn explain_says_why_not() {
    let mut w = World::new("");
    w.spawn(21, 10, &["/usr/bin/claudex", "--input-format=stream-json"], S);
    let e = w.det.explain(&w.tree, 21, 2 * S, &w.host);
    assert!(!e.rules[0].matches);
    assert!(e.rules[0].why_not.as_ref().unwrap().contains("claudex"));
    assert!(e.target.is_none());
    w.spawn(20, 10, SDK, S);
    let e = w.det.explain(&w.tree, 20, 2 * S, &w.host);
    assert!(e.rules[0].matches);
    assert_eq!(e.target.unwrap().verdict.state(), "active");
}

#[test]
fn a_reload_keeps_evidence_and_applies_new_rules() {
    let mut w = World::new("mode = \"dry-run\"");
    w.spawn(20, 10, SDK, S);
    w.host.sock.insert(20, SockActivity { last_ns: 5 * S, bytes: 1 });
    assert!(w.tick(5 * S).is_empty());
    // A longer timeout and enforce mode: the target stays, its last activity (5 s) too.
    let mut longer = config("mode = \"enforce\"");
    longer.rules[0].idle_timeout = Duration::from_secs(20);
    w.det.reconfigure(&longer, &w.tree, 6 * S, &mut w.host);
    assert_eq!(w.det.target_count(), 1);
    assert!(w.tick(24 * S).is_empty());
    let orders = w.tick(25 * S);
    assert_eq!(orders.len(), 1);
    assert!(!orders[0].dry_run);
    // A configuration whose rule no longer matches drops the target and unwatches it.
    let other = parse(
        "[[rule]]\nname = \"other\"\ncomm = [\"codex\"]\n",
        "test",
        &Overrides::default(),
    )
    .unwrap();
    w.det.reconfigure(&other, &w.tree, 26 * S, &mut w.host);
    assert_eq!(w.det.target_count(), 0);
    assert!(w.host.watched.is_empty());
}

#[test]
fn a_killed_target_is_never_ordered_again_while_its_exit_is_on_its_way() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    let orders = w.tick(11 * S);
    assert_eq!(orders.len(), 1);
    let report = |outcome| ReapReport {
        target: id(20),
        rule: "claude-sdk".into(),
        reason: Reason::Idle,
        outcome,
        signals: vec!["SIGTERM"],
        rss_bytes: 0,
        signalled: 1,
        deadline_ns: 11 * S,
        gone_ns: Some(11 * S),
        error: None,
    };
    w.det.on_report(&report(crate::reap::Outcome::Terminated), 11 * S);
    // The exit event has not arrived yet: no second order, however long it takes.
    assert!(w.tick(12 * S).is_empty());
    assert!(w.tick(100 * S).is_empty());
    assert_eq!(w.det.next_wakeup(), None);
    w.exit(20, 12 * S);
    assert_eq!(w.det.target_count(), 0);
}
