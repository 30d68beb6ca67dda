//! Ring buffer → decoded event batches on a channel.
//!
//! The ring buffer's fd is polled with tokio's `AsyncFd`. Wakeups are batched twice over: the
//! kernel only wakes a reader that has caught up (bpf_ringbuf_commit() in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/ringbuf.c> queues the wakeup only
//! when the consumer position equals the new record's), and each wakeup here drains everything
//! there is and forwards it as one `Vec`. A fork storm costs one context switch per batch,
//! not per event.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, RingBuf};
use reaper_common::EventKind;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Event, decode};

/// Most events forwarded in one message; a storm is split rather than buffered unboundedly.
const MAX_BATCH: usize = 4096;

/// What the source sends downstream, in ring buffer order.
#[derive(Debug)]
pub enum SourceMsg {
    Events(Vec<Event>),
    /// Everything committed to the ring buffer before the flush request with this token was
    /// sent has been forwarded.
    Flushed(u64),
}

/// Counters kept by the source (read by metrics and tests).
#[derive(Debug, Default)]
pub struct SourceStats {
    events: [AtomicU64; EventKind::ALL.len()],
    decode_errors: AtomicU64,
}

impl SourceStats {
    pub fn events(&self, kind: EventKind) -> u64 {
        self.events[kind as usize - 1].load(Ordering::Relaxed)
    }

    pub fn events_total(&self) -> u64 {
        EventKind::ALL.iter().map(|k| self.events(*k)).sum()
    }

    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }
}

/// Reads `ring` until `tx` is closed. Flush requests (tokens) arrive on `flush`.
pub async fn run(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<SourceMsg>,
    mut flush: mpsc::Receiver<u64>,
    stats: Arc<SourceStats>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged for as long as the
    // AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                if !drain(guard.get_inner_mut(), &tx, &stats).await {
                    return Ok(());
                }
                guard.clear_ready();
            }
            token = flush.recv() => {
                let Some(token) = token else { return Ok(()) };
                if !drain(fd.get_mut(), &tx, &stats).await
                    || tx.send(SourceMsg::Flushed(token)).await.is_err()
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Forwards every record in the ring. Returns false once the receiver is gone.
async fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<SourceMsg>,
    stats: &SourceStats,
) -> bool {
    loop {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(item) = ring.next() else { break };
            match decode(&item) {
                Ok(event) => {
                    stats.events[event.kind() as usize - 1].fetch_add(1, Ordering::Relaxed);
                    batch.push(event);
                }
                Err(err) => {
                    stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%err, "dropped an undecodable ring buffer record");
                }
            }
        }
        let full = batch.len() == MAX_BATCH;
        if !batch.is_empty() && tx.send(SourceMsg::Events(batch)).await.is_err() {
            return false;
        }
        if !full {
            return true;
        }
    }
}
