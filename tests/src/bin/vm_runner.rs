//! The `/init` of the initramfs `cargo xtask vm-test` boots other kernels with (Debian's 6.1 and
//! 6.12 cloud kernels in QEMU): PID 1 mounts /proc, /sys and /dev, runs the lifecycle and
//! reaping checks against the real pipeline (`reaper::app::Pipeline`, the kernel's own BTF
//! layout), prints one line per check and powers the machine off.
//!
//! Output, one line each (xtask parses them; anything else is log):
//!
//! ```text
//! vm-runner: started uptime=1.93
//! vm-kernel: 6.1.0-56-cloud-amd64
//! vm-offsets: KernelOffsets { ready: 1, task_pid: 2456, … }
//! vm-sock-tracepoints: no
//! vm-check <name>: PASS|FAIL [<seconds>s] <detail>
//! vm-result: N passed, M failed
//! ```
//!
//! As PID 1 it is the child reaper: orphans come to it, so a thread reaps zombies. Every check
//! has a deadline (a hung check fails; the next one goes on), and a watchdog powers the machine
//! off whatever happens (`VM_DEADLINE_SECS`, default 540; the kernel passes `NAME=value` words
//! of its command line to init as environment).
//!
//! `VM_HANG_CHECK=<name>` makes that check wait forever first (to see the deadline work:
//! `cargo xtask vm-test --guest-env VM_HANG_CHECK=rename`).
//!
//! Other modes: `vm-runner --print-offsets` (this kernel's layout, then exit) and
//! `vm-runner --here` (the checks on the running system, without mounting or powering off:
//! for developing the checks on the host). Without an argument it refuses to run unless it is
//! PID 1.
use std::{
    collections::HashMap,
    future::Future,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use reaper::{
    app::{Pipeline, PipelineConfig},
    config::{Overrides, parse},
    detect::Source,
    detect::verdict::ActivityKind,
    events::{Event, ExitStatus, Identity},
    probes::layout,
};
use reaper_tests::{Harness, Helper, assert_matches_proc, proc_stat};
use tokio::sync::broadcast;

/// The comm of the agents the reaping checks start (a symlink to fake-agent), and the only
/// parent the test rule accepts.
const AGENT_COMM: &str = "fa-vm";
/// Deadline of one wait inside a check (an event, a state in the tree).
const WAIT: Duration = Duration::from_secs(30);
/// Deadline of a whole check, unless it sets its own.
const CHECK_DEADLINE: Duration = Duration::from_secs(90);

/// Results so far, shared with the watchdog (which prints them if the checks never finish).
static RESULTS: Mutex<(u32, u32)> = Mutex::new((0, 0));

type Shared = Arc<tokio::sync::Mutex<Option<Harness>>>;

/// Exit events per process over the whole run, counted by a task that taps the pipeline from
/// the start (a process must have exactly one).
type ExitAudit = Arc<Mutex<HashMap<Identity, u32>>>;

/// Where the helper programs are: /bin in the guest, next to this executable with `--here`.
#[derive(Clone)]
struct Programs {
    dir: PathBuf,
    /// Where the agent symlink goes.
    scratch: PathBuf,
}

impl Programs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn helper(&self) -> PathBuf {
        self.path("lifecycle-helper")
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--print-offsets") => std::process::exit(match print_layout() {
            Ok(_) => 0,
            Err(err) => {
                eprintln!("vm-runner: {err:#}");
                1
            }
        }),
        Some("--here") => {
            let exe = std::env::current_exe().expect("own path");
            let programs = Programs {
                dir: exe.parent().expect("a directory").to_path_buf(),
                scratch: std::env::temp_dir(),
            };
            let failed = run_checks(&programs);
            std::process::exit(i32::from(failed > 0));
        }
        None if std::process::id() == 1 => as_init(),
        _ => {
            eprintln!(
                "vm-runner is the init of `cargo xtask vm-test`'s virtual machines; outside one, \
                 use `vm-runner --print-offsets` or `vm-runner --here`"
            );
            std::process::exit(2);
        }
    }
}

/// `ip link set lo up`, as an init does: the kernel gives `lo` 127.0.0.1 once it is up (the
/// claude double talks to its "model" over loopback TCP).
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a datagram socket used only for the two interface ioctls below, with an ifreq
    // zeroed and then filled with the NUL-terminated name "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}

