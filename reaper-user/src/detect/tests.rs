use std::collections::HashMap as Map;

use super::*;
use crate::{
    config::{Overrides, parse},
    detect::verdict::{ActivityKind, Verdict},
    events::{Argv, Event, ExitStatus},
    tree::{Image, Process, Snapshot},
};

const S: Nanos = 1_000_000_000;

#[derive(Default)]
struct FakeHost {
    tty: Map<u32, i32>,
    cpu: Map<u32, u64>,
    sock: Map<u32, SockActivity>,
    io: Map<u32, u64>,
    watched: Map<u32, u32>,
    /// The kernel's watch map holds this many pids at most.
    watch_capacity: Option<usize>,
    conns: Map<u32, session::Connections>,
    rss: Map<u32, u64>,
    names: Vec<String>,
    /// `/proc/PID/exe` and `cmdline` by pid, with the start time of the process that has them.
    images: Map<u32, (u64, Image)>,
    /// How many times an image was read.
    image_reads: std::cell::Cell<usize>,
    /// What `now_ns` answers.
    now: Nanos,
}

impl Host for FakeHost {
    fn now_ns(&self) -> Nanos {
        self.now
    }
    fn image(&self, id: Identity) -> Option<Image> {
        self.image_reads.set(self.image_reads.get() + 1);
        self.images
            .get(&id.pid)
            .filter(|(start, _)| *start == id.start_ticks)
            .map(|(_, image)| image.clone())
    }
    fn tty_nr(&self, pid: u32) -> Option<i32> {
        Some(self.tty.get(&pid).copied().unwrap_or(0))
    }
    fn cpu_ticks(&self, id: Identity) -> Option<u64> {
        Some(self.cpu.get(&id.pid).copied().unwrap_or(0))
    }
    fn io_bytes(&self, id: Identity) -> Option<u64> {
        Some(self.io.get(&id.pid).copied().unwrap_or(0))
    }
    fn sock_activity(&self, target: u32) -> Option<SockActivity> {
        self.sock.get(&target).copied()
    }
    fn watch(&mut self, pid: u32, target: u32) -> bool {
        if self
            .watch_capacity
            .is_some_and(|cap| self.watched.len() >= cap)
        {
            return false;
        }
        self.watched.insert(pid, target);
        true
    }
    fn unwatch(&mut self, target: u32, pids: &[u32]) {
        self.watched.remove(&target);
        for p in pids {
            self.watched.remove(p);
        }
    }
    fn member_exited(&mut self, pid: u32) {
        // The exit program removes it; user space only clears its filter bit.
        self.watched.remove(&pid);
    }
    fn cgroup(&self, _pid: u32) -> Option<String> {
        Some("0::/system.slice/agent.service\n".into())
    }
    fn watch_incomplete(&self, _target: u32) -> bool {
        false
    }
    fn watch_names(&mut self, names: &[&str]) {
        self.names = names.iter().map(|n| n.to_string()).collect();
    }
    fn connections(&self, pid: u32) -> Option<session::Connections> {
        Some(
            self.conns
                .get(&pid)
                .cloned()
                .unwrap_or(session::Connections {
                    stdin: Some("socket:[4242]".into()),
                    stdout: Some("socket:[4243]".into()),
                    session_leader: false,
                    uid: None,
                }),
        )
    }
    fn rss_bytes(&self, id: Identity) -> Option<u64> {
        Some(self.rss.get(&id.pid).copied().unwrap_or(1000))
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
    Identity {
        pid,
        start_ticks: u64::from(pid),
    }
}

const SDK: &[&str] = &[
    "/opt/claude",
    "--output-format",
    "stream-json",
    "--input-format",
    "stream-json",
];

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
}

impl World {
    fn new(extra: &str) -> Self {
        Self {
            tree: world(),
            det: Detector::new(&config(extra), ActivityMeter::Socket),
            host: FakeHost::default(),
        }
    }

    fn apply(&mut self, e: Event) {
        self.tree.apply(&e);
        self.det.on_event(&mut self.tree, &e, &mut self.host);
    }

    fn spawn(&mut self, pid: u32, ppid: u32, argv: &[&str], at: Nanos) {
        self.spawn_as(pid, ppid, argv, at, 0);
    }

    fn spawn_as(&mut self, pid: u32, ppid: u32, argv: &[&str], at: Nanos, uid: u32) {
        self.apply(Event::Fork {
            id: id(pid),
            time_ns: at,
            parent: id(ppid),
            uid,
            comm: "node".into(),
        });
        self.apply(Event::Exec {
            id: id(pid),
            time_ns: Some(at),
            parent_pid: ppid,
            uid,
            comm: argv[0].rsplit('/').next().unwrap().into(),
            filename: Some(argv[0].into()),
            argv: Argv::from_args(argv),
            argv_truncated: false,
            filename_truncated: false,
        });
    }

    fn exit(&mut self, pid: u32, at: Nanos) {
        self.apply(Event::Exit {
            id: id(pid),
            time_ns: at,
            status: ExitStatus(0),
            reaper_pid: 1,
        });
    }

    /// What the owner does at a wake-up: sample, then decide (after a flush).
    fn tick(&mut self, now: Nanos) -> Vec<Decision> {
        self.det.sample_due(&self.tree, now, &self.host);
        self.det.decide(&self.tree, now, &self.host)
    }

    /// The model's answer reached the target at `at` (and `bytes` have been counted so far).
    fn model_said(&mut self, target: u32, at: Nanos, bytes: u64) {
        self.host.sock.insert(
            target,
            SockActivity {
                last_ns: at,
                bytes,
                last_net_recv_ns: at,
            },
        );
    }
}

#[test]
fn an_sdk_child_becomes_a_watched_target_and_a_shell_does_not() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(
        21,
        10,
        &["/bin/bash", "-c", "claude --input-format stream-json"],
        S,
    );
    assert_eq!(w.det.target_count(), 1);
    assert_eq!(w.host.watched.get(&20), Some(&20));
    assert!(!w.host.watched.contains_key(&21));
}

