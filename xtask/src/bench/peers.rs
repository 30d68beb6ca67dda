//! The other tools an operator would run instead of reaper, each started and stopped by the
//! bench, by pid: bpftrace (`bench/execsnoop.bt`), bcc's `execsnoop` + `exitsnoop`, auditd with
//! an execve rule, and `prometheus-process-exporter` polling `/proc`.
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::READY_DEADLINE;
use super::daemon::free_port;
use super::env::{Bins, Scratch};
use super::procfs::{CpuSample, pids, stat_fields};
use super::procs::{send_signal, tail, wait_or_kill};
use crate::cmd::{describe, output};

/// The peers, in the order they run in each round after no tracer and reaper.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Peer {
    Bpftrace,
    Bcc,
    Auditd,
    ProcessExporter,
}

impl Peer {
    pub(super) const ALL: [Self; 4] = [
        Self::Bpftrace,
        Self::Bcc,
        Self::Auditd,
        Self::ProcessExporter,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Bpftrace => "bpftrace",
            Self::Bcc => "bcc execsnoop + exitsnoop",
            Self::Auditd => "auditd, execve rule",
            Self::ProcessExporter => "process-exporter",
        }
    }

    /// Starts the tool and returns once it traces (or serves).
    pub(super) fn start(self, bins: &Bins, scratch: &Scratch) -> anyhow::Result<Running> {
        Ok(match self {
            Self::Bpftrace => {
                let mut cmd = Command::new("bpftrace");
                cmd.arg(&bins.script);
                Running::Snoopers(vec![Snooper::start(cmd, "bpftrace", scratch)?])
            }
            Self::Bcc => {
                // Both print a line per event (exec, exit), as the bpftrace script does.
                let exec = Snooper::start(Command::new("execsnoop-bpfcc"), "execsnoop", scratch)?;
                let exit = Snooper::start(Command::new("exitsnoop-bpfcc"), "exitsnoop", scratch)?;
                Running::Snoopers(vec![exec, exit])
            }
            Self::Auditd => Running::Auditd(Auditd::start(scratch)?),
            Self::ProcessExporter => {
                Running::Exporter(ProcessExporter::start(scratch, EXPORTER_SCRAPE)?)
            }
        })
    }
}

/// How often process-exporter is scraped: it reads `/proc` on each scrape and not otherwise.
/// 15 s is the `scrape_interval` of Prometheus's example configuration (its built-in default
/// is 1 min): <https://prometheus.io/docs/prometheus/latest/getting_started/>.
pub(super) const EXPORTER_SCRAPE: Duration = Duration::from_secs(15);

/// A peer while it runs.
pub(super) enum Running {
    Snoopers(Vec<Snooper>),
    Auditd(Auditd),
    Exporter(ProcessExporter),
}

impl Running {
    /// The processes whose CPU is the tool's (for auditd also the kernel's `kauditd` thread,
    /// which hands each record to it).
    pub(super) fn pids(&self) -> Vec<u32> {
        match self {
            Self::Snoopers(s) => s.iter().map(|s| s.pid).collect(),
            Self::Auditd(a) => [a.pid].into_iter().chain(a.kauditd).collect(),
            Self::Exporter(e) => vec![e.pid],
        }
    }

    /// The tool's CPU seconds over `wall` seconds where it is better taken from its rate than
    /// measured: process-exporter works only when scraped, every 15 s, so a few-second storm
    /// holds one scrape or none; its cost is one scrape's CPU × `wall` / interval.
    pub(super) fn amortized(&self, wall: f64) -> Option<f64> {
        match self {
            Self::Exporter(e) => Some(e.scrape_cpu * wall / EXPORTER_SCRAPE.as_secs_f64()),
            _ => None,
        }
    }

