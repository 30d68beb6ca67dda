use super::*;

fn id(pid: u32, start: u64) -> Identity {
    Identity {
        pid,
        start_ticks: start,
    }
}

fn fork(child: Identity, parent: Identity) -> Event {
    Event::Fork {
        id: child,
        time_ns: 0,
        parent,
        uid: 0,
        comm: "sh".into(),
    }
}

fn exec(who: Identity, ppid: u32, args: &[&str]) -> Event {
    Event::Exec {
        id: who,
        time_ns: Some(0),
        parent_pid: ppid,
        uid: 1000,
        comm: args[0]
            .rsplit('/')
            .next()
            .unwrap()
            .chars()
            .take(15)
            .collect(),
        filename: Some(args[0].into()),
        argv: Argv::from_args(args),
        argv_truncated: false,
        filename_truncated: false,
    }
}

fn exit(who: Identity, status: u32, reaper: u32) -> Event {
    Event::Exit {
        id: who,
        time_ns: 0,
        status: ExitStatus(status),
        reaper_pid: reaper,
    }
}

fn snap(who: Identity, ppid: u32, comm: &str) -> Snapshot {
    Snapshot {
        id: who,
        ppid,
        uid: 0,
        comm: comm.into(),
        exe: format!("/bin/{comm}"),
        argv: Argv::from_args(&[comm]),
        argv_truncated: false,
    }
}

/// init(1) → shell(100)
fn base() -> ProcessTree {
    ProcessTree::from_scan(vec![
        snap(id(1, 1), 0, "init"),
        snap(id(100, 50), 1, "bash"),
    ])
}

/// Every child link matches a ppid and vice versa.
fn assert_consistent(tree: &ProcessTree) {
    for p in tree.processes() {
        for child in &p.children {
            assert_eq!(
                tree.get(*child).map(|c| c.ppid),
                Some(p.id.pid),
                "{child} under {}",
                p.id
            );
        }
        if let Some(parent) = tree.get(p.ppid)
            && p.ppid != p.id.pid
        {
            assert!(
                parent.children.contains(&p.id.pid),
                "{} missing under {}",
                p.id,
                p.ppid
            );
        }
    }
}

#[test]
fn fork_exec_exit_follow_the_process() {
    let mut tree = base();
    let child = id(200, 90);
    assert_eq!(tree.apply(&fork(child, id(100, 50))), Applied::Changed);
    assert_eq!(
        tree.get(200).unwrap().argv.to_strings(),
        ["bash"],
        "inherits argv"
    );
    assert!(tree.get(100).unwrap().children.contains(&200));

    tree.apply(&exec(child, 100, &["/bin/sleep", "5"]));
    let p = tree.get(200).unwrap();
    assert_eq!(
        (p.comm.as_str(), p.exe.as_str(), p.uid),
        ("sleep", "/bin/sleep", 1000)
    );
    assert_eq!(p.argv.to_strings(), ["/bin/sleep", "5"]);

    tree.apply(&Event::Rename {
        id: child,
        time_ns: 0,
        comm: "napper".into(),
    });
    assert_eq!(tree.get(200).unwrap().comm, "napper");

    assert_eq!(tree.apply(&exit(child, 3 << 8, 1)), Applied::Changed);
    assert!(tree.get(200).is_none());
    assert!(!tree.get(100).unwrap().children.contains(&200));
    assert_eq!(tree.exited(child).unwrap().exit.unwrap().code(), Some(3));
    assert_consistent(&tree);
}

#[test]
fn children_go_to_the_reaper_the_kernel_named() {
    let mut tree = base();
    let sub = id(150, 60);
    let mid = id(160, 61);
    let (a, b) = (id(170, 62), id(171, 63));
    tree.apply(&fork(sub, id(100, 50)));
    tree.apply(&fork(mid, sub));
    tree.apply(&fork(a, mid));
    tree.apply(&fork(b, mid));
    tree.apply(&exit(mid, 9, 150));
    assert_eq!(tree.get(170).unwrap().ppid, 150);
    assert_eq!(tree.get(171).unwrap().ppid, 150);
    assert_eq!(tree.get(150).unwrap().children, BTreeSet::from([170, 171]));
    tree.apply(&exit(sub, 0, 1));
    assert_eq!(tree.get(170).unwrap().ppid, 1);
    assert!(tree.get(1).unwrap().children.contains(&171));
    assert_consistent(&tree);
}

