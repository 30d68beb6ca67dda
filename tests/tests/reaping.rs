//! Finding leaked, idle `claude` children and reaping them, against the real kernel, with the
//! test doubles built from ../shared/CLAUDE-PROCESS.md (`claude`, `fake-agent`).
//!
//! Every rule here also requires the parent to be this run's agent (`fake-agent` exec'd through
//! a symlink named `fa-<test pid>`, so its comm is unique) or this test process, so no process
//! on the host that the tests did not start can ever match.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use reaper::{
    app::{PipelineConfig, PipelineStats},
    config::{Overrides, parse},
    events::{ExitStatus, Identity},
    host::Pidfds,
    reap::{self, Outcome, ProcessOps as _},
};
use reaper_tests::{
    DEADLINE, Harness, Helper, alive, proc_stat, program, reaper_bin,
    scenarios::{
        self, expect,
        reaping::{self, AGENT, RULE, kills_by},
    },
};

/// This test binary's comm, so processes it spawns directly can be targets too.
fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim()
        .to_owned()
}

/// The scenarios' rule, whose parent may also be this test process (for the doubles it starts
/// directly).
fn config_text(extra: &str) -> String {
    reaper_tests::reaping_config(RULE, extra, &[agent_comm(), own_comm()])
}

async fn start(extra: &str) -> Harness {
    let config = parse(&config_text(extra), "test", &Overrides::default()).expect("test config");
    Harness::start_with(PipelineConfig::new(config)).await
}

/// The comm of this run's agents.
fn agent_comm() -> String {
    reaper_tests::agent_comm(AGENT)
}

fn agent(args: &[&str]) -> Helper {
    reaper_tests::agent(AGENT, args)
}

