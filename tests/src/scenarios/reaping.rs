//! Leaked `claude` children found and ended, and live ones spared, with the test doubles of
//! ../shared/CLAUDE-PROCESS.md (`fake-agent` and `claude`). Run them on a pipeline started with
//! [`config`].
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use reaper::{
    app::PipelineStats,
    detect::{ActivityMeter, verdict::ActivityKind},
};

use super::{exits_of, finish_agent, stats, stats_until, stays_alive, wait_target};
use crate::{Harness, agent, alive};

/// The rule of [`config`].
pub const RULE: &str = "test-claude";
/// The agents' comm prefix: `fake-agent` exec'd through a link named `fa-<test pid>`.
pub const AGENT: &str = "fa";

/// The configuration the scenarios expect: [`crate::REAPING_DEFAULTS`] (idle timeout 3 s) and
/// `extra`, one rule named [`RULE`] whose targets' parent must be this run's agent.
pub fn config(extra: &str) -> String {
    crate::reaping_config(RULE, extra, &[crate::agent_comm(AGENT)])
}

/// Targets ended by `step`, all rules and reasons.
pub fn kills_by(s: &PipelineStats, step: &str) -> u64 {
    kills_where(s, |_, st| st == step)
}

/// Targets ended for `reason` (`leftover`, `memory_pressure`, …), all rules and steps.
pub fn kills_for(s: &PipelineStats, reason: &str) -> u64 {
    kills_where(s, |r, _| r == reason)
}

/// Targets ended for a (reason, step) that `keep` accepts.
fn kills_where(s: &PipelineStats, keep: impl Fn(&str, &str) -> bool) -> u64 {
    s.reaps
        .kills
        .iter()
        .filter(|((_, reason, step), _)| keep(reason, step))
        .map(|(_, n)| n)
        .sum()
}

/// An agent leaks an idle child with an idle tool under it: the child is ended by closing its
/// input (it exits 0, as after the SDK's `close()`), the tool ends with it, the agent lives on.
/// The model answers right after the tool starts, so the tool is not one the turn waits on.
///
/// With activity from `/proc/PID/io` (kernels before 6.3) too: there the model's last word is
/// stamped in the kernel by `tcp:tcp_rcv_space_adjust` (4.16+, so every kernel reaper runs on),
/// not sampled; sampled, the tool forked in the same interval would hold the turn open while
/// it lives (`sample()` and `turn_in_flight()` in detect/mod.rs).
pub async fn reap_leaked(h: &mut Harness) -> anyhow::Result<String> {
    h.resubscribe();
    let before = stats(h).await?;
    let mut a = agent(AGENT, &["--leak", "--message", "tool:idle"]);
    let agent_pid = a.try_read_pid("agent")?;
    let claude = a.try_read_pid("claude")?;
    let tool = a.try_read_pid("tool")?;
    a.try_read("ready")?;
    let ready = Instant::now();
    let target = wait_target(h, claude).await?;
    ensure!(
        target.rule == RULE,
        "a target of rule {}, not {RULE}",
        target.rule
    );
    let pids = [claude, tool];
    let exits = exits_of(h, &pids).await?;
    let took = ready.elapsed().as_secs_f64();
    ensure!(
        exits[&claude].code() == Some(0),
        "claude {claude} ended with {}, not by itself after its input was closed",
        exits[&claude]
    );
    ensure!(
        exits[&tool].signal().is_some(),
        "its tool did not end with it: {}",
        exits[&tool]
    );
    let kills = before.reaps.kills_total() + 1;
    let s = stats_until(h, "the kill counted", |s| s.reaps.kills_total() >= kills).await?;
    ensure!(
        s.reaps.kills_total() == kills,
        "{} kills counted, expected one",
        s.reaps.kills_total() - kills + 1
    );
    ensure!(
        kills_by(&s, "closed") == kills_by(&before, "closed") + 1,
        "not ended by closing its input: {:?}",
        s.reaps
    );
    ensure!(
        s.reaps.reclaimed_bytes > before.reaps.reclaimed_bytes,
        "no memory counted as reclaimed"
    );
    // What the agent saw: its child exited 0, as after its own close().
    let seen = a.try_read("exit")?;
    ensure!(seen == format!("{claude}:code:0"), "the agent saw {seen}");
    ensure!(alive(agent_pid), "the agent {agent_pid} died too");
    finish_agent(a, agent_pid).await;
    Ok(format!(
        "leaked claude {claude} ended by closing its input {took:.1}s after its agent was ready \
         (idle_timeout 3s, activity source {}), its tool {tool} with it; agent {agent_pid} \
         survived",
        s.activity_source.map_or("none", ActivityMeter::as_str),
    ))
}

/// An agent's child in a live conversation (a turn every second) is never reaped, and its
/// activity was seen where the activity source says.
pub async fn spare_chatting(h: &mut Harness) -> anyhow::Result<String> {
    let before = stats(h).await?;
    let mut a = agent(AGENT, &["--chat-every", "1000"]);
    let agent_pid = a.try_read_pid("agent")?;
    let claude = a.try_read_pid("claude")?;
    a.try_read("ready")?;
    let long = Duration::from_secs(8);
    stays_alive(claude, long)
        .await
        .context("the chatting claude")?;
    let after = stats(h).await?;
    ensure!(
        after.reaps.kills_total() == before.reaps.kills_total(),
        "something was reaped meanwhile: {:?}",
        after.reaps
    );
    let target = h
        .handle
        .explain(claude)
        .await
        .context("pipeline stopped")?
        .target
        .with_context(|| format!("claude {claude} is not a target"))?;
    ensure!(
        target.verdict.state() == "active",
        "verdict {:?}",
        target.verdict
    );
    let kind = target.evidence.last_activity_kind;
    let socket = target.evidence.last_socket_byte;
    // The last sign may be CPU (a turn is work, more so under emulation); the conversation's
    // bytes must have been seen all the same, by the source in use.
    match after.activity_source {
        Some(ActivityMeter::Socket) => ensure!(
            socket.is_some(),
            "no socket byte seen with activity source socket (last activity {kind:?})"
        ),
        Some(ActivityMeter::ProcIo) => ensure!(
            matches!(kind, ActivityKind::Io | ActivityKind::Cpu),
            "last activity {kind:?}, expected Io (or Cpu) with activity source proc-io"
        ),
        None => bail!("no activity source"),
    }
    let now = reaper::clock::mono_ns();
    let ago = |t: u64| format!("{:.1}s ago", now.saturating_sub(t) as f64 / 1e9);
    finish_agent(a, agent_pid).await;
    Ok(format!(
        "chatting claude {claude} alive after {}s, active, activity source {}, last activity \
         {kind:?} {}, last socket byte {}",
        long.as_secs(),
        after.activity_source.map_or("none", ActivityMeter::as_str),
        ago(target.evidence.last_activity),
        socket.map_or("none".into(), ago)
    ))
}
