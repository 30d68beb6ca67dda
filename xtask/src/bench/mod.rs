//! `cargo xtask bench`: what following every process costs, and what it buys.
//!
//! Six benchmarks against the release binaries, on the real kernel:
//!
//! 1. **Spawn-storm overhead.** `lifecycle-helper storm N 1` (fork, exec `/bin/true`, wait, N
//!    times) and `bench-load threads T` (create and join T threads), each run under
//!    `bench-load rusage` (wall time, and the CPU time of the storm and every process it waited
//!    for), with no tracer, with reaper, and with each peer that runs on this kernel
//!    ([`peers`]: bpftrace with `bench/execsnoop.bt`, bcc's execsnoop + exitsnoop, auditd with an
//!    execve rule, process-exporter). They are interleaved round by round (A B C … A B C …), so
//!    drift on a shared machine hits all alike; the result is the median of the per-round
//!    ratios to no tracer, with min–max; a peer that cannot run gets a row saying why.
//! 2. **Throughput and loss.** Several storms in parallel with reaper running: events handled
//!    per second, the daemon's CPU per event, reaper's accounted CPU per spawn, kernel reserve
//!    failures, and the tree compared with `/proc` afterwards.
//! 3. **Reap latency.** Leaked `claude` doubles under an enforcing daemon whose rule names this
//!    run's agent as the only possible parent: idle deadline → process gone, p50/p99/max, beside
//!    the computed bound of a `ps` poller.
//! 4. **Footprint.** Daemon RSS and CPU with 10,000 live processes tracked, process-exporter's
//!    beside it, and the daemon's CPU on a quiet host with 20 watched idle targets.
//! 5. **Start-up.** `reaper run` exec → first `reaper stats` answer, with the host as it is and
//!    with 10,000 extra processes.
//! 6. **Per program.** Each of reaper's lifecycle programs against the bench's floor program on
//!    the same tracepoint (reaper-ebpf/src/floor.rs), and exec's also against a floor carrying
//!    its record's path and argv, attached in turn, never together: the kernel's
//!    `run_time_ns / run_cnt` ([`progs`]).
//!
//! Benchmarks are not tests: no number fails the verb; a benchmark that cannot run does. Every
//! daemon runs with `--dry-run` and the built-in rule, except the reap-latency one, whose rule can
//! only match children of this run's uniquely named agent. Every process started here is ended
//! here, by its pid. Results: one table on stdout, `bench/results/latest.md` and `latest.json`.
//!
//! Layout: this file holds the verb's options and the run order; [`env`] the tools, installs,
//! build and scratch copies; [`procfs`] the sampling of `/proc` (CPU, schedstat, memory, BPF
//! programs); [`procs`] the processes the bench starts ([`daemon`] for reaper, [`peers`] for the
//! other tools); one file per benchmark; [`stats`] and [`report`] (table and JSON).
mod daemon;
mod env;
mod footprint;
mod peers;
mod procfs;
mod procs;
mod progs;
mod reap;
mod report;
mod stats;
mod storm;
mod throughput;

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::Ctx;
use env::{Bins, Scratch};
use report::{Machine, Report};