/// PID 1: set up the machine, run the checks, power off.
fn as_init() -> ! {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("bpf", "/sys/fs/bpf", "bpf"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(err) = nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            say(&format!(
                "vm-runner: mounting {fstype} on {target} failed: {err}"
            ));
        }
    }
    if let Err(err) = loopback_up() {
        say(&format!("vm-runner: bringing up the loopback interface failed: {err}"));
    }
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    say(&format!(
        "vm-runner: started uptime={}",
        uptime.split_whitespace().next().unwrap_or("?")
    ));

    // Orphans are re-parented to PID 1: reap every zombie child. (Our own children's exit
    // statuses are read from the pipeline's events, never from wait.)
    std::thread::spawn(|| {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });

    let deadline = std::env::var("VM_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(540), Duration::from_secs);
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        let (passed, failed) = *RESULTS.lock().unwrap_or_else(|p| p.into_inner());
        say(&format!(
            "vm-check watchdog: FAIL the checks did not finish within {}s",
            deadline.as_secs()
        ));
        say(&format!(
            "vm-result: {passed} passed, {} failed",
            failed + 1
        ));
        power_off();
    });

    let programs = Programs {
        dir: PathBuf::from("/bin"),
        scratch: PathBuf::from("/tmp"),
    };
    run_checks(&programs);
    power_off()
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only if reboot failed: PID 1 exiting panics the kernel, and `panic=-1` with QEMU's
    // `-no-reboot` ends the machine all the same.
    std::process::exit(1)
}

/// Prints the kernel, the layout from BTF and whether the socket tracepoints exist; returns
/// whether they do.
fn print_layout() -> anyhow::Result<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    say(&format!("vm-kernel: {}", release.trim()));
    let btf = layout::vmlinux().context("reading kernel BTF")?;
    let layout = layout::kernel_layout(&btf).context("resolving the kernel layout")?;
    // One line for xtask's table of what differs between kernels: the offsets, then the
    // features, as `name: value` pairs in one pair of braces.
    let features = format!("{:?}", layout.features);
    let features = features
        .split_once('{')
        .map_or("", |(_, rest)| rest.trim_end_matches('}').trim());
    let offsets = format!("{:?}", layout.offsets);
    let offsets = offsets.trim_end_matches('}').trim_end();
    say(&format!("vm-offsets: {offsets}, {features} }}"));
    let sock = layout::has_tracepoints(&btf, &reaper::probes::SOCKET_TRACEPOINTS);
    say(&format!(
        "vm-sock-tracepoints: {}",
        if sock { "yes" } else { "no" }
    ));
    Ok(sock)
}