#[test]
fn an_idle_target_is_due_at_its_deadline_not_before() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    assert!(w.tick(5 * S).is_empty());
    let wake = w.det.next_wakeup(5 * S).unwrap();
    assert!(wake <= 11 * S, "wakes for the deadline or a sample: {wake}");
    assert!(w.tick(11 * S - 1).is_empty());
    let orders = w.tick(11 * S);
    assert_eq!(orders.len(), 1);
    let o = &orders[0];
    assert_eq!(
        (o.target.id, o.reason, o.ppid, o.parent_comm.as_str()),
        (id(20), Reason::Idle, 10, "node")
    );
    assert_eq!(
        o.attribution.unit.as_deref(),
        Some("agent.service"),
        "whose agent it was"
    );
    assert_eq!(o.deadline_ns, 11 * S);
    assert!(!o.dry_run);
    assert!(w.tick(12 * S).is_empty(), "one order at a time");
}

#[test]
fn socket_bytes_keep_a_target_alive() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    for second in 2..30 {
        w.host.sock.insert(
            20,
            SockActivity {
                last_ns: second * S,
                bytes: second * 100,
                last_net_recv_ns: 0,
            },
        );
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
    assert!(
        (9.0..=11.5).contains(&idle_for),
        "reaped {idle_for:.2}s after the CPU stopped"
    );
}

/// A target under a 3 s idle timeout (sampled every 750 ms, where one tick is 1.3 % of a core)
/// that uses `per_mille` of a core from 2 s on; when it is ordered reaped, if it is before 30 s.
fn reaped_at_with_short_samples(per_mille: u64) -> Option<Nanos> {
    let mut c = config("");
    c.rules[0].idle_timeout = Duration::from_secs(3);
    let mut w = World {
        tree: world(),
        det: Detector::new(&c, ActivityMeter::Socket),
        host: FakeHost::default(),
    };
    w.spawn(20, 10, SDK, S);
    let hz = crate::events::ticks_per_second();
    let mut t = S;
    while t < 30 * S {
        t += S / 4;
        // What /proc shows: the CPU time used so far, truncated to whole ticks.
        let used = (t.saturating_sub(2 * S) * hz * per_mille / 1000) / S;
        w.host.cpu.insert(20, 50 * hz + used);
        if !w.tick(t).is_empty() {
            return Some(t);
        }
    }
    None
}

#[test]
fn the_rounding_of_cpu_readings_is_not_activity() {
    // A leaked CLI's idle hum of 1.8 % of a core reads as 1 or 2 ticks per 750 ms sample:
    // 1.3 % or 2.7 %. Two ticks alone are not surely above the 2 % threshold.
    let reaped = reaped_at_with_short_samples(18).expect("the humming target is reaped");
    assert!(
        (4 * S..=5 * S).contains(&reaped),
        "reaped at {:.2} s, not 3 s after it was adopted at 1 s",
        secs(reaped)
    );
    // 8 % (6 ticks per sample): surely above the threshold, never idle.
    assert_eq!(reaped_at_with_short_samples(80), None);
}

#[test]
fn a_family_busy_together_is_not_idle_though_each_member_hums() {
    // A target with nine tools (the default 15 min timeout: 10 s samples), each using 0.3 % of
    // a core: 3 % together, above the 2 % threshold. The rounding slack is taken once per
    // sample: taken per process read it would eat 20 of the family's 30 ticks and call it idle.
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    for pid in 30..39 {
        w.spawn(pid, 20, &["/usr/bin/python3", "tool.py"], S);
    }
    let hz = crate::events::ticks_per_second();
    let mut t = S;
    while t < 40 * 60 * S {
        t += S;
        for pid in (20..21).chain(30..39) {
            // Each reading truncated to whole ticks, as /proc shows it.
            w.host.cpu.insert(pid, (t - S) * hz * 3 / 1000 / S);
        }
        assert!(
            w.tick(t).is_empty(),
            "a family using 3 % of a core was judged idle at {:.0} s",
            secs(t)
        );
    }
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
            time_ns: Some(second * S),
            parent_pid: 20,
            uid: 0,
            comm: "cc".into(),
            filename: Some("/usr/bin/cc".into()),
            argv: Argv::from_args(&["cc"]),
            argv_truncated: false,
            filename_truncated: false,
        });
        assert!(w.tick(second * S).is_empty());
    }
    let orders = w.tick(40 * S);
    assert_eq!(orders.len(), 1);
    assert_eq!(
        orders[0].descendants.len(),
        1,
        "the descendant goes with it"
    );
    assert_eq!(orders[0].descendants[0].id, id(30));
}

#[test]
fn an_orphan_is_due_after_the_grace_whatever_its_activity() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.exit(10, 2 * S);
    assert_eq!(w.tree.get(20).unwrap().ppid, 1);
    w.host.sock.insert(
        20,
        SockActivity {
            last_ns: 4 * S,
            bytes: 10,
            last_net_recv_ns: 0,
        },
    );
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
    w.det.settle(id(20), Settled::WouldKill);
    assert!(w.tick(12 * S).is_empty());
    assert!(w.tick(100 * S).is_empty());
    w.host.sock.insert(
        20,
        SockActivity {
            last_ns: 101 * S,
            bytes: 5,
            last_net_recv_ns: 0,
        },
    );
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
    assert_eq!(
        w.det.rate_limit_deferrals(),
        1,
        "the fourth waits (and the fifth with it)"
    );
    assert!(w.tick(12 * S).is_empty());
    assert_eq!(w.tick(72 * S).len(), 2, "the rest a minute later");
}