#[test]
fn out_of_order_events_never_fail() {
    // Exit, Exec and Fork of processes the tree has never seen.
    let mut tree = ProcessTree::new();
    assert_eq!(tree.apply(&exit(id(10, 5), 0, 1)), Applied::Unknown);
    assert!(tree.exited(id(10, 5)).is_some(), "remembers how it ended");
    tree.apply(&exec(id(11, 6), 7, &["/bin/cat"]));
    assert_eq!(tree.get(11).unwrap().ppid, 7);
    tree.apply(&fork(id(12, 8), id(11, 6)));
    assert_eq!(tree.get(12).unwrap().comm, "sh");
    assert_eq!(
        tree.apply(&Event::Rename {
            id: id(99, 1),
            time_ns: 0,
            comm: "x".into()
        }),
        Applied::Unknown
    );
    assert_consistent(&tree);
}

#[test]
fn unknown_parent_becomes_a_placeholder() {
    let mut tree = ProcessTree::new();
    tree.apply(&fork(id(20, 9), id(19, 3)));
    let parent = tree.get(19).unwrap();
    assert!(parent.placeholder);
    assert!(parent.children.contains(&20));
}

#[test]
fn a_reused_pid_replaces_the_stale_entry() {
    let mut tree = base();
    tree.apply(&fork(id(300, 70), id(100, 50)));
    // The exit of 300@70 was lost; a new process now holds pid 300.
    tree.apply(&fork(id(300, 95), id(1, 1)));
    let p = tree.get(300).unwrap();
    assert_eq!((p.id.start_ticks, p.ppid), (95, 1));
    assert!(!tree.get(100).unwrap().children.contains(&300));
    // A late event for the old identity does not touch the new process.
    tree.apply(&Event::Rename {
        id: id(300, 70),
        time_ns: 0,
        comm: "old".into(),
    });
    assert_eq!(tree.get(300).unwrap().comm, "sh");
    assert_consistent(&tree);
}

#[test]
fn events_overlapping_the_startup_scan_are_deduplicated() {
    // The scan already saw 400 (after its exec); its buffered fork and exec arrive after.
    let mut tree = ProcessTree::from_scan(vec![
        snap(id(1, 1), 0, "init"),
        snap(id(400, 80), 1, "worker"),
    ]);
    assert_eq!(
        tree.apply(&fork(id(400, 80), id(1, 1))),
        Applied::AlreadyKnown
    );
    tree.apply(&exec(id(400, 80), 1, &["/usr/bin/worker", "-v"]));
    assert_eq!(tree.len(), 2);
    assert_eq!(
        tree.get(400).unwrap().argv.to_strings(),
        ["/usr/bin/worker", "-v"]
    );
    // An exit applied twice counts once.
    assert_eq!(tree.apply(&exit(id(400, 80), 0, 1)), Applied::Changed);
    assert_eq!(tree.apply(&exit(id(400, 80), 0, 1)), Applied::AlreadyKnown);
    // ...and a stale fork does not bring it back.
    assert_eq!(
        tree.apply(&fork(id(400, 80), id(1, 1))),
        Applied::AlreadyKnown
    );
    assert!(tree.get(400).is_none());
}

#[test]
fn reconcile_repairs_every_kind_of_drift() {
    let mut tree = base();
    tree.apply(&fork(id(500, 10), id(100, 50))); // will be gone from /proc
    tree.apply(&fork(id(501, 11), id(100, 50))); // will be reused by 501@40
    tree.apply(&fork(id(502, 12), id(100, 50))); // parent changed to 1
    tree.apply(&fork(id(503, 13), id(600, 5))); // parent 600 is a placeholder
    tree.apply(&fork(id(504, 99), id(100, 50))); // started after the scan began
    let snapshot = vec![
        snap(id(1, 1), 0, "init"),
        snap(id(100, 50), 1, "bash"),
        snap(id(501, 40), 1, "new"),
        snap(id(502, 12), 1, "sh"),
        snap(id(503, 13), 600, "sh"),
        snap(id(600, 5), 1, "daemon"),
        snap(id(700, 30), 1, "missed"),
    ];
    let fixed = tree.reconcile(snapshot, 90, |_| true);
    assert_eq!(
        fixed,
        Corrections {
            added: 1,
            removed: 0,
            replaced: 1,
            reparented: 1,
            filled: 1,
            refreshed: 2
        },
        "500 is alive per the closure, so it stays; 502 and 503 show /proc's argv, not bash's"
    );
    let fixed = tree.reconcile(
        vec![
            snap(id(1, 1), 0, "init"),
            snap(id(100, 50), 1, "bash"),
            snap(id(501, 40), 1, "new"),
            snap(id(502, 12), 1, "sh"),
            snap(id(503, 13), 600, "sh"),
            snap(id(600, 5), 1, "daemon"),
            snap(id(700, 30), 1, "missed"),
        ],
        90,
        |_| false,
    );
    assert_eq!(fixed.removed, 0, "removals wait for the second flush");
    assert!(tree.get(500).is_some());
    assert_eq!(tree.confirm_gone(), 1, "500 is gone");
    assert!(tree.get(500).is_none());
    assert!(tree.get(504).is_some(), "started after the scan: kept");
    assert_eq!(tree.get(501).unwrap().id.start_ticks, 40);
    assert_eq!(tree.get(600).unwrap().comm, "daemon");
    assert!(!tree.get(600).unwrap().placeholder);
    assert!(tree.get(600).unwrap().children.contains(&503));
    assert_eq!(tree.get(700).unwrap().ppid, 1);
    assert_eq!(tree.corrections().total(), 7);
    assert_consistent(&tree);
}