async fn exits_of(h: &mut Harness, pids: &[u32]) -> HashMap<u32, ExitStatus> {
    scenarios::exits_of(h, pids)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn exit_of(h: &mut Harness, pid: u32) -> ExitStatus {
    exits_of(h, &[pid]).await[&pid]
}

async fn stats_until(
    h: &Harness,
    what: &str,
    check: impl Fn(&PipelineStats) -> bool,
) -> PipelineStats {
    scenarios::stats_until(h, what, check)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Asserts `pid` stays alive for `long`, and nothing is reaped.
async fn stays_alive(h: &Harness, pid: u32, long: Duration) {
    stays_alive_only(pid, long).await;
    let stats = h.handle.stats().await.unwrap();
    assert_eq!(
        stats.reaps.kills_total(),
        0,
        "nothing may be reaped: {:?}",
        stats.reaps
    );
}

async fn stays_alive_only(pid: u32, long: Duration) {
    scenarios::stays_alive(pid, long)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn wait_target(h: &Harness, pid: u32) -> reaper::detect::TargetView {
    scenarios::wait_target(h, pid)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn stats(h: &Harness) -> PipelineStats {
    h.handle.stats().await.unwrap()
}

/// Whether the target ended the way the SDK's `close()` (or SIGINT) ends it: by itself, status
/// 0, which ends the daemon's loop without an error.
fn ended_cleanly(status: ExitStatus) -> bool {
    status.code() == Some(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_idle_child_and_its_descendants_are_reaped_and_the_parent_survives() {
    let mut h = start("").await;
    expect(reaping::reap_leaked(&mut h).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_in_a_live_conversation_is_never_reaped() {
    let mut h = start("").await;
    expect(reaping::spare_chatting(&mut h).await);
}

/// Under `/proc/PID/io` the model's last word is stamped in the kernel (tcp_rcv_space_adjust),
/// so the tool started just before it does not hold the leaked child's turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_proc_io_a_leaked_child_with_a_tool_is_reaped_too() {
    let mut h = start("activity_source = \"proc-io\"").await;
    assert!(s_is_proc_io(&h).await);
    expect(reaping::reap_leaked(&mut h).await);
}

async fn s_is_proc_io(h: &Harness) -> bool {
    matches!(
        stats(h).await.activity_source,
        Some(reaper::detect::ActivityMeter::ProcIo)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proc_io_fallback_reaps_the_idle_and_spares_the_chatting() {
    // What kernels without sock:sock_send_length (before 6.3) use, forced here.
    let mut h = start("activity_source = \"proc-io\"").await;
    assert!(s_is_proc_io(&h).await);
    let mut chat = agent(&["--chat-every", "1000"]);
    let mut leak = agent(&["--leak"]);
    // The leaked child's turn is over once its agent prints it: the clock starts then, not
    // after the other agent's line too, which a loaded host may deliver later.
    let leaked = leak.read_pid("claude");
    let started = Instant::now();
    let chatting = chat.read_pid("claude");
    assert!(ended_cleanly(exit_of(&mut h, leaked).await));
    let took = started.elapsed();
    // (How soon after is the benchmark's business; here: not before its idle timeout.)
    assert!(
        took >= Duration::from_secs(3),
        "idle timeout 3 s, reaped after {took:?}"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(alive(chatting), "the chatting child was killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target = h.handle.explain(chatting).await.unwrap().target.unwrap();
    assert_eq!(target.verdict.state(), "active");
    assert_eq!(
        target.evidence.last_activity_kind,
        reaper::detect::verdict::ActivityKind::Io
    );
    chat.finish();
    leak.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_descendant_is_busy_is_never_reaped() {
    let h = start("").await;
    let mut a = agent(&["--leak", "--message", "tool:busy"]);
    let claude = a.read_pid("claude");
    let tool = a.read_pid("tool");
    a.read("ready");
    stays_alive(&h, claude, Duration::from_secs(8)).await;
    assert!(alive(tool));
    let target = h.handle.explain(claude).await.unwrap().target.unwrap();
    assert!(
        target.evidence.cpu_rate.unwrap() > 0.02,
        "{:?}",
        target.evidence
    );
    a.finish();
}

/// Starts the double directly under this test process, optionally on a pty.
fn spawn_double(exe: &Path, with_tty: bool) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--output-format",
        "stream-json",
        "--verbose",
        "--input-format",
        "stream-json",
    ])
    .env("XDG_RUNTIME_DIR", reaper_tests::runtime_dir())
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null());
    if with_tty {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave = std::os::fd::AsRawFd::as_raw_fd(&pty.slave);
        // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe; the pty outlives the call.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on a pty");
        std::mem::forget(pty.master); // kept open for the test's life: the tty stays valid
        return child;
    }
    cmd.spawn().expect("spawn the double")
}

struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_with_a_terminal_is_never_reaped() {
    let mut h = start("").await;
    let with_tty = Reap(spawn_double(&program("claude"), true));
    let without = Reap(spawn_double(&program("claude"), false));
    let (tty_pid, plain_pid) = (with_tty.0.id(), without.0.id());
    // The control: the same double without a terminal is reaped; its stdin is a pipe, so the
    // clean end is SIGINT.
    let status = exit_of(&mut h, plain_pid).await;
    assert!(ended_cleanly(status), "{status}");
    assert_eq!(
        kills_by(
            &stats_until(&h, "the kill counted", |s| s.reaps.kills_total() == 1).await,
            "interrupted"
        ),
        1
    );
    let e = h.handle.explain(tty_pid).await.unwrap();
    assert!(e.target.is_none());
    assert!(
        e.rules[0]
            .why_not
            .as_deref()
            .unwrap_or("")
            .contains("terminal"),
        "{:?}",
        e.rules
    );
    stays_alive_only(tty_pid, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalike_names_are_never_reaped() {
    let mut h = start("").await;
    let dir = tempdir("lookalikes");
    let mut lookalikes = Vec::new();
    for name in ["claude-foo", "claudex", "node"] {
        let path = dir.join(name);
        std::fs::copy(program("claude"), &path).unwrap();
        lookalikes.push(Reap(spawn_double(&path, false)));
    }
    // claude.exe, and a symlink named claude → claude.exe, are the real thing: reaped.
    let exe = dir.join("claude.exe");
    std::fs::copy(program("claude"), &exe).unwrap();
    let link_dir = dir.join("bin");
    std::fs::create_dir(&link_dir).unwrap();
    std::os::unix::fs::symlink(&exe, link_dir.join("claude")).unwrap();
    let real = Reap(spawn_double(&exe, false));
    let linked = Reap(spawn_double(&link_dir.join("claude"), false));
    for status in exits_of(&mut h, &[real.0.id(), linked.0.id()])
        .await
        .values()
    {
        assert!(ended_cleanly(*status), "{status}");
    }
    stats_until(&h, "both kills counted", |s| s.reaps.kills_total() == 2).await;
    for l in &lookalikes {
        assert!(alive(l.0.id()), "lookalike {} was killed", l.0.id());
        assert!(h.handle.explain(l.0.id()).await.unwrap().target.is_none());
    }
    assert_eq!(stats(&h).await.reaps.kills_total(), 2);
    drop(lookalikes);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reaper-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_signals_nothing_and_counts() {
    let h = start("mode = \"dry-run\"").await;
    let mut a = agent(&["--leak"]);
    let claude = a.read_pid("claude");
    a.read("ready");
    let started = Instant::now();
    loop {
        let s = stats(&h).await;
        if s.reaps.would_kill_total() == 1 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no would-kill counted: {:?}",
            s.reaps
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stays_alive(&h, claude, Duration::from_secs(2)).await;
    assert_eq!(
        stats(&h).await.reaps.would_kill_total(),
        1,
        "counted once, not every tick"
    );
    a.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_held_by_another_process_is_never_signalled() {
    // A process the test started, that is not a target…
    let mut other = Helper::spawn(&["wait"]);
    let pid = other.read_pid("pid");
    let start = proc_stat(pid).unwrap().start_ticks;
    // …and a decision for a target that held the same pid before (an older start time).
    let comm = proc_stat(pid).unwrap().comm;
    let stale = Identity {
        pid,
        start_ticks: start - 1,
    };
    let order = reaper_tests::decision(stale, &comm, 0, "test-claude");
    assert!(matches!(
        Pidfds.open(&order.target),
        Err(reap::OpenError::Mismatch { .. })
    ));
    let report = reap::execute(&Pidfds, &order).await;
    assert_eq!(report.outcome, Outcome::IdentityMismatch);
    assert!(report.steps.is_empty());
    stays_alive_only(pid, Duration::from_millis(300)).await;
    // Nor a process that now runs another program (another name) or as another uid.
    let mut renamed = order.clone();
    renamed.target.id.start_ticks = start;
    renamed.target.comm = "claude".into();
    assert_eq!(
        reap::execute(&Pidfds, &renamed).await.outcome,
        Outcome::IdentityMismatch
    );
    let mut other_uid = renamed.clone();
    other_uid.target.comm = comm.clone();
    other_uid.target.uid = 1000;
    assert_eq!(
        reap::execute(&Pidfds, &other_uid).await.outcome,
        Outcome::IdentityMismatch
    );
    stays_alive_only(pid, Duration::from_millis(300)).await;
    // The same decision with the right identity does signal: the checks are what stopped it.
    let mut right = order.clone();
    right.target.id.start_ticks = start;
    let report = reap::execute(&Pidfds, &right).await;
    assert_eq!(
        (report.outcome, report.step),
        (Outcome::Ended, Some(reap::Step::Terminated))
    );
    other.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_target_is_reaped_after_the_orphan_grace() {
    // This test process adopts orphans (as `systemd --user` does), so the orphaned double is
    // re-parented to it, not to init. Long idle timeout: only the orphan rule can fire.
    assert_eq!(
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let mut h = start("idle_timeout = \"10m\"\norphan_grace = \"2s\"").await;
    let mut a = agent(&["--leak", "--orphanable"]);
    let claude = a.read_pid("claude");
    let holder = a.read_pid("holder");
    a.read("ready");
    a.child.kill().unwrap(); // SIGKILL our own fake daemon
    let _ = a.child.wait();
    let adopted = h
        .wait_process(claude, "re-parenting to the subreaper", |p| {
            p.filter(|p| p.ppid == std::process::id()).cloned()
        })
        .await;
    assert_eq!(adopted.ppid, proc_stat(claude).unwrap().ppid);
    let status = exit_of(&mut h, claude).await;
    assert!(ended_cleanly(status), "{status}");
    stats_until(&h, "an orphan kill", |s| {
        s.reaps
            .kills
            .iter()
            .any(|((_, reason, _), n)| reason == "orphaned" && *n == 1)
    })
    .await;
    // Collect what we adopted.
    a.finish();
    for pid in [claude, holder] {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leaked_doubles_are_each_reaped_cleanly() {
    const N: usize = 20;
    let mut h = start("").await;
    let mut a = agent(&["--leak", "--count", &N.to_string()]);
    let agent_pid = a.read_pid("agent");
    a.read("ready");
    let claudes: Vec<u32> = a.values["claude"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(claudes.len(), N);
    let exits = exits_of(&mut h, &claudes).await;
    assert!(exits.values().all(|s| ended_cleanly(*s)), "{exits:?}");
    let delays = stats_until(&h, "20 kills", |s| s.reaps.kill_delays.len() == N)
        .await
        .reaps
        .kill_delays;
    let mut sorted = delays.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = sorted[N / 2];
    let max = sorted[N - 1];
    eprintln!(
        "reap latency over {N} leaked doubles (idle deadline → process gone): \
         min {:.3} s, p50 {p50:.3} s, max {max:.3} s",
        sorted[0]
    );
    assert!(alive(agent_pid));
    a.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_waiting_on_a_silent_tool_is_never_reaped_and_its_result_arrives() {
    // Idle timeout 3 s; the turn's tool is silent for 8 s, and so is the CLI meanwhile.
    let mut h = start("").await;
    let mut a = agent(&["--leak", "--message", "tool:wait:8"]);
    let agent_pid = a.read_pid("agent");
    let model = a.read("model");
    let claude: u32 = model.split(':').next().unwrap().parse().unwrap();
    let started = Instant::now();
    // The fake CLI forks its tool, which then takes its name: a view between the two shows
    // the turn waiting on a process still called `claude`, so wait for the named tool.
    let in_flight = loop {
        let t = wait_target(&h, claude).await;
        if let reaper::detect::verdict::Verdict::TurnInFlight { waiting_on, .. } = t.verdict
            && t.waiting_on_comm.as_deref() == Some("tool-wait")
        {
            break waiting_on;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "never a turn in flight on the tool: {:?}, waiting on {:?}",
            t.verdict,
            t.waiting_on_comm
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The result arrives (the agent prints the pid after it), after the tool ended by itself.
    assert_eq!(a.read_pid("claude"), claude);
    let tool = a.read_pid("tool");
    assert_eq!(tool, in_flight);
    assert!(
        started.elapsed() > Duration::from_secs(3 + 1),
        "the turn outlived the idle timeout"
    );
    assert_eq!(
        stats(&h).await.reaps.kills_total(),
        0,
        "nothing reaped during the turn"
    );
    a.read("ready");
    // Leaked after its turn: reaped like any other, and cleanly.
    assert!(ended_cleanly(exit_of(&mut h, claude).await));
    assert!(alive(agent_pid));
    a.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_child_with_stdio_mcp_servers_is_still_reaped_and_they_end_with_it() {
    let mut h = start("").await;
    let mut a = agent(&["--leak", "--claude-arg", "--mcp", "--claude-arg", "2"]);
    let claude = a.read_pid("claude");
    a.read("ready");
    wait_target(&h, claude).await;
    let servers: Vec<u32> = h
        .handle
        .snapshot()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.ppid == claude && p.comm == "mcp-server")
        .map(|p| p.id.pid)
        .collect();
    assert_eq!(servers.len(), 2, "two MCP servers under {claude}");
    let mut all = servers.clone();
    all.push(claude);
    let exits = exits_of(&mut h, &all).await;
    assert!(ended_cleanly(exits[&claude]), "{}", exits[&claude]);
    let s = stats_until(&h, "the kill counted", |s| s.reaps.kills_total() == 1).await;
    assert_eq!(kills_by(&s, "closed"), 1, "{:?}", s.reaps);
    a.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_ignores_the_end_of_its_input_gets_sigterm_after_the_eof_grace() {
    let mut h = start("eof_grace = \"1s\"").await;
    let mut a = agent(&["--leak", "--claude-arg", "--ignore-stdin-eof"]);
    let agent_pid = a.read_pid("agent");
    let claude = a.read_pid("claude");
    a.read("ready");
    wait_target(&h, claude).await;
    assert_eq!(
        exit_of(&mut h, claude).await.signal(),
        Some(libc::SIGTERM as u8)
    );
    let s = stats_until(&h, "the kill counted", |s| s.reaps.kills_total() == 1).await;
    assert_eq!(kills_by(&s, "terminated"), 1, "{:?}", s.reaps);
    assert!(
        s.reaps.kill_delays[0] >= 1.0,
        "SIGTERM only after the eof_grace: {:?}",
        s.reaps.kill_delays
    );
    assert!(alive(agent_pid));
    a.finish();
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempdir("bad-config");
    let cases = [
        (
            "idle_timout = \"5m\"\n[[rule]]\nname = \"r\"\ncomm = [\"claude\"]\n",
            "idle_timout",
        ),
        (
            "idle_timeout = \"5 fortnights\"\n[[rule]]\nname = \"r\"\ncomm = [\"claude\"]\n",
            "idle_timeout",
        ),
        ("[[rule]]\nname = \"r\"\ncomm = []\n", "rule[0].comm"),
        ("mode = \"enforce\"\n", "rule"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        for args in [
            vec!["check-config", path.to_str().unwrap()],
            vec![
                "run",
                "--config",
                path.to_str().unwrap(),
                "--socket",
                "/nonexistent/never.sock",
            ],
        ] {
            let out = std::process::Command::new(reaper_bin())
                .args(&args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted {text:?}");
            assert!(
                stderr.contains(key),
                "{args:?}: {stderr:?} does not name {key}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let good = dir.join("good.toml");
    std::fs::write(&good, reaper::config::DEFAULT_TOML).unwrap();
    let out = std::process::Command::new(reaper_bin())
        .args(["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