#[test]
fn the_rate_limit_counts_every_process_a_reap_signals() {
    // max_kills_per_minute = 3: a target with two descendants takes all three slots.
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/bin/sh"], S);
    w.spawn(31, 20, &["/usr/bin/node"], S);
    w.spawn(21, 10, SDK, S);
    let orders = w.tick(11 * S);
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(
        (orders[0].target.id.pid, orders[0].descendants.len()),
        (20, 2)
    );
    assert_eq!(
        w.det.rate_limit_deferrals(),
        1,
        "21 waits: its target and descendants filled the minute"
    );
    assert!(w.tick(70 * S).is_empty(), "21 waits for the minute");
    assert_eq!(
        w.tick(71 * S)
            .iter()
            .map(|d| d.target.id.pid)
            .collect::<Vec<_>>(),
        [21]
    );
}

#[test]
fn a_reap_larger_than_the_limit_waits_for_an_empty_minute_and_goes_alone() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(25, 10, SDK, S);
    for child in 30..34 {
        w.spawn(child, 25, &["/bin/sh"], S);
    }
    w.spawn(26, 10, SDK, 2 * S);
    // 20 goes; 25 (five processes, over the limit of 3) waits for a minute without kills,
    // and 26, due later, does not jump the queue meanwhile.
    assert_eq!(
        w.tick(11 * S)
            .iter()
            .map(|d| d.target.id.pid)
            .collect::<Vec<_>>(),
        [20]
    );
    assert!(
        w.tick(12 * S).is_empty(),
        "26 is not due before 12 s, and then waits behind 25"
    );
    // Woken only for samples meanwhile (no spinning), and nothing goes before the minute.
    let mut now = 12 * S;
    let mut wakes = 0;
    while now < 71 * S {
        now = w.det.next_wakeup(now).unwrap().max(now + 1).min(71 * S - 1);
        assert!(
            w.tick(now).is_empty(),
            "something went at {now} before the window emptied"
        );
        wakes += 1;
        if now == 71 * S - 1 {
            break;
        }
    }
    assert!(wakes < 60, "{wakes} wake-ups in a minute: it spins");
    let orders = w.tick(71 * S);
    assert_eq!(
        orders.iter().map(|d| d.target.id.pid).collect::<Vec<_>>(),
        [25],
        "alone: {orders:?}"
    );
    assert_eq!(orders[0].descendants.len(), 4);
    assert!(w.tick(72 * S).is_empty(), "the window is full again");
    assert_eq!(
        w.tick(131 * S)
            .iter()
            .map(|d| d.target.id.pid)
            .collect::<Vec<_>>(),
        [26]
    );
}

#[test]
fn matching_follows_comm_changes() {
    let mut w = World::new("");
    // A runtime that sets its title to "claude" after exec (exe basename is "cli-main").
    let argv = ["/opt/cli-main", "--input-format=stream-json"];
    w.spawn(20, 10, &argv, S);
    assert_eq!(w.det.target_count(), 0);
    w.apply(Event::Rename {
        id: id(20),
        time_ns: 2 * S,
        comm: "claude".into(),
    });
    assert_eq!(w.det.target_count(), 1, "became a target by its new comm");
    w.apply(Event::Rename {
        id: id(20),
        time_ns: 3 * S,
        comm: "worker".into(),
    });
    assert_eq!(w.det.target_count(), 0, "renamed away: no longer a target");
    assert!(w.host.watched.is_empty());
    // The executable's basename still counts when comm changes.
    w.spawn(21, 10, SDK, S);
    w.apply(Event::Rename {
        id: id(21),
        time_ns: 3 * S,
        comm: "worker".into(),
    });
    assert_eq!(w.det.target_count(), 1);
}

#[test]
fn a_target_that_exits_is_forgotten_and_unwatched() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/bin/sleep", "9"], S);
    w.host.conns.insert(30, detached()); // not a leftover that is reaped
    w.exit(20, 2 * S);
    assert_eq!(w.det.target_count(), 0);
    assert!(w.host.watched.is_empty(), "{:?}", w.host.watched);
    assert!(w.tick(100 * S).is_empty());
}

#[test]
fn explain_says_why_not() {
    let mut w = World::new("");
    w.spawn(
        21,
        10,
        &["/usr/bin/claudex", "--input-format=stream-json"],
        S,
    );
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
    w.host.sock.insert(
        20,
        SockActivity {
            last_ns: 5 * S,
            bytes: 1,
            last_net_recv_ns: 0,
        },
    );
    assert!(w.tick(5 * S).is_empty());
    // A longer timeout and enforce mode: the target stays, its last activity (5 s) too.
    let mut longer = config("mode = \"enforce\"");
    longer.rules[0].idle_timeout = Duration::from_secs(20);
    w.det.reconfigure(&longer, &mut w.tree, 6 * S, &mut w.host);
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
    w.det.reconfigure(&other, &mut w.tree, 26 * S, &mut w.host);
    assert_eq!(w.det.target_count(), 0);
    assert!(w.host.watched.is_empty());
}

#[test]
fn a_killed_target_is_never_ordered_again_while_its_exit_is_on_its_way() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    let orders = w.tick(11 * S);
    assert_eq!(orders.len(), 1);
    w.det.settle(id(20), Settled::Gone);
    // The exit event has not arrived yet: no second order, however long it takes.
    assert!(w.tick(12 * S).is_empty());
    assert!(w.tick(100 * S).is_empty());
    assert_eq!(w.det.next_wakeup(100 * S), None);
    w.exit(20, 12 * S);
    assert_eq!(w.det.target_count(), 0);
}

// --- turns in flight ----------------------------------------------------------------------

#[test]
fn a_turn_waiting_on_a_silent_tool_is_never_idle_and_its_end_restarts_the_clock() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    // The model asks for a tool at 2 s; the CLI starts bash right after, which stays silent.
    w.model_said(20, 2 * S, 500);
    w.spawn(
        30,
        20,
        &["/bin/bash", "-c", "timeout 50 tail -f /dev/null"],
        2 * S + 5_000_000,
    );
    for second in 3..100 {
        assert!(
            w.tick(second * S).is_empty(),
            "killed mid-turn at {second}s"
        );
    }
    let v = &w.det.views(&w.tree, 100 * S)[0];
    assert_eq!(
        v.verdict,
        Verdict::TurnInFlight {
            waiting_on: 30,
            since: 2 * S + 5_000_000
        }
    );
    assert_eq!(v.waiting_on_comm.as_deref(), Some("bash"));
    // The tool ends at 100 s: the turn is over, the target idle 10 s later.
    w.exit(30, 100 * S);
    assert_eq!(w.det.views(&w.tree, 100 * S)[0].verdict.state(), "active");
    assert!(w.tick(109 * S).is_empty());
    assert_eq!(w.tick(110 * S).len(), 1);
}

