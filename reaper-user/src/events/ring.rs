//! The ring buffer, read where its events are applied.
//!
//! The ring buffer's fd is polled with tokio's `AsyncFd`, and drained on a timer. Wake-ups are
//! batched: by default the kernel wakes a reader whenever it has caught up (bpf_ringbuf_commit()
//! in <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/ringbuf.c>), which for a fast
//! reader is every record — measured: ≈ 1.25 context switches per event in a fork storm. So the
//! programs submit with `BPF_RB_NO_WAKEUP` until their CPU has submitted its share of part of
//! the ring (`probes::wakeup_bytes`) since it last woke the reader (then `BPF_RB_FORCE_WAKEUP`),
//! and this reader also drains on a timer ([`POLL_MIN`] while events flow, backing off to
//! [`POLL_MAX`] when quiet or when they only trickle in).
//!
//! Whoever applies the events drains the ring itself ([`Reader::due`], then [`Reader::drain`]):
//! each record is decoded straight from the ring's mapped pages and applied before the next is
//! read. A reader task that copied the records into batches for the tree's task cost a copy of
//! every record and a second task's wake-up per drain; the ring buffer itself is the queue.
//! Only while `/proc` is scanned at start-up, before there is a tree to apply them to, are the
//! records copied out ([`Reader::hold_while`]), so a storm during a long scan cannot fill it.
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, time::Instant};

use super::{Event, decode};
use crate::metrics::Metrics;

/// Most records a timed or woken drain reads before the caller's loop comes round again (and
/// then drains again at once): a storm cannot hold off the caller's other work for long.
const MAX_DRAIN: usize = 4096;

/// The smallest record the ring can hold: its 8-byte header and the smallest event (exit).
const MIN_RECORD_BYTES: usize = 8 + size_of::<reaper_common::ExitEvent>();

/// How often the ring is drained without a wake-up while events flow…
///
/// Each drain starts cold: the storms that made the events ran on these CPUs meanwhile, so
/// the tree's maps, the allocator's lists and the runtime's state are out of the cache again,
/// and that refill, not the events, was most of what a drain cost. Over 4 × `storm 5000 1`
/// (daemon threads' run time per event, alternated): 100 ms 0.49–0.55 µs (≈ 200 context
/// switches), 200 ms 0.42–0.43 µs (≈ 135), 400 ms 0.37–0.41 µs (≈ 85). Nothing waits on the
/// timer for correctness: queries, decisions and reconciles flush the ring first, and the
/// kernel still wakes the reader as the ring fills (`probes::wakeup_bytes`); only the
/// applied-event stream lags by up to this much during a storm (by up to [`POLL_MAX`] on a
/// quiet host).
pub(crate) const POLL_MIN: Duration = Duration::from_millis(400);
/// …backing off (doubling) to this while drains find nothing: the longest an event waits on a
/// quiet host. A fixed 100 ms timer cost a quiet daemon ≈ 0.17 % of a core (measured).
pub(crate) const POLL_MAX: Duration = Duration::from_millis(1600);

/// The records a timed drain aims to find. Each timed drain sets the next one's delay to what
/// would have found this many at the rate just seen (at most doubling it, within [`POLL_MIN`]
/// and [`POLL_MAX`]): a storm is drained every [`POLL_MIN`], while a host's sporadic events (a
/// build's, a cron job's) no longer pull a quiet daemon back to ten wake-ups a second for each
/// one of them.
const DRAIN_TARGET: usize = 64;

/// The delay before the next timed drain, after one that waited `delay` and found `drained`
/// records.
fn next_delay(delay: Duration, drained: usize) -> Duration {
    let longest = (delay * 2).min(POLL_MAX);
    if drained == 0 {
        return longest;
    }
    delay
        .mul_f64(DRAIN_TARGET as f64 / drained as f64)
        .clamp(POLL_MIN, longest.max(POLL_MIN))
}

/// Decodes one record and counts it in `metrics`; an undecodable record is counted, logged and
/// skipped.
pub fn decode_counted(record: &[u8], metrics: &Metrics) -> Option<Event> {
    match decode(record) {
        Ok(event) => {
            metrics.event(event.kind());
            Some(event)
        }
        Err(err) => {
            metrics.decode_errors.inc();
            tracing::warn!(%err, "dropped an undecodable ring buffer record");
            None
        }
    }
}

