//! 2. Throughput and loss, and reaper's CPU per spawned process, accounted.
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::Opts;
use super::daemon::{Daemon, stat_in};
use super::env::{Bins, Scratch};
use super::procfs::proc_identities;
use super::progs::BpfStats;
use super::report::{Report, Row};

pub(super) fn throughput(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(bins, scratch, "throughput", &["--dry-run"])?;
    // The kernel's own accounting of BPF program run time, for this benchmark only.
    let bpf_stats = BpfStats::enable()?;
    let prog_before = daemon.prog_stats()?;
    let before = daemon.stats()?;
    let events_before = stat_in(&before, "events_total")?;
    let lost_before = stat_in(&before, "lost_total")?;
    let cpu_before = daemon.cpu()?;
    let n = opts.parallel_storm.to_string();
    let started = Instant::now();
    let storms: Vec<Child> = (0..opts.parallel)
        .map(|_| {
            Command::new(&bins.helper)
                .args(["storm", &n, "1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a storm")
        })
        .collect::<anyhow::Result<_>>()?;
    for mut storm in storms {
        let st = storm.wait()?;
        if !st.success() {
            bail!("`lifecycle-helper storm {n} 1` failed ({st})");
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let events_after = daemon.barrier()?;
    let prog_after = daemon.prog_stats()?;
    drop(bpf_stats);
    let prog_runs = prog_after.0 - prog_before.0;
    let prog_ns = prog_after.1 - prog_before.1;
    let cpu = daemon.cpu()?.since(&cpu_before);
    let after = daemon.stats()?;
    let lost = stat_in(&after, "lost_total")? - lost_before;
    let events = events_after - events_before;
    let spawned = opts.parallel * opts.parallel_storm;
    report.cpu_per_event = (events > 0).then(|| cpu / events as f64);

    // The tree against /proc, read around it; processes may start or end in between, so a
    // difference is read again a few times before it counts.
    let mut mismatch = usize::MAX;
    let mut attempts = 0;
    let mut detail = String::new();
    while attempts < 10 && mismatch > 0 {
        attempts += 1;
        let proc_before = proc_identities();
        let tree = daemon.tree()?;
        let proc_after = proc_identities();
        // Only processes alive in both reads, or in neither, have one right answer.
        let stable_live: BTreeSet<_> = proc_before.intersection(&proc_after).copied().collect();
        let missing: Vec<_> = stable_live.difference(&tree).copied().collect();
        let extra: Vec<_> = tree
            .iter()
            .filter(|id| !proc_before.contains(id) && !proc_after.contains(id))
            .copied()
            .collect();
        if missing.len() + extra.len() < mismatch {
            mismatch = missing.len() + extra.len();
            detail = format!(
                "{} processes; only in /proc {:?}, only in tree {:?}",
                tree.len(),
                &missing[..missing.len().min(5)],
                &extra[..extra.len().min(5)]
            );
        }
        if mismatch > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    daemon.stop()?;

    let bench = "2 throughput";
    report.row(Row {
        bench,
        metric: format!(
            "events handled, {} × `storm {}` in parallel",
            opts.parallel, opts.parallel_storm
        ),
        result: format!("{:.0} events/s", events as f64 / wall),
        target: String::new(),
        met: None,
        notes: format!(
            "{events} events ({spawned} processes) in {wall:.2} s, bounded by how fast the storms \
             spawn; daemon CPU {:.2} s = {:.1} µs/event, i.e. one core would handle ≈ {:.0} \
             events/s",
            cpu,
            cpu * 1e6 / events.max(1) as f64,
            events as f64 / cpu.max(1e-9)
        ),
    });
    let per_event_us = cpu * 1e6 / events.max(1) as f64;
    report.row(Row {
        bench,
        metric: "daemon CPU per event".to_owned(),
        result: format!("{per_event_us:.2} µs"),
        target: "≤ 0.5 µs".to_owned(),
        met: Some(per_event_us <= 0.5),
        notes: "its threads' run time (schedstat, ns) over the storms, per event applied"
            .to_owned(),
    });
    let kernel_us = prog_ns as f64 / 1e3 / spawned as f64;
    let daemon_us = cpu * 1e6 / spawned as f64;
    let share = report
        .spawn_cpu
        .map(|per| (kernel_us + daemon_us) / (per * 1e6) * 100.0);
    report.row(Row {
        bench,
        metric: "reaper's CPU per spawned process, accounted".to_owned(),
        result: format!(
            "{:.1} µs in the kernel + {:.1} µs in the daemon{}",
            kernel_us,
            daemon_us,
            share.map_or(String::new(), |p| format!(
                " = {p:.1} % of a spawn's own CPU"
            ))
        ),
        target: "≤ 0.5 %".to_owned(),
        met: share.map(|p| p <= 0.5),
        notes: format!(
            "kernel: run_time_ns of the daemon's BPF programs ({prog_runs} runs, {:.0} ns each; \
             kernel.bpf_stats_enabled on for this benchmark only); daemon: its threads' run time \
             (schedstat, ns); a \
             spawn's own CPU: {} µs (benchmark 1, no tracer). Unlike the A/B ratios in 1, this does not \
             drown in the machine's noise",
            prog_ns as f64 / prog_runs.max(1) as f64,
            report
                .spawn_cpu
                .map_or("n/a".to_owned(), |c| format!("{:.0}", c * 1e6))
        ),
    });
    report.row(Row {
        bench,
        metric: "ring-buffer reserve failures (default ring)".to_owned(),
        result: lost.to_string(),
        target: "0".to_owned(),
        met: Some(lost == 0),
        notes: "`lost_total` delta".to_owned(),
    });
    report.row(Row {
        bench,
        metric: "tree vs /proc after the storm".to_owned(),
        result: format!("{mismatch} mismatched"),
        target: "0".to_owned(),
        met: Some(mismatch == 0),
        notes: format!("(pid, start time) sets; {attempts} read(s); {detail}"),
    });
    report.raw(
        "throughput",
        json!({
            "processes": spawned,
            "wall_s": wall,
            "events": events,
            "events_per_s": events as f64 / wall,
            "bpf_prog_runs": prog_runs,
            "bpf_prog_run_time_ns": prog_ns,
            "lost": lost,
            "daemon_cpu_s": cpu,
            "tree_mismatch": mismatch,
            "tree_reads": attempts,
        }),
    );
    Ok(())
}
