//! The kill rate limit.
use std::collections::VecDeque;

use super::verdict::Nanos;

/// At most `per_minute` processes signalled in any 60 s: a wrong rule cannot wipe a host. Every
/// process a reap signals counts, the target and each descendant that goes with it: a target
/// with two children takes three slots. A reap that would signal more than `per_minute` waits
/// for a minute with no kill at all and then goes alone (else it could never go). Pure: `now`
/// in.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_minute: u32,
    /// One entry per process signalled, oldest first.
    recent: VecDeque<Nanos>,
    /// Kills held back so far because the limit was reached.
    deferred: u64,
    /// A reap held back waits until then: nothing smaller jumps the queue meanwhile, and the
    /// detector sleeps until then instead of asking again and again.
    waiting_until: Nanos,
}

const MINUTE: Nanos = 60_000_000_000;

impl RateLimit {
    pub(crate) fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            recent: VecDeque::new(),
            deferred: 0,
            waiting_until: 0,
        }
    }

    /// When a slot is free (for a reap of one process, or the one held back): `now` if one
    /// is, else when enough kills leave the window.
    pub(crate) fn free_at(&mut self, now: Nanos) -> Nanos {
        self.free_at_for(now, 1)
    }

    /// When `n` slots are free at once (all of them once the window is empty, for `n` over
    /// the limit).
    fn free_at_for(&mut self, now: Nanos, n: usize) -> Nanos {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        let limit = self.per_minute as usize;
        let n = n.clamp(1, limit);
        let len = self.recent.len();
        let at = if len + n <= limit {
            now
        } else {
            self.recent[len + n - limit - 1] + MINUTE
        };
        at.max(self.waiting_until)
    }

    /// Takes `n` slots (a reap signalling `n` processes) if they are free at `now`; otherwise
    /// says when they will be.
    pub(crate) fn take(&mut self, now: Nanos, n: usize) -> Result<(), Nanos> {
        match self.free_at_for(now, n) {
            at if at <= now => {
                // Over the limit, the window is full for a minute either way.
                let counted = n.clamp(1, self.per_minute as usize);
                self.recent.extend(std::iter::repeat_n(now, counted));
                self.waiting_until = 0;
                Ok(())
            }
            at => {
                self.deferred += 1;
                self.waiting_until = at;
                Err(at)
            }
        }
    }

    /// Kills held back by the limit so far.
    pub(crate) fn deferred(&self) -> u64 {
        self.deferred
    }

    /// A new limit (SIGHUP) keeps the kills already made in the window.
    pub(super) fn set_per_minute(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        self.waiting_until = 0;
    }
}
