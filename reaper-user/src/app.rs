//! Wires the stages together; the one place to read first.
//!
//! ```text
//! probes (BTF tracepoints) ─► ring buffer ─► tree task (events::ring) ─► queries
//!                                              │  tree + detector
//!                                              ├─ /proc reconcile
//!                                              └─ reap orders ─► reap tasks
//! ```
//!
//! The tree task owns the process tree and the detector: it drains the ring buffer itself and
//! every event updates both, in order. It sleeps until the detector's next deadline; when a
//! target is due it flushes the ring buffer first, so the detector decides on a tree with every
//! event up to now applied. Each decision is carried out by a task of its own (the kill ladder
//! in [`crate::reap`]), whose report comes back to the detector.
//!
//! Start-up has no gap: the probes attach first, then `/proc` is scanned, then the events
//! held meanwhile are applied on top of the scan (deduplicated by identity).
//! Reconciliation scans `/proc` on a timer and right after the kernel reports lost events;
//! before diffing, it flushes the ring buffer, so every event older than the scan has been
//! applied. Queries about processes (`tree`, `explain`, targets) flush it too before they are
//! answered: they see every fork, exec and exit that happened before they were asked, although
//! the ring is otherwise drained only every 0.4–1.6 s.
use std::{sync::Arc, time::Duration};

use reaper_common::EventKind;
use serde::Serialize;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    clock,
    config::{ActivitySource, Config},
    detect::{
        ActivityMeter, Decision, Detector, Explanation, Reason, Settled, TargetView,
        session::{self, Pressure, SessionView},
    },
    events::{Event, Identity, ring},
    host::{LiveHost, Pidfds},
    http::Health,
    metrics::Metrics,
    probes::{LostCounts, ProbeOptions, Probes},
    reap::{self, Outcome, ReapReport},
    tree::{Corrections, Process, ProcessTree, Snapshot, scan},
};

/// Pipeline settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Rules, timeouts, mode.
    pub config: Config,
    /// How often the periodic duties run, in one wake-up: the health beat, the exported
    /// gauges, the kernel's loss counters and the memory pressure check.
    pub loss_check_interval: Duration,
}

impl PipelineConfig {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            // A wake-up costs a quiet daemon more than the work it does; the kernel refreshes
            // the PSI averages the pressure check reads every 2 s anyway (PSI_FREQ in
            // <https://github.com/torvalds/linux/blob/v6.18/kernel/sched/psi.c>), and a health
            // beat this often stays well inside `/healthz`'s 5 s.
            loss_check_interval: Duration::from_secs(2),
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self::new(Config::builtin())
    }
}

/// What the reaper did, counted.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReapStats {
    /// (rule, reason, step that ended it) → targets ended (descendants are not counted).
    pub kills: Vec<((String, String, String), u64)>,
    /// (rule, reason) → kills that failed.
    pub failures: Vec<((String, String), u64)>,
    /// (rule, reason) → would-kills in dry-run mode.
    pub would_kill: Vec<((String, String), u64)>,
    /// RSS of reaped targets and descendants.
    pub reclaimed_bytes: u64,
    /// Seconds from each target's deadline to its being gone (the most recent 4,096).
    pub kill_delays: Vec<f64>,
    /// Orders not carried out because the pid named another process by then.
    pub identity_mismatches: u64,
    /// Orders a reload cancelled before their first signal (dry-run, or their rule removed).
    pub cancelled: u64,
}

fn bump<K: PartialEq>(counts: &mut Vec<(K, u64)>, key: K) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

