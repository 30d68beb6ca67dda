//! What reaper did, for Prometheus: one registry per daemon, updated where things happen (the
//! ring buffer reader, the tree task, the reaper) and rendered in the text format by
//! [`crate::http`].
//!
//! Names follow Prometheus conventions: base units, `_total` for counters.
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use reaper_common::EventKind;

use crate::probes::KindCounts;
use crate::{config::Mode, detect::Reason, reap::Step};

/// The git revision the binary was built from (`unknown` outside a git checkout), set by
/// build.rs; `reaper --version` and `reaper_build_info` show it.
pub(crate) const GIT_REVISION: &str = env!("REAPER_GIT_REVISION");
/// The rustc that built the binary, e.g. `1.95.0`.
pub(crate) const RUSTC_VERSION: &str = env!("REAPER_RUSTC_VERSION");

/// Label values of `reaper_mode`.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::DryRun => "dry-run",
    }
}

pub struct Metrics {
    registry: Registry,
    /// Per kind, in `EventKind::ALL` order: the hot path skips the label lookup.
    events: [IntCounter; EventKind::ALL.len()],
    pub events_lost: IntCounterVec,
    pub decode_errors: IntCounter,
    pub processes: IntGauge,
    pub targets: IntGaugeVec,
    pub kills: IntCounterVec,
    pub kill_failures: IntCounterVec,
    pub would_kill: IntCounterVec,
    pub reclaimed_bytes: IntCounter,
    pub corrections: IntCounterVec,
    pub reconciles: IntCounter,
    pub kill_delay: HistogramVec,
    pub activity_source: IntGaugeVec,
    pub sessions: IntGaugeVec,
    pub leftovers: IntGaugeVec,
    pub leftover_kills: IntCounterVec,
    pub runaway_kills: IntCounter,
    pub pressure_kills: IntCounter,
    pub rate_limit_deferrals: IntCounter,
    pub watch_failures: IntCounter,
    pub read_faults: IntCounterVec,
    /// 1 for the mode in force (`enforce` or `dry-run`), 0 for the other.
    mode: IntGaugeVec,
    /// Whether the last configuration (re)load succeeded; its time (Unix seconds).
    pub reload_successful: IntGauge,
    pub reload_success_time: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.expect("valid metric definition");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let events_vec = register!(IntCounterVec::new(
            Opts::new(
                "reaper_events_total",
                "Lifecycle events received from the kernel, by kind."
            ),
            &["kind"],
        ));
        let events = EventKind::ALL.map(|k| events_vec.with_label_values(&[k.name()]));
        let kill_delay =
            register!(HistogramVec::new(
            HistogramOpts::new(
                "reaper_kill_delay_seconds",
                "From a target's idle (or orphan) deadline to the process being gone, by the step \
                 that ended it."
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            &["step"],
        ));
        for step in crate::reap::Step::ALL {
            kill_delay.with_label_values(&[step.as_str()]);
        }
        let events_lost = register!(IntCounterVec::new(
            Opts::new(
                "reaper_events_lost_total",
                "Events the kernel could not hand over (ring buffer full), by kind."
            ),
            &["kind"],
        ));
        for k in EventKind::ALL {
            events_lost.with_label_values(&[k.name()]);
        }
        let build_info = register!(IntGaugeVec::new(
            Opts::new(
                "reaper_build_info",
                "Always 1; the version, git revision and rustc version are in the labels."
            ),
            &["version", "revision", "rustc_version"],
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_REVISION, RUSTC_VERSION])
            .set(1);
        let read_faults = register!(IntCounterVec::new(
            Opts::new(
                "reaper_kernel_read_faults_total",
                "Kernel reads in reaper's eBPF programs that faulted, by event kind; the event was not sent."
            ),
            &["kind"],
        ));
        for k in EventKind::ALL {
            read_faults.with_label_values(&[k.name()]);
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_start_time_seconds, …: the names every Prometheus client exports.
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics registered once");
        Self {
            events,
            events_lost,
            decode_errors: register!(IntCounter::new(
                "reaper_decode_errors_total",
                "Ring buffer records that could not be decoded."
            )),
            processes: register!(IntGauge::new(
                "reaper_processes",
                "Processes in the live process tree."
            )),
            targets: register!(IntGaugeVec::new(
                Opts::new(
                    "reaper_targets",
                    "Processes matching a rule, by rule and verdict."
                ),
                &["rule", "state"],
            )),
            kills: register!(IntCounterVec::new(
                Opts::new(
                    "reaper_kills_total",
                    "Targets ended, by rule, reason and the step of the kill ladder that ended \
                     them (closed, interrupted, terminated, killed)."
                ),
                &["rule", "reason", "step"],
            )),
            kill_failures: register!(IntCounterVec::new(
                Opts::new(
                    "reaper_kill_failures_total",
                    "Kills that failed, by rule and reason."
                ),
                &["rule", "reason"],
            )),
            would_kill: register!(IntCounterVec::new(
                Opts::new(
                    "reaper_would_kill_total",
                    "Targets that would have been killed (dry-run), by rule and reason."
                ),
                &["rule", "reason"],
            )),
            reclaimed_bytes: register!(IntCounter::new(
                "reaper_reclaimed_bytes_total",
                "Resident memory of killed targets and their descendants, in bytes."
            )),
            corrections: register!(IntCounterVec::new(
                Opts::new(
                    "reaper_reconcile_corrections_total",
                    "Differences between the tree and /proc repaired by reconciliation, by kind."
                ),
                &["kind"],
            )),
            reconciles: register!(IntCounter::new(
                "reaper_reconciles_total",
                "Reconciliations of the tree against /proc."
            )),
            kill_delay,
            sessions: register!(IntGaugeVec::new(
                Opts::new(
                    "reaper_sessions",
                    "Agent sessions by state: active, idle, turn_in_flight, leaked, ended."
                ),
                &["state"],
            )),
            leftovers: register!(IntGaugeVec::new(
                Opts::new(
                    "reaper_leftovers",
                    "Descendants of ended sessions still alive after leftover_grace, by kind \
                     (stdio_server, tool, other)."
                ),
                &["kind"],
            )),
            leftover_kills: register!(IntCounterVec::new(
                Opts::new("reaper_leftover_kills_total", "Leftovers ended, by kind."),
                &["kind"],
            )),
            runaway_kills: register!(IntCounter::new(
                "reaper_runaway_kills_total",
                "Agent CLIs ended because they lost their terminal and kept burning CPU."
            )),
            rate_limit_deferrals: register!(IntCounter::new(
                "reaper_rate_limit_deferrals_total",
                "Kills held back because max_kills_per_minute was reached."
            )),
            pressure_kills: register!(IntCounter::new(
                "reaper_memory_pressure_kills_total",
                "Idle targets and leftovers ended early because memory was short."
            )),
            activity_source: register!(IntGaugeVec::new(
                Opts::new(
                    "reaper_activity_source",
                    "1 for the source of target activity in use (socket or proc-io)."
                ),
                &["source"],
            )),
            watch_failures: register!(IntCounter::new(
                "reaper_watch_failures_total",
                "Processes that could not be watched for socket activity (a map was full); \
                 their targets are not reaped as idle."
            )),
            read_faults,
            mode: register!(IntGaugeVec::new(
                Opts::new(
                    "reaper_mode",
                    "1 for the mode in force: enforce or dry-run."
                ),
                &["mode"],
            )),
            reload_successful: register!(IntGauge::new(
                "reaper_config_last_reload_successful",
                "1 if the last load of the configuration (at start or on SIGHUP) succeeded."
            )),
            reload_success_time: register!(Gauge::new(
                "reaper_config_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded (Unix time)."
            )),
            registry,
        }
    }

    /// Brings the counters read from the probes up to their totals (they only grow).
    pub(crate) fn sync_probe_failures(&self, watch_failures: u64, read_faults: &KindCounts) {
        self.watch_failures
            .inc_by(watch_failures.saturating_sub(self.watch_failures.get()));
        for kind in EventKind::ALL {
            let counter = self.read_faults.with_label_values(&[kind.name()]);
            counter.inc_by(read_faults.get(kind).saturating_sub(counter.get()));
        }
    }

    /// The configuration in force: its mode, and every label set its rules can produce (and
    /// the kill delay of every step), so that the first kill (or failure) is an increase from 0
    /// rather than a new series that `increase()` and `rate()` cannot see.
    pub fn configured(&self, mode: Mode, rules: &[&str]) {
        for m in [Mode::Enforce, Mode::DryRun] {
            self.mode
                .with_label_values(&[mode_name(m)])
                .set(i64::from(m == mode));
        }
        for step in Step::ALL {
            self.kill_delay.with_label_values(&[step.as_str()]);
        }
        for rule in rules {
            for reason in Reason::ALL {
                let reason = reason.as_str();
                for step in Step::ALL {
                    self.kills.with_label_values(&[rule, reason, step.as_str()]);
                }
                self.kill_failures.with_label_values(&[rule, reason]);
                self.would_kill.with_label_values(&[rule, reason]);
            }
        }
    }

    /// A (re)load of the configuration: `ok` false when a new file was refused.
    pub fn reloaded(&self, ok: bool) {
        self.reload_successful.set(i64::from(ok));
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.reload_success_time.set(now);
        }
    }