#[test]
fn children_older_than_the_models_last_word_do_not_hold_a_turn() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    // Two stdio MCP servers at session start, then the turn talks to the model and ends.
    w.spawn(30, 20, &["/usr/bin/node", "mcp-a.js"], S + 1_000_000);
    w.spawn(31, 20, &["/usr/bin/python3", "mcp-b.py"], S + 2_000_000);
    w.model_said(20, 3 * S, 900);
    assert!(w.tick(4 * S).is_empty());
    assert_eq!(w.det.views(&w.tree, 4 * S)[0].verdict.state(), "active");
    let orders = w.tick(13 * S);
    assert_eq!(
        orders.len(),
        1,
        "a leaked CLI with its MCP servers is still reaped"
    );
    assert_eq!(orders[0].descendants.len(), 2);
}

#[test]
fn a_target_that_never_heard_from_the_network_has_no_turn_in_flight() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/usr/bin/node", "mcp.js"], 2 * S);
    assert_eq!(w.tick(12 * S).len(), 1);
}

#[test]
fn a_background_task_started_mid_turn_does_not_hold_the_target_once_the_model_answered() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.model_said(20, 2 * S, 100);
    w.spawn(30, 20, &["/bin/bash", "-c", "npm run dev"], 2 * S + 1);
    assert!(w.tick(4 * S).is_empty());
    assert_eq!(
        w.det.views(&w.tree, 4 * S)[0].verdict.state(),
        "turn_in_flight"
    );
    // The CLI tells the model the task runs in the background; the model answers.
    w.model_said(20, 5 * S, 200);
    assert!(w.tick(7 * S).is_empty());
    assert_eq!(w.det.views(&w.tree, 7 * S)[0].verdict.state(), "active");
    // Its dev server's own children (grandchildren of the target) do not hold it either.
    w.spawn(40, 30, &["/usr/bin/node", "server.js"], 8 * S);
    assert!(
        w.tick(17 * S).is_empty(),
        "the grandchild's exec was activity at 8 s"
    );
    assert_eq!(w.tick(18 * S).len(), 1);
}

// --- review fixes --------------------------------------------------------------------------

#[test]
fn a_target_found_under_init_at_start_up_is_reaped_only_when_idle() {
    // A busy `claude -p` started by a systemd unit: its parent is pid 1 from the start.
    let snap = |pid, ppid, comm: &str, argv: &[&str]| Snapshot {
        id: id(pid),
        ppid,
        uid: 0,
        comm: comm.into(),
        exe: String::new(),
        argv: Argv::from_args(argv),
        argv_truncated: false,
    };
    let mut w = World::new("");
    w.tree = ProcessTree::from_scan(vec![
        snap(1, 0, "init", &["init"]),
        snap(20, 1, "claude", SDK),
    ]);
    w.det.adopt_all(&mut w.tree, S, &mut w.host);
    assert_eq!(w.det.target_count(), 1);
    // Busy with the network every second, for far longer than orphan_grace (3 s).
    for second in 2..30 {
        w.host.sock.insert(
            20,
            SockActivity {
                last_ns: second * S,
                bytes: second,
                last_net_recv_ns: second * S,
            },
        );
        assert!(
            w.tick(second * S).is_empty(),
            "reaped while busy at {second}s"
        );
    }
    assert_eq!(w.tick(40 * S).len(), 1, "idle: reaped");
}

#[test]
fn children_forked_before_adoption_are_watched_in_the_kernel() {
    let mut w = World::new("");
    // The runtime renames itself to "claude" after exec; a child forked meanwhile.
    w.spawn(20, 10, &["/opt/cli-main", "--input-format=stream-json"], S);
    w.apply(Event::Rename {
        id: id(20),
        time_ns: 2 * S,
        comm: "claude".into(),
    });
    assert_eq!(w.det.target_count(), 1);
    w.spawn(30, 20, &["/bin/sh"], 3 * S);
    assert_eq!(
        w.host.watched.get(&30),
        Some(&20),
        "a fork of a target is watched"
    );
    w.spawn(31, 30, &["/bin/cat"], 4 * S);
    assert_eq!(
        w.host.watched.get(&31),
        Some(&20),
        "and a fork of its descendant"
    );
}

#[test]
fn a_target_whose_watch_failed_is_never_idle_reaped_but_still_an_orphan() {
    let mut w = World::new("");
    w.host.watch_capacity = Some(0);
    w.spawn(20, 10, SDK, S);
    assert!(w.det.views(&w.tree, S)[0].evidence.watch_failed);
    assert!(w.tick(1000 * S).is_empty());
    w.exit(10, 1001 * S);
    let orders = w.tick(1004 * S);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].reason, Reason::Orphaned);
}

#[test]
fn descendants_of_another_uid_are_left_out_of_the_decision() {
    let mut w = World::new("");
    w.spawn_as(20, 10, SDK, S, 1000);
    w.spawn_as(30, 20, &["/bin/bash"], 2 * S, 1000);
    w.spawn_as(31, 30, &["/usr/bin/sudo", "dpkg"], 3 * S, 0);
    let orders = w.tick(20 * S);
    assert_eq!(orders.len(), 1);
    assert_eq!(
        orders[0]
            .descendants
            .iter()
            .map(|v| v.id.pid)
            .collect::<Vec<_>>(),
        [30]
    );
    assert_eq!(orders[0].other_uid, 1);
}