/// Why a drain is due, and so how much it reads and when the next timed one comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// The timer ran out.
    Timer,
    /// The kernel woke the reader.
    Woken,
    /// Everything committed before now must be read: a ring's worth of records at most, so a
    /// storm that keeps the ring full cannot hold a flush off, and once a ring's worth has been
    /// read, every record committed before the flush was asked for has been read.
    Flush,
}

/// Records copied out of the ring while there was nothing to apply them to yet.
#[derive(Debug, Default)]
pub struct Held {
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
}

impl Held {
    /// At most this many records are held; past it the ring fills and the kernel counts what it
    /// drops (the loss check then reconciles), as when the tree falls behind.
    const MAX: usize = 256 * MAX_DRAIN;

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

    /// The records, in ring order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bytes[start..end])
    }
}

/// The ring buffer and when to drain it next.
pub struct Reader {
    fd: AsyncFd<RingBuf<MapData>>,
    /// A ring's worth of records: what a [`Drain::Flush`] reads at most.
    ring_records: usize,
    delay: Duration,
    /// When the next timed drain is due.
    next: Instant,
}

impl Reader {
    /// Reads `ring`, `ring_bytes` long.
    pub fn new(ring: RingBuf<MapData>, ring_bytes: usize) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged for as long as the
        // AsyncFd owns the RingBuf.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
        Ok(Self {
            fd,
            ring_records: (ring_bytes / MIN_RECORD_BYTES).max(MAX_DRAIN),
            delay: POLL_MIN,
            next: Instant::now() + POLL_MIN,
        })
    }

    /// Waits until a drain is due: the timer ran out or the kernel woke the reader. Cancel-safe
    /// (it can be one branch of a `select!`). An error means the ring can no longer be polled.
    pub async fn due(&mut self) -> std::io::Result<Drain> {
        tokio::select! {
            () = tokio::time::sleep_until(self.next) => Ok(Drain::Timer),
            guard = self.fd.readable_mut() => {
                // Cleared before the drain, not after: a wake-up the kernel sends while the
                // drain runs sets it again, so none is lost.
                guard?.clear_ready();
                Ok(Drain::Woken)
            }
        }
    }

    /// Reads the records there are (as many as `how` allows), handing each to `apply` in ring
    /// order before the next is read; returns how many. Schedules the next timed drain.
    pub fn drain(&mut self, how: Drain, mut apply: impl FnMut(&[u8])) -> usize {
        let most = match how {
            Drain::Flush => self.ring_records,
            Drain::Timer | Drain::Woken => MAX_DRAIN,
        };
        let ring = self.fd.get_mut();
        let mut drained = 0;
        while drained < most {
            let Some(record) = ring.next() else { break };
            apply(&record);
            drained += 1;
        }
        let now = Instant::now();
        match how {
            Drain::Flush => {}
            Drain::Timer => self.delay = next_delay(self.delay, drained),
            Drain::Woken => self.delay = POLL_MIN,
        }
        if how != Drain::Flush {
            // Stopped at its bound: more is waiting, so the next drain is due at once.
            self.next = if drained == most {
                now
            } else {
                now + self.delay
            };
        }
        drained
    }

    /// Copies records out of the ring into [`Held`] until `until` completes (start-up: while
    /// `/proc` is scanned); returns its output and the records.
    pub async fn hold_while<T>(&mut self, until: impl Future<Output = T>) -> (T, Held) {
        let mut held = Held::default();
        let mut until = std::pin::pin!(until);
        loop {
            tokio::select! {
                out = &mut until => return (out, held),
                due = self.due(), if held.len() < Held::MAX => match due {
                    Ok(how) => {
                        self.drain(how, |record| held.push(record));
                    }
                    // Not polled any more: what is in the ring waits for the caller's drains.
                    Err(err) => {
                        tracing::warn!(%err, "polling the ring buffer failed during start-up");
                        return (until.await, held);
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_come_often_in_a_storm_and_seldom_for_a_trickle() {
        let ms = Duration::from_millis;
        // Nothing found: back off, doubling, to the longest.
        assert_eq!(next_delay(POLL_MIN, 0), POLL_MIN * 2);
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
}