    /// Returns once the tool has handled what was traced before this call, where it can say.
    pub(super) fn barrier(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Snoopers(s) => s.iter().try_for_each(Snooper::barrier),
            Self::Auditd(a) => a.barrier(),
            Self::Exporter(_) => Ok(()),
        }
    }

    pub(super) fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Snoopers(s) => {
                for mut s in s {
                    let _ = s.stop();
                }
                Ok(())
            }
            Self::Auditd(mut a) => a.stop(),
            Self::Exporter(mut e) => {
                e.stop();
                Ok(())
            }
        }
    }
}

/// The one sentence of a failed start that says why: the first line naming an error, else the
/// last line.
pub(super) fn reason(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = ["unable", "error:", "cannot", "fail"]
        .iter()
        .find_map(|word| lines.iter().find(|l| l.to_lowercase().contains(word)))
        .or(lines.last())
        .copied()
        .unwrap_or("unknown error");
    pick.chars().take(300).collect()
}

/// A marker program: a symlink to `/bin/true` named uniquely for this run (its comm, ≤ 15
/// bytes), exec'd to see a tracer's output catch up.
fn marker(scratch: &Scratch) -> anyhow::Result<(String, PathBuf)> {
    let name = format!("rb-mk-{}", scratch.tag);
    let path = scratch.symlink(&name, Path::new("/bin/true"))?;
    Ok((name, path))
}

/// A tool that prints a line per traced event, its output drained (to nothing), as an
/// operator's terminal or log would take it.
pub(super) struct Snooper {
    child: Option<Child>,
    pid: u32,
    name: &'static str,
    log: PathBuf,
    drain: Option<JoinHandle<Vec<String>>>,
    marker: PathBuf,
    seen: mpsc::Receiver<()>,
}

