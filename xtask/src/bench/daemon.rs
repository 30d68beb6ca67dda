//! A `reaper run` the bench started, and what it asks of it (`stats`, `tree`, `explain`).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::Value;

use super::env::{Bins, Scratch};
use super::procfs::{BpfProgram, CpuSample, MemoryBreakdown, bpf_programs, memory_breakdown};
use super::procs::{Helper, send_signal, tail, wait_or_kill};
use super::{POLL, READY_DEADLINE};
use crate::cmd::describe;

/// A port nobody listens on now, for a daemon's metrics endpoint.
pub(super) fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(listener.local_addr()?.port())
}

/// A `reaper run` we started; stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Daemon {
    pub(super) child: Option<Child>,
    pub(super) pid: u32,
    pub(super) socket: PathBuf,
    pub(super) log: PathBuf,
    pub(super) reaper: PathBuf,
    pub(super) helper: PathBuf,
    pub(super) spawned: Instant,
    /// Spawn → first answer of `reaper stats`.
    pub(super) ready_after: Option<Duration>,
}

impl Daemon {
    /// Starts `reaper --log-format json run --socket … --metrics-addr … ARGS` and waits until
    /// it answers `reaper stats`.
    pub(super) fn start(
        bins: &Bins,
        scratch: &Scratch,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
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

    pub(super) fn wait_ready(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn try_stats(&self) -> Option<Value> {
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
        serde_json::from_slice(&out.stdout).ok()
    }

    pub(super) fn stats(&self) -> anyhow::Result<Value> {
        self.try_stats()
            .with_context(|| format!("`reaper stats --socket {}` failed", self.socket.display()))
    }

    pub(super) fn stat_u64(&self, key: &str) -> anyhow::Result<u64> {
        stat_in(&self.stats()?, key)
    }

    /// `(pid, start_ticks)` of every process in the daemon's tree, less the `reaper tree`
    /// client that asked (alive while the daemon answered, gone by the next `/proc` read).
    pub(super) fn tree(&self) -> anyhow::Result<BTreeSet<(u32, u64)>> {
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
        let tree: Vec<TreeProcess> =
            serde_json::from_slice(&out.stdout).context("`reaper tree --json`")?;
        let ids = tree.into_iter().map(|p| (p.id.pid, p.id.start_ticks));
        Ok(ids.into_iter().filter(|&(pid, _)| pid != client).collect())
    }

    /// The daemon's BPF programs and their counters.
    pub(super) fn programs(&self) -> anyhow::Result<Vec<BpfProgram>> {
        bpf_programs(self.pid)
    }

    /// Runs and run time (ns) summed over the daemon's BPF programs (counted while
    /// `kernel.bpf_stats_enabled` is 1).
    pub(super) fn prog_stats(&self) -> anyhow::Result<(u64, u64)> {
        Ok(self
            .programs()?
            .iter()
            .fold((0, 0), |(n, ns), p| (n + p.run_cnt, ns + p.run_time_ns)))
    }

    pub(super) fn memory_breakdown(&self) -> anyhow::Result<MemoryBreakdown> {
        memory_breakdown(self.pid)
    }

    /// Returns once the daemon has applied every event the kernel emitted before this call:
    /// it starts a marker process and waits until the daemon's tree holds it, exec'd (one ring
    /// buffer, applied in order). Then returns `events_total`.
    pub(super) fn barrier(&self) -> anyhow::Result<u64> {
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
                && serde_json::from_slice::<Explained>(&out.stdout)
                    .is_ok_and(|e| e.process.comm == comm);
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
    pub(super) fn logged_ready_ms(&self) -> Option<f64> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines().find_map(|line| {
            let LogLine { fields } = serde_json::from_str(line).ok()?;
            (fields.message == "process tree ready").then_some(fields.elapsed_ms?)
        })
    }

    pub(super) fn cpu(&self) -> anyhow::Result<CpuSample> {
        CpuSample::read(self.pid)
    }

    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
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

/// A count in an answer of `reaper stats --json`.
pub(super) fn stat_in(stats: &Value, key: &str) -> anyhow::Result<u64> {
    stats
        .get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no {key} in `reaper stats`"))
}

/// What the bench reads of `reaper tree --json`: each process's identity.
#[derive(Deserialize)]
pub(super) struct TreeProcess {
    id: TreeId,
}

#[derive(Deserialize)]
pub(super) struct TreeId {
    pid: u32,
    start_ticks: u64,
}

/// What the bench reads of `reaper explain PID --json`.
#[derive(Deserialize)]
pub(super) struct Explained {
    process: ExplainedProcess,
}

#[derive(Deserialize)]
pub(super) struct ExplainedProcess {
    comm: String,
}

/// A line of the daemon's JSON log (`--log-format json`), as far as the bench reads it.
#[derive(Deserialize)]
pub(super) struct LogLine {
    fields: LogFields,
}

#[derive(Deserialize)]
pub(super) struct LogFields {
    #[serde(default)]
    message: String,
    elapsed_ms: Option<f64>,
}