    /// Counts one decoded event.
    pub(crate) fn event(&self, kind: EventKind) {
        self.events[kind.index()].inc();
    }

    pub(crate) fn events(&self, kind: EventKind) -> u64 {
        self.events[kind.index()].get()
    }

    pub(crate) fn events_total(&self) -> u64 {
        self.events.iter().map(IntCounter::get).sum()
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|err| format!("# encoding failed: {err}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_fixed_family() {
        let m = Metrics::new();
        m.event(EventKind::Exec);
        m.kills
            .with_label_values(&["claude-sdk", "idle", "closed"])
            .inc();
        m.kill_failures
            .with_label_values(&["claude-sdk", "idle"])
            .inc();
        m.would_kill
            .with_label_values(&["claude-sdk", "idle"])
            .inc();
        m.targets.with_label_values(&["claude-sdk", "idle"]).set(2);
        m.corrections.with_label_values(&["added"]).inc();
        m.kill_delay.with_label_values(&["closed"]).observe(0.2);
        let text = m.render();
        for family in [
            "reaper_events_total{kind=\"exec\"} 1",
            "reaper_events_lost_total{kind=\"fork\"} 0",
            "reaper_decode_errors_total 0",
            "reaper_processes 0",
            "reaper_targets{rule=\"claude-sdk\",state=\"idle\"} 2",
            "reaper_kills_total{reason=\"idle\",rule=\"claude-sdk\",step=\"closed\"} 1",
            "reaper_kill_failures_total{reason=\"idle\",rule=\"claude-sdk\"} 1",
            "reaper_would_kill_total{reason=\"idle\",rule=\"claude-sdk\"} 1",
            "reaper_reclaimed_bytes_total 0",
            "reaper_reconcile_corrections_total{kind=\"added\"} 1",
            "reaper_kill_delay_seconds_count{step=\"closed\"} 1",
            "reaper_watch_failures_total 0",
            "reaper_kernel_read_faults_total{kind=\"exit\"} 0",
            "reaper_build_info{revision=",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(family), "missing {family} in:\n{text}");
        }
        assert_eq!(m.events_total(), 1);
    }

