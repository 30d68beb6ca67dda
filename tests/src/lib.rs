//! Shared harness for reaper's integration tests: start the real pipeline (real eBPF, real
//! kernel), drive real processes through `lifecycle-helper`, and compare with `/proc`.
//!
//! Tests wait for conditions with deadlines, never for fixed times, and only ever signal
//! processes they started.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use reaper::{
    app::{Pipeline, PipelineConfig, PipelineHandle},
    events::Event,
    tree::{Corrections, Process},
};
use tokio::sync::broadcast;

mod daemon;
pub mod scenarios;
pub use daemon::{CliOutput, Daemon, Running, reaper_cli, reaper_ok};

/// Generous: CI machines are shared and slow.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often a wait re-checks its condition.
pub const POLL: Duration = Duration::from_millis(20);

/// A running pipeline plus a tap on its events.
pub struct Harness {
    pub pipeline: Pipeline,
    pub handle: PipelineHandle,
    pub events: broadcast::Receiver<Event>,
}

impl Harness {
    /// The pipeline with the built-in rules in dry-run mode: lifecycle tests watch, never
    /// signal.
    pub async fn start() -> Self {
        Self::start_with_rules("").await
    }

    /// [`Harness::start`] with `rules` (TOML `[[rule]]` tables) after the built-in one.
    pub async fn start_with_rules(rules: &str) -> Self {
        let text = format!("{}\n{rules}", reaper::config::DEFAULT_TOML);
        let mut config =
            reaper::config::parse(&text, "test", &reaper::config::Overrides::default())
                .expect("test rules");
        config.mode = reaper::config::Mode::DryRun;
        // Tests call reconcile explicitly; keep the timer out of their way.
        config.reconcile_interval = Duration::from_secs(3600);
        Self::start_with(PipelineConfig::new(config)).await
    }

    /// [`Harness::start`] where the helper's execs carry their argv: the kernel sends an
    /// exec's argv only for a process named as a rule's `comm` (or a watched one), so this
    /// adds [`argv_rule`] for the helper.
    pub async fn start_reading_helper_argv() -> Self {
        Self::start_with_rules(&argv_rule(HELPER)).await
    }

    pub async fn start_with(config: PipelineConfig) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the integration tests load eBPF programs: run them as root (cargo xtask test)"
        );
        // The daemon's log lines, shown with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .try_init();
        let pipeline = Pipeline::start(config).await.expect("start the pipeline");
        let handle = pipeline.handle();
        let events = handle.subscribe();
        Self {
            pipeline,
            handle,
            events,
        }
    }

    /// Polls `check` against the live process at `pid` until it returns `Some`.
    pub async fn wait_process<T>(
        &self,
        pid: u32,
        what: &str,
        check: impl FnMut(Option<&Process>) -> Option<T>,
    ) -> T {
        self.try_wait_process(pid, what, check)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Self::wait_process`], failing with an error after [`DEADLINE`].
    pub async fn try_wait_process<T>(
        &self,
        pid: u32,
        what: &str,
        mut check: impl FnMut(Option<&Process>) -> Option<T>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        loop {
            let p = self.handle.process(pid).await;
            if let Some(found) = check(p.as_ref()) {
                return Ok(found);
            }
            if started.elapsed() > DEADLINE {
                bail!("timed out after {DEADLINE:?} waiting for {what}; last seen: {p:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for an event matching `check` on the tap.
    pub async fn wait_event<T>(&mut self, what: &str, check: impl FnMut(&Event) -> Option<T>) -> T {
        self.try_wait_event(what, check)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Self::wait_event`], failing with an error after [`DEADLINE`] or when the tap lagged.
    pub async fn try_wait_event<T>(
        &mut self,
        what: &str,
        check: impl FnMut(&Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        self.try_wait_event_within(DEADLINE, what, check).await
    }

    /// [`Self::try_wait_event`] with a deadline of its own, for a condition that takes longer
    /// than [`DEADLINE`] by its nature (say why where it is used).
    pub async fn try_wait_event_within<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut check: impl FnMut(&Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(event)) => {
                    if let Some(found) = check(&event) {
                        return Ok(found);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    bail!("the test's event tap lagged by {n} events while waiting for {what}")
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => bail!("pipeline stopped"),
                Err(_) => bail!("timed out after {within:?} waiting for {what}"),
            }
        }
    }

    /// Every event the kernel emitted before this call is applied to the tree, and nothing
    /// else happens: no `/proc` scan, so a lost event stays visible. (A tree query waits for
    /// a flush of the ring buffer before it is answered: `Query::needs_flush` in app.rs.)
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.handle.snapshot().await.context("pipeline stopped")?;
        Ok(())
    }

    /// A reconcile with `/proc` now (it flushes the ring buffer first); what it corrected.
    /// Comparing the tree with `/proc` after this proves nothing unless the corrections are
    /// checked too: use [`Self::flush`] for that.
    pub async fn reconcile(&self) -> anyhow::Result<Corrections> {
        self.handle.reconcile().await.context("pipeline stopped")
    }

    /// A fresh tap on the events, from now on (a shared harness's old tap may lag).
    pub fn resubscribe(&mut self) {
        self.events = self.handle.subscribe();
    }
}