impl ReapStats {
    /// Counts a report here and in the exported metrics.
    fn record(&mut self, decision: &Decision, report: &ReapReport, metrics: &Metrics) {
        let rule = decision.rule.clone();
        let reason = decision.reason.as_str().to_owned();
        match report.outcome {
            Outcome::WouldKill => {
                metrics
                    .would_kill
                    .with_label_values(&[&rule, &reason])
                    .inc();
                bump(&mut self.would_kill, (rule, reason));
            }
            Outcome::Ended => {
                let step = report.step.map_or("terminated", |s| s.as_str());
                metrics
                    .kills
                    .with_label_values(&[&rule, &reason, step])
                    .inc();
                match decision.reason {
                    Reason::Leftover => {
                        let kind = decision.kind.map_or("other", |k| k.as_str());
                        metrics.leftover_kills.with_label_values(&[kind]).inc();
                    }
                    Reason::Runaway => metrics.runaway_kills.inc(),
                    Reason::MemoryPressure => metrics.pressure_kills.inc(),
                    Reason::Idle | Reason::Orphaned => {}
                }
                metrics.reclaimed_bytes.inc_by(report.rss_bytes);
                bump(&mut self.kills, (rule, reason, step.to_owned()));
                self.reclaimed_bytes += report.rss_bytes;
                if let Some(gone) = report.gone_ns {
                    let delay = gone.saturating_sub(decision.deadline_ns) as f64 / 1e9;
                    metrics.kill_delay.with_label_values(&[step]).observe(delay);
                    if self.kill_delays.len() == 4096 {
                        self.kill_delays.remove(0);
                    }
                    self.kill_delays.push(delay);
                }
            }
            Outcome::Failed | Outcome::Refused => {
                metrics
                    .kill_failures
                    .with_label_values(&[&rule, &reason])
                    .inc();
                bump(&mut self.failures, (rule, reason));
            }
            Outcome::IdentityMismatch => self.identity_mismatches += 1,
            Outcome::AlreadyGone => {}
            Outcome::Cancelled => self.cancelled += 1,
        }
    }

    /// Targets killed, all rules and reasons.
    pub fn kills_total(&self) -> u64 {
        self.kills.iter().map(|(_, n)| n).sum()
    }

    pub fn would_kill_total(&self) -> u64 {
        self.would_kill.iter().map(|(_, n)| n).sum()
    }
}

/// Counters describing the pipeline's health.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PipelineStats {
    pub processes: usize,
    pub events: Vec<(&'static str, u64)>,
    pub events_total: u64,
    pub lost: Vec<(&'static str, u64)>,
    pub lost_total: u64,
    pub decode_errors: u64,
    pub corrections: Corrections,
    pub reconciles: u64,
    /// Events from the start-up overlap that the scan already reflected.
    pub bootstrap_duplicates: u64,
    /// Where target activity comes from.
    pub activity_source: Option<ActivityMeter>,
    /// Where the configuration in force came from, its mode and rules.
    pub config_origin: String,
    pub mode: String,
    pub rules: Vec<String>,
    pub targets: usize,
    pub reaps: ReapStats,
}

enum Query {
    Snapshot(oneshot::Sender<Vec<Process>>),
    Process(u32, oneshot::Sender<Option<Process>>),
    Exited(Identity, oneshot::Sender<Option<Process>>),
    Stats(oneshot::Sender<PipelineStats>),
    Reconcile(oneshot::Sender<Corrections>),
    Targets(oneshot::Sender<Vec<TargetView>>),
    Sessions(oneshot::Sender<Vec<SessionView>>),
    Explain(u32, oneshot::Sender<Explanation>),
    Reload(Box<Config>, oneshot::Sender<()>),
}

/// A cheap handle to the running pipeline.
#[derive(Clone)]
pub struct PipelineHandle {
    queries: mpsc::Sender<Query>,
    applied: broadcast::Sender<Event>,
}

impl PipelineHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.queries.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Every live process. `None` once the pipeline has stopped.
    pub async fn snapshot(&self) -> Option<Vec<Process>> {
        self.ask(Query::Snapshot).await
    }

    /// The live process at `pid`.
    pub async fn process(&self, pid: u32) -> Option<Process> {
        self.ask(|tx| Query::Process(pid, tx)).await.flatten()
    }

    /// A recently exited process, with its exit status.
    pub async fn exited(&self, id: Identity) -> Option<Process> {
        self.ask(|tx| Query::Exited(id, tx)).await.flatten()
    }

    /// Every event from now on, after the tree applied it. A receiver that falls behind
    /// loses the oldest events (and is told so), never slows the pipeline.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.applied.subscribe()
    }

    pub async fn stats(&self) -> Option<PipelineStats> {
        self.ask(Query::Stats).await
    }

    /// Every target with its verdict.
    pub(crate) async fn targets(&self) -> Option<Vec<TargetView>> {
        self.ask(Query::Targets).await
    }

    /// Every agent session, live or ended.
    pub async fn sessions(&self) -> Option<Vec<SessionView>> {
        self.ask(Query::Sessions).await
    }

    /// Why `pid` is or is not a target.
    pub async fn explain(&self, pid: u32) -> Option<Explanation> {
        self.ask(|tx| Query::Explain(pid, tx)).await
    }

    /// Applies a new (validated) configuration: rules, timeouts, mode, rate limit.
    pub async fn reload(&self, config: Config) -> Option<()> {
        self.ask(|tx| Query::Reload(Box::new(config), tx)).await
    }

    /// Reconciles with `/proc` now; returns what it corrected.
    pub async fn reconcile(&self) -> Option<Corrections> {
        self.ask(Query::Reconcile).await
    }
}

