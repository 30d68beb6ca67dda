//! 4–5. Footprint (RSS and CPU with 10,000 parked processes; CPU on a quiet host) and start-up.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use super::daemon::Daemon;
use super::env::{Bins, Scratch};
use super::peers::{EXPORTER_SCRAPE, ProcessExporter, reason};
use super::procfs::CpuSample;
use super::procfs::{proc_identities, status_kb};
use super::procs::Helper;
use super::reap::start_agent;
use super::report::{Report, Row};
use super::stats::{median, spread};
use super::{Opts, READY_DEADLINE};

pub(super) struct Startup {
    ready: Vec<f64>,
    logged: Vec<f64>,
    processes: u64,
}

/// `count` start-ups (each stopped before the next); the last daemon is returned running.
pub(super) fn startups(
    bins: &Bins,
    scratch: &Scratch,
    count: usize,
    name: &str,
) -> anyhow::Result<(Startup, Daemon)> {
    let mut out = Startup {
        ready: Vec::new(),
        logged: Vec::new(),
        processes: 0,
    };
    let mut last = None;
    for i in 0..count.max(1) {
        if let Some(mut d) = last.take() {
            Daemon::stop(&mut d)?;
        }
        let d = Daemon::start(bins, scratch, &format!("{name}-{i}"), &["--dry-run"])?;
        out.ready
            .push(d.ready_after.unwrap_or_default().as_secs_f64());
        if let Some(ms) = d.logged_ready_ms() {
            out.logged.push(ms / 1e3);
        }
        out.processes = d.stat_u64("processes")?;
        last = Some(d);
    }
    Ok((out, last.expect("at least one start-up")))
}

