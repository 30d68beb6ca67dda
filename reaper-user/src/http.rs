//! The metrics endpoint: `GET /metrics` (Prometheus text format) and `GET /healthz`. Read-only:
//! nothing served here can change what reaper does.
//!
//! Bounded against a local user who opens connections and sends nothing: a connection limit,
//! a deadline for each request head (which also ends idle keep-alive connections) and a longest
//! connection life, with hyper's own settings; accept errors (out of file descriptors) back off
//! instead of spinning.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
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
    pub(crate) fn set_reading(&self, reading: bool) {
        self.reading.store(reading, Ordering::Relaxed);
    }

    pub(crate) fn beat(&self, now_ns: u64) {
        self.heartbeat_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Healthy: probes attached and the ring buffer read, the tree task alive.
    pub(crate) fn healthy(&self, now_ns: u64) -> Result<(), &'static str> {
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

/// Most connections served at once. Prometheus needs one; a connection beyond this is closed
/// as soon as it is accepted (so the kernel's accept queue keeps draining, and a `/healthz`
/// behind a flood is accepted and answered once a slot frees up).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must send a complete request head within this time, the first and every later
/// one: an idle keep-alive connection is closed after it too (hyper starts the timer whenever it
/// waits for a head: `poll_read_head` in hyper's `proto/h1/conn.rs`).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, however slowly it reads its answers.
pub(crate) const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// The bound, not yet served endpoint.
pub struct Endpoint {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

/// Binds `addr` now (so a taken port fails start-up, and binding happens while the daemon still
/// holds every privilege); [`Endpoint::serve`] runs it, on a tokio runtime.
pub fn bind(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(Endpoint { listener, addr })
}

impl Endpoint {
    /// Serves until dropped: HTTP/1.1 through hyper, at most [`MAX_CONNECTIONS`] at once, each
    /// closed after [`HEADER_TIMEOUT`] without a request and after [`MAX_CONNECTION_LIFE`].
    pub async fn serve(self, metrics: Arc<Metrics>, health: Arc<Health>) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(err) => return tracing::error!(%err, "metrics endpoint stopped"),
        };
        let app = Router::new()
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(healthz))
            .with_state(Shared { metrics, health });
        tracing::info!(
            addr = %self.addr,
            max_connections = MAX_CONNECTIONS,
            header_timeout_secs = HEADER_TIMEOUT.as_secs(),
            "serving /metrics and /healthz"
        );
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut errors = crate::ipc::AcceptErrors::new("the metrics endpoint");
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    errors.failed(&err).await;
                    continue;
                }
            };
            errors.accepted();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(
                    max = MAX_CONNECTIONS,
                    "metrics endpoint full: closed a new connection"
                );
                continue; // dropping the stream closes it
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                match tokio::time::timeout(MAX_CONNECTION_LIFE, connection).await {
                    Ok(Err(err)) => tracing::debug!(%err, "metrics connection ended"),
                    Err(_) => tracing::debug!("metrics connection closed: too long"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
        }
    }
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
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
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