#[test]
fn reconcile_does_not_resurrect_what_exited_meanwhile() {
    let mut tree = base();
    tree.apply(&fork(id(800, 20), id(100, 50)));
    tree.apply(&exit(id(800, 20), 0, 1));
    // The scan ran before the exit: it still lists 800.
    let fixed = tree.reconcile(
        vec![
            snap(id(1, 1), 0, "init"),
            snap(id(100, 50), 1, "bash"),
            snap(id(800, 20), 100, "sh"),
        ],
        90,
        |_| true,
    );
    assert_eq!(fixed.total(), 0);
    assert!(tree.get(800).is_none());
    // Nor one the scan saw that has died since, with the exit lost.
    let fixed = tree.reconcile(
        vec![
            snap(id(1, 1), 0, "init"),
            snap(id(100, 50), 1, "bash"),
            snap(id(801, 21), 100, "sh"),
        ],
        90,
        |_| false,
    );
    assert_eq!(fixed.added, 0);
    assert!(tree.get(801).is_none());
}

#[test]
fn exited_memory_is_bounded() {
    let mut tree = base();
    for i in 0..(EXITED_KEPT as u32 + 10) {
        let who = id(1000 + i, 100 + u64::from(i));
        tree.apply(&fork(who, id(100, 50)));
        tree.apply(&exit(who, 0, 1));
    }
    assert_eq!(tree.exited.len(), EXITED_KEPT);
    // The oldest went first; the newest are still there with their status.
    assert!(tree.exited(id(1000, 100)).is_none());
    let last = id(1000 + EXITED_KEPT as u32 + 9, 100 + EXITED_KEPT as u64 + 9);
    assert_eq!(tree.exited(last).unwrap().exit.unwrap().code(), Some(0));
    assert_eq!(tree.len(), 2);
    assert!(tree.get(100).unwrap().children.is_empty());
}

#[test]
fn dropped_exits_leave_the_index_in_sweeps_and_can_be_remembered_again() {
    let mut tree = base();
    let first = id(1000, 100);
    for round in 0..5u64 {
        for i in 0..EXITED_KEPT as u32 {
            let who = id(1000 + i, 100 + u64::from(i) + round * 100_000);
            tree.apply(&fork(who, id(100, 50)));
            tree.apply(&exit(who, 0, 1));
            assert!(tree.exited.index.len() <= 2 * EXITED_KEPT);
        }
    }
    assert_eq!(tree.exited.len(), EXITED_KEPT);
    assert!(tree.exited(first).is_none(), "dropped four rounds ago");
    // Long dropped, its identity may still be in the index: remembered again, it is found,
    // with what it is now.
    tree.apply(&exit(first, 3 << 8, 1));
    assert_eq!(tree.exited(first).unwrap().exit.unwrap().code(), Some(3));
    assert_eq!(tree.exited.len(), EXITED_KEPT);
    let newest = id(
        1000 + EXITED_KEPT as u32 - 1,
        100 + EXITED_KEPT as u64 - 1 + 400_000,
    );
    assert!(tree.exited(newest).is_some());
}

#[test]
fn an_exit_remembered_twice_is_one_entry_with_the_newer_status() {
    let mut tree = base();
    let who = id(700, 70);
    tree.apply(&fork(who, id(100, 50)));
    tree.apply(&exit(who, 1 << 8, 1));
    // A late exec brings it back (events out of order), and it exits again.
    tree.apply(&exec(who, 100, &["/bin/true"]));
    tree.apply(&exit(who, 2 << 8, 1));
    assert_eq!(tree.exited.len(), 1);
    assert_eq!(tree.exited(who).unwrap().exit.unwrap().code(), Some(2));
    assert_eq!(tree.exited(who).unwrap().exe, "/bin/true");
    // It still leaves in its turn: the oldest first.
    for i in 0..EXITED_KEPT as u32 {
        let other = id(1000 + i, 100 + u64::from(i));
        tree.apply(&fork(other, id(100, 50)));
        tree.apply(&exit(other, 0, 1));
    }
    assert!(tree.exited(who).is_none());
    assert_eq!(tree.exited.len(), EXITED_KEPT);
}

