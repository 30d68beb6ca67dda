//! Ring buffer → batches of raw records on a channel, decoded where they are applied.
//!
//! The ring buffer's fd is polled with tokio's `AsyncFd`, and drained on a timer. Wake-ups are
//! batched: by default the kernel wakes a reader whenever it has caught up (bpf_ringbuf_commit()
//! in <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/ringbuf.c>), which for a fast
//! reader is every record — measured: ≈ 1.25 context switches per event in a fork storm. So the
//! programs submit with `BPF_RB_NO_WAKEUP` until their CPU has submitted its share of an eighth
//! of the ring since it last woke the reader (then `BPF_RB_FORCE_WAKEUP`), and this reader also
//! drains on a timer ([`POLL_MIN`] while events flow, backing off to [`POLL_MAX`] when quiet or
//! when they only trickle in). Each drain forwards everything there is as one or more batches
//! of raw records (at most [`MAX_BATCH`] each), taken from [`Batches`]: the consumer decodes and
//! applies them, then hands the emptied ones back.
use std::sync::{Arc, Mutex};

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

/// The records a timed drain aims to find. Each timed drain sets the next one's delay to what
/// would have found this many at the rate just seen (at most doubling it, within [`POLL_MIN`]
/// and [`POLL_MAX`]): a storm is drained every [`POLL_MIN`], while a host's sporadic events (a
/// build's, a cron job's) no longer pull a quiet daemon back to ten wake-ups a second for each
/// one of them.
const DRAIN_TARGET: usize = 64;

/// The delay before the next timed drain, after one that waited `delay` and found `drained`
/// records.
fn next_delay(delay: std::time::Duration, drained: usize) -> std::time::Duration {
    let longest = (delay * 2).min(POLL_MAX);
    if drained == 0 {
        return longest;
    }
    delay
        .mul_f64(DRAIN_TARGET as f64 / drained as f64)
        .clamp(POLL_MIN, longest.max(POLL_MIN))
}

/// Records read off the ring in one drain, as the kernel wrote them: decoded by whoever applies
/// them ([`Batch::events`]), one at a time.
///
/// Decoding here, on the reader's thread, was the daemon's largest cost: `perf record
/// --call-graph dwarf` on the daemon over 12 × 5,000 spawns put 17 % of its samples in growing
/// each drain's fresh `Vec<Event>` and 20 % in `_int_malloc` under `decode` — the reader thread
/// allocated every event's strings and the tree's thread freed them, so glibc's per-thread
/// caches never served one (the daemon runs one malloc arena, see `main.rs`). Now the reader
/// only copies bytes into a reused buffer, and each event is decoded, applied and dropped on
/// one thread.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        self.ends.push(self.bytes.len());
    }

    /// The records, decoded one by one and counted in `metrics`; an undecodable record is
    /// counted, logged and skipped.
    pub fn events<'a>(&'a self, metrics: &'a Metrics) -> impl Iterator<Item = Event> + 'a {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .filter_map(move |(start, end)| match decode(&self.bytes[start..end]) {
                Ok(event) => {
                    metrics.event(event.kind());
                    Some(event)
                }
                Err(err) => {
                    metrics.decode_errors.inc();
                    tracing::warn!(%err, "dropped an undecodable ring buffer record");
                    None
                }
            })
    }
}

/// Applied batches, handed back to the reader so a storm reuses a few buffers.
#[derive(Clone, Debug, Default)]
pub struct Batches(Arc<Mutex<Vec<Batch>>>);

impl Batches {
    /// Buffers kept: one being filled while the other is applied; at most [`MAX_BATCH`]
    /// records each, and that only after a storm filled them.
    const KEPT: usize = 2;

    fn take(&self) -> Batch {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    /// Record bytes a kept buffer keeps room for: a storm of long command lines (4,096 records
    /// of several KiB) must not leave tens of MB held for good.
    const KEPT_BYTES: usize = 256 << 10;

    /// Hands an applied batch back (emptied here, and shrunk if a storm grew it) for a later
    /// drain.
    pub fn give_back(&self, mut batch: Batch) {
        batch.bytes.clear();
        batch.bytes.shrink_to(Self::KEPT_BYTES);
        batch.ends.clear();
        let mut kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < Self::KEPT {
            kept.push(batch);
        }
    }
}

/// What the source sends downstream, in ring buffer order.
#[derive(Debug)]
pub enum RingMsg {
    Events(Batch),
    /// Everything committed to the ring buffer before the flush request with this token was
    /// sent has been forwarded.
    Flushed(u64),
}

/// Reads `ring` (`ring_bytes` long) until `tx` is closed. Flush requests (tokens) arrive on
/// `flush`. Batches are taken from `batches`; whoever applies them may hand them back.
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
    batches: Batches,
) -> std::io::Result<()> {
    let limit = (ring_bytes / MIN_RECORD_BYTES).max(MAX_BATCH);
    // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged for as long as the
    // AsyncFd owns the RingBuf.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    let mut delay = POLL_MIN;
    loop {
        tokio::select! {
            () = tokio::time::sleep(delay) => {
                let Some(drained) = drain(fd.get_mut(), &tx, &batches, limit).await else {
                    return Ok(());
                };
                delay = next_delay(delay, drained);
            }
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let Some(drained) = drain(guard.get_inner_mut(), &tx, &batches, limit).await else {
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
                if drain(fd.get_mut(), &tx, &batches, limit).await.is_none()
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
    batches: &Batches,
    limit: usize,
) -> Option<usize> {
    let mut forwarded = 0;
    loop {
        let mut batch = batches.take();
        while batch.len() < MAX_BATCH && forwarded + batch.len() < limit {
            let Some(item) = ring.next() else { break };
            batch.push(&item);
        }
        let full = batch.len() == MAX_BATCH && forwarded + batch.len() < limit;
        forwarded += batch.len();
        if batch.is_empty() {
            batches.give_back(batch);
        } else if tx.send(RingMsg::Events(batch)).await.is_err() {
            return None;
        }
        if !full {
            return Some(forwarded);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_come_often_in_a_storm_and_seldom_for_a_trickle() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        // Nothing found: back off, doubling, to the longest.
        assert_eq!(next_delay(POLL_MIN, 0), ms(200));
        assert_eq!(next_delay(POLL_MAX, 0), POLL_MAX);
        // A storm: back to the shortest at once.
        assert_eq!(next_delay(POLL_MAX, 10_000), POLL_MIN);
        assert_eq!(next_delay(POLL_MIN, 500), POLL_MIN);
        // A few events a second: the delay keeps growing (doubling at most) to the longest.
        assert_eq!(next_delay(ms(400), 3), ms(800));
        assert_eq!(next_delay(ms(800), 5), POLL_MAX);
        assert_eq!(next_delay(POLL_MAX, 16), POLL_MAX);
        // 100 events a second: a drain finds about DRAIN_TARGET of them.
        assert_eq!(next_delay(POLL_MAX, 160), ms(640));
        assert_eq!(next_delay(ms(640), 64), ms(640));
    }

    #[test]
    fn a_buffer_grown_by_a_storm_is_shrunk_when_handed_back() {
        let batches = Batches::default();
        let mut batch = batches.take();
        let record = [0u8; 4096];
        for _ in 0..MAX_BATCH {
            batch.push(&record);
        }
        assert!(batch.bytes.capacity() >= MAX_BATCH * record.len());
        batches.give_back(batch);
        let again = batches.take();
        assert!(again.is_empty());
        assert!(
            again.bytes.capacity() <= Batches::KEPT_BYTES,
            "kept {} bytes of room",
            again.bytes.capacity()
        );
    }
}