/// Runs every check; returns how many failed.
fn run_checks(programs: &Programs) -> u32 {
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stdout)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let shared: Shared = Arc::new(tokio::sync::Mutex::new(None));
    let started = Instant::now();

    let sock = print_layout().unwrap_or_else(|err| {
        say(&format!("vm-runner: {err:#}"));
        false
    });
    let config = config_text();
    let audit = ExitAudit::default();
    check(&rt, "attach", Duration::from_secs(240), {
        let shared = shared.clone();
        let audit = audit.clone();
        async move { attach(shared, &config, sock, audit).await }
    });
    let p = programs.clone();
    check(&rt, "fork_exec_exit", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { fork_exec_exit(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "leader_exits_first", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { leader_exits_first(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "orphans_reparented", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { orphans(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "rename", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { rename(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "reap_leaked", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { reap_leaked(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "spare_chatting", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { spare_chatting(shared, p).await }
    });
    let p = programs.clone();
    check(&rt, "thread_group_exit", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { thread_group_exit(shared, p).await }
    });
    check(&rt, "kill_path_syscalls", CHECK_DEADLINE, async { kill_path_syscalls() });
    check(&rt, "no_losses", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { no_losses(shared).await }
    });
    check(&rt, "one_exit_per_process", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move { one_exit_per_process(shared, audit).await }
    });

    let (passed, failed) = *RESULTS.lock().unwrap_or_else(|p| p.into_inner());
    say(&format!(
        "vm-runner: checks took {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    say(&format!("vm-result: {passed} passed, {failed} failed"));
    // Stop the pipeline (detaches the probes) before the runtime goes.
    rt.block_on(async {
        if let Some(h) = shared.lock().await.take() {
            h.pipeline.shutdown().await;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    failed
}

/// Runs one check on the runtime with a deadline, catching panics; prints its line.
fn check<F>(rt: &tokio::runtime::Runtime, name: &str, deadline: Duration, fut: F)
where
    F: Future<Output = anyhow::Result<String>> + Send + 'static,
{
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let hang = std::env::var("VM_HANG_CHECK").is_ok_and(|n| n == name);
    let task = rt.spawn(async move {
        if hang {
            std::future::pending::<()>().await;
        }
        fut.await
    });
    let abort = task.abort_handle();
    rt.spawn(async move {
        let _ = tx.send(task.await);
    });
    let outcome = match rx.recv_timeout(deadline) {
        Ok(Ok(Ok(detail))) => Ok(detail),
        Ok(Ok(Err(err))) => Err(format!("{err:#}")),
        Ok(Err(join)) if join.is_panic() => {
            let payload = join.into_panic();
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "(no message)".into());
            Err(format!("panicked: {msg}"))
        }
        Ok(Err(join)) => Err(format!("task failed: {join}")),
        Err(_) => {
            abort.abort();
            Err(format!("timed out after {}s", deadline.as_secs()))
        }
    };
    let secs = started.elapsed().as_secs_f64();
    // One line, and not a whole verifier log (`vm-error` lines carry the full text).
    let one_line = |s: String| {
        let mut s = s.replace('\n', " | ");
        if s.len() > 2000 {
            let mut cut = 2000;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str(" …");
        }
        s
    };
    let mut results = RESULTS.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok(detail) => {
            results.0 += 1;
            say(&format!(
                "vm-check {name}: PASS [{secs:.1}s] {}",
                one_line(detail)
            ));
        }
        Err(detail) => {
            results.1 += 1;
            say(&format!(
                "vm-check {name}: FAIL [{secs:.1}s] {}",
                one_line(detail)
            ));
        }
    }
}

/// What `reaper check` tries on a child of its own, on this kernel: `pidfd_open` with
/// `PIDFD_NONBLOCK` (5.10+), `pidfd_send_signal` (5.1+) and the "close input" step
/// (`pidfd_getfd` 5.6+, then `shutdown(SHUT_RD)`). Every kernel of the matrix has all three.
fn kill_path_syscalls() -> anyhow::Result<String> {
    use reaper::check::{Call, ReapFacts};
    let r = ReapFacts::gather();
    for (name, call) in [
        ("pidfd_open(PIDFD_NONBLOCK)", &r.pidfd_open),
        ("pidfd_send_signal", &r.pidfd_send_signal),
        ("pidfd_getfd + shutdown(SHUT_RD)", &r.close_input),
    ] {
        ensure!(*call == Call::Works, "{name}: {call:?}");
    }
    Ok("pidfd_open(PIDFD_NONBLOCK), pidfd_send_signal and pidfd_getfd + shutdown work".to_owned())
}

/// The rule of the reaping checks: the tests' rule, with the agent's comm as the only parent.
fn config_text() -> String {
    format!(
        "idle_timeout = \"3s\"\norphan_grace = \"3s\"\ngrace = \"2s\"\nmax_kills_per_minute = 100\n\
         reconcile_interval = \"1h\"\n\n\
         [[rule]]\nname = \"vm-claude\"\ncomm = [\"claude\", \"claude.exe\"]\n\
         argv_any = [\"--input-format=stream-json\", \"--output-format=stream-json\"]\n\
         require_no_tty = true\nparent_comm = [\"{AGENT_COMM}\"]\n"
    )
}

async fn attach(
    shared: Shared,
    config: &str,
    sock: bool,
    audit: ExitAudit,
) -> anyhow::Result<String> {
    let config = parse(config, "vm-test", &Overrides::default()).context("the check's config")?;
    let started = Instant::now();
    let pipeline = match Pipeline::start(PipelineConfig::new(config)).await {
        Ok(p) => p,
        Err(err) => {
            // The whole chain (a verifier log spans many lines), before the one-line summary.
            say(&format!("vm-error attach: {err:?}"));
            return Err(err.context("Pipeline::start"));
        }
    };
    let took = started.elapsed().as_secs_f64();
    let handle = pipeline.handle();
    let events = handle.subscribe();
    let mut tap = handle.subscribe();
    tokio::spawn(async move {
        loop {
            match tap.recv().await {
                Ok(Event::Exit { id, .. }) => {
                    *audit
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(id)
                        .or_default() += 1;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    say(&format!("vm-runner: the exit audit lagged by {n} events"));
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let stats = handle.stats().await.context("pipeline stopped")?;
    let source = stats.activity_source;
    let expected = if sock { Source::Socket } else { Source::ProcIo };
    *shared.lock().await = Some(Harness {
        pipeline,
        handle,
        events,
    });
    ensure!(
        source == Some(expected),
        "activity source {source:?}, expected {expected:?} (socket tracepoints: {sock})"
    );
    Ok(format!(
        "pipeline started in {took:.1}s, {} processes, activity source {}",
        stats.processes,
        source_name(source)
    ))
}

fn source_name(source: Option<Source>) -> &'static str {
    match source {
        Some(Source::Socket) => "socket",
        Some(Source::ProcIo) => "proc-io",
        None => "none",
    }
}

/// The next event, within `deadline`.
async fn next_event(
    events: &mut broadcast::Receiver<Event>,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Event> {
    match tokio::time::timeout_at(deadline, events.recv()).await {
        Ok(Ok(event)) => Ok(event),
        Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
            bail!("the event tap lagged by {n} events")
        }
        Ok(Err(broadcast::error::RecvError::Closed)) => bail!("the pipeline stopped"),
        Err(_) => bail!("timed out"),
    }
}

/// Waits for the exit events of all of `pids`.
async fn exits_of(
    h: &mut Harness,
    pids: &[u32],
    within: Duration,
) -> anyhow::Result<Vec<(u32, ExitStatus)>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen: Vec<(u32, ExitStatus)> = Vec::new();
    while seen.len() < pids.len() {
        match next_event(&mut h.events, deadline).await {
            Ok(Event::Exit { id, status, .. })
                if pids.contains(&id.pid) && !seen.iter().any(|(p, _)| *p == id.pid) =>
            {
                seen.push((id.pid, status));
            }
            Ok(_) => {}
            Err(err) => bail!("waiting for the exits of {pids:?} (seen {seen:?}): {err}"),
        }
    }
    Ok(seen)
}

/// Polls the tree until `check` holds for `pid`.
async fn wait_process<T>(
    h: &Harness,
    pid: u32,
    what: &str,
    mut check: impl FnMut(Option<&reaper::tree::Process>) -> Option<T>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        let p = h.handle.process(pid).await;
        if let Some(found) = check(p.as_ref()) {
            return Ok(found);
        }
        if started.elapsed() > WAIT {
            bail!("timed out after {WAIT:?} waiting for {what}; last seen: {p:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn harness(shared: &Shared) -> anyhow::Result<tokio::sync::MutexGuard<'_, Option<Harness>>> {
    // A check that timed out while blocked may still hold it: fail, don't wait for it.
    let guard = tokio::time::timeout(Duration::from_secs(15), shared.lock())
        .await
        .context("the pipeline is still held by a check that timed out")?;
    ensure!(guard.is_some(), "no pipeline (attach failed)");
    Ok(guard)
}

async fn fork_exec_exit(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let mut guard = harness(&shared).await?;
    let h = guard.as_mut().expect("checked");
    h.events = h.handle.subscribe();
    let mut child = Command::new(programs.helper())
        .args(["exit", "3"])
        .stdin(Stdio::null())
        .spawn()
        .context("spawn lifecycle-helper")?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut fork_parent, mut exec_argv) = (None, None);
    let (id, status) = loop {
        match next_event(&mut h.events, deadline).await.with_context(|| {
            format!(
                "waiting for pid {pid}'s events (fork parent {fork_parent:?}, exec {exec_argv:?})"
            )
        })? {
            Event::Fork { id, parent, .. } if id.pid == pid => fork_parent = Some(parent.pid),
            Event::Exec { id, argv, .. } if id.pid == pid => exec_argv = Some(argv.to_strings()),
            Event::Exit { id, status, .. } if id.pid == pid => break (id, status),
            _ => {}
        }
    };
    let _ = child.wait();
    let own = std::process::id();
    ensure!(
        fork_parent == Some(own),
        "fork event parent {fork_parent:?}, expected {own}"
    );
    let argv = exec_argv.context("no exec event")?;
    ensure!(
        argv.get(1..) == Some(&["exit".to_owned(), "3".to_owned()][..]),
        "exec argv {argv:?}"
    );
    ensure!(
        status.code() == Some(3) && status.signal().is_none(),
        "exit status {status}, expected code 3"
    );
    let gone = h
        .handle
        .exited(id)
        .await
        .context("the exited process is not kept")?;
    ensure!(
        gone.exit.and_then(ExitStatus::code) == Some(3),
        "kept exit status {:?}",
        gone.exit
    );
    Ok(format!(
        "pid {pid}: fork (parent {own}), exec {argv:?}, exit code 3"
    ))
}

async fn leader_exits_first(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let mut guard = harness(&shared).await?;
    let h = guard.as_mut().expect("checked");
    h.events = h.handle.subscribe();
    let mut helper = Helper::spawn_program(&programs.helper(), &["leader-exits-first"]);
    let pid = helper.read_pid("pid");
    helper.read("leader");
    let started = Instant::now();
    while proc_stat(pid).is_none_or(|s| s.state != 'Z') {
        ensure!(started.elapsed() < WAIT, "the leader thread never exited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fixed = h.handle.reconcile().await.context("pipeline stopped")?;
    let p = h
        .handle
        .process(pid)
        .await
        .context("the process left the tree while its threads live")?;
    ensure!(
        p.exit.is_none(),
        "marked exited while its threads live: {:?}",
        p.exit
    );
    ensure!(
        fixed.removed == 0,
        "the reconcile took the zombie leader for a dead process"
    );
    helper.finish();
    let exits = exits_of(h, &[pid], WAIT).await?;
    let status = exits[0].1;
    ensure!(
        status.code() == Some(7),
        "exit status {status}, expected the group's code 7"
    );
    h.handle.reconcile().await.context("pipeline stopped")?;
    let mut more = 0;
    while let Ok(e) = h.events.try_recv() {
        if matches!(e, Event::Exit { id, .. } if id == p.id) {
            more += 1;
        }
    }
    ensure!(more == 0, "{} exit events for one process", more + 1);
    Ok(format!(
        "pid {pid}: one exit, code 7, after its leader thread exited first"
    ))
}

async fn orphans(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let guard = harness(&shared).await?;
    let h = guard.as_ref().expect("checked");
    let mut helper = Helper::spawn_program(&programs.helper(), &["orphan", "2"]);
    let parent = helper.read_pid("pid");
    // The parent exits after printing its children, which closed their stdout: EOF.
    let children: Vec<u32> = helper
        .all("child")
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()
        .context("child pids")?;
    ensure!(children.len() == 2, "children {children:?}");
    let mut parents = Vec::new();
    for &child in &children {
        let new_parent = wait_process(h, child, "re-parenting", |p| {
            let p = p?;
            let stat = proc_stat(child)?;
            (p.ppid == stat.ppid && p.ppid != parent).then_some(p.ppid)
        })
        .await?;
        let kernel = proc_stat(child).context("child gone")?.ppid;
        ensure!(
            new_parent == kernel,
            "tree parent {new_parent}, /proc says {kernel}"
        );
        if std::process::id() == 1 {
            ensure!(
                new_parent == 1,
                "PID 1 is the child reaper here, but the parent is {new_parent}"
            );
        }
        let p = h
            .handle
            .process(child)
            .await
            .context("child left the tree")?;
        assert_matches_proc(&p);
        let adoptive = h
            .handle
            .process(new_parent)
            .await
            .context("the new parent is not in the tree")?;
        ensure!(
            adoptive.children.contains(&child),
            "{new_parent}'s children {:?} lack {child}",
            adoptive.children
        );
        parents.push(new_parent);
    }
    helper.finish();
    Ok(format!(
        "children {children:?} of exited {parent} re-parented to {parents:?} as the kernel did"
    ))
}

async fn rename(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let mut guard = harness(&shared).await?;
    let h = guard.as_mut().expect("checked");
    h.events = h.handle.subscribe();
    let mut helper = Helper::spawn_program(&programs.helper(), &["rename", "vm-renamed"]);
    let pid = helper.read_pid("pid");
    let p = wait_process(h, pid, "the new comm", |p| {
        p.filter(|p| p.comm == "vm-renamed").cloned()
    })
    .await?;
    assert_matches_proc(&p);
    let mut renames = 0;
    while let Ok(e) = h.events.try_recv() {
        if matches!(&e, Event::Rename { id, comm, .. } if id.pid == pid && comm == "vm-renamed") {
            renames += 1;
        }
    }
    ensure!(renames == 1, "{renames} rename events for pid {pid}");
    helper.finish();
    Ok(format!(
        "pid {pid}: task_rename to vm-renamed seen, tree matches /proc"
    ))
}

/// `fake-agent`, exec'd through a symlink named [`AGENT_COMM`].
fn agent(programs: &Programs, args: &[&str]) -> anyhow::Result<Helper> {
    let link = programs.scratch.join(AGENT_COMM);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(programs.path("fake-agent"), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    Ok(Helper::spawn_program(&link, args))
}

fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Closes the agent's stdin and gives it (and its children) a moment to exit.
async fn finish_agent(mut agent: Helper, pid: u32) {
    agent.finish();
    let started = Instant::now();
    while alive(pid) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reap_leaked(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let mut guard = harness(&shared).await?;
    let h = guard.as_mut().expect("checked");
    h.events = h.handle.subscribe();
    let source = h
        .handle
        .stats()
        .await
        .context("pipeline stopped")?
        .activity_source;
    let mut a = agent(&programs, &["--leak"])?;
    let agent_pid = a.read_pid("agent");
    let claude = a.read_pid("claude");
    a.read("ready");
    let ready = Instant::now();
    let target = h
        .handle
        .explain(claude)
        .await
        .context("pipeline stopped")?
        .target
        .with_context(|| format!("claude {claude} is not a target"))?;
    ensure!(target.rule == "vm-claude", "target of rule {}", target.rule);
    let exits = exits_of(h, &[claude], WAIT).await?;
    let took = ready.elapsed().as_secs_f64();
    let status = exits[0].1;
    ensure!(
        status.code() == Some(0),
        "claude {claude} ended with {status}, not by itself after reaper closed its input"
    );
    ensure!(alive(agent_pid), "the agent {agent_pid} died too");
    let started = Instant::now();
    let kills = loop {
        let s = h.handle.stats().await.context("pipeline stopped")?;
        if s.reaps.kills_total() >= 1 || started.elapsed() > Duration::from_secs(10) {
            break s.reaps.kills_total();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(kills == 1, "{kills} kills counted");
    finish_agent(a, agent_pid).await;
    Ok(format!(
        "leaked claude {claude} ended by closing its input {took:.1}s after its agent was ready \
         (idle_timeout 3s, activity source {}); agent {agent_pid} survived",
        source_name(source)
    ))
}

async fn spare_chatting(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    let guard = harness(&shared).await?;
    let h = guard.as_ref().expect("checked");
    let before = h.handle.stats().await.context("pipeline stopped")?;
    let mut a = agent(&programs, &["--chat-every", "1000"])?;
    let agent_pid = a.read_pid("agent");
    let claude = a.read_pid("claude");
    a.read("ready");
    let long = Duration::from_secs(8);
    let until = Instant::now() + long;
    while Instant::now() < until {
        ensure!(alive(claude), "the chatting claude {claude} was killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = h.handle.stats().await.context("pipeline stopped")?;
    ensure!(
        after.reaps.kills_total() == before.reaps.kills_total(),
        "something was reaped meanwhile: {:?}",
        after.reaps
    );
    let target = h
        .handle
        .explain(claude)
        .await
        .context("pipeline stopped")?
        .target
        .with_context(|| format!("claude {claude} is not a target"))?;
    ensure!(
        target.verdict.state() == "active",
        "verdict {:?}",
        target.verdict
    );
    let source = after.activity_source;
    let kind = target.evidence.last_activity_kind;
    let now = reaper::clock::mono_ns();
    let ago = |t: u64| format!("{:.1}s ago", now.saturating_sub(t) as f64 / 1e9);
    let socket = target.evidence.last_socket_byte;
    // The last sign may be CPU (a turn is work, more so under emulation); the conversation's
    // bytes must have been seen all the same.
    match source {
        Some(Source::Socket) => ensure!(
            socket.is_some(),
            "no socket byte seen with activity source socket (last activity {kind:?})"
        ),
        _ => ensure!(
            matches!(kind, ActivityKind::Io | ActivityKind::Cpu),
            "last activity {kind:?}, expected Io (or Cpu) with activity source proc-io"
        ),
    }
    finish_agent(a, agent_pid).await;
    Ok(format!(
        "chatting claude {claude} alive after {}s, active, activity source {}, last activity \
         {kind:?} {}, last socket byte {}",
        long.as_secs(),
        source_name(source),
        ago(target.evidence.last_activity),
        socket.map_or("none".into(), ago)
    ))
}

/// Processes with several live threads killed at once: every thread runs do_exit() at the same
/// time, and the process must still give exactly one exit event. (Before 6.16 the tracepoint
/// does not say which thread ended the group.)
async fn thread_group_exit(shared: Shared, programs: Programs) -> anyhow::Result<String> {
    use std::io::BufRead as _;
    const ROUNDS: usize = 40;
    let mut guard = harness(&shared).await?;
    let h = guard.as_mut().expect("checked");
    h.events = h.handle.subscribe();
    let mut pids = Vec::new();
    for _ in 0..ROUNDS {
        // The claude double runs seven threads; its parent (this runner) is no agent, so no
        // rule makes it a target.
        let mut child = Command::new(programs.path("claude"))
            .args(["--output-format", "stream-json", "--no-startup-child"])
            .env("XDG_RUNTIME_DIR", &programs.scratch)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn claude")?;
        let stdout = child.stdout.take().context("stdout")?;
        // Its init line comes once its threads are started.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).context("no init line from claude")?;
        ensure!(line.contains("init"), "claude's first line: {line:?}");
        let threads = std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .map(|d| d.count())
            .unwrap_or(0);
        ensure!(threads > 1, "claude {} has {threads} threads", child.id());
        child.kill().context("SIGKILL our own child")?;
        pids.push(child.id());
        drop(child);
    }
    // Every exit event for these pids: until each was seen, then whatever a flush brings.
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let count = |counts: &mut HashMap<u32, u32>, e: Event| {
        if let Event::Exit { id, .. } = e
            && pids.contains(&id.pid)
        {
            *counts.entry(id.pid).or_default() += 1;
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while counts.len() < pids.len() {
        let e = next_event(&mut h.events, deadline)
            .await
            .with_context(|| format!("waiting for the exits of {pids:?} (seen {counts:?})"))?;
        count(&mut counts, e);
    }
    h.handle.reconcile().await.context("pipeline stopped")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.handle.reconcile().await.context("pipeline stopped")?;
    while let Ok(e) = h.events.try_recv() {
        count(&mut counts, e);
    }
    let mut dup: Vec<(u32, u32)> = counts.into_iter().filter(|(_, n)| *n > 1).collect();
    dup.sort_unstable();
    let dup: Vec<String> = dup.iter().map(|(pid, n)| format!("{pid}×{n}")).collect();
    ensure!(
        dup.is_empty(),
        "{} of {ROUNDS} SIGKILLed multi-threaded processes gave several exit events: {}",
        dup.len(),
        dup.join(" ")
    );
    Ok(format!(
        "{ROUNDS} SIGKILLed 7-thread processes, one exit event each"
    ))
}

/// Over the whole run: no process got two exit events.
async fn one_exit_per_process(shared: Shared, audit: ExitAudit) -> anyhow::Result<String> {
    {
        let guard = harness(&shared).await?;
        let h = guard.as_ref().expect("checked");
        h.handle.reconcile().await.context("pipeline stopped")?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = audit.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut dup: Vec<(Identity, u32)> = audit
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, n)| (*i, *n))
        .collect();
    dup.sort();
    ensure!(
        dup.is_empty(),
        "{} of {} exited processes had several exit events: {}",
        dup.len(),
        audit.len(),
        dup.iter()
            .map(|(i, n)| format!("{i}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(format!(
        "{} exited processes, one exit event each",
        audit.len()
    ))
}

async fn no_losses(shared: Shared) -> anyhow::Result<String> {
    let guard = harness(&shared).await?;
    let h = guard.as_ref().expect("checked");
    let fixed = h.handle.reconcile().await.context("pipeline stopped")?;
    let s = h.handle.stats().await.context("pipeline stopped")?;
    ensure!(s.lost_total == 0, "the kernel lost events: {:?}", s.lost);
    ensure!(
        s.decode_errors == 0,
        "{} records could not be decoded",
        s.decode_errors
    );
    Ok(format!(
        "{} events, none lost or undecodable; final reconcile corrected {} ({fixed:?})",
        s.events_total,
        fixed.total()
    ))
}
