//! Processes the bench starts: waiting for, signalling and stopping them (by pid), and the
//! helpers that report `key=value` lines.
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::POLL;
use super::env::Bins;
use crate::cmd::{describe, output};

/// Sends `signal` to one process we started.
pub(super) fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` until `within`; then SIGKILLs it. True if it ended by itself.
pub(super) fn wait_or_kill(child: &mut Child, within: Duration) -> bool {
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
pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A helper that prints `key=value` lines and ends when its stdin closes.
pub(super) struct Helper {
    pub(super) child: Option<Child>,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) lines: mpsc::Receiver<String>,
    pub(super) what: String,
}

impl Helper {
    pub(super) fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
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
    pub(super) fn read_until(
        &mut self,
        until: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<String>> {
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
    pub(super) fn read_value(&mut self, key: &str, within: Duration) -> anyhow::Result<String> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Closes stdin and waits for the helper to end (then SIGKILL).
    pub(super) fn finish(&mut self, within: Duration) {
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
pub(super) struct Usage {
    pub(super) wall: f64,
    pub(super) cpu: f64,
    /// The tracer's own CPU seconds meanwhile (spawn-storm benchmark).
    pub(super) tracer_cpu: f64,
}

pub(super) fn measure(bins: &Bins, args: &[OsString]) -> anyhow::Result<Usage> {
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
