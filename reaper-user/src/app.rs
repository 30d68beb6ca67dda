//! Wires the stages together; the one place to read first.
//!
//! ```text
//! probes (BTF tracepoints) ─► ring buffer ─► events::source ─► tree task ─► queries
//!                                                  ▲                │
//!                                   flush marker ──┘                └─ /proc reconcile
//! ```
//!
//! Start-up has no gap: the probes attach first, then `/proc` is scanned, then the events
//! buffered meanwhile are applied on top of the scan (deduplicated by identity).
//! Reconciliation scans `/proc` on a timer and right after the kernel reports lost events;
//! before diffing, it asks the source to flush the ring buffer, so every event older than the
//! scan has been applied.
use std::{sync::Arc, time::Duration};

use reaper_common::EventKind;
use serde::Serialize;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    events::{
        Event, Identity,
        source::{self, SourceMsg, SourceStats},
    },
    probes::{LostCounts, ProbeOptions, Probes},
    tree::{Corrections, Process, ProcessTree, Snapshot, scan},
};

/// Pipeline settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub probes: ProbeOptions,
    /// How often the tree is checked against `/proc` (and at once after any loss).
    pub reconcile_interval: Duration,
    /// How often the kernel's loss counters are read.
    pub loss_check_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            probes: ProbeOptions::default(),
            reconcile_interval: Duration::from_secs(60),
            loss_check_interval: Duration::from_secs(1),
        }
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
}

enum Query {
    Snapshot(oneshot::Sender<Vec<Process>>),
    Process(u32, oneshot::Sender<Option<Process>>),
    Exited(Identity, oneshot::Sender<Option<Process>>),
    Stats(oneshot::Sender<PipelineStats>),
    Reconcile(oneshot::Sender<Corrections>),
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

    /// Reconciles with `/proc` now; returns what it corrected.
    pub async fn reconcile(&self) -> Option<Corrections> {
        self.ask(Query::Reconcile).await
    }
}

/// The running pipeline. Dropping it stops the tasks and detaches the probes.
pub struct Pipeline {
    handle: PipelineHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Attaches, bootstraps from `/proc` and starts following events.
    pub async fn start(config: PipelineConfig) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        let mut probes = Probes::attach(config.probes)?;
        let ring = probes.take_ring().expect("ring buffer taken once")?;
        tracing::info!(
            ring_bytes = config.probes.ring_bytes,
            "attached to sched_process_fork, sched_process_exec, sched_process_exit, task_rename"
        );

        let stats = Arc::new(SourceStats::default());
        // Bounded: if the tree falls behind, the source waits and the kernel counts losses,
        // rather than memory growing without limit.
        let (events_tx, mut events_rx) = mpsc::channel(256);
        let (flush_tx, flush_rx) = mpsc::channel(4);
        let source = tokio::spawn({
            let stats = stats.clone();
            async move {
                if let Err(err) = source::run(ring, events_tx, flush_rx, stats).await {
                    tracing::error!(%err, "ring buffer reader failed");
                }
            }
        });

        // Events keep arriving in the channel while /proc is scanned.
        let snapshot = tokio::task::spawn_blocking(scan::scan).await??;
        let scanned = snapshot.len();
        let mut tree = ProcessTree::from_scan(snapshot);
        let mut duplicates = 0;
        while let Ok(msg) = events_rx.try_recv() {
            if let SourceMsg::Events(batch) = msg {
                for event in &batch {
                    if tree.apply(event) == crate::tree::Applied::AlreadyKnown {
                        duplicates += 1;
                    }
                }
            }
        }
        tracing::info!(
            processes = tree.len(),
            scanned,
            overlap_duplicates = duplicates,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "process tree ready"
        );

        let (queries_tx, queries_rx) = mpsc::channel(64);
        let (applied, _) = broadcast::channel(16 * 1024);
        let owner = TreeOwner {
            applied: applied.clone(),
            tree,
            probes,
            stats,
            flush: flush_tx,
            config,
            reconciles: 0,
            bootstrap_duplicates: duplicates,
            pending: None,
            next_token: 0,
            last_lost: 0,
        };
        let tree_task = tokio::spawn(owner.run(events_rx, queries_rx));
        Ok(Self {
            handle: PipelineHandle {
                queries: queries_tx,
                applied,
            },
            tasks: vec![source, tree_task],
        })
    }

    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Stops following events and detaches the probes.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
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

/// A reconcile in progress: the scan is done, waiting for the ring buffer to be flushed.
struct PendingReconcile {
    token: u64,
    snapshot: Vec<Snapshot>,
    scan_start_ticks: u64,
    reply: Option<oneshot::Sender<Corrections>>,
}