#[test]
fn a_rate_limited_detector_sleeps_until_a_slot_frees() {
    let mut w = World::new("");
    for pid in 20..25 {
        w.spawn(pid, 10, SDK, S);
    }
    assert_eq!(w.tick(11 * S).len(), 3);
    // Two are due but have to wait for the minute: no wake-up before the slot frees, however
    // often the samples come (they are not due before).
    let wake = w.det.next_wakeup(11 * S).unwrap();
    assert!(wake >= 11 * S + 2 * S / 4, "woke at {wake}");
    let mut now = 11 * S;
    let mut wakes = 0;
    while now < 71 * S {
        now = w.det.next_wakeup(now).unwrap().max(now + 1);
        w.det.sample_due(&w.tree, now, &w.host);
        wakes += 1;
    }
    assert!(wakes < 40, "{wakes} wake-ups in a minute: it spins");
    assert_eq!(w.tick(71 * S).len(), 2);
}

#[test]
fn a_reload_keeps_the_kills_of_the_last_minute() {
    let mut w = World::new("");
    for pid in 20..25 {
        w.spawn(pid, 10, SDK, S);
    }
    assert_eq!(w.tick(11 * S).len(), 3);
    let same = config("");
    w.det.reconfigure(&same, &mut w.tree, 12 * S, &mut w.host);
    assert!(
        w.tick(12 * S).is_empty(),
        "a SIGHUP does not reset the rate limit"
    );
}

#[test]
fn explain_names_the_first_step_of_the_ladder() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    let e = w.det.explain(&w.tree, 20, 2 * S, &w.host);
    assert_eq!(
        e.attribution.as_ref().and_then(|a| a.unit.as_deref()),
        Some("agent.service")
    );
    assert!(crate::render::render_explanation(&e).contains("runs in: unit agent.service"));
    let step = e.first_step.unwrap();
    assert_eq!(step.clean_end, crate::config::CleanEnd::CloseInput);
    assert!(step.step.starts_with("close input"), "{}", step.step);
}

#[test]
fn bytes_since_the_last_sample_stop_the_decision() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    assert!(w.tick(9 * S).is_empty()); // sampled at 9 s; the next sample is due at 11.5 s
    // Just before the deadline (11 s) the daemon sends a new message; no sample since.
    w.host.sock.insert(
        20,
        SockActivity {
            last_ns: 10 * S + S / 2,
            bytes: 300,
            last_net_recv_ns: 0,
        },
    );
    assert!(w.tick(11 * S).is_empty(), "decided on stale evidence");
    assert_eq!(
        w.det.views(&w.tree, 11 * S)[0].evidence.last_activity,
        10 * S + S / 2
    );
}

// --- sessions, leftovers, runaways, memory pressure -----------------------------------------

/// A detached process: a session of its own, stdin /dev/null, output to a file.
fn detached() -> session::Connections {
    session::Connections {
        stdin: Some("/dev/null".into()),
        stdout: Some("/tmp/dev-server.log".into()),
        session_leader: true,
        uid: None,
    }
}

#[test]
fn a_reload_without_the_rule_leaves_its_sessions_leftovers_alone() {
    let mut w = World::new("leftover_grace = \"5s\"");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/usr/bin/node", "server.js"], 2 * S);
    w.exit(20, 10 * S);
    let other = parse(
        "leftover_grace = \"5s\"\n[[rule]]\nname = \"other\"\ncomm = [\"other\"]\n",
        "test",
        &Overrides::default(),
    )
    .unwrap();
    w.det.reconfigure(&other, &mut w.tree, 11 * S, &mut w.host);
    assert!(
        w.tick(16 * S).is_empty(),
        "its rule is gone: the leftover is only reported"
    );
    let s = w.det.explain(&w.tree, 30, 16 * S, &w.host).session.unwrap();
    assert!(
        s.leftover.contains("left alone") || s.leftover.contains("only reported"),
        "{}",
        s.leftover
    );
    // With the rule still there, the same leftover is reaped.
    let mut w = World::new("leftover_grace = \"5s\"");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/usr/bin/node", "server.js"], 2 * S);
    w.exit(20, 10 * S);
    assert_eq!(
        w.tick(16 * S)
            .iter()
            .map(|d| d.target.id.pid)
            .collect::<Vec<_>>(),
        [30]
    );
}

#[test]
fn a_stdio_server_left_behind_is_reaped_after_the_leftover_grace_and_a_detached_one_is_not() {
    let mut w = World::new("leftover_grace = \"5s\"");
    w.spawn(20, 10, SDK, S);
    // An MCP server behind an npx-style wrapper, and a dev server the user asked for.
    w.spawn(30, 20, &["/usr/bin/npm", "exec", "mcp-server"], 2 * S);
    w.spawn(31, 30, &["/usr/bin/node", "server.js"], 2 * S);
    w.spawn(40, 20, &["/bin/bash", "-c", "npm run dev"], 3 * S);
    w.host.conns.insert(40, detached());
    // The CLI exits (closed by its daemon); the wrapper exits without passing anything on.
    w.exit(20, 10 * S);
    w.exit(30, 10 * S + 1);
    assert_eq!(w.tree.get(31).unwrap().ppid, 1, "re-parented to init");
    assert!(w.tick(14 * S).is_empty(), "not before the grace");
    let orders = w.tick(15 * S);
    assert_eq!(orders.len(), 1, "{orders:?}");
    let o = &orders[0];
    assert_eq!(
        (o.target.id, o.reason, o.kind),
        (id(31), Reason::Leftover, Some(session::Kind::StdioServer))
    );
    assert_eq!(
        o.clean_end,
        crate::config::CleanEnd::None,
        "SIGTERM first: nobody is left to close its input"
    );
    assert!(
        w.tick(100 * S).is_empty(),
        "the detached one is only reported"
    );
    let e = w.det.explain(&w.tree, 40, 100 * S, &w.host);
    let s = e.session.unwrap();
    assert_eq!((s.target, s.ended), (id(20), true));
    assert!(s.leftover.contains("left alone"), "{}", s.leftover);
    let sessions = w.det.sessions(&w.tree, 100 * S, &w.host);
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0].state.as_str(), sessions[0].leftovers),
        ("ended", 2)
    );
    let kinds = w.det.session_counts(100 * S).leftovers;
    assert!(
        kinds.contains(&(session::Kind::Tool, 1))
            && kinds.contains(&(session::Kind::StdioServer, 1)),
        "{kinds:?}"
    );
}