/// A scratch `XDG_RUNTIME_DIR` for the processes tests start (the `claude` double puts its
/// `cc-socks/<pid>.sock` there, as the real CLI does), so nothing is left in the real one.
pub fn runtime_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("reaper-tests-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch runtime dir");
    dir
}

/// Where this package's programs (`lifecycle-helper`, `claude`, `fake-agent`, …) are, unless
/// [`set_programs_dir`] said otherwise: cargo puts them in the profile directory, one level above
/// the test executables (`deps/`), and next to `vm-runner`.
static PROGRAMS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Where the programs are when they are not next to the running executable (the VM's `/bin`).
/// Only the first call counts.
pub fn set_programs_dir(dir: std::path::PathBuf) {
    let _ = PROGRAMS.set(dir);
}

/// The directory of this package's programs.
pub fn programs_dir() -> &'static std::path::Path {
    PROGRAMS.get_or_init(|| {
        let exe = std::env::current_exe().expect("own path");
        let dir = exe
            .ancestors()
            .skip(1)
            .take(2)
            .find(|dir| dir.join("lifecycle-helper").exists());
        dir.unwrap_or_else(|| {
            panic!(
                "no lifecycle-helper beside {}: run through cargo test",
                exe.display()
            )
        })
        .to_path_buf()
    })
}

/// One of this package's programs.
pub fn program(name: &str) -> std::path::PathBuf {
    programs_dir().join(name)
}

/// The lifecycle helper binary.
pub fn helper_path() -> std::path::PathBuf {
    program("lifecycle-helper")
}

/// A running `lifecycle-helper`: its stdin keeps it (and its waiting children) alive.
pub struct Helper {
    pub child: Child,
    stdin: Option<ChildStdin>,
    /// Lines from the helper's stdout, read by a thread so every read has a deadline.
    lines: std::sync::mpsc::Receiver<String>,
    pub values: HashMap<String, Vec<String>>,
}