pub(super) fn startup_and_footprint(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (host, mut d) = startups(bins, scratch, opts.startups, "startup-host")?;
    d.stop()?;

    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let live = proc_identities().len();
    if live + opts.park + 1000 > pid_max {
        bail!(
            "cannot park {} processes: {live} exist and pid_max is {pid_max} \
             (raise /proc/sys/kernel/pid_max)",
            opts.park
        );
    }
    let mut cmd = Command::new(&bins.load);
    cmd.args(["park", &opts.park.to_string()]);
    let mut park = Helper::spawn(cmd, "bench-load park")?;
    park.read_until("ready", Duration::from_secs(120))?;
    println!(
        "xtask: bench: parked {} processes (pid {})",
        opts.park,
        park.pid()
    );

    let (parked, mut d) = startups(bins, scratch, opts.startups, "startup-parked")?;
    // Footprint with the parked processes tracked: RSS now, CPU over the window (which holds
    // one periodic /proc reconcile at the default 60 s interval), RSS and peak after.
    let tracked = d.stat_u64("processes")?;
    if tracked < opts.park as u64 {
        bail!(
            "the daemon tracks {tracked} processes, fewer than the {} parked",
            opts.park
        );
    }
    let rss_start = status_kb(d.pid, "VmRSS")?;
    println!(
        "xtask: bench: measuring the daemon with {tracked} processes tracked for {} s",
        opts.window_secs
    );
    let w = CpuWindow::measure(&d, opts.window_secs)?;
    let rss_end = status_kb(d.pid, "VmRSS")?;
    let hwm = status_kb(d.pid, "VmHWM")?;
    let super::procfs::MemoryBreakdown {
        bpf_map_kb: ring_kb,
        heap_kb,
        pss_kb,
    } = d.memory_breakdown()?;
    d.stop()?;
    // process-exporter beside it, over a window as long, with the same processes parked.
    println!(
        "xtask: bench: measuring process-exporter with the parked processes for {} s",
        opts.window_secs
    );
    let exporter = exporter_footprint(scratch, opts.window_secs);
    park.finish(Duration::from_secs(60));

    let bench5 = "5 start-up";
    for (label, s) in [
        ("host as it is", &host),
        ("with the parked processes", &parked),
    ] {
        let parked_row = std::ptr::eq(s, &parked);
        report.row(Row {
            bench: bench5,
            metric: format!("exec → first `reaper stats` answer, {label}"),
            result: format!("{} s", spread(&s.ready, 1.0, 2)),
            target: if parked_row { "≤ 0.5 s".to_owned() } else { String::new() },
            met: parked_row.then(|| median(&s.ready) <= 0.5),
            notes: format!(
                "{} processes in the tree; the daemon's own \"process tree ready\" elapsed_ms: {} s",
                s.processes,
                spread(&s.logged, 1.0, 2)
            ),
        });
    }
    let bench4 = "4 footprint";
    // MB as in the target (10^6 bytes); /proc reports kB (KiB).
    let mb = |kb: u64| kb as f64 * 1024.0 / 1e6;
    report.row(Row {
        bench: bench4,
        metric: format!("daemon RSS, {tracked} processes tracked"),
        result: format!("{:.1} MB (peak {:.1} MB)", mb(rss_end), mb(hwm)),
        target: "≤ 20 MB".to_owned(),
        met: Some(mb(rss_end.max(rss_start)) <= 20.0),
        notes: format!(
            "VmRSS at the end of the {} s window ({:.1} MB at its start), peak = VmHWM; of it: \
             BPF map mappings {:.1} MB (the ring buffer's data pages are mapped twice), heap \
             {:.1} MB; PSS {:.1} MB",
            opts.window_secs,
            mb(rss_start),
            mb(ring_kb),
            mb(heap_kb),
            mb(pss_kb)
        ),
    });
    report.row(Row {
        bench: bench4,
        metric: format!("daemon CPU, {tracked} processes tracked"),
        result: format!("{:.3} % of a core", w.percent()),
        target: String::new(),
        met: None,
        notes: format!(
            "CPU {:.2} s over {:.1} s, which held {} periodic /proc reconcile(s) of the \
             whole tree; {} events from the rest of the host meanwhile",
            w.cpu, w.secs, w.reconciles, w.events
        ),
    });
    report.raw(
        "startup",
        json!({
            "host_ready_s": host.ready,
            "host_logged_s": host.logged,
            "host_processes": host.processes,
            "parked_ready_s": parked.ready,
            "parked_logged_s": parked.logged,
            "parked_processes": parked.processes,
        }),
    );
    report.raw(
        "footprint_parked",
        json!({
            "tracked": tracked,
            "rss_kb_start": rss_start,
            "rss_kb_end": rss_end,
            "hwm_kb": hwm,
            "bpf_map_rss_kb": ring_kb,
            "heap_rss_kb": heap_kb,
            "pss_kb": pss_kb,
            "window": w.json(),
        }),
    );
    let reaper_pct = w.percent();
    match exporter {
        Ok(e) => {
            report.row(Row {
                bench: bench4,
                metric: format!("process-exporter RSS, {tracked} processes"),
                result: format!("{:.1} MB (peak {:.1} MB)", mb(e.rss_kb), mb(e.hwm_kb)),
                target: "above reaper's".to_owned(),
                met: Some(rss_end < e.rss_kb),
                notes: format!(
                    "`prometheus-process-exporter` following every process with a command line, \
                     scraped every {} s ({} scrapes in the window); VmRSS at the end",
                    EXPORTER_SCRAPE.as_secs(),
                    e.scrapes
                ),
            });
            report.row(Row {
                bench: bench4,
                metric: format!("process-exporter CPU, {tracked} processes"),
                result: format!("{:.3} % of a core", e.cpu * 100.0 / e.secs),
                target: "above reaper's".to_owned(),
                met: Some(reaper_pct < e.cpu * 100.0 / e.secs),
                notes: format!(
                    "CPU {:.2} s over {:.1} s, {} scrapes (each reads /proc of every process)",
                    e.cpu, e.secs, e.scrapes
                ),
            });
            report.raw(
                "footprint_process_exporter",
                json!({
                    "rss_kb": e.rss_kb,
                    "hwm_kb": e.hwm_kb,
                    "cpu_s": e.cpu,
                    "seconds": e.secs,
                    "scrapes": e.scrapes,
                }),
            );
        }
        Err(err) => report.row(Row {
            bench: bench4,
            metric: format!("process-exporter, {tracked} processes"),
            result: "did not run".to_owned(),
            target: String::new(),
            met: None,
            notes: reason(&err),
        }),
    }
    Ok(())
}

/// process-exporter's RSS and CPU over a window of `secs`.
struct ExporterFootprint {
    rss_kb: u64,
    hwm_kb: u64,
    cpu: f64,
    secs: f64,
    scrapes: u64,
}

