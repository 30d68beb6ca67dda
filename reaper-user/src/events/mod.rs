//! Lifecycle events as the daemon sees them: decoded from ring buffer records
//! ([`decode`]), read off the ring buffer ([`source`]).
pub mod decode;
pub mod ring;

use std::fmt;

use bytes::Bytes;
use reaper_common::EventKind;
use serde::{Deserialize, Serialize};

pub use decode::decode;

/// Clock ticks per second as `/proc/PID/stat` counts start times (`USER_HZ`).
pub(crate) fn ticks_per_second() -> u64 {
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
    pub(crate) fn from_ns(pid: u32, start_ns: u64) -> Self {
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

/// argv as the kernel keeps it: NUL-separated arguments (like `/proc/PID/cmdline`), or
/// unknown: the kernel did not read it at the process's exec ([`Argv::unknown`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Argv(Option<Bytes>);

impl Default for Argv {
    /// Empty (known to be empty), as a placeholder's.
    fn default() -> Self {
        Self(Some(Bytes::new()))
    }
}

impl Argv {
    pub fn new(raw: impl Into<Bytes>) -> Self {
        Self(Some(raw.into()))
    }

    /// Not read: the exec program sends argv only for processes that were candidates by
    /// their name, or watched, at their exec (`reaper_common::EXEC_IMAGE_UNREAD`). Never a
    /// match for a rule's `argv_any`: whoever needs it reads `/proc/PID/cmdline` first, and
    /// if that fails the rule does not match (`Mismatch::ArgvUnknown`).
    pub fn unknown() -> Self {
        Self(None)
    }

    /// Whether this argv was not read ([`Argv::unknown`]).
    pub fn is_unknown(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn from_args<S: AsRef<str>>(args: &[S]) -> Self {
        let mut raw = Vec::new();
        for arg in args {
            raw.extend_from_slice(arg.as_ref().as_bytes());
            raw.push(0);
        }
        Self(Some(raw.into()))
    }

    /// The raw NUL-separated bytes (none if unknown).
    pub fn raw(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }

    /// Each argument as bytes (non-UTF-8 is kept as is); none if unknown.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let raw = self.raw();
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        raw.split(|b| *b == 0).filter(|_| !raw.is_empty())
    }

    /// Each argument, non-UTF-8 bytes replaced.
    pub fn to_strings(&self) -> Vec<String> {
        self.iter()
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect()
    }

    /// argv for a log line: the values of flags that carry secrets or whole configurations
    /// (`--mcp-config`, `--system-prompt`, …), and anything that looks like a key or token,
    /// replaced by their length; the whole cut at `max_chars` characters.
    pub(crate) fn redacted(&self, max_chars: usize) -> String {
        let args = self.to_strings();
        let mut out: Vec<String> = Vec::with_capacity(args.len());
        let mut hide_next = false;
        for arg in &args {
            if std::mem::take(&mut hide_next) {
                out.push(format!("<{} bytes redacted>", arg.len()));
                continue;
            }
            let (flag, value) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v)),
                _ => (arg.as_str(), None),
            };
            if SECRET_FLAGS.contains(&flag) {
                match value {
                    Some(v) => out.push(format!("{flag}=<{} bytes redacted>", v.len())),
                    None => {
                        out.push(flag.to_owned());
                        hide_next = true;
                    }
                }
            } else if looks_secret(value.unwrap_or(arg)) {
                out.push(match value {
                    Some(v) => format!("{flag}=<{} bytes redacted>", v.len()),
                    None => format!("<{} bytes redacted>", arg.len()),
                });
            } else {
                out.push(word(arg).to_string());
            }
        }
        let joined = out.join(" ");
        match joined.char_indices().nth(max_chars) {
            Some((cut, _)) => format!("{}…", &joined[..cut]),
            None => joined,
        }
    }
}

/// Flags whose value is a secret or a whole configuration (prompts, MCP server commands with
/// their environment and tokens): never logged.
const SECRET_FLAGS: &[&str] = &[
    "--mcp-config",
    "--system-prompt",
    "--append-system-prompt",
    "--settings",
    "--agents",
    "--api-key",
    "--token",
    "--password",
];

