//! Reliability under the conditions the daemon will meet in production: kernel event losses,
//! PID reuse, a daemon restart, and hostile input (non-UTF-8 names, huge argv, `/proc` entries
//! vanishing mid-read, bad configuration files).
//!
//! Every rule here requires the parent to be this run's agent (`fake-agent` exec'd through a
//! symlink named `rl-<test pid>`, so its comm is unique): no process on the host that the tests
//! did not start can match. Tests only signal processes they started, and wait for conditions
//! with deadlines.
use std::{
    collections::BTreeSet,
    ffi::OsStr,
    io::{Read as _, Write as _},
    os::unix::{
        ffi::{OsStrExt as _, OsStringExt as _},
        fs::PermissionsExt as _,
        process::ExitStatusExt as _,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use reaper::{
    app::{PipelineConfig, PipelineStats},
    config::{Config, ConfigError, Overrides, parse},
    events::Identity,
    host::{self, Pidfds},
    reap::{self, Outcome},
    tree::scan,
};
use reaper_common::ARGV_LEN;
use reaper_tests::{
    CliOutput, DEADLINE, Daemon, Harness, Helper, POLL, Running, TempDir, alive, argv_rule,
    free_port, helper_path, proc_cmdline, proc_identities, proc_stat, reaper_cli,
};
use serde_json::Value;

/// The comm of this run's agents.
fn agent_comm() -> String {
    reaper_tests::agent_comm("rl")
}

fn agent(args: &[&str]) -> Helper {
    reaper_tests::agent("rl", args)
}

/// The test rule: enforce, long timeouts unless `extra` says otherwise; parent must be this
/// run's agent.
fn config_text(extra: &str) -> String {
    let long = "mode = \"enforce\"\nidle_timeout = \"10m\"\norphan_grace = \"10m\"\n";
    reaper_tests::reaping_config("rl-claude", &format!("{long}{extra}"), &[agent_comm()])
}

async fn start(extra: &str) -> Harness {
    start_with_rules(extra, "").await
}

/// [`start`] with `rules` (TOML `[[rule]]` tables) after the test rule.
async fn start_with_rules(extra: &str, rules: &str) -> Harness {
    let text = format!("{}\n{rules}", config_text(extra));
    let config = parse(&text, "test", &Overrides::default()).expect("test config");
    Harness::start_with(PipelineConfig::new(config)).await
}

/// The name [`argv_rule`] gives the hostile-input tests' `sh` (a link to `/bin/sh`).
const ARGV_SH: &str = "rl-argv-sh";

async fn stats(h: &Harness) -> PipelineStats {
    h.handle.stats().await.expect("pipeline alive")
}

/// Polls the pipeline's stats until `done` holds, failing with `what` (given the last stats)
/// after [`DEADLINE`].
async fn wait_stats(
    h: &Harness,
    done: impl Fn(&PipelineStats) -> bool,
    what: impl Fn(&PipelineStats) -> String,
) -> PipelineStats {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = stats(h).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{}", what(&s));
        tokio::time::sleep(POLL).await;
    }
}

/// A blocking read from a helper (with the helper's own deadline), off the async workers.
fn read_blocking(helper: &mut Helper, key: &str) -> String {
    tokio::task::block_in_place(|| helper.read(key))
}

/// Waits until `pid` is a target of the pipeline.
async fn wait_target(h: &Harness, pid: u32) {
    let started = Instant::now();
    loop {
        let e = h.handle.explain(pid).await.expect("pipeline alive");
        if e.target.is_some() {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{pid} never became a target: {:?}",
            e.rules
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Identities the tree and `/proc` disagree on, ignoring processes that started or ended while
/// they were read: `/proc` is read before and after the tree, and only a process in both reads
/// but not in the tree (a missed fork or a lost exit's stale twin), or in the tree but in
/// neither read, counts.
async fn tree_vs_proc(h: &Harness) -> (Vec<(u32, u64)>, Vec<(u32, u64)>) {
    let before: BTreeSet<(u32, u64)> = proc_identities().into_iter().collect();
    let tree: BTreeSet<(u32, u64)> = h
        .handle
        .snapshot()
        .await
        .expect("pipeline alive")
        .iter()
        .map(|p| (p.id.pid, p.id.start_ticks))
        .collect();
    let after: BTreeSet<(u32, u64)> = proc_identities().into_iter().collect();
    let only_proc = before
        .intersection(&after)
        .filter(|id| !tree.contains(id))
        .copied()
        .collect();
    let only_tree = tree
        .iter()
        .filter(|id| !before.contains(id) && !after.contains(id))
        .copied()
        .collect();
    (only_tree, only_proc)
}

/// Waits until the tree agrees with `/proc`; returns how many identities differed at first.
async fn converge(h: &Harness, within: Duration) -> usize {
    let started = Instant::now();
    let mut first = None;
    loop {
        let (only_tree, only_proc) = tree_vs_proc(h).await;
        let differ = only_tree.len() + only_proc.len();
        let first = *first.get_or_insert(differ);
        if differ == 0 {
            return first;
        }
        assert!(
            started.elapsed() < within,
            "the tree did not converge to /proc within {within:?}: only in the tree {only_tree:?}, \
             only in /proc {only_proc:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ── 1. Lost events ──────────────────────────────────────────────────────────────────────────

/// A ring buffer too small for a fork storm: the kernel drops events (counted per kind), the
/// pipeline reconciles at once, the tree converges to `/proc`, and the only process killed is
/// the one that really was idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_are_counted_repaired_and_never_kill_the_wrong_process() {
    const RING: u32 = 8192;
    const RECONCILE: Duration = Duration::from_secs(2);
    // The doubles exist before the pipeline starts: the start-up scan reads their comm and
    // argv from /proc, so no lost exec can hide them.
    let mut chat = agent(&["--chat-every", "500"]);
    let mut leak = agent(&["--leak"]);
    let chatting = chat.read_pid("claude");
    let leaked = leak.read_pid("claude");
    chat.read("ready");
    leak.read("ready");
    // The storm's `/bin/true`s are named by a rule, so their exec records carry their argv.
    let h = start_with_rules(
        &format!("ring_bytes = {RING}\nreconcile_interval = \"2s\"\nidle_timeout = \"5s\""),
        &argv_rule("true"),
    )
    .await;
    let started = Instant::now();
    wait_target(&h, chatting).await;
    wait_target(&h, leaked).await;
    let before = stats(&h).await;

    // The storm: 3000 fork+exec+exit from 4 threads, each exec with a 3,000-byte argument.
    // Exec records of `true` carry their argv (the rule above), so each is ≈ 3.3 KiB, and two
    // in flight overflow the 8 KiB ring.
    let storm = tokio::task::spawn_blocking(|| {
        Command::new(helper_path())
            .args(["storm", "3000", "4", "3000"])
            .output()
            .expect("run the storm")
    })
    .await
    .unwrap();
    assert!(storm.status.success(), "storm failed: {storm:?}");
    let storm_done = Instant::now();
    let storm_report = String::from_utf8_lossy(&storm.stdout).replace('\n', " ");

    // The tree converges to /proc within one reconcile interval (plus the loss check's second).
    let differed = converge(&h, RECONCILE + Duration::from_secs(3)).await;
    let took = storm_done.elapsed();

    // Losses are counted per kind (read at every periodic tick; a reconcile starts right after).
    let lost = wait_stats(
        &h,
        |s| s.lost_total > before.lost_total,
        |s| {
            format!(
                "no kernel losses with a {RING}-byte ring after the storm ({storm_report}): {:?}",
                s.lost
            )
        },
    )
    .await;
    let by_kind = lost.lost.clone();
    assert!(
        by_kind.iter().any(|(_, n)| *n > 0),
        "losses are counted per kind: {by_kind:?}"
    );

    // The reconcile the losses started has run (a /proc scan: it takes its time).
    let after = wait_stats(
        &h,
        |s| s.reconciles > before.reconciles,
        |s| {
            format!(
                "no reconcile ran after the losses ({} → {})",
                before.reconciles, s.reconciles
            )
        },
    )
    .await;
    let corrections = after.corrections.total() - before.corrections.total();
    eprintln!(
        "lost events: ring {RING} B, storm {storm_report}; lost {by_kind:?} (total {}), \
         events {} received, reconciles {} → {}, corrections {:?} (+{corrections}), \
         tree = /proc {:.2} s after the storm ended ({differed} identities differed then)",
        lost.lost_total,
        after.events_total - before.events_total,
        before.reconciles,
        after.reconciles,
        after.corrections,
        took.as_secs_f64(),
    );
    assert_eq!(after.decode_errors, before.decode_errors);

    // Only the idle double is ended, once, by closing its input (it exits 0, as after the
    // SDK's close()); the chatting one lives.
    let exit = read_blocking(&mut leak, "exit");
    assert_eq!(exit, format!("{leaked}:code:0"), "the idle double's end");
    let killed_after = started.elapsed();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(alive(chatting), "the chatting double was killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = stats(&h).await;
    assert_eq!(s.reaps.kills_total(), 1, "exactly one kill: {:?}", s.reaps);
    assert!(s.reaps.failures.is_empty(), "{:?}", s.reaps);
    assert_eq!(s.reaps.identity_mismatches, 0);
    let chat_target = h
        .handle
        .explain(chatting)
        .await
        .unwrap()
        .target
        .expect("still a target");
    assert_eq!(chat_target.verdict.state(), "active");
    eprintln!(
        "lost events: the idle double was reaped {:.1} s after the pipeline started (idle timeout \
         5 s); the chatting double survived; corrections total {}",
        killed_after.as_secs_f64(),
        s.corrections.total()
    );
    // Every repair is counted, by kind, in the stats and in the exported metrics alike. A lost
    // exit leaves a stale entry (`removed`), a lost fork of a process still alive a missing one
    // (`added`); a lost fork of a process already gone, and lost execs and renames, leave
    // nothing a reconcile could count (see the report on lost execs).
    // (A reconcile may land between two reads: read until both sides hold still.)
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counted = stats(&h).await.corrections.total();
        let metrics = h.pipeline.metrics().render();
        let exported: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("reaper_reconcile_corrections_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if exported as u64 == counted && stats(&h).await.corrections.total() == counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats count {counted} corrections, metrics {exported}"
        );
        tokio::time::sleep(POLL).await;
    }
    chat.finish();
}

// ── 2. PID reuse ────────────────────────────────────────────────────────────────────────────

fn read_u32(path: &str) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// How many pids the kernel allocates before it hands out `pid`, starting after `last`.
fn pids_until(pid: u32, last: u32, pid_max: u32) -> u32 {
    // After pid_max - 1 the kernel wraps to RESERVED_PIDS (300).
    if pid > last {
        pid - last - 1
    } else {
        (pid_max - 1 - last) + (pid - 300)
    }
}

/// `lifecycle-helper wait`, started by this test with clone3 (optionally at a chosen pid) and
/// exec: it lives until its stdin (a pipe held here) closes.
struct Waiter {
    pid: u32,
    stdin: Option<std::os::fd::OwnedFd>,
}

/// `struct clone_args` (linux/sched.h).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

impl Waiter {
    /// With `at`, the kernel gives the child exactly that pid or fails (`set_tid`, which needs
    /// CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN; EEXIST if the pid is taken).
    fn spawn(at: Option<u32>) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let exe = std::ffi::CString::new(helper_path().into_os_string().into_vec()).unwrap();
        let wait = c"wait";
        let argv = [exe.as_ptr(), wait.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        let mut fds = [0; 2];
        // SAFETY: pipe2 into a two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned here only.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let null = std::fs::File::options().write(true).open("/dev/null")?;
        let set_tid = [at.map_or(0, |p| p as libc::pid_t)];
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: if at.is_some() {
                set_tid.as_ptr() as u64
            } else {
                0
            },
            set_tid_size: u64::from(at.is_some()),
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of this thread only
        // and makes nothing but async-signal-safe calls (dup2, execve, _exit) on data prepared
        // above.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            // SAFETY: see above; the fds and pointers are valid in the copied address space.
            unsafe {
                libc::dup2(read_end.as_raw_fd(), 0);
                libc::dup2(null.as_raw_fd(), 1);
                libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            pid: pid as u32,
            stdin: Some(write_end),
        })
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.stdin.take(); // EOF: the helper exits by itself
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let deadline = Instant::now() + DEADLINE;
        loop {
            match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(POLL);
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    // Our own unreaped child: the pid cannot have been reused.
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(pid, None);
                    return;
                }
                _ => return,
            }
        }
    }
}

/// How the newcomer got the old pid.
struct Reached {
    /// False: the kernel's pid counter came round to it. True: the counter came round, but
    /// others on the host kept taking the pid first, so it was asked for with clone3's set_tid.
    placed: bool,
    burned: u64,
    spawns: u32,
}

/// Burns pids (threads take pids from the same allocator and cost microseconds) until the
/// kernel's next pid is `pid`, then starts a [`Waiter`] there. A host that allocates pids fast
/// (another build or benchmark) can take the pid between the last burn and the spawn; after
/// `natural` of trying, the pid is requested with set_tid instead. Gives up after `budget`.
fn occupy_pid(pid: u32, natural: Duration, budget: Duration) -> Result<(Waiter, Reached), String> {
    let pid_max = read_u32("/proc/sys/kernel/pid_max");
    let started = Instant::now();
    let mut spawns = 0;
    let mut burned = 0u64;
    loop {
        let last = read_u32("/proc/sys/kernel/ns_last_pid");
        let left = pids_until(pid, last, pid_max);
        if left == 0 {
            spawns += 1;
            let waiter = Waiter::spawn(None).map_err(|e| format!("spawn: {e}"))?;
            if waiter.pid == pid {
                return Ok((
                    waiter,
                    Reached {
                        placed: false,
                        burned,
                        spawns,
                    },
                ));
            }
            // Someone else took it first (or holds it): try again, or ask for it.
            drop(waiter);
            if started.elapsed() > natural && !Path::new(&format!("/proc/{pid}")).exists() {
                spawns += 1;
                match Waiter::spawn(Some(pid)) {
                    Ok(waiter) => {
                        return Ok((
                            waiter,
                            Reached {
                                placed: true,
                                burned,
                                spawns,
                            },
                        ));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(format!("clone3 with set_tid {pid}: {e}")),
                }
            }
        } else {
            // Halve the distance, then one at a time: others take pids too, and a bulk step
            // that overshoots costs a whole round.
            let n = if left > 16 { left / 2 } else { 1 };
            for _ in 0..n {
                std::thread::spawn(|| {})
                    .join()
                    .expect("a pid-burning thread");
            }
            burned += u64::from(n);
        }
        if started.elapsed() > budget {
            let holder = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| s.lines().take(8).collect::<Vec<_>>().join("; "))
                .unwrap_or_else(|e| e.to_string());
            return Err(format!(
                "pid {pid} not reached within {budget:?}: {spawns} spawn(s), {burned} pids burned, \
                 ns_last_pid {last}, pid_max {pid_max}; held by: {holder}"
            ));
        }
    }
}

/// A target exits, its pid comes around again for a process the test starts: an order for the
/// old identity signals nothing, and the tree and `explain` describe the newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pid_is_never_mistaken_for_the_target_that_held_it() {
    // Enforce mode with long timeouts: any signal sent would be real, none is due.
    let h = start("").await;
    let mut a = agent(&["--leak"]);
    let claude = a.read_pid("claude");
    a.read("ready");
    wait_target(&h, claude).await;
    let old = Identity {
        pid: claude,
        start_ticks: proc_stat(claude).expect("the double is alive").start_ticks,
    };
    let target = h
        .handle
        .explain(claude)
        .await
        .unwrap()
        .target
        .expect("a target");
    assert_eq!(target.id, old);

    // The agent closes its child's stdin when its own stdin closes: the target exits and is
    // collected, so its pid is free.
    a.finish();
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{claude}")).exists() {
        assert!(
            started.elapsed() < DEADLINE,
            "the target {claude} never went away"
        );
        tokio::time::sleep(POLL).await;
    }
    let _ = a.child.wait();

    let wrap_started = Instant::now();
    let (newcomer, reached) = tokio::task::spawn_blocking(move || {
        occupy_pid(claude, Duration::from_secs(20), Duration::from_secs(60))
    })
    .await
    .unwrap()
    .unwrap_or_else(|why| panic!("{why}"));
    let wrap_time = wrap_started.elapsed();
    assert_eq!(newcomer.pid, claude);
    let new = Identity {
        pid: claude,
        start_ticks: proc_stat(claude)
            .expect("the newcomer is alive")
            .start_ticks,
    };
    assert_ne!(new, old, "a new identity at the same pid");
    eprintln!(
        "pid reuse: pid {claude} held again after {:.2} s: {} pids burned, {} spawn(s), {}; old \
         start {} → new start {}",
        wrap_time.as_secs_f64(),
        reached.burned,
        reached.spawns,
        if reached.placed {
            "the counter came round but others took the pid first: placed with clone3 set_tid"
        } else {
            "reached by the wrapped pid counter"
        },
        old.start_ticks,
        new.start_ticks
    );

    // The tree holds the newcomer at that pid, and explain says it is no target.
    let p = h
        .wait_process(claude, "the newcomer in the tree", |p| {
            p.filter(|p| p.id == new && p.comm == "lifecycle-helpe")
                .cloned()
        })
        .await;
    assert!(!p.placeholder);
    let e = h.handle.explain(claude).await.unwrap();
    assert!(
        e.target.is_none(),
        "the newcomer is not a target: {:?}",
        e.target
    );
    assert_eq!(e.process.as_ref().map(|p| p.id), Some(new));
    assert!(e.rules.iter().all(|r| !r.matches), "{:?}", e.rules);
    // (Kept only among the last 4,096 exits: a busy host may have pushed it out meanwhile.)
    if let Some(gone) = h.handle.exited(old).await {
        assert!(gone.exit.is_some());
    }

    // A decision for the old identity, executed for real, signals nothing.
    let order = reaper_tests::decision(old, "claude", 0, "rl-claude");
    let report = reap::execute(&Pidfds, &order).await;
    assert_eq!(report.outcome, Outcome::IdentityMismatch, "{report:?}");
    assert!(report.steps.is_empty());
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(
            proc_stat(claude).map(|s| (s.start_ticks, s.state != 'Z')),
            Some((new.start_ticks, true)),
            "the newcomer was signalled"
        );
        tokio::time::sleep(POLL).await;
    }
    let s = stats(&h).await;
    assert_eq!(s.reaps.kills_total(), 0, "{:?}", s.reaps);
    assert!(s.reaps.failures.is_empty(), "{:?}", s.reaps);
    drop(newcomer);
}