impl Snooper {
    /// Starts `cmd` and waits until it prints the marker program's exec or exit (so every
    /// probe is attached: a BEGIN may run before the others are).
    fn start(mut cmd: Command, name: &'static str, scratch: &Scratch) -> anyhow::Result<Self> {
        let log = scratch.path(&format!("{name}.log"));
        let (marker_name, marker) = marker(scratch)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("the tracer's stdout")?;
        let (seen_tx, seen) = mpsc::channel();
        // Reads (and drops) everything the tool prints, reporting each marker line; returns
        // the first lines (where a tool that cannot start says why: bcc prints it on stdout).
        let drain = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut first = Vec::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return first,
                    Ok(_) if line.contains(&marker_name) => {
                        let _ = seen_tx.send(());
                    }
                    Ok(_) if first.len() < 20 => first.push(line.trim_end().to_owned()),
                    Ok(_) => {}
                }
            }
        });
        let mut tracer = Self {
            child: Some(child),
            pid,
            name,
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
                    let printed = tracer.stop();
                    bail!(
                        "{name} ended before tracing:\n{}\n{}",
                        printed.join("\n"),
                        tail(&tracer.log, 20)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    let _ = tracer.stop();
                    bail!(
                        "{name} did not trace an exec within {READY_DEADLINE:?}:\n{}",
                        tail(&tracer.log, 20)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Returns once the tool has printed everything traced before this call: execs the marker
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
                    bail!("{} ended:\n{}", self.name, tail(&self.log, 20))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("{} printed no marker within {READY_DEADLINE:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Stops the tool; returns the first lines it printed.
    fn stop(&mut self) -> Vec<String> {
        if let Some(mut child) = self.child.take() {
            send_signal(self.pid, "INT");
            wait_or_kill(&mut child, Duration::from_secs(15));
        }
        self.drain
            .take()
            .and_then(|d| d.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Snooper {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// auditd with one execve rule, for the run only. Its log goes to the scratch directory; the
/// rule, the kernel's audit `enabled` flag and the daemon are put back as found when stopped.
pub(super) struct Auditd {
    child: Option<Child>,
    pid: u32,
    /// The kernel thread that sends audit records to auditd.
    kauditd: Option<u32>,
    log: PathBuf,
    audit_log: PathBuf,
    /// How far into the audit log the last barrier read.
    read_to: u64,
    marker: (String, PathBuf),
    rule_added: bool,
    /// `auditctl -s`'s `enabled` before the run, put back after.
    was_enabled: Option<String>,
}

/// The rule, as `auditctl -a` takes it (and `-d` removes it).
const AUDIT_RULE: [&str; 7] = [
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "execve",
    "-k",
    "reaper-bench",
];

fn auditctl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("auditctl");
    cmd.args(args);
    output(&mut cmd)
}

/// A value of `auditctl -s` (`enabled 0`, `pid 0`, …).
fn audit_status(key: &str) -> anyhow::Result<String> {
    let text = auditctl(&["-s"])?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no `{key}` in `auditctl -s`"))
}

impl Auditd {
    fn start(scratch: &Scratch) -> anyhow::Result<Self> {
        let running = audit_status("pid")?;
        if running != "0" {
            bail!("an auditd already runs (pid {running}); the bench leaves it alone");
        }
        let was_enabled = audit_status("enabled")?;
        let dir = scratch.path("audit");
        std::fs::create_dir_all(&dir)?;
        let audit_log = dir.join("audit.log");
        // auditd.conf(5); the disk actions are IGNORE so a full scratch disk cannot suspend
        // auditing or halt the machine.
        scratch.write_private(
            "audit/auditd.conf",
            &format!(
                "log_file = {}\nlog_format = ENRICHED\nflush = INCREMENTAL_ASYNC\nfreq = 50\n\
                 max_log_file = 200\nmax_log_file_action = ROTATE\nnum_logs = 2\n\
                 space_left = 75\nspace_left_action = IGNORE\nadmin_space_left = 50\n\
                 admin_space_left_action = IGNORE\ndisk_full_action = IGNORE\n\
                 disk_error_action = IGNORE\n",
                audit_log.display()
            ),
        )?;
        let log = scratch.path("auditd.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("auditd");
        cmd.arg("-n")
            .arg("-c")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let mut me = Self {
            pid: child.id(),
            child: Some(child),
            kauditd: kernel_thread("kauditd"),
            log,
            audit_log,
            read_to: 0,
            marker: marker(scratch)?,
            rule_added: false,
            was_enabled: Some(was_enabled),
        };
        let deadline = Instant::now() + READY_DEADLINE;
        while audit_status("pid")? != me.pid.to_string() {
            if let Some(child) = me.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                me.child = None;
                let _ = me.stop();
                bail!("auditd exited ({st}):\n{}", tail(&me.log, 10));
            }
            if Instant::now() > deadline {
                let _ = me.stop();
                bail!("auditd did not register with the kernel within {READY_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        auditctl(&["-e", "1"])?;
        let mut add = vec!["-a"];
        add.extend(AUDIT_RULE);
        auditctl(&add)?;
        me.rule_added = true;
        me.barrier()?;
        Ok(me)
    }

    /// Returns once auditd has written the execve record of a marker exec'd now.
    fn barrier(&mut self) -> anyhow::Result<()> {
        let needle = format!("comm=\"{}\"", self.marker.0);
        let _ = Command::new(&self.marker.1).status();
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(mut f) = std::fs::File::open(&self.audit_log) {
                f.seek(SeekFrom::Start(self.read_to))?;
                let mut text = String::new();
                // Records are whole lines; read whole ones only.
                let _ = f.read_to_string(&mut text);
                if let Some(end) = text.rfind('\n') {
                    let found = text[..end].contains(&needle);
                    self.read_to += end as u64 + 1;
                    if found {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("auditd logged no execve of the marker within {READY_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        if self.rule_added {
            let mut del = vec!["-d"];
            del.extend(AUDIT_RULE);
            result = auditctl(&del).map(drop);
            self.rule_added = false;
        }
        if let Some(was) = self.was_enabled.take() {
            let restored = auditctl(&["-e", &was]).map(drop);
            result = result.and(restored);
        }
        if let Some(mut child) = self.child.take() {
            send_signal(self.pid, "TERM");
            wait_or_kill(&mut child, Duration::from_secs(15));
        }
        result.context("putting the audit rules and flag back")
    }
}

impl Drop for Auditd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The pid of a kernel thread (a child of kthreadd, pid 2) by its comm.
fn kernel_thread(comm: &str) -> Option<u32> {
    pids().find(|&pid| {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // stat_fields()[1] is field 4, the parent's pid.
        name.trim_end() == comm && stat_fields(pid).is_some_and(|f| f[1] == "2")
    })
}

/// `prometheus-process-exporter` configured to follow every process with a command line (as
/// reaper follows every process), scraped every `interval` by a thread of the bench.
pub(super) struct ProcessExporter {
    child: Option<Child>,
    pub(super) pid: u32,
    stop: Arc<AtomicBool>,
    scraper: Option<JoinHandle<u64>>,
    /// Scrapes done, once stopped.
    pub(super) scrapes: u64,
    /// CPU seconds of one scrape, measured at start.
    pub(super) scrape_cpu: f64,
}

impl ProcessExporter {
    pub(super) fn start(scratch: &Scratch, interval: Duration) -> anyhow::Result<Self> {
        // One group per comm, every process matched: the configuration its README gives for
        // "all processes".
        let config = scratch.write_private(
            "process-exporter.yml",
            "process_names:\n  - name: \"{{.Comm}}\"\n    cmdline:\n    - '.+'\n",
        )?;
        let port = free_port()?;
        let log = scratch.path("process-exporter.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("prometheus-process-exporter");
        cmd.arg("-config.path")
            .arg(&config)
            .args(["-web.listen-address", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let pid = child.id();
        let deadline = Instant::now() + READY_DEADLINE;
        // The first scrape, as a Prometheus would make on finding it.
        while scrape(port).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                bail!("process-exporter exited ({st}):\n{}", tail(&log, 10));
            }
            if Instant::now() > deadline {
                send_signal(pid, "TERM");
                wait_or_kill(&mut child, Duration::from_secs(15));
                bail!("process-exporter did not serve /metrics within {READY_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // One more scrape, timed: its CPU, spread over the interval, is what a spawn storm pays.
        let before = CpuSample::read(pid)?;
        scrape(port)?;
        let scrape_cpu = CpuSample::read(pid)?.since(&before);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let scraper = std::thread::spawn(move || {
            let mut scrapes = 1;
            let mut next = Instant::now() + interval;
            while !flag.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    if scrape(port).is_ok() {
                        scrapes += 1;
                    }
                    next += interval;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            scrapes
        });
        Ok(Self {
            child: Some(child),
            pid,
            stop,
            scraper: Some(scraper),
            scrapes: 0,
            scrape_cpu,
        })
    }

    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(scraper) = self.scraper.take() {
            self.scrapes = scraper.join().unwrap_or(0);
        }
        if let Some(mut child) = self.child.take() {
            send_signal(self.pid, "TERM");
            wait_or_kill(&mut child, Duration::from_secs(15));
        }
    }
}

impl Drop for ProcessExporter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET /metrics` on loopback; Ok once a 200 answer has been read to its end.
fn scrape(port: u16) -> anyhow::Result<()> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.0 200") && !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "process-exporter answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_is_the_line_that_says_why() {
        let err = anyhow::anyhow!(
            "execsnoop ended before tracing:\nUnable to find kernel headers. Try rebuilding.\n\
             sh: 1: modprobe: not found\nTraceback (most recent call last):\n\
             raise Exception(\"Failed to compile BPF module\")"
        );
        assert_eq!(
            reason(&err),
            "Unable to find kernel headers. Try rebuilding."
        );
        let plain = anyhow::anyhow!("first\nlast words");
        assert_eq!(reason(&plain), "last words");
    }
}
