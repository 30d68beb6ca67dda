//! 1. Spawn-storm overhead: no tracer, reaper and its peers, interleaved round by round.
use std::collections::BTreeSet;
use std::ffi::OsString;

use anyhow::bail;
use serde_json::{Value, json};

use super::Opts;
use super::daemon::Daemon;
use super::env::{Bins, Scratch};
use super::peers::{EXPORTER_SCRAPE, Peer, Running, reason};
use super::procfs::{cpu_of, cpu_since, foreign_tracers};
use super::procs::{Usage, measure};
use super::report::{Report, Row};
use super::stats::{median, overhead_spread, spread};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Tracer {
    None,
    Reaper,
    Peer(Peer),
}

impl Tracer {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Reaper => "reaper",
            Self::Peer(p) => p.name(),
        }
    }
}

/// A tracer while a round runs.
enum Started {
    None,
    Reaper(Daemon),
    Peer(Running),
}

impl Started {
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::None => Vec::new(),
            Self::Reaper(d) => vec![d.pid],
            Self::Peer(p) => p.pids(),
        }
    }

    /// Returns once the tracer has caught up with everything traced so far, so that a backlog
    /// left when a storm ends is counted in its CPU too; for reaper, its event count.
    fn caught_up(&mut self) -> anyhow::Result<u64> {
        match self {
            Self::None => Ok(0),
            Self::Reaper(d) => d.barrier(),
            Self::Peer(p) => p.barrier().map(|()| 0),
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::None => Ok(()),
            Self::Reaper(mut d) => d.stop(),
            Self::Peer(p) => p.stop(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct Round {
    procs: Usage,
    threads: Usage,
    /// Events reaper applied during each storm (the rest of the host's included).
    events: [u64; 2],
}

pub(super) fn storm_overhead(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    // One untimed run of each first: page cache, binaries, allocator arenas.
    measure(bins, &bins.process_storm(opts.storm))?;
    measure(bins, &bins.thread_storm(opts.threads))?;
    // Each peer once, to see whether it runs on this kernel at all; those that do not are
    // reported with the reason and left out of the rounds.
    let mut tracers = vec![Tracer::None, Tracer::Reaper];
    let mut unavailable = Vec::new();
    for peer in Peer::ALL {
        match peer.start(bins, scratch) {
            Ok(running) => {
                running.stop()?;
                tracers.push(Tracer::Peer(peer));
            }
            Err(e) => {
                println!(
                    "xtask: bench: {} does not run here: {}",
                    peer.name(),
                    reason(&e)
                );
                unavailable.push((peer, reason(&e)));
            }
        }
    }
    // Other developers' tests attach the same probes now and then; a round during which any
    // process but ours held a lifecycle tracer does not count, and another round is run (up
    // to three more in all: each round of six tools takes most of a minute here).
    let mut rounds: Vec<Vec<Round>> = Vec::new();
    let mut discarded: Vec<(BTreeSet<u32>, Vec<Round>)> = Vec::new();
    let max_rounds = opts.rounds + 3;
    let mut failures = 0;
    for r in 0.. {
        if rounds.len() >= opts.rounds || r >= max_rounds {
            break;
        }
        let mut this: Vec<Round> = Vec::new();
        let mut foreign = BTreeSet::new();
        let mut failed = None;
        for &tracer in &tracers {
            let ran = run_tracer(tracer, bins, scratch, opts, r, &mut foreign);
            match ran {
                Ok(round) => this.push(round),
                Err(e) => {
                    failed = Some((tracer, e));
                    break;
                }
            }
        }
        // A tool that ends in the middle of a round (another helper's cleanup may have killed
        // it) costs that round, not the bench; three such rounds do.
        if let Some((tracer, e)) = failed {
            println!(
                "xtask: bench: round {} dropped: {} failed: {}",
                r + 1,
                tracer.name(),
                reason(&e)
            );
            failures += 1;
            if failures >= 3 {
                return Err(e.context(format!("{} failed in three rounds", tracer.name())));
            }
            continue;
        }
        if foreign.is_empty() {
            rounds.push(this);
        } else {
            println!(
                "xtask: bench: round {} discarded: processes {foreign:?} (not ours) had \
                 lifecycle tracepoint programs attached meanwhile",
                r + 1
            );
            discarded.push((foreign, this));
        }
    }
    // On a machine where other tests attach lifecycle programs all the time, too few clean
    // rounds may run: the table then uses the others too and says so.
    let mut kept = 0;
    while rounds.len() < opts.rounds.min(3) && !discarded.is_empty() {
        let (foreign, round) = discarded.remove(0);
        println!(
            "xtask: bench: too few clean rounds; keeping one run beside processes {foreign:?}"
        );
        rounds.push(round);
        kept += 1;
    }
    if rounds.is_empty() {
        bail!("no spawn-storm round ran");
    }
    let mut discarded_note = String::new();
    if !discarded.is_empty() {
        discarded_note = format!(
            "; {} round(s) discarded: another process had lifecycle tracepoint programs attached",
            discarded.len()
        );
    }
    if kept > 0 {
        discarded_note += &format!(
            "; {kept} round(s) kept although another process had lifecycle tracepoint programs \
             attached meanwhile (too few clean rounds ran)"
        );
    }

    let bench = "1 spawn storm";
    let mut raw = serde_json::Map::new();
    for (wi, (workload, label, pick)) in [
        (
            "procs",
            format!("{} × fork+exec+wait `/bin/true`", opts.storm),
            (|r: &Round| r.procs) as fn(&Round) -> Usage,
        ),
        (
            "threads",
            format!("{} × pthread create+join", opts.threads),
            |r: &Round| r.threads,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let base_wall: Vec<f64> = rounds.iter().map(|r| pick(&r[0]).wall).collect();
        let base_cpu: Vec<f64> = rounds.iter().map(|r| pick(&r[0]).cpu).collect();
        if workload == "procs" {
            report.spawn_cpu = Some(median(&base_cpu) / opts.storm as f64);
        }
        report.row(Row {
            bench,
            metric: format!("{label}, no tracer"),
            result: format!(
                "wall {} s, CPU {} s",
                spread(&base_wall, 1.0, 3),
                spread(&base_cpu, 1.0, 3)
            ),
            target: String::new(),
            met: None,
            notes: format!(
                "median (min–max) of {} rounds{discarded_note}; {:.0} µs per {}",
                rounds.len(),
                median(&base_wall) * 1e6
                    / if workload == "procs" {
                        opts.storm
                    } else {
                        opts.threads
                    } as f64,
                if workload == "procs" {
                    "process"
                } else {
                    "thread"
                }
            ),
        });
        // Judged on total CPU: on a shared 2-core machine the wall time of a few-second run
        // swings by tens of percent between rounds; CPU time is charged exactly.
        let totals: Vec<Vec<f64>> = (0..tracers.len())
            .map(|i| {
                rounds
                    .iter()
                    .map(|r| (pick(&r[i]).cpu + pick(&r[i]).tracer_cpu) / pick(&r[0]).cpu)
                    .collect()
            })
            .collect();
        let medians: Vec<f64> = totals.iter().map(|t| median(t)).collect();
        let reaper = medians[1];
        for (i, &tracer) in tracers.iter().enumerate().skip(1) {
            let wall: Vec<f64> = rounds
                .iter()
                .map(|r| pick(&r[i]).wall / pick(&r[0]).wall)
                .collect();
            let cpu: Vec<f64> = rounds
                .iter()
                .map(|r| pick(&r[i]).cpu / pick(&r[0]).cpu)
                .collect();
            // The workload's CPU plus the tracer's own, against the workload's alone.
            let total = &totals[i];
            let tracer_cpu: Vec<f64> = rounds.iter().map(|r| pick(&r[i]).tracer_cpu).collect();
            let (target, met) = match tracer {
                Tracer::Reaper => (
                    "the cheapest tracer (CPU with the tracer's)".to_owned(),
                    Some(medians[2..].iter().all(|&m| reaper < m)),
                ),
                Tracer::Peer(_) => (
                    "above reaper (CPU with the tracer's)".to_owned(),
                    Some(reaper < medians[i]),
                ),
                Tracer::None => (String::new(), None),
            };
            report.row(Row {
                bench,
                metric: format!("{label}, {}", tracer.name()),
                result: format!(
                    "wall {}; CPU {}; CPU with the tracer's own {}",
                    overhead_spread(&wall),
                    overhead_spread(&cpu),
                    overhead_spread(total)
                ),
                target,
                met,
                notes: format!(
                    "median (min … max) of per-round ratios to no tracer; the tracer's own CPU \
                     per run: {} s{}",
                    spread(&tracer_cpu, 1.0, 2),
                    if tracer == Tracer::Reaper {
                        let events: Vec<f64> =
                            rounds.iter().map(|r| r[i].events[wi] as f64).collect();
                        format!(
                            "; events it applied per run: {} ({}the rest of the host's count too)",
                            spread(&events, 1.0, 0),
                            if workload == "threads" {
                                "threads are filtered in the kernel; "
                            } else {
                                ""
                            }
                        )
                    } else if tracer == Tracer::Peer(Peer::ProcessExporter) {
                        format!(
                            " (one scrape's CPU × the run's wall time / {} s: it reads /proc only \
                             when scraped, and sees none of the storm's short-lived processes)",
                            EXPORTER_SCRAPE.as_secs()
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
        for (peer, why) in &unavailable {
            report.row(Row {
                bench,
                metric: format!("{label}, {}", peer.name()),
                result: "did not run".to_owned(),
                target: String::new(),
                met: None,
                notes: format!("does not run on this kernel: {why}"),
            });
        }
        let per_round: Vec<Value> = rounds
            .iter()
            .map(|r| {
                let by_tracer: serde_json::Map<String, Value> = tracers
                    .iter()
                    .zip(r)
                    .map(|(t, round)| {
                        (
                            t.name().to_owned(),
                            json!({
                                "wall_s": pick(round).wall,
                                "cpu_s": pick(round).cpu,
                                "tracer_cpu_s": pick(round).tracer_cpu,
                                "reaper_events": round.events[wi],
                            }),
                        )
                    })
                    .collect();
                Value::Object(by_tracer)
            })
            .collect();
        raw.insert(workload.to_owned(), Value::Array(per_round));
    }
    let not_run: serde_json::Map<String, Value> = unavailable
        .iter()
        .map(|(p, why)| (p.name().to_owned(), Value::String(why.clone())))
        .collect();
    raw.insert("did_not_run".to_owned(), Value::Object(not_run));
    report.raw("spawn_storm", Value::Object(raw));
    Ok(())
}

/// One tracer's part of a round: the tracer started, both storms measured under it, stopped.
/// Processes other than ours holding lifecycle programs meanwhile are added to `foreign`.
fn run_tracer(
    tracer: Tracer,
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    r: usize,
    foreign: &mut BTreeSet<u32>,
) -> anyhow::Result<Round> {
    let mut started = match tracer {
        Tracer::None => Started::None,
        Tracer::Reaper => Started::Reaper(Daemon::start(bins, scratch, "storm", &["--dry-run"])?),
        Tracer::Peer(p) => Started::Peer(p.start(bins, scratch)?),
    };
    let ours = started.pids();
    let mut traced = |args: &[OsString]| -> anyhow::Result<(Usage, u64)> {
        let events_before = started.caught_up()?;
        foreign.extend(foreign_tracers(&ours));
        let before = cpu_of(&ours)?;
        let mut usage = measure(bins, args)?;
        foreign.extend(foreign_tracers(&ours));
        let events = started.caught_up()? - events_before;
        usage.tracer_cpu = match &started {
            Started::Peer(p) => p.amortized(usage.wall),
            _ => None,
        }
        .unwrap_or(cpu_since(&cpu_of(&ours)?, &before));
        Ok((usage, events))
    };
    let (procs, procs_events) = traced(&bins.process_storm(opts.storm))?;
    let (threads, threads_events) = traced(&bins.thread_storm(opts.threads))?;
    let daemon_ran = tracer == Tracer::Reaper;
    started.stop()?;
    println!(
        "xtask: bench: round {} {:<9}: {} processes {:.3} s wall {:.3} s CPU; \
         {} threads {:.3} s wall {:.3} s CPU; tracer CPU {:.2} s + {:.2} s{}",
        r + 1,
        tracer.name(),
        opts.storm,
        procs.wall,
        procs.cpu,
        opts.threads,
        threads.wall,
        threads.cpu,
        procs.tracer_cpu,
        threads.tracer_cpu,
        if daemon_ran {
            format!("; reaper events {procs_events} + {threads_events}")
        } else {
            String::new()
        }
    );
    Ok(Round {
        procs,
        threads,
        events: [procs_events, threads_events],
    })
}
