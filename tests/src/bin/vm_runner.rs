//! The `/init` of the initramfs `cargo xtask vm-test` boots other kernels with (Debian's 6.1 and
//! 6.12 cloud kernels in QEMU): PID 1 mounts /proc, /sys and /dev, runs the lifecycle and
//! reaping scenarios of the host tests (`reaper_tests::scenarios`) against the real pipeline
//! (`reaper::app::Pipeline`, the kernel's own BTF layout), prints one line per check and powers
//! the machine off.
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
    future::Future,
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use reaper::{
    app::{Pipeline, PipelineConfig},
    config::{Overrides, parse},
    detect::ActivityMeter,
    probes::layout,
};
use reaper_tests::{
    Harness,
    scenarios::{
        lifecycle::{self, ExitAudit},
        reaping,
    },
};

/// Deadline of a whole check, unless it sets its own.
const CHECK_DEADLINE: Duration = Duration::from_secs(90);

/// Results so far, shared with the watchdog (which prints them if the checks never finish).
static RESULTS: Mutex<(u32, u32)> = Mutex::new((0, 0));

type Shared = Arc<tokio::sync::Mutex<Option<Harness>>>;

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
            // The programs are next to this executable (reaper_tests::programs_dir).
            let failed = run_checks();
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
        say(&format!(
            "vm-runner: bringing up the loopback interface failed: {err}"
        ));
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

    reaper_tests::set_programs_dir(PathBuf::from("/bin"));
    run_checks();
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
fn run_checks() -> u32 {
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
    let audit = Arc::new(Mutex::new(None));
    check(&rt, "attach", Duration::from_secs(240), {
        let shared = shared.clone();
        let audit = audit.clone();
        async move { attach(shared, sock, audit).await }
    });
    // The scenarios, each on the one pipeline (tests/src/scenarios/).
    macro_rules! scenario {
        ($name:literal, $run:expr) => {
            check(&rt, $name, CHECK_DEADLINE, {
                let shared = shared.clone();
                async move {
                    let mut guard = harness(&shared).await?;
                    let h = guard.as_mut().context("no pipeline")?;
                    $run(h).await
                }
            })
        };
    }
    scenario!("fork_exec_exit", lifecycle::fork_exec_exit);
    scenario!("leader_exits_first", lifecycle::leader_exits_first);
    scenario!("orphans_reparented", lifecycle::orphans_reparented);
    scenario!("rename", lifecycle::rename);
    scenario!("reap_leaked", reaping::reap_leaked);
    scenario!("spare_chatting", reaping::spare_chatting);
    scenario!("thread_group_exit", lifecycle::thread_group_exit);
    check(&rt, "kill_path_syscalls", CHECK_DEADLINE, async {
        kill_path_syscalls()
    });
    scenario!("no_losses", lifecycle::no_losses);
    check(&rt, "one_exit_per_process", CHECK_DEADLINE, {
        let shared = shared.clone();
        async move {
            let audit = audit.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let audit: Arc<ExitAudit> = audit.context("no exit audit (attach failed)")?;
            let guard = harness(&shared).await?;
            audit.check(guard.as_ref().context("no pipeline")?).await
        }
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

async fn attach(
    shared: Shared,
    sock: bool,
    audit: Arc<Mutex<Option<Arc<ExitAudit>>>>,
) -> anyhow::Result<String> {
    // The helper named by a rule too, so its execs carry their argv (fork_exec_exit checks it).
    let text = format!(
        "{}\n{}",
        reaping::config(""),
        reaper_tests::argv_rule(reaper_tests::HELPER)
    );
    let config = parse(&text, "vm-test", &Overrides::default()).context("the check's config")?;
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
    *audit.lock().unwrap_or_else(|p| p.into_inner()) = Some(ExitAudit::start(&handle));
    let events = handle.subscribe();
    let stats = handle.stats().await.context("pipeline stopped")?;
    let source = stats.activity_source;
    let expected = if sock {
        ActivityMeter::Socket
    } else {
        ActivityMeter::ProcIo
    };
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
        source.map_or("none", ActivityMeter::as_str)
    ))
}

async fn harness(shared: &Shared) -> anyhow::Result<tokio::sync::MutexGuard<'_, Option<Harness>>> {
    // A check that timed out while blocked may still hold it: fail, don't wait for it.
    let guard = tokio::time::timeout(Duration::from_secs(15), shared.lock())
        .await
        .context("the pipeline is still held by a check that timed out")?;
    ensure!(guard.is_some(), "no pipeline (attach failed)");
    Ok(guard)
}