/// The running pipeline. Dropping it stops the tasks and detaches the probes.
pub struct Pipeline {
    handle: PipelineHandle,
    tasks: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Pipeline {
    /// Attaches, bootstraps from `/proc` and starts following events.
    pub async fn start(config: PipelineConfig) -> anyhow::Result<Self> {
        let probes = Self::attach(&config)?;
        Self::start_attached(config, probes).await
    }

    /// Loads and attaches the probes: the part of start-up that needs privileges. Needs no
    /// runtime and starts no thread, so the daemon can do it before it drops its capabilities
    /// and only then start its threads (capabilities are per thread).
    pub fn attach(config: &PipelineConfig) -> Result<Probes, crate::probes::ProbeError> {
        Probes::attach(ProbeOptions {
            ring_bytes: config.config.ring_bytes,
            socket_activity: config.config.activity_source != ActivitySource::ProcIo,
            ..ProbeOptions::default()
        })
    }

    /// Bootstraps from `/proc` and starts following events, with probes from [`Pipeline::attach`].
    pub async fn start_attached(
        config: PipelineConfig,
        mut probes: Probes,
    ) -> anyhow::Result<Self> {
        probes.forward_logs();
        let started = std::time::Instant::now();
        let settings = &config.config;
        let ring = probes.take_ring().expect("ring buffer taken once")?;
        let activity = match (settings.activity_source, probes.socket_activity()) {
            (ActivitySource::ProcIo, _) | (ActivitySource::Auto, false) => ActivityMeter::ProcIo,
            (_, true) => ActivityMeter::Socket,
            (ActivitySource::Socket, false) => anyhow::bail!(
                "activity_source = \"socket\" needs the sock:sock_send_length tracepoint \
                 (kernel 6.3+), which this kernel lacks; use \"auto\" or \"proc-io\""
            ),
        };
        tracing::info!(
            ring_bytes = settings.ring_bytes,
            activity = match activity {
                ActivityMeter::Socket =>
                    "socket bytes (sock:sock_send_length/sock_recv_length, in kernel)",
                ActivityMeter::ProcIo =>
                    "read/write bytes from /proc/PID/io (fallback: no socket tracepoints, or configured)",
            },
            last_word = match (activity, probes.last_word_in_kernel()) {
                (ActivityMeter::Socket, _) => "sock:sock_recv_length (in kernel)",
                (ActivityMeter::ProcIo, true) => "tcp:tcp_rcv_space_adjust (in kernel)",
                (ActivityMeter::ProcIo, false) => "sampled from /proc/PID/io",
            },
            "attached to {}",
            crate::probes::LIFECYCLE_TRACEPOINTS.join(", ")
        );

        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        // Healthy from the start: the tree task beats every second from now on.
        health.beat(clock::mono_ns());
        let ring_bytes = settings.ring_bytes as usize;
        let mut ring = ring::Reader::new(ring, ring_bytes)?;
        health.set_reading(true);

        // The events committed while /proc is scanned are held, and applied on top of the scan.
        let (snapshot, held) = ring
            .hold_while(tokio::task::spawn_blocking(scan::scan))
            .await;
        let snapshot = snapshot??;
        let scanned = snapshot.len();
        let mut tree = ProcessTree::from_scan(snapshot);
        let mut duplicates = 0;
        for record in held.records() {
            if let Some(mut event) = ring::decode_counted(record, &metrics)
                && tree.apply_taking(&mut event) == crate::tree::Applied::AlreadyKnown
            {
                duplicates += 1;
            }
        }
        drop(held);
        let mut host = LiveHost { probes };
        let mut detector = Detector::new(settings, activity);
        metrics
            .activity_source
            .with_label_values(&[match activity {
                ActivityMeter::Socket => "socket",
                ActivityMeter::ProcIo => "proc-io",
            }])
            .set(1);
        detector.publish_names(&mut host);
        detector.adopt_all(&mut tree, clock::mono_ns(), &mut host);
        tracing::info!(
            processes = tree.len(),
            scanned,
            overlap_duplicates = duplicates,
            targets = detector.target_count(),
            mode = ?settings.mode,
            rules = settings.rules.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "process tree ready"
        );

        let (queries_tx, queries_rx) = mpsc::channel(64);
        let (applied, _) = broadcast::channel(16 * 1024);
        let policy = tokio::sync::watch::Sender::new(reap::Policy::new(0, settings));
        let owner = TreeOwner {
            applied: applied.clone(),
            detector,
            reap_stats: ReapStats::default(),
            tree,
            host,
            metrics: metrics.clone(),
            health: health.clone(),
            config,
            reconciles: 0,
            bootstrap_duplicates: duplicates,
            flushes: Vec::new(),
            last_lost: 0,
            pressure_reaping: false,
            next_meminfo_ns: 0,
            scanning: false,
            policy,
        };
        let tree_task = tokio::spawn(owner.run(ring, queries_rx));
        Ok(Self {
            handle: PipelineHandle {
                queries: queries_tx,
                applied,
            },
            tasks: vec![tree_task],
            metrics,
            health,
        })
    }

    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// The exported metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What `/healthz` reports.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Stops following events and detaches the probes.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in tasks.into_iter().rev() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A reconcile's `/proc` scan, done.
struct ScanResult {
    /// Clock ticks since boot when the scan began.
    start_ticks: u64,
    snapshot: std::io::Result<Vec<Snapshot>>,
    reply: Option<oneshot::Sender<Corrections>>,
}

/// What a flush of the ring buffer was asked for: done once every event committed before the
/// request has been applied.
enum FlushFor {
    /// Queries that read the tree.
    Queries(Vec<Query>),
    /// A reconcile: diff with its scan once every older event is applied.
    /// `replies`: whoever asked for this scan.
    Reconcile {
        snapshot: Vec<Snapshot>,
        scan_start_ticks: u64,
        replies: Vec<oneshot::Sender<Corrections>>,
    },
    /// A reconcile found dead processes in the tree: their exits may still be in the ring.
    Confirm {
        fixed: Corrections,
        replies: Vec<oneshot::Sender<Corrections>>,
    },
    /// Targets are due: decide on an up-to-date tree.
    Decide,
    /// Memory is short (this reading): end the largest idle target or leftover.
    Pressure(Pressure),
}

/// The one owner of the tree.
struct TreeOwner {
    tree: ProcessTree,
    detector: Detector,
    reap_stats: ReapStats,
    applied: broadcast::Sender<Event>,
    /// The probes, behind the detector's view of the host (`/proc` and the kernel's maps).
    host: LiveHost,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    config: PipelineConfig,
    reconciles: u64,
    bootstrap_duplicates: u64,
    /// Flushes asked for since the loop last went round: one drain of the ring serves them all,
    /// before the loop waits again.
    flushes: Vec<FlushFor>,
    last_lost: u64,
    /// A decision made because memory was short is out: wait for it before the next.
    pressure_reaping: bool,
    /// When the pressure check reads `/proc/meminfo` again (monotonic ns): sooner the closer
    /// MemAvailable was to its threshold ([`session::meminfo_interval`]).
    next_meminfo_ns: u64,
    /// A `/proc` scan runs: timer and loss scans wait for it (one at a time, however fast
    /// losses come).
    scanning: bool,
    /// The mode and rules in force, by reload generation: a reap decided before a reload
    /// checks them again before its first signal.
    policy: tokio::sync::watch::Sender<reap::Policy>,
}

impl Query {
    /// Whether the answer reads the tree, and so must wait for a flush.
    fn needs_flush(&self) -> bool {
        match self {
            Self::Snapshot(_)
            | Self::Process(..)
            | Self::Exited(..)
            | Self::Targets(_)
            | Self::Sessions(_)
            | Self::Explain(..) => true,
            Self::Stats(_) | Self::Reconcile(_) | Self::Reload(..) => false,
        }
    }
}

impl TreeOwner {
    async fn run(mut self, mut ring: ring::Reader, mut queries: mpsc::Receiver<Query>) {
        let mut reconcile_timer = tokio::time::interval(self.config.config.reconcile_interval);
        reconcile_timer.tick().await; // the first tick is immediate; start-up just scanned
        let mut loss_timer = tokio::time::interval(self.config.loss_check_interval);
        let (scans_tx, mut scans) = mpsc::channel::<ScanResult>(4);
        let (reports_tx, mut reports) = mpsc::channel::<(Decision, ReapReport)>(64);
        loop {
            // Flushes asked for since the last round: everything committed to the ring buffer
            // up to now is applied, then each does what it waited for (which may ask for
            // another: a reconcile's confirmation).
            while !self.flushes.is_empty() {
                self.drain(&mut ring, ring::Drain::Flush);
                for waiter in std::mem::take(&mut self.flushes) {
                    self.flushed(waiter, &scans_tx, &reports_tx);
                }
            }
            let wake = self.detector.next_wakeup(clock::mono_ns());
            let until_due = async move {
                match wake {
                    Some(at) => {
                        tokio::time::sleep(Duration::from_nanos(
                            at.saturating_sub(clock::mono_ns()),
                        ))
                        .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = until_due => {
                    let now = clock::mono_ns();
                    self.detector.sample_due(&self.tree, now, &self.host);
                    if self.detector.any_due(now) {
                        self.request_flush(FlushFor::Decide);
                    }
                }
                Some((decision, report)) = reports.recv() => {
                    self.reap_stats.record(&decision, &report, &self.metrics);
                    if decision.reason == Reason::MemoryPressure {
                        self.pressure_reaping = false;
                    }
                    let settled = match report.outcome {
                        Outcome::WouldKill => Settled::WouldKill,
                        // Still alive after a failure: try again later, not in a loop.
                        Outcome::Failed | Outcome::Refused => Settled::RetryAt(clock::mono_ns() + 60_000_000_000),
                        // Decided again under the configuration now in force (a dry run reports it).
                        Outcome::Cancelled => Settled::RetryAt(clock::mono_ns()),
                        Outcome::Ended | Outcome::AlreadyGone | Outcome::IdentityMismatch => Settled::Gone,
                    };
                    self.detector.settle(decision.target.id, settled);
                }
                due = ring.due() => match due {
                    Ok(how) => self.drain(&mut ring, how),
                    Err(err) => {
                        tracing::error!(%err, "polling the ring buffer failed; the tree is no longer followed");
                        self.health.set_reading(false);
                        return;
                    }
                },
                query = queries.recv() => match query {
                    Some(query) => self.after_flush(query, &scans_tx),
                    None => return,
                },
                _ = reconcile_timer.tick() => self.start_scan(&scans_tx, None),
                _ = loss_timer.tick() => {
                    let now = clock::mono_ns();
                    self.health.beat(now);
                    self.export_targets(now);
                    self.check_memory(now);
                    self.metrics.sync_probe_failures(self.host.probes.watch_failures(), &self.host.probes.read_faults());
                    let counts = self.host.probes.lost();
                    for kind in EventKind::ALL {
                        let counter = self.metrics.events_lost.with_label_values(&[kind.name()]);
                        counter.inc_by(counts.get(kind).saturating_sub(counter.get()));
                    }
                    let lost = counts.total();
                    if lost > self.last_lost {
                        tracing::warn!(lost = lost - self.last_lost, total = lost, "kernel dropped events (ring buffer full); reconciling with /proc");
                        self.last_lost = lost;
                        self.start_scan(&scans_tx, None);
                    }
                }
                Some(scan) = scans.recv() => match self.scanned(scan.snapshot) {
                    Ok(snapshot) => self.request_flush(FlushFor::Reconcile {
                        snapshot,
                        scan_start_ticks: scan.start_ticks,
                        replies: scan.reply.into_iter().collect(),
                    }),
                    Err(err) => tracing::warn!(%err, "scanning /proc failed; will retry"),
                },
            }
        }
    }

    /// Reads the ring buffer (as much as `how` allows), applying each event as it is read.
    fn drain(&mut self, ring: &mut ring::Reader, how: ring::Drain) {
        let tapped = self.applied.receiver_count() > 0;
        let drained = ring.drain(how, |record| {
            let Some(mut event) = ring::decode_counted(record, &self.metrics) else {
                return;
            };
            let whole = tapped.then(|| event.clone());
            // The tree takes the event's strings; the detector reads only its kind, identities
            // and times.
            self.tree.apply_taking(&mut event);
            self.detector
                .on_event(&mut self.tree, &event, &mut self.host);
            if let Some(event) = whole {
                let _ = self.applied.send(event);
            }
        });
        if drained > 0 {
            self.metrics.processes.set(self.tree.len() as i64);
        }
    }

    /// Has `waiter` done once every event committed to the ring buffer before now is applied
    /// (before the tree task's loop waits again).
    fn request_flush(&mut self, waiter: FlushFor) {
        self.flushes.push(waiter);
    }

    /// A flush has completed: every event committed before it was requested is applied.
    fn flushed(
        &mut self,
        waiter: FlushFor,
        scans: &mpsc::Sender<ScanResult>,
        reports: &mpsc::Sender<(Decision, ReapReport)>,
    ) {
        match waiter {
            FlushFor::Queries(queries) => {
                for query in queries {
                    self.answer(query, scans);
                }
            }
            FlushFor::Decide => {
                let now = clock::mono_ns();
                for decision in self.detector.decide(&self.tree, now, &self.host) {
                    spawn_reap(decision, self.policy.subscribe(), reports.clone());
                }
            }
            FlushFor::Pressure(reading) => {
                match self.detector.pressure_decision(
                    &self.tree,
                    clock::mono_ns(),
                    &self.host,
                    &reading,
                ) {
                    Some(decision) => {
                        spawn_reap(decision, self.policy.subscribe(), reports.clone())
                    }
                    None => {
                        self.pressure_reaping = false;
                        tracing::debug!(%reading, "memory is short, but no idle target or leftover to reap");
                    }
                }
            }
            FlushFor::Reconcile {
                snapshot,
                scan_start_ticks,
                replies,
            } => {
                let fixed = self.tree.reconcile(snapshot, scan_start_ticks, scan::alive);
                if !self.tree.has_gone_candidates() {
                    self.reconciled(fixed, replies);
                } else {
                    // Dead processes still in the tree: their exit events may be in the ring yet.
                    self.request_flush(FlushFor::Confirm { fixed, replies });
                }
            }
            FlushFor::Confirm { mut fixed, replies } => {
                fixed.removed = self.tree.confirm_gone();
                self.reconciled(fixed, replies);
            }
        }
    }

    /// Answers `query` once every event committed before now has been applied; queries that
    /// do not read the tree are answered at once.
    fn after_flush(&mut self, query: Query, scans: &mpsc::Sender<ScanResult>) {
        if !query.needs_flush() {
            return self.answer(query, scans);
        }
        // Several queries in one round wait for the same flush.
        match self.flushes.iter_mut().find_map(|f| match f {
            FlushFor::Queries(queries) => Some(queries),
            _ => None,
        }) {
            Some(queries) => queries.push(query),
            None => self.request_flush(FlushFor::Queries(vec![query])),
        }
    }

    fn answer(&mut self, query: Query, scans: &mpsc::Sender<ScanResult>) {
        match query {
            Query::Snapshot(reply) => {
                let _ = reply.send(self.tree.processes().cloned().collect());
            }
            Query::Process(pid, reply) => {
                let _ = reply.send(self.tree.get(pid).cloned());
            }
            Query::Exited(id, reply) => {
                let _ = reply.send(self.tree.exited(id).cloned());
            }
            Query::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Query::Reconcile(reply) => self.start_scan(scans, Some(reply)),
            Query::Targets(reply) => {
                let _ = reply.send(self.detector.views(&self.tree, clock::mono_ns()));
            }
            Query::Sessions(reply) => {
                let _ = reply.send(self.detector.sessions(
                    &self.tree,
                    clock::mono_ns(),
                    &self.host,
                ));
            }
            Query::Reload(config, reply) => {
                self.reload(*config);
                let _ = reply.send(());
            }
            Query::Explain(pid, reply) => {
                let _ = reply.send(self.detector.explain(
                    &self.tree,
                    pid,
                    clock::mono_ns(),
                    &self.host,
                ));
            }
        }
    }

    /// A scan is back: the next timer or loss scan may start.
    fn scanned<T>(&mut self, snapshot: T) -> T {
        self.scanning = false;
        snapshot
    }

    fn start_scan(
        &mut self,
        scans: &mpsc::Sender<ScanResult>,
        reply: Option<oneshot::Sender<Corrections>>,
    ) {
        // Single flight: a scan asked for by the timer or by losses while one runs is the
        // same scan. (An explicit request, which waits for its answer, gets its own.)
        if reply.is_none() && self.scanning {
            return;
        }
        self.scanning = true;
        let scans = scans.clone();
        tokio::spawn(async move {
            let start_ticks = clock::boot_ticks();
            let snapshot = tokio::task::spawn_blocking(scan::scan)
                .await
                .unwrap_or_else(|err| Err(std::io::Error::other(err)));
            let _ = scans
                .send(ScanResult {
                    start_ticks,
                    snapshot,
                    reply,
                })
                .await;
        });
    }

    /// Bookkeeping once a reconcile is complete.
    fn reconciled(&mut self, fixed: Corrections, replies: Vec<oneshot::Sender<Corrections>>) {
        self.reconciles += 1;
        self.metrics.reconciles.inc();
        for (kind, n) in fixed.by_kind() {
            if n > 0 {
                self.metrics
                    .corrections
                    .with_label_values(&[kind])
                    .inc_by(n);
            }
        }
        self.metrics.processes.set(self.tree.len() as i64);
        let renewed = self.tree.take_renewed();
        self.detector
            .classify_new(&mut self.tree, &renewed, clock::mono_ns(), &mut self.host);
        if fixed.total() > 0 {
            tracing::info!(
                ?fixed,
                processes = self.tree.len(),
                "reconciled the tree with /proc"
            );
        } else {
            tracing::debug!(processes = self.tree.len(), "tree matches /proc");
        }
        for reply in replies {
            let _ = reply.send(fixed);
        }
    }

    fn reload(&mut self, config: Config) {
        let old = &self.config.config;
        for (what, changed) in [
            ("ring_bytes", old.ring_bytes != config.ring_bytes),
            (
                "activity_source",
                old.activity_source != config.activity_source,
            ),
            ("metrics_addr", old.metrics_addr != config.metrics_addr),
            (
                "reconcile_interval",
                old.reconcile_interval != config.reconcile_interval,
            ),
        ] {
            if changed {
                tracing::warn!(
                    key = what,
                    "changed in the new configuration; takes effect at the next restart"
                );
            }
        }
        self.detector
            .reconfigure(&config, &mut self.tree, clock::mono_ns(), &mut self.host);
        // The memory threshold may have moved.
        self.next_meminfo_ns = 0;
        tracing::info!(
            origin = %config.origin,
            mode = ?config.mode,
            rules = %config.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
            targets = self.detector.target_count(),
            "configuration reloaded"
        );
        // Reaps decided before now and not yet started see this before their first signal.
        let generation = self.policy.borrow().generation + 1;
        self.policy
            .send_replace(reap::Policy::new(generation, &config));
        self.config.config = config;
    }

    /// Reads the memory pressure source; when memory is short, asks for one reap (after a
    /// flush).
    fn check_memory(&mut self, now: u64) {
        let mp = self.detector.memory_pressure();
        if !mp.enabled || self.pressure_reaping {
            return;
        }
        let psi = std::fs::read_to_string(&mp.file).ok();
        // Unread while far from its threshold: it cannot have crossed it since the last read.
        let due = now >= self.next_meminfo_ns;
        let meminfo = due
            .then(|| std::fs::read_to_string("/proc/meminfo").ok())
            .flatten();
        let reading = Pressure::parse(psi.as_deref(), meminfo.as_deref());
        if due {
            let wait = session::meminfo_interval(reading.available_percent, mp.available_percent);
            self.next_meminfo_ns = now.saturating_add(wait.as_nanos() as u64);
        }
        if !reading.short(mp) {
            return;
        }
        self.pressure_reaping = true;
        self.request_flush(FlushFor::Pressure(reading));
    }

    /// `reaper_targets{rule,state}` from the detector's current verdicts.
    fn export_targets(&self, now: u64) {
        self.metrics.targets.reset();
        for view in self.detector.views(&self.tree, now) {
            self.metrics
                .targets
                .with_label_values(&[view.rule.as_str(), view.verdict.state()])
                .inc();
        }
        let deferred = self.detector.rate_limit_deferrals();
        self.metrics
            .rate_limit_deferrals
            .inc_by(deferred.saturating_sub(self.metrics.rate_limit_deferrals.get()));
        let counts = self.detector.session_counts(now);
        for (state, n) in counts.states {
            self.metrics.sessions.with_label_values(&[state]).set(n);
        }
        for (kind, n) in counts.leftovers {
            self.metrics
                .leftovers
                .with_label_values(&[kind.as_str()])
                .set(n);
        }
    }

    fn stats(&self) -> PipelineStats {
        let lost: LostCounts = self.host.probes.lost();
        PipelineStats {
            processes: self.tree.len(),
            events: EventKind::ALL
                .iter()
                .map(|k| (k.name(), self.metrics.events(*k)))
                .collect(),
            events_total: self.metrics.events_total(),
            lost: EventKind::ALL
                .iter()
                .map(|k| (k.name(), lost.get(*k)))
                .collect(),
            lost_total: lost.total(),
            decode_errors: self.metrics.decode_errors.get(),
            corrections: self.tree.corrections(),
            reconciles: self.reconciles,
            bootstrap_duplicates: self.bootstrap_duplicates,
            activity_source: Some(self.detector.meter()),
            config_origin: self.config.config.origin.clone(),
            mode: format!("{:?}", self.config.config.mode),
            rules: self
                .config
                .config
                .rules
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            targets: self.detector.target_count(),
            reaps: self.reap_stats.clone(),
        }
    }
}

/// Carries out one decision on its own task and reports back. A reload (`policy` changes)
/// between now and the first signal that switches to dry-run or removes the decision's rule
/// cancels it.
fn spawn_reap(
    decision: Decision,
    policy: tokio::sync::watch::Receiver<reap::Policy>,
    reports: mpsc::Sender<(Decision, ReapReport)>,
) {
    let decided = policy.borrow().generation;
    tokio::spawn(async move {
        let report =
            reap::execute_unless(&Pidfds, &decision, |d| policy.borrow().cancels(decided, d)).await;
        log_report(&decision, &report);
        let _ = reports.send((decision, report)).await;
    });
}

/// One structured line per kill or would-kill.
fn log_report(d: &Decision, report: &ReapReport) {
    let steps = report
        .steps
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let descendants = d.descendants.len();
    macro_rules! line {
        ($level:ident, $msg:literal) => {
            tracing::$level!(
                pid = d.target.id.pid,
                start_time = d.target.id.start_ticks,
                uid = d.target.uid,
                ppid = d.ppid,
                parent_comm = %crate::events::quoted(&d.parent_comm),
                argv = %crate::events::quoted(&d.argv),
                rule = %d.rule,
                reason = d.reason.as_str(),
                idle_secs = format_args!("{:.1}", d.idle_secs),
                rss_bytes = report.rss_bytes,
                descendants,
                other_uid = d.other_uid,
                unit = d.attribution.unit.as_deref().unwrap_or(""),
                container = d.attribution.container.as_deref().unwrap_or(""),
                pod = d.attribution.pod.as_deref().unwrap_or(""),
                kind = d.kind.map_or("", |k| k.as_str()),
                note = %d.note,
                step = report.step.map_or("", |s| s.as_str()),
                steps = %steps,
                outcome = report.outcome.as_str(),
                error = report.error.as_deref().unwrap_or(""),
                $msg
            )
        };
    }
    match report.outcome {
        Outcome::WouldKill => line!(warn, "would reap (dry run)"),
        Outcome::Ended => line!(warn, "reaped"),
        Outcome::AlreadyGone | Outcome::IdentityMismatch => {
            line!(info, "not reaped: gone or changed before the first step")
        }
        Outcome::Cancelled => line!(
            info,
            "not reaped: a reload cancelled it before the first step"
        ),
        Outcome::Refused | Outcome::Failed => line!(error, "reap failed"),
    }
}