impl Helper {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_program(&helper_path(), args)
    }

    /// Another of this package's programs (`fake-agent`, `claude`), same conventions.
    pub fn spawn_program(program: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .env("XDG_RUNTIME_DIR", runtime_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lifecycle-helper");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            values: HashMap::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until `key` was printed; returns its (last) value.
    pub fn read(&mut self, key: &str) -> String {
        self.try_read(key).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Self::read`], failing with an error after [`DEADLINE`].
    pub fn try_read(&mut self, key: &str) -> anyhow::Result<String> {
        loop {
            if let Some(v) = self.values.get(key).and_then(|v| v.last()) {
                return Ok(v.clone());
            }
            let line = match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => line,
                Err(err) => bail!("no {key} from the helper ({err}); got {:?}", self.values),
            };
            let (k, v) = line.split_once('=').context("a key=value line")?;
            self.values
                .entry(k.to_owned())
                .or_default()
                .push(v.to_owned());
        }
    }

    pub fn read_pid(&mut self, key: &str) -> u32 {
        self.try_read_pid(key).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_read_pid(&mut self, key: &str) -> anyhow::Result<u32> {
        let value = self.try_read(key)?;
        value
            .parse()
            .with_context(|| format!("{key}={value} is not a pid"))
    }

    /// Every value printed for `key` once the helper has closed its stdout.
    pub fn all(&mut self, key: &str) -> Vec<String> {
        self.try_all(key).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Self::all`], failing with an error if the output does not end within [`DEADLINE`].
    pub fn try_all(&mut self, key: &str) -> anyhow::Result<Vec<String>> {
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => {
                    let (k, v) = line.split_once('=').context("a key=value line")?;
                    self.values
                        .entry(k.to_owned())
                        .or_default()
                        .push(v.to_owned());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(err) => bail!("helper output never ended ({err}); got {:?}", self.values),
            }
        }
        Ok(self.values.get(key).cloned().unwrap_or_default())
    }

    /// Writes `line` and a newline to the helper's stdin.
    pub fn send(&mut self, line: &str) {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the helper's stdin");
    }

    /// Closes stdin: the helper and every child that inherited it finish.
    pub fn finish(&mut self) {
        self.stdin.take();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stdin.take();
        // Our own child: make sure it does not outlive the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/proc/PID/stat` read directly (an oracle independent of the daemon's procfs parsing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub start_ticks: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split(' ').collect();
    Some(ProcStat {
        pid,
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        // Field 22 overall; the 20th after "pid (comm) ".
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

pub fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn proc_cmdline(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// `/proc/PID/task/TID/status` of every thread of `pid`: (tid, its text). Capabilities and
/// no_new_privs are per thread, so a check of the process must read each one.
pub fn thread_statuses(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the read.
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            out.push((tid, status));
        }
    }
    out.sort_by_key(|(tid, _)| *tid);
    out
}

/// A hexadecimal mask field of a `/proc/PID/status` text (`CapEff`, `CapPrm`, …).
pub fn status_mask(status: &str, field: &str) -> Option<u64> {
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    u64::from_str_radix(value.trim(), 16).ok()
}

/// A text field of a `/proc/PID/status` text (`Name`, `NoNewPrivs`, …).
pub fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// Every live (non-zombie) process's (pid, start ticks), straight from `/proc`.
pub fn proc_identities() -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(pid)
            && stat.state != 'Z'
            && stat.state != 'X'
        {
            out.push((pid, stat.start_ticks));
        }
    }
    out
}

/// The test helper's file name (its comm is the first 15 bytes: `lifecycle-helpe`).
pub const HELPER: &str = "lifecycle-helper";

/// A rule naming `comm` that no argv matches: processes exec'd under that name are candidates
/// by name, so the kernel sends their argv (it sends argv only for those and for watched
/// processes), and none becomes a target.
pub fn argv_rule(comm: &str) -> String {
    format!(
        "[[rule]]\nname = \"argv-{comm}\"\ncomm = [\"{comm}\"]\n\
         argv_any = [\"--never-a-target\"]\n"
    )
}

/// The tree's view of `pid` agrees with `/proc` on identity, parent, uid, comm and argv (where
/// the tree knows it: the kernel sends argv only for candidates and watched processes).
pub fn assert_matches_proc(p: &Process) {
    matches_proc(p).unwrap_or_else(|e| panic!("{e:#}"));
}

/// [`assert_matches_proc`] as an error.
pub fn matches_proc(p: &Process) -> anyhow::Result<()> {
    let pid = p.id.pid;
    let stat = proc_stat(pid).with_context(|| format!("{pid} is not in /proc"))?;
    let differ = |what: &str, tree: &dyn std::fmt::Debug, proc: &dyn std::fmt::Debug| {
        anyhow::anyhow!("{what} of {pid}: the tree says {tree:?}, /proc {proc:?}")
    };
    if p.id.start_ticks != stat.start_ticks {
        return Err(differ("start time", &p.id.start_ticks, &stat.start_ticks));
    }
    if p.ppid != stat.ppid {
        return Err(differ("parent", &p.ppid, &stat.ppid));
    }
    if p.comm != stat.comm {
        return Err(differ("comm", &p.comm, &stat.comm));
    }
    let uid = proc_uid(pid);
    if Some(p.uid) != uid {
        return Err(differ("uid", &p.uid, &uid));
    }
    let cmdline = proc_cmdline(pid);
    if !p.argv_truncated && !p.argv.is_unknown() && Some(p.argv.raw().to_vec()) != cmdline {
        return Err(differ(
            "argv",
            &p.argv,
            &cmdline.map(|c| String::from_utf8_lossy(&c).into_owned()),
        ));
    }
    Ok(())
}

/// The `reaper` binary the command-line tests run: `target/<profile>/reaper`, next to
/// `lifecycle-helper`. Cargo does not build another package's binaries for these tests;
/// `cargo xtask test` builds it first (or run `cargo build -p reaper-user` yourself).
pub fn reaper_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("reaper");
    assert!(
        path.exists(),
        "{} is missing: run the tests through `cargo xtask test`, which builds it first \
         (or `cargo build -p reaper-user` with the tests' profile)",
        path.display()
    );
    path
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

// --- Debian packages the tests need ------------------------------------------------------

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt as _;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}

/// Installs Debian `package` unless it is installed already: `apt-get update` (once per test
/// process) and `apt-get install`. Serialized within this process by a mutex and across test
/// processes by a lock file, so two test binaries never race on dpkg.
pub fn ensure_package(package: &str) {
    static APT: std::sync::Mutex<bool> = std::sync::Mutex::new(false); // whether `apt-get update` ran
    let mut updated = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if dpkg_installed(package) {
        return;
    }
    let lock_path = std::env::temp_dir().join("reaper-tests-apt.lock");
    let lock_file = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", lock_path.display()));
    if dpkg_installed(package) {
        return; // another test process installed it meanwhile
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need the Debian package {package}; install it (apt-get install \
         {package}) or run the tests as root (cargo xtask test), which installs it"
    );
    let apt = |args: &[&str]| {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running apt-get to install {package}: {e} (these tests need a Debian \
                     system with apt, or {package} installed)"
                )
            });
        let tail = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        assert!(
            out.status.success(),
            "`apt-get {}` failed ({}) while installing {package}, which these tests need. \
             Install it by hand (apt-get install {package}) or check access to the Debian \
             archive.\n{}\n{}",
            args.join(" "),
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
    };
    let started = Instant::now();
    if !*updated {
        apt(&["update"]);
        *updated = true;
    }
    apt(&["install", "-y", "--no-install-recommends", package]);
    eprintln!(
        "installed the Debian package {package} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        dpkg_installed(package),
        "{package} is still not installed after apt-get install"
    );
}

