//! What the bench reads from `/proc`: CPU time (schedstat and ticks), memory, process
//! identities, and BPF programs (whose, and their run counters).
use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use anyhow::Context as _;

/// CPU time (user + system, all threads, live and dead) of a process, in seconds.
/// A process's CPU time, read two ways: each thread's `sum_exec_runtime` (ns, the first field
/// of `/proc/PID/task/TID/schedstat`) and utime+stime (clock ticks, 10 ms: ±20 % on the
/// 0.05 s a daemon spends over a 20,000-process storm).
#[derive(Debug, Clone)]
pub(super) struct CpuSample {
    threads: Option<std::collections::HashMap<u32, u64>>,
    ticks_secs: f64,
}

impl CpuSample {
    pub(super) fn read(pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            threads: thread_runtimes(pid),
            ticks_secs: cpu_seconds(pid)?,
        })
    }

    /// Seconds of CPU since `before`: from the threads' ns counters when every thread seen
    /// then is still there (a thread that ended took its counter along), else from ticks.
    pub(super) fn since(&self, before: &Self) -> f64 {
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
pub(super) fn thread_runtimes(pid: u32) -> Option<std::collections::HashMap<u32, u64>> {
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

pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// The fields of `/proc/PID/stat` after `comm`: index 0 is field 3 (state).
pub(super) fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(") ")?;
    let fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    (fields.len() > 19).then_some(fields)
}

pub(super) fn clock_ticks() -> u64 {
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
pub(super) fn status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// The pids in `/proc` now.
pub(super) fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// Every live (not zombie) process in `/proc`, as (pid, start time in ticks).
pub(super) fn proc_identities() -> BTreeSet<(u32, u64)> {
    let mut out = BTreeSet::new();
    for pid in pids() {
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
/// reaper, a test harness, a bpftrace, the bench's floor): they would tax the storms too.
/// Program names come from `/proc/kallsyms` ([`bpf_prog_names`]), holders from
/// `/proc/PID/fdinfo` (`prog_tag`).
pub(super) fn foreign_tracers(ours: &[u32]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let names = bpf_prog_names();
    let tags: BTreeSet<&str> = names
        .iter()
        .filter(|(_, name)| {
            reaper_common::LIFECYCLE_TRACEPOINTS
                .iter()
                .any(|tp| name.contains(tp))
        })
        .map(|(tag, _)| tag.as_str())
        .collect();
    if tags.is_empty() {
        return found;
    }
    let me = std::process::id();
    for pid in pids() {
        if pid == me || ours.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
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

/// Every loaded BPF program's name by its tag, from `/proc/kallsyms`, where the kernel names
/// each `bpf_prog_<tag>_<name>` (the function's name from BTF when the object has it:
/// `bpf_get_prog_name`, <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/core.c>).
/// Identical programs share a tag, and so a name.
pub(super) fn bpf_prog_names() -> HashMap<String, String> {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    prog_names_in(&kallsyms)
}

/// [`bpf_prog_names`] of a `/proc/kallsyms` text.
fn prog_names_in(kallsyms: &str) -> HashMap<String, String> {
    kallsyms
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.strip_prefix("bpf_prog_"))
        .filter_map(|sym| {
            let (tag, name) = sym.split_at_checked(16)?;
            Some((tag.to_owned(), name.strip_prefix('_')?.to_owned()))
        })
        .collect()
}

/// One BPF program a process holds, with the kernel's counters (`run_cnt`, `run_time_ns` only
/// advance while `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Debug)]
pub(super) struct BpfProgram {
    pub(super) id: u64,
    /// From `/proc/kallsyms`; empty where the kernel does not list it.
    pub(super) name: String,
    pub(super) run_cnt: u64,
    pub(super) run_time_ns: u64,
}

/// The BPF programs `pid` holds a file descriptor of, each once, from `/proc/PID/fdinfo`
/// (`prog_id`, `prog_tag`, `run_cnt`, `run_time_ns`: `bpf_prog_show_fdinfo`,
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/syscall.c>).
pub(super) fn bpf_programs(pid: u32) -> anyhow::Result<Vec<BpfProgram>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let names = bpf_prog_names();
    let mut out: Vec<BpfProgram> = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if !text.contains("prog_type:") {
            continue;
        }
        let field = |key: &str| -> Option<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        let number = |key: &str| -> u64 { field(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let id = number("prog_id:");
        if out.iter().any(|p| p.id == id) {
            continue;
        }
        out.push(BpfProgram {
            id,
            name: field("prog_tag:")
                .and_then(|tag| names.get(tag))
                .cloned()
                .unwrap_or_default(),
            run_cnt: number("run_cnt:"),
            run_time_ns: number("run_time_ns:"),
        });
    }
    Ok(out)
}

/// Where a process's memory is, in kB, from `/proc/PID/smaps`.
pub(super) struct MemoryBreakdown {
    /// RSS of BPF map mappings (the ring buffer's data pages are mapped twice).
    pub(super) bpf_map_kb: u64,
    pub(super) heap_kb: u64,
    /// Proportional set size: each page shared by n mappings counts 1/n.
    pub(super) pss_kb: u64,
}

pub(super) fn memory_breakdown(pid: u32) -> anyhow::Result<MemoryBreakdown> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut m = MemoryBreakdown {
        bpf_map_kb: 0,
        heap_kb: 0,
        pss_kb: 0,
    };
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
            "Rss:" if current == "anon_inode:bpf-map" => m.bpf_map_kb += kb,
            "Rss:" if current == "[heap]" => m.heap_kb += kb,
            "Pss:" => m.pss_kb += kb,
            _ => {}
        }
    }
    Ok(m)
}

/// CPU samples of several processes (a tool of several processes, or none).
pub(super) fn cpu_of(pids: &[u32]) -> anyhow::Result<Vec<CpuSample>> {
    pids.iter().map(|&pid| CpuSample::read(pid)).collect()
}

/// Seconds of CPU the processes of `before` spent until `after` (the same pids, in order).
pub(super) fn cpu_since(after: &[CpuSample], before: &[CpuSample]) -> f64 {
    after
        .iter()
        .zip(before)
        .fold(0.0, |sum, (a, b)| sum + a.since(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_by_tag() {
        let text = "ffffffffc0012345 t bpf_prog_6deef7357e7b4530_sched_process_fork	[bpf]\n\
                    ffffffffc0023456 t bpf_prog_0123456789abcdef_floor_task_rename	[bpf]\n\
                    ffffffff81000000 T _stext\n\
                    ffffffffc0034567 t bpf_prog_short	[bpf]\n";
        let names = prog_names_in(text);
        assert_eq!(
            names.get("6deef7357e7b4530").map(String::as_str),
            Some("sched_process_fork")
        );
        assert_eq!(
            names.get("0123456789abcdef").map(String::as_str),
            Some("floor_task_rename")
        );
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
