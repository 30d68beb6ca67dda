//! Everything an agent leaves behind, against the real kernel with the `claude` double: stdio
//! MCP servers and tools outliving their CLI (leftovers), detached dev servers, another uid's
//! processes, runaway CLIs, and processes that are none of these.
//!
//! This test process is a subreaper (as `systemd --user` is), so what the doubles leave behind
//! is re-parented to it: it can collect and, at the end, end what its own tests started.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use reaper::{
    app::{PipelineConfig, PipelineStats},
    config::{Overrides, parse},
    events::{Event, ExitStatus},
};
use reaper_tests::{
    DEADLINE, Harness, Helper, alive, helper_path, proc_stat, scenarios::reaping::kills_for,
};

const GRACE: Duration = Duration::from_secs(2);

fn config(extra: &str) -> String {
    reaper_tests::test_config(
        "sessions-claude",
        &[
            ("idle_timeout", "\"3s\""),
            ("leftover_grace", "\"2s\""),
            ("grace", "\"2s\""),
            ("runaway_for", "\"3s\""),
            ("max_kills_per_minute", "100"),
            ("reconcile_interval", "\"1h\""),
            ("memory_pressure", "false"),
        ],
        extra,
        &[reaper_tests::agent_comm("fs")],
    )
}

async fn start(extra: &str) -> Harness {
    assert_eq!(
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let config = parse(&config(extra), "test", &Overrides::default()).expect("test config");
    Harness::start_with(PipelineConfig::new(config)).await
}

fn agent(args: &[&str]) -> Helper {
    reaper_tests::agent("fs", args)
}

/// Exit status and time (the event's, monotonic ns) of each of `pids`.
async fn exits(h: &mut Harness, pids: &[u32]) -> HashMap<u32, (ExitStatus, u64)> {
    let mut seen = HashMap::new();
    while seen.len() < pids.len() {
        let (pid, status, at) = h
            .wait_event(&format!("exits of {pids:?} (seen {seen:?})"), |e| match e {
                Event::Exit {
                    id,
                    status,
                    time_ns,
                    ..
                } if pids.contains(&id.pid) => Some((id.pid, *status, *time_ns)),
                _ => None,
            })
            .await;
        seen.insert(pid, (status, at));
    }
    seen
}

async fn stats(h: &Harness) -> PipelineStats {
    h.handle.stats().await.expect("pipeline alive")
}

/// The live processes with this comm whose parent is one of `parents` (but not `except`), as
/// the daemon's tree has them.
async fn children(h: &Harness, parents: &[u32], comm: &str, except: &[u32]) -> Vec<u32> {
    let started = Instant::now();
    loop {
        let found: Vec<u32> = h
            .handle
            .snapshot()
            .await
            .unwrap()
            .into_iter()
            .filter(|p| parents.contains(&p.ppid) && p.comm == comm && !except.contains(&p.id.pid))
            .map(|p| p.id.pid)
            .collect();
        if !found.is_empty() || started.elapsed() > DEADLINE {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ends (SIGKILL) and collects processes this test started that were re-parented to it (or
/// are about to be), each known by its pid and start time.
struct Adopted(Vec<(u32, Option<u64>)>);

impl Adopted {
    /// `pids` are alive now.
    fn new(pids: &[u32]) -> Self {
        Self(
            pids.iter()
                .map(|&pid| (pid, proc_stat(pid).map(|s| s.start_ticks)))
                .collect(),
        )
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        for &(pid, start) in &self.0 {
            let pid = pid as i32;
            // SAFETY: waitpid on our own (adopted) child; -1 if it is not ours.
            if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == pid {
                continue; // it had exited: collected now
            }
            // Still the process recorded (`collect_zombies` may have freed its pid for reuse).
            let same = proc_stat(pid as u32)
                .is_some_and(|s| Some(s.start_ticks) == start && s.state != 'Z');
            if same {
                // SAFETY: kill and waitpid on a process our test started; the wait returns at
                // once if another parent (its own, not yet dead) has it.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        }
    }
}

/// Collects whatever exited among our adopted children (zombies), without blocking.
fn collect_zombies() {
    // SAFETY: waitpid on our own children, non-blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_cli_leaves_behind_is_reaped_when_connected_and_left_alone_when_detached_or_foreign()
{
    // A long idle timeout: the CLIs end by their daemons' close(), not by reaper.
    let mut h = start("idle_timeout = \"10m\"").await;
    // One CLI with two stdio MCP servers that ignore EOF (its direct children, ended by it
    // as the real CLI ends them), a child connected to it that stays, a dev server, and a
    // connected child of another uid.
    let mut a = agent(&[
        "--close-after-result",
        "--message",
        // A turn of 2 s, as a real one takes seconds: the daemon sees the CLI before it ends.
        "slow:2000 tool:stay tool:detached tool:stay-as:65534",
        "--claude-arg",
        "--mcp",
        "--claude-arg",
        "2",
        "--claude-arg",
        "--mcp-ignore-eof",
    ]);
    let agent_pid = a.read_pid("agent");
    let claude = a.read_pid("claude");
    a.read("ready");
    let tools: Vec<u32> = a.values["tool"]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
    let (stay, dev, foreign) = (tools[0], tools[1], tools[2]);
    let servers: Vec<u32> = a.values["mcp"].iter().map(|t| t.parse().unwrap()).collect();
    assert_eq!(servers.len(), 2);
    // A second CLI whose MCP server runs behind a wrapper that does not pass signals on.
    let mut b = agent(&[
        "--close-after-result",
        "--message",
        "slow:2000",
        "--claude-arg",
        "--mcp",
        "--claude-arg",
        "1",
        "--claude-arg",
        "--mcp-ignore-eof",
        "--claude-arg",
        "--mcp-wrapper",
    ]);
    let claude_b = b.read_pid("claude");
    b.read("ready");
    let wrapper = b.read_pid("mcp");
    // Its wrapper may be gone already (closed at once): then it is re-parented to us.
    let wrapped = children(&h, &[wrapper, std::process::id()], "mcp-server", &servers).await[0];
    let _adopted = Adopted::new(&[dev, foreign, stay, wrapped]);

    // Both daemons closed their CLIs (the SDK's close()); what the CLIs leave behind is judged
    // after the grace.
    let mut watched = vec![claude, claude_b, stay, wrapped];
    watched.extend(&servers);
    let ends = exits(&mut h, &watched).await;
    for cli in [claude, claude_b] {
        assert_eq!(ends[&cli].0.code(), Some(0), "the CLI ended cleanly");
    }
    let after = |pid: u32, cli: u32| (ends[&pid].1.saturating_sub(ends[&cli].1)) as f64 / 1e9;
    for server in &servers {
        assert!(
            after(*server, claude) <= 1.0,
            "a direct MCP server ends with its CLI"
        );
    }
    for (leftover, cli) in [(stay, claude), (wrapped, claude_b)] {
        let took = after(leftover, cli);
        eprintln!("leftover {leftover} ended {took:.2} s after its CLI (leftover_grace {GRACE:?})");
        assert!(
            took >= GRACE.as_secs_f64() - 0.05,
            "not before the grace: {took:.2} s"
        );
        assert!(
            took <= GRACE.as_secs_f64() + 1.0,
            "within the grace + 1 s: {took:.2} s"
        );
        assert_eq!(
            ends[&leftover].0.signal(),
            Some(libc::SIGTERM as u8),
            "by reaper's SIGTERM"
        );
    }
    collect_zombies();

    // The dev server and the other uid's child are still there a while later, reported.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            alive(dev) && alive(foreign),
            "a detached or foreign leftover was signalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = h.handle.explain(dev).await.unwrap();
    let s = e
        .session
        .expect("the dev server belongs to the first CLI's session");
    assert_eq!((s.target.pid, s.ended), (claude, true));
    assert!(s.leftover.contains("left alone"), "{}", s.leftover);
    let why = h
        .handle
        .explain(foreign)
        .await
        .unwrap()
        .session
        .unwrap()
        .leftover;
    assert!(why.contains("another uid"), "{why}");
    let sessions = h.handle.sessions().await.unwrap();
    let first = sessions
        .iter()
        .find(|s| s.target.pid == claude)
        .expect("the ended session is listed");
    assert_eq!(
        (first.state.as_str(), first.leftovers),
        ("ended", 2),
        "{first:?}"
    );
    let s = stats(&h).await;
    assert_eq!(kills_for(&s, "leftover"), 2, "{:?}", s.reaps);
    assert!(alive(agent_pid));
    a.finish();
    b.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_that_lost_its_parent_and_burns_cpu_is_reaped_and_a_plain_orphan_is_not() {
    // A low threshold: the double burns 90 % of a core when it runs, but one sample window
    // (runaway_for / 8) read below the threshold restarts the count, and a loaded 2-core host
    // can starve it that much (this test failed once at 25 % with four builds running).
    let mut h = start("runaway_cpu_percent = 10.0").await;
    // An interactive-style CLI (no stream-json: never a target) and a plain `sleep`, each
    // started in the background by a shell that exits at once: both are re-parented to us.
    let double = helper_path().with_file_name("claude");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            // The shell waits (a condition, not a time) until the CLI has exec'd, then exits.
            "{} --no-startup-child --ignore-stdin-eof --idle-cpu-us 900000 </dev/null >/dev/null 2>&1 & d=$!; \
             while [ \"$(cat /proc/$d/comm)\" != claude ]; do :; done; echo $d; \
             sleep 60 </dev/null >/dev/null 2>&1 & echo $!",
            double.display()
        ))
        .env("XDG_RUNTIME_DIR", reaper_tests::runtime_dir())
        .output()
        .expect("run sh");
    let pids: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let (cli, sleeper) = (pids[0], pids[1]);
    let _adopted = Adopted::new(&[cli, sleeper]);
    let started = Instant::now();
    let (status, _) = exits(&mut h, &[cli]).await[&cli];
    let took = started.elapsed();
    eprintln!("runaway CLI ended {took:?} after its shell exited (runaway_for 3 s)");
    assert_eq!(
        status.code(),
        Some(0),
        "ended by SIGINT, its clean exit: {status}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "not before runaway_for: {took:?}"
    );
    // The kill is counted when the reap task reports, a moment after the exit event.
    reaper_tests::scenarios::stats_until(&h, "one runaway kill counted", |s| {
        s.reaps
            .kills
            .iter()
            .any(|((_, r, _), n)| r == "runaway" && *n == 1)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(alive(sleeper), "a plain orphan is never touched");
    let e = h.handle.explain(sleeper).await.unwrap();
    assert!(e.target.is_none() && e.session.is_none(), "{e:?}");
    collect_zombies();
}
