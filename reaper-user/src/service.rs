//! Living under a service manager: log priorities the journal understands, and systemd's
//! notification protocol (`Type=notify`: `READY=1`, `RELOADING=1`, `STOPPING=1`, the watchdog).
//! Outside systemd (no `NOTIFY_SOCKET`, stderr not the journal) all of it does nothing.
use std::{io::Write as _, sync::Arc, time::Duration};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::http::Health;

/// sysexits.h `EX_CONFIG`: the configuration is wrong; restarting cannot help, so the unit
/// lists it in `RestartPreventExitStatus=`.
pub const EX_CONFIG: u8 = 78;

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM=DEV:INODE` for
/// the stream it connects, which must still be our stderr (not inherited by a child whose
/// stderr was redirected).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority for a level (sd-daemon(3): `<3>` error … `<7>` debug).
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// stderr for `tracing_subscriber::fmt`; when it is the journal, every line of a record starts
/// with `<N>`, its priority, which journald strips and records (`SyslogLevelPrefix=`, on by
/// default), so `journalctl -p warning -u reaper` shows every warning and error.
#[derive(Clone, Copy, Debug)]
pub struct Stderr {
    pub journal: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = RecordWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RecordWriter::new(self.journal.then_some(6))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        RecordWriter::new(self.journal.then(|| priority(meta.level())))
    }
}

/// One log record, written to stderr in one piece when dropped.
pub struct RecordWriter {
    priority: Option<u8>,
    buf: Vec<u8>,
}

impl RecordWriter {
    fn new(priority: Option<u8>) -> Self {
        Self {
            priority,
            buf: Vec::new(),
        }
    }
}

/// `text` with `<prio>` before every line.
fn prefixed(prio: u8, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    for line in text.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(format!("<{prio}>").as_bytes());
        out.extend_from_slice(line);
    }
    out
}

impl std::io::Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let bytes = match self.priority {
            Some(prio) => prefixed(prio, &self.buf),
            None => std::mem::take(&mut self.buf),
        };
        let _ = std::io::stderr().lock().write_all(&bytes);
    }
}

/// The last words of a failed command on stderr: at error priority when that is the journal.
pub fn print_error(text: &str) {
    let bytes = if stderr_is_journal() {
        prefixed(3, text.as_bytes())
    } else {
        text.as_bytes().to_vec()
    };
    let _ = std::io::stderr().lock().write_all(&bytes);
}

/// Tells systemd (when it asked: `NOTIFY_SOCKET`) that start-up or a reload is over.
pub fn notify_ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// A reload begins; [`notify_ready`] ends it.
pub fn notify_reloading() {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    // systemd 253+ wants the time with it (Type=notify-reload); older ones ignore it.
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(%err, "could not notify systemd");
    }
}

/// When the unit sets `WatchdogSec=`: a task that pets the watchdog at half its period, but
/// only while `/healthz` would say healthy (the same heartbeat of the tree task and the same
/// ring buffer reader). A stuck daemon stops petting and systemd restarts it.
pub fn spawn_watchdog(health: Arc<Health>) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(
        watchdog_secs = period.as_secs_f64(),
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_healthy = true;
        loop {
            tick.tick().await;
            match health.healthy(crate::clock::mono_ns()) {
                Ok(()) => {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                    was_healthy = true;
                }
                Err(why) => {
                    if was_healthy {
                        tracing::error!(why, "unhealthy: not petting the systemd watchdog");
                    }
                    was_healthy = false;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_a_record_carries_its_priority() {
        assert_eq!(prefixed(4, b"WARN one\n"), b"<4>WARN one\n");
        assert_eq!(prefixed(3, b"a\nb\n"), b"<3>a\n<3>b\n");
        assert_eq!(prefixed(6, b"no newline"), b"<6>no newline");
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("garbage", 8, 12345));
        assert!(!journal_stream_matches("", 0, 0));
    }
}
