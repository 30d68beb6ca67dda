//! `cargo xtask bench`: what following every process costs, and what it buys.
//!
//! Five benchmarks against the release binaries, on the real kernel:
//!
//! 1. **Spawn-storm overhead.** `lifecycle-helper storm N 1` (fork, exec `/bin/true`, wait, N
//!    times) and `bench-load threads T` (create and join T threads), each run under
//!    `bench-load rusage` (wall time, and the CPU time of the storm and every process it waited
//!    for), with no tracer, with reaper, and with `bench/execsnoop.bt` under bpftrace. The three
//!    are interleaved round by round (A B C A B C …), so drift on a shared machine hits all three
//!    alike; the result is the median of the per-round ratios to no tracer, with min–max.
//! 2. **Throughput and loss.** Several storms in parallel with reaper running: events handled
//!    per second, kernel reserve failures, and the tree compared with `/proc` afterwards.
//! 3. **Reap latency.** Leaked `claude` doubles under an enforcing daemon whose rule names this
//!    run's agent as the only possible parent: idle deadline → process gone, p50/p99/max, beside
//!    the computed bound of a `ps` poller.
//! 4. **Footprint.** Daemon RSS and CPU with 10,000 live processes tracked, and CPU on a quiet
//!    host with 20 watched idle targets.
//! 5. **Start-up.** `reaper run` exec → first `reaper stats` answer, with the host as it is and
//!    with 10,000 extra processes.
//!
//! Benchmarks are not tests: no number fails the verb; a benchmark that cannot run does. Every
//! daemon runs with `--dry-run` and the built-in rule, except the reap-latency one, whose rule can
//! only match children of this run's uniquely named agent. Every process started here is ended
//! here, by its pid. Results: one table on stdout, `bench/results/latest.md` and `latest.json`.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::Ctx;
use crate::cmd::{describe, output, status};

/// Knobs, mainly to make a quick trial run; the defaults are what the README reports.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Opts {
    /// Interleaved rounds of the spawn-storm comparison.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Processes per spawn storm (fork + exec `/bin/true` + wait), one worker.
    #[arg(long, default_value_t = 2000)]
    storm: usize,
    /// Threads per thread storm (create + join).
    #[arg(long, default_value_t = 20_000)]
    threads: usize,
    /// Parallel storms in the throughput benchmark.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Processes per storm in the throughput benchmark.
    #[arg(long, default_value_t = 5000)]
    parallel_storm: usize,
    /// Leaked `claude` doubles in the reap-latency benchmark.
    #[arg(long, default_value_t = 50)]
    leaked: usize,
    /// Processes parked for the footprint and start-up benchmarks.
    #[arg(long, default_value_t = 10_000)]
    park: usize,
    /// Idle targets watched on the quiet host.
    #[arg(long, default_value_t = 20)]
    idle_targets: usize,
    /// Seconds over which the daemon's CPU is measured (footprint), per measurement.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Start-ups measured per configuration.
    #[arg(long, default_value_t = 3)]
    startups: usize,
    /// Run only these benchmarks (repeatable); the table is printed but bench/results/ is
    /// left as it is, since it holds the last complete run.
    #[arg(long, value_enum)]
    only: Vec<Bench>,
}

/// The benchmarks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Bench {
    Storm,
    Throughput,
    Reap,
    Footprint,
    Quiet,
}

/// Every wait for something to happen has a deadline; these are generous (shared machines).
const READY_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

pub(crate) fn run(ctx: &Ctx, opts: &Opts) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_bpftrace()?;
    ensure_tracefs()?;
    build(ctx)?;
    let scratch = Scratch::new()?;
    let bins = Bins::new(ctx, &scratch)?;
    let machine = Machine::read(ctx);
    println!(
        "xtask: bench on {} ({} CPUs, {}), kernel {}; load average {}",
        machine.cpu, machine.nproc, machine.memory, machine.kernel, machine.loadavg
    );

    let mut report = Report::default();
    let phase = |name: &str| println!("xtask: bench: {name}…");

    let runs = |b: Bench| opts.only.is_empty() || opts.only.contains(&b);
    if runs(Bench::Storm) {
        phase("1/5 spawn-storm overhead (interleaved: none, reaper, bpftrace)");
        storm_overhead(&bins, &scratch, opts, &mut report).context("spawn-storm benchmark")?;
    }
    if runs(Bench::Throughput) {
        phase("2/5 throughput and loss");
        throughput(&bins, &scratch, opts, &mut report).context("throughput benchmark")?;
    }
    if runs(Bench::Reap) {
        phase("3/5 reap latency");
        reap_latency(&bins, &scratch, opts, &mut report).context("reap-latency benchmark")?;
    }
    if runs(Bench::Footprint) {
        phase("4–5/5 start-up and footprint with parked processes");
        startup_and_footprint(&bins, &scratch, opts, &mut report)
            .context("start-up/footprint benchmark")?;
    }
    if runs(Bench::Quiet) {
        phase("4/5 quiet host with idle targets");
        quiet_host(&bins, &scratch, opts, &mut report).context("quiet-host benchmark")?;
    }

    let elapsed = started.elapsed();
    let md = report.markdown(&machine, elapsed);
    if !opts.only.is_empty() {
        println!("\n{md}");
        println!(
            "xtask: bench ({:?}) done in {:.0} s; bench/results/ left as it is (a partial run)",
            opts.only,
            elapsed.as_secs_f64()
        );
        return Ok(());
    }
    let json = report.json(&machine, elapsed, opts);
    let dir = ctx.workspace.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [("latest.md", &md), ("latest.json", &json)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("\n{md}");
    println!(
        "xtask: bench done in {:.0} s; wrote bench/results/latest.md and latest.json",
        elapsed.as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Set-up

/// Installs bpftrace (Debian package `bpftrace`) if it is not on PATH.
fn ensure_bpftrace() -> anyhow::Result<()> {
    if which("bpftrace").is_some() {
        return Ok(());
    }
    println!("xtask: bpftrace not found; installing it with apt-get (Debian package `bpftrace`)");
    if which("apt-get").is_none() {
        bail!("bpftrace is not installed and there is no apt-get: install bpftrace and run again");
    }
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends", "bpftrace"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(&mut cmd).map(|st| st.success())
    };
    if !install()? {
        println!("xtask: apt-get install failed; running apt-get update and trying again");
        let mut update = Command::new("apt-get");
        update.arg("update");
        let st = status(&mut update)?;
        if !st.success() {
            bail!("`apt-get update` failed ({st}); install bpftrace by hand and run again");
        }
        if !install()? {
            bail!("`apt-get install bpftrace` failed; install it by hand and run again");
        }
    }
    if which("bpftrace").is_none() {
        bail!("apt-get installed bpftrace but it is not on PATH");
    }
    Ok(())
}

/// bpftrace attaches classic tracepoints through tracefs; mounts it if it is missing.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    println!(
        "xtask: tracefs is not mounted; mounting it on /sys/kernel/tracing (bpftrace needs it)"
    );
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]);
    output(&mut cmd)?;
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        bail!("mounted tracefs on /sys/kernel/tracing but it has no events/ directory");
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn build(ctx: &Ctx) -> anyhow::Result<()> {
    let mut cmd = ctx.cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "reaper-user",
        "-p",
        "reaper-tests",
        "--bins",
    ]);
    println!("xtask: {}", describe(&cmd));
    let st = status(&mut cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(&cmd));
    }
    Ok(())
}

/// The release binaries the benchmarks run.
struct Bins {
    reaper: PathBuf,
    helper: PathBuf,
    load: PathBuf,
    agent: PathBuf,
    script: PathBuf,
}

