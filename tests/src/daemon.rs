//! The `reaper` binary as a person runs it: `reaper run` on a socket and metrics port of the
//! test's own, one-shot commands (`reaper tree`, `reaper stats`, …) with a deadline, and a
//! guard that stops every process a test starts.
use std::{
    ffi::OsStr,
    io::{Read, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Instant,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::{DEADLINE, POLL, TempDir, reaper_bin};

/// A process this test started. Dropping it (also when the test panics) sends SIGTERM if it
/// is still running, SIGKILL if it has not exited by the deadline, and reaps it: signals go
/// only to an unreaped child, so never to a reused pid.
pub struct Running {
    pub child: Child,
    what: String,
}

impl Running {
    /// `what` names the process in failure messages.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in pid_t"))
    }

    /// Its exit status, if it has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on our own child")
    }

    /// Waits for it to exit until `deadline`; `None` if it is still running then.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (only while the child is unreaped, so never to a reused pid) and waits
    /// for it to exit.
    pub fn stop(&mut self, signal: Signal) -> ExitStatus {
        if let Some(status) = self.exited() {
            return status;
        }
        kill(self.pid(), signal).expect("signal our own child");
        match self.wait_until(Instant::now() + DEADLINE) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not exit within {DEADLINE:?} of {signal}", self.what);
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        if self.wait_until(Instant::now() + DEADLINE).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `reaper run ARGS… --metrics-addr METRICS --socket <dir>/reaper.sock`, started by this test,
/// its log in `<dir>/<name>.log`. Dropped, it is stopped like any [`Running`].
pub struct Daemon {
    pub process: Running,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Starts it and waits until it serves its socket. `args` choose the rules (`--dry-run`,
    /// `--config FILE`, …); `metrics` is an address of the test's own (see
    /// [`free_port`](crate::free_port)), so tests never collide with a daemon already running
    /// on the default one.
    pub fn start<S: AsRef<OsStr>>(
        dir: &TempDir,
        name: &str,
        args: impl IntoIterator<Item = S>,
        metrics: SocketAddr,
    ) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "`reaper run` loads eBPF programs: run the tests as root (cargo xtask test)"
        );
        let socket = dir.join("reaper.sock");
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(reaper_bin())
            .arg("run")
            .args(args)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("spawn reaper run");
        // The guard exists before the wait, so a daemon that never gets ready is stopped too.
        let mut daemon = Self {
            process: Running::new(child, "reaper run"),
            socket,
            log,
            metrics,
        };
        daemon.wait_ready();
        daemon
    }

    /// Until the daemon answers a request on its socket (which it serves only after binding
    /// it and restricting its mode).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        while self.request("stats").is_none() {
            if let Some(status) = self.process.exited() {
                panic!(
                    "reaper run exited ({status}) before serving; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "reaper run did not serve {} within {DEADLINE:?}; its log:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// One request line on the socket; the JSON answer, or `None` if there is none (yet).
    pub fn request(&self, line: &str) -> Option<Value> {
        let mut stream = UnixStream::connect(&self.socket).ok()?;
        stream.set_read_timeout(Some(DEADLINE)).ok()?;
        stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// The socket path, for `reaper … --socket`.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("temp paths are UTF-8")
    }

    /// The daemon's log, colours stripped.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut text = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(at) = rest.find('\x1b') {
            text.push_str(&rest[..at]);
            rest = &rest[at..];
            rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
        }
        text.push_str(rest);
        text
    }
}

/// What a finished `reaper` command printed.
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `reaper ARGS…` to completion (with a deadline). Backtraces are left off, as a person
/// running it would see it.
pub fn reaper_cli<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> CliOutput {
    let mut cmd = Command::new(reaper_bin());
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut running = Running::new(cmd.spawn().expect("spawn reaper"), what);
    // Pipes are drained by threads so a large output cannot block the child.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(running.child.stdout.take().map(|s| Box::new(s) as _));
    let stderr = drain(running.child.stderr.take().map(|s| Box::new(s) as _));
    let status = running
        .wait_until(Instant::now() + DEADLINE)
        .unwrap_or_else(|| panic!("{} did not finish within {DEADLINE:?}", running.what));
    CliOutput {
        status,
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    }
}

/// Like [`reaper_cli`], and the command must succeed: its stdout.
pub fn reaper_ok<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let out = reaper_cli(args);
    assert!(
        out.status.success(),
        "reaper failed ({}): {}",
        out.status,
        out.stderr
    );
    out.stdout
}
