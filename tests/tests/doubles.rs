//! The test doubles themselves (`claude`, `fake-agent`) against `/proc`, no eBPF needed: they
//! must look to the kernel like the measured real thing (see the `claude` double's docs).
//!
//! Waits use deadlines, never fixed sleeps. The few fixed-length windows (idle CPU, "still
//! alive") are measurements over a duration, not waits for an ordering. Every process a test
//! starts, directly or not, is killed and reaped by a Drop guard. The test process makes itself
//! a child subreaper, so the doubles orphaned by a SIGKILLed agent are adopted (and reaped) here
//! rather than by init.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::OwnedFd,
        unix::{net::UnixStream, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Generous: CI machines are shared and slow.
const DEADLINE: Duration = Duration::from_secs(20);

fn claude_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_claude"))
}

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-agent"))
}

fn me() -> u32 {
    std::process::id()
}

/// The SDK's argv after argv[0], `=` forms.
const SDK_ARGV: [&str; 9] = [
    "--output-format",
    "stream-json",
    "--verbose",
    "--input-format",
    "stream-json",
    "--model=claude-sonnet-4-5",
    "--disallowedTools=Bash,Read,Write,Edit",
    "--setting-sources=",
    "--permission-mode=default",
];

// ---- /proc as the oracle ---------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    pgrp: u32,
    session: u32,
    tty_nr: i64,
    tpgid: i64,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    start_ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    // Fields from 3 (state) on; field N is f[N - 3].
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    let num = |n: usize| f.get(n - 3).and_then(|s| s.parse::<i64>().ok());
    Some(Stat {
        comm: text[open + 1..close].to_owned(),
        state: f.first()?.chars().next()?,
        ppid: num(4)? as u32,
        pgrp: num(5)? as u32,
        session: num(6)? as u32,
        tty_nr: num(7)?,
        tpgid: num(8)?,
        cpu_ticks: (num(14)? + num(15)?) as u64,
        start_ticks: num(22)? as u64,
    })
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