/// Whether `s` looks like a credential: a known key prefix, a `key=`/`token=`-style pair, or a
/// long run of key-like characters.
fn looks_secret(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    ["sk-ant-", "sk-", "ghp_", "github_pat_", "xox", "akia"]
        .iter()
        .any(|p| lower.starts_with(p) && s.len() >= 20)
        || ["api_key=", "apikey=", "token=", "secret=", "password="]
            .iter()
            .any(|k| lower.contains(k))
        || (s.len() >= 32
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_+/=".contains(c))
            && s.chars().any(|c| c.is_ascii_digit()))
}

impl fmt::Debug for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.to_strings()).finish()
    }
}

/// Arguments joined by spaces for a person to read, one line however they were written: each
/// argument is shown as a [`word`] (bare when it is plain, quoted and escaped otherwise), so a
/// newline in a `bash -c` script, an escape sequence or a space inside one argument can neither
/// break `reaper tree`'s one-process-per-line output nor pass for two arguments.
impl fmt::Display for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, arg) in self.to_strings().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}", word(arg))?;
        }
        Ok(())
    }
}

/// Whether `c` must not reach a terminal, a log line or a reader's eyes as itself: control
/// characters (a newline forges a log line, ESC starts a terminal sequence), format characters
/// (general category Cf: the bidi overrides and isolates U+202A–U+202E and U+2066–U+2069 that
/// reorder what is shown, the zero-width U+200B–U+200F and U+FEFF, the soft hyphen, tags),
/// line and paragraph separators (U+2028, U+2029) and unassigned code points (which a later
/// Unicode may make format characters).
pub fn hidden(c: char) -> bool {
    use unicode_properties::{GeneralCategory as G, UnicodeGeneralCategory as _};
    matches!(
        c.general_category(),
        G::Control | G::Format | G::LineSeparator | G::ParagraphSeparator | G::Unassigned
    )
}

/// Writes `s` with backslashes doubled and [`hidden`] characters escaped (`\n`, `\t`, `\r`,
/// `\u{202e}`); with `quote`, double quotes are escaped too (`\"`).
fn write_escaped(out: &mut impl fmt::Write, s: &str, quote: bool) -> fmt::Result {
    for c in s.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '"' if quote => out.write_str("\\\"")?,
            '\n' => out.write_str("\\n")?,
            '\t' => out.write_str("\\t")?,
            '\r' => out.write_str("\\r")?,
            c if hidden(c) => write!(out, "{}", c.escape_unicode())?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// `s` (text a process controls: argv, comm, a path) made safe for one line of human output:
/// backslashes doubled, control, format (bidi, zero-width) and separator characters escaped,
/// so what is shown is what the bytes are and nothing can start a new line or reorder the text.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || hidden(c)) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    write_escaped(&mut out, s, false).expect("writing to a String");
    out.into()
}

/// `s` in double quotes, escaped as by [`printable`] and with its own double quotes escaped:
/// one `key="value"` field of a log line or of `reaper events`, whatever `s` holds (spaces,
/// `key=value` lookalikes, quotes) — a process cannot add a field of its own.
pub(crate) fn quoted(s: &str) -> impl fmt::Display + '_ {
    struct Quoted<'a>(&'a str);
    impl fmt::Display for Quoted<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("\"")?;
            write_escaped(f, self.0, true)?;
            f.write_str("\"")
        }
    }
    Quoted(s)
}

/// `s` bare when it is plain (not empty, no whitespace, quote, backslash or [`hidden`]
/// character), else [`quoted`]: one argument or name in a column of human output.
pub(crate) fn word(s: &str) -> impl fmt::Display + '_ {
    struct Word<'a>(&'a str);
    impl fmt::Display for Word<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let plain = !self.0.is_empty()
                && !self
                    .0
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\' || hidden(c));
            if plain {
                f.write_str(self.0)
            } else {
                write!(f, "{}", quoted(self.0))
            }
        }
    }
    Word(s)
}

