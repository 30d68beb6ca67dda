//! End to end against the real Claude Agent SDKs and CLI: the `reaper` daemon binary, small
//! SDK daemons of our own (`tests/e2e/daemon.mjs` under node and bun, `tests/e2e/daemon.py`),
//! the real `claude` / `claude.exe` they spawn, and `mock-api`, a mock of the Messages API on
//! loopback. What is asserted is what the process table shows: which processes live, which
//! end and when, and what the parent daemons say about it.
//!
//! The pinned packages are installed into `.tools/e2e` by `cargo xtask test` (or `cargo xtask
//! setup-e2e`); without them these tests fail, saying so.
//!
//! Every CLI runs with the environment of ../shared/CLAUDE-PROCESS.md ("Running the real SDK
//! and CLI offline"): the mock as its API, the non-essential traffic switched off, and its home,
//! config, temporary and runtime directories in a scratch directory of the test, never the real
//! `$HOME`. Parents run through symlinks named `en-`/`eb-`/`ep-<test pid>` (node, bun, python),
//! so their comm is unique to this run, and the rule requires it as the parent: no process the
//! tests did not start can match. Each parent is its own process group, which its guard ends
//! (also when a test panics); each CLI child is held by a pidfd, which its guard kills.
//!
//! The real CLI takes ≈ 200 MB: run these one at a time (`--test-threads=1`).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    rc::Rc,
    sync::mpsc,
    time::{Duration, Instant},
};

use reaper_tests::{DEADLINE, Daemon, POLL, Running, TempDir, free_port, helper_path, proc_stat};

/// The rule's idle timeout: short, so a leaked child is due within seconds.
const IDLE: Duration = Duration::from_secs(3);
/// How long after its idle deadline a leaked child may take to be gone.
const REAP_SLACK: Duration = Duration::from_secs(1);
/// Starting node or python, importing the SDK and the CLI's first turn: seconds, and slower on
/// a loaded machine.
const START: Duration = Duration::from_secs(90);

// --- the installed packages ------------------------------------------------------------------

/// Paths into `.tools/e2e` (see xtask/src/e2e.rs).
struct Tools {
    sdk: PathBuf,
    claude_code_exe: PathBuf,
    bun: PathBuf,
    venv_python: PathBuf,
    site_packages: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// The installed packages, or a failure saying why they are not there (never a skip).
fn tools() -> Tools {
    if let Ok(err) = std::env::var("REAPER_E2E_ERROR") {
        panic!("{err}");
    }
    let root = std::env::var_os("REAPER_E2E_DIR")
        .map_or_else(|| workspace().join(".tools/e2e"), PathBuf::from);
    assert!(
        root.join("stamp").is_file(),
        "the end-to-end tests need the pinned Claude Agent SDKs and CLI in {}: run `cargo xtask \
         setup-e2e` (`cargo xtask test` installs them first)",
        root.display()
    );
    let nm = root.join("npm/node_modules");
    let site_packages = std::fs::read_dir(root.join("venv/lib"))
        .expect("the e2e venv's lib directory")
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("claude_agent_sdk").is_dir())
        .expect("claude_agent_sdk in the e2e venv");
    Tools {
        sdk: nm.join("@anthropic-ai/claude-agent-sdk"),
        claude_code_exe: nm.join("@anthropic-ai/claude-code/bin/claude.exe"),
        bun: std::fs::canonicalize(nm.join(".bin/bun")).expect("bun in the e2e packages"),
        venv_python: root.join("venv/bin/python"),
        site_packages,
    }
}

fn on_path(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{tool} is not on PATH (the end-to-end tests run it)"))
}

// --- pidfds: follow a process we did not spawn, without ever mistaking a reused pid ----------

