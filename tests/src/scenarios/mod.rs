//! The scenarios that run both on the host (`tests/tests/lifecycle.rs`, `reaping.rs`, which
//! unwrap them) and on the other kernels of `cargo xtask vm-test` (`src/bin/vm_runner.rs`, which
//! reports them, one `vm-check` line each). Each is written once, here, and returns what it saw
//! as one line, or an error saying what went wrong.
//!
//! A scenario may run on a pipeline that earlier scenarios used (the VM keeps one): it taps the
//! events afresh and compares counters with their values at its start.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use reaper::{
    app::PipelineStats,
    detect::TargetView,
    events::{Event, ExitStatus},
};

use crate::{DEADLINE, Harness, Helper, POLL, alive};

pub mod lifecycle;
pub mod reaping;

/// Waits for the exit events of all of `pids`, in whatever order they come.
pub async fn exits_of(h: &mut Harness, pids: &[u32]) -> anyhow::Result<HashMap<u32, ExitStatus>> {
    let mut seen = HashMap::new();
    while seen.len() < pids.len() {
        let what = format!("the exits of {pids:?} (seen {seen:?})");
        let (pid, status) = h
            .try_wait_event(&what, |e| match e {
                Event::Exit { id, status, .. } if pids.contains(&id.pid) => Some((id.pid, *status)),
                _ => None,
            })
            .await?;
        seen.insert(pid, status);
    }
    Ok(seen)
}

pub async fn stats(h: &Harness) -> anyhow::Result<PipelineStats> {
    h.handle.stats().await.context("pipeline stopped")
}

/// Waits until the daemon's counters satisfy `check` (reports trail exits slightly).
pub async fn stats_until(
    h: &Harness,
    what: &str,
    check: impl Fn(&PipelineStats) -> bool,
) -> anyhow::Result<PipelineStats> {
    let started = Instant::now();
    loop {
        let s = stats(h).await?;
        if check(&s) {
            return Ok(s);
        }
        if started.elapsed() > DEADLINE {
            bail!(
                "timed out after {DEADLINE:?} waiting for {what}: {:?}",
                s.reaps
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `pid` is a target (its exec event may take up to the reader's poll interval).
pub async fn wait_target(h: &Harness, pid: u32) -> anyhow::Result<TargetView> {
    let started = Instant::now();
    loop {
        let e = h.handle.explain(pid).await.context("pipeline stopped")?;
        if let Some(target) = e.target {
            return Ok(target);
        }
        if started.elapsed() > DEADLINE {
            bail!("{pid} never became a target: {:?}", e.rules);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Fails unless `pid` stays alive for `long` (absence of a kill can only be shown over time).
pub async fn stays_alive(pid: u32, long: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + long;
    while Instant::now() < until {
        anyhow::ensure!(alive(pid), "{pid} was killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Closes the agent's stdin and gives it (and its children) a moment to exit by themselves
/// before its guard kills what is left.
pub async fn finish_agent(mut agent: Helper, pid: u32) {
    agent.finish();
    let started = Instant::now();
    while alive(pid) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host tests' end of a scenario: its line on stderr, or a panic with the whole error chain.
pub fn expect(result: anyhow::Result<String>) {
    match result {
        Ok(line) => eprintln!("{line}"),
        Err(err) => panic!("{err:#}"),
    }
}
