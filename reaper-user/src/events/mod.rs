//! Lifecycle events as the daemon sees them: decoded from ring buffer records
//! ([`decode`]), read off the ring buffer ([`source`]).
pub mod decode;
pub mod source;

use std::fmt;

use bytes::Bytes;
use reaper_common::EventKind;
use serde::{Deserialize, Serialize};

pub use decode::{DecodeError, decode};

/// Clock ticks per second as `/proc/PID/stat` counts start times (`USER_HZ`).
pub fn ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| procfs::ticks_per_second().max(1))
}

/// A process's identity: its pid and its start time. PIDs are reused; the pair is not.
///
/// The start time is kept in clock ticks since boot, the unit `/proc/PID/stat` uses, so kernel
/// events (ns) and `/proc` scans (ticks) name the same process the same way. Two processes
/// would need the same pid within one tick (10 ms) to collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub pid: u32,
    pub start_ticks: u64,
}

impl Identity {
    /// From a kernel start time in ns since boot.
    pub fn from_ns(pid: u32, start_ns: u64) -> Self {
        Self {
            pid,
            start_ticks: start_ns / (1_000_000_000 / ticks_per_second()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pid, self.start_ticks)
    }
}

/// argv as the kernel keeps it: NUL-separated arguments (like `/proc/PID/cmdline`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Argv(Bytes);

impl Argv {
    pub fn new(raw: impl Into<Bytes>) -> Self {
        Self(raw.into())
    }

    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Self {
        let mut raw = Vec::new();
        for arg in args {
            raw.extend_from_slice(arg.as_ref().as_bytes());
            raw.push(0);
        }
        Self(raw.into())
    }

    /// The raw NUL-separated bytes.
    pub fn raw(&self) -> &Bytes {
        &self.0
    }

    /// Each argument as bytes (non-UTF-8 is kept as is).
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let raw = self.0.strip_suffix(&[0]).unwrap_or(&self.0);
        raw.split(|b| *b == 0).filter(|_| !raw.is_empty())
    }

    /// Each argument, non-UTF-8 bytes replaced.
    pub fn to_strings(&self) -> Vec<String> {
        self.iter()
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.to_strings()).finish()
    }
}

/// Arguments joined by spaces for a person to read, one line however they were written:
/// control characters (a newline in a `bash -c` script, an escape sequence) are shown
/// escaped, so `reaper tree`, `reaper events` and the logs keep one process per line.
impl fmt::Display for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, arg) in self.to_strings().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&printable(arg))?;
        }
        Ok(())
    }
}

/// `s` with control characters escaped (`\n`, `\t`, `\u{1b}`): text from a process (argv,
/// comm) on one line of human output.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

impl Serialize for Argv {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_strings().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_args(&Vec::<String>::deserialize(d)?))
    }
}

/// What `wait(2)` reports about how a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ExitSummary", from = "ExitSummary")]
pub struct ExitStatus(pub u32);

impl ExitStatus {
    /// The exit code, when the process exited by itself.
    pub fn code(self) -> Option<u8> {
        (self.0 & 0x7f == 0).then_some(((self.0 >> 8) & 0xff) as u8)
    }

    /// The signal that killed it, if one did.
    pub fn signal(self) -> Option<u8> {
        let sig = (self.0 & 0x7f) as u8;
        (sig != 0).then_some(sig)
    }

    pub fn core_dumped(self) -> bool {
        self.0 & 0x80 != 0
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code(), self.signal()) {
            (Some(code), _) => write!(f, "exit {code}"),
            (None, Some(sig)) => write!(f, "signal {sig}{}", if self.core_dumped() { " (core)" } else { "" }),
            (None, None) => write!(f, "status {:#x}", self.0),
        }
    }
}

/// How an exit status reads in JSON: the decoded parts and the raw wait status.
#[derive(Serialize, Deserialize)]
struct ExitSummary {
    code: Option<u8>,
    signal: Option<u8>,
    raw: u32,
}

impl From<ExitStatus> for ExitSummary {
    fn from(s: ExitStatus) -> Self {
        Self {
            code: s.code(),
            signal: s.signal(),
            raw: s.0,
        }
    }
}

impl From<ExitSummary> for ExitStatus {
    fn from(s: ExitSummary) -> Self {
        Self(s.raw)
    }
}

/// One lifecycle event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Event {
    Fork {
        id: Identity,
        time_ns: u64,
        parent: Identity,
        uid: u32,
        comm: String,
    },
    Exec {
        id: Identity,
        time_ns: u64,
        parent_pid: u32,
        uid: u32,
        comm: String,
        filename: String,
        argv: Argv,
        argv_truncated: bool,
        filename_truncated: bool,
    },
    Exit {
        id: Identity,
        time_ns: u64,
        status: ExitStatus,
        /// Who inherits its children.
        reaper_pid: u32,
    },
    Rename {
        id: Identity,
        time_ns: u64,
        comm: String,
    },
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Fork { .. } => EventKind::Fork,
            Self::Exec { .. } => EventKind::Exec,
            Self::Exit { .. } => EventKind::Exit,
            Self::Rename { .. } => EventKind::Rename,
        }
    }

    pub fn id(&self) -> Identity {
        match self {
            Self::Fork { id, .. }
            | Self::Exec { id, .. }
            | Self::Exit { id, .. }
            | Self::Rename { id, .. } => *id,
        }
    }

    pub fn time_ns(&self) -> u64 {
        match self {
            Self::Fork { time_ns, .. }
            | Self::Exec { time_ns, .. }
            | Self::Exit { time_ns, .. }
            | Self::Rename { time_ns, .. } => *time_ns,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.time_ns() as f64 / 1e9;
        match self {
            Self::Fork { id, parent, uid, comm, .. } => {
                write!(f, "{t:>12.6} fork   pid={} ppid={} uid={uid} comm={}", id.pid, parent.pid, printable(comm))
            }
            Self::Exec { id, parent_pid, uid, filename, argv, argv_truncated, .. } => {
                write!(f, "{t:>12.6} exec   pid={} ppid={parent_pid} uid={uid} file={} argv=[{argv}]{}",
                    id.pid, printable(filename), if *argv_truncated { " (truncated)" } else { "" })
            }
            Self::Exit { id, status, reaper_pid, .. } => {
                write!(f, "{t:>12.6} exit   pid={} {status} children→{reaper_pid}", id.pid)
            }
            Self::Rename { id, comm, .. } => write!(f, "{t:>12.6} rename pid={} comm={}", id.pid, printable(comm)),
        }
    }
}