fn exporter_footprint(scratch: &Scratch, secs: u64) -> anyhow::Result<ExporterFootprint> {
    let mut e = ProcessExporter::start(scratch, EXPORTER_SCRAPE)?;
    let cpu = CpuSample::read(e.pid)?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = CpuSample::read(e.pid)?.since(&cpu);
    let rss_kb = status_kb(e.pid, "VmRSS")?;
    let hwm_kb = status_kb(e.pid, "VmHWM")?;
    let secs = started.elapsed().as_secs_f64();
    e.stop();
    Ok(ExporterFootprint {
        rss_kb,
        hwm_kb,
        cpu,
        secs,
        // The first scrape, at start, came before the window.
        scrapes: e.scrapes.saturating_sub(1),
    })
}

/// The daemon's CPU over a window. A window of at least the default reconcile interval (60 s)
/// is stretched until one periodic `/proc` reconcile has completed in it, so it holds one.
pub(super) struct CpuWindow {
    secs: f64,
    cpu: f64,
    events: u64,
    reconciles: u64,
}

impl CpuWindow {
    const RECONCILE_INTERVAL: u64 = 60;

    pub(super) fn measure(d: &Daemon, secs: u64) -> anyhow::Result<Self> {
        let events = d.stat_u64("events_total")?;
        let reconciles = d.stat_u64("reconciles")?;
        let cpu = d.cpu()?;
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        if secs >= Self::RECONCILE_INTERVAL {
            let deadline = Instant::now() + Duration::from_secs(Self::RECONCILE_INTERVAL);
            while d.stat_u64("reconciles")? == reconciles && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(Self {
            cpu: d.cpu()?.since(&cpu),
            secs: started.elapsed().as_secs_f64(),
            events: d.stat_u64("events_total")? - events,
            reconciles: d.stat_u64("reconciles")? - reconciles,
        })
    }

    pub(super) fn percent(&self) -> f64 {
        self.cpu * 100.0 / self.secs
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "seconds": self.secs,
            "cpu_s": self.cpu,
            "events": self.events as f64,
            "reconciles": self.reconciles as f64,
        })
    }
}

pub(super) fn quiet_host(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Dry run with the built-in rule; the idle timeout is longer than the window, so the
    // targets stay watched and are never even due.
    let mut d = Daemon::start(
        bins,
        scratch,
        "quiet",
        &["--dry-run", "--idle-timeout", "1h"],
    )?;
    let count = opts.idle_targets.to_string();
    let (mut agent, claudes) = start_agent(
        bins,
        scratch,
        &format!("fq-{}", scratch.tag),
        &["--leak", "--count", &count],
    )?;
    let deadline = Instant::now() + READY_DEADLINE;
    let targets = loop {
        let targets = d.stat_u64("targets")?;
        if targets >= claudes.len() as u64 {
            break targets;
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon watches {targets} targets, not the {} idle doubles",
                claudes.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "xtask: bench: measuring the daemon on a quiet host ({targets} idle targets) for {} s",
        opts.window_secs
    );
    let w = CpuWindow::measure(&d, opts.window_secs)?;
    let rss = status_kb(d.pid, "VmRSS")?;
    agent.finish(Duration::from_secs(30));
    d.stop()?;
    let pct = w.percent();
    // What the rest of the host's events cost at the storm's per-event CPU (batched events are
    // cheaper each than sporadic ones, so this understates them and overstates the rest).
    let net = report.cpu_per_event.map(|per| {
        let left = (w.cpu - w.events as f64 * per).max(0.0);
        left * 100.0 / w.secs
    });
    report.row(Row {
        bench: "4 footprint",
        metric: format!("daemon CPU, quiet host, {targets} idle targets watched"),
        result: match net {
            Some(net) => format!("{pct:.3} % of a core (≈ {net:.3} % net of the host's events)"),
            None => format!("{pct:.3} % of a core"),
        },
        target: "≤ 0.1 %".to_owned(),
        met: Some(pct <= 0.1),
        notes: format!(
            "CPU {:.2} s over {:.1} s ({} reconcile(s)); {} events from other work on \
             the host meanwhile, which the net figure takes at the throughput benchmark's CPU \
             per event; RSS {:.1} MB",
            w.cpu,
            w.secs,
            w.reconciles,
            w.events,
            rss as f64 * 1024.0 / 1e6
        ),
    });
    report.raw(
        "footprint_quiet",
        json!({
            "targets": targets,
            "window": w.json(),
            "percent_of_core": pct,
            "percent_net_estimate": net,
            "rss_kb": rss,
        }),
    );
    Ok(())
}