// ── 3. Restart ──────────────────────────────────────────────────────────────────────────────

/// `reaper explain PID` says it is a target.
fn is_target(daemon: &Daemon, pid: u32) -> bool {
    let CliOutput {
        status,
        stdout: out,
        stderr: err,
    } = reaper_cli(["explain", &pid.to_string(), "--socket", daemon.socket_arg()]);
    assert!(status.success(), "reaper explain failed: {err}");
    out.contains("target of rule rl-claude")
}

/// `reaper stats`: (kills, kill failures), summed over rules and reasons.
fn kills(daemon: &Daemon) -> (u64, u64) {
    let CliOutput {
        status,
        stdout: out,
        stderr: err,
    } = reaper_cli(["stats", "--json", "--socket", daemon.socket_arg()]);
    assert!(status.success(), "reaper stats failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let sum = |key: &str| {
        v["reaps"][key]
            .as_array()
            .unwrap_or_else(|| panic!("no reaps.{key}: {out}"))
            .iter()
            .map(|entry| entry[1].as_u64().expect("a count"))
            .sum()
    };
    (sum("kills"), sum("failures"))
}

/// SIGKILL, as a crash or the OOM killer would.
fn crash(daemon: &mut Daemon) {
    let child = &mut daemon.process.child;
    child.kill().expect("SIGKILL our own daemon");
    let status = child.wait().expect("collect it");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

/// `GET path` over a plain TCP connection: (status line, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(String, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// The sum of every sample of a metric family in Prometheus text.
fn metric_sum(body: &str, family: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics_of(addr: std::net::SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert!(status.contains(" 200 "), "{status}");
    body
}

/// The daemon is SIGKILLed after adopting three idle targets; the next one re-adopts them from
/// `/proc` with fresh idle clocks, kills each exactly once, and counts from zero.
#[test]
fn a_restarted_daemon_readopts_its_targets_and_kills_each_once() {
    const IDLE: Duration = Duration::from_secs(6);
    assert!(
        nix::unistd::geteuid().is_root(),
        "`reaper run` loads eBPF programs: run as root"
    );
    let dir = TempDir::new("restart");
    // The first daemon only adopts (its idle timeout is the default 10 minutes, so however slowly
    // this test runs it ends nothing); the second one reaps.
    let private = |name: &str, text: String| {
        let path = dir.write(name, &text);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let first_config = private("first.toml", config_text(""));
    let config = private("reaper.toml", config_text("idle_timeout = \"6s\""));
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();

    // Three leaked idle doubles, one per agent (so each agent reports its own child's end).
    let mut agents: Vec<Helper> = (0..3).map(|_| agent(&["--leak"])).collect();
    let claudes: Vec<u32> = agents.iter_mut().map(|a| a.read_pid("claude")).collect();
    for a in &mut agents {
        a.read("ready");
    }
    let idle_since = Instant::now();

    let args = [OsStr::new("--config"), config.as_os_str()];
    let first_args = [OsStr::new("--config"), first_config.as_os_str()];
    let mut first = Daemon::start(&dir, "first", first_args, metrics);
    let adopted_at = Instant::now();
    for pid in &claudes {
        let started = Instant::now();
        while !is_target(&first, *pid) {
            assert!(
                started.elapsed() < DEADLINE,
                "the first daemon never adopted {pid}:\n{}",
                first.log()
            );
            std::thread::sleep(POLL);
        }
    }
    assert_eq!(kills(&first), (0, 0));
    crash(&mut first);
    let first_lived = adopted_at.elapsed();
    assert!(
        claudes.iter().all(|pid| alive(*pid)),
        "the first daemon killed a double"
    );

    // Past the idle timeout as the doubles see it: a daemon that trusted anything older than its
    // own adoption would kill them at once.
    while idle_since.elapsed() < IDLE + Duration::from_secs(1) {
        std::thread::sleep(POLL);
    }
    let restarted = Instant::now();
    let second = Daemon::start(&dir, "second", args, metrics);
    let ready_after = restarted.elapsed();
    let fresh = metrics_of(metrics);
    assert_eq!(
        metric_sum(&fresh, "reaper_kills_total"),
        0.0,
        "kills start from zero"
    );
    assert_eq!(metric_sum(&fresh, "reaper_kill_failures_total"), 0.0);
    for pid in &claudes {
        assert!(
            is_target(&second, *pid),
            "the second daemon did not re-adopt {pid}:\n{}",
            second.log()
        );
    }
    assert!(
        claudes.iter().all(|pid| alive(*pid)),
        "a double was killed before {IDLE:?} of idleness under the new daemon"
    );

    // Each double ends once, cleanly (its input closed), no earlier than the idle timeout
    // after the restart.
    let mut died: Vec<Option<Duration>> = vec![None; claudes.len()];
    let deadline = Instant::now() + IDLE + DEADLINE;
    while died.iter().any(Option::is_none) {
        for (i, pid) in claudes.iter().enumerate() {
            if died[i].is_none() && !alive(*pid) {
                died[i] = Some(restarted.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every double was reaped: {died:?}\n{}",
            second.log()
        );
        std::thread::sleep(POLL);
    }
    let died: Vec<Duration> = died.into_iter().map(Option::unwrap).collect();
    for (a, pid) in agents.iter_mut().zip(&claudes) {
        assert_eq!(a.read("exit"), format!("{pid}:code:0"));
    }
    for (pid, at) in claudes.iter().zip(&died) {
        assert!(
            *at >= IDLE,
            "{pid} was killed {at:?} after the restart, before the idle timeout"
        );
    }
    let started = Instant::now();
    while kills(&second).0 < 3 {
        assert!(
            started.elapsed() < DEADLINE,
            "kills not counted:\n{}",
            second.log()
        );
        std::thread::sleep(POLL);
    }
    assert_eq!(kills(&second), (3, 0), "three kills, no failures");
    let page = metrics_of(metrics);
    assert_eq!(metric_sum(&page, "reaper_kills_total"), 3.0, "{page}");
    assert_eq!(metric_sum(&page, "reaper_kill_failures_total"), 0.0);
    let log = second.log();
    for pid in &claudes {
        let lines = log
            .lines()
            .filter(|l| l.contains(" reaped ") || l.ends_with(" reaped"))
            .filter(|l| l.contains(&format!("pid={pid} ")))
            .count();
        assert_eq!(lines, 1, "one kill line for {pid}:\n{log}");
    }
    assert!(
        !first.log().contains("reaped"),
        "the first daemon reaped something"
    );
    eprintln!(
        "restart: first daemon adopted 3 targets and was SIGKILLed {:.2} s later; second ready \
         {:.2} s after restart; kills at {:?} after restart (idle timeout {IDLE:?}); kills_total 3, \
         failures 0",
        first_lived.as_secs_f64(),
        ready_after.as_secs_f64(),
        died.iter()
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    drop(second);
    for mut a in agents {
        a.finish();
    }
}

// ── 4. Hostile input ────────────────────────────────────────────────────────────────────────

/// `/bin/sh -c 'read x'` (waits for stdin) under any argv the test chooses.
fn spawn_waiting_sh(exe: &Path, args: &[&[u8]]) -> Running {
    let child = Command::new(exe)
        .arg("-c")
        .arg("read x")
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sh");
    Running::new(child, "sh -c 'read x'")
}

/// A child forked from this test that renames itself (prctl) to `name`, then waits for the
/// returned pipe to close.
fn fork_renamed(name: &[u8]) -> (u32, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd as _;
    let mut comm = [0u8; 16];
    comm[..name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only makes async-signal-safe calls (prctl, close, read, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw syscalls on a stack buffer and this process's own fds.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, comm.as_ptr(), 0, 0, 0);
            libc::close(fds[1]);
            let mut byte = [0u8; 1];
            while libc::read(fds[0], byte.as_mut_ptr().cast(), 1) > 0 {}
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the read end; the write end is owned from here on.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is an open fd this process owns and nothing else closes.
    (pid as u32, unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    })
}

/// `/proc/PID/cmdline` once exec has set it up (the parent can see the child after the exec
/// reported success but before the new image's arguments are in place: empty then).
fn exec_cmdline(pid: u32) -> Vec<u8> {
    let started = Instant::now();
    loop {
        match proc_cmdline(pid) {
            Some(c) if !c.is_empty() => return c,
            other => assert!(
                started.elapsed() < DEADLINE,
                "{pid} has no cmdline: {other:?}"
            ),
        }
        std::thread::sleep(POLL);
    }
}

fn proc_comm_lossy(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/comm")).expect("/proc/PID/comm");
    String::from_utf8_lossy(raw.strip_suffix(b"\n").unwrap_or(&raw)).into_owned()
}

/// Invalid UTF-8 in argv, in the executable's name (so in comm at exec) and in a prctl rename:
/// kept as bytes where the tree keeps bytes, replaced where it keeps text, and never a panic,
/// a dropped process or a reconcile correction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_argv_and_comm_are_followed() {
    let h = start_with_rules("", &argv_rule(ARGV_SH)).await;
    // A start while processes come and go can leave ended ones for the first reconcile
    // (lifecycle.rs, a_start_during_a_spawn_storm_leaves_no_stale_process): not this test's
    // business. From here on the events alone must keep the tree equal to /proc.
    let at_start = h.reconcile().await.unwrap();
    let dir = TempDir::new("non-utf8");
    let exe = dir.join(OsStr::from_bytes(b"\xffsh\xfe\xc3("));
    std::os::unix::fs::symlink("/bin/sh", &exe).unwrap();
    let args: [&[u8]; 3] = [b"\xff\xfe", b"ok", b"caf\xe9 \xc3\x28 \xed\xa0\x80"];
    // A name no rule can have (TOML names are UTF-8): the kernel sends its exec's path and
    // comm, not its argv.
    let sh = spawn_waiting_sh(&exe, &args);
    let pid = sh.child.id();
    let p = h
        .wait_process(pid, "the non-UTF-8 exec", |p| {
            p.filter(|p| p.comm.contains('\u{fffd}')).cloned()
        })
        .await;
    assert_eq!(p.comm, proc_comm_lossy(pid), "comm, invalid bytes replaced");
    assert!(p.argv.is_unknown(), "{:?}", p.argv);
    // The same argv under a rule's name: the kernel sends it, bytes as they are.
    let named = dir.join(ARGV_SH);
    std::os::unix::fs::symlink("/bin/sh", &named).unwrap();
    let named_sh = spawn_waiting_sh(&named, &args);
    let named_pid = named_sh.child.id();
    let real = exec_cmdline(named_pid);
    assert!(
        std::str::from_utf8(&real).is_err(),
        "the test needs invalid UTF-8"
    );
    let n = h
        .wait_process(named_pid, "the non-UTF-8 argv", |p| {
            p.filter(|p| p.argv.raw()[..] == real[..]).cloned()
        })
        .await;
    assert!(!n.argv_truncated);
    assert_eq!(n.argv.iter().nth(3), Some(&b"\xff\xfe"[..]), "{:?}", n.argv);

    let name = b"\xc3(r\xffname\x80";
    let (renamed, keep) = fork_renamed(name);
    let want = String::from_utf8_lossy(name).into_owned();
    let r = h
        .wait_process(renamed, "the non-UTF-8 rename", |p| {
            p.filter(|p| p.comm == want).cloned()
        })
        .await;
    assert!(r.comm.contains('\u{fffd}'));
    assert_eq!(proc_comm_lossy(renamed), want, "/proc agrees");

    // /proc says the same as the events: the tree after a flush (no reconcile) and the /proc
    // scan agree, and a reconcile then finds nothing to correct.
    h.flush().await.unwrap();
    for (pid, comm) in [
        (pid, p.comm.clone()),
        (named_pid, n.comm.clone()),
        (renamed, want.clone()),
    ] {
        let now = h.handle.process(pid).await.expect("still in the tree");
        assert_eq!(now.comm, comm);
        let scanned = scan::read_pid(pid).expect("the scan reads it");
        assert_eq!(scanned.comm, comm, "the /proc scan's comm");
        assert_eq!(scanned.argv.raw()[..], proc_cmdline(pid).unwrap()[..]);
    }
    let fixed = h.reconcile().await.unwrap();
    assert_eq!(
        fixed.total(),
        0,
        "the events missed something /proc has: {fixed:?}"
    );
    eprintln!(
        "non-UTF-8: comm {:?} and {:?} followed; reconcile corrections {fixed:?} (after the \
         start-up: {at_start:?})",
        p.comm, want
    );
    // The local interface's JSON and the CLI renderings take them too.
    let all = h.handle.snapshot().await.unwrap();
    let json = serde_json::to_string(&all).expect("the tree as JSON");
    let back: Vec<reaper::tree::Process> = serde_json::from_str(&json).expect("and back");
    assert!(back.iter().any(|q| q.id == p.id && q.comm == p.comm));
    let text = reaper::render::render_tree(&all, &[]);
    assert!(text.contains(&p.comm));
    let e = h.handle.explain(pid).await.unwrap();
    assert!(reaper::render::render_explanation(&e).contains(&p.comm));

    drop(keep);
    // SAFETY: waiting for the child this test forked, which exits once the pipe closes.
    unsafe { libc::waitpid(renamed as i32, std::ptr::null_mut(), 0) };
    drop(sh);
    drop(named_sh);
}

/// A 1 MB argv: the event and the /proc scan carry the same flagged prefix, nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_argv_is_truncated_and_flagged() {
    let h = start_with_rules("", &argv_rule(ARGV_SH)).await;
    // Only what happens from here on counts (as in the non-UTF-8 test).
    h.reconcile().await.unwrap();
    let chunk: Vec<u8> = (0..100_000).map(|i| b'a' + (i % 26) as u8).collect();
    let args: Vec<&[u8]> = (0..10).map(|_| &chunk[..]).collect();
    // Under a rule's name: the kernel sends its argv.
    let dir = TempDir::new("megabyte-argv");
    let sh_link = dir.join(ARGV_SH);
    std::os::unix::fs::symlink("/bin/sh", &sh_link).unwrap();
    let sh = spawn_waiting_sh(&sh_link, &args);
    let pid = sh.child.id();
    let real = exec_cmdline(pid);
    assert!(real.len() > 1_000_000, "{} bytes", real.len());
    let p = h
        .wait_process(pid, "the 1 MB exec", |p| {
            p.filter(|p| p.argv_truncated).cloned()
        })
        .await;
    assert_eq!(p.argv.raw().len(), ARGV_LEN);
    assert_eq!(
        p.argv.raw()[..],
        real[..ARGV_LEN],
        "a prefix of the real argv"
    );
    h.flush().await.unwrap();
    assert!(h.handle.process(pid).await.is_some_and(|q| q.id == p.id));
    // The scan reads the same bound and flags the same cut (a scan of whole argvs let any user
    // blow up the daemon's memory: tests/tests/hostile.rs).
    let scanned = scan::read_pid(pid).expect("the scan reads it");
    assert_eq!(
        scanned.argv.raw()[..],
        real[..ARGV_LEN],
        "the scan keeps the same prefix"
    );
    assert!(scanned.argv_truncated, "and flags the cut");
    let e = h.handle.explain(pid).await.unwrap();
    assert!(e.target.is_none());
    let fixed = h.reconcile().await.unwrap();
    assert_eq!(
        fixed.total(),
        0,
        "the events missed something /proc has: {fixed:?}"
    );
    eprintln!(
        "1 MB argv: {} bytes in /proc, {} in the event (truncated flag set), reconcile {fixed:?}",
        real.len(),
        p.argv.raw().len()
    );
    drop(sh);
}

/// `/proc` entries vanish while the scan reads them: never an error, never a panic, never a pid
/// twice in one scan, and every storm child read is one of the storm's: its parent, this uid,
/// and the helper's or `/bin/true`'s comm and argv (no argv yet, mid-exec: exec_mmap() comes
/// before the loader sets `mm->arg_start`). Fields of a process are read one file at a time,
/// so the comm may be from before its exec and the argv from after.
#[test]
fn scanning_proc_during_a_storm_never_fails() {
    let storm = Command::new(helper_path())
        .args(["storm", "3000", "4"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the storm");
    let storm_pid = storm.id();
    let helper_argv = exec_cmdline(storm_pid);
    let mut storm = Running::new(storm, "the storm");
    let own_uid = nix::unistd::getuid().as_raw();
    let (mut scans, mut seen, mut children, mut rechecked, mut vanished) =
        (0u64, 0usize, 0u64, 0u64, 0u64);
    let started = Instant::now();
    loop {
        let snapshot = scan::scan().expect("a scan while processes come and go");
        scans += 1;
        seen = seen.max(snapshot.len());
        let pids: BTreeSet<u32> = snapshot.iter().map(|s| s.id.pid).collect();
        assert_eq!(pids.len(), snapshot.len(), "a pid read twice in one scan");
        for child in snapshot.iter().filter(|s| s.ppid == storm_pid) {
            children += 1;
            assert_eq!(child.uid, own_uid, "{child:?}");
            assert!(
                ["lifecycle-helpe", "true"].contains(&child.comm.as_str()),
                "{child:?}"
            );
            let argv = child.argv.raw();
            assert!(
                argv.is_empty() || argv[..] == b"/bin/true\0"[..] || argv[..] == helper_argv[..],
                "{child:?}"
            );
        }
        // Re-read the newest entries one by one: most are gone by now.
        let mut newest: Vec<_> = snapshot.iter().map(|s| s.id).collect();
        newest.sort_by_key(|id| std::cmp::Reverse(id.start_ticks));
        for id in newest.into_iter().take(20) {
            rechecked += 1;
            let here = scan::read_pid(id.pid);
            if here.is_none() || !scan::alive(id) {
                vanished += 1;
            }
            let _ = host::proc_start_ticks(id.pid);
        }
        if storm.exited().is_some() {
            break;
        }
        assert!(started.elapsed() < DEADLINE * 2, "the storm did not finish");
    }
    let status = storm.wait_until(Instant::now()).expect("finished");
    assert!(status.success(), "storm failed: {status}");
    assert!(scans > 1, "the scan ran during the storm");
    assert!(
        children > 0,
        "no scan caught a storm child in {scans} scans"
    );
    eprintln!(
        "scan during a storm: {scans} scans in {:.2} s (up to {seen} processes, {children} storm \
         children read whole), {rechecked} re-reads of which {vanished} had vanished — no error",
        started.elapsed().as_secs_f64()
    );
}

/// Runs `Config::load` with a deadline (a load that blocks is a failure, not a hung test).
fn load_within(path: &Path, within: Duration) -> Result<Config, ConfigError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(Config::load(&owned, &Overrides::default()));
    });
    match rx.recv_timeout(within) {
        Ok(result) => result,
        Err(_) => {
            // Unblock a reader stuck on a FIFO before failing.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
            panic!(
                "Config::load({}) did not return within {within:?}",
                path.display()
            )
        }
    }
}

use std::os::unix::fs::OpenOptionsExt as _;

/// Directories, empty files, files over 1 MiB, FIFOs, devices and non-UTF-8 text are refused
/// with one clear sentence, through the library and through `reaper check-config`.
#[test]
fn bad_config_files_are_refused_clearly() {
    let dir = TempDir::new("config-files");
    let private = |path: &Path| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap()
    };
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    private(&empty);
    let huge = dir.join("huge.toml");
    let mut text = config_text("");
    while text.len() <= 1 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&huge, &text).unwrap();
    private(&huge);
    let binary = dir.join("binary.toml");
    std::fs::write(&binary, b"mode = \"\xff\xfe\"\n").unwrap();
    private(&binary);
    let fifo = dir.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let subdir = dir.join("dir.toml");
    std::fs::create_dir(&subdir).unwrap();

    let cases: [(&Path, &str); 6] = [
        (&subdir, "is a directory"),
        (&empty, "`rule`"),
        (&huge, "over 1 MiB"),
        (&binary, "UTF-8"),
        (&fifo, "not a regular file"),
        (Path::new("/dev/null"), "not a regular file"),
    ];
    for (path, says) in cases {
        let err = load_within(path, Duration::from_secs(5)).expect_err("refused");
        let message = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(
            message.contains(says),
            "{}: {message:?} does not say {says:?}",
            path.display()
        );
        let CliOutput { status, stderr, .. } =
            reaper_cli([OsStr::new("check-config"), path.as_os_str()]);
        assert!(
            !status.success(),
            "check-config accepted {}",
            path.display()
        );
        assert!(
            stderr.contains(says),
            "check-config {}: {stderr:?} does not say {says:?}",
            path.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.lines().count() <= 8,
            "one clear message, not a dump: {stderr}"
        );
        eprintln!("{}: {}", path.display(), stderr.trim().replace('\n', " | "));
    }
    // The same text under 1 MiB is fine: the limit is what refused it.
    let ok = dir.join("ok.toml");
    std::fs::write(&ok, config_text("")).unwrap();
    private(&ok);
    assert!(Config::load(&ok, &Overrides::default()).is_ok());
}

/// With a 4 KiB ring, an exec whose argv fills the record's 4 KiB argv buffer (a 4.4 KiB
/// record; the helper is named by a rule, so its exec carries argv) never fits: that exec is
/// lost. (The comm still arrives: exec renames the task, and
/// the rename record is small.) A reconcile must then bring argv and exe up to date from
/// `/proc`, or a leaked `claude` whose exec was lost keeps its parent's argv and is never
/// recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_exec_is_repaired_by_the_reconcile() {
    let h = start_with_rules("ring_bytes = 4096", &argv_rule(reaper_tests::HELPER)).await;
    let long = format!("after-a-lost-exec-{}", "x".repeat(4200));
    let mut helper = Helper::spawn(&["wait", &long]);
    let pid = helper.read_pid("pid");
    h.wait_process(pid, "the fork", |p| p.map(|_| ())).await;
    // The loss itself starts a reconcile (within a second); whichever runs first, this one or
    // that one, does the repair: the daemon's running total of corrections says it was done.
    let fixed = h.reconcile().await.unwrap();
    let after = stats(&h).await;
    let p = h.handle.process(pid).await.expect("in the tree");
    eprintln!(
        "lost exec: {:?}, this reconcile {fixed:?}, all reconciles {:?}, tree comm {:?} argv {:?}",
        after.lost, after.corrections, p.comm, p.argv
    );
    assert!(
        after.lost.iter().any(|(k, n)| *k == "exec" && *n > 0),
        "{:?}",
        after.lost
    );
    assert!(
        after.corrections.refreshed > 0,
        "no reconcile refreshed the image: {:?}",
        after.corrections
    );
    reaper_tests::assert_matches_proc(&p);
    helper.finish();
}
