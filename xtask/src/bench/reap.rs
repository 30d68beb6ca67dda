//! 3. Reap latency: leaked `claude` doubles under an enforcing daemon.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use super::Opts;
use super::daemon::Daemon;
use super::env::{Bins, Scratch};
use super::procs::{Helper, tail};
use super::report::{Report, Row};
use super::stats::{percentile, secs};

/// `fake-agent ARGS` exec'd through a symlink named `name` (its comm), in a session of its own
/// (so its children never have a controlling terminal, even when the bench runs in one).
pub(super) fn start_agent(
    bins: &Bins,
    scratch: &Scratch,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(Helper, Vec<u32>)> {
    let link = scratch.symlink(name, &bins.agent)?;
    let mut cmd = Command::new("setsid");
    cmd.arg(&link)
        .args(args)
        .env("XDG_RUNTIME_DIR", scratch.path("runtime"));
    let mut agent = Helper::spawn(cmd, "fake-agent")?;
    let lines = agent.read_until("ready", Duration::from_secs(120))?;
    let claudes = lines
        .iter()
        .filter_map(|l| l.strip_prefix("claude=")?.parse().ok())
        .collect();
    Ok((agent, claudes))
}

pub(super) fn reap_latency(
    bins: &Bins,
    scratch: &Scratch,
    opts: &Opts,
    report: &mut Report,
) -> anyhow::Result<()> {
    let agent_comm = format!("fb-{}", scratch.tag);
    let config = scratch.write_private(
        "reap.toml",
        &format!(
            "# cargo xtask bench: enforce, but only on children of this run's agent\n\
             mode = \"enforce\"\n\
             idle_timeout = \"2s\"\n\
             orphan_grace = \"60s\"\n\
             grace = \"2s\"\n\
             max_kills_per_minute = 1000\n\
             \n\
             [[rule]]\n\
             name = \"bench-claude\"\n\
             comm = [\"claude\", \"claude.exe\"]\n\
             argv_any = [\"--input-format=stream-json\", \"--output-format=stream-json\"]\n\
             require_no_tty = true\n\
             parent_comm = [\"{agent_comm}\"]\n"
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let mut daemon = Daemon::start(bins, scratch, "reap", &["--config", &config])?;
    let count = opts.leaked.to_string();
    let (mut agent, claudes) =
        start_agent(bins, scratch, &agent_comm, &["--leak", "--count", &count])?;
    if claudes.len() != opts.leaked {
        bail!(
            "fake-agent reported {} claude children, not {}",
            claudes.len(),
            opts.leaked
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let delays = loop {
        let stats = daemon.stats()?;
        let delays: Vec<f64> = stats
            .get("reaps")
            .and_then(|r| r.get("kill_delays"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        if delays.len() >= opts.leaked {
            break delays;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} leaked doubles were reaped within 120 s:\n{}",
                delays.len(),
                opts.leaked,
                tail(&daemon.log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    agent.finish(Duration::from_secs(30));
    daemon.stop()?;

    let mut sorted = delays.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = percentile(&sorted, 50.0);
    let p99 = percentile(&sorted, 99.0);
    let max = sorted[sorted.len() - 1];
    let bench = "3 reap latency";
    report.row(Row {
        bench,
        metric: format!("reaper, {} leaked doubles, idle_timeout 2 s", opts.leaked),
        result: format!("p50 {}, p99 {}, max {}", secs(p50), secs(p99), secs(max)),
        target: "p99 ≤ 1 s".to_owned(),
        met: Some(p99 <= 1.0),
        notes: "measured: idle deadline → process gone (`reaps.kill_delays`); each ended by its first ladder step, its input closed".to_owned(),
    });
    for (label, period) in [("60 s", 60.0), ("5 min", 300.0)] {
        report.row(Row {
            bench,
            metric: format!("a `ps` poller every {label}"),
            result: format!(
                "p50 {}, p99 {}, max {}",
                secs(period / 2.0),
                secs(0.99 * period),
                secs(period)
            ),
            target: String::new(),
            met: None,
            notes: "computed, not measured: delay uniform in [0, period]".to_owned(),
        });
    }
    report.raw(
        "reap_latency",
        json!({
            "kill_delays_s": delays,
            "p50_s": p50,
            "p99_s": p99,
            "max_s": max,
        }),
    );
    Ok(())
}
