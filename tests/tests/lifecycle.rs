//! The kernel-to-tree pipeline against real processes, with `/proc` as the oracle.
use std::time::Duration;

use reaper::events::Event;
use reaper_common::ARGV_LEN;
use reaper_tests::{
    DEADLINE, Harness, Helper, assert_matches_proc, helper_path, proc_identities,
    scenarios::{
        expect,
        lifecycle::{self, settled_parent},
    },
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_exec_exit_report_exit_codes() {
    let mut h = Harness::start_reading_helper_argv().await;
    expect(lifecycle::fork_exec_exit(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_by_signal_is_reported() {
    let mut h = Harness::start().await;
    let mut helper = Helper::spawn(&["wait"]);
    let pid = helper.read_pid("pid");
    let p = h
        .wait_process(pid, "the helper in the tree", |p| {
            p.filter(|p| p.comm == "lifecycle-helpe").cloned()
        })
        .await;
    assert_matches_proc(&p);
    helper.child.kill().unwrap(); // SIGKILL to our own child
    let status = h
        .wait_event("exit by SIGKILL", |e| match e {
            Event::Exit { id, status, .. } if *id == p.id => Some(*status),
            _ => None,
        })
        .await;
    assert_eq!(status.signal(), Some(libc::SIGKILL as u8));
    assert_eq!(status.code(), None);
    let id = p.id;
    h.wait_process(pid, "removal from the tree", |p| {
        p.is_none_or(|q| q.id != id).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_exiting_before_its_threads_is_one_exit_when_the_last_goes() {
    let mut h = Harness::start().await;
    expect(lifecycle::leader_exits_first(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_group_killed_at_once_is_one_exit() {
    let mut h = Harness::start().await;
    expect(lifecycle::thread_group_exit(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_are_not_processes() {
    let mut h = Harness::start().await;
    let mut helper = Helper::spawn(&["threads", "8"]);
    let pid = helper.read_pid("pid");
    let tids: Vec<u32> = helper
        .read("tids")
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(tids.len(), 8);
    h.flush().await.unwrap();
    let p = h.handle.process(pid).await.expect("helper in the tree");
    assert_matches_proc(&p);
    assert!(
        p.children.is_empty(),
        "threads are not children: {:?}",
        p.children
    );
    for tid in &tids {
        assert!(
            h.handle
                .process(*tid)
                .await
                .is_none_or(|t| t.id.pid != *tid || t.ppid != pid),
            "thread {tid} became a process"
        );
    }
    while let Ok(e) = h.events.try_recv() {
        if let Event::Fork { id, .. } = e {
            assert!(!tids.contains(&id.pid), "fork event for thread {}", id.pid);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reparented_like_the_kernel_does() {
    let mut h = Harness::start().await;
    expect(lifecycle::orphans_reparented(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_go_to_the_nearest_child_subreaper() {
    let h = Harness::start().await;
    let mut helper = Helper::spawn(&["subreaper", "2"]);
    let subreaper = helper.read_pid("pid");
    helper.read("done");
    let middle = helper.read_pid("middle");
    let children: Vec<u32> = helper.values["child"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 2);
    for child in &children {
        let new_parent = settled_parent(&h, *child, middle).await.unwrap();
        assert_eq!(new_parent, subreaper, "the subreaper adopts, not init");
        assert_matches_proc(&h.handle.process(*child).await.unwrap());
    }
    let sub = h.handle.process(subreaper).await.unwrap();
    assert!(
        children.iter().all(|c| sub.children.contains(c)),
        "{:?}",
        sub.children
    );
    helper.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_forked_daemon_is_followed() {
    let h = Harness::start().await;
    let mut helper = Helper::spawn(&["double-fork"]);
    let first = helper.read_pid("first");
    let daemon = helper.read_pid("daemon");
    settled_parent(&h, daemon, first).await.unwrap();
    assert_matches_proc(&h.handle.process(daemon).await.unwrap());
    h.wait_process(first, "the first child gone", |p| p.is_none().then_some(()))
        .await;
    helper.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_is_not_also_reported_as_a_rename() {
    let mut h = Harness::start().await;
    let mut child = std::process::Command::new(helper_path())
        .args(["exit", "0"])
        .spawn()
        .unwrap();
    let pid = child.id();
    // Every event about the child, up to its exit.
    let mut kinds = Vec::new();
    h.wait_event("the helper's exit", |e| {
        let kind = e.kind().name();
        (e.id().pid == pid).then(|| kinds.push(kind));
        (e.id().pid == pid && kind == "exit").then_some(())
    })
    .await;
    child.wait().unwrap();
    // begin_new_exec() renames the process to the file's basename; the exec event carries it.
    assert_eq!(kinds, ["fork", "exec", "exit"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comm_rename_is_seen() {
    let mut h = Harness::start().await;
    expect(lifecycle::rename(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_alive_before_start_are_bootstrapped() {
    let mut helper = Helper::spawn(&["wait"]);
    let pid = helper.read_pid("pid");
    let h = Harness::start().await;
    let p = h
        .handle
        .process(pid)
        .await
        .expect("found by the start-up scan");
    assert_matches_proc(&p);
    assert!(!p.placeholder);
    let parent = h
        .handle
        .process(p.ppid)
        .await
        .expect("the test process is there too");
    assert!(parent.children.contains(&pid));
    helper.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argv_past_the_bound_is_truncated_and_flagged() {
    let h = Harness::start_reading_helper_argv().await;
    let long = "x".repeat(ARGV_LEN + 1000);
    let mut helper = Helper::spawn(&["wait", "--", &long]);
    let pid = helper.read_pid("pid");
    let p = h
        .wait_process(pid, "the long argv", |p| {
            p.filter(|p| p.argv_truncated).cloned()
        })
        .await;
    let real = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(p.argv.raw().len(), ARGV_LEN);
    assert_eq!(
        p.argv.raw()[..],
        real[..ARGV_LEN],
        "a prefix of the real argv"
    );
    // A short argv is not flagged.
    let mut short = Helper::spawn(&["wait", "short"]);
    let short_pid = short.read_pid("pid");
    let s = h
        .wait_process(short_pid, "short argv", |p| {
            p.filter(|p| p.argv.to_strings().last().map(String::as_str) == Some("short"))
                .cloned()
        })
        .await;
    assert!(!s.argv_truncated);
    assert_matches_proc(&s);
    helper.finish();
    short.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_storm_loses_nothing_and_the_tree_equals_proc() {
    const N: usize = 10_000;
    let mut h = Harness::start().await;
    let audit = lifecycle::ExitAudit::start(&h.handle);
    let before = h.handle.stats().await.unwrap();
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(helper_path())
            .args(["storm", &N.to_string(), "2"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "storm failed: {out:?}");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    // Only the events: a reconcile here would hide what they missed.
    h.flush().await.unwrap();
    let after = h.handle.stats().await.unwrap();
    let events = after.events_total - before.events_total;
    let seconds: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("seconds="))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "storm: {N} processes in {seconds:.2} s; {events} events ({:.0}/s)",
        events as f64 / seconds,
    );
    assert!(
        events as usize >= 3 * N,
        "fork+exec+exit for each of {N}: got {events}"
    );

    // An independent comparison with /proc, read directly, until they agree.
    let started = std::time::Instant::now();
    loop {
        let tree: std::collections::BTreeSet<(u32, u64)> = h
            .handle
            .snapshot()
            .await
            .unwrap()
            .iter()
            .map(|p| (p.id.pid, p.id.start_ticks))
            .collect();
        let proc: std::collections::BTreeSet<(u32, u64)> = proc_identities().into_iter().collect();
        let only_tree: Vec<_> = tree.difference(&proc).collect();
        let only_proc: Vec<_> = proc.difference(&tree).collect();
        if only_tree.is_empty() && only_proc.is_empty() {
            eprintln!("tree equals /proc: {} processes", tree.len());
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "tree and /proc still differ: only in tree {only_tree:?}, only in /proc {only_proc:?}"
        );
        // Processes may start or end between the two reads; read both again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing lost, nothing to correct, and one exit per process.
    expect(lifecycle::no_losses(&mut h).await);
    expect(audit.check(&h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_sees_every_event_that_happened_before_it_was_asked() {
    let h = Harness::start_reading_helper_argv().await;
    // No waiting: the tree task drains the ring buffer only every 0.4–1.6 s by itself, so an
    // answer without a flush would usually miss a process this young.
    for _ in 0..3 {
        let mut helper = Helper::spawn(&["wait"]);
        let pid = helper.read_pid("pid");
        let p = h.handle.process(pid).await;
        let p = p.unwrap_or_else(|| panic!("{pid} missing from the tree right after its exec"));
        assert_eq!(p.comm, "lifecycle-helpe");
        assert_eq!(p.argv.to_strings()[1..], ["wait"]);
        helper.finish();
    }
}

/// Processes that come and go while the pipeline starts (its `/proc` scan races their fork and
/// exit events) leave nothing behind: once the events are applied, a reconcile has nothing to
/// remove.
///
/// With the exit program attached after the fork and exec programs, 17 to 135 of the storm's
/// children stayed: their fork (or exec) was seen and their exit, before the exit program was
/// attached, was not (see `probes::lifecycle_attach_order`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_during_a_spawn_storm_leaves_no_stale_process() {
    // `/bin/true` from four threads, from before the start until it is done.
    let mut storm = Helper::spawn(&["storm-until-eof", "4"]);
    storm.read("storming");
    let h = Harness::start().await;
    storm.finish();
    let (spawned, status) = tokio::task::spawn_blocking(move || {
        let spawned = storm.all("spawned");
        (spawned, storm.child.wait().unwrap())
    })
    .await
    .unwrap();
    assert!(status.success(), "storm failed: {status}");
    eprintln!("storm: {spawned:?} processes");
    h.flush().await.unwrap();
    let fixed = h.reconcile().await.unwrap();
    assert_eq!(
        fixed.total(),
        0,
        "the start-up left the tree wrong: {fixed:?}"
    );
}

/// The kernel sends an exec's image (path and argv) only where user space reads it: for a
/// process exec'd under a rule's name and for a watched one (a target's descendant). Any other
/// exec's record is its head alone, without a time, and the tree holds that image as unknown,
/// not empty; a process that takes a rule's name later (a rename) gets its image from /proc
/// and is matched with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_records_carry_the_image_only_for_candidates_and_watched_processes() {
    // A target by its name alone (no argv or terminal condition); dry run.
    let mut h = Harness::start_with_rules(
        "[[rule]]\nname = \"argv-target\"\ncomm = [\"argv-target\"]\n\
         require_no_tty = false\n",
    )
    .await;
    // An exec's argv, with its path and whether it has a time.
    let exec_argv = |pid: u32| {
        move |e: &Event| match e {
            Event::Exec {
                id,
                argv,
                filename,
                time_ns,
                ..
            } if id.pid == pid => Some((argv.clone(), filename.clone(), time_ns.is_some())),
            _ => None,
        }
    };

    // No rule's name, not watched: neither path nor argv, nor a time.
    let mut plain = Helper::spawn(&["wait", "plain"]);
    let plain_pid = plain.read_pid("pid");
    let exec = h
        .wait_event("the plain helper's exec", |e| match e {
            Event::Exec { id, .. } if id.pid == plain_pid => Some(e.clone()),
            _ => None,
        })
        .await;
    let Event::Exec {
        time_ns,
        filename,
        argv,
        ..
    } = &exec
    else {
        unreachable!()
    };
    assert!(
        argv.is_unknown() && filename.is_none() && time_ns.is_none(),
        "{exec:?}"
    );
    let p = h
        .handle
        .process(plain_pid)
        .await
        .expect("the plain helper in the tree");
    assert!(p.argv.is_unknown() && p.exe.is_empty(), "{p:?}");
    assert_matches_proc(&p);

    // `cat -` exec'd through a symlink called `name` (so its comm is `name`), and its exec's
    // argv.
    let dir = reaper_tests::TempDir::new("argv-target");
    let cat_as = async |h: &mut Harness, name: &str| {
        let link = dir.join(name);
        std::os::unix::fs::symlink("/bin/cat", &link).unwrap();
        let child = std::process::Command::new(&link)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (argv, path, stamped) = h
            .wait_event(&format!("the exec of {name}"), exec_argv(child.id()))
            .await;
        assert_eq!(argv.to_strings(), [link.to_str().unwrap(), "-"], "{name}");
        assert_eq!(path.as_deref(), link.to_str(), "{name}");
        assert!(stamped, "{name}");
        child
    };

    // Exec'd under the rule's name: its argv.
    let mut named = cat_as(&mut h, "argv-target").await;

    // Exec'd under a runtime's name (one that may take a rule's name later, and write it over
    // its argv): its argv, and it is no target.
    let mut node = cat_as(&mut h, "node").await;
    assert!(h.handle.explain(node.id()).await.unwrap().target.is_none());

    // Exec'd without its image, then renamed to the rule's name: its image comes from /proc, and
    // the rule matches it; its child, exec'd once it is a target, is watched: its argv.
    let mut renamed = Helper::spawn(&["rename-spawn-on-cue", "argv-target", "/bin/cat", "-"]);
    let renamed_pid = renamed.read_pid("pid");
    let (argv, path, stamped) = h
        .wait_event("the renamed helper's exec", exec_argv(renamed_pid))
        .await;
    assert!(
        argv.is_unknown() && path.is_none() && !stamped,
        "{argv:?} {path:?}"
    );
    let started = std::time::Instant::now();
    while h
        .handle
        .explain(renamed_pid)
        .await
        .unwrap()
        .target
        .is_none()
    {
        assert!(
            started.elapsed() < DEADLINE,
            "the renamed helper never became a target"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = h.handle.process(renamed_pid).await.unwrap();
    assert_eq!(p.comm, "argv-target");
    assert_eq!(
        p.argv.to_strings()[1..],
        ["rename-spawn-on-cue", "argv-target", "/bin/cat", "-"]
    );
    let exe = std::fs::read_link(format!("/proc/{renamed_pid}/exe")).unwrap();
    assert_eq!(p.exe, exe.to_str().unwrap(), "its executable, from /proc");
    assert_matches_proc(&p);
    renamed.send("go");
    let child = renamed.read_pid("child");
    let (argv, path, stamped) = h
        .wait_event("the target's child's exec", exec_argv(child))
        .await;
    assert_eq!(argv.to_strings(), ["/bin/cat", "-"]);
    assert_eq!(path.as_deref(), Some("/bin/cat"));
    assert!(stamped);

    drop(named.stdin.take());
    let _ = named.wait();
    drop(node.stdin.take());
    let _ = node.wait();
    renamed.finish();
    plain.finish();
}
