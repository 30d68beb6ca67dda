//! The metrics endpoint: `GET /metrics` (Prometheus text format) and `GET /healthz`. Read-only:
//! nothing served here can change what reaper does.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::metrics::Metrics;

/// Liveness of the pipeline, as `/healthz` reports it.
#[derive(Debug, Default)]
pub struct Health {
    /// The ring buffer reader is running.
    reading: AtomicBool,
    /// Last time (boot-time ns) the tree task went round its loop.
    heartbeat_ns: AtomicU64,
}

/// A tree task silent for this long is considered stuck.
const STALE_NS: u64 = 5_000_000_000;

impl Health {
    pub fn set_reading(&self, reading: bool) {
        self.reading.store(reading, Ordering::Relaxed);
    }

    pub fn beat(&self, now_ns: u64) {
        self.heartbeat_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Healthy: probes attached and the ring buffer read, the tree task alive.
    pub fn healthy(&self, now_ns: u64) -> Result<(), &'static str> {
        if !self.reading.load(Ordering::Relaxed) {
            return Err("the ring buffer is not being read");
        }
        let beat = self.heartbeat_ns.load(Ordering::Relaxed);
        if beat == 0 || now_ns.saturating_sub(beat) > STALE_NS {
            return Err("the process tree task is not running");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds `addr` now (so a taken port fails start-up) and returns the server to run.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(Shared { metrics, health });
    tracing::info!(%addr, "serving /metrics and /healthz");
    Ok(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "metrics endpoint stopped");
        }
    })
}

async fn metrics_page(State(s): State<Shared>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match s.health.healthy(crate::clock::mono_ns()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_while_reading_and_beating() {
        let h = Health::default();
        assert!(h.healthy(10).is_err(), "nothing started");
        h.set_reading(true);
        assert!(h.healthy(10).is_err(), "no heartbeat yet");
        h.beat(10);
        assert!(h.healthy(10 + STALE_NS).is_ok());
        assert!(h.healthy(11 + STALE_NS).is_err(), "stale heartbeat");
        h.beat(20);
        h.set_reading(false);
        assert!(h.healthy(20).is_err(), "reader stopped");
    }
}