/// The one owner of the tree.
struct TreeOwner {
    tree: ProcessTree,
    applied: broadcast::Sender<Event>,
    probes: Probes,
    stats: Arc<SourceStats>,
    flush: mpsc::Sender<u64>,
    config: PipelineConfig,
    reconciles: u64,
    bootstrap_duplicates: u64,
    pending: Option<PendingReconcile>,
    next_token: u64,
    last_lost: u64,
}

type ScanResult = (u64, std::io::Result<Vec<Snapshot>>, Option<oneshot::Sender<Corrections>>);

impl TreeOwner {
    async fn run(mut self, mut events: mpsc::Receiver<SourceMsg>, mut queries: mpsc::Receiver<Query>) {
        let mut reconcile_timer = tokio::time::interval(self.config.reconcile_interval);
        reconcile_timer.tick().await; // the first tick is immediate; start-up just scanned
        let mut loss_timer = tokio::time::interval(self.config.loss_check_interval);
        let (scans_tx, mut scans) = mpsc::channel::<ScanResult>(4);
        loop {
            tokio::select! {
                msg = events.recv() => match msg {
                    Some(SourceMsg::Events(batch)) => {
                        let tapped = self.applied.receiver_count() > 0;
                        for event in batch {
                            self.tree.apply(&event);
                            if tapped {
                                let _ = self.applied.send(event);
                            }
                        }
                    }
                    Some(SourceMsg::Flushed(token)) => self.finish_reconcile(token),
                    None => {
                        tracing::error!("event source stopped; the tree is no longer followed");
                        return;
                    }
                },
                query = queries.recv() => match query {
                    Some(Query::Snapshot(reply)) => {
                        let _ = reply.send(self.tree.processes().cloned().collect());
                    }
                    Some(Query::Process(pid, reply)) => {
                        let _ = reply.send(self.tree.get(pid).cloned());
                    }
                    Some(Query::Exited(id, reply)) => {
                        let _ = reply.send(self.tree.exited(id).cloned());
                    }
                    Some(Query::Stats(reply)) => {
                        let _ = reply.send(self.stats());
                    }
                    Some(Query::Reconcile(reply)) => self.start_scan(&scans_tx, Some(reply)),
                    None => return,
                },
                _ = reconcile_timer.tick() => self.start_scan(&scans_tx, None),
                _ = loss_timer.tick() => {
                    let lost = self.probes.lost().total();
                    if lost > self.last_lost {
                        tracing::warn!(lost = lost - self.last_lost, total = lost, "kernel dropped events (ring buffer full); reconciling with /proc");
                        self.last_lost = lost;
                        self.start_scan(&scans_tx, None);
                    }
                }
                Some((scan_start_ticks, result, reply)) = scans.recv() => match result {
                    Ok(snapshot) => {
                        self.next_token += 1;
                        let token = self.next_token;
                        // A newer scan supersedes one still waiting for its flush.
                        if let Some(old) = self.pending.replace(PendingReconcile { token, snapshot, scan_start_ticks, reply }) {
                            if let Some(reply) = old.reply { let _ = reply.send(Corrections::default()); }
                        }
                        if self.flush.send(token).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => tracing::warn!(%err, "scanning /proc failed; will retry"),
                },
            }
        }
    }

    fn start_scan(&self, scans: &mpsc::Sender<ScanResult>, reply: Option<oneshot::Sender<Corrections>>) {
        let scans = scans.clone();
        tokio::spawn(async move {
            let started = scan::now_ticks();
            let result = tokio::task::spawn_blocking(scan::scan)
                .await
                .unwrap_or_else(|err| Err(std::io::Error::other(err)));
            let _ = scans.send((started, result, reply)).await;
        });
    }

    fn finish_reconcile(&mut self, token: u64) {
        let Some(pending) = self.pending.take_if(|p| p.token == token) else {
            return;
        };
        let fixed = self
            .tree
            .reconcile(pending.snapshot, pending.scan_start_ticks, scan::alive);
        self.reconciles += 1;
        if fixed.total() > 0 {
            tracing::info!(?fixed, processes = self.tree.len(), "reconciled the tree with /proc");
        } else {
            tracing::debug!(processes = self.tree.len(), "tree matches /proc");
        }
        if let Some(reply) = pending.reply {
            let _ = reply.send(fixed);
        }
    }

    fn stats(&self) -> PipelineStats {
        let lost: LostCounts = self.probes.lost();
        PipelineStats {
            processes: self.tree.len(),
            events: EventKind::ALL
                .iter()
                .map(|k| (k.name(), self.stats.events(*k)))
                .collect(),
            events_total: self.stats.events_total(),
            lost: EventKind::ALL.iter().map(|k| (k.name(), lost.get(*k))).collect(),
            lost_total: lost.total(),
            decode_errors: self.stats.decode_errors(),
            corrections: self.tree.corrections(),
            reconciles: self.reconciles,
            bootstrap_duplicates: self.bootstrap_duplicates,
        }
    }
}