/// Makes sure `tool` can be run: already on PATH, or installed from Debian `package`.
pub fn ensure_tool(tool: &str, package: &str) {
    if !on_path(tool) {
        ensure_package(package);
    }
    assert!(
        on_path(tool),
        "{tool} is not on PATH even after installing {package}"
    );
}

/// The YAML documents of a file, as JSON (through Debian's python3-yaml, installed if missing).
pub fn yaml_documents(path: &std::path::Path) -> Vec<serde_json::Value> {
    ensure_tool("python3", "python3");
    let has_yaml = || {
        Command::new("python3")
            .args(["-c", "import yaml"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_yaml() {
        ensure_package("python3-yaml");
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{} is not valid YAML:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python's JSON")
}

// --- test rules that only match processes the test started ---------------------------------

/// The comm of this test run's agents: `fake-agent` exec'd through a symlink named
/// `<prefix>-<test pid>`, so no process the tests did not start has it.
pub fn agent_comm(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

/// `fake-agent`, exec'd through a symlink named [`agent_comm`].
pub fn agent(prefix: &str, args: &[&str]) -> Helper {
    let link = std::env::temp_dir().join(agent_comm(prefix));
    if !link.exists() {
        std::os::unix::fs::symlink(program("fake-agent"), &link).expect("symlink to fake-agent");
    }
    Helper::spawn_program(&link, args)
}

/// The top-level settings the reaping tests start from: short timeouts, so a leaked double is
/// reaped within seconds; a rate limit that never gets in the way; reconciles only when a test
/// asks for one.
pub const REAPING_DEFAULTS: [(&str, &str); 5] = [
    ("idle_timeout", "\"3s\""),
    ("orphan_grace", "\"3s\""),
    ("grace", "\"2s\""),
    ("max_kills_per_minute", "100"),
    ("reconcile_interval", "\"1h\""),
];

/// [`test_config`] with [`REAPING_DEFAULTS`], each replaced by a line of `extra` with its key.
pub fn reaping_config(rule: &str, extra: &str, parents: &[String]) -> String {
    test_config(rule, &REAPING_DEFAULTS, extra, parents)
}

/// Configuration text: `defaults` top-level settings, each replaced by a line of `extra` with
/// the same key, then one SDK-style rule named `rule` that also requires one of `parents` as
/// the parent's comm.
pub fn test_config(
    rule: &str,
    defaults: &[(&str, &str)],
    extra: &str,
    parents: &[String],
) -> String {
    let mut top: Vec<(&str, &str)> = defaults.to_vec();
    for line in extra.lines() {
        if let Some((key, value)) = line.split_once(" = ") {
            top.retain(|(k, _)| *k != key);
            top.push((key, value));
        }
    }
    let top: String = top.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    let parents: Vec<String> = parents.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "{top}\n[[rule]]\nname = \"{rule}\"\ncomm = [\"claude\", \"claude.exe\"]\n\
         argv_any = [\"--input-format=stream-json\", \"--output-format=stream-json\"]\n\
         require_no_tty = true\nparent_comm = [{}]\n",
        parents.join(", ")
    )
}

/// A decision to end `id` alone (no descendants, enforce mode, SIGTERM first), as the detector
/// would hand it to the reaper; `comm` and `uid` are what the reaper re-checks.
pub fn decision(
    id: reaper::events::Identity,
    comm: &str,
    uid: u32,
    rule: &str,
) -> reaper::detect::Decision {
    reaper::detect::Decision {
        target: reaper::detect::Victim {
            id,
            comm: comm.into(),
            uid,
        },
        descendants: vec![],
        other_uid: 0,
        rule: rule.into(),
        reason: reaper::detect::Reason::Idle,
        clean_end: reaper::config::CleanEnd::None,
        eof_grace: Duration::from_secs(1),
        grace: Duration::from_secs(1),
        idle_secs: 600.0,
        deadline_ns: 0,
        ppid: 1,
        parent_comm: String::new(),
        argv: String::new(),
        dry_run: false,
        kind: None,
        note: String::new(),
        attribution: Default::default(),
    }
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// A fresh directory for one test, removed at the end.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("reaper-tests-{}-{test}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self(path)
    }

    pub fn join(&self, name: impl AsRef<std::path::Path>) -> std::path::PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