#[test]
fn reconcile_refreshes_the_image_of_a_fork_whose_exec_was_lost() {
    let mut tree = base();
    tree.apply(&fork(id(900, 20), id(100, 50)));
    tree.apply(&fork(id(901, 21), id(100, 50)));
    tree.apply(&exec(id(901, 21), 100, &["/usr/bin/worker"]));
    let mut claude = snap(id(900, 20), 100, "claude");
    claude.argv = Argv::from_args(&["claude", "--input-format", "stream-json"]);
    let mut titled = snap(id(901, 21), 100, "worker");
    titled.argv = Argv::from_args(&["worker: idle"]); // rewrote its own argv: not a repair
    let fixed = tree.reconcile(
        vec![
            snap(id(1, 1), 0, "init"),
            snap(id(100, 50), 1, "bash"),
            claude,
            titled,
        ],
        90,
        |_| true,
    );
    assert_eq!(fixed.refreshed, 1, "{fixed:?}");
    assert_eq!(fixed.total(), 1);
    let p = tree.get(900).unwrap();
    assert_eq!(p.comm, "claude");
    assert_eq!(
        p.argv.to_strings(),
        ["claude", "--input-format", "stream-json"]
    );
    assert!(!p.inherited_image);
    assert_eq!(
        tree.get(901).unwrap().argv.to_strings(),
        ["/usr/bin/worker"]
    );
    assert_eq!(tree.take_renewed(), [900]);
    assert_consistent(&tree);
}

#[test]
fn a_dead_process_whose_exit_arrives_late_is_not_a_correction() {
    let mut tree = base();
    tree.apply(&fork(id(950, 20), id(100, 50)));
    // The scan missed it and /proc says it is dead: a candidate, not yet removed…
    tree.reconcile(
        vec![snap(id(1, 1), 0, "init"), snap(id(100, 50), 1, "bash")],
        90,
        |_| false,
    );
    assert!(tree.has_gone_candidates());
    // …and its exit event arrives before the second flush completes.
    tree.apply(&exit(id(950, 20), 0, 1));
    assert_eq!(tree.confirm_gone(), 0);
    assert_eq!(tree.corrections().removed, 0);
    assert!(!tree.has_gone_candidates());
}

#[test]
fn an_unknown_argv_is_filled_only_for_its_own_process_and_is_no_sign_of_a_lost_exec() {
    let mut tree = base();
    // bash exec'd a worker whose argv the kernel did not read; it forks a child of its own.
    let mut lean = exec(id(700, 30), 100, &["/usr/bin/worker"]);
    if let Event::Exec { argv, filename, .. } = &mut lean {
        *argv = Argv::unknown();
        *filename = None;
    }
    tree.apply(&lean);
    tree.apply(&fork(id(701, 31), id(700, 30)));
    let child = tree.get(701).unwrap();
    assert!(
        child.argv.is_unknown() && child.inherited_image,
        "{child:?}"
    );
    // /proc shows the same name and an argv: nothing says the child's exec was lost.
    let mut worker = snap(id(700, 30), 100, "worker");
    worker.argv = Argv::from_args(&["/usr/bin/worker", "--pool"]);
    let mut forked = snap(id(701, 31), 700, "sh");
    forked.argv = worker.argv.clone();
    let fixed = tree.reconcile(
        vec![
            snap(id(1, 1), 0, "init"),
            snap(id(100, 50), 1, "bash"),
            worker,
            forked,
        ],
        90,
        |_| true,
    );
    assert_eq!(fixed.total(), 0, "{fixed:?}");
    // A fill names the process by identity: not a later holder of the pid, not a known image.
    let image = |exe: &str, args: &[&str], argv_truncated| Image {
        exe: exe.into(),
        argv: Argv::from_args(args),
        argv_truncated,
    };
    let worker = image("/usr/bin/worker", &["/usr/bin/worker", "--pool"], true);
    assert_eq!(tree.get(700).unwrap().exe, "", "unknown");
    assert!(!tree.fill_image(id(700, 99), worker.clone()));
    assert!(tree.get(700).unwrap().argv.is_unknown());
    assert!(tree.fill_image(id(700, 30), worker.clone()));
    let p = tree.get(700).unwrap();
    assert_eq!(
        (p.exe.as_str(), &p.argv, p.argv_truncated),
        (worker.exe.as_str(), &worker.argv, true)
    );
    assert!(!tree.fill_image(id(700, 30), image("/bin/other", &["other"], false)));
    assert_eq!(tree.get(700).unwrap().argv, worker.argv);
    assert_consistent(&tree);
}