fn fd_target(pid: u32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|s| s.trim_end().to_owned())
        .collect()
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect::<Vec<_>>()
        .split_last()
        .map(|(_, init)| init.to_vec())
        .unwrap_or_default()
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A counter from `/proc/PID/io` (syscr, syscw, rchar, wchar …).
fn io_counter(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A counter from `/proc/PID/status` (the main thread's, for the context switches).
fn status_counter(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf with a valid name.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Polls `cond` until it holds; panics after [`DEADLINE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    started.elapsed()
}

/// Checks `invariant` throughout a measurement window of `window`.
fn hold_for(what: &str, window: Duration, mut invariant: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < window {
        assert!(
            invariant(),
            "{what} stopped holding after {:?} (is a reaper running on this machine?)",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reaps `pid` if it became our child (we are a subreaper), waits until it is gone otherwise.
fn wait_gone(pid: u32, start_ticks: u64) -> Duration {
    wait_until(&format!("{pid} to be gone"), || {
        let Some(s) = stat(pid).filter(|s| s.start_ticks == start_ticks) else {
            return true;
        };
        if s.ppid == me() {
            // SAFETY: non-blocking waitpid on our own (adopted) child.
            unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            return stat(pid).is_none_or(|s| s.start_ticks != start_ticks);
        }
        s.state == 'Z' || s.state == 'X' // someone else's zombie: dead, its parent reaps it
    })
}

fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started (directly or through the agent).
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

// ---- scratch directories and the processes under test ---------------------------------------

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("reaper-doubles-{}-{tag}-{n}", me()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch dir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Where a double with this dir as `XDG_RUNTIME_DIR` puts its socket.
    fn sock(&self, pid: u32) -> PathBuf {
        self.0.join("run/cc-socks").join(format!("{pid}.sock"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Processes a guard must kill and reap: (pid, start ticks).
#[derive(Default)]
struct Strays(Vec<(u32, u64)>);

impl Strays {
    /// For a process that is alive now (so the pid is still the one the test was told of).
    fn add(&mut self, pid: u32) {
        if let Some(s) = stat(pid) {
            self.0.push((pid, s.start_ticks));
        }
    }

    /// For a process whose start time its parent reported before it could be reaped.
    fn record(&mut self, pid: u32, start_ticks: u64) {
        self.0.push((pid, start_ticks));
    }

    fn start_ticks(&self, pid: u32) -> u64 {
        self.0
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, t)| *t)
            .expect("a recorded pid")
    }

    fn kill_all(&mut self) {
        for &(pid, ticks) in &self.0 {
            if stat(pid).is_some_and(|s| s.start_ticks == ticks && s.state != 'Z') {
                // SAFETY: the same process this test started (pid and start time match).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        for (pid, ticks) in std::mem::take(&mut self.0) {
            wait_gone(pid, ticks);
        }
    }
}

/// A running `fake-agent` in its own session (a daemon without a controlling terminal), with
/// `XDG_RUNTIME_DIR` and `CLAUDE_CONFIG_DIR` in a scratch dir.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every `key=value` line read so far, in order, with a consumed flag.
    seen: Vec<(String, String, bool)>,
    claudes: Vec<u32>,
    tools: Vec<u32>,
    holder: Option<u32>,
    strays: Strays,
    dir: TempDir,
}

impl Agent {
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_in(TempDir::new("agent"), args)
    }

    fn spawn_in(dir: TempDir, args: &[&str]) -> Self {
        become_subreaper();
        let mut cmd = Command::new(agent_bin());
        cmd.args(args)
            .env("XDG_RUNTIME_DIR", dir.path().join("run"))
            .env("CLAUDE_CONFIG_DIR", dir.path().join("config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn fake-agent");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            claudes: Vec::new(),
            tools: Vec::new(),
            holder: None,
            strays: Strays::default(),
            dir,
        };
        let pid: u32 = agent.next("agent").parse().unwrap();
        assert_eq!(pid, agent.child.id());
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn take(&mut self, line: String) {
        let (k, v) = line.split_once('=').unwrap_or((&line, ""));
        self.seen.push((k.to_owned(), v.to_owned(), false));
    }

    /// Reads every line already available, without blocking.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.take(line);
        }
    }

    /// The first not yet consumed value printed for `key`, waiting for it up to [`DEADLINE`].
    fn next(&mut self, key: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(entry) = self.seen.iter_mut().find(|(k, _, used)| k == key && !used) {
                entry.2 = true;
                return entry.1.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(err) => panic!("no {key}= from fake-agent ({err}); got {:?}", self.seen),
            }
        }
    }

    /// Every value printed for `key` so far (consumed or not).
    fn values(&mut self, key: &str) -> Vec<String> {
        self.drain();
        self.seen
            .iter()
            .filter(|(k, ..)| k == key)
            .map(|(_, v, _)| v.clone())
            .collect()
    }

    /// Reads up to `ready=1`, recording every process the agent reported.
    fn ready(&mut self) -> &mut Self {
        self.next("ready");
        let parse = |v: String| v.parse::<u32>().expect("a pid");
        self.claudes = self.values("claude").into_iter().map(parse).collect();
        self.tools = self.values("tool").into_iter().map(parse).collect();
        self.holder = self.values("holder").into_iter().map(parse).next();
        // The claudes' start times come from the agent: after `ready=1` it may close and reap
        // them (`--close-after-result`) before this reads /proc.
        let started: HashMap<u32, u64> = self
            .values("started")
            .into_iter()
            .map(|v| {
                let (pid, ticks) = v.split_once(':').expect("started=<pid>:<ticks>");
                (parse(pid.to_owned()), ticks.parse().expect("start ticks"))
            })
            .collect();
        for &c in &self.claudes {
            let ticks = *started
                .get(&c)
                .unwrap_or_else(|| panic!("no started= for {c}"));
            self.strays.record(c, ticks);
        }
        // The holder lives until the test closes the agent's stdin, tools until their claude
        // ends (no test gives tools to a `--close-after-result` agent): alive now.
        for pid in self.tools.clone().into_iter().chain(self.holder) {
            self.strays.add(pid);
        }
        assert!(!self.claudes.is_empty(), "no claude reported");
        self
    }

    fn claude(&self) -> u32 {
        self.claudes[0]
    }

    /// `exit=<pid>:<how>:<n>` for `pid`, waiting for it.
    fn exit_of(&mut self, pid: u32) -> (String, i32) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let prefix = format!("{pid}:");
            if let Some(v) = self
                .values("exit")
                .into_iter()
                .find(|v| v.starts_with(&prefix))
            {
                let mut parts = v.splitn(3, ':').skip(1);
                let how = parts.next().unwrap().to_owned();
                return (how, parts.next().unwrap().parse().unwrap());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(err) => panic!(
                    "no exit of {pid} from fake-agent ({err}); got {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Closes the agent's stdin: it ends its children and exits; returns its exit status.
    fn finish(&mut self) -> std::process::ExitStatus {
        self.stdin.take();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "fake-agent did not exit after its stdin closed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's whole output once it has ended.
    fn rest(&mut self) -> Vec<(String, String)> {
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => self.take(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(err) => panic!("fake-agent output never ended ({err})"),
            }
        }
        self.seen
            .iter()
            .map(|(k, v, _)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stdin.take();
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && started.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill(); // our own child, if it is still there
        let _ = self.child.wait();
        self.strays.kill_all();
    }
}

/// A `claude` double spawned straight from the test, speaking to it over `stdin`/`stdout`.
struct Direct {
    child: Child,
    stdin: Option<Box<dyn std::io::Write + Send>>,
    lines: Receiver<Value>,
    strays: Strays,
}

impl Direct {
    /// With socketpairs (as the SDK) or pipes.
    fn spawn(dir: &TempDir, sockets: bool, args: &[&str]) -> Self {
        let mut cmd = Command::new(claude_bin());
        cmd.args(args)
            .env("XDG_RUNTIME_DIR", dir.path().join("run"))
            .env("CLAUDE_CONFIG_DIR", dir.path().join("config"));
        let mut ours: Option<(UnixStream, UnixStream)> = None;
        if sockets {
            let (a_in, c_in) = UnixStream::pair().unwrap();
            let (a_out, c_out) = UnixStream::pair().unwrap();
            cmd.stdin(Stdio::from(OwnedFd::from(c_in)))
                .stdout(Stdio::from(OwnedFd::from(c_out)));
            ours = Some((a_in, a_out));
        } else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn the claude double");
        drop(cmd); // our copies of the child's ends
        let (stdin, stdout): (
            Box<dyn std::io::Write + Send>,
            Box<dyn std::io::Read + Send>,
        ) = match ours {
            Some((a_in, a_out)) => (Box::new(a_in), Box::new(a_out)),
            None => (
                Box::new(child.stdin.take().unwrap()),
                Box::new(child.stdout.take().unwrap()),
            ),
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut strays = Strays::default();
        strays.add(child.id());
        Self {
            child,
            stdin: Some(stdin),
            lines,
            strays,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn recv(&self) -> Value {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("a line from the double")
    }

    fn ask(&mut self, text: &str) -> (Vec<Value>, Value) {
        self.send(
            &json!({"type": "user", "message": {"role": "user", "content": text},
                          "parent_tool_use_id": null, "session_id": ""})
            .to_string(),
        );
        let mut before = Vec::new();
        loop {
            let v = self.recv();
            if v["type"] == "result" {
                return (before, v);
            }
            before.push(v);
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.strays.kill_all();
    }
}

// ---- the tests -------------------------------------------------------------------------------

#[test]
fn an_sdk_spawned_double_looks_like_the_real_cli() {
    let mut agent = Agent::spawn(&[]);
    let c = agent.ready().claude();
    let a = agent.pid();
    let s = stat(c).expect("the double is alive");
    let sa = stat(a).expect("the agent is alive");

    assert_eq!(s.comm, "claude");
    assert_eq!(s.ppid, a, "a direct child of the daemon");
    assert_eq!(
        (s.pgrp, s.session),
        (sa.pgrp, sa.session),
        "the daemon's group and session"
    );
    assert_eq!((s.tty_nr, s.tpgid), (0, -1), "no controlling terminal");
    assert_eq!(cmdline(c)[1..], SDK_ARGV);
    assert!(
        environ(c)
            .iter()
            .any(|e| e == "CLAUDE_CODE_ENTRYPOINT=sdk-ts")
    );
    assert_eq!(agent.next("model"), format!("{c}:claude-sonnet-4-5"));

    // fds 0/1/2: three different AF_UNIX sockets; fds 5 and 6 are dups of 2 and 1.
    let (f0, f1, f2) = (fd_target(c, 0), fd_target(c, 1), fd_target(c, 2));
    for f in [&f0, &f1, &f2] {
        assert!(f.starts_with("socket:"), "stdio is a socket, not {f:?}");
    }
    assert!(f0 != f1 && f1 != f2);
    assert_eq!((fd_target(c, 5), fd_target(c, 6)), (f2, f1));
    let fds = fd_targets(c);
    let count = |what: &str| fds.iter().filter(|f| f.contains(what)).count();
    assert_eq!(count("anon_inode:inotify"), 1, "{fds:?}");
    assert!(
        count("[eventpoll]") >= 3 && count("[eventfd]") >= 3,
        "{fds:?}"
    );

    // The listening socket at $XDG_RUNTIME_DIR/cc-socks/<pid>.sock.
    let sock = agent.dir.sock(c);
    use std::os::unix::fs::FileTypeExt as _;
    assert!(
        std::fs::metadata(&sock)
            .expect("its socket file")
            .file_type()
            .is_socket()
    );
    UnixStream::connect(&sock).expect("it listens");

    let names = thread_names(c);
    assert!(names.len() >= 5, "threads: {names:?}");
    for name in [
        "claude",
        "Bun Pool 0",
        "HTTP Client",
        "HeapHelper",
        "JITWorker",
        "fs.watch",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "no {name:?} thread in {names:?}"
        );
    }
    eprintln!(
        "double {c}: {} threads {names:?}, {} fds",
        names.len(),
        fds.len()
    );

    // Closing the agent ends the double with status 0 and removes its socket.
    assert!(agent.finish().success());
    assert_eq!(agent.exit_of(c), ("code".to_owned(), 0));
    wait_gone(c, s.start_ticks);
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn the_space_form_of_the_flags_is_accepted() {
    let mut agent = Agent::spawn(&["--claude-arg-style", "space"]);
    let c = agent.ready().claude();
    let argv = cmdline(c);
    let at = argv.iter().position(|a| a == "--model").expect("--model");
    assert_eq!(argv[at + 1], "claude-sonnet-4-5");
    let at = argv
        .iter()
        .position(|a| a == "--setting-sources")
        .expect("--setting-sources");
    assert_eq!(argv[at + 1], "");
    assert_eq!(argv.last().unwrap(), "default");
    assert_eq!(agent.next("model"), format!("{c}:claude-sonnet-4-5"));
    assert_eq!(stat(c).unwrap().comm, "claude");
}

#[test]
fn comm_follows_the_name_it_was_exec_d_by() {
    let dir = TempDir::new("exe");
    let exe = dir.path().join("claude.exe");
    std::fs::copy(claude_bin(), &exe).expect("copy the double to claude.exe");
    let link = dir.path().join("claude");
    std::os::unix::fs::symlink("claude.exe", &link).unwrap();

    let mut agent = Agent::spawn(&["--claude", exe.to_str().unwrap()]);
    let c = agent.ready().claude();
    assert_eq!(stat(c).unwrap().comm, "claude.exe");
    assert!(
        std::fs::read_link(format!("/proc/{c}/exe"))
            .unwrap()
            .ends_with("claude.exe")
    );
    drop(agent);

    let mut agent = Agent::spawn(&["--claude", link.to_str().unwrap()]);
    let c = agent.ready().claude();
    assert_eq!(
        stat(c).unwrap().comm,
        "claude",
        "comm is the name it was exec'd by"
    );
    let target = std::fs::read_link(format!("/proc/{c}/exe")).unwrap();
    assert!(
        target.ends_with("claude.exe"),
        "exe is the resolved file: {target:?}"
    );
}

#[test]
fn closing_its_stdin_ends_it_within_a_second_and_the_agent_lives_on() {
    let mut agent = Agent::spawn(&["--close-after-result", "--count", "3"]);
    agent.ready();
    let claudes = agent.claudes.clone();
    assert_eq!(claudes.len(), 3);
    for &c in &claudes {
        assert_eq!(agent.exit_of(c), ("code".to_owned(), 0));
        let v = agent.next("exit_us");
        let (pid, us) = v.split_once(':').unwrap();
        let us: u64 = us.parse().unwrap();
        eprintln!("claude {pid}: stdin shut down → reaped by the agent in {us} µs");
        assert!(us < 1_000_000, "took {us} µs to exit after EOF");
        wait_gone(c, agent.strays.start_ticks(c));
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    assert!(agent.finish().success());
}

#[test]
fn eof_on_stdin_exits_zero_over_sockets_and_over_pipes() {
    for sockets in [true, false] {
        let dir = TempDir::new("eof");
        let mut d = Direct::spawn(&dir, sockets, &SDK_ARGV);
        let pid = d.child.id();
        let init = d.recv();
        assert_eq!(
            (init["type"].as_str(), init["subtype"].as_str()),
            (Some("system"), Some("init"))
        );
        assert_eq!(init["pid"], pid);
        assert!(dir.sock(pid).exists());
        let closed = Instant::now();
        d.stdin.take(); // EOF (the socket's only writer is gone)
        let status = loop {
            if let Some(status) = d.child.try_wait().unwrap() {
                break status;
            }
            assert!(closed.elapsed() < DEADLINE);
            std::thread::sleep(Duration::from_micros(200));
        };
        let took = closed.elapsed();
        eprintln!(
            "EOF → exit in {took:?} (over {})",
            if sockets { "sockets" } else { "pipes" }
        );
        assert_eq!(status.code(), Some(0));
        assert!(took < Duration::from_secs(1));
        assert!(!dir.sock(pid).exists(), "socket file left behind");
    }
}

#[test]
fn the_protocol_answers_control_requests_turns_and_tool_commands() {
    let dir = TempDir::new("proto");
    let mut d = Direct::spawn(&dir, true, &["--model", "claude-opus-4-1", "--verbose"]);
    let pid = d.child.id();
    assert_eq!(d.recv()["model"], "claude-opus-4-1");
    d.send(r#"{"type":"control_request","request_id":"r1","request":{"subtype":"initialize"}}"#);
    let r = d.recv();
    assert_eq!(
        (r["type"].as_str(), r["response"]["request_id"].as_str()),
        (Some("control_response"), Some("r1"))
    );
    assert_eq!(r["response"]["subtype"], "success");
    d.send("this is not json"); // ignored (a note on stderr)

    let (before, result) = d.ask("hello");
    assert!(!before.is_empty() && before.iter().all(|v| v["type"] == "assistant"));
    assert_eq!(
        (result["subtype"].as_str(), result["is_error"].as_bool()),
        (Some("success"), Some(false))
    );
    assert!(result.get("tool_pid").is_none());

    // Content as text blocks works too; a tool child blocked on a pipe read.
    d.send(
        &json!({"type": "user", "message": {"role": "user",
        "content": [{"type": "text", "text": "please tool:idle"}]}})
        .to_string(),
    );
    let result = loop {
        let v = d.recv();
        if v["type"] == "result" {
            break v;
        }
    };
    let tool = result["tool_pid"].as_u64().expect("tool_pid") as u32;
    d.strays.add(tool);
    let t = stat(tool).unwrap();
    assert_eq!((t.comm.as_str(), t.ppid), ("tool-idle", pid));
    assert!(fd_target(tool, 0).starts_with("pipe:"));
    assert_eq!(
        fd_targets(tool).len(),
        3,
        "only stdio: {:?}",
        fd_targets(tool)
    );

    let (_, result) = d.ask("tool:stop");
    assert!(
        result["result"]
            .as_str()
            .unwrap()
            .contains(&format!("stopped tool {tool}"))
    );
    assert!(stat(tool).is_none(), "tool:stop kills and reaps the tool");

    // A slow turn streams assistant lines (socket traffic throughout the turn).
    let started = Instant::now();
    let (before, _) = d.ask("slow:300");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(before.len() >= 3, "{before:?}");
}

#[test]
fn a_leaked_double_stays_alive_idle_and_quiet_but_not_silent() {
    let mut agent = Agent::spawn(&[]);
    let c = agent.ready().claude();
    let before = stat(c).unwrap();
    let switches = status_counter(c, "voluntary_ctxt_switches");
    let writes = io_counter(c, "syscw");
    let started = Instant::now();
    hold_for(
        "the leaked double being alive",
        Duration::from_secs(3),
        || alive(c),
    );
    let secs = started.elapsed().as_secs_f64();
    let after = stat(c).unwrap_or_else(|| panic!("died: {:?}", agent.values("exit")));
    let cpu = (after.cpu_ticks - before.cpu_ticks) as f64 / clk_tck() / secs;
    let switches = status_counter(c, "voluntary_ctxt_switches") - switches;
    let writes = io_counter(c, "syscw") - writes;
    eprintln!(
        "idle double {c} over {secs:.2} s: CPU {:.3} % of a core ({} ticks), {switches} voluntary \
         switches on the main thread, {writes} write syscalls, {} threads",
        cpu * 100.0,
        after.cpu_ticks - before.cpu_ticks,
        thread_names(c).len()
    );
    assert!(cpu < 0.02, "idle CPU {:.2} % of a core", cpu * 100.0);
    assert!(switches >= 2, "the main loop wakes about every second");
    assert!(writes >= 2, "eventfd writes about every second");
    assert!(thread_names(c).len() >= 5);
    assert!(
        agent.values("unsolicited").is_empty(),
        "the double wrote while idle"
    );
    assert!(agent.values("exit").is_empty());
    assert!(agent.finish().success());
    assert!(agent.rest().iter().all(|(k, _)| k != "unsolicited"));
}

#[test]
fn the_signals_a_reaper_sends_each_end_a_leaked_double_promptly() {
    let mut agent = Agent::spawn(&["--count", "3"]);
    agent.ready();
    let claudes = agent.claudes.clone();
    let mut sockets: Vec<String> = claudes
        .iter()
        .flat_map(|&c| [0, 1, 2].map(|fd| fd_target(c, fd)))
        .collect();
    sockets.sort();
    sockets.dedup();
    assert_eq!(sockets.len(), 9, "three socketpairs per child: {sockets:?}");
    for (&c, sig) in claudes
        .iter()
        .zip([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
    {
        let sock = agent.dir.sock(c);
        assert!(sock.exists());
        let sent = Instant::now();
        signal(c, sig);
        // SIGINT is the CLI's own clean exit (status 0); SIGTERM and SIGHUP kill it.
        let expected = if sig == libc::SIGINT {
            ("code".to_owned(), 0)
        } else {
            ("signal".to_owned(), sig)
        };
        assert_eq!(agent.exit_of(c), expected, "ends on signal {sig}");
        eprintln!("signal {sig} → reaped by the agent in {:?}", sent.elapsed());
        assert!(sent.elapsed() < Duration::from_secs(1));
        assert!(!sock.exists(), "socket file left behind");
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the daemon notices nothing"
    );
    assert!(agent.finish().success());
}

#[test]
fn a_sigkilled_agent_s_children_exit_on_eof() {
    let mut agent = Agent::spawn(&["--count", "2"]);
    agent.ready();
    signal(agent.pid(), libc::SIGKILL);
    for &c in &agent.claudes.clone() {
        let took = wait_gone(c, agent.strays.start_ticks(c));
        eprintln!("agent SIGKILLed → claude {c} gone in {took:?}");
    }
}

#[test]
fn a_holder_turns_a_sigkilled_agent_s_children_into_orphans() {
    let mut agent = Agent::spawn(&["--orphanable", "--count", "2", "--message", "tool:idle"]);
    agent.ready();
    let (a, holder) = (agent.pid(), agent.holder.expect("holder="));
    let holder_stat = stat(holder).unwrap();
    assert_eq!(
        (holder_stat.comm.as_str(), holder_stat.ppid),
        ("agent-holder", a)
    );
    let session = stat(a).unwrap().session;
    signal(a, libc::SIGKILL);
    agent.child.wait().unwrap();
    let claudes = agent.claudes.clone();
    for &c in &claudes {
        wait_until("the orphan to be adopted by the subreaper", || {
            stat(c).is_some_and(|s| s.ppid == me())
        });
    }
    hold_for("the orphans being alive", Duration::from_secs(1), || {
        claudes.iter().all(|&c| alive(c))
    });
    for &c in &claudes {
        let s = stat(c).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.session),
            ("claude", session),
            "same session, leader gone"
        );
        assert!(fd_target(c, 0).starts_with("socket:"));
    }
    for &t in &agent.tools {
        assert!(alive(t), "tools live while their claude does");
    }
    // The holder shares the dead agent's stdin: closing it lets the orphans see EOF.
    agent.stdin.take();
    for pid in claudes.iter().chain(&agent.tools).chain([&holder]) {
        let took = wait_gone(*pid, agent.strays.start_ticks(*pid));
        eprintln!("holder gone → {pid} gone in {took:?}");
    }
}

#[test]
fn ignore_stdin_eof_keeps_an_orphan_idling_until_signalled() {
    let mut agent = Agent::spawn(&["--claude-arg", "--ignore-stdin-eof"]);
    let c = agent.ready().claude();
    let sock = agent.dir.sock(c);
    signal(agent.pid(), libc::SIGKILL);
    agent.child.wait().unwrap();
    wait_until("the orphan to be adopted", || {
        stat(c).is_some_and(|s| s.ppid == me())
    });
    let before = stat(c).unwrap().cpu_ticks;
    let started = Instant::now();
    hold_for("the orphan idling past EOF", Duration::from_secs(2), || {
        alive(c)
    });
    let cpu =
        (stat(c).unwrap().cpu_ticks - before) as f64 / clk_tck() / started.elapsed().as_secs_f64();
    assert!(
        cpu < 0.02,
        "no busy loop on a readable EOF: {:.2} %",
        cpu * 100.0
    );
    assert!(sock.exists());
    // We are its parent now: its exit status is ours to see.
    signal(c, libc::SIGTERM);
    let mut status = 0;
    // SAFETY: waitpid on our adopted child into a stack int.
    let reaped = unsafe { libc::waitpid(c as i32, &mut status, 0) };
    assert_eq!(reaped, c as i32);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTERM);
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn tool_children_burn_sleep_or_talk_and_die_with_their_claude() {
    let mut agent = Agent::spawn(&["--message", "run tool:busy tool:idle tool:io"]);
    let c = agent.ready().claude();
    let tools = agent.tools.clone();
    assert_eq!(tools.len(), 3);
    let by_name: HashMap<String, u32> = tools.iter().map(|&t| (stat(t).unwrap().comm, t)).collect();
    for (name, &t) in &by_name {
        let s = stat(t).unwrap();
        assert_eq!(s.ppid, c, "{name} is the double's child");
        assert!(
            !fd_target(t, 0).starts_with("socket:"),
            "{name} does not hold the stdio sockets"
        );
    }
    let busy = by_name["tool-busy"];
    let io = by_name["tool-io"];
    let (busy0, io0) = (stat(busy).unwrap().cpu_ticks, io_counter(io, "syscw"));
    wait_until("the busy tool to burn CPU", || {
        stat(busy).unwrap().cpu_ticks >= busy0 + 10
    });
    wait_until("the io tool to ping", || io_counter(io, "syscw") >= io0 + 3);
    assert_eq!(stat(by_name["tool-idle"]).unwrap().state, 'S');

    signal(c, libc::SIGKILL);
    assert_eq!(agent.exit_of(c), ("signal".to_owned(), libc::SIGKILL));
    for &t in &tools {
        wait_gone(t, agent.strays.start_ticks(t)); // PR_SET_PDEATHSIG
    }
}

#[test]
fn chat_every_keeps_a_session_talking() {
    let mut agent = Agent::spawn(&["--chat-every", "100"]);
    let c = agent.ready().claude();
    let wrote = io_counter(c, "wchar");
    hold_for(
        "the chatting double being alive",
        Duration::from_secs(1),
        || alive(c),
    );
    assert!(
        io_counter(c, "wchar") > wrote + 1000,
        "it answers every 100 ms"
    );
    assert!(agent.finish().success());
    let chats: u64 = agent.next("chats").parse().unwrap();
    assert!(chats >= 5, "{chats} chats in a second");
    assert_eq!(agent.exit_of(c), ("code".to_owned(), 0));
    assert!(agent.values("unsolicited").is_empty());
}