    #[test]
    fn probe_failures_follow_their_totals() {
        let m = Metrics::new();
        let mut faults = KindCounts::default();
        faults.set(EventKind::Exec, 3);
        m.sync_probe_failures(2, &faults);
        m.sync_probe_failures(5, &faults);
        let text = m.render();
        assert!(text.contains("reaper_watch_failures_total 5"), "{text}");
        assert!(
            text.contains("reaper_kernel_read_faults_total{kind=\"exec\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("reaper_kernel_read_faults_total{kind=\"fork\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn every_known_label_set_exists_from_the_start() {
        let m = Metrics::new();
        m.configured(Mode::DryRun, &["claude-sdk", "other"]);
        let text = m.render();
        for rule in ["claude-sdk", "other"] {
            for reason in ["idle", "orphaned"] {
                for step in ["closed", "interrupted", "terminated", "killed"] {
                    let line = format!(
                        "reaper_kills_total{{reason=\"{reason}\",rule=\"{rule}\",step=\"{step}\"}} 0"
                    );
                    assert!(text.contains(&line), "missing {line}");
                }
                let line =
                    format!("reaper_kill_failures_total{{reason=\"{reason}\",rule=\"{rule}\"}} 0");
                assert!(text.contains(&line), "missing {line}");
            }
        }
        assert!(
            text.contains("reaper_kill_delay_seconds_count{step=\"killed\"} 0"),
            "{text}"
        );
        assert!(text.contains("reaper_mode{mode=\"dry-run\"} 1"), "{text}");
        assert!(text.contains("reaper_mode{mode=\"enforce\"} 0"), "{text}");
        m.configured(Mode::Enforce, &["claude-sdk"]);
        let text = m.render();
        assert!(text.contains("reaper_mode{mode=\"enforce\"} 1"), "{text}");
        assert!(text.contains("reaper_mode{mode=\"dry-run\"} 0"), "{text}");
        m.reloaded(false);
        assert!(
            m.render()
                .contains("reaper_config_last_reload_successful 0")
        );
    }
}
