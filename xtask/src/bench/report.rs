//! The report: the machine, one table (markdown) and every raw sample (JSON).
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Opts;
use crate::Ctx;

#[derive(Serialize)]
pub(super) struct Machine {
    date: String,
    commit: String,
    #[serde(rename = "cpu_model")]
    pub(super) cpu: String,
    pub(super) nproc: usize,
    pub(super) memory: String,
    pub(super) kernel: String,
    os: String,
    #[serde(rename = "loadavg_at_start")]
    pub(super) loadavg: String,
    pid_max: String,
}

impl Machine {
    pub(super) fn read(ctx: &Ctx) -> Self {
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
}

#[derive(Serialize)]
pub(super) struct Row {
    #[serde(rename = "benchmark")]
    pub(super) bench: &'static str,
    #[serde(rename = "measured")]
    pub(super) metric: String,
    pub(super) result: String,
    pub(super) target: String,
    /// Whether the target was met (None: no target).
    pub(super) met: Option<bool>,
    pub(super) notes: String,
}

#[derive(Default)]
pub(super) struct Report {
    rows: Vec<Row>,
    /// Every raw sample, by benchmark.
    raw: Map<String, Value>,
    /// The daemon's CPU seconds per event in the throughput benchmark.
    pub(super) cpu_per_event: Option<f64>,
    /// CPU seconds of one fork+exec+wait of `/bin/true` with no tracer (median, benchmark 1).
    pub(super) spawn_cpu: Option<f64>,
}

impl Report {
    pub(super) fn row(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub(super) fn raw(&mut self, benchmark: &str, samples: Value) {
        self.raw.insert(benchmark.to_owned(), samples);
    }

    pub(super) fn sorted_rows(&self) -> Vec<&Row> {
        // Benchmarks ran in another order than they are numbered; the table follows the numbers.
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.bench);
        rows
    }

    pub(super) fn markdown(&self, m: &Machine, elapsed: Duration) -> String {
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
             its threads' run time from `/proc/PID/task/*/schedstat` (ns; utime+stime, 10 ms ticks, \
             where a thread ended meanwhile; for auditd also the kernel's kauditd thread). No \
             tracer, reaper and each peer that runs here (bpftrace with `bench/execsnoop.bt`, \
             bcc's execsnoop + exitsnoop, auditd with an execve rule, process-exporter scraped \
             every 15 s) alternate round by round and each overhead is the median of per-round \
             ratios. \
             Every daemon runs `--dry-run` with the built-in rule, except the reap-latency one, \
             whose rule only matches children of this run's agent. Other developers' builds, \
             tests (and their own reaper daemons) share the machine, so wall times are noisy: \
             compare within a round, not across runs."
        );
        s
    }

    pub(super) fn json(&self, m: &Machine, elapsed: Duration, opts: &Opts) -> String {
        let doc = json!({
            "machine": m,
            "duration_s": elapsed.as_secs_f64().round(),
            "parameters": opts,
            "rows": self.sorted_rows(),
            "raw": self.raw,
        });
        let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
        out.push('\n');
        out
    }
}

pub(super) fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}