/// Knobs, mainly to make a quick trial run; the defaults are what the README reports.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub(crate) struct Opts {
    /// Interleaved rounds of the spawn-storm comparison.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Processes per spawn storm (fork + exec `/bin/true` + wait), one worker.
    #[arg(long, default_value_t = 2000)]
    storm: usize,
    /// Threads per thread storm (create + join).
    #[arg(long, default_value_t = 20_000)]
    threads: usize,
    /// Parallel storms in the throughput benchmark.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Processes per storm in the throughput benchmark.
    #[arg(long, default_value_t = 5000)]
    parallel_storm: usize,
    /// Leaked `claude` doubles in the reap-latency benchmark.
    #[arg(long, default_value_t = 50)]
    leaked: usize,
    /// Processes parked for the footprint and start-up benchmarks.
    #[arg(long, default_value_t = 10_000)]
    park: usize,
    /// Idle targets watched on the quiet host.
    #[arg(long, default_value_t = 20)]
    idle_targets: usize,
    /// Seconds over which the daemon's CPU is measured (footprint), per measurement.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Interleaved rounds of the per-program comparison (reaper's programs, then the floor's).
    #[arg(long, default_value_t = 3)]
    prog_rounds: usize,
    /// Processes (fork + exec `/bin/true` + wait) per round of the per-program comparison.
    #[arg(long, default_value_t = 3000)]
    prog_spawns: usize,
    /// Start-ups measured per configuration.
    #[arg(long, default_value_t = 3)]
    startups: usize,
    /// Run only these benchmarks (repeatable); the table is printed but bench/results/ is
    /// left as it is, since it holds the last complete run.
    #[arg(long, value_enum)]
    #[serde(skip)]
    only: Vec<Bench>,
}

/// The benchmarks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Bench {
    Storm,
    Throughput,
    Programs,
    Reap,
    Footprint,
    Quiet,
}

/// Every wait for something to happen has a deadline; these are generous (shared machines).
const READY_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

pub(crate) fn run(ctx: &Ctx, opts: &Opts) -> anyhow::Result<()> {
    let started = Instant::now();
    env::ensure_peers()?;
    env::ensure_tracefs()?;
    env::build(ctx)?;
    let scratch = Scratch::new()?;
    let bins = Bins::new(ctx, &scratch)?;
    let machine = Machine::read(ctx);
    println!(
        "xtask: bench on {} ({} CPUs, {}), kernel {}; load average {}",
        machine.cpu, machine.nproc, machine.memory, machine.kernel, machine.loadavg
    );

    let mut report = Report::default();
    let phase = |name: &str| println!("xtask: bench: {name}…");

    let runs = |b: Bench| opts.only.is_empty() || opts.only.contains(&b);
    if runs(Bench::Storm) {
        phase("1/6 spawn-storm overhead (interleaved: none, reaper, its peers)");
        storm::storm_overhead(&bins, &scratch, opts, &mut report)
            .context("spawn-storm benchmark")?;
    }
    if runs(Bench::Throughput) {
        phase("2/6 throughput and loss");
        throughput::throughput(&bins, &scratch, opts, &mut report)
            .context("throughput benchmark")?;
    }
    if runs(Bench::Programs) {
        phase("6/6 per program: reaper's against the floor's (interleaved)");
        progs::per_program(&bins, &scratch, opts, &mut report).context("per-program benchmark")?;
    }
    if runs(Bench::Reap) {
        phase("3/6 reap latency");
        reap::reap_latency(&bins, &scratch, opts, &mut report).context("reap-latency benchmark")?;
    }
    if runs(Bench::Footprint) {
        phase("4–5/6 start-up and footprint with parked processes");
        footprint::startup_and_footprint(&bins, &scratch, opts, &mut report)
            .context("start-up/footprint benchmark")?;
    }
    if runs(Bench::Quiet) {
        phase("4/6 quiet host with idle targets");
        footprint::quiet_host(&bins, &scratch, opts, &mut report)
            .context("quiet-host benchmark")?;
    }

    let elapsed = started.elapsed();
    let md = report.markdown(&machine, elapsed);
    if !opts.only.is_empty() {
        println!("\n{md}");
        println!(
            "xtask: bench ({:?}) done in {:.0} s; bench/results/ left as it is (a partial run)",
            opts.only,
            elapsed.as_secs_f64()
        );
        return Ok(());
    }
    let json = report.json(&machine, elapsed, opts);
    let dir = ctx.workspace.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [("latest.md", &md), ("latest.json", &json)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("\n{md}");
    println!(
        "xtask: bench done in {:.0} s; wrote bench/results/latest.md and latest.json",
        elapsed.as_secs_f64()
    );
    Ok(())
}
