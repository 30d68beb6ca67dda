//! Ring buffer → decoded event batches on a channel.
//!
//! The ring buffer's fd is polled with tokio's `AsyncFd`, and drained on a timer. Wake-ups are
//! batched: by default the kernel wakes a reader whenever it has caught up (bpf_ringbuf_commit()
//! in <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/ringbuf.c>), which for a fast
//! reader is every record — measured: ≈ 1.25 context switches per event in a fork storm. So the
//! programs submit with `BPF_RB_NO_WAKEUP` until their CPU has submitted its share of an eighth
//! of the ring since it last woke the reader (then `BPF_RB_FORCE_WAKEUP`), and this reader also
//! drains on a timer ([`POLL_MIN`] while events
//! flow, backing off to [`POLL_MAX`] when quiet). Each drain forwards everything there is as one
//! `Vec`.
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Event, decode};
use crate::metrics::Metrics;

/// Most events forwarded in one message; a storm is split rather than buffered unboundedly.
const MAX_BATCH: usize = 4096;

/// The smallest record the ring can hold: its 8-byte header and the smallest event (exit).
const MIN_RECORD_BYTES: usize = 8 + size_of::<reaper_common::ExitEvent>();

/// How often the ring is drained without a wake-up while events flow…
pub(crate) const POLL_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// …backing off (doubling) to this while drains find nothing: the longest an event waits on a
/// quiet host. A fixed 100 ms timer cost a quiet daemon ≈ 0.17 % of a core (measured).
pub(crate) const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(1600);

/// What the source sends downstream, in ring buffer order.
#[derive(Debug)]
pub enum RingMsg {
    Events(Vec<Event>),
    /// Everything committed to the ring buffer before the flush request with this token was
    /// sent has been forwarded.
    Flushed(u64),
}

/// Reads `ring` (`ring_bytes` long) until `tx` is closed. Flush requests (tokens) arrive on
/// `flush`.
///
/// One drain reads at most a ring's worth of records (`ring_bytes` / the smallest record), then
/// goes back to the loop: a storm that keeps the ring full cannot hold a flush off, and once a
/// ring's worth has been read after a flush was asked for, every record committed before the
/// request has been read.
pub async fn run(
    ring: RingBuf<MapData>,
    ring_bytes: usize,
    tx: mpsc::Sender<RingMsg>,
    mut flush: mpsc::UnboundedReceiver<u64>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let limit = (ring_bytes / MIN_RECORD_BYTES).max(MAX_BATCH);
    // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged for as long as the
    // AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    let mut delay = POLL_MIN;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {
                let Some(drained) = drain(fd.get_mut(), &tx, &metrics, limit).await else {
                    return Ok(());
                };
                delay = if drained > 0 { POLL_MIN } else { (delay * 2).min(POLL_MAX) };
            }
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let Some(drained) = drain(guard.get_inner_mut(), &tx, &metrics, limit).await else {
                    return Ok(());
                };
                // Still readable if the drain stopped at its limit: the loop comes back at once.
                if drained < limit {
                    guard.clear_ready();
                }
                delay = POLL_MIN;
            }
            token = flush.recv() => {
                let Some(token) = token else { return Ok(()) };
                if drain(fd.get_mut(), &tx, &metrics, limit).await.is_none()
                    || tx.send(RingMsg::Flushed(token)).await.is_err()
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Forwards the records in the ring, at most about `limit` of them; returns how many, or `None`
/// once the receiver is gone.
async fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<RingMsg>,
    metrics: &Metrics,
    limit: usize,
) -> Option<usize> {
    let mut forwarded = 0;
    loop {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH && forwarded + batch.len() < limit {
            let Some(item) = ring.next() else { break };
            match decode(&item) {
                Ok(event) => {
                    metrics.event(event.kind());
                    batch.push(event);
                }
                Err(err) => {
                    metrics.decode_errors.inc();
                    tracing::warn!(%err, "dropped an undecodable ring buffer record");
                }
            }
        }
        let full = batch.len() == MAX_BATCH && forwarded + batch.len() < limit;
        forwarded += batch.len();
        if !batch.is_empty() && tx.send(RingMsg::Events(batch)).await.is_err() {
            return None;
        }
        if !full {
            return Some(forwarded);
        }
    }
}
