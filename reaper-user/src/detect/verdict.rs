//! Is a target active, idle past its timeout, or orphaned past its grace? Pure: the caller
//! passes the time and the evidence in (tokio-console's `Warning::check` shape).
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use crate::clock::Nanos;

/// What was observed about a target (and its descendants).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The last sign of activity: a socket byte, a descendant's exec or exit, CPU above the
    /// threshold, or when watching began.
    pub last_activity: Nanos,
    /// What that last sign was.
    pub last_activity_kind: ActivityKind,
    /// The last socket byte sent or received, if any was seen.
    pub last_socket_byte: Option<Nanos>,
    /// CPU use over the last sample, as a fraction of one core.
    pub cpu_rate: Option<f64>,
    /// The parent's pid, and since when the original parent is gone (re-parented).
    pub ppid: u32,
    pub orphaned_since: Option<Nanos>,
    /// A turn in flight: the target waits on a child it started after the model's last word.
    pub(crate) turn: Option<Waiting>,
    /// The kernel could not watch one of its processes (its map was full): its activity is
    /// not fully seen, so it is never taken for idle.
    #[serde(default)]
    pub watch_failed: bool,
}

/// The child a turn in flight waits on (a tool, typically).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiting {
    pub pid: u32,
    /// When it was forked.
    pub since: Nanos,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    #[default]
    WatchStarted,
    Socket,
    Cpu,
    Io,
    DescendantExec,
    DescendantExit,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verdict {
    /// Not idle long enough (yet): reaped at `deadline` unless activity comes first.
    Active { deadline: Nanos },
    /// Waiting on a child it started during its turn (a tool): busy however silent, never idle.
    TurnInFlight { waiting_on: u32, since: Nanos },
    /// No activity since `since`, for longer than the idle timeout.
    Idle { since: Nanos },
    /// Its parent died at `since`, longer ago than the orphan grace.
    Orphaned { since: Nanos },
}

impl Verdict {
    pub fn state(&self) -> &'static str {
        match self {
            Self::Active { .. } => "active",
            Self::TurnInFlight { .. } => "turn_in_flight",
            Self::Idle { .. } => "idle",
            Self::Orphaned { .. } => "orphaned",
        }
    }

    /// Whether the target is due to be reaped.
    pub(crate) fn due(&self) -> bool {
        !matches!(self, Self::Active { .. } | Self::TurnInFlight { .. })
    }
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// When the target becomes due if nothing changes (`Nanos::MAX`: not while a turn is in flight).
pub(crate) fn deadline(e: &Evidence, idle_timeout: Duration, orphan_grace: Duration) -> Nanos {
    let idle = if e.turn.is_some() || e.watch_failed {
        Nanos::MAX
    } else {
        e.last_activity.saturating_add(nanos(idle_timeout))
    };
    match e.orphaned_since {
        Some(since) => idle.min(since.saturating_add(nanos(orphan_grace))),
        None => idle,
    }
}

/// The verdict at `now`. An orphan is reaped after its grace whatever its activity (nobody is
/// left to read its answer); a turn in flight is never idle.
pub(crate) fn judge(
    e: &Evidence,
    now: Nanos,
    idle_timeout: Duration,
    orphan_grace: Duration,
) -> Verdict {
    if let Some(since) = e.orphaned_since
        && now >= since.saturating_add(nanos(orphan_grace))
    {
        return Verdict::Orphaned { since };
    }
    if let Some(w) = e.turn {
        return Verdict::TurnInFlight {
            waiting_on: w.pid,
            since: w.since,
        };
    }
    if e.watch_failed {
        return Verdict::Active {
            deadline: deadline(e, idle_timeout, orphan_grace),
        };
    }
    if now >= e.last_activity.saturating_add(nanos(idle_timeout)) {
        return Verdict::Idle {
            since: e.last_activity,
        };
    }
    Verdict::Active {
        deadline: deadline(e, idle_timeout, orphan_grace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;
    const IDLE: Duration = Duration::from_secs(900);
    const GRACE: Duration = Duration::from_secs(60);

    fn evidence(last_activity: Nanos) -> Evidence {
        Evidence {
            last_activity,
            ..Evidence::default()
        }
    }

    #[test]
    fn idle_after_the_timeout_and_not_before() {
        let e = evidence(100 * S);
        assert_eq!(
            judge(&e, 100 * S, IDLE, GRACE),
            Verdict::Active { deadline: 1000 * S }
        );
        assert_eq!(
            judge(&e, 999 * S, IDLE, GRACE),
            Verdict::Active { deadline: 1000 * S }
        );
        assert_eq!(
            judge(&e, 1000 * S, IDLE, GRACE),
            Verdict::Idle { since: 100 * S }
        );
        assert!(judge(&e, 5000 * S, IDLE, GRACE).due());
    }

    #[test]
    fn activity_pushes_the_deadline() {
        let mut e = evidence(100 * S);
        e.last_activity = 950 * S;
        assert_eq!(
            judge(&e, 1000 * S, IDLE, GRACE),
            Verdict::Active { deadline: 1850 * S }
        );
    }

    #[test]
    fn orphans_are_due_after_the_grace_whatever_their_activity() {
        let mut e = evidence(500 * S);
        e.orphaned_since = Some(490 * S);
        assert_eq!(deadline(&e, IDLE, GRACE), 550 * S);
        assert_eq!(
            judge(&e, 549 * S, IDLE, GRACE),
            Verdict::Active { deadline: 550 * S }
        );
        assert_eq!(
            judge(&e, 550 * S, IDLE, GRACE),
            Verdict::Orphaned { since: 490 * S }
        );
    }

    #[test]
    fn a_turn_in_flight_is_never_idle_however_long_it_is_silent() {
        let mut e = evidence(100 * S);
        e.turn = Some(Waiting {
            pid: 7,
            since: 101 * S,
        });
        assert_eq!(deadline(&e, IDLE, GRACE), Nanos::MAX);
        let v = judge(&e, 100_000 * S, IDLE, GRACE);
        assert_eq!(
            v,
            Verdict::TurnInFlight {
                waiting_on: 7,
                since: 101 * S
            }
        );
        assert!(!v.due());
        // An orphan's grace still ends it: nobody is left to read the turn's answer.
        e.orphaned_since = Some(200 * S);
        assert_eq!(
            judge(&e, 260 * S, IDLE, GRACE),
            Verdict::Orphaned { since: 200 * S }
        );
    }

    #[test]
    fn an_idle_orphan_is_due_at_the_earlier_deadline() {
        let mut e = evidence(0);
        e.orphaned_since = Some(899 * S);
        assert_eq!(deadline(&e, IDLE, GRACE), 900 * S);
        assert_eq!(judge(&e, 900 * S, IDLE, GRACE), Verdict::Idle { since: 0 });
    }
}