#[test]
fn a_leftover_of_another_uid_is_never_signalled() {
    let mut w = World::new("leftover_grace = \"5s\"");
    w.spawn_as(20, 10, SDK, S, 1000);
    w.spawn_as(30, 20, &["/usr/bin/sudo", "mcp"], 2 * S, 0);
    w.exit(20, 10 * S);
    assert!(w.tick(20 * S).is_empty());
    assert!(
        w.det
            .explain(&w.tree, 30, 20 * S, &w.host)
            .session
            .unwrap()
            .leftover
            .contains("another uid")
    );
}

#[test]
fn a_rule_can_reap_every_leftover_or_none() {
    for (policy, expected) in [("all", 1), ("none", 0)] {
        let text = format!(
            "leftover_grace = \"5s\"\n[[rule]]\nname = \"claude-sdk\"\ncomm = [\"claude\"]\n\
             argv_any = [\"--input-format=stream-json\"]\nleftovers = \"{policy}\"\n"
        );
        let mut w = World::new("");
        w.det = Detector::new(
            &parse(&text, "test", &Overrides::default()).unwrap(),
            ActivityMeter::Socket,
        );
        w.spawn(20, 10, SDK, S);
        w.spawn(40, 20, &["/bin/bash", "-c", "npm run dev"], 3 * S);
        w.host.conns.insert(40, detached());
        w.exit(20, 10 * S);
        assert_eq!(w.tick(15 * S).len(), expected, "leftovers = {policy}");
    }
}

#[test]
fn the_sessions_view_shows_state_kinds_and_rss() {
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/usr/bin/node", "mcp.js"], 2 * S);
    w.host.rss.insert(20, 180 << 20);
    w.host.rss.insert(30, 40 << 20);
    let s = &w.det.sessions(&w.tree, 3 * S, &w.host)[0];
    assert_eq!(
        (s.target, s.state.as_str(), s.parent, s.parent_comm.as_str()),
        (id(20), "active", 10, "node")
    );
    assert_eq!(s.descendants.stdio_server, 1);
    assert_eq!(s.rss_bytes, 220 << 20);
    assert_eq!(s.attribution.unit.as_deref(), Some("agent.service"));
    let table = crate::render::render_sessions(&w.det.sessions(&w.tree, 3 * S, &w.host));
    assert!(
        table.lines().nth(1).unwrap().ends_with("agent.service"),
        "{table}"
    );
    // Quiet for more than a minute, but under its timeout (10 s here → leaked at once).
    assert_eq!(w.det.sessions(&w.tree, 12 * S, &w.host)[0].state, "leaked");
}

#[test]
fn a_cli_that_lost_its_terminal_and_burns_cpu_is_a_runaway_and_one_with_a_terminal_never() {
    let mut w = World::new("runaway_for = \"8s\"");
    // Two interactive CLIs (no stream-json argv: never targets) under shells that die.
    w.spawn(50, 10, &["/bin/bash"], S);
    w.spawn(51, 50, &["/usr/bin/claude"], S);
    w.spawn(60, 10, &["/bin/bash"], S);
    w.spawn(61, 60, &["/usr/bin/claude"], S);
    w.host.tty.insert(61, 34816); // its terminal is alive
    assert_eq!(w.det.target_count(), 0);
    w.exit(50, 2 * S);
    w.exit(60, 2 * S);
    let hz = crate::events::ticks_per_second();
    let mut orders = Vec::new();
    let mut t = 2 * S;
    while orders.is_empty() && t < 30 * S {
        t += S / 2;
        // 100 % of a core each.
        w.host.cpu.insert(51, (t / (S / 2)) * hz / 2);
        w.host.cpu.insert(61, (t / (S / 2)) * hz / 2);
        orders = w.tick(t);
    }
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(
        (orders[0].target.id, orders[0].reason),
        (id(51), Reason::Runaway)
    );
    assert!(
        (10 * S..=13 * S).contains(&t),
        "reaped at {}s, burning from ~2.5s, runaway_for 8s",
        t / S
    );
}

#[test]
fn under_memory_pressure_the_largest_quiet_target_goes_first_and_never_a_turn_in_flight() {
    // Idle timeout 10 s: the pressure comes at 10 s, before any of them is due.
    let mut w = World::new("memory_pressure_min_idle = \"5s\"");
    for pid in [20, 21, 22, 23] {
        w.spawn(pid, 10, SDK, S);
    }
    w.host.rss.insert(20, 100 << 20);
    w.host.rss.insert(21, 300 << 20); // the largest, but in a turn waiting on a tool
    w.host.rss.insert(22, 200 << 20);
    w.host.rss.insert(23, 900 << 20); // the largest of all, but talking
    w.model_said(21, 2 * S, 10);
    w.spawn(31, 21, &["/bin/bash", "-c", "make"], 2 * S + 1);
    assert!(w.tick(3 * S).is_empty());
    let reading = session::Pressure {
        some_avg10: Some(40.0),
        available_percent: Some(50.0),
    };
    w.host.sock.insert(
        23,
        SockActivity {
            last_ns: 9 * S,
            bytes: 99,
            last_net_recv_ns: 0,
        },
    );
    w.det.sample_due(&w.tree, 9 * S + S / 2, &w.host);
    let d = w
        .det
        .pressure_decision(&w.tree, 10 * S, &w.host, &reading)
        .unwrap();
    assert_eq!((d.target.id, d.reason), (id(22), Reason::MemoryPressure));
    assert!(d.note.contains("avg10=40.00"), "{}", d.note);
    let d = w
        .det
        .pressure_decision(&w.tree, 10 * S, &w.host, &reading)
        .unwrap();
    assert_eq!(d.target.id, id(20), "then the next largest");
    assert!(
        w.det
            .pressure_decision(&w.tree, 10 * S, &w.host, &reading)
            .is_none(),
        "never 21 or 23"
    );
}

