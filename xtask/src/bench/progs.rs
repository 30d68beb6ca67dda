//! 6. Per program: reaper's BPF programs against the bench's floor programs, and reaper's
//!    exec program also against the floor that carries its record's content (path and argv).
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use reaper_common::{EXEC_CONTENT_FLOOR, LIFECYCLE_TRACEPOINTS};
use serde_json::{Value, json};

use super::daemon::Daemon;
use super::env::{Bins, Scratch};
use super::procfs::{BpfProgram, bpf_programs};
use super::procs::{Helper, measure};
use super::report::{Report, Row};
use super::{Opts, READY_DEADLINE};

/// `kernel.bpf_stats_enabled` set to 1 (the kernel then times every BPF program run, a few
/// tens of ns each); put back as it was when dropped.
pub(super) struct BpfStats {
    was: Option<String>,
}

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub(super) fn enable() -> anyhow::Result<Self> {
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

/// Runs and run time (ns) of one program, summed over rounds.
#[derive(Clone, Copy, Default)]
struct Tally {
    runs: u64,
    ns: u64,
}

impl Tally {
    fn per_run(self) -> f64 {
        self.ns as f64 / self.runs.max(1) as f64
    }
}

/// Adds each program's counter deltas between `before` and `after` to `into`, by name.
fn tally(into: &mut HashMap<String, Tally>, before: &[BpfProgram], after: &[BpfProgram]) {
    for a in after {
        let b = before.iter().find(|b| b.id == a.id);
        let t = into.entry(a.name.clone()).or_default();
        t.runs += a.run_cnt - b.map_or(0, |b| b.run_cnt);
        t.ns += a.run_time_ns - b.map_or(0, |b| b.run_time_ns);
    }
}

/// Rounds of `prog_spawns` × fork+exec+wait `/bin/true`, in turn with reaper's programs
/// attached (a `--dry-run` daemon), with the floor's (`bench-load floor`) and with the floor's
/// whose exec program carries the record's content (`bench-load floor content`), never two
/// sets at once;
/// the kernel's `run_time_ns / run_cnt` per program (`kernel.bpf_stats_enabled`, on for this
/// benchmark only), read from the fdinfo of the programs each holder has open.
pub(super) fn per_program(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let storm =
        || -> anyhow::Result<()> { measure(bins, &bins.process_storm(opts.prog_spawns)).map(drop) };
    // One turn of `bench-load floor ARGS…`: attach, storm, count, detach.
    let floor_turn = |args: &[&str], into: &mut HashMap<String, Tally>| -> anyhow::Result<()> {
        let mut cmd = Command::new(&bins.load);
        cmd.arg("floor").args(args);
        let mut f = Helper::spawn(cmd, "bench-load floor")?;
        f.read_value("ready", READY_DEADLINE)?;
        let pid = f.pid();
        let before = bpf_programs(pid)?;
        storm()?;
        tally(into, &before, &bpf_programs(pid)?);
        f.finish(Duration::from_secs(30));
        Ok(())
    };
    let stats = BpfStats::enable()?;
    let mut reaper: HashMap<String, Tally> = HashMap::new();
    let mut floor: HashMap<String, Tally> = HashMap::new();
    // The floor again, with exec's record carrying the path and argv (only that program is read).
    let mut content_floor: HashMap<String, Tally> = HashMap::new();
    for round in 0..opts.prog_rounds {
        let mut d = Daemon::start(bins, scratch, "programs", &["--dry-run"])?;
        let before = d.programs()?;
        storm()?;
        d.barrier()?;
        tally(&mut reaper, &before, &d.programs()?);
        d.stop()?;

        floor_turn(&[], &mut floor)?;
        floor_turn(&["content"], &mut content_floor)?;
        println!(
            "xtask: bench: program round {}: reaper, floor and exec's content floor, {} spawns \
             each",
            round + 1,
            opts.prog_spawns
        );
    }
    drop(stats);

    let bench = "6 per program";
    let mut raw = serde_json::Map::new();
    for (i, tracepoint) in LIFECYCLE_TRACEPOINTS.into_iter().enumerate() {
        let ours = reaper.get(tracepoint).copied().unwrap_or_default();
        let low = floor
            .get(&format!("floor_{tracepoint}"))
            .copied()
            .unwrap_or_default();
        if ours.runs == 0 || low.runs == 0 {
            bail!(
                "no runs counted for {tracepoint} (reaper {}, floor {}): is \
                 kernel.bpf_stats_enabled honoured here?",
                ours.runs,
                low.runs
            );
        }
        let ratio = ours.per_run() / low.per_run();
        // What bounds exec: the floor that carries the record's content, where there is one.
        let content = (tracepoint == "sched_process_exec")
            .then(|| {
                content_floor
                    .get(EXEC_CONTENT_FLOOR)
                    .copied()
                    .unwrap_or_default()
            })
            .filter(|c| c.runs > 0);
        let targeted = tracepoint != "task_rename";
        let mut result = format!(
            "reaper {:.0} ns, floor {:.0} ns: {ratio:.1}×",
            ours.per_run(),
            low.per_run()
        );
        if let Some(c) = content {
            result += &format!(
                "; floor with a candidate's record content (path + argv) {:.0} ns: {:.1}×",
                c.per_run(),
                ours.per_run() / c.per_run()
            );
        }
        let runs = match content {
            Some(c) => format!("{}, {} and {} runs", ours.runs, low.runs, c.runs),
            None => format!("{} and {} runs", ours.runs, low.runs),
        };
        report.row(Row {
            bench,
            metric: format!("`{tracepoint}`, ns per run"),
            result,
            target: if targeted {
                "≤ 2× the floor".to_owned()
            } else {
                String::new()
            },
            met: targeted.then_some(ratio <= 2.0),
            notes: if i == 0 {
                format!(
                    "{} round(s) of {} × fork+exec+wait `/bin/true`, reaper's programs, the \
                     floor's (reaper-ebpf/src/floor.rs: reserve and submit a {}-byte header, \
                     nothing else) and the floor's again with an exec program that copies the \
                     path and argv into the record as reaper's does (the same code) and outputs \
                     it, attached in turn (reaper's exec record carries the path and argv only \
                     for a process named as a rule's `comm` or watched (a target or its \
                     descendant); the storm's `/bin/true` is neither, so reaper sends the \
                     record's head alone, without a time, while the content floor copies the \
                     path and argv for every exec); \
                     `run_time_ns / run_cnt` with kernel.bpf_stats_enabled on for this \
                     benchmark only; {runs} (the rest of the host's count too)",
                    opts.prog_rounds,
                    opts.prog_spawns,
                    size_of::<reaper_common::Header>(),
                )
            } else {
                runs
            },
        });
        let mut counts = json!({
            "reaper_runs": ours.runs,
            "reaper_run_time_ns": ours.ns,
            "floor_runs": low.runs,
            "floor_run_time_ns": low.ns,
        });
        if let Some(c) = content {
            counts["content_floor_runs"] = json!(c.runs);
            counts["content_floor_run_time_ns"] = json!(c.ns);
        }
        raw.insert(tracepoint.to_owned(), counts);
    }
    report.raw("per_program", Value::Object(raw));
    Ok(())
}