/// A pidfd of a process (the CLI child, a grandchild of the test).
struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open(pid, 0) returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { fd, pid })
    }

    /// Waits until the process exits or `deadline`; the instant it was seen gone.
    fn wait_exit(&self, deadline: Instant) -> Option<Instant> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return Some(Instant::now());
            }
            if n == 0 && Instant::now() >= deadline {
                return None;
            }
        }
    }

    fn exited(&self) -> bool {
        self.wait_exit(Instant::now()).is_some()
    }

    fn kill(&self) {
        // SAFETY: pidfd_send_signal on our own pidfd; no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// The CLI child of a parent daemon. Its parent's guard SIGKILLs it if it outlives the
/// parent's process group.
struct Cli {
    pidfd: Rc<PidFd>,
    comm: String,
}

impl Cli {
    fn pid(&self) -> u32 {
        self.pidfd.pid
    }
}

// --- when a CLI became idle, from /proc ------------------------------------------------------

/// The CPU share of one core at or above which a target is busy (reaper's default
/// `cpu_threshold_percent`, which the test rule keeps).
const CPU_BUSY: f64 = 0.02;
/// Over how long a CPU share is measured: reaper samples a rule's targets every idle_timeout / 4.
const CPU_WINDOW: Duration = Duration::from_millis(750);

/// Samples a process's CPU time (utime + stime from /proc) every 50 ms until it exits: the
/// test's own view of when it went quiet, independent of reaper's.
struct CpuTrace {
    samples: std::sync::Arc<std::sync::Mutex<Vec<(Instant, u64)>>>,
}

impl CpuTrace {
    fn start(pid: u32) -> Self {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = std::sync::Arc::clone(&samples);
        let start_ticks = proc_stat(pid).map(|s| s.start_ticks);
        std::thread::spawn(move || {
            while let Some(ticks) = cpu_ticks(pid, start_ticks) {
                out.lock().unwrap().push((Instant::now(), ticks));
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { samples }
    }

    /// When it last used CPU as part of a busy stretch (`CPU_WINDOW` in which it used at least
    /// `CPU_BUSY` of a core), before `until`: the sample at which the last such tick was seen.
    /// Sliding windows flag every stretch reaper's aligned samples could flag (and a few more),
    /// so this is never earlier than the activity reaper saw.
    fn last_busy(&self, until: Instant) -> Option<Instant> {
        let samples = self.samples.lock().unwrap();
        let samples: Vec<(Instant, u64)> = samples
            .iter()
            .copied()
            .filter(|(at, _)| *at < until)
            .collect();
        let per_window =
            ((CPU_BUSY * ticks_per_second() * CPU_WINDOW.as_secs_f64()).ceil() as u64).max(1);
        let mut last = None;
        for (i, &(at, ticks)) in samples.iter().enumerate().skip(1) {
            if ticks == samples[i - 1].1 {
                continue; // no CPU used since the previous sample
            }
            let window_start = samples[..i]
                .iter()
                .find(|(t, _)| at.duration_since(*t) <= CPU_WINDOW);
            if let Some(&(_, before)) = window_start
                && ticks - before >= per_window
            {
                last = Some(at);
            }
        }
        last
    }

    /// Ticks used in each `CPU_WINDOW` since the trace started, for a failure's message.
    fn windows(&self) -> String {
        let samples = self.samples.lock().unwrap();
        let Some(&(mut start, mut before)) = samples.first() else {
            return "no samples".to_owned();
        };
        let mut out = Vec::new();
        for &(at, ticks) in samples.iter() {
            if at.duration_since(start) >= CPU_WINDOW {
                out.push((ticks - before).to_string());
                (start, before) = (at, ticks);
            }
        }
        format!(
            "ticks per {CPU_WINDOW:?} ({} per second): {}",
            ticks_per_second(),
            out.join(" ")
        )
    }
}

/// utime + stime of `pid`, while it is still the process that started at `start_ticks`.
fn cpu_ticks(pid: u32, start_ticks: Option<u64>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 2..].split(' ').collect();
    if fields.first() == Some(&"Z") || Some(fields.get(19)?.parse().ok()?) != start_ticks {
        return None;
    }
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

// --- the mock Messages API -------------------------------------------------------------------

/// `mock-api` on an ephemeral loopback port; its stdin is a pipe it exits on.
struct Mock {
    /// Held for its guard: the mock ends with the test.
    _process: Running,
    port: u16,
    log: PathBuf,
}

impl Mock {
    fn start(dir: &TempDir) -> Self {
        let log = dir.join("mock-api.log");
        let mut child = Command::new(helper_path().with_file_name("mock-api"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("mock log"))
            .spawn()
            .expect("spawn mock-api");
        let stdout = child.stdout.take().expect("mock stdout");
        let process = Running::new(child, "mock-api");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(DEADLINE).expect("mock-api printed no port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("mock-api printed {line:?}"));
        Self {
            _process: process,
            port,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `POST /v1/messages` lines of its log.
    fn message_requests(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|l| l.contains("POST /v1/messages"))
            .collect()
    }

    /// Every request line of its log.
    fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" -> "))
            .map(str::to_owned)
            .collect()
    }

    /// The CLI asked for its `turns` and nothing else (no telemetry or update checks: the
    /// offline environment works).
    fn assert_only_turns(&self, turns: usize) {
        let requests = self.requests();
        assert_eq!(
            requests.len(),
            turns,
            "requests to the API besides the turns: {requests:#?}"
        );
        assert!(
            requests
                .iter()
                .all(|l| l.contains("POST /v1/messages?beta=true") && l.contains("-> 200 stream")),
            "{requests:#?}"
        );
    }
}

// --- the parent daemons ----------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Node,
    Bun,
    /// PyPI's claude-agent-sdk: `daemon.py`, a client sitting in `receive_messages()`.
    Python,
}

impl Runtime {
    /// The comm of this run's parents of this kind (a symlink of that name is exec'd).
    fn comm(self) -> String {
        let prefix = match self {
            Self::Node => "en",
            Self::Bun => "eb",
            Self::Python => "ep",
        };
        format!("{prefix}-{}", std::process::id())
    }

    fn all_comms() -> Vec<String> {
        [Self::Node, Self::Bun, Self::Python]
            .map(Self::comm)
            .to_vec()
    }
}

/// Which CLI the parent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exe {
    /// The SDK's own: the TypeScript SDK's platform package `claude`, or the Python SDK's
    /// bundled `claude`.
    Claude,
    /// `@anthropic-ai/claude-code`'s `bin/claude.exe`.
    ClaudeExe,
}

impl Exe {
    fn comm(self) -> &'static str {
        match self {
            Self::Claude => "claude",
            Self::ClaudeExe => "claude.exe",
        }
    }
}

/// A parent daemon started by the test, in a process group of its own, with a scratch
/// directory for everything its CLI writes. Dropped, the group gets SIGTERM, then SIGKILL.
struct Parent {
    child: Child,
    what: String,
    lines: mpsc::Receiver<(Instant, String)>,
    /// Every stdout line so far, with when it was read.
    seen: Vec<(Instant, String)>,
    stderr: PathBuf,
    /// The CLI children found so far, killed by the guard if they outlive the group.
    clis: Vec<Rc<PidFd>>,
    _scratch: TempDir,
}

impl Parent {
    /// `extra`: more arguments for the daemon script.
    fn spawn(
        tools: &Tools,
        mock: &Mock,
        runtime: Runtime,
        mode: &str,
        exe: Exe,
        extra: &[&str],
    ) -> Self {
        let scratch = TempDir::new(&format!("e2e-{mode}"));
        let home = scratch.join("home");
        let tmp = scratch.join("tmp");
        let run = scratch.join("run");
        let cwd = scratch.join("cwd");
        let bin = scratch.join("bin");
        for dir in [&home, &home.join(".claude"), &tmp, &run, &cwd, &bin] {
            std::fs::create_dir_all(dir).expect("scratch directory");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let interpreter = match runtime {
            Runtime::Node => on_path("node"),
            Runtime::Bun => tools.bun.clone(),
            Runtime::Python => tools.venv_python.clone(),
        };
        let link = bin.join(runtime.comm());
        std::os::unix::fs::symlink(&interpreter, &link).expect("symlink to the interpreter");
        let scripts = workspace().join("tests/e2e");
        let mut cmd = Command::new(&link);
        match runtime {
            Runtime::Node | Runtime::Bun => {
                cmd.arg(scripts.join("daemon.mjs"))
                    .arg("--sdk")
                    .arg(&tools.sdk)
                    .args(["--mode", mode]);
                if exe == Exe::ClaudeExe {
                    cmd.arg("--exe").arg(&tools.claude_code_exe);
                }
            }
            Runtime::Python => {
                assert_eq!(mode, "receive-messages", "daemon.py has one shape");
                cmd.arg(scripts.join("daemon.py"));
                if exe == Exe::ClaudeExe {
                    cmd.arg("--cli").arg(&tools.claude_code_exe);
                }
                // The venv's packages, for an interpreter started through another name.
                cmd.env("PYTHONPATH", &tools.site_packages);
            }
        }
        cmd.arg("--cwd").arg(&cwd).args(extra);
        // Nothing of the test's own environment (its HOME, any ANTHROPIC_* or CLAUDE_*) reaches
        // the CLI: exactly CLAUDE-PROCESS.md's offline environment.
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env(
                "ANTHROPIC_BASE_URL",
                format!("http://127.0.0.1:{}", mock.port),
            )
            .env("ANTHROPIC_API_KEY", "sk-ant-e2e-mock")
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("DISABLE_ERROR_REPORTING", "1")
            .env("DISABLE_BUG_COMMAND", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env("TMPDIR", &tmp)
            .env("CLAUDE_CODE_TMPDIR", &tmp)
            .env("XDG_RUNTIME_DIR", &run);
        if runtime == Runtime::Python {
            cmd.env("PYTHONPATH", &tools.site_packages)
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .env("PYTHONUNBUFFERED", "1");
        }
        let stderr = scratch.join("parent.err");
        cmd.current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("parent stderr file"))
            .process_group(0);
        // SAFETY: prctl with integer arguments is async-signal-safe. If the test process dies
        // without its guards running (SIGKILL), its parent daemons die too, and their CLIs
        // read EOF on stdin and exit.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let what = format!("{runtime:?} parent in mode {mode} running {}", exe.comm());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the {what}: {e}"));
        let stdout = child.stdout.take().expect("parent stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            what,
            lines,
            seen: Vec::new(),
            stderr,
            clis: Vec::new(),
            _scratch: scratch,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Reads stdout lines until one satisfies `want` (looking at those already read first);
    /// `None` at `deadline`.
    fn line_until(
        &mut self,
        deadline: Instant,
        want: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        if let Some(hit) = self.seen.iter().find(|(_, l)| want(l)) {
            return Some(hit.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    eprintln!("  parent {}: {line}", self.pid());
                    self.seen.push((at, line.clone()));
                    if want(&line) {
                        return Some((at, line));
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The `result` line (the turn's result message arrived): when it was read.
    fn wait_result(&mut self, diag: &dyn Fn() -> String) -> Instant {
        let deadline = Instant::now() + START;
        match self.line_until(deadline, |l| l == "result") {
            Some((at, _)) => at,
            None => panic!(
                "the {} printed no `result` within {START:?}; its lines: {:?}\n{}\n{}",
                self.what.clone(),
                self.lines(),
                self.stderr_tail(),
                diag()
            ),
        }
    }

    /// Every line read so far.
    fn lines(&mut self) -> Vec<String> {
        while let Ok((at, line)) = self.lines.try_recv() {
            eprintln!("  parent {}: {line}", self.pid());
            self.seen.push((at, line));
        }
        self.seen.iter().map(|(_, l)| l.clone()).collect()
    }

    /// The parent is running, and neither its loop nor the process itself saw an error.
    fn assert_alive_and_clean(&mut self, diag: &dyn Fn() -> String) {
        let lines = self.lines();
        let bad: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("loop-error") || l.starts_with("parent-died"))
            .collect();
        assert!(
            bad.is_empty(),
            "the {} saw an error: {bad:?} (all its lines: {lines:?})\n{}\n{}",
            self.what,
            self.stderr_tail(),
            diag()
        );
        assert!(
            self.alive(),
            "the {} died ({:?}); its lines: {lines:?}\n{}\n{}",
            self.what,
            self.child.try_wait(),
            self.stderr_tail(),
            diag()
        );
    }

    /// Its CLI child, once it has exec'd the CLI (found in /proc, then held by a pidfd).
    fn cli(&mut self, diag: &dyn Fn() -> String) -> Cli {
        let deadline = Instant::now() + START;
        let parent = self.pid();
        loop {
            for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let is_cli = |p: u32| {
                    proc_stat(p).filter(|s| {
                        s.ppid == parent && matches!(s.comm.as_str(), "claude" | "claude.exe")
                    })
                };
                if is_cli(pid).is_none() {
                    continue;
                }
                let Ok(pidfd) = PidFd::open(pid) else {
                    continue;
                };
                // Still the parent's CLI now that the pidfd pins the process.
                if let Some(stat) = is_cli(pid) {
                    let pidfd = Rc::new(pidfd);
                    self.clis.push(Rc::clone(&pidfd));
                    return Cli {
                        pidfd,
                        comm: stat.comm,
                    };
                }
            }
            if !self.alive() {
                panic!(
                    "the {} exited before starting its CLI; its lines: {:?}\n{}\n{}",
                    self.what.clone(),
                    self.lines(),
                    self.stderr_tail(),
                    diag()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the {} started no CLI child within {START:?}\n{}\n{}",
                self.what,
                self.stderr_tail(),
                diag()
            );
            std::thread::sleep(POLL);
        }
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- the parent's stderr (last lines) ---\n{}",
            lines[lines.len().saturating_sub(25)..].join("\n")
        )
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // The group is signalled only while its leader is unreaped, so its id cannot have been
        // reused: SIGTERM to all (the SDK and the CLI end cleanly), then SIGKILL to whatever
        // is left once the leader has exited or the deadline passed, then reap it.
        if self.alive() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !exited_unreaped(&self.child) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.wait();
        // A CLI that left the group (none does today) is ended through its pidfd.
        for cli in &self.clis {
            if !cli.exited() {
                cli.kill();
            }
        }
        // The scratch directory is removed after this, by its own guard.
    }
}

/// Whether our child has exited, leaving it unreaped (waitid with WNOWAIT).
fn exited_unreaped(child: &Child) -> bool {
    // SAFETY: waitid into a zeroed siginfo; WNOWAIT leaves the child waitable.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        r == 0 && info.si_pid() != 0
    }
}

// --- the reaper daemon -----------------------------------------------------------------------

/// `reaper run --config` with one rule: the built-in claude-sdk rule, plus the parent's comm
/// being one of this run's parents.
fn start_reaper(dir: &TempDir, extra: &str) -> Daemon {
    let text = reaper_tests::reaping_config("e2e-claude", extra, &Runtime::all_comms());
    let config = dir.write("reaper.toml", &text);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    Daemon::start(
        dir,
        "reaper",
        [std::ffi::OsStr::new("--config"), config.as_os_str()],
        metrics,
    )
}

/// `GET /metrics` of the daemon.
fn metrics(daemon: &Daemon) -> String {
    let mut stream = std::net::TcpStream::connect_timeout(&daemon.metrics, DEADLINE)
        .expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        daemon.metrics
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read /metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return out;
    }
    body.to_owned()
}

/// The samples of one metric family: labels → value.
fn samples(page: &str, family: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
                let (labels, value) = inner.split_once('}')?;
                (labels, value)
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn total(page: &str, family: &str) -> f64 {
    samples(page, family).iter().map(|(_, v)| v).sum()
}

/// Kills by step, e.g. {"closed": 1}.
fn kills_by_step(page: &str) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    for (labels, v) in samples(page, "reaper_kills_total") {
        if v > 0.0 {
            *by.entry(labels.get("step").cloned().unwrap_or_default())
                .or_insert(0.0) += v;
        }
    }
    by
}

/// Polls the metrics until `check` holds; the page then.
fn metrics_until(daemon: &Daemon, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let page = metrics(daemon);
        if check(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; kills {:?}, would-kill {}\n{}",
            kills_by_step(&page),
            total(&page, "reaper_would_kill_total"),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's log lines about `pid` that contain `what` ("reaped", "would reap").
fn log_lines(daemon: &Daemon, pid: u32, what: &str) -> Vec<String> {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains(what) && l.contains(&format!("pid={pid} ")))
        .map(str::to_owned)
        .collect()
}

/// `key=value` (or `key="value"`) from a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

/// Everything a failing assertion should show: the daemon's and the mock's logs.
fn diagnostics(daemon: &Daemon, mock: &Mock) -> String {
    format!(
        "--- reaper's log ---\n{}\n--- mock-api's log ---\n{}",
        daemon.log(),
        mock.log()
    )
}

/// One test's processes: the mock, the daemon (dropped after the parent).
struct Setup {
    tools: Tools,
    mock: Mock,
    daemon: Daemon,
    /// Holds the daemon's and the mock's files; removed last.
    _dir: TempDir,
}

impl Setup {
    fn new(name: &str, extra: &str) -> Self {
        let tools = tools();
        let dir = TempDir::new(name);
        let mock = Mock::start(&dir);
        let daemon = start_reaper(&dir, extra);
        Self {
            tools,
            mock,
            daemon,
            _dir: dir,
        }
    }

    fn parent(&self, runtime: Runtime, mode: &str, exe: Exe) -> Parent {
        self.parent_with(runtime, mode, exe, &[])
    }

    fn parent_with(&self, runtime: Runtime, mode: &str, exe: Exe, extra: &[&str]) -> Parent {
        Parent::spawn(&self.tools, &self.mock, runtime, mode, exe, extra)
    }

    fn diag(&self) -> impl Fn() -> String + '_ {
        || diagnostics(&self.daemon, &self.mock)
    }
}

// --- leaked children: reaped, cleanly --------------------------------------------------------

/// A parent that leaks its CLI child after the turn, and how reaper must end that child.
struct Leak {
    runtime: Runtime,
    /// daemon.mjs's mode, or "receive-messages" for daemon.py.
    mode: &'static str,
    exe: Exe,
    /// The kill step that must end the child: `closed` (its fd 0 is the TypeScript SDK's
    /// socketpair) or `interrupted` (the Python SDK's pipe).
    step: &'static str,
    /// What the parent prints once its child is gone: `Some("loop-ended-ok")` when it is still
    /// iterating, `None` when it stopped (it notices nothing).
    then: Option<&'static str>,
}

/// The leaked child is gone within `IDLE` + 1 s of becoming idle (no stdio byte, and its CPU
/// back under 2 % of a core after the post-turn work), ended by the clean step, and the parent
/// lives on without an error.
fn leaked(case: &Leak) {
    let s = Setup::new(&format!("e2e-leak-{}", case.mode), "");
    let diag = s.diag();
    let mut parent = s.parent(case.runtime, case.mode, case.exe);
    let cli = parent.cli(&diag);
    let cpu = CpuTrace::start(cli.pid());
    assert_eq!(cli.comm, case.exe.comm(), "the CLI's comm");
    let result = parent.wait_result(&diag);
    // The leak: the turn is over and the child lives on (it is reaped only after IDLE).
    assert!(
        !cli.pidfd.exited(),
        "the CLI {} exited by itself right after its result: nothing leaked, the test proves \
         nothing\n{}",
        cli.pid(),
        diag()
    );
    let gone = cli
        .pidfd
        .wait_exit(result + IDLE + DEADLINE)
        .unwrap_or_else(|| {
            panic!(
                "the leaked CLI {} was not reaped within {:?} of its result\n{}\n{}\n\
                 --- what reaper thinks of it ---\n{}\n--- stats ---\n{}\n--- its children ---\n{}\n\
                 --- its CPU ---\n{}",
                cli.pid(),
                IDLE + DEADLINE,
                parent.stderr_tail(),
                diag(),
                s.daemon
                    .request(&format!("explain {}", cli.pid()))
                    .map_or_else(|| "no answer".to_owned(), |v| v.to_string()),
                s.daemon
                    .request("stats")
                    .map_or_else(|| "no answer".to_owned(), |v| v.to_string()),
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", cli.pid()))
                    .unwrap_or_default(),
                cpu.windows()
            )
        });
    // Idle: no stdio byte since the result (the CLI's last write, a state message, follows it
    // within milliseconds) and no CPU burst since the end of its post-turn work (≈ 1–2 s of
    // 20–40 % of a core). The CPU of its own exit (the 200 ms before it was gone) is not idle
    // time that counts.
    let idle_since = cpu
        .last_busy(gone - Duration::from_millis(200))
        .map_or(result, |busy| busy.max(result));
    let delay = gone.duration_since(idle_since);
    let page = metrics_until(&s.daemon, "the kill to be counted", |p| {
        total(p, "reaper_kills_total") >= 1.0
    });
    let kill_delay = total(&page, "reaper_kill_delay_seconds_sum");
    eprintln!(
        "e2e: {:?}/{} {} leaked CLI {}: gone {:.3} s after it became idle ({:.3} s after its \
         result, CPU quiet from {:.3} s after it; idle timeout {:?}); reaper's kill delay after \
         the deadline {kill_delay:.3} s; kills by step {:?}; its CPU in {}",
        case.runtime,
        case.mode,
        case.exe.comm(),
        cli.pid(),
        delay.as_secs_f64(),
        gone.duration_since(result).as_secs_f64(),
        idle_since.duration_since(result).as_secs_f64(),
        IDLE,
        kills_by_step(&page),
        cpu.windows()
    );
    // What the parent saw.
    match case.then {
        Some(line) => {
            parent.line_until(Instant::now() + DEADLINE, |l| {
                l == line || l.starts_with("loop-error") || l.starts_with("parent-died")
            });
        }
        None => {
            // It stopped iterating: nothing may come. Absence is shown over a while.
            parent.line_until(Instant::now() + Duration::from_secs(1), |_| true);
        }
    }
    parent.assert_alive_and_clean(&diag);
    if let Some(line) = case.then {
        let lines = parent.lines();
        assert!(
            lines.iter().any(|l| l == line),
            "the {} did not print {line:?}: {lines:?}\n{}",
            parent.what,
            diag()
        );
    }
    s.mock.assert_only_turns(1);
    if case.then.is_none() {
        assert_eq!(
            parent.lines(),
            ["result"],
            "a parent that stopped iterating notices nothing"
        );
    }
    // How reaper ended it.
    let steps = kills_by_step(&page);
    assert_eq!(
        steps,
        BTreeMap::from([(case.step.to_owned(), 1.0)]),
        "one kill, by the step `{}`\n{}",
        case.step,
        diag()
    );
    let reaped = log_lines(&s.daemon, cli.pid(), "reaped");
    assert_eq!(
        reaped.len(),
        1,
        "one `reaped` line for {}\n{}",
        cli.pid(),
        diag()
    );
    assert_eq!(field(&reaped[0], "step"), Some(case.step), "{}", reaped[0]);
    // Not before its idle deadline. (How soon after it is the benchmark's business.)
    assert!(
        gone.duration_since(result) >= IDLE,
        "the leaked CLI was gone {:.3} s after its result, before the idle timeout {IDLE:?}",
        gone.duration_since(result).as_secs_f64()
    );
}

/// One test per leaking shape, so each reports on its own.
macro_rules! leak_tests {
    ($($name:ident: $runtime:ident $mode:literal $exe:ident => $step:literal, $then:expr;)*) => {$(
        #[test]
        fn $name() {
            leaked(&Leak {
                runtime: Runtime::$runtime,
                mode: $mode,
                exe: Exe::$exe,
                step: $step,
                then: $then,
            });
        }
    )*};
}

leak_tests! {
    leaked_node_stop_iterating_claude: Node "stop-iterating" Claude => "closed", None;
    leaked_node_stop_iterating_claude_exe: Node "stop-iterating" ClaudeExe => "closed", None;
    leaked_node_for_await_claude: Node "for-await" Claude => "closed", Some("loop-ended-ok");
    leaked_node_for_await_claude_exe: Node "for-await" ClaudeExe => "closed", Some("loop-ended-ok");
    leaked_node_interrupt_claude: Node "interrupt" Claude => "closed", Some("loop-ended-ok");
    leaked_node_interrupt_claude_exe: Node "interrupt" ClaudeExe => "closed", Some("loop-ended-ok");
    leaked_bun_stop_iterating_claude: Bun "stop-iterating" Claude => "closed", None;
    leaked_bun_stop_iterating_claude_exe: Bun "stop-iterating" ClaudeExe => "closed", None;
    leaked_bun_for_await_claude: Bun "for-await" Claude => "closed", Some("loop-ended-ok");
    leaked_bun_for_await_claude_exe: Bun "for-await" ClaudeExe => "closed", Some("loop-ended-ok");
    leaked_bun_interrupt_claude: Bun "interrupt" Claude => "closed", Some("loop-ended-ok");
    leaked_bun_interrupt_claude_exe: Bun "interrupt" ClaudeExe => "closed", Some("loop-ended-ok");
    leaked_python_receive_messages_claude: Python "receive-messages" Claude => "interrupted", Some("loop-ended-ok");
}

// --- sessions that must never be signalled ---------------------------------------------------

/// No kill and no would-kill counted, and no kill line in the log.
fn assert_nothing_signalled(s: &Setup, cli: &Cli) {
    let page = metrics(&s.daemon);
    assert_eq!(
        total(&page, "reaper_kills_total"),
        0.0,
        "nothing may be signalled: kills {:?}\n{}",
        kills_by_step(&page),
        (s.diag())()
    );
    assert!(
        log_lines(&s.daemon, cli.pid(), "reaped").is_empty(),
        "{}",
        s.daemon.log()
    );
}

/// `close()` after the result: the CLI exits by itself (stdin EOF), long before its idle
/// deadline, and reaper has nothing to do.
#[test]
fn closed_session_exits_by_itself_and_nothing_is_signalled() {
    let s = Setup::new("e2e-close", "");
    let diag = s.diag();
    let mut parent = s.parent(Runtime::Node, "close", Exe::Claude);
    let cli = parent.cli(&diag);
    let result = parent.wait_result(&diag);
    let gone = cli
        .pidfd
        .wait_exit(result + IDLE + DEADLINE)
        .unwrap_or_else(|| {
            panic!(
                "the CLI {} never exited after close()\n{}",
                cli.pid(),
                diag()
            )
        });
    let delay = gone.duration_since(result);
    eprintln!(
        "e2e: close(): the CLI {} exited by itself {:.3} s after its result",
        cli.pid(),
        delay.as_secs_f64()
    );
    assert!(
        delay < IDLE,
        "the CLI exited {:.3} s after close(), past the idle timeout: reaper may have ended it",
        delay.as_secs_f64()
    );
    parent.line_until(Instant::now() + DEADLINE, |l| l == "loop-ended-ok");
    parent.assert_alive_and_clean(&diag);
    assert!(
        parent.lines().iter().any(|l| l == "loop-ended-ok"),
        "{:?}",
        parent.lines()
    );
    // Past the moment reaper would have acted had the child lived on.
    let quiet_until = result + IDLE + REAP_SLACK;
    while Instant::now() < quiet_until {
        std::thread::sleep(POLL);
    }
    assert_nothing_signalled(&s, &cli);
    assert_eq!(total(&metrics(&s.daemon), "reaper_would_kill_total"), 0.0);
}

/// A live conversation (a user message every second) is never idle: not signalled over three
/// idle timeouts, and its turns keep coming.
#[test]
fn chatty_session_is_never_signalled() {
    let s = Setup::new("e2e-chatty", "");
    let diag = s.diag();
    let mut parent = s.parent(Runtime::Node, "chatty", Exe::Claude);
    let cli = parent.cli(&diag);
    let first = parent.wait_result(&diag);
    let watch = 3 * IDLE + REAP_SLACK;
    assert!(
        cli.pidfd.wait_exit(first + watch).is_none(),
        "the chatting CLI {} ended within {watch:?}\n{}",
        cli.pid(),
        diag()
    );
    let turns = parent.lines().iter().filter(|l| *l == "result").count();
    eprintln!(
        "e2e: chatty: CLI {} alive {:?} after its first result, {turns} turns",
        cli.pid(),
        first.elapsed()
    );
    assert!(
        turns >= 5,
        "only {turns} turns in {watch:?}: the conversation stalled\n{}",
        diag()
    );
    parent.assert_alive_and_clean(&diag);
    assert_nothing_signalled(&s, &cli);
    assert_eq!(total(&metrics(&s.daemon), "reaper_would_kill_total"), 0.0);
}

/// A turn whose Bash tool runs a silent command longer than the idle timeout is in flight, not
/// idle: the CLI is never signalled, the tool runs to its end, and the result arrives.
#[test]
fn silent_tool_turn_is_never_signalled() {
    // Longer than IDLE + REAP_SLACK, shorter than the CLI's 30 s progress interval: a turn
    // with no byte on the CLI's stdio past the idle timeout.
    const TOOL: &str = "timeout 8 tail -f /dev/null";
    let s = Setup::new("e2e-tool", "");
    let diag = s.diag();
    let mut parent = s.parent_with(
        Runtime::Node,
        "tool",
        Exe::Claude,
        &["--tool-command", TOOL],
    );
    let cli = parent.cli(&diag);
    // The tool: `timeout 8 tail -f /dev/null`, a descendant of the CLI.
    let deadline = Instant::now() + START;
    let (tool, tool_seen) = loop {
        if let Some(pid) = descendants(cli.pid())
            .into_iter()
            .find(|&p| proc_stat(p).is_some_and(|s| s.comm == "tail"))
        {
            break (pid, Instant::now());
        }
        assert!(
            !cli.pidfd.exited(),
            "the CLI {} ended before its tool ran\n{}",
            cli.pid(),
            diag()
        );
        assert!(
            Instant::now() < deadline,
            "no tool process under the CLI\n{}",
            diag()
        );
        std::thread::sleep(POLL);
    };
    let result = parent.wait_result(&diag);
    let silent = result.duration_since(tool_seen);
    eprintln!(
        "e2e: tool: `tail` {tool} ran {:.3} s under the CLI {} (idle timeout {IDLE:?}); result \
         arrived, CLI alive: {}",
        silent.as_secs_f64(),
        cli.pid(),
        !cli.pidfd.exited()
    );
    assert!(
        !cli.pidfd.exited(),
        "the CLI {} was ended during its tool turn\n{}",
        cli.pid(),
        diag()
    );
    assert!(
        silent >= IDLE + REAP_SLACK,
        "the tool ran only {silent:?}: the turn was not silent past the idle timeout"
    );
    assert!(
        s.mock
            .message_requests()
            .iter()
            .any(|l| l.contains("after tool_result")),
        "the tool's result never reached the API: {:?}",
        s.mock.message_requests()
    );
    assert!(
        proc_stat(tool).is_none_or(|st| st.comm != "tail"),
        "the tool {tool} still runs after the result"
    );
    parent.assert_alive_and_clean(&diag);
    assert_nothing_signalled(&s, &cli);
}

/// Every descendant of `pid` (from /proc's parent links).
fn descendants(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, proc_stat(p)?.ppid)))
        .collect();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out.remove(0);
    out
}

/// Dry run: the leaked child is counted once as a would-kill, with the step it would start
/// with, and lives on.
#[test]
fn dry_run_signals_nothing_and_counts() {
    let s = Setup::new("e2e-dry-run", "mode = \"dry-run\"");
    let diag = s.diag();
    let mut parent = s.parent(Runtime::Node, "for-await", Exe::Claude);
    let cli = parent.cli(&diag);
    let result = parent.wait_result(&diag);
    let page = metrics_until(&s.daemon, "a would-kill", |p| {
        total(p, "reaper_would_kill_total") >= 1.0
    });
    let counted = result.elapsed();
    eprintln!(
        "e2e: dry run: would-kill of CLI {} counted {:.3} s after its result",
        cli.pid(),
        counted.as_secs_f64()
    );
    assert_eq!(total(&page, "reaper_kills_total"), 0.0, "{}", diag());
    // Still alive a while later, and counted once, not on every tick.
    assert!(
        cli.pidfd
            .wait_exit(Instant::now() + 2 * REAP_SLACK)
            .is_none(),
        "the CLI {} ended in a dry run\n{}",
        cli.pid(),
        diag()
    );
    let page = metrics(&s.daemon);
    assert_eq!(total(&page, "reaper_would_kill_total"), 1.0, "{}", diag());
    assert_nothing_signalled(&s, &cli);
    parent.assert_alive_and_clean(&diag);
    let lines = log_lines(&s.daemon, cli.pid(), "would reap");
    assert_eq!(lines.len(), 1, "one would-reap line\n{}", diag());
    assert_eq!(
        field(&lines[0], "step"),
        Some("closed"),
        "the step it would start with: {}",
        lines[0]
    );
}