#[test]
fn the_kernel_watches_the_rules_names_from_exec_and_a_non_target_is_unwatched() {
    let mut w = World::new("");
    w.det.publish_names(&mut w.host);
    assert_eq!(w.host.names, ["claude", "claude.exe"]);
    // The kernel watched this interactive `claude` at its exec (it has a terminal: no target).
    w.host.watched.insert(20, 20);
    w.host.tty.insert(20, 34816);
    w.spawn(20, 10, SDK, S);
    assert_eq!(w.det.target_count(), 0);
    assert!(
        !w.host.watched.contains_key(&20),
        "unwatched once it is known not to be a target"
    );
}

// --- the last word under /proc/PID/io ----------------------------------------------------

/// Activity from `/proc/PID/io` (kernels before 6.3): the target forks a tool at 2 s and its
/// I/O counters move at 2.2 s (seen by the sample after); `stamp` is its last TCP receive as
/// stamped in the kernel by `tcp:tcp_rcv_space_adjust` (0: none). Ticks every 100 ms up to
/// 30 s; returns when the target was first ordered reaped, and its states seen before.
fn proc_io_with_tool(stamp: Nanos) -> (Option<Nanos>, Vec<&'static str>) {
    let mut w = World::new("");
    w.det = Detector::new(&config(""), ActivityMeter::ProcIo);
    w.spawn(20, 10, SDK, S);
    w.spawn(30, 20, &["/bin/bash", "-c", "sleep 1000"], 2 * S);
    w.host.sock.insert(
        20,
        SockActivity {
            last_ns: 0,
            bytes: 0,
            last_net_recv_ns: stamp,
        },
    );
    let mut states = Vec::new();
    for tenth in 11..300 {
        let now = tenth * S / 10;
        if now == 22 * S / 10 {
            w.host.io.insert(20, 10 << 20);
        }
        if !w.tick(now).is_empty() {
            return (Some(now), states);
        }
        let state = w.det.views(&w.tree, now)[0].verdict.state();
        if states.last() != Some(&state) {
            states.push(state);
        }
    }
    (None, states)
}

/// A sample moments after the last one (a decision re-samples a due target) must not read a
/// leaked child's heartbeat as a rate: 16 bytes in 60 ms would be 266 B/s, above the 256 B/s
/// threshold, and a heartbeat that fell there at each idle deadline kept it alive forever.
#[test]
fn under_proc_io_a_sample_moments_after_the_last_reads_a_heartbeat_as_idle_and_a_burst_as_activity()
{
    let mut w = World::new("");
    w.det = Detector::new(&config(""), ActivityMeter::ProcIo);
    w.spawn(20, 10, SDK, S);
    let sample = |w: &mut World, now: Nanos, io: u64| {
        w.host.io.insert(20, io);
        let t = w.det.targets.get_mut(&20).expect("adopted");
        w.det.sampling.sample(t, &w.tree, now, &w.host);
        (t.evidence.last_activity, t.evidence.last_activity_kind)
    };
    let (idle_since, _) = sample(&mut w, 2 * S, 0);
    let heartbeat = 2 * S + 60_000_000;
    assert_eq!(
        sample(&mut w, heartbeat, 16).0,
        idle_since,
        "a 16-byte heartbeat"
    );
    let burst = heartbeat + 60_000_000;
    assert_eq!(
        sample(&mut w, burst, 16 + (10 << 10)),
        (burst, ActivityKind::Io),
        "10 KiB in 60 ms"
    );
}

#[test]
fn under_proc_io_a_tool_started_before_the_stamped_last_word_does_not_hold_the_turn() {
    // The model answered half a second after the tool started: in the same sample interval,
    // where the sampled bound (the sample before the bytes) would hold the turn.
    let (reaped, states) = proc_io_with_tool(2 * S + S / 2);
    assert_eq!(states, ["active"]);
    let at = reaped.expect("reaped");
    assert!(
        (12 * S..=16 * S).contains(&at),
        "reaped at {at}: idle 10 s after the bytes were seen"
    );
}

#[test]
fn under_proc_io_a_tool_started_after_the_stamped_last_word_holds_the_turn() {
    let (reaped, states) = proc_io_with_tool(2 * S - S / 2);
    assert_eq!(reaped, None);
    assert_eq!(states.last(), Some(&"turn_in_flight"));
}

#[test]
fn under_proc_io_without_a_stamp_the_last_word_is_the_sample_before_the_bytes() {
    // The bytes moved after the sample before 2.2 s: the tool forked at 2 s may be the turn's.
    let (reaped, states) = proc_io_with_tool(0);
    assert_eq!(reaped, None);
    assert_eq!(states.last(), Some(&"turn_in_flight"));
}

/// A process exec'd under a name no rule has: the kernel sends its exec without its image or
/// a time; `at` is its fork's, and the daemon's clock when it reads the exec.
fn exec_unread(w: &mut World, pid: u32, ppid: u32, exe: &str, at: Nanos) {
    w.host.now = at;
    w.apply(Event::Fork {
        id: id(pid),
        time_ns: at,
        parent: id(ppid),
        uid: 0,
        comm: "node".into(),
    });
    let basename = exe.rsplit('/').next().unwrap();
    w.apply(Event::Exec {
        id: id(pid),
        time_ns: None,
        parent_pid: ppid,
        uid: 0,
        // As the kernel sets it: the basename, cut to TASK_COMM_LEN - 1 bytes.
        comm: basename[..basename.len().min(reaper_common::COMM_LEN - 1)].into(),
        filename: None,
        argv: Argv::unknown(),
        argv_truncated: false,
        filename_truncated: false,
    });
}