/// A list of strings, or `null` when unknown.
impl Serialize for Argv {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (!self.is_unknown()).then(|| self.to_strings()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Option::<Vec<String>>::deserialize(d)?
            .map_or_else(Self::unknown, |args| Self::from_args(&args)))
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
            (None, Some(sig)) => write!(
                f,
                "signal {sig}{}",
                if self.core_dumped() { " (core)" } else { "" }
            ),
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
        /// `None` where the kernel did not stamp it: an exec whose image it did not read (see
        /// `filename`), whose time nothing reads.
        time_ns: Option<u64>,
        parent_pid: u32,
        uid: u32,
        comm: String,
        /// The exec'd path; `None` where the kernel did not read it (as for [`Argv::unknown`]:
        /// `reaper_common::EXEC_IMAGE_UNREAD`).
        filename: Option<String>,
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

    pub(crate) fn time_ns(&self) -> Option<u64> {
        match self {
            Self::Fork { time_ns, .. }
            | Self::Exit { time_ns, .. }
            | Self::Rename { time_ns, .. } => Some(*time_ns),
            Self::Exec { time_ns, .. } => *time_ns,
        }
    }
}

/// One line per event. Every value a process controls (comm, file, argv) is [`quoted`], so a
/// process can neither start a line nor add a `key=value` field of its own.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Seconds, or a `-` in the same width where the kernel did not stamp the event.
        let t = match self.time_ns() {
            Some(ns) => format!("{:>12.6}", ns as f64 / 1e9),
            None => format!("{:>12}", "-"),
        };
        match self {
            Self::Fork {
                id,
                parent,
                uid,
                comm,
                ..
            } => {
                write!(
                    f,
                    "{t} fork   pid={} ppid={} uid={uid} comm={}",
                    id.pid,
                    parent.pid,
                    quoted(comm)
                )
            }
            Self::Exec {
                id,
                parent_pid,
                uid,
                filename,
                argv,
                argv_truncated,
                ..
            } => {
                write!(
                    f,
                    "{t} exec   pid={} ppid={parent_pid} uid={uid} file=",
                    id.pid,
                )?;
                // Unread, like an unknown argv: a bare `-`.
                match filename {
                    Some(path) => write!(f, "{}", quoted(path))?,
                    None => f.write_str("-")?,
                }
                f.write_str(" argv=")?;
                // Unknown argv is a bare `-`: no quoted value, so no argv can pass for it.
                if argv.is_unknown() {
                    f.write_str("-")
                } else {
                    write!(
                        f,
                        "{}{}",
                        quoted(&argv.to_string()),
                        if *argv_truncated { " (truncated)" } else { "" }
                    )
                }
            }
            Self::Exit {
                id,
                status,
                reaper_pid,
                ..
            } => {
                write!(
                    f,
                    "{t} exit   pid={} {status} children→{reaper_pid}",
                    id.pid
                )
            }
            Self::Rename { id, comm, .. } => {
                write!(f, "{t} rename pid={} comm={}", id.pid, quoted(comm))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_in_logs_hides_configs_prompts_and_keys_and_is_cut() {
        let argv = Argv::from_args(&[
            "/usr/bin/claude",
            "--output-format",
            "stream-json",
            "--mcp-config",
            r#"{"mcpServers":{"x":{"env":{"TOKEN":"abc"}}}}"#,
            "--system-prompt=You are secret",
            "--model=claude-sonnet-4-5",
            "sk-ant-api03-0123456789abcdefghij",
            "--header=api_key=hunter2",
        ]);
        let shown = argv.redacted(1000);
        assert_eq!(
            shown,
            "/usr/bin/claude --output-format stream-json --mcp-config <44 bytes redacted> \
             --system-prompt=<14 bytes redacted> --model=claude-sonnet-4-5 <33 bytes redacted> \
             --header=<15 bytes redacted>"
        );
        for secret in ["TOKEN", "secret", "sk-ant", "hunter2"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let long = Argv::from_args(&["a".repeat(900)]);
        assert_eq!(
            long.redacted(100).chars().count(),
            101,
            "cut, with an ellipsis"
        );
    }

    /// Every character that must never be printed as itself: what each output escapes.
    const HOSTILE: &[char] = &[
        '\n',
        '\r',
        '\t',
        '\x1b',
        '\x07',
        '\x7f',
        '\u{85}',
        '\u{9b}', // C0, DEL, C1 (NEL, CSI)
        '\u{ad}',
        '\u{61c}',
        '\u{180e}', // soft hyphen, Arabic letter mark, Mongolian vowel separator
        '\u{200b}',
        '\u{200c}',
        '\u{200d}',
        '\u{200e}',
        '\u{200f}', // zero-width, LRM, RLM
        '\u{202a}',
        '\u{202b}',
        '\u{202c}',
        '\u{202d}',
        '\u{202e}', // bidi embeddings, overrides
        '\u{2028}',
        '\u{2029}', // line and paragraph separators
        '\u{2060}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}', // word joiner, isolates
        '\u{feff}',
        '\u{fff9}',
        '\u{e0001}',
        '\u{e0041}', // BOM, annotation anchor, tags
    ];

    #[test]
    fn printable_escapes_controls_bidi_and_invisible_characters() {
        for &c in HOSTILE {
            let s = format!("a{c}b");
            let shown = printable(&s);
            assert!(!shown.contains(c), "{c:?} shown as itself: {shown:?}");
            assert!(
                shown.starts_with("a\\") && shown.ends_with('b'),
                "{c:?}: {shown:?}"
            );
            assert!(!quoted(&s).to_string().contains(c), "{c:?} in quoted()");
            assert!(!word(&s).to_string().contains(c), "{c:?} in word()");
        }
        assert_eq!(
            printable("line\nnext\t\u{1b}[31m"),
            "line\\nnext\\t\\u{1b}[31m"
        );
        assert_eq!(printable("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        // A backslash is doubled, so an escape a process wrote itself cannot pass for one of ours.
        assert_eq!(printable("a\\nb"), "a\\\\nb");
        assert_ne!(printable("a\\nb"), printable("a\nb"));
        // Ordinary text, in any script, is left alone and not copied.
        for plain in [
            "claude",
            "--input-format=stream-json",
            "é ü 日本語 ☃",
            "a'b",
        ] {
            assert!(
                matches!(printable(plain), std::borrow::Cow::Borrowed(_)),
                "{plain}"
            );
        }
    }

    #[test]
    fn quoted_values_cannot_add_fields() {
        assert_eq!(quoted("claude").to_string(), "\"claude\"");
        assert_eq!(
            quoted("x\" outcome=\"killed").to_string(),
            "\"x\\\" outcome=\\\"killed\""
        );
        assert_eq!(quoted("").to_string(), "\"\"");
        assert_eq!(word("--print").to_string(), "--print");
        assert_eq!(word("a b").to_string(), "\"a b\"");
        assert_eq!(word("").to_string(), "\"\"");
        assert_eq!(
            word("a\u{a0}b").to_string(),
            "\"a\u{a0}b\"",
            "a no-break space is whitespace"
        );
        let argv = Argv::from_args(&["sh", "-c", "echo hi", "outcome=killed", ""]);
        assert_eq!(argv.to_string(), "sh -c \"echo hi\" outcome=killed \"\"");
        // In key=value output the whole argv is one quoted value.
        let line = Event::Exec {
            id: Identity {
                pid: 7,
                start_ticks: 1,
            },
            time_ns: Some(0),
            parent_pid: 1,
            uid: 0,
            comm: "sh".into(),
            filename: Some("/bin/sh\n  0.000000 exit   pid=1".into()),
            argv,
            argv_truncated: false,
            filename_truncated: false,
        }
        .to_string();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(
            line.ends_with(r#"file="/bin/sh\n  0.000000 exit   pid=1" argv="sh -c \"echo hi\" outcome=killed \"\"""#),
            "{line}"
        );
    }
}