impl Bins {
    /// Copies the release binaries (and the bpftrace script) into the scratch directory, so the
    /// whole run uses this build even if the shared target directory is rebuilt meanwhile.
    fn new(ctx: &Ctx, scratch: &Scratch) -> anyhow::Result<Self> {
        let from = ctx.target_dir.join("release");
        let to = scratch.path("bin");
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        let copy = |name: &str, src: &Path| -> anyhow::Result<PathBuf> {
            if !src.is_file() {
                bail!("{} is missing after the build", src.display());
            }
            let dst = to.join(name);
            std::fs::copy(src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            Ok(dst)
        };
        // fake-agent runs the `claude` double from its own directory.
        copy("claude", &from.join("claude"))?;
        Ok(Self {
            reaper: copy("reaper", &from.join("reaper"))?,
            helper: copy("lifecycle-helper", &from.join("lifecycle-helper"))?,
            load: copy("bench-load", &from.join("bench-load"))?,
            agent: copy("fake-agent", &from.join("fake-agent"))?,
            script: copy("execsnoop.bt", &ctx.workspace.join("bench/execsnoop.bt"))?,
        })
    }
}

/// A private directory for sockets, logs, configs and symlinks; removed at the end.
struct Scratch {
    dir: PathBuf,
    tag: String,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let tag = std::process::id().to_string();
        let dir = std::env::temp_dir().join(format!("reaper-bench-{tag}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("runtime"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir, tag })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A root-owned (we are root) mode-0600 file.
    fn write_private(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// `name` → `target`, so a program exec'd through it gets `name` as its comm.
    fn symlink(&self, name: &str, target: &Path) -> anyhow::Result<PathBuf> {
        let link = self.path(name);
        if !link.exists() {
            std::os::unix::fs::symlink(target, &link)
                .with_context(|| format!("linking {} → {}", link.display(), target.display()))?;
        }
        Ok(link)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes under our control

/// Sends `signal` to one process we started.
fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` until `within`; then SIGKILLs it. True if it ended by itself.
fn wait_or_kill(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU time (user + system, all threads, live and dead) of a process, in seconds.
/// A process's CPU time, read two ways: each thread's `sum_exec_runtime` (ns, the first field
/// of `/proc/PID/task/TID/schedstat`) and utime+stime (clock ticks, 10 ms: ±20 % on the
/// 0.05 s a daemon spends over a 20,000-process storm).
#[derive(Debug, Clone)]
struct CpuSample {
    threads: Option<std::collections::HashMap<u32, u64>>,
    ticks_secs: f64,
}

impl CpuSample {
    fn read(pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            threads: thread_runtimes(pid),
            ticks_secs: cpu_seconds(pid)?,
        })
    }

    /// Seconds of CPU since `before`: from the threads' ns counters when every thread seen
    /// then is still there (a thread that ended took its counter along), else from ticks.
    fn since(&self, before: &Self) -> f64 {
        match (&before.threads, &self.threads) {
            (Some(old), Some(new)) if old.keys().all(|tid| new.contains_key(tid)) => {
                let ns: u64 = new
                    .iter()
                    .map(|(tid, now)| now.saturating_sub(old.get(tid).copied().unwrap_or(0)))
                    .sum();
                ns as f64 / 1e9
            }
            _ => self.ticks_secs - before.ticks_secs,
        }
    }
}

/// Every thread's run time in ns, or None where the kernel has no schedstat files.
fn thread_runtimes(pid: u32) -> Option<std::collections::HashMap<u32, u64>> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let entry = entry.ok()?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read: it is simply not counted.
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        out.insert(tid, text.split_whitespace().next()?.parse().ok()?);
    }
    (!out.is_empty()).then_some(out)
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// The fields of `/proc/PID/stat` after `comm`: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(") ")?;
    let fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    (fields.len() > 19).then_some(fields)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A `/proc/PID/status` value in kB (VmRSS, VmHWM).
fn status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Every live (not zombie) process in `/proc`, as (pid, start time in ticks).
fn proc_identities() -> BTreeSet<(u32, u64)> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f[0] != "Z"
            && f[0] != "X"
            && let Ok(start) = f[19].parse()
        {
            out.insert((pid, start));
        }
    }
    out
}

/// Processes other than `ours` holding BPF programs on the lifecycle tracepoints (another
/// reaper, a test harness, a bpftrace): they would tax the storms too. Program names come from
/// `/proc/kallsyms` (`bpf_prog_<tag>_<name>`), holders from `/proc/PID/fdinfo` (`prog_tag`).
fn foreign_tracers(ours: &[u32]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let Ok(kallsyms) = std::fs::read_to_string("/proc/kallsyms") else {
        return found;
    };
    let tags: BTreeSet<&str> = kallsyms
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.strip_prefix("bpf_prog_"))
        .filter(|name| {
            reaper_common::LIFECYCLE_TRACEPOINTS
                .iter()
                .any(|tp| name.contains(tp))
        })
        .filter_map(|name| name.get(..16))
        .collect();
    if tags.is_empty() {
        return found;
    }
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || ours.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let tag = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_tag:"))
                .map(str::trim);
            if tag.is_some_and(|t| tags.contains(t)) {
                found.insert(pid);
                break;
            }
        }
    }
    found
}

/// A port nobody listens on now, for a daemon's metrics endpoint.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// `kernel.bpf_stats_enabled` set to 1 (the kernel then times every BPF program run, a few
/// tens of ns each); put back as it was when dropped.
struct BpfStats {
    was: Option<String>,
}

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        let was = std::fs::read_to_string(Self::PATH)
            .with_context(|| format!("reading {}", Self::PATH))?;
        if was.trim() == "1" {
            return Ok(Self { was: None });
        }
        std::fs::write(Self::PATH, "1").with_context(|| format!("writing 1 to {}", Self::PATH))?;
        Ok(Self { was: Some(was) })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(was) = self.was.take() {
            let _ = std::fs::write(Self::PATH, was.trim());
        }
    }
}

/// A `reaper run` we started; stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    reaper: PathBuf,
    helper: PathBuf,
    spawned: Instant,
    /// Spawn → first answer of `reaper stats`.
    ready_after: Option<Duration>,
}

impl Daemon {
    /// Starts `reaper --log-format json run --socket … --metrics-addr … ARGS` and waits until
    /// it answers `reaper stats`.
    fn start(bins: &Bins, scratch: &Scratch, name: &str, args: &[&str]) -> anyhow::Result<Self> {
        let socket = scratch.path(&format!("{name}.sock"));
        let log = scratch.path(&format!("{name}.log"));
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(&bins.reaper);
        cmd.args(["--log-format", "json", "run", "--socket"])
            .arg(&socket)
            .args(["--metrics-addr", &metrics])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let mut daemon = Self {
            pid: child.id(),
            child: Some(child),
            socket,
            log,
            reaper: bins.reaper.clone(),
            helper: bins.helper.clone(),
            spawned,
            ready_after: None,
        };
        daemon
            .wait_ready()
            .with_context(|| format!("`{}` did not become ready", describe(&cmd)))?;
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = self.spawned + READY_DEADLINE;
        loop {
            if self.try_stats().is_some() {
                self.ready_after = Some(self.spawned.elapsed());
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                bail!("the daemon exited ({st}):\n{}", tail(&self.log, 20));
            }
            if Instant::now() > deadline {
                bail!(
                    "no answer on {} within {READY_DEADLINE:?}:\n{}",
                    self.socket.display(),
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn try_stats(&self) -> Option<Json> {
        let out = Command::new(&self.reaper)
            .args(["stats", "--json"])
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Json::parse(&String::from_utf8_lossy(&out.stdout)).ok()
    }

    fn stats(&self) -> anyhow::Result<Json> {
        self.try_stats()
            .with_context(|| format!("`reaper stats --socket {}` failed", self.socket.display()))
    }

    fn stat_u64(&self, key: &str) -> anyhow::Result<u64> {
        self.stats()?
            .get(key)
            .and_then(Json::as_f64)
            .map(|v| v as u64)
            .with_context(|| format!("no {key} in `reaper stats`"))
    }

    /// `(pid, start_ticks)` of every process in the daemon's tree, less the `reaper tree`
    /// client that asked (alive while the daemon answered, gone by the next `/proc` read).
    fn tree(&self) -> anyhow::Result<BTreeSet<(u32, u64)>> {
        let mut cmd = Command::new(&self.reaper);
        cmd.args(["tree", "--json", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run `{}`", describe(&cmd)))?;
        let client = child.id();
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let tree =
            Json::parse(&String::from_utf8_lossy(&out.stdout)).context("`reaper tree --json`")?;
        let list = tree
            .as_arr()
            .context("`reaper tree --json` is not a list")?;
        let ids: BTreeSet<(u32, u64)> = list
            .iter()
            .map(|p| {
                let id = p.get("id")?;
                Some((
                    id.get("pid")?.as_f64()? as u32,
                    id.get("start_ticks")?.as_f64()? as u64,
                ))
            })
            .collect::<Option<_>>()
            .context("a process without id.pid/id.start_ticks in `reaper tree --json`")?;
        Ok(ids.into_iter().filter(|&(pid, _)| pid != client).collect())
    }

    /// Runs and run time (ns) summed over the daemon's BPF programs, from `/proc/PID/fdinfo`
    /// (counted while `kernel.bpf_stats_enabled` is 1).
    fn prog_stats(&self) -> anyhow::Result<(u64, u64)> {
        let dir = format!("/proc/{}/fdinfo", self.pid);
        let mut total = (0, 0);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            if !text.contains("prog_type:") {
                continue;
            }
            let field = |key: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            total.0 += field("run_cnt:");
            total.1 += field("run_time_ns:");
        }
        Ok(total)
    }

    /// RSS of the ring-buffer mapping(s) and of the heap, in kB, from `/proc/PID/smaps`; and
    /// the process's PSS (each page shared by n mappings counts 1/n).
    fn memory_breakdown(&self) -> anyhow::Result<(u64, u64, u64)> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid))
            .with_context(|| format!("reading /proc/{}/smaps", self.pid))?;
        let (mut ring, mut heap, mut pss) = (0, 0, 0);
        let mut current = String::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                current = line.split_whitespace().nth(5).unwrap_or("").to_owned();
                continue;
            }
            let kb: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match first {
                "Rss:" if current == "anon_inode:bpf-map" => ring += kb,
                "Rss:" if current == "[heap]" => heap += kb,
                "Pss:" => pss += kb,
                _ => {}
            }
        }
        Ok((ring, heap, pss))
    }

    /// Returns once the daemon has applied every event the kernel emitted before this call:
    /// it starts a marker process and waits until the daemon's tree holds it, exec'd (one ring
    /// buffer, applied in order). Then returns `events_total`.
    fn barrier(&self) -> anyhow::Result<u64> {
        let mut cmd = Command::new(&self.helper);
        cmd.arg("wait");
        let mut marker = Helper::spawn(cmd, "lifecycle-helper wait")?;
        let pid = marker.read_value("pid", READY_DEADLINE)?;
        let comm: String = self
            .helper
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let out = Command::new(&self.reaper)
                .args(["explain", &pid, "--json", "--socket"])
                .arg(&self.socket)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()?;
            let seen = out.status.success()
                && Json::parse(&String::from_utf8_lossy(&out.stdout))
                    .ok()
                    .and_then(|v| Some(v.get("process")?.get("comm")?.as_str()? == comm))
                    .unwrap_or(false);
            if seen {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not apply the exec of marker {pid} within {READY_DEADLINE:?}"
                );
            }
            std::thread::sleep(POLL);
        }
        marker.finish(Duration::from_secs(10));
        self.stat_u64("events_total")
    }

    /// The `elapsed_ms` of the daemon's "process tree ready" log line.
    fn logged_ready_ms(&self) -> Option<f64> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines().find_map(|line| {
            let v = Json::parse(line).ok()?;
            let fields = v.get("fields")?;
            (fields.get("message")?.as_str()? == "process tree ready")
                .then(|| fields.get("elapsed_ms")?.as_f64())
                .flatten()
        })
    }

    fn cpu(&self) -> anyhow::Result<CpuSample> {
        CpuSample::read(self.pid)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        send_signal(self.pid, "TERM");
        if !wait_or_kill(&mut child, Duration::from_secs(15)) {
            bail!(
                "the daemon did not stop within 15 s of SIGTERM (killed):\n{}",
                tail(&self.log, 10)
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `bpftrace bench/execsnoop.bt`, its output drained (to nothing) once it is attached.
struct Bpftrace {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    drain: Option<JoinHandle<()>>,
    /// A symlink to `/bin/true` with a unique name, exec'd to see where bpftrace's output is.
    marker: PathBuf,
    seen: mpsc::Receiver<()>,
}

impl Bpftrace {
    /// Starts the script and waits until it prints the exec of a marker program (so every
    /// probe is attached: BEGIN may run before the others are).
    fn start(bins: &Bins, scratch: &Scratch) -> anyhow::Result<Self> {
        let log = scratch.path("bpftrace.log");
        let marker_name = format!("bt-ready-{}", scratch.tag);
        let marker = scratch.symlink(&marker_name, Path::new("/bin/true"))?;
        let mut cmd = Command::new("bpftrace");
        cmd.arg(&bins.script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("bpftrace's stdout")?;
        let (seen_tx, seen) = mpsc::channel();
        // Reads (and drops) everything bpftrace prints, reporting each marker exec.
        let drain = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.contains(&marker_name) => {
                        let _ = seen_tx.send(());
                    }
                    Ok(_) => {}
                }
            }
        });
        let mut tracer = Self {
            child: Some(child),
            pid,
            log,
            drain: Some(drain),
            marker,
            seen,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let _ = Command::new(&tracer.marker).status();
            match tracer.seen.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return Ok(tracer),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    tracer.stop();
                    bail!(
                        "bpftrace ended before attaching:\n{}",
                        tail(&tracer.log, 20)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    tracer.stop();
                    bail!(
                        "bpftrace did not trace an exec within {READY_DEADLINE:?}:\n{}",
                        tail(&tracer.log, 20)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn cpu(&self) -> anyhow::Result<CpuSample> {
        CpuSample::read(self.pid)
    }

    /// Returns once bpftrace has printed everything traced before this call: execs the marker
    /// and waits for its line (per-CPU perf buffers are read in turn, so this is close, not
    /// exact).
    fn barrier(&self) -> anyhow::Result<()> {
        while self.seen.try_recv().is_ok() {}
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let _ = Command::new(&self.marker).status();
            match self.seen.recv_timeout(Duration::from_secs(1)) {
                Ok(()) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("bpftrace ended:\n{}", tail(&self.log, 20))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("bpftrace printed no marker within {READY_DEADLINE:?}")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(self.pid, "INT");
            wait_or_kill(&mut child, Duration::from_secs(15));
        }
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A helper that prints `key=value` lines and ends when its stdin closes.
struct Helper {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Helper {
    fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("helper stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child: Some(child),
            stdin,
            lines,
            what: what.to_owned(),
        })
    }

    /// Every value printed for `key` until `until` is printed (deadline: `within`).
    fn read_until(&mut self, until: &str, within: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut values = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|e| anyhow::anyhow!("{} printed no `{until}=` line ({e})", self.what))?;
            if let Some((k, v)) = line.split_once('=') {
                if k == until {
                    return Ok(values);
                }
                values.push(format!("{k}={v}"));
            }
        }
    }

    /// The value of the first `key=` line (deadline: `within`).
    fn read_value(&mut self, key: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|e| anyhow::anyhow!("{} printed no `{key}=` line ({e})", self.what))?;
            if let Some(v) = line.strip_prefix(key).and_then(|l| l.strip_prefix('=')) {
                return Ok(v.trim().to_owned());
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Closes stdin and waits for the helper to end (then SIGKILL).
    fn finish(&mut self, within: Duration) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            wait_or_kill(&mut child, within);
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(30));
    }
}

/// `bench-load rusage CMD…`: wall and CPU seconds of a command and what it waited for.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    wall: f64,
    cpu: f64,
    /// The tracer's own CPU seconds meanwhile (spawn-storm benchmark).
    tracer_cpu: f64,
}

fn measure(bins: &Bins, args: &[&str]) -> anyhow::Result<Usage> {
    let mut cmd = Command::new(&bins.load);
    cmd.arg("rusage").args(args);
    let text = output(&mut cmd)?;
    let get = |key: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|us| us / 1e6)
            .with_context(|| format!("no {key}= from `{}`", describe(&cmd)))
    };
    Ok(Usage {
        wall: get("wall_us")?,
        cpu: get("user_us")? + get("sys_us")?,
        tracer_cpu: 0.0,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Spawn-storm overhead

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tracer {
    None,
    Reaper,
    Bpftrace,
}

impl Tracer {
    const ALL: [Self; 3] = [Self::None, Self::Reaper, Self::Bpftrace];

    fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Reaper => "reaper",
            Self::Bpftrace => "bpftrace",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Round {
    procs: Usage,
    threads: Usage,
    /// Events reaper applied during each storm (the rest of the host's included).
    events: [u64; 2],
}

fn storm_overhead(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let helper = bins.helper.to_string_lossy().into_owned();
    let load = bins.load.to_string_lossy().into_owned();
    let storm_n = opts.storm.to_string();
    let threads_n = opts.threads.to_string();
    // One untimed run of each first: page cache, binaries, allocator arenas.
    measure(bins, &[&helper, "storm", &storm_n, "1"])?;
    measure(bins, &[&load, "threads", &threads_n])?;
    // Other developers' tests attach the same probes now and then; a round during which any
    // process but ours held a lifecycle tracer does not count, and another round is run (up
    // to twice as many in all).
    let mut rounds: Vec<[Round; 3]> = Vec::new();
    let mut discarded: Vec<BTreeSet<u32>> = Vec::new();
    let max_rounds = opts.rounds * 2;
    for r in 0.. {
        if rounds.len() >= opts.rounds || r >= max_rounds {
            break;
        }
        let mut this: [Round; 3] = Default::default();
        let mut foreign = BTreeSet::new();
        for (i, tracer) in Tracer::ALL.into_iter().enumerate() {
            let mut daemon = None;
            let mut bpf = None;
            match tracer {
                Tracer::None => {}
                Tracer::Reaper => {
                    daemon = Some(Daemon::start(bins, scratch, "storm", &["--dry-run"])?);
                }
                Tracer::Bpftrace => bpf = Some(Bpftrace::start(bins, scratch)?),
            }
            let tracer_cpu = || -> anyhow::Result<Option<CpuSample>> {
                match (&daemon, &bpf) {
                    (Some(d), _) => d.cpu().map(Some),
                    (_, Some(b)) => b.cpu().map(Some),
                    _ => Ok(None),
                }
            };
            // The tracer's CPU is read once it has caught up with everything traced so far, so
            // a backlog left when the storm ends is counted too; returns reaper's event count.
            let caught_up = || -> anyhow::Result<u64> {
                match (&daemon, &bpf) {
                    (Some(d), _) => d.barrier(),
                    (_, Some(b)) => b.barrier().map(|()| 0),
                    _ => Ok(0),
                }
            };
            let ours: Vec<u32> = daemon
                .as_ref()
                .map(|d| d.pid)
                .into_iter()
                .chain(bpf.as_ref().map(|b| b.pid))
                .collect();
            let mut traced = |args: &[&str]| -> anyhow::Result<(Usage, u64)> {
                let events_before = caught_up()?;
                foreign.extend(foreign_tracers(&ours));
                let before = tracer_cpu()?;
                let mut usage = measure(bins, args)?;
                foreign.extend(foreign_tracers(&ours));
                let events = caught_up()? - events_before;
                usage.tracer_cpu = match (tracer_cpu()?, before) {
                    (Some(after), Some(before)) => after.since(&before),
                    _ => 0.0,
                };
                Ok((usage, events))
            };
            let (procs, procs_events) = traced(&[&helper, "storm", &storm_n, "1"])?;
            let (threads, threads_events) = traced(&[&load, "threads", &threads_n])?;
            let daemon_ran = daemon.is_some();
            if let Some(mut d) = daemon {
                d.stop()?;
            }
            if let Some(mut b) = bpf {
                b.stop();
            }
            println!(
                "xtask: bench: round {} {:<9}: {} processes {:.3} s wall {:.3} s CPU; \
                 {} threads {:.3} s wall {:.3} s CPU; tracer CPU {:.2} s + {:.2} s{}",
                r + 1,
                tracer.name(),
                opts.storm,
                procs.wall,
                procs.cpu,
                opts.threads,
                threads.wall,
                threads.cpu,
                procs.tracer_cpu,
                threads.tracer_cpu,
                if daemon_ran {
                    format!("; reaper events {procs_events} + {threads_events}")
                } else {
                    String::new()
                }
            );
            this[i] = Round {
                procs,
                threads,
                events: [procs_events, threads_events],
            };
        }
        if foreign.is_empty() {
            rounds.push(this);
        } else {
            println!(
                "xtask: bench: round {} discarded: processes {foreign:?} (not ours) had \
                 lifecycle tracepoint programs attached meanwhile",
                r + 1
            );
            discarded.push(foreign);
        }
    }
    if rounds.len() < opts.rounds.min(3) {
        bail!(
            "only {} of {} spawn-storm rounds ran without another lifecycle tracer on the \
             machine (processes {discarded:?}); run again when it is quieter",
            rounds.len(),
            opts.rounds
        );
    }
    let discarded_note = if discarded.is_empty() {
        String::new()
    } else {
        format!(
            "; {} round(s) discarded: another process had lifecycle tracepoint programs attached",
            discarded.len()
        )
    };

    let bench = "1 spawn storm";
    let mut raw = Vec::new();
    for (wi, (workload, label, pick)) in [
        (
            "procs",
            format!("{} × fork+exec+wait `/bin/true`", opts.storm),
            (|r: &Round| r.procs) as fn(&Round) -> Usage,
        ),
        (
            "threads",
            format!("{} × pthread create+join", opts.threads),
            |r: &Round| r.threads,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let base_wall: Vec<f64> = rounds.iter().map(|r| pick(&r[0]).wall).collect();
        let base_cpu: Vec<f64> = rounds.iter().map(|r| pick(&r[0]).cpu).collect();
        if workload == "procs" {
            report.spawn_cpu = Some(median(&base_cpu) / opts.storm as f64);
        }
        report.row(Row {
            bench,
            metric: format!("{label}, no tracer"),
            result: format!(
                "wall {} s, CPU {} s",
                spread(&base_wall, 1.0, 3),
                spread(&base_cpu, 1.0, 3)
            ),
            target: String::new(),
            met: None,
            notes: format!(
                "median (min–max) of {} rounds{discarded_note}; {:.0} µs per {}",
                rounds.len(),
                median(&base_wall) * 1e6
                    / if workload == "procs" {
                        opts.storm
                    } else {
                        opts.threads
                    } as f64,
                if workload == "procs" {
                    "process"
                } else {
                    "thread"
                }
            ),
        });
        let mut medians = [0.0; 3];
        for (i, tracer) in Tracer::ALL.into_iter().enumerate().skip(1) {
            let wall: Vec<f64> = rounds
                .iter()
                .map(|r| pick(&r[i]).wall / pick(&r[0]).wall)
                .collect();
            let cpu: Vec<f64> = rounds
                .iter()
                .map(|r| pick(&r[i]).cpu / pick(&r[0]).cpu)
                .collect();
            // The workload's CPU plus the tracer's own, against the workload's alone.
            let total: Vec<f64> = rounds
                .iter()
                .map(|r| (pick(&r[i]).cpu + pick(&r[i]).tracer_cpu) / pick(&r[0]).cpu)
                .collect();
            // Judged on total CPU: on a shared 2-core machine the wall time of a few-second run
            // swings by tens of percent between rounds; CPU time is charged exactly.
            medians[i] = median(&total);
            let tracer_cpu: Vec<f64> = rounds.iter().map(|r| pick(&r[i]).tracer_cpu).collect();
            let (target, met) = match (tracer, workload) {
                (Tracer::Reaper, "procs") => (
                    "≤ +1 % (CPU with the tracer's)".to_owned(),
                    Some(medians[i] <= 1.01),
                ),
                (Tracer::Bpftrace, _) => (
                    "above reaper (CPU with the tracer's)".to_owned(),
                    Some(medians[Tracer::Reaper as usize] < medians[i]),
                ),
                _ => (String::new(), None),
            };
            report.row(Row {
                bench,
                metric: format!("{label}, {}", tracer.name()),
                result: format!(
                    "wall {}; CPU {}; CPU with the tracer's own {}",
                    overhead_spread(&wall),
                    overhead_spread(&cpu),
                    overhead_spread(&total)
                ),
                target,
                met,
                notes: format!(
                    "median (min … max) of per-round ratios to no tracer; the tracer's own CPU \
                     per run: {} s{}",
                    spread(&tracer_cpu, 1.0, 2),
                    if tracer == Tracer::Reaper {
                        let events: Vec<f64> =
                            rounds.iter().map(|r| r[i].events[wi] as f64).collect();
                        format!(
                            "; events it applied per run: {} ({}the rest of the host's count too)",
                            spread(&events, 1.0, 0),
                            if workload == "threads" {
                                "threads are filtered in the kernel; "
                            } else {
                                ""
                            }
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
        let mut per_round = Vec::new();
        for r in &rounds {
            let mut obj = Vec::new();
            for (i, tracer) in Tracer::ALL.into_iter().enumerate() {
                obj.push((
                    tracer.name().to_owned(),
                    Json::obj([
                        ("wall_s", Json::Num(pick(&r[i]).wall)),
                        ("cpu_s", Json::Num(pick(&r[i]).cpu)),
                        ("tracer_cpu_s", Json::Num(pick(&r[i]).tracer_cpu)),
                        ("reaper_events", Json::Num(r[i].events[wi] as f64)),
                    ]),
                ));
            }
            per_round.push(Json::Obj(obj));
        }
        raw.push((workload.to_owned(), Json::Arr(per_round)));
    }
    report.raw.push(("spawn_storm".to_owned(), Json::Obj(raw)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Throughput and loss

fn throughput(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(bins, scratch, "throughput", &["--dry-run"])?;
    // The kernel's own accounting of BPF program run time, for this benchmark only.
    let bpf_stats = BpfStats::enable()?;
    let prog_before = daemon.prog_stats()?;
    let before = daemon.stats()?;
    let events_before = json_u64(&before, "events_total")?;
    let lost_before = json_u64(&before, "lost_total")?;
    let cpu_before = daemon.cpu()?;
    let n = opts.parallel_storm.to_string();
    let started = Instant::now();
    let storms: Vec<Child> = (0..opts.parallel)
        .map(|_| {
            Command::new(&bins.helper)
                .args(["storm", &n, "1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a storm")
        })
        .collect::<anyhow::Result<_>>()?;
    for mut storm in storms {
        let st = storm.wait()?;
        if !st.success() {
            bail!("`lifecycle-helper storm {n} 1` failed ({st})");
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let events_after = daemon.barrier()?;
    let prog_after = daemon.prog_stats()?;
    drop(bpf_stats);
    let prog_runs = prog_after.0 - prog_before.0;
    let prog_ns = prog_after.1 - prog_before.1;
    let cpu = daemon.cpu()?.since(&cpu_before);
    let after = daemon.stats()?;
    let lost = json_u64(&after, "lost_total")? - lost_before;
    let events = events_after - events_before;
    let spawned = opts.parallel * opts.parallel_storm;
    report.cpu_per_event = (events > 0).then(|| cpu / events as f64);

    // The tree against /proc, read around it; processes may start or end in between, so a
    // difference is read again a few times before it counts.
    let mut mismatch = usize::MAX;
    let mut attempts = 0;
    let mut detail = String::new();
    while attempts < 10 && mismatch > 0 {
        attempts += 1;
        let proc_before = proc_identities();
        let tree = daemon.tree()?;
        let proc_after = proc_identities();
        // Only processes alive in both reads, or in neither, have one right answer.
        let stable_live: BTreeSet<_> = proc_before.intersection(&proc_after).copied().collect();
        let missing: Vec<_> = stable_live.difference(&tree).copied().collect();
        let extra: Vec<_> = tree
            .iter()
            .filter(|id| !proc_before.contains(id) && !proc_after.contains(id))
            .copied()
            .collect();
        if missing.len() + extra.len() < mismatch {
            mismatch = missing.len() + extra.len();
            detail = format!(
                "{} processes; only in /proc {:?}, only in tree {:?}",
                tree.len(),
                &missing[..missing.len().min(5)],
                &extra[..extra.len().min(5)]
            );
        }
        if mismatch > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    daemon.stop()?;

    let bench = "2 throughput";
    report.row(Row {
        bench,
        metric: format!(
            "events handled, {} × `storm {}` in parallel",
            opts.parallel, opts.parallel_storm
        ),
        result: format!("{:.0} events/s", events as f64 / wall),
        target: String::new(),
        met: None,
        notes: format!(
            "{events} events ({spawned} processes) in {wall:.2} s, bounded by how fast the storms \
             spawn; daemon CPU {:.2} s = {:.1} µs/event, i.e. one core would handle ≈ {:.0} \
             events/s",
            cpu,
            cpu * 1e6 / events.max(1) as f64,
            events as f64 / cpu.max(1e-9)
        ),
    });
    let kernel_us = prog_ns as f64 / 1e3 / spawned as f64;
    let daemon_us = cpu * 1e6 / spawned as f64;
    let share = report
        .spawn_cpu
        .map(|per| (kernel_us + daemon_us) / (per * 1e6) * 100.0);
    report.row(Row {
        bench,
        metric: "reaper's CPU per spawned process, accounted".to_owned(),
        result: format!(
            "{:.1} µs in the kernel + {:.1} µs in the daemon{}",
            kernel_us,
            daemon_us,
            share.map_or(String::new(), |p| format!(
                " = {p:.1} % of a spawn's own CPU"
            ))
        ),
        target: "≤ 1 %".to_owned(),
        met: share.map(|p| p <= 1.0),
        notes: format!(
            "kernel: run_time_ns of the daemon's BPF programs ({prog_runs} runs, {:.0} ns each; \
             kernel.bpf_stats_enabled on for this benchmark only); daemon: its threads' run time \
             (schedstat, ns); a \
             spawn's own CPU: {} µs (benchmark 1, no tracer). Unlike the A/B ratios in 1, this does not \
             drown in the machine's noise",
            prog_ns as f64 / prog_runs.max(1) as f64,
            report
                .spawn_cpu
                .map_or("n/a".to_owned(), |c| format!("{:.0}", c * 1e6))
        ),
    });
    report.row(Row {
        bench,
        metric: "ring-buffer reserve failures (default ring)".to_owned(),
        result: lost.to_string(),
        target: "0".to_owned(),
        met: Some(lost == 0),
        notes: "`lost_total` delta".to_owned(),
    });
    report.row(Row {
        bench,
        metric: "tree vs /proc after the storm".to_owned(),
        result: format!("{mismatch} mismatched"),
        target: "0".to_owned(),
        met: Some(mismatch == 0),
        notes: format!("(pid, start time) sets; {attempts} read(s); {detail}"),
    });
    report.raw.push((
        "throughput".to_owned(),
        Json::obj([
            ("processes", Json::Num(spawned as f64)),
            ("wall_s", Json::Num(wall)),
            ("events", Json::Num(events as f64)),
            ("events_per_s", Json::Num(events as f64 / wall)),
            ("bpf_prog_runs", Json::Num(prog_runs as f64)),
            ("bpf_prog_run_time_ns", Json::Num(prog_ns as f64)),
            ("lost", Json::Num(lost as f64)),
            ("daemon_cpu_s", Json::Num(cpu)),
            ("tree_mismatch", Json::Num(mismatch as f64)),
            ("tree_reads", Json::Num(attempts as f64)),
        ]),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Reap latency

/// `fake-agent ARGS` exec'd through a symlink named `name` (its comm), in a session of its own
/// (so its children never have a controlling terminal, even when the bench runs in one).
fn start_agent(
    bins: &Bins,
    scratch: &Scratch,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(Helper, Vec<u32>)> {
    let link = scratch.symlink(name, &bins.agent)?;
    let mut cmd = Command::new("setsid");
    cmd.arg(&link)
        .args(args)
        .env("XDG_RUNTIME_DIR", scratch.path("runtime"));
    let mut agent = Helper::spawn(cmd, "fake-agent")?;
    let lines = agent.read_until("ready", Duration::from_secs(120))?;
    let claudes = lines
        .iter()
        .filter_map(|l| l.strip_prefix("claude=")?.parse().ok())
        .collect();
    Ok((agent, claudes))
}

fn reap_latency(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let agent_comm = format!("fb-{}", scratch.tag);
    let config = scratch.write_private(
        "reap.toml",
        &format!(
            "# cargo xtask bench: enforce, but only on children of this run's agent\n\
             mode = \"enforce\"\n\
             idle_timeout = \"2s\"\n\
             orphan_grace = \"60s\"\n\
             grace = \"2s\"\n\
             max_kills_per_minute = 1000\n\
             \n\
             [[rule]]\n\
             name = \"bench-claude\"\n\
             comm = [\"claude\", \"claude.exe\"]\n\
             argv_any = [\"--input-format=stream-json\", \"--output-format=stream-json\"]\n\
             require_no_tty = true\n\
             parent_comm = [\"{agent_comm}\"]\n"
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let mut daemon = Daemon::start(bins, scratch, "reap", &["--config", &config])?;
    let count = opts.leaked.to_string();
    let (mut agent, claudes) =
        start_agent(bins, scratch, &agent_comm, &["--leak", "--count", &count])?;
    if claudes.len() != opts.leaked {
        bail!(
            "fake-agent reported {} claude children, not {}",
            claudes.len(),
            opts.leaked
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let delays = loop {
        let stats = daemon.stats()?;
        let delays: Vec<f64> = stats
            .get("reaps")
            .and_then(|r| r.get("kill_delays"))
            .and_then(Json::as_arr)
            .map(|a| a.iter().filter_map(Json::as_f64).collect())
            .unwrap_or_default();
        if delays.len() >= opts.leaked {
            break delays;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} leaked doubles were reaped within 120 s:\n{}",
                delays.len(),
                opts.leaked,
                tail(&daemon.log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    agent.finish(Duration::from_secs(30));
    daemon.stop()?;

    let mut sorted = delays.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = percentile(&sorted, 50.0);
    let p99 = percentile(&sorted, 99.0);
    let max = sorted[sorted.len() - 1];
    let bench = "3 reap latency";
    report.row(Row {
        bench,
        metric: format!("reaper, {} leaked doubles, idle_timeout 2 s", opts.leaked),
        result: format!("p50 {}, p99 {}, max {}", secs(p50), secs(p99), secs(max)),
        target: "p99 ≤ 1 s".to_owned(),
        met: Some(p99 <= 1.0),
        notes: "measured: idle deadline → process gone (`reaps.kill_delays`); each ended by its first ladder step, its input closed".to_owned(),
    });
    for (label, period) in [("60 s", 60.0), ("5 min", 300.0)] {
        report.row(Row {
            bench,
            metric: format!("a `ps` poller every {label}"),
            result: format!(
                "p50 {}, p99 {}, max {}",
                secs(period / 2.0),
                secs(0.99 * period),
                secs(period)
            ),
            target: String::new(),
            met: None,
            notes: "computed, not measured: delay uniform in [0, period]".to_owned(),
        });
    }
    report.raw.push((
        "reap_latency".to_owned(),
        Json::obj([
            (
                "kill_delays_s",
                Json::Arr(delays.into_iter().map(Json::Num).collect()),
            ),
            ("p50_s", Json::Num(p50)),
            ("p99_s", Json::Num(p99)),
            ("max_s", Json::Num(max)),
        ]),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4–5. Start-up and footprint

struct Startup {
    ready: Vec<f64>,
    logged: Vec<f64>,
    processes: u64,
}

/// `count` start-ups (each stopped before the next); the last daemon is returned running.
fn startups(
    bins: &Bins,
    scratch: &Scratch,
    count: usize,
    name: &str,
) -> anyhow::Result<(Startup, Daemon)> {
    let mut out = Startup {
        ready: Vec::new(),
        logged: Vec::new(),
        processes: 0,
    };
    let mut last = None;
    for i in 0..count.max(1) {
        if let Some(mut d) = last.take() {
            Daemon::stop(&mut d)?;
        }
        let d = Daemon::start(bins, scratch, &format!("{name}-{i}"), &["--dry-run"])?;
        out.ready
            .push(d.ready_after.unwrap_or_default().as_secs_f64());
        if let Some(ms) = d.logged_ready_ms() {
            out.logged.push(ms / 1e3);
        }
        out.processes = d.stat_u64("processes")?;
        last = Some(d);
    }
    Ok((out, last.expect("at least one start-up")))
}

fn startup_and_footprint(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (host, mut d) = startups(bins, scratch, opts.startups, "startup-host")?;
    d.stop()?;

    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let live = proc_identities().len();
    if live + opts.park + 1000 > pid_max {
        bail!(
            "cannot park {} processes: {live} exist and pid_max is {pid_max} \
             (raise /proc/sys/kernel/pid_max)",
            opts.park
        );
    }
    let mut cmd = Command::new(&bins.load);
    cmd.args(["park", &opts.park.to_string()]);
    let mut park = Helper::spawn(cmd, "bench-load park")?;
    park.read_until("ready", Duration::from_secs(120))?;
    println!(
        "xtask: bench: parked {} processes (pid {})",
        opts.park,
        park.pid()
    );

    let (parked, mut d) = startups(bins, scratch, opts.startups, "startup-parked")?;
    // Footprint with the parked processes tracked: RSS now, CPU over the window (which holds
    // one periodic /proc reconcile at the default 60 s interval), RSS and peak after.
    let tracked = d.stat_u64("processes")?;
    if tracked < opts.park as u64 {
        bail!(
            "the daemon tracks {tracked} processes, fewer than the {} parked",
            opts.park
        );
    }
    let rss_start = status_kb(d.pid, "VmRSS")?;
    println!(
        "xtask: bench: measuring the daemon with {tracked} processes tracked for {} s",
        opts.window_secs
    );
    let w = CpuWindow::measure(&d, opts.window_secs)?;
    let rss_end = status_kb(d.pid, "VmRSS")?;
    let hwm = status_kb(d.pid, "VmHWM")?;
    let (ring_kb, heap_kb, pss_kb) = d.memory_breakdown()?;
    d.stop()?;
    park.finish(Duration::from_secs(60));

    let bench5 = "5 start-up";
    for (label, s) in [
        ("host as it is", &host),
        ("with the parked processes", &parked),
    ] {
        report.row(Row {
            bench: bench5,
            metric: format!("exec → first `reaper stats` answer, {label}"),
            result: format!("{} s", spread(&s.ready, 1.0, 2)),
            target: String::new(),
            met: None,
            notes: format!(
                "{} processes in the tree; the daemon's own \"process tree ready\" elapsed_ms: {} s",
                s.processes,
                spread(&s.logged, 1.0, 2)
            ),
        });
    }
    let bench4 = "4 footprint";
    // MB as in the target (10^6 bytes); /proc reports kB (KiB).
    let mb = |kb: u64| kb as f64 * 1024.0 / 1e6;
    report.row(Row {
        bench: bench4,
        metric: format!("daemon RSS, {tracked} processes tracked"),
        result: format!("{:.1} MB (peak {:.1} MB)", mb(rss_end), mb(hwm)),
        target: "≤ 32 MB".to_owned(),
        met: Some(mb(rss_end.max(rss_start)) <= 32.0),
        notes: format!(
            "VmRSS at the end of the {} s window ({:.1} MB at its start), peak = VmHWM; of it: \
             BPF map mappings {:.1} MB (the ring buffer's data pages are mapped twice), heap \
             {:.1} MB; PSS {:.1} MB",
            opts.window_secs,
            mb(rss_start),
            mb(ring_kb),
            mb(heap_kb),
            mb(pss_kb)
        ),
    });
    report.row(Row {
        bench: bench4,
        metric: format!("daemon CPU, {tracked} processes tracked"),
        result: format!("{:.3} % of a core", w.percent()),
        target: String::new(),
        met: None,
        notes: format!(
            "CPU {:.2} s over {:.1} s, which held {} periodic /proc reconcile(s) of the \
             whole tree; {} events from the rest of the host meanwhile",
            w.cpu, w.secs, w.reconciles, w.events
        ),
    });
    report.raw.push((
        "startup".to_owned(),
        Json::obj([
            ("host_ready_s", Json::nums(&host.ready)),
            ("host_logged_s", Json::nums(&host.logged)),
            ("host_processes", Json::Num(host.processes as f64)),
            ("parked_ready_s", Json::nums(&parked.ready)),
            ("parked_logged_s", Json::nums(&parked.logged)),
            ("parked_processes", Json::Num(parked.processes as f64)),
        ]),
    ));
    report.raw.push((
        "footprint_parked".to_owned(),
        Json::obj([
            ("tracked", Json::Num(tracked as f64)),
            ("rss_kb_start", Json::Num(rss_start as f64)),
            ("rss_kb_end", Json::Num(rss_end as f64)),
            ("hwm_kb", Json::Num(hwm as f64)),
            ("bpf_map_rss_kb", Json::Num(ring_kb as f64)),
            ("heap_rss_kb", Json::Num(heap_kb as f64)),
            ("pss_kb", Json::Num(pss_kb as f64)),
            ("window", w.json()),
        ]),
    ));
    Ok(())
}

/// The daemon's CPU over a window. A window of at least the default reconcile interval (60 s)
/// is stretched until one periodic `/proc` reconcile has completed in it, so it holds one.
struct CpuWindow {
    secs: f64,
    cpu: f64,
    events: u64,
    reconciles: u64,
}

impl CpuWindow {
    const RECONCILE_INTERVAL: u64 = 60;

    fn measure(d: &Daemon, secs: u64) -> anyhow::Result<Self> {
        let events = d.stat_u64("events_total")?;
        let reconciles = d.stat_u64("reconciles")?;
        let cpu = d.cpu()?;
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        if secs >= Self::RECONCILE_INTERVAL {
            let deadline = Instant::now() + Duration::from_secs(Self::RECONCILE_INTERVAL);
            while d.stat_u64("reconciles")? == reconciles && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(Self {
            cpu: d.cpu()?.since(&cpu),
            secs: started.elapsed().as_secs_f64(),
            events: d.stat_u64("events_total")? - events,
            reconciles: d.stat_u64("reconciles")? - reconciles,
        })
    }

    fn percent(&self) -> f64 {
        self.cpu * 100.0 / self.secs
    }

    fn json(&self) -> Json {
        Json::obj([
            ("seconds", Json::Num(self.secs)),
            ("cpu_s", Json::Num(self.cpu)),
            ("events", Json::Num(self.events as f64)),
            ("reconciles", Json::Num(self.reconciles as f64)),
        ])
    }
}

fn quiet_host(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Dry run with the built-in rule; the idle timeout is longer than the window, so the
    // targets stay watched and are never even due.
    let mut d = Daemon::start(
        bins,
        scratch,
        "quiet",
        &["--dry-run", "--idle-timeout", "1h"],
    )?;
    let count = opts.idle_targets.to_string();
    let (mut agent, claudes) = start_agent(
        bins,
        scratch,
        &format!("fq-{}", scratch.tag),
        &["--leak", "--count", &count],
    )?;
    let deadline = Instant::now() + READY_DEADLINE;
    let targets = loop {
        let targets = d.stat_u64("targets")?;
        if targets >= claudes.len() as u64 {
            break targets;
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon watches {targets} targets, not the {} idle doubles",
                claudes.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "xtask: bench: measuring the daemon on a quiet host ({targets} idle targets) for {} s",
        opts.window_secs
    );
    let w = CpuWindow::measure(&d, opts.window_secs)?;
    let rss = status_kb(d.pid, "VmRSS")?;
    agent.finish(Duration::from_secs(30));
    d.stop()?;
    let pct = w.percent();
    // What the rest of the host's events cost at the storm's per-event CPU (batched events are
    // cheaper each than sporadic ones, so this understates them and overstates the rest).
    let net = report.cpu_per_event.map(|per| {
        let left = (w.cpu - w.events as f64 * per).max(0.0);
        left * 100.0 / w.secs
    });
    report.row(Row {
        bench: "4 footprint",
        metric: format!("daemon CPU, quiet host, {targets} idle targets watched"),
        result: match net {
            Some(net) => format!("{pct:.3} % of a core (≈ {net:.3} % net of the host's events)"),
            None => format!("{pct:.3} % of a core"),
        },
        target: "≤ 0.1 %".to_owned(),
        met: Some(pct <= 0.1),
        notes: format!(
            "CPU {:.2} s over {:.1} s ({} reconcile(s)); {} events from other work on \
             the host meanwhile, which the net figure takes at the throughput benchmark's CPU \
             per event; RSS {:.1} MB",
            w.cpu,
            w.secs,
            w.reconciles,
            w.events,
            rss as f64 * 1024.0 / 1e6
        ),
    });
    report.raw.push((
        "footprint_quiet".to_owned(),
        Json::obj([
            ("targets", Json::Num(targets as f64)),
            ("window", w.json()),
            ("percent_of_core", Json::Num(pct)),
            ("percent_net_estimate", net.map_or(Json::Null, Json::Num)),
            ("rss_kb", Json::Num(rss as f64)),
        ]),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        n => s[n / 2],
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// "median (min–max)" of `v × scale`.
fn spread(v: &[f64], scale: f64, decimals: usize) -> String {
    if v.is_empty() {
        return "n/a".to_owned();
    }
    let (lo, hi) = min_max(v);
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        median(v) * scale,
        lo * scale,
        hi * scale,
        d = decimals
    )
}

/// Ratios as overheads: "+0.4 % (−1.2 … +2.0)".
fn overhead_spread(ratios: &[f64]) -> String {
    let (lo, hi) = min_max(ratios);
    let pct = |r: f64| {
        let v = (r - 1.0) * 100.0;
        if v < 0.0 {
            format!("−{:.1} %", -v)
        } else {
            format!("+{v:.1} %")
        }
    };
    format!("{} ({} … {})", pct(median(ratios)), pct(lo), pct(hi))
}

fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

fn json_u64(v: &Json, key: &str) -> anyhow::Result<u64> {
    v.get(key)
        .and_then(Json::as_f64)
        .map(|x| x as u64)
        .with_context(|| format!("no {key} in `reaper stats`"))
}

// ---------------------------------------------------------------------------------------------
// The report

struct Machine {
    date: String,
    commit: String,
    cpu: String,
    nproc: usize,
    memory: String,
    kernel: String,
    os: String,
    loadavg: String,
    pid_max: String,
}

impl Machine {
    fn read(ctx: &Ctx) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cmd = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .current_dir(&ctx.workspace)
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let mem_kb: u64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let mut commit = cmd("git", &["rev-parse", "--short", "HEAD"]);
        if !cmd("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            commit.push_str(" (with local changes)");
        }
        Self {
            date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit,
            cpu,
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            memory: format!("{:.1} GiB RAM", mem_kb as f64 / 1024.0 / 1024.0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            pid_max: read("/proc/sys/kernel/pid_max").trim().to_owned(),
        }
    }

    fn json(&self) -> Json {
        Json::obj([
            ("date", Json::Str(self.date.clone())),
            ("commit", Json::Str(self.commit.clone())),
            ("cpu_model", Json::Str(self.cpu.clone())),
            ("nproc", Json::Num(self.nproc as f64)),
            ("memory", Json::Str(self.memory.clone())),
            ("kernel", Json::Str(self.kernel.clone())),
            ("os", Json::Str(self.os.clone())),
            ("loadavg_at_start", Json::Str(self.loadavg.clone())),
            ("pid_max", Json::Str(self.pid_max.clone())),
        ])
    }
}

struct Row {
    bench: &'static str,
    metric: String,
    result: String,
    target: String,
    /// Whether the target was met (None: no target).
    met: Option<bool>,
    notes: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    raw: Vec<(String, Json)>,
    /// The daemon's CPU seconds per event in the throughput benchmark.
    cpu_per_event: Option<f64>,
    /// CPU seconds of one fork+exec+wait of `/bin/true` with no tracer (median, benchmark 1).
    spawn_cpu: Option<f64>,
}

impl Report {
    fn row(&mut self, row: Row) {
        self.rows.push(row);
    }

    fn sorted_rows(&self) -> Vec<&Row> {
        // Benchmarks ran in another order than they are numbered; the table follows the numbers.
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.bench);
        rows
    }

    fn markdown(&self, m: &Machine, elapsed: Duration) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "`cargo xtask bench`, {} (commit {}), {:.1} min end to end, on {}: {} × {}, {}, \
             kernel {}, {}; load average {} at the start (shared machine: other builds ran \
             meanwhile).\n",
            m.date,
            m.commit,
            elapsed.as_secs_f64() / 60.0,
            if m.os.is_empty() {
                "Linux"
            } else {
                m.os.as_str()
            },
            m.nproc,
            m.cpu,
            m.memory,
            m.kernel,
            format_args!("pid_max {}", m.pid_max),
            m.loadavg
        );
        let _ = writeln!(
            s,
            "| benchmark | measured | result | target | met | notes |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let mut last = "";
        for r in self.sorted_rows() {
            let bench = if r.bench == last { "" } else { r.bench };
            last = r.bench;
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                bench,
                cell(&r.metric),
                cell(&r.result),
                cell(&r.target),
                met,
                cell(&r.notes)
            );
        }
        let _ = writeln!(
            s,
            "\nSpawn storms run under `bench-load rusage` (wall time; CPU = the storm and every \
             process it waited for, from `getrusage(RUSAGE_CHILDREN)`); the tracer's own CPU is \
             its threads' run time from `/proc/PID/task/*/schedstat` (ns; utime+stime, 10 ms ticks, where a thread ended meanwhile). No tracer, reaper and bpftrace (`bench/execsnoop.bt`) \
             alternate round by round and each overhead is the median of per-round ratios. \
             Every daemon runs `--dry-run` with the built-in rule, except the reap-latency one, \
             whose rule only matches children of this run's agent. Other developers' builds, \
             tests (and their own reaper daemons) share the machine, so wall times are noisy: \
             compare within a round, not across runs."
        );
        s
    }

    fn json(&self, m: &Machine, elapsed: Duration, opts: &Opts) -> String {
        let rows = self
            .sorted_rows()
            .into_iter()
            .map(|r| {
                Json::obj([
                    ("benchmark", Json::Str(r.bench.to_owned())),
                    ("measured", Json::Str(r.metric.clone())),
                    ("result", Json::Str(r.result.clone())),
                    ("target", Json::Str(r.target.clone())),
                    ("met", r.met.map_or(Json::Null, Json::Bool)),
                    ("notes", Json::Str(r.notes.clone())),
                ])
            })
            .collect();
        let doc = Json::obj([
            ("machine", m.json()),
            ("duration_s", Json::Num(elapsed.as_secs_f64().round())),
            (
                "parameters",
                Json::obj([
                    ("rounds", Json::Num(opts.rounds as f64)),
                    ("storm", Json::Num(opts.storm as f64)),
                    ("threads", Json::Num(opts.threads as f64)),
                    ("parallel", Json::Num(opts.parallel as f64)),
                    ("parallel_storm", Json::Num(opts.parallel_storm as f64)),
                    ("leaked", Json::Num(opts.leaked as f64)),
                    ("park", Json::Num(opts.park as f64)),
                    ("idle_targets", Json::Num(opts.idle_targets as f64)),
                    ("window_secs", Json::Num(opts.window_secs as f64)),
                    ("startups", Json::Num(opts.startups as f64)),
                ]),
            ),
            ("rows", Json::Arr(rows)),
            ("raw", Json::Obj(self.raw.clone())),
        ]);
        let mut out = String::new();
        doc.write(&mut out, 0);
        out.push('\n');
        out
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

// ---------------------------------------------------------------------------------------------
// JSON: just enough to read `reaper stats`/`tree`/logs and write the results (xtask has no
// serde).

#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn obj<const N: usize>(pairs: [(&str, Json); N]) -> Self {
        Self::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn nums(v: &[f64]) -> Self {
        Self::Arr(v.iter().copied().map(Self::Num).collect())
    }

    fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Self::Obj(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_arr(&self) -> Option<&[Self]> {
        match self {
            Self::Arr(a) => Some(a),
            _ => None,
        }
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut p = Parser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            bail!("trailing characters at byte {}", p.i);
        }
        Ok(v)
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            Self::Null => out.push_str("null"),
            Self::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Self::Num(n) if !n.is_finite() => out.push_str("null"),
            Self::Num(n) if n.fract() == 0.0 && n.abs() < 1e15 => {
                let _ = write!(out, "{}", *n as i64);
            }
            Self::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Self::Str(s) => write_str(out, s),
            Self::Arr(a) if a.iter().all(|v| matches!(v, Self::Num(_))) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out, indent);
                }
                out.push(']');
            }
            Self::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    out.push_str(if i > 0 { ",\n" } else { "\n" });
                    pad(out, indent + 2);
                    v.write(out, indent + 2);
                }
                if !a.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push(']');
            }
            Self::Obj(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(if i > 0 { ",\n" } else { "\n" });
                    pad(out, indent + 2);
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 2);
                }
                if !pairs.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> anyhow::Result<()> {
        self.ws();
        if self.b.get(self.i) != Some(&c) {
            bail!("expected {:?} at byte {}", c as char, self.i);
        }
        self.i += 1;
        Ok(())
    }

    fn value(&mut self) -> anyhow::Result<Json> {
        self.ws();
        let Some(&c) = self.b.get(self.i) else {
            bail!("unexpected end of JSON")
        };
        match c {
            b'{' => {
                self.i += 1;
                let mut pairs = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(pairs));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    pairs.push((key, self.value()?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(pairs));
                        }
                        _ => bail!("expected , or }} at byte {}", self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => bail!("expected , or ] at byte {}", self.i),
                    }
                }
            }
            b'"' => Ok(Json::Str(self.string()?)),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.b[start..self.i])?;
                text.parse()
                    .map(Json::Num)
                    .with_context(|| format!("bad number {text:?} at byte {start}"))
            }
        }
    }

    fn word(&mut self, word: &str, v: Json) -> anyhow::Result<Json> {
        if !self.b[self.i..].starts_with(word.as_bytes()) {
            bail!("bad literal at byte {}", self.i);
        }
        self.i += word.len();
        Ok(v)
    }

    fn hex4(&mut self) -> anyhow::Result<u32> {
        let digits = self.b.get(self.i..self.i + 4).context("short \\u escape")?;
        self.i += 4;
        Ok(u32::from_str_radix(std::str::from_utf8(digits)?, 16)?)
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                bail!("unterminated string")
            };
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8(out)?),
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        bail!("unterminated escape")
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => bail!("bad escape \\{}", other as char),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let text = r#"{"a": [1, 2.5, -3e2], "b": {"c": "x\"y\u00e9\ud83d\ude00"}, "d": null, "e": true, "f": []}"#;
        let v = Json::parse(text).unwrap();
        assert_eq!(
            v.get("a").unwrap().as_arr().unwrap()[2].as_f64(),
            Some(-300.0)
        );
        assert_eq!(
            v.get("b").unwrap().get("c").unwrap().as_str(),
            Some("x\"yé😀")
        );
        let mut out = String::new();
        v.write(&mut out, 0);
        assert_eq!(Json::parse(&out).unwrap(), v);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 25.0);
        assert_eq!(percentile(&v, 99.0), 50.0);
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 2.5);
        assert_eq!(
            overhead_spread(&[1.004, 0.99, 1.02]),
            "+0.4 % (−1.0 % … +2.0 %)"
        );
    }
}