/// `/proc/100` shows `exe` run with the SDK's argv, for a process started at `start_ticks`.
fn proc_image(w: &mut World, exe: &str, start_ticks: u64) {
    w.host.images.insert(
        100,
        (
            start_ticks,
            Image {
                exe: exe.into(),
                argv: Argv::from_args(SDK),
                argv_truncated: false,
            },
        ),
    );
}

/// `/proc/100` shows the SDK's argv, for a process started at `start_ticks`; then pid 100
/// renames itself to `claude` at 2 s.
fn renamed_to_claude_with_proc_argv(w: &mut World, start_ticks: u64) {
    proc_image(w, "/opt/cli-launcher", start_ticks);
    w.apply(Event::Rename {
        id: id(100),
        time_ns: 2 * S,
        comm: "claude".into(),
    });
}

#[test]
fn a_process_renamed_to_a_target_name_gets_its_image_from_proc_and_is_matched() {
    let mut w = World::new("");
    exec_unread(&mut w, 100, 10, "/opt/cli-launcher", S);
    let p = w.tree.get(100).unwrap();
    assert!(p.argv.is_unknown());
    assert_eq!(p.exe, "", "unknown");
    assert_eq!(w.det.target_count(), 0);
    assert_eq!(
        w.host.image_reads.get(),
        0,
        "no rule's name: /proc is not read"
    );
    renamed_to_claude_with_proc_argv(&mut w, id(100).start_ticks);
    let p = w.tree.get(100).unwrap();
    assert_eq!(p.argv, Argv::from_args(SDK), "filled from /proc");
    assert_eq!(p.exe, "/opt/cli-launcher", "filled from /proc");
    assert_eq!(
        w.det.target_count(),
        1,
        "and then matched by the rule's argv"
    );
    assert!(w.det.targets.contains_key(&100));
    assert_eq!(w.host.watched.get(&100), Some(&100));
}

#[test]
fn an_image_from_a_reused_pid_is_not_taken() {
    let mut w = World::new("");
    exec_unread(&mut w, 100, 10, "/opt/cli-launcher", S);
    // /proc/100 now belongs to another process (started later) with the SDK's argv.
    renamed_to_claude_with_proc_argv(&mut w, id(100).start_ticks + 7);
    assert_eq!(w.host.image_reads.get(), 1, "it was asked for");
    assert!(w.tree.get(100).unwrap().argv.is_unknown(), "not filled");
    assert_eq!(w.det.target_count(), 0, "and not matched");
    assert!(!w.host.watched.contains_key(&100));
}

#[test]
fn a_members_unstamped_exec_is_its_targets_activity_at_the_daemons_clock() {
    // Forked before the kernel watched it (its target adopted in between), a member's exec
    // comes without a time: the activity is counted when the daemon reads it.
    let mut w = World::new("");
    w.spawn(20, 10, SDK, S);
    w.apply(Event::Fork {
        id: id(21),
        time_ns: 2 * S,
        parent: id(20),
        uid: 0,
        comm: "claude".into(),
    });
    w.host.now = 3 * S;
    w.apply(Event::Exec {
        id: id(21),
        time_ns: None,
        parent_pid: 20,
        uid: 0,
        comm: "sh".into(),
        filename: None,
        argv: Argv::unknown(),
        argv_truncated: false,
        filename_truncated: false,
    });
    let t = &w.det.targets[&20].evidence;
    assert_eq!(
        (t.last_activity, t.last_activity_kind),
        (3 * S, ActivityKind::DescendantExec)
    );
}

#[test]
fn a_rule_name_longer_than_a_comm_is_matched_by_the_executable_read_from_proc() {
    // The kernel keeps 15 bytes of a name: an exec of `claude-agent-worker` has the comm
    // `claude-agent-wo`, which is no rule's name until the executable is read. (The kernel sends
    // the image of an exec under a rule's name, cut as the comm is: the exec here stands for a
    // process from before the rule, or a WATCH_NAMES update in flight.)
    let mut w = World::new(
        "[[rule]]\nname = \"worker\"\ncomm = [\"claude-agent-worker\"]\nrequire_no_tty = false\n",
    );
    let image = |exe: &str| Image {
        exe: exe.into(),
        argv: Argv::from_args(&[exe]),
        argv_truncated: false,
    };
    // Another executable whose comm is the same 15 bytes: read, and no match.
    w.host.images.insert(
        100,
        (id(100).start_ticks, image("/opt/claude-agent-workers-old")),
    );
    exec_unread(&mut w, 100, 10, "/opt/claude-agent-workers-old", S);
    assert_eq!(
        w.host.image_reads.get(),
        1,
        "the comm is the name's first 15 bytes"
    );
    assert_eq!(w.det.target_count(), 0, "another executable: no match");
    // The rule's executable: matched by it.
    w.host.images.insert(
        101,
        (id(101).start_ticks, image("/opt/claude-agent-worker")),
    );
    exec_unread(&mut w, 101, 10, "/opt/claude-agent-worker", S);
    assert_eq!(w.tree.get(101).unwrap().exe, "/opt/claude-agent-worker");
    assert!(
        w.det.targets.contains_key(&101),
        "matched by its executable"
    );
    // A comm no longer than 15 bytes is matched as it is: no read.
    exec_unread(&mut w, 102, 10, "/usr/bin/python3", S);
    assert_eq!(w.host.image_reads.get(), 2);
}

#[test]
fn unknown_argv_is_never_a_match_and_explain_says_why() {
    let rule = &config("").rules[0];
    let mut p = Process::from(Snapshot {
        id: id(100),
        ppid: 10,
        uid: 0,
        comm: "claude".into(),
        exe: "/opt/claude".into(),
        argv: Argv::unknown(),
        argv_truncated: false,
    });
    assert!(!targets::argv_matches(rule, &p));
    assert_eq!(
        targets::matches(rule, &p, None, || Some(0)),
        Err(targets::Mismatch::ArgvUnknown)
    );
    p.argv = Argv::from_args(SDK);
    assert_eq!(targets::matches(rule, &p, None, || Some(0)), Ok(()));
}
